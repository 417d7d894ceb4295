"""Registry of downloadable CLIP backbones, with hash-checked, atomic downloads.

Only OpenAI's ViT-L/14@336px is registered: it is the backbone AnomalyCLIP's released prompts
were trained against (method §2). The URL's long hex folder is the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .errors import AnomalyCLIPError, write_error_advice, write_error_line

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "ANOMALYCLIP_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/clip")
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's weights come from.

    Attributes:
        url: Download address.
        sha256: Hex SHA-256 of the file.
        filename: Name of the file in the cache folder.
    """

    url: str
    sha256: str
    filename: str


_OPENAI_ROOT = "https://openaipublic.azureedge.net/clip/models"
_L14_336_SHA = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"

PRETRAINED: dict[str, PretrainedWeights] = {
    "ViT-L/14@336px": PretrainedWeights(
        url=f"{_OPENAI_ROOT}/{_L14_336_SHA}/ViT-L-14-336px.pt",
        sha256=_L14_336_SHA,
        filename="ViT-L-14-336px.pt",
    ),
}


def available_models() -> list[str]:
    """Names accepted by :func:`AnomalyCLIP_lib.load` besides file paths."""
    return list(PRETRAINED)


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds downloaded backbones.

    Args:
        root: Explicit folder; wins over everything else.

    Returns:
        ``root``, else ``$ANOMALYCLIP_CACHE``, else ``~/.cache/clip`` (OpenAI's usual folder).
    """
    if root is not None:
        return Path(root).expanduser()
    from_env = os.environ.get(CACHE_ENV_VAR)
    return Path(from_env).expanduser() if from_env else DEFAULT_CACHE_DIR.expanduser()


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def backbone_sha256(name_or_path: str | os.PathLike) -> str:
    """SHA-256 of a backbone: the registered hash of a registry name (downloads are checked against it), else the
    file's."""
    name = str(name_or_path)
    if name in PRETRAINED:
        return PRETRAINED[name].sha256
    return sha256_of(Path(name).expanduser())


def _offline_message(weights: PretrainedWeights, folder: Path, reason: str) -> str:
    return (
        f"could not download {weights.filename} ({reason}); download {weights.url} "
        f"by hand and put it in {folder}/ (or set {CACHE_ENV_VAR} to the folder that holds it)"
    )


def _stream_to(response, handle, digest, total: int | None, label: str) -> None:
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
        for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
            handle.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))


def download(name: str, root: str | os.PathLike | None = None, timeout_s: float = 60.0) -> Path:
    """Return the local path of a registered backbone, downloading it if needed.

    A cached file is checked against its SHA-256; a mismatching one is downloaded again. The
    download goes to a temporary file in the cache folder and is renamed into place only after
    its hash checks out, so an interrupted download never leaves a truncated checkpoint.

    Args:
        name: A key of :data:`PRETRAINED`.
        root: Cache folder (see :func:`cache_dir`).
        timeout_s: Socket timeout for the download.

    Returns:
        Path of the verified file.

    Raises:
        AnomalyCLIPError: Unknown name, no network, or a file whose hash does not match.
    """
    if name not in PRETRAINED:
        raise AnomalyCLIPError(
            f"unknown backbone {name!r}; choose one of {available_models()} or pass a checkpoint file"
        )
    weights = PRETRAINED[name]
    folder = cache_dir(root)
    target = folder / weights.filename
    if target.is_file():
        if sha256_of(target) == weights.sha256:
            return target
        logger.warning("%s does not match its SHA-256; downloading it again", target)

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        advice = write_error_advice(exc) or exc.strerror
        raise AnomalyCLIPError(f"cannot create the backbone cache folder {folder} (--download_root, else "
                               f"${CACHE_ENV_VAR}, else {DEFAULT_CACHE_DIR}): {advice}") from None
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{weights.filename}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                with urllib.request.urlopen(weights.url, timeout=timeout_s) as response:
                    length = response.headers.get("Content-Length")
                    _stream_to(response, handle, digest, int(length) if length else None, weights.filename)
            except (urllib.error.URLError, OSError) as exc:
                if not isinstance(exc, urllib.error.URLError) and write_error_line(exc, target):  # a full disk
                    raise AnomalyCLIPError(write_error_line(exc, target)) from None
                reason = getattr(exc, "reason", None) or exc
                raise AnomalyCLIPError(_offline_message(weights, folder, str(reason))) from None
        if digest.hexdigest() != weights.sha256:
            raise AnomalyCLIPError(
                f"downloaded {weights.filename} has SHA-256 {digest.hexdigest()}, expected "
                f"{weights.sha256}; delete it and try again, or fetch {weights.url} by hand into {folder}/"
            )
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target
