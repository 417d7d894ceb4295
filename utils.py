"""Helpers shared by the command-line tools: arguments, seeding, devices, logging, atomic writes."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

import AnomalyCLIP_lib
from atomic import atomic_write
from distributed import PeerFailed
from AnomalyCLIP_lib.errors import AnomalyCLIPError, one_line
from AnomalyCLIP_lib.model import CLIP, normalize_layers
from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details, load_prompt_state

DEFAULT_BACKBONE = "ViT-L/14@336px"
DPAM_LAYER = 20
DPAM_DEPTH = 24  # vision layers of the backbones the method is defined for (ViT-L/14)


def setup_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def cli_parser(description: str) -> argparse.ArgumentParser:
    """The argument parser of every command-line tool: ``--help`` shows each flag's default."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Flags that describe the backbone and the prompt design (the original's names)."""
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE,
                        help=f"registry name ({', '.join(AnomalyCLIP_lib.available_models())}) or a CLIP checkpoint file")
    parser.add_argument("--trust_backbone", action="store_true",
                        help="load a TorchScript --backbone whose SHA-256 is not a registered one (it runs code)")
    parser.add_argument("--depth", type=int, default=9, help="deep text-token depth")
    parser.add_argument("--n_ctx", type=int, default=12, help="learnable prompt length")
    parser.add_argument("--t_n_ctx", type=int, default=4, help="deep text-token length")
    parser.add_argument("--features_list", type=int, nargs="+", default=[24],
                        help="vision layers whose patch tokens make the maps (released: 24; paper: 6 12 18 24)")
    parser.add_argument("--feature_map_layer", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="only the first value is used: index of the first features_list layer summed")
    parser.add_argument("--image_size", type=int, default=518, help="input side in pixels")
    parser.add_argument("--seed", type=int, default=111, help="random seed")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--reference_arithmetic", action="store_true",
                        help="compute DPAM attention with the released code's arithmetic: bit-identical to the "
                             "original on the same CPU kernels, slower (default: fused attention, equal to ~1e-6)")


def check_args(args: argparse.Namespace, at_least_one: Sequence[str] = ()) -> None:
    """The checks of the flags that every CLI shares, before anything heavy runs; one-line errors.

    Args:
        args: Parsed flags of ``train.py``, ``test.py`` or ``test_one_example.py``; checks apply to
            the flags the namespace has.
        at_least_one: Further integer flags of the calling CLI that must be >= 1.
    """
    for name in ("batch_size", "image_size", "n_ctx", "depth", "t_n_ctx", *at_least_one):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise AnomalyCLIPError(f"--{name} {value} must be at least 1")
    workers = getattr(args, "num_workers", None)
    if workers is not None and workers < 0:
        raise AnomalyCLIPError(f"--num_workers {workers} must be >= 0 (0 decodes images in the main process)")
    sigma = getattr(args, "sigma", None)
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise AnomalyCLIPError(f"--sigma {sigma} must be a finite number >= 0 (0 turns the smoothing off; "
                               "the original uses 4)")
    if hasattr(args, "features_list"):
        if len(set(args.features_list)) != len(args.features_list):
            raise AnomalyCLIPError(f"--features_list {' '.join(map(str, args.features_list))} repeats a layer")
        first = args.feature_map_layer[0]
        if not 0 <= first < len(args.features_list):
            raise AnomalyCLIPError(
                f"--feature_map_layer {first} must index --features_list ({len(args.features_list)} layer(s)): "
                f"use 0..{len(args.features_list) - 1} (0 sums the maps of every layer)")


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
        raise AnomalyCLIPError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnomalyCLIPError(f"--device {name} asked for a GPU but torch sees none; use --device cpu")
    return device


def add_loader_args(parser: argparse.ArgumentParser, batch_help: str) -> None:
    """``--batch_size`` and ``--num_workers`` (the latter resolved per device by :func:`resolve_num_workers`)."""
    parser.add_argument("--batch_size", type=int, default=8, help=batch_help)
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader worker processes (default: 2 on a GPU; on a CPU, 2 at most and only "
                             "on cores that PyTorch's threads leave free)")


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
        handler.close()
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if main_process:
        handlers.insert(0, logging.FileHandler(save_path / "log.txt", mode="a"))
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


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file.

    A full disk makes torch's zip writer fail with an internal message ("unexpected pos ..."); it
    is reported as the full disk it is.
    """
    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as exc:
        if "unexpected pos" in str(exc) or "file write failed" in str(exc):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


# Operating-system errors that are the user's to fix (full disk, read-only or forbidden folder).
_USER_OS_ERRORS = {
    errno.ENOSPC: "the disk is full: free space there or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free space there or choose another folder",
    errno.EROFS: "the folder is on a read-only file system: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
}


def os_error_line(exc: OSError) -> str | None:
    """One line for an OSError a user can fix (naming the file), else ``None``."""
    advice = _USER_OS_ERRORS.get(exc.errno)
    if advice is None:
        return None
    where = f"cannot write {exc.filename}" if exc.filename else "cannot write a file"
    return f"{where}: {advice}"


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point; user errors print one ``error: ...`` line and exit with status 2."""
    try:
        return main(argv)
    except PeerFailed:
        return 2  # the rank that failed has printed the error line
    except AnomalyCLIPError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        line = os_error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
