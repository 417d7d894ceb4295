"""Helpers shared by the command-line tools: arguments, seeding, devices, logging, atomic writes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import AnomalyCLIP_lib
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.model import CLIP, normalize_layers

# The shared command-line layer, re-exported for the modules that import it from here.
from cli import (  # noqa: F401
    DEFAULT_BACKBONE,
    DPAM_DEPTH,
    DPAM_LAYER,
    add_loader_args,
    add_model_args,
    check_args,
    cli_parser,
    run_cli,
)
from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details, load_prompt_state


def setup_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def check_backbone_fits(args: argparse.Namespace, model: CLIP) -> None:
    """Flags that depend on the loaded backbone: the layers exist and the image size fits its patches."""
    if model.visual.num_layers != DPAM_DEPTH:
        raise AnomalyCLIPError(f"--backbone {args.backbone} has {model.visual.num_layers} vision layers; AnomalyCLIP "
                               f"(DPAM from layer {DPAM_LAYER}) needs an OpenAI-layout CLIP ViT with {DPAM_DEPTH}, "
                               "such as ViT-L/14@336px")
    normalize_layers(args.features_list, model.visual.num_layers)
    patch = int(model.visual.conv1.kernel_size[0])
    if args.image_size % patch:
        below = args.image_size // patch * patch
        options = f"{below} or {below + patch}" if below else str(patch)
        raise AnomalyCLIPError(f"--image_size {args.image_size} is not a multiple of the backbone's patch size "
                               f"{patch}: use {options} (the released setting is 518)")


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or CUDA when available else CPU; a clear error for an absent GPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise AnomalyCLIPError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnomalyCLIPError(f"--device {name} asked for a GPU but torch sees none; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AnomalyCLIPError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), "
                               f"numbered 0..{torch.cuda.device_count() - 1}")
    return device


def resolve_num_workers(requested: int | None, device: torch.device) -> int:
    """The DataLoader worker count: ``requested``, else a per-device default.

    On a GPU, workers decode and resize the next batch while the model runs. On a CPU the
    model's matmuls keep every thread PyTorch was given busy, so workers only pay off on cores
    left over: on 2 cores (ViT-L/14 at 518 px) 2 workers made scoring 16% slower than none.
    """
    if requested is not None:
        return requested
    if device.type != "cpu":
        return 2
    spare_cores = (os.cpu_count() or 1) - torch.get_num_threads()
    return max(0, min(2, spare_cores))


def load_model_and_prompts(
    args: argparse.Namespace, device: torch.device, checkpoint_path: str | None = None
) -> tuple[CLIP, AnomalyCLIP_PromptLearner, dict[str, object] | None]:
    """Backbone and prompt learner for the design in ``args``, with prompts from a checkpoint.

    Returns:
        ``(model, prompt_learner, checkpoint)`` on ``device``; ``checkpoint`` is the loaded file
        (``None`` when no path was given and the prompts are freshly initialised).
    """
    model, _ = AnomalyCLIP_lib.load(args.backbone, device=device, trust_backbone=getattr(args, "trust_backbone", False))
    check_backbone_fits(args, model)
    model.visual.reference_arithmetic = getattr(args, "reference_arithmetic", False)
    design = design_details(n_ctx=args.n_ctx, depth=args.depth, t_n_ctx=args.t_n_ctx)
    prompt_learner = AnomalyCLIP_PromptLearner(model, design)
    checkpoint = load_prompt_state(prompt_learner, checkpoint_path) if checkpoint_path else None
    return model, prompt_learner.to(device), checkpoint


class _LogFile(logging.FileHandler):
    """``log.txt``: a failed write (full disk) is raised, to end the run with one line, not printed as a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, self.baseFilename) from error
        super().handleError(record)


def get_logger(save_path: str | os.PathLike, name: str = "anomalyclip", main_process: bool = True) -> logging.Logger:
    """A logger that prints messages and appends them to ``save_path/log.txt``, as the original does.

    Args:
        main_process: False on ranks other than 0 under torchrun: those only print warnings,
            and only rank 0 writes ``log.txt``.
    """
    save_path = Path(save_path)
    save_path.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        with contextlib.suppress(OSError):  # an earlier run's log on a full disk: that run reported it
            handler.close()
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main_process:
        # Opened at the first message: a run that fails before it leaves no empty log.txt (nor the folder it made).
        handlers.insert(0, _LogFile(save_path / "log.txt", mode="a", delay=True))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


def project_version() -> dict[str, str | None]:
    """This project's version and, in a git checkout, its commit (with ``+dirty`` for local changes)."""
    import subprocess

    root = Path(__file__).resolve().parent
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"anomalyclip": AnomalyCLIP_lib.__version__, "git_commit": commit}
