"""train.py end to end on the tiny backbone and synthetic data."""

import re

import pytest
import torch

import train
from utils import run_cli

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


@pytest.mark.slow
def test_resume_equals_unbroken_run(synthetic_datasets, design_args, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert _train(synthetic_datasets[0], straight, design_args, "--epoch", "2") == 0
    assert _train(synthetic_datasets[0], broken, design_args, "--epoch", "1") == 0
    assert _train(synthetic_datasets[0], broken, design_args, "--epoch", "2", "--resume", str(broken / "epoch_1.pth")) == 0
    a = torch.load(straight / "epoch_2.pth", weights_only=True)
    b = torch.load(broken / "epoch_2.pth", weights_only=True)
    for key in a["prompt_learner"]:
        assert torch.equal(a["prompt_learner"][key], b["prompt_learner"][key]), key
    assert b["epoch"] == 2
    assert "epoch [2/2]" in (broken / "log.txt").read_text()


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
    with pytest.raises(SystemExit):
        train.parse_args(["--epoch", "0"])
