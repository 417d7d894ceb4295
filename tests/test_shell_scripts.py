"""The shell scripts (``*.sh`` in the repository root and ``.ci/run``) parse: ``bash -n`` on each."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = sorted(REPO_ROOT.glob("*.sh")) + [REPO_ROOT / ".ci" / "run"]
BASH = shutil.which("bash")


def bash_n(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)


def test_the_scripts_are_found() -> None:
    assert {"demo.sh", "test.sh", "train.sh"} <= {p.name for p in SCRIPTS}
    assert all(p.is_file() for p in SCRIPTS)


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_script_parses(script: Path) -> None:
    completed = bash_n(script)
    assert completed.returncode == 0 and completed.stderr == "", completed.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_a_syntax_error_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: an unclosed ``if`` is reported."""
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/usr/bin/env bash\nif [ -n \"$1\" ]; then\n  echo yes\n")
    completed = bash_n(broken)
    assert completed.returncode != 0 and "syntax error" in completed.stderr


# --- train.sh / test.sh with a stand-in python (issue 22, item 6) ------------------------------------------------


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A PYTHON that records its working folder and arguments, one line a call, and succeeds."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s|%s\\n" "$PWD" "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    return fake, calls


def _run_script(name: str, cwd: Path, fake: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHON": str(fake), **env}
    return subprocess.run([BASH, str(REPO_ROOT / name)], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=600)  # the real-python runs score datasets: generous on a busy machine


def _resolved(call: str, flag: str) -> Path:
    """The path given to ``flag`` in a recorded call, resolved against the call's working folder."""
    folder, args = call.split("|", 1)
    words = args.split()
    return (Path(folder) / words[words.index(flag) + 1]).resolve()


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_takes_relative_roots_from_the_callers_folder(tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    caller = tmp_path / "work"
    (caller / "d" / "visa").mkdir(parents=True)
    (caller / "d" / "visa" / "meta.json").write_text("{}")
    (caller / "ck" / "9_12_4_multiscale_visa").mkdir(parents=True)
    (caller / "ck" / "9_12_4_multiscale_visa" / "epoch_3.pth").write_bytes(b"x")
    completed = _run_script("test.sh", caller, fake, DATA_ROOT="d", CKPT_ROOT="ck", RESULTS_ROOT="res",
                            EPOCH="3", DATASETS="visa")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    test_call, summary_call = calls.read_text().splitlines()
    assert _resolved(test_call, "--data_path") == (caller / "d" / "visa").resolve()
    assert _resolved(test_call, "--checkpoint_path") == (caller / "ck" / "9_12_4_multiscale_visa" / "epoch_3.pth"
                                                         ).resolve()
    assert _resolved(test_call, "--save_path") == (caller / "res" / "visa").resolve()
    folder, args = summary_call.split("|", 1)
    assert args.split()[-1] == "res/visa" and folder == str(caller)  # the run's folder, last
    assert _resolved(summary_call, "--json") == (caller / "res" / "summary.json").resolve()


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_fails_when_a_dataset_asked_for_by_name_is_missing(tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    completed = _run_script("test.sh", tmp_path, fake, DATA_ROOT="nowhere", DATASETS="mpdd")
    assert completed.returncode == 1
    assert completed.stdout.startswith("skip mpdd: nowhere/mpdd/meta.json not found")
    assert completed.stderr == ("error: DATASETS asked for mpdd, which could not run (see the skip lines above)\n")
    # A misspelt name is refused before anything runs.
    completed = _run_script("test.sh", tmp_path, fake, DATASETS="mvtc")
    assert completed.returncode == 2 and completed.stderr.startswith("error: DATASETS names mvtc, not a dataset")
    # Without DATASETS a missing dataset is skipped, and the run succeeds (the released protocol runs what is there).
    assert _run_script("test.sh", tmp_path, fake, DATA_ROOT="nowhere").returncode == 0


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_train_sh_takes_relative_roots_from_the_callers_folder_and_fails_on_a_named_missing_dataset(
        tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    (tmp_path / "d" / "mvtec").mkdir(parents=True)
    (tmp_path / "d" / "mvtec" / "meta.json").write_text("{}")
    completed = _run_script("train.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck")
    assert completed.returncode == 0, completed.stderr  # visa skipped: not asked for by name
    train_call = calls.read_text().splitlines()[0]
    assert _resolved(train_call, "--train_data_path") == (tmp_path / "d" / "mvtec").resolve()
    assert _resolved(train_call, "--save_path") == (tmp_path / "ck" / "9_12_4_multiscale_visa").resolve()
    completed = _run_script("train.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", DATASETS="visa")
    assert completed.returncode == 1 and "DATASETS asked for visa" in completed.stderr


# --- SEEDS and K_SHOT (issue 23; issue 19's few-shot protocol) -------------------------------------------------


def _calls(calls: Path) -> list[list[str]]:
    """The recorded calls as word lists (working folder dropped)."""
    return [line.split("|", 1)[1].split() for line in calls.read_text().splitlines()]


def _value(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def _touch(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_train_sh_seeds_train_each_seed_into_its_folder_from_one_kept_cache(tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    for dataset in ("mvtec", "visa"):
        _touch(tmp_path / "d" / dataset / "meta.json", "{}")
    completed = _run_script("train.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", SEEDS="1 2 3")
    assert completed.returncode == 0, completed.stderr
    *trains, summary = _calls(calls)
    assert [(_value(c, "--dataset"), _value(c, "--seed"), _value(c, "--save_path")) for c in trains] == [
        (dataset, seed, f"ck/seed_{seed}/{folder}") for seed in "123"
        for dataset, folder in (("mvtec", "9_12_4_multiscale_visa"), ("visa", "9_12_4_multiscale"))]
    # every seed of a dataset keeps and reuses the same cache folder
    assert all("--keep_cache" in c and _value(c, "--cache_dir") == f"ck/feature_cache/{_value(c, '--dataset')}"
               for c in trains)
    assert summary[1:] == ["train", *(_value(c, "--save_path") for c in trains)]
    assert "feature cache of mvtec kept for later seeds in ck/feature_cache/mvtec" in completed.stdout
    # --no_cache (or a --cache_dir of the user's) replaces the script's cache flags
    calls.unlink()
    completed = _run_script("train.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", SEEDS="4",
                            EXTRA_ARGS="--no_cache")
    assert completed.returncode == 0 and "feature cache" not in completed.stdout
    assert all("--keep_cache" not in c and "--cache_dir" not in c for c in _calls(calls)[:-1])
    # without SEEDS: the released folders, train.py's default seed, no kept cache
    calls.unlink()
    assert _run_script("train.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck").returncode == 0
    first = _calls(calls)[0]
    assert _value(first, "--save_path") == "ck/9_12_4_multiscale_visa" and "--seed" not in first
    assert "--keep_cache" not in first
    refused = _run_script("train.sh", tmp_path, fake, SEEDS="1 two")
    assert refused.returncode == 2 and refused.stderr.startswith("error: SEEDS holds two, not a whole number")


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_seeds_evaluate_each_seeds_prompts_beside_the_base_run(tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    _touch(tmp_path / "d" / "visa" / "meta.json", "{}")
    _touch(tmp_path / "d" / "mvtec" / "meta.json", "{}")
    for seed in (1, 2):
        _touch(tmp_path / "ck" / f"seed_{seed}" / "9_12_4_multiscale_visa" / "epoch_15.pth")
    _touch(tmp_path / "res" / "visa" / "results.json", "{}")  # a plain run's: the base
    completed = _run_script("test.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", RESULTS_ROOT="res",
                            SEEDS="1 2", DATASETS="visa", EXTRA_ARGS="--report")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    *tests, summary = _calls(calls)
    assert [(_value(c, "--checkpoint_path"), _value(c, "--save_path"), _value(c, "--seed")) for c in tests] == [
        ("ck/seed_1/9_12_4_multiscale_visa/epoch_15.pth", "res/seed_1/visa", "1"),
        ("ck/seed_2/9_12_4_multiscale_visa/epoch_15.pth", "res/seed_2/visa", "2")]
    assert all("--k_shot" not in c for c in tests)
    assert summary[1:] == ["results", "--paper", "paper", "--json", "res/summary_seeds.json", "--report",
                           "res/summary_seeds.html", "--base", "res/visa", "res/seed_1/visa", "res/seed_2/visa"]
    # mvtec's seed checkpoints are missing: skipped with a line saying how to train them (not asked for by name)
    calls.unlink()
    completed = _run_script("test.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", RESULTS_ROOT="res",
                            SEEDS="1", PAPER="released_log")
    assert completed.returncode == 0
    assert ('skip mvtec: prompt checkpoint ck/seed_1/9_12_4_multiscale/epoch_15.pth not found (see '
            'checkpoints/README.md; SEEDS="1" bash train.sh trains it)') in completed.stdout
    assert _calls(calls)[-1][1:4] == ["results", "--paper", "released_log"]


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_k_shot_draws_references_with_each_seed(tmp_path: Path) -> None:
    fake, calls = _fake_python(tmp_path)
    _touch(tmp_path / "d" / "mpdd" / "meta.json", "{}")
    _touch(tmp_path / "ck" / "9_12_4_multiscale_visa" / "epoch_15.pth")
    completed = _run_script("test.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", RESULTS_ROOT="res",
                            K_SHOT="4", SEEDS="5 6", DATASETS="mpdd")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    *tests, summary = _calls(calls)
    assert [(_value(c, "--checkpoint_path"), _value(c, "--save_path"), _value(c, "--k_shot"), _value(c, "--seed"))
            for c in tests] == [("ck/9_12_4_multiscale_visa/epoch_15.pth", "res/k4_seed_5/mpdd", "4", "5"),
                                ("ck/9_12_4_multiscale_visa/epoch_15.pth", "res/k4_seed_6/mpdd", "4", "6")]
    assert summary[-3:] == ["res/summary_k4.json", "res/k4_seed_5/mpdd", "res/k4_seed_6/mpdd"]
    calls.unlink()
    assert _run_script("test.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", RESULTS_ROOT="res",
                       K_SHOT="2", DATASETS="mpdd").returncode == 0
    only = _calls(calls)[0]  # one draw, test.py's default seed
    assert (_value(only, "--k_shot"), _value(only, "--seed"), _value(only, "--save_path")) == (
        "2", "111", "res/k2_seed_111/mpdd")
    for bad, message in (("four", "error: K_SHOT=four must be a whole number"),
                         ("-1", "error: K_SHOT=-1 must be a whole number")):
        refused = _run_script("test.sh", tmp_path, fake, K_SHOT=bad)
        assert refused.returncode == 2 and refused.stderr.startswith(message)
    refused = _run_script("test.sh", tmp_path, fake, PAPER="table3")
    assert refused.returncode == 2 and refused.stderr.startswith("error: PAPER=table3")


_STAND_IN_TEST = '''
import json, sys
from pathlib import Path
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
seed = int(value("--seed"))
folder = Path(value("--save_path"))
folder.mkdir(parents=True)
mean = {"image_auroc": {1: 0.80, 2: 0.84, 3: 0.85}[seed], "image_ap": 0.9}
(folder / "results.json").write_text(json.dumps({"dataset": value("--dataset"), "metric_set": "image-level",
                                                 "mean": mean, "per_class": {}, "config": {"seed": seed}}))
'''


@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_seed_loop_writes_one_folder_per_seed_and_their_mean_and_std(tmp_path: Path) -> None:
    """test.py replaced by a stand-in writing a results.json per seed; the real summarize.py reads them."""
    import sys

    stand_in = tmp_path / "stand_in_test.py"
    stand_in.write_text(_STAND_IN_TEST)
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [[ "$1" == */test.py ]]; then shift; exec "{sys.executable}" '
                    f'"{stand_in}" "$@"; fi\nexec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    _touch(tmp_path / "d" / "headct" / "meta.json", "{}")
    for seed in (1, 2, 3):
        _touch(tmp_path / "ck" / f"seed_{seed}" / "9_12_4_multiscale_visa" / "epoch_15.pth")
    completed = _run_script("test.sh", tmp_path, fake, DATA_ROOT="d", CKPT_ROOT="ck", RESULTS_ROOT="res",
                            SEEDS="1 2 3", DATASETS="headct")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert sorted(p.relative_to(tmp_path / "res").as_posix() for p in (tmp_path / "res").rglob("results.json")) == [
        "seed_1/headct/results.json", "seed_2/headct/results.json", "seed_3/headct/results.json"]
    summary = json.loads((tmp_path / "res" / "summary_seeds.json").read_text())
    auroc = next(row for row in summary["rows"] if row["metric"] == "image_auroc")
    # 80, 84, 85: mean 83, sample variance (9 + 1 + 4) / 2 = 7; the paper's HeadCT image AUROC is 93.4
    assert auroc["n"] == 3 and math.isclose(auroc["ours"], 83.0) and math.isclose(auroc["std"], math.sqrt(7.0))
    assert math.isclose(auroc["paper"], 93.4) and math.isclose(auroc["diff"], 83.0 - 93.4)
    assert "| headct    | image_auroc |   83.0 |  2.65 |   3 |    93.4 |  -10.4 |" in completed.stdout


# Typed in from the paper's Table 1 (VisA with prompts from MVTec AD), in percent.
PAPER_VISA = {"pixel_auroc": 95.5, "pixel_aupro": 87.0, "image_auroc": 82.1, "image_ap": 85.4}


@pytest.mark.slow  # test.py in a subprocess (about 10 s on 2 busy cores)
@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_test_sh_on_the_tiny_backbone_ends_with_the_table_beside_the_paper(
        tmp_path: Path, synthetic_datasets, trained_checkpoint, design_args) -> None:
    """The real test.py on synthetic data (as VisA) through test.sh: the summary holds the paper's value and
    ours - paper for every metric; the settings line names what differs from the released protocol."""
    import sys

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "visa").symlink_to(synthetic_datasets[1])
    (tmp_path / "ck" / "9_12_4_multiscale_visa").mkdir(parents=True)
    (tmp_path / "ck" / "9_12_4_multiscale_visa" / "epoch_1.pth").symlink_to(trained_checkpoint)
    completed = _run_script("test.sh", tmp_path, Path(sys.executable), DATA_ROOT="d", CKPT_ROOT="ck",
                            RESULTS_ROOT="res", EPOCH="1", DATASETS="visa",
                            EXTRA_ARGS=" ".join([*design_args, "--num_workers", "0", "--batch_size", "4"]))
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary_text = completed.stdout[completed.stdout.index("\nsettings"):]  # after test.py's own table
    table = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in summary_text.splitlines() if line.startswith("| ")]
    assert table[0] == ["dataset", "metric", "ours", "paper", "diff"]
    mean = json.loads((tmp_path / "res" / "visa" / "results.json").read_text())["mean"]
    expected = []
    for metric in ("pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"):
        ours, paper = 100 * mean[metric], PAPER_VISA[metric]
        expected.append([f"{ours:.1f}", f"{paper:.1f}", f"{ours - paper:+.1f}"])
    assert [row[2:] for row in table[1:5]] == expected and [row[2:] for row in table[5:9]] == expected
    assert [row[0] for row in table[1:]] == ["visa"] * 4 + ["mean of 1"] * 4
    settings = next(line for line in completed.stdout.splitlines() if line.startswith("settings"))
    for named in ("image size 56 (released 518)", "features list 6 24 (released 24)",
                  f"backbone {design_args[1]} (released ViT-L/14@336px)", "training batch size 4 (released 8)",
                  "training epochs 1 (released 15)", "checkpoint epoch 1 (released 15)"):
        assert named in settings
    assert json.loads((tmp_path / "res" / "summary.json").read_text())["settings"] == settings
