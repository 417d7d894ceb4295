"""Torch's CPU threads (issue 22, a busy CPU): the default, ``--threads``, workers beside busy cores, progress."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from deploy import export
from pipeline import evaluation
from pipeline import prediction as test_one_example
from pipeline import training as train
from pipeline.cli import run_cli
from pipeline.loading import choose_threads, configure_threads, quota_cores, resolve_num_workers
from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details
from tests.test_user_errors import error_line


@pytest.mark.parametrize(("requested", "cores", "torch_default", "expected"), [
    (None, 2, 2, 2),    # PyTorch's default where every core is ours
    (None, 16, 8, 8),   # never above PyTorch's default (its physical cores)
    (None, 2, 32, 2),   # a 2-CPU container quota on a 32-core host: 2, not 32
    (None, 1, 4, 1),
    (3, 2, 2, 3),       # --threads wins, even above the cores
    (1, 16, 8, 1),
])
def test_choose_threads(requested, cores, torch_default, expected):
    assert choose_threads(requested, cores, torch_default) == expected


@pytest.mark.parametrize(("line", "expected"), [
    ("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1), ("garbage", None),
    ("0 100000", None),
])
def test_cgroup_quota(line, expected):
    assert quota_cores(line) == expected


@pytest.mark.parametrize(("cpu_count", "threads", "load", "expected"), [
    (2, 1, 0.2, 1),    # one core left over by torch, idle machine
    (2, 1, 1.0, 0),    # that core busy elsewhere: no worker (it was 1)
    (16, 8, 3.4, 2),   # 16 - 8 - 3 = 5 spare: at most 2
    (5, 2, 2.2, 1),    # 5 - 2 - 2
    (2, 2, 0.0, 0),
])
def test_cpu_workers_count_only_idle_cores(monkeypatch, cpu_count, threads, load, expected):
    monkeypatch.setattr("pipeline.loading.os.cpu_count", lambda: cpu_count)
    monkeypatch.setattr("pipeline.loading.torch.get_num_threads", lambda: threads)
    monkeypatch.setattr("pipeline.loading.load_average", lambda: load)
    assert resolve_num_workers(None, torch.device("cpu")) == expected


@pytest.fixture
def restore_threads(monkeypatch):
    """Torch at 2 threads, and a default that would choose 2: only a ``--threads 1`` that is honoured gives 1.

    (1 and not 3: fast on a busy test machine, where these tests run without passive waiting.)
    """
    before = torch.get_num_threads()
    monkeypatch.setattr("pipeline.loading.TORCH_DEFAULT_THREADS", 2)
    monkeypatch.setattr("pipeline.loading.available_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_omp_num_threads_is_kept_without_threads_flag(monkeypatch, restore_threads):
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 made it when torch loaded (the default would choose 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configure_threads(None) == 1 == torch.get_num_threads()
    assert configure_threads(2) == 2 == torch.get_num_threads()  # the flag wins over the environment


@pytest.fixture
def fresh_prompts(tiny_model, tmp_path):
    path = tmp_path / "prompts.pth"
    torch.save({"prompt_learner": AnomalyCLIP_PromptLearner(tiny_model, design_details()).state_dict()}, path)
    return path


def test_default_is_torchs_within_the_available_cores(monkeypatch, restore_threads):
    torch.set_num_threads(1)
    assert configure_threads(None) == 2 == torch.get_num_threads()  # whatever the load: the numbers stay the same
    monkeypatch.setattr("pipeline.loading.available_cores", lambda: 1)  # a 1-CPU quota
    assert configure_threads(None) == 1 == torch.get_num_threads()


def test_test_py_honours_threads_and_records_them(synthetic_datasets, design_args, fresh_prompts, tmp_path,
                                                  restore_threads):
    out = tmp_path / "results"
    assert evaluation.main(["--data_path", str(synthetic_datasets[1]), "--checkpoint_path", str(fresh_prompts),
                            "--save_path", str(out), "--num_workers", "0", "--threads", "1", *design_args]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["threads"] == 1  # torch.get_num_threads() once the run set them up


def test_test_one_example_honours_threads(synthetic_datasets, design_args, fresh_prompts, tmp_path, caplog,
                                          restore_threads):
    image = sorted(synthetic_datasets[1].rglob("*.png"))[0]
    with caplog.at_level(logging.DEBUG, logger="pipeline.loading"):
        assert test_one_example.main(["--image_path", str(image), "--checkpoint_path", str(fresh_prompts),
                                      "--save_path", str(tmp_path / "one"), "--threads", "1", *design_args]) == 0
    assert "torch threads: 1 (--threads)" in caplog.messages
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", ["0", "-2"])
@pytest.mark.parametrize("cli", [evaluation, test_one_example, train, export])
def test_threads_below_one_is_one_error_line(cli, value, design_args, tmp_path, capsys):
    design = [arg for arg in design_args if arg not in ("--device", "cpu")]  # export.py refuses --device
    argv = {evaluation: ["--data_path", tmp_path, "--checkpoint_path", tmp_path / "c.pth", "--save_path", tmp_path],
            test_one_example: ["--image_path", tmp_path, "--checkpoint_path", tmp_path / "c.pth"],
            train: ["--train_data_path", tmp_path, "--save_path", tmp_path / "s"],
            export: ["--checkpoint_path", tmp_path / "c.pth", "--out", tmp_path / "out"]}[cli]
    capsys.readouterr()
    assert run_cli(cli.main, [str(arg) for arg in [*argv, *design, "--threads", value]]) == 2
    assert error_line(capsys.readouterr().err) == (f"error: --threads {value} must be at least 1; leave it out for "
                                                   "PyTorch's default")


class _Bar:
    """Records what ``file_batches`` asks of its tqdm bar."""

    made: list[_Bar] = []

    def __init__(self, total: int, disable: bool | None, **_: object) -> None:
        self.total, self.disable, self.updates, self.closed = total, disable, [], False
        _Bar.made.append(self)

    def update(self, count: int) -> None:
        self.updates.append(count)

    def close(self) -> None:
        self.closed = True


class _ListScorer:
    def preprocess(self, image):
        return image.size

    def stack(self, rows):
        return list(rows)


@pytest.mark.parametrize(("count", "batch_size", "updates", "disable"), [
    (5, 2, [2, 2, 1], None),  # None: tqdm shows the bar on a terminal only
    (1, 8, [1], True),        # one image: no bar
])
def test_file_batches_progress_counts_images(monkeypatch, tmp_path, count, batch_size, updates, disable):
    from PIL import Image

    from pipeline import engine

    files = []
    for index in range(count):
        Image.new("RGB", (4, 3)).save(tmp_path / f"{index}.png")
        files.append(tmp_path / f"{index}.png")
    _Bar.made = []
    monkeypatch.setattr(engine, "tqdm", _Bar)
    batches = [batch.indices for batch in engine.file_batches(files, _ListScorer(), batch_size)]
    assert batches == [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]
    (bar,) = _Bar.made
    assert (bar.total, bar.updates, bar.disable, bar.closed) == (count, updates, disable, True)
