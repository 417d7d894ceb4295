"""Reference images for few-shot scoring: which images, the memory built from them, its file.

The memory itself (patch tokens, nearest-neighbour distances, the fusion) is the library's
(:mod:`AnomalyCLIP_lib.memory`). This module picks the references and builds, stores and checks
memories for the commands:

* ``test.py --k_shot K``: K normal images per class from the dataset's train split, drawn with
  ``--seed`` (per class, independently of which other classes are evaluated); ``--reference_path
  DIR`` takes them from ``DIR/<class>/`` instead (all of them, or K drawn with ``--k_shot K``);
  ``--references_from_test`` draws them from the test normals and leaves them out of the
  evaluation.
* ``test_one_example.py --reference_path DIR`` (one class: every image under DIR), ``--save_memory
  FILE`` / ``--memory FILE``.

A memory file is an ``.npz`` (numpy, loaded with ``allow_pickle=False``: no code runs on load)
holding the banks, the normalisation and a JSON header: settings, class, backbone SHA-256, image
size, the references (paths and SHA-256) and the checkpoint the run used. The memory holds vision
tokens only (the prompts do not enter it), so a memory is refused for another backbone, image size,
DPAM layer or token choice, and used with any prompt checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.images import load_image
from AnomalyCLIP_lib.memory_config import MEMORY_FORMAT, MemorySettings
from AnomalyCLIP_lib.pretrained import sha256_of

if TYPE_CHECKING:
    import torch

    from AnomalyCLIP_lib.inference import AnomalyCLIPInference
    from AnomalyCLIP_lib.memory import PatchMemory

logger = logging.getLogger(__name__)

MEMORY_SETTING_FLAGS = {"layers": "--memory_layers", "stream": "--memory_stream", "weight": "--memory_weight"}


@dataclass(frozen=True)
class MemorySpec:
    """Where a run's reference images come from, and how its memory scores (frozen).

    Attributes:
        k_shot: References per class (test.py: drawn; 0 with no other source: zero-shot).
        reference_path: ``DIR/<class>/`` (test.py) or ``DIR`` (test_one_example.py) of normal images.
        references_from_test: test.py: draw the references from the test normals, not evaluated.
        memory_file: A memory written by ``--save_memory`` (test_one_example.py, export.py).
        save_memory: Where test_one_example.py writes the memory it builds.
        settings: Layers, token stream and fusion weight.
        given: The settings the command line gave (a memory file's own are used otherwise).
    """

    k_shot: int = 0
    reference_path: str | None = None
    references_from_test: bool = False
    memory_file: str | None = None
    save_memory: str | None = None
    settings: MemorySettings = field(default_factory=MemorySettings)
    given: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        """Whether the run scores with a memory (few-shot)."""
        return bool(self.k_shot or self.reference_path or self.memory_file)


@dataclass(frozen=True)
class Reference:
    """One reference image.

    Attributes:
        file: Where it is read from.
        name: How it is recorded (meta.json's path for a dataset image, else the file).
        sha256: The file's SHA-256.
    """

    file: str
    name: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.name, "sha256": self.sha256}


def check_memory_spec(spec: MemorySpec) -> None:
    """The flag combinations that cannot work, before anything loads."""
    if spec.k_shot < 0:
        raise AnomalyCLIPError(f"--k_shot {spec.k_shot} must be >= 0 (0: zero-shot)")
    if spec.references_from_test and not spec.k_shot:
        raise AnomalyCLIPError("--references_from_test draws --k_shot K test normals; add --k_shot K (e.g. 4)")
    if spec.references_from_test and spec.reference_path:
        raise AnomalyCLIPError("--references_from_test and --reference_path both give the references; keep one")
    if spec.memory_file and spec.reference_path:
        raise AnomalyCLIPError("--memory FILE and --reference_path both give the memory; keep one")
    if spec.save_memory and not spec.reference_path:
        raise AnomalyCLIPError("--save_memory writes the memory built from --reference_path DIR; add it")
    if spec.save_memory and Path(spec.save_memory).is_dir():
        raise AnomalyCLIPError(f"--save_memory {spec.save_memory} is a folder; give a file name, e.g. "
                               f"{Path(spec.save_memory) / 'memory.npz'}")
    if spec.memory_file and not Path(spec.memory_file).is_file():
        raise AnomalyCLIPError(f"--memory {spec.memory_file}: no such file; write one with "
                               "--reference_path DIR --save_memory FILE")
    if spec.reference_path and not Path(spec.reference_path).is_dir():
        raise AnomalyCLIPError(f"--reference_path {spec.reference_path} is not a folder; give a folder of normal "
                               "images (test.py: one sub-folder per class)")
    if not spec.active and spec.given:
        flags = ", ".join(MEMORY_SETTING_FLAGS[name] for name in sorted(spec.given))
        raise AnomalyCLIPError(f"{flags} set(s) the few-shot memory, and this run has none; add --k_shot K or "
                               "--reference_path DIR (or --memory FILE), or drop the flag(s)")


# --- choosing references ----------------------------------------------------------------------


def draw(candidates: Sequence[Reference], k_shot: int, seed: int, class_name: str) -> list[Reference]:
    """``k_shot`` of ``candidates`` drawn with ``seed`` (all when ``k_shot`` is 0), in path order.

    The draw of a class depends on the seed, the class's name and its candidates only.
    """
    ordered = sorted(candidates, key=lambda ref: ref.name)
    if not k_shot:
        return ordered
    if len(ordered) < k_shot:
        raise AnomalyCLIPError(f"class {class_name!r} has {len(ordered)} normal reference candidate(s), fewer than "
                               f"--k_shot {k_shot}; lower --k_shot or give more with --reference_path")
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode("utf-8"))])
    chosen = sorted(rng.choice(len(ordered), size=k_shot, replace=False).tolist())
    return [ordered[position] for position in chosen]


def folder_references(folder: str | Path) -> list[Reference]:
    """Every image under ``folder`` (recursively, as ``--image_path`` lists them) as references."""
    from pipeline.prediction import image_files

    files = image_files(folder)
    return [Reference(file=str(path), name=str(path), sha256=sha256_of(path)) for path in files]


def dataset_references(data_path: str, classes: Sequence[str], spec: MemorySpec, seed: int,
                       image_size: int) -> dict[str, list[Reference]]:
    """test.py's references per class (see the module docstring)."""
    if spec.reference_path:
        return {name: draw(_class_folder(spec.reference_path, name), spec.k_shot, seed, name) for name in classes}
    split = "test" if spec.references_from_test else "train"
    normals = _split_normals(data_path, classes, split, image_size)
    return {name: draw(normals.get(name, []), spec.k_shot, seed, name) for name in classes}


def _class_folder(reference_path: str, class_name: str) -> list[Reference]:
    folder = Path(reference_path) / class_name
    if not folder.is_dir():
        raise AnomalyCLIPError(f"--reference_path {reference_path} has no folder {class_name}/ for class "
                               f"{class_name!r}; put that class's normal images in {folder}/")
    return folder_references(folder)


def _split_normals(data_path: str, classes: Sequence[str], split: str, image_size: int) -> dict[str, list[Reference]]:
    from dataset import AnomalyDataset

    try:
        dataset = AnomalyDataset(data_path, image_size=image_size, split=split, class_names=list(classes))
    except AnomalyCLIPError as error:
        if split == "test":
            raise
        raise AnomalyCLIPError(f"--k_shot draws normal images from the train split, and {error}; give the "
                               "references with --reference_path DIR, or draw them from the test normals with "
                               "--references_from_test") from None
    normals: dict[str, list[Reference]] = {}
    for index, item in enumerate(dataset.items):
        if not item["anomaly"]:
            file = dataset.image_file(index)
            normals.setdefault(item["cls_name"], []).append(Reference(file, item["img_path"], sha256_of(file)))
    return normals


# --- building, saving, loading ----------------------------------------------------------------


def build_class_memory(inference: AnomalyCLIPInference, references: Sequence[Reference], settings: MemorySettings,
                       batch_size: int, info: dict[str, Any], progress: bool = True) -> PatchMemory:
    """The memory of one class from its reference images (decoded and preprocessed as test images are)."""
    import torch

    from AnomalyCLIP_lib.memory import build_memory
    from AnomalyCLIP_lib.transform import image_transform

    if not references:
        raise AnomalyCLIPError(f"class {info.get('class_name')!r} has no reference image")
    transform = image_transform(inference.config.image_size)
    per_batch: list[list[torch.Tensor]] = []
    bar = tqdm(total=len(references), desc=f"memory {info.get('class_name', '')}".strip(), unit="image",
               disable=None if progress and len(references) > 1 else True)
    with bar:
        for start in range(0, len(references), batch_size):
            chunk = references[start:start + batch_size]
            images = torch.stack([transform(load_image(ref.file)) for ref in chunk])
            per_batch.append(inference.reference_tokens(images, settings))
            bar.update(len(chunk))
    per_layer = [torch.cat(layer) for layer in zip(*per_batch)]
    record = {**info, "k": len(references), "references": [ref.to_dict() for ref in references]}
    return build_memory(per_layer, settings, record)


def memory_info(class_name: str, backbone: str, backbone_sha256: str, image_size: int, dpam_layer: int | None,
                checkpoint_sha256: str | None) -> dict[str, Any]:
    """The facts a memory records about the run that built it (see the module docstring)."""
    return {"class_name": class_name, "backbone": str(backbone), "backbone_sha256": backbone_sha256,
            "image_size": int(image_size), "dpam_layer": dpam_layer, "checkpoint_sha256": checkpoint_sha256}


def memory_bytes(memory: PatchMemory) -> bytes:
    """The memory as ``.npz`` bytes (uncompressed: the banks do not compress)."""
    buffer = io.BytesIO()
    np.savez(buffer, **memory.to_arrays())
    return buffer.getvalue()


def save_memory_file(memory: PatchMemory, path: str | os.PathLike) -> Path:
    """Write the memory to ``path`` atomically."""
    from pipeline.atomic import atomic_write_bytes

    return atomic_write_bytes(memory_bytes(memory), path)


def load_memory_file(path: str | os.PathLike, flag: str = "--memory") -> PatchMemory:
    """A memory file read safely (no pickle); a file that is not one is one error line."""
    from AnomalyCLIP_lib.memory import PatchMemory

    source = f"{flag} {path}"
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zlib.error) as error:
        raise AnomalyCLIPError(f"{source} cannot be read as a memory file ({type(error).__name__}: {error}); build it "
                               "again with --reference_path DIR --save_memory FILE") from None
    return PatchMemory.from_arrays(arrays, source)


def load_checked_memory(spec: MemorySpec, backbone: str, image_size: int) -> PatchMemory:
    """``spec.memory_file`` read and checked against the run's backbone, image size and the DPAM layer
    (:func:`check_memory_fits`; ``--memory_weight`` applied when given)."""
    from AnomalyCLIP_lib.constants import DPAM_LAYER
    from AnomalyCLIP_lib.pretrained import backbone_sha256

    assert spec.memory_file is not None
    return check_memory_fits(load_memory_file(spec.memory_file), f"--memory {spec.memory_file}",
                             backbone_sha256(backbone), image_size, DPAM_LAYER, spec)


def check_memory_fits(memory: PatchMemory, source: str, backbone_sha256: str, image_size: int,
                      dpam_layer: int | None, spec: MemorySpec) -> PatchMemory:
    """Refuse a memory built for another backbone, image size or DPAM layer, or other given settings.

    Returns:
        The memory, with ``--memory_weight`` applied when the command line gave it (the weight is
        not part of the banks).
    """
    info = memory.info
    differing = []
    if info.get("backbone_sha256") != backbone_sha256:
        differing.append(f"another backbone ({info.get('backbone')})")
    if info.get("image_size") != image_size:
        differing.append(f"--image_size {info.get('image_size')} where this run uses {image_size}")
    if info.get("dpam_layer") != dpam_layer:
        differing.append(f"DPAM layer {info.get('dpam_layer')} where this run uses {dpam_layer}")
    for name in ("layers", "stream"):
        if name in spec.given and getattr(spec.settings, name) != getattr(memory.settings, name):
            differing.append(f"{MEMORY_SETTING_FLAGS[name]} {_shown(getattr(memory.settings, name))} where this run "
                             f"asks for {_shown(getattr(spec.settings, name))}")
    if differing:
        raise AnomalyCLIPError(f"{source} was built with {'; '.join(differing)}; build it again for this run "
                               "(--reference_path DIR --save_memory FILE)")
    if "weight" in spec.given and spec.settings.weight != memory.settings.weight:
        return memory.with_weight(spec.settings.weight)
    return memory


def _shown(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def memory_provenance(memory: PatchMemory | None) -> dict[str, Any] | None:
    """What thresholds record of the memory their scores were made with (``None``: zero-shot).

    ``references_sha256`` digests the references' SHA-256 in order, with the memory's settings.
    """
    if memory is None:
        return None
    return memory_record(memory.info.get("references") or [], memory.settings)


def memory_record(references: Sequence[dict[str, str]], settings: MemorySettings) -> dict[str, Any]:
    """The memory part of a provenance: the references' digest, their count and the settings."""
    digest = hashlib.sha256(json.dumps({"format": MEMORY_FORMAT, "settings": settings.to_dict(),
                                        "references": [ref["sha256"] for ref in references]},
                                       sort_keys=True).encode("utf-8")).hexdigest()
    return {"references_sha256": digest, "k": len(references), **settings.to_dict()}
