"""The one engine that turns images into predictions, for every entry point.

``test.py`` (a dataset through a DataLoader), ``test_one_example.py`` (files) and the exported
runtimes all go through :func:`score_batches`: typed :class:`Batch` es of preprocessed images,
each row carrying the index of its item (in the dataset, or in the list of files), go through a
:class:`Scorer` -- the torch inference module (:class:`TorchScorer`) or an exported graph
(:class:`ExportedScorer`) -- and come out as :class:`ScoredImage` s keyed by that index, so a
sampler, a shard or a dropped batch can never attach a score to the wrong image.

Torch-free at import: the torch parts load only when a torch scorer or a DataLoader is made, so
``test_one_example.py --runtime`` runs where only numpy, Pillow and a runtime are installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from AnomalyCLIP_lib.images import load_image

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from AnomalyCLIP_lib.inference import AnomalyCLIPInference
    from dataset import AnomalyDataset
    from deploy.runtime import ExportedModel
    from pipeline.config import LoaderSpec


@dataclass
class Batch:
    """Preprocessed images with the index of each row's item.

    Attributes:
        indices: The item index of each row (dataset index, or position in a list of files).
        images: ``(B, 3, S, S)`` float32, a torch tensor or a numpy array (as the scorer stacks them).
        sizes: ``(width, height)`` of each original image, where known.
        masks: ``(B, S, S)`` uint8 ground-truth masks (evaluation), else ``None``.
        classes: The class of each row (a dataset's items), else ``None``: what picks each row's
            memory under a :class:`PerClassScorer`.
    """

    indices: list[int]
    images: Any
    sizes: list[tuple[int, int]] | None = None
    masks: np.ndarray | None = None
    classes: list[str] | None = None


@dataclass(frozen=True)
class ScoredImage:
    """One image's prediction, keyed by its item index.

    Attributes:
        index: The item index (see :class:`Batch`).
        score: Image anomaly score.
        anomaly_map: ``(S, S)`` float32 anomaly map (Gaussian filter applied).
        size: ``(width, height)`` of the original image, where known.
        mask: ``(S, S)`` uint8 ground truth (evaluation), else ``None``.
    """

    index: int
    score: float
    anomaly_map: np.ndarray
    size: tuple[int, int] | None = None
    mask: np.ndarray | None = None


class Scorer(Protocol):
    """What scores batches: preprocessing, stacking, and the forward to numpy scores and maps."""

    image_size: int

    def preprocess(self, image: Image.Image) -> Any:
        """One PIL image as a ``(3, S, S)`` row."""

    def stack(self, rows: Sequence[Any]) -> Any:
        """Rows of :meth:`preprocess` as one ``(B, 3, S, S)`` batch."""

    def predict(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``(B,)`` and maps ``(B, S, S)``, float32 numpy arrays."""


class TorchScorer:
    """The torch inference module (:class:`AnomalyCLIP_lib.inference.AnomalyCLIPInference`) on a device."""

    def __init__(self, inference: AnomalyCLIPInference, device: torch.device) -> None:
        from AnomalyCLIP_lib.transform import image_transform

        self.inference = inference
        self.device = device
        self.image_size = inference.config.image_size
        self._transform = image_transform(self.image_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._transform(image)

    def stack(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch

        return torch.stack(list(rows))

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        prediction = self.inference.predict(images.to(self.device, non_blocking=True))
        return prediction.scores.numpy(), prediction.maps.numpy()


class ExportedScorer:
    """An exported graph (:class:`deploy.runtime.ExportedModel`): numpy in, numpy out, no torch needed.

    Also takes the torch batches a DataLoader makes (``test.py --runtime``).

    Attributes:
        exported: The loaded export (its ``scoring`` holds the settings it was exported with).
    """

    def __init__(self, exported: ExportedModel) -> None:
        self.exported = exported
        self.image_size = exported.image_size

    @classmethod
    def load(cls, model_dir: str, runtime: str, threads: int | None = None,
             precision: str | None = None) -> ExportedScorer:
        """The export in ``model_dir`` loaded into ``runtime`` (``onnxruntime`` or ``openvino``), computing in
        ``precision`` (``--precision``; ``None``: the export's own, see :class:`deploy.runtime.ExportedModel`)."""
        from deploy.runtime import ExportedModel

        return cls(ExportedModel(model_dir, runtime, threads, precision=precision))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self.exported.preprocess(image)

    def stack(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(rows)

    def predict(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(images, np.ndarray):  # a DataLoader's CPU tensor
            images = images.detach().cpu().numpy()
        return self.exported.predict(images)


class PerClassScorer:
    """One scorer per class (few-shot: each class's memory on one shared tower); rows go to their class's.

    Args:
        scorers: ``{class: scorer}``, all with the same preprocessing.
    """

    def __init__(self, scorers: dict[str, Scorer]) -> None:
        if not scorers:
            raise ValueError("PerClassScorer needs at least one class")
        self.scorers = scorers
        self._first = next(iter(scorers.values()))
        self.image_size = self._first.image_size

    def preprocess(self, image: Image.Image) -> Any:
        return self._first.preprocess(image)

    def stack(self, rows: Sequence[Any]) -> Any:
        return self._first.stack(rows)

    def predict_rows(self, images: Any, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps of a batch whose rows belong to ``classes`` (each class's rows in one call)."""
        scores = np.empty(len(classes), dtype=np.float32)
        maps: np.ndarray | None = None
        for name in dict.fromkeys(classes):
            rows = [row for row, row_class in enumerate(classes) if row_class == name]
            if name not in self.scorers:
                raise KeyError(f"no memory for class {name!r}")
            class_scores, class_maps = self.scorers[name].predict(images[rows])
            if maps is None:
                maps = np.empty((len(classes), *class_maps.shape[1:]), dtype=np.float32)
            scores[rows], maps[rows] = class_scores, class_maps
        assert maps is not None
        return scores, maps

    def predict(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        if len(self.scorers) != 1:
            raise ValueError("a PerClassScorer of several classes scores batches that name their rows' classes")
        return self._first.predict(images)


def _predict(scorer: Scorer, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(scorer, PerClassScorer) and batch.classes is not None:
        return scorer.predict_rows(batch.images, batch.classes)
    return scorer.predict(batch.images)


def score_batches(scorer: Scorer, batches: Iterable[Batch]) -> Iterator[list[ScoredImage]]:
    """THE loop: every batch through ``scorer``; one list of :class:`ScoredImage` per batch, in batch order."""
    for batch in batches:
        scores, maps = _predict(scorer, batch)
        if len(scores) != len(batch.indices):
            raise RuntimeError(f"the scorer returned {len(scores)} results for a batch of {len(batch.indices)}")
        yield [ScoredImage(index=index, score=float(scores[row]), anomaly_map=maps[row],
                           size=None if batch.sizes is None else batch.sizes[row],
                           mask=None if batch.masks is None else batch.masks[row])
               for row, index in enumerate(batch.indices)]


def file_batches(files: Sequence[Path], scorer: Scorer, batch_size: int, progress: bool = True) -> Iterator[Batch]:
    """The files as batches of ``batch_size``, decoded in order (index = position in ``files``).

    Args:
        progress: A bar on a terminal counting the images scored, of how many (none for one image).
    """
    bar = tqdm(total=len(files), desc="scoring", unit="image", disable=None if progress and len(files) > 1 else True)
    try:
        for start in range(0, len(files), batch_size):
            chunk = range(start, min(start + batch_size, len(files)))
            images = [load_image(files[index]) for index in chunk]
            yield Batch(indices=list(chunk), images=scorer.stack([scorer.preprocess(image) for image in images]),
                        sizes=[image.size for image in images])
            bar.update(len(chunk))  # the consumer scored the batch before asking for the next one
    finally:
        bar.close()


def dataset_batches(dataset: AnomalyDataset, indices: Sequence[int], loader: LoaderSpec, device: torch.device,
                    progress: bool = True) -> Iterator[Batch]:
    """The items ``indices`` of ``dataset`` through a DataLoader, with their ground-truth masks.

    Each row's index comes from the item itself (``item["index"]``), never from its position.
    ``loader.num_workers`` must be resolved (a number, see ``pipeline.loading.resolve_num_workers``).
    """
    from torch.utils.data import DataLoader, Subset

    from dataset import loader_batches

    data_loader = DataLoader(Subset(dataset, list(indices)), batch_size=loader.batch_size, shuffle=False,
                             num_workers=loader.num_workers or 0, pin_memory=device.type == "cuda")
    with loader_batches(data_loader) as batches:
        for batch in tqdm(batches, total=len(data_loader), desc="scoring", unit="batch", disable=not progress):
            yield Batch(indices=[int(index) for index in batch["index"]], images=batch["img"],
                        masks=batch["img_mask"][:, 0].numpy().astype(np.uint8), classes=list(batch["cls_name"]))
