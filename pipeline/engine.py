"""The one engine that turns image files into predictions (torch inference module or exported graph)."""

from __future__ import annotations

import os

import torch

from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.inference import ScoringConfig


class ExportedScorer:
    """An exported graph behind :meth:`AnomalyCLIPInference.predict`'s interface (for ``test.py --runtime``).

    Takes the torch batches a DataLoader makes and returns :class:`scoring.AnomalyPrediction`,
    so a dataset can be scored through ONNX Runtime or OpenVINO with the evaluation code as is.

    Args:
        model_dir: Folder written by ``export.py``.
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        threads: Runtime threads (default: the runtime's).

    Attributes:
        config: The scoring settings the graph was exported with.
        exported: The :class:`deploy.runtime.ExportedModel`.
    """

    device = torch.device("cpu")

    def __init__(self, model_dir: str | os.PathLike, runtime: str = "onnxruntime", threads: int | None = None) -> None:
        from deploy.runtime import ExportedModel

        self.exported = ExportedModel(model_dir, runtime, threads)
        self.config = ScoringConfig.from_dict(self.exported.scoring)

    def predict(self, images: torch.Tensor) -> scoring.AnomalyPrediction:
        """Scores and maps of preprocessed images ``(B, 3, S, S)``, on the CPU."""
        scores, maps = self.exported.predict(images.detach().to("cpu", torch.float32).numpy())
        return scoring.AnomalyPrediction(scores=torch.from_numpy(scores), maps=torch.from_numpy(maps))

