"""train.py end to end on the tiny backbone and synthetic data."""

import re

import pytest
import torch

from pipeline import training as train
from pipeline.cli import run_cli

ORIGINAL_KEYS = {"ctx_pos", "ctx_neg", "token_prefix_pos", "token_prefix_neg", "token_suffix_pos", "token_suffix_neg",
                 "tokenized_prompts_pos", "tokenized_prompts_neg",
                 *(f"compound_prompts_text.{i}" for i in range(8)),
                 *(f"compound_prompt_projections.{i}.{p}" for i in range(8) for p in ("weight", "bias"))}


def _train(data_root, save_path, design_args, *extra):
    return train.main(["--train_data_path", str(data_root), "--save_path", str(save_path), "--batch_size", "4",
                       "--num_workers", "0", *design_args, *extra])


def test_checkpoint_layout_and_log(trained_checkpoint):
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    assert set(checkpoint["prompt_learner"]) == ORIGINAL_KEYS
    assert checkpoint["epoch"] == 1
    assert set(checkpoint["optimizer"]) == {"state", "param_groups"}
    assert checkpoint["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.999)
    assert checkpoint["config"]["features_list"] == [6, 24]
    log = (trained_checkpoint.parent / "log.txt").read_text()
    assert re.search(r"^epoch \[1/1\], loss:\d+\.\d{4}, image_loss:\d+\.\d{4}$", log, re.MULTILINE)
    assert not list(trained_checkpoint.parent.glob(".*.tmp"))


@pytest.fixture(scope="module")
def three_epoch_runs(synthetic_datasets, design_args, tmp_path_factory):
    """Unbroken 3-epoch runs, ``{"cached": folder, "uncached": folder (--no_cache)}``, shared by the tests below.

    Each epoch's shuffle is seeded from (seed, epoch) and no setting depends on the number of
    epochs, so their ``epoch_N.pth`` is what an unbroken N-epoch run writes.
    """
    root = tmp_path_factory.mktemp("three_epochs")
    runs = {"cached": root / "cached", "uncached": root / "uncached"}
    assert _train(synthetic_datasets[0], runs["cached"], design_args, "--epoch", "3") == 0
    assert _train(synthetic_datasets[0], runs["uncached"], design_args, "--epoch", "3", "--no_cache") == 0
    return runs


def test_resume_equals_unbroken_run(synthetic_datasets, design_args, trained_checkpoint, three_epoch_runs, tmp_path):
    import shutil

    broken = shutil.copytree(trained_checkpoint.parent, tmp_path / "broken")  # a 1-epoch run of the same flags
    assert _train(synthetic_datasets[0], broken, design_args, "--epoch", "2", "--resume",
                  str(broken / "epoch_1.pth")) == 0
    a = torch.load(three_epoch_runs["cached"] / "epoch_2.pth", weights_only=True)
    b = torch.load(broken / "epoch_2.pth", weights_only=True)
    for key in a["prompt_learner"]:
        assert torch.equal(a["prompt_learner"][key], b["prompt_learner"][key]), key
    assert b["epoch"] == 2
    assert "epoch [2/2]" in (broken / "log.txt").read_text()


def test_resume_takes_the_checkpoints_flags_unless_given(synthetic_datasets, design_args, tmp_path):
    """--learning_rate given to the first run only: the resumed run keeps it, and equals an unbroken run bit for bit."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    rate = ("--learning_rate", "0.01")
    assert _train(synthetic_datasets[0], straight, design_args, "--epoch", "2", *rate) == 0
    assert _train(synthetic_datasets[0], broken, design_args, "--epoch", "1", *rate) == 0
    assert _train(synthetic_datasets[0], broken, design_args, "--epoch", "2", "--resume",
                  str(broken / "epoch_1.pth")) == 0
    a = torch.load(straight / "epoch_2.pth", weights_only=True)
    b = torch.load(broken / "epoch_2.pth", weights_only=True)
    assert b["optimizer"]["param_groups"][0]["lr"] == 0.01 and b["config"]["learning_rate"] == 0.01
    for key in a["prompt_learner"]:
        assert torch.equal(a["prompt_learner"][key], b["prompt_learner"][key]), key


def test_start_from_original_format_checkpoint(synthetic_datasets, design_args, trained_checkpoint, tmp_path):
    original = tmp_path / "original.pth"
    prompts = torch.load(trained_checkpoint, weights_only=True)["prompt_learner"]
    torch.save({"prompt_learner": prompts}, original)
    save_path = tmp_path / "continued"
    assert _train(synthetic_datasets[0], save_path, design_args, "--epoch", "1", "--resume", str(original)) == 0
    continued = torch.load(save_path / "epoch_1.pth", weights_only=True)
    assert continued["epoch"] == 1  # a prompt-only file starts a new run from its weights
    for key, before in prompts.items():
        learnable = key.startswith(("ctx_", "compound_prompts_text"))
        assert torch.equal(continued["prompt_learner"][key], before) != learnable, key


def test_user_errors_are_one_line(synthetic_datasets, design_args, trained_checkpoint, tmp_path, capsys):
    assert run_cli(train.main, ["--train_data_path", str(tmp_path / "absent"), "--save_path", str(tmp_path / "s"),
                                *design_args]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "meta.json" in error and "\n" not in error
    assert run_cli(train.main, ["--train_data_path", str(synthetic_datasets[0]), "--save_path", str(tmp_path / "s"),
                                "--resume", str(trained_checkpoint), "--n_ctx", "8", *design_args]) == 2
    assert "--n_ctx 12" in capsys.readouterr().err


def test_invalid_flags_are_refused():
    from AnomalyCLIP_lib.errors import AnomalyCLIPError

    for flags, expected in ((["--epoch", "0"], "--epoch 0 must be at least 1"),
                            (["--no_cache", "--keep_cache"], "--no_cache cannot be combined"),
                            (["--cache_memory_gb", "-1"], "--cache_memory_gb -1.0 must be >= 0"),
                            (["--learning_rate", "0"], "--learning_rate 0.0 must be a positive number")):
        with pytest.raises(AnomalyCLIPError, match=re.escape(expected)):
            train.parse_args(flags)


def _prompts(path):
    return torch.load(path, weights_only=True)["prompt_learner"]


def _assert_same_prompts(a_path, b_path, atol=0.0):
    a, b = _prompts(a_path), _prompts(b_path)
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=atol), (key, (a[key] - b[key]).abs().max())


def _forwards(log_path):
    return [int(n) for n in re.findall(r"frozen image forwards: (\d+)", log_path.read_text())]


def test_cached_training_equals_uncached(synthetic_datasets, three_epoch_runs):
    cached, uncached = three_epoch_runs["cached"], three_epoch_runs["uncached"]
    for epoch in (1, 2, 3):
        _assert_same_prompts(cached / f"epoch_{epoch}.pth", uncached / f"epoch_{epoch}.pth", atol=1e-6)
    n_images = len(train.AnomalyDataset(synthetic_datasets[0], image_size=32, split="test"))
    assert _forwards(cached / "log.txt") == [n_images]  # once per image, however many epochs
    assert _forwards(uncached / "log.txt") == [3 * n_images]
    assert "caching frozen features in memory" in (cached / "log.txt").read_text()
    assert not (cached / "feature_cache").exists()


def test_disk_cache_under_a_tiny_budget_equals_memory(synthetic_datasets, design_args, three_epoch_runs, tmp_path):
    memory, disk = three_epoch_runs["cached"], tmp_path / "disk"
    assert "caching frozen features in memory" in (memory / "log.txt").read_text()
    assert _train(synthetic_datasets[0], disk, design_args, "--epoch", "2", "--cache_memory_gb", "0") == 0
    assert "caching frozen features on disk" in (disk / "log.txt").read_text()
    _assert_same_prompts(memory / "epoch_2.pth", disk / "epoch_2.pth")
    assert not (disk / "feature_cache").exists()  # removed after a successful run


def test_kept_cache_is_reused_and_rebuilt_when_its_inputs_change(synthetic_datasets, design_args, three_epoch_runs,
                                                                  tmp_path):
    import json
    import shutil

    data = tmp_path / "aux"
    shutil.copytree(synthetic_datasets[0], data)
    cache_dir = tmp_path / "cache"
    straight, resumed = three_epoch_runs["uncached"], tmp_path / "resumed"  # straight: the same images, unbroken
    keep = ("--keep_cache", "--cache_dir", str(cache_dir))
    assert _train(data, resumed, design_args, "--epoch", "1", *keep) == 0
    manifest = json.loads((cache_dir / "cache.json").read_text())
    assert manifest["key"]["features_list"] == [6, 24]

    # A resumed run with the kept cache encodes nothing and continues exactly.
    assert _train(data, resumed, design_args, "--epoch", "2", "--resume", str(resumed / "epoch_1.pth"), *keep) == 0
    log = (resumed / "log.txt").read_text()
    n_images = len(train.AnomalyDataset(data, image_size=32, split="test"))
    assert "reusing the feature cache" in log and _forwards(resumed / "log.txt") == [n_images, 0]
    _assert_same_prompts(straight / "epoch_2.pth", resumed / "epoch_2.pth", atol=1e-6)

    # Another features list or another meta.json: rebuilt, and the log says why.
    other = tmp_path / "other"
    flags = [*design_args[:design_args.index("--features_list")], "--features_list", "24",
             *design_args[design_args.index("--features_list") + 3:]]
    assert _train(data, other, flags, "--epoch", "1", "--overwrite", *keep) == 0
    assert "features_list [6, 24] -> [24]" in (other / "log.txt").read_text()
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(meta, indent=1))
    assert _train(data, other, flags, "--epoch", "1", "--overwrite", *keep) == 0
    assert "meta_sha256" in (other / "log.txt").read_text().split("features_list [6, 24] -> [24]")[-1]

    # A cache whose manifest is missing (a run killed while caching) is never used.
    (cache_dir / "cache.json").unlink()
    assert _train(data, other, flags, "--epoch", "1", "--overwrite", *keep) == 0
    assert "is incomplete" in (other / "log.txt").read_text()
    assert (cache_dir / "cache.json").is_file()
    assert sorted(p.name for p in cache_dir.iterdir()) == [".anomalyclip_cache", "cache.json", "embeddings.npy",
                                                          "labels.npy", "masks.npy", "tokens_0.npy"]


def test_kept_cache_is_rebuilt_when_an_image_is_replaced_in_place(synthetic_datasets, design_args, tmp_path):
    import json
    import shutil

    import numpy as np
    from PIL import Image

    data = tmp_path / "aux"
    shutil.copytree(synthetic_datasets[0], data)
    save_path, cache_dir = tmp_path / "run", tmp_path / "cache"
    keep = ("--epoch", "1", "--overwrite", "--keep_cache", "--cache_dir", str(cache_dir))
    n_images = len(train.AnomalyDataset(data, image_size=32, split="test"))

    def run() -> tuple[str, list[int]]:
        assert _train(data, save_path, design_args, *keep) == 0
        log = (save_path / "log.txt").read_text().split("frozen image forwards:")[-2]  # this run's part
        return log, _forwards(save_path / "log.txt")[-1:]

    assert run()[1] == [n_images]
    log, forwards = run()  # nothing changed: reused
    assert "reusing the feature cache" in log and forwards == [0]

    meta = json.loads((data / "meta.json").read_text())
    image_path = data / meta["test"]["stripes"][0]["img_path"]
    before = (data / "meta.json").read_bytes()
    with Image.open(image_path) as image:
        size, mode = image.size, image.mode
    other = np.random.default_rng(7).integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(other.squeeze(), mode).save(image_path)  # same name, other pixels
    log, forwards = run()
    assert (data / "meta.json").read_bytes() == before
    assert "files_sha256 changed" in log and "rebuilding it" in log and forwards == [n_images]
    assert run()[1] == [0]  # the rebuilt cache is reused

    # A cache made before the key held the files: stale, rebuilt, and the log says why.
    manifest = json.loads((cache_dir / "cache.json").read_text())
    del manifest["key"]["files_sha256"]
    (cache_dir / "cache.json").write_text(json.dumps(manifest))
    log, forwards = run()
    assert "files_sha256 not recorded (a cache of an earlier version)" in log and forwards == [n_images]


def test_another_runs_checkpoints_are_not_replaced_silently(synthetic_datasets, design_args, trained_checkpoint,
                                                            tmp_path, capsys):
    import shutil

    save_path = tmp_path / "run"
    save_path.mkdir()
    shutil.copy(trained_checkpoint, save_path / "epoch_1.pth")
    before = (save_path / "epoch_1.pth").read_bytes()
    assert run_cli(train.main, ["--train_data_path", str(synthetic_datasets[0]), "--save_path", str(save_path),
                                "--epoch", "1", "--num_workers", "0", *design_args]) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "--overwrite" in error and "--resume" in error
    assert (save_path / "epoch_1.pth").read_bytes() == before
    assert _train(synthetic_datasets[0], save_path, design_args, "--epoch", "1", "--overwrite") == 0
    assert (save_path / "epoch_1.pth").read_bytes() != before


def test_resume_applies_a_new_learning_rate(synthetic_datasets, design_args, trained_checkpoint, tmp_path):
    save_path = tmp_path / "resumed"
    assert _train(synthetic_datasets[0], save_path, design_args, "--epoch", "2", "--learning_rate", "0.5",
                  "--resume", str(trained_checkpoint)) == 0
    checkpoint = torch.load(save_path / "epoch_2.pth", weights_only=True)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 0.5
    assert checkpoint["config"]["learning_rate"] == 0.5
    assert "--learning_rate 0.001 -> 0.5" in (save_path / "log.txt").read_text()
    # Adam's first step moves each weight by about lr: far more at 0.5 than at 0.001.
    before = torch.load(trained_checkpoint, weights_only=True)["prompt_learner"]["ctx_pos"]
    assert (checkpoint["prompt_learner"]["ctx_pos"] - before).abs().max() > 0.1


def test_anomalous_images_without_masks_are_refused_or_image_loss_only(synthetic_datasets, design_args, tmp_path,
                                                                        capsys):
    import json
    import shutil

    data = tmp_path / "aux"
    shutil.copytree(synthetic_datasets[0], data)
    meta = json.loads((data / "meta.json").read_text())
    for items in meta["test"].values():
        for item in items:
            item["mask_path"] = ""
    (data / "meta.json").write_text(json.dumps(meta))
    assert run_cli(train.main, ["--train_data_path", str(data), "--save_path", str(tmp_path / "a"), "--epoch", "1",
                                "--num_workers", "0", *design_args]) == 2
    error = capsys.readouterr().err
    assert error.count("error:") == 1 and "have no mask" in error and "--image_loss_only" in error
    assert _train(data, tmp_path / "b", design_args, "--epoch", "1", "--image_loss_only") == 0
    assert (tmp_path / "b" / "epoch_1.pth").is_file()
