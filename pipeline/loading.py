"""Loading what a run needs: the device, DataLoader workers, the backbone and the prompts."""

from __future__ import annotations

import logging
import os

import torch

import AnomalyCLIP_lib
from AnomalyCLIP_lib.constants import DPAM_DEPTH, DPAM_LAYER
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.inference import AnomalyCLIPInference, ScoringConfig
from AnomalyCLIP_lib.model import CLIP, normalize_layers
from pipeline.config import ModelSpec, ScoringSpec
from pipeline.engine import Scorer, TorchScorer
from prompt_ensemble import AnomalyCLIP_PromptLearner, design_details, load_prompt_state

logger = logging.getLogger(__name__)

# PyTorch's own choice at import (the physical cores, or OMP_NUM_THREADS): the ceiling of every later choice.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def check_backbone_fits(spec: ModelSpec, model: CLIP) -> None:
    """Flags that depend on the loaded backbone: the layers exist and the image size fits its patches."""
    if model.visual.num_layers != DPAM_DEPTH:
        raise AnomalyCLIPError(f"--backbone {spec.backbone} has {model.visual.num_layers} vision layers; AnomalyCLIP "
                               f"(DPAM from layer {DPAM_LAYER}) needs an OpenAI-layout CLIP ViT with {DPAM_DEPTH}, "
                               "such as ViT-L/14@336px")
    normalize_layers(spec.features_list, model.visual.num_layers)
    patch = int(model.visual.conv1.kernel_size[0])
    if spec.image_size % patch:
        below = spec.image_size // patch * patch
        options = f"{below} or {below + patch}" if below else str(patch)
        raise AnomalyCLIPError(f"--image_size {spec.image_size} is not a multiple of the backbone's patch size "
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


def choose_threads(requested: int | None, available_cores: int, torch_default: int) -> int:
    """Torch's intra-op thread count: ``requested``, else PyTorch's default within the cores this process may use.

    On a busy CPU the collapse came from OpenMP's spin-waiting, not from the count: on 2 cores
    that other processes kept busy, PyTorch's 2 threads scored 10-18x slower than 1 while they
    spun, and as fast as 1 once they waited passively (``benchmarks/bench_busy_cpu.py``; the
    entry scripts set ``OMP_WAIT_POLICY=PASSIVE``). So the default does not follow the load: the
    scores' last digits depend on the thread count (README: Distributed), and a run gives the
    same numbers whatever else runs. It does follow a container's CPU quota, which PyTorch's
    default (the machine's physical cores) ignores: 32 threads on a 2-CPU quota stall at every op.

    Args:
        requested: ``--threads`` (``None``: not given).
        available_cores: Cores this process may run on (affinity and CPU quota).
        torch_default: PyTorch's own default, never exceeded.

    Returns:
        ``requested``, else ``min(torch_default, available_cores)``, at least 1.
    """
    if requested is not None:
        return requested
    return max(1, min(torch_default, available_cores))


def quota_cores(cpu_max: str) -> int | None:
    """The cores a cgroup v2 ``cpu.max`` line (``"QUOTA PERIOD"`` or ``"max PERIOD"``) allows; ``None``: no limit."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return max(1, -(-quota // period)) if quota > 0 and period > 0 else None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as cpu_max:
            quota = quota_cores(cpu_max.read())
    except OSError:
        quota = None
    return min(cores, quota) if quota else cores


def load_average() -> float:
    """Runnable processes on the machine, averaged over the last minute (0 where the platform has no such count)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def configure_threads(requested: int | None) -> int:
    """Set torch's intra-op threads for this run (every torch entry point calls this once); returns torch's count.

    ``OMP_NUM_THREADS`` set by the user (or by torchrun, one per rank) is kept when ``--threads``
    is not given. The entry scripts also make idle OpenMP threads sleep instead of spin
    (``OMP_WAIT_POLICY=PASSIVE``, read only when torch loads).
    """
    if requested is None and os.environ.get("OMP_NUM_THREADS"):
        why = "OMP_NUM_THREADS"  # torch applied it when it loaded
    else:
        cores = available_cores()
        threads = choose_threads(requested, cores, TORCH_DEFAULT_THREADS)
        why = "--threads" if requested is not None else f"{cores} core(s) available"
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    logger.debug("torch threads: %d (%s)", torch.get_num_threads(), why)  # results.json records the count
    return torch.get_num_threads()


def resolve_num_workers(requested: int | None, device: torch.device) -> int:
    """The DataLoader worker count: ``requested``, else a per-device default.

    On a GPU, workers decode and resize the next batch while the model runs. On a CPU the
    model's matmuls keep every thread PyTorch was given busy, so workers only pay off on cores
    left over: on 2 cores (ViT-L/14 at 518 px) 2 workers made scoring 16% slower than none. Cores
    that other processes keep busy (the load average) are not left over.
    """
    if requested is not None:
        return requested
    if device.type != "cpu":
        return 2
    spare_cores = (os.cpu_count() or 1) - torch.get_num_threads() - round(load_average())
    return max(0, min(2, spare_cores))


def load_model_and_prompts(
    spec: ModelSpec, device: torch.device, checkpoint_path: str | None = None
) -> tuple[CLIP, AnomalyCLIP_PromptLearner, dict[str, object] | None]:
    """Backbone and prompt learner of the design in ``spec``, with prompts from a checkpoint.

    Returns:
        ``(model, prompt_learner, checkpoint)`` on ``device``; ``checkpoint`` is the loaded file
        (``None`` when no path was given and the prompts are freshly initialised).
    """
    model, _ = AnomalyCLIP_lib.load(spec.backbone, device=device, trust_backbone=spec.trust_backbone)
    check_backbone_fits(spec, model)
    design = design_details(n_ctx=spec.n_ctx, depth=spec.depth, t_n_ctx=spec.t_n_ctx)
    prompt_learner = AnomalyCLIP_PromptLearner(model, design)
    checkpoint = load_prompt_state(prompt_learner, checkpoint_path) if checkpoint_path else None
    return model, prompt_learner.to(device), checkpoint


def scoring_config(model: ModelSpec, scoring: ScoringSpec) -> ScoringConfig:
    """The inference module's settings for a run's model and scoring settings."""
    return ScoringConfig(image_size=model.image_size, features_list=tuple(model.features_list), dpam_layer=DPAM_LAYER,
                         sigma=scoring.sigma, feature_map_layer=model.feature_map_layer,
                         reference_arithmetic=model.reference_arithmetic, precision=scoring.precision)


def inference_module(model: ModelSpec, scoring: ScoringSpec, device: torch.device) -> AnomalyCLIPInference:
    """Backbone and prompts loaded, text features computed once: the inference module of the run."""
    clip, prompt_learner, _ = load_model_and_prompts(model, device, scoring.checkpoint_path)
    return AnomalyCLIPInference.from_model(clip, prompt_learner, scoring_config(model, scoring))


def open_scorer(model: ModelSpec, scoring: ScoringSpec, device: torch.device) -> Scorer:
    """The torch path's scorer: the run's inference module on ``device`` (an export loads with
    :meth:`pipeline.engine.ExportedScorer.load`, without torch)."""
    return TorchScorer(inference_module(model, scoring, device), device)
