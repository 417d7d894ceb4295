"""Load a CLIP backbone by registry name or from a file (TorchScript archive or state dict)."""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from .errors import AnomalyCLIPError
from .model import CLIP, build_model
from .pretrained import PRETRAINED, available_models, download, sha256_of
from .safe_load import check_is_file, load_tensors

logger = logging.getLogger(__name__)


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files that carry compiled code next to the tensors."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _unwrap(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        for wrapper in ("state_dict", "model"):
            inner = checkpoint.get(wrapper)
            if isinstance(inner, dict) and "visual.conv1.weight" in inner:
                return inner
        if "visual.conv1.weight" in checkpoint:
            return checkpoint
        if "prompt_learner" in checkpoint:
            raise AnomalyCLIPError(
                f"{path} is a prompt checkpoint, not a CLIP backbone; pass it as --checkpoint_path"
            )
    raise AnomalyCLIPError(f"{path} holds no CLIP state dict (no 'visual.conv1.weight' entry)")


def _check_torchscript_trusted(path: Path, trusted: bool) -> None:
    """TorchScript runs code from the file, which ``weights_only`` does not cover: only known files load."""
    if trusted:
        return
    digest = sha256_of(path)
    if digest in {weights.sha256 for weights in PRETRAINED.values()}:
        return
    raise AnomalyCLIPError(f"backbone {path} is a TorchScript archive that is not a registered OpenAI file "
                           f"(SHA-256 {digest[:12]}...): loading TorchScript runs code stored in the file; pass "
                           "--trust_backbone if you trust its source, or save its state_dict() as a plain file")


def read_state_dict(path: str | os.PathLike, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP checkpoint file on the CPU.

    Accepts OpenAI's TorchScript archives and plain ``torch.save`` state dicts (loaded with
    ``weights_only=True``, optionally wrapped under ``"state_dict"`` or ``"model"``). A TorchScript
    archive loads only when its SHA-256 is a registered one or ``trusted`` is set.

    Raises:
        AnomalyCLIPError: Missing, unreadable or not a CLIP checkpoint.
    """
    path = Path(path)
    check_is_file(path, "backbone file", f"pass a registry name ({', '.join(available_models())}) or a checkpoint file")
    if not _is_torchscript_archive(path):
        return _unwrap(load_tensors(path, "backbone checkpoint"), path)
    try:
        _check_torchscript_trusted(path, trusted)
        with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI ships TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except AnomalyCLIPError:
        raise
    except Exception as exc:  # torch raises many types for corrupt files
        raise AnomalyCLIPError(f"cannot read backbone checkpoint {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    download_root: str | os.PathLike | None = None,
    trust_backbone: bool = False,
) -> tuple[CLIP, Callable[[Image.Image], torch.Tensor]]:
    """Load a CLIP backbone for AnomalyCLIP.

    The model runs in fp32 on CPU and CUDA alike, as the original code does (SPEC §9); the
    opt-in fp16/bf16 autocast lives in :mod:`AnomalyCLIP_lib.precision`.

    Args:
        name_or_path: A registry name (see :func:`available_models`) or a checkpoint file.
        device: Where to put the model.
        download_root: Cache folder for registry downloads (default: ``$ANOMALYCLIP_CACHE`` or
            ``~/.cache/clip``).
        trust_backbone: Load a TorchScript file whose SHA-256 is not a registered one.

    Returns:
        ``(model, preprocess)``: the frozen model in eval mode and the image transform at the
        model's native resolution (use :func:`AnomalyCLIP_lib.transform.image_transform` for
        another size).
    """
    name = str(name_or_path)
    path = download(name, download_root) if name in PRETRAINED else Path(name).expanduser()
    # A registry download was just checked against its registered SHA-256.
    model = build_model(read_state_dict(path, trusted=trust_backbone or name in PRETRAINED)).to(device)
    logger.info("loaded backbone %s (%d vision layers, width %d)", path, model.visual.num_layers, model.visual.conv1.weight.shape[0])
    from .transform import image_transform

    return model, image_transform(model.visual.input_resolution)
