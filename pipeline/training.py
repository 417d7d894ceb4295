"""Learn AnomalyCLIP's object-agnostic prompts on an auxiliary dataset (method §6).

Example::

    python train.py --dataset mvtec --train_data_path ./data/mvtec \
        --save_path ./checkpoints/9_12_4_multiscale_visa --features_list 24 --epoch 15

Trains on the auxiliary dataset's TEST split (it has masks), all classes, shuffled. Every
``--save_freq`` epochs ``save_path/epoch_{n}.pth`` is written atomically; it holds
``{"prompt_learner": ...}`` (what the original code reads) plus our optimizer state, epoch and
config, so ``--resume`` continues exactly where training stopped.

The frozen image forward runs once per image (:mod:`feature_cache`): every epoch trains from the
cached embeddings and patch tokens, in the same order and with the same steps as the uncached
trainer (``--no_cache``). Under ``torchrun --nproc_per_node K`` the caching pass is split over the
ranks (rank r encodes images r, r+K, ...) and gathered on rank 0, which alone optimises the
prompts and writes the checkpoints; the other ranks exit once their share is cached.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.constants import DPAM_LAYER
from AnomalyCLIP_lib.model import CLIP
from dataset import AnomalyDataset, loader_batches
from loss import LossTerms, anomalyclip_loss
from pipeline import distributed, feature_cache
from pipeline.atomic import atomic_torch_save, remove_leftovers
from pipeline.cli import (add_loader_args, add_model_args, add_save_path_arg, check_device_and_precision,
                          check_loader_spec, check_model_spec, check_output_folder, check_positive, cli_parser,
                          loader_spec, model_spec, parse_config)
from pipeline.config import LoaderSpec, ModelSpec, RunRecord, replaced
from pipeline.feature_cache import CacheShapes, FeatureCache
from pipeline.loading import configure_threads, load_model_and_prompts, resolve_device, resolve_num_workers
from prompt_ensemble import AnomalyCLIP_PromptLearner, read_prompt_checkpoint
from utils import get_logger, setup_seed

ADAM_BETAS = (0.5, 0.999)


@dataclass
class CachedBatch:
    """The frozen features of a batch of images, on the CPU, keyed by dataset index."""

    indices: list[int]
    embedding: np.ndarray
    patch_tokens: list[np.ndarray]
    masks: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class CacheSpec:
    """The frozen-feature cache (:mod:`pipeline.feature_cache`).

    Attributes:
        enabled: Cache the frozen image forward (off: ``--no_cache``, the original's every-step forward).
        memory_gb: Keep the cache in memory up to this size, else on disk.
        folder: ``--cache_dir`` (default: ``save_path/feature_cache``).
        keep: Keep the on-disk cache for later runs.
    """

    enabled: bool = True
    memory_gb: float = 4.0
    folder: str | None = None
    keep: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    """Everything ``train.py`` was asked to do (frozen; see :func:`parse_args`)."""

    train_data_path: str
    save_path: str
    dataset: str
    model: ModelSpec
    loader: LoaderSpec
    cache: CacheSpec = CacheSpec()
    epoch: int = 15
    learning_rate: float = 0.001
    print_freq: int = 1
    save_freq: int = 1
    resume: str | None = None
    overwrite: bool = False
    image_loss_only: bool = False
    record: RunRecord = field(default_factory=lambda: RunRecord({}))


def build_parser():
    parser = cli_parser("Train AnomalyCLIP prompts on an auxiliary dataset.")
    parser.add_argument("--train_data_path", default="./data/visa", help="dataset root holding meta.json")
    add_save_path_arg(parser, "./checkpoint", "epoch_N.pth and log.txt")
    parser.add_argument("--dataset", default="mvtec", help="dataset name (for the log)")
    add_model_args(parser)
    parser.add_argument("--epoch", type=int, default=15, help="number of epochs")
    parser.add_argument("--learning_rate", type=float, default=0.001, help="Adam learning rate")
    add_loader_args(parser, "images per step")
    parser.add_argument("--print_freq", type=int, default=1, help="log every N epochs")
    parser.add_argument("--save_freq", type=int, default=1, help="save a checkpoint every N epochs")
    parser.add_argument("--resume", default=None,
                        help="continue from our epoch_N.pth, or start from a prompt checkpoint of the original format")
    parser.add_argument("--cache_memory_gb", type=float, default=4.0,
                        help="keep the frozen features in memory up to this size, else on disk under --cache_dir")
    parser.add_argument("--cache_dir", default=None,
                        help="folder for an on-disk feature cache (default: save_path/feature_cache)")
    parser.add_argument("--keep_cache", action="store_true",
                        help="keep the feature cache on disk for later runs (reused only if made the same way)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train into a --save_path that already holds epoch_N.pth of another run, replacing them")
    parser.add_argument("--image_loss_only", action="store_true",
                        help="train with the image-level loss alone (for data whose anomalous images have no masks)")
    parser.add_argument("--no_cache", action="store_true",
                        help="run the frozen image forward in every step, as the original does")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainingConfig:
    """``train.py``'s command line, parsed once into a checked :class:`TrainingConfig`."""
    return parse_config(build_parser(), argv, _config)


def _config(flags: RunRecord) -> TrainingConfig:
    values = flags.values
    model, loader = model_spec(flags), loader_spec(flags)
    check_loader_spec(loader)
    check_model_spec(model)
    check_positive(epoch=values["epoch"], print_freq=values["print_freq"], save_freq=values["save_freq"])
    check_output_folder(values["save_path"], "--save_path")
    check_device_and_precision(model.device)
    cache = CacheSpec(enabled=not values["no_cache"], memory_gb=values["cache_memory_gb"], folder=values["cache_dir"],
                      keep=values["keep_cache"])
    if not cache.enabled and (cache.keep or cache.folder):
        raise AnomalyCLIPError("--no_cache cannot be combined with --keep_cache or --cache_dir: drop one")
    if not (math.isfinite(cache.memory_gb) and cache.memory_gb >= 0):
        raise AnomalyCLIPError(f"--cache_memory_gb {cache.memory_gb} must be >= 0 (0 keeps the cache on disk)")
    if cache.folder:
        check_output_folder(cache.folder, "--cache_dir")
    learning_rate = values["learning_rate"]
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise AnomalyCLIPError(f"--learning_rate {learning_rate} must be a positive number (released: 0.001)")
    return TrainingConfig(train_data_path=values["train_data_path"], save_path=values["save_path"],
                          dataset=values["dataset"], model=model, loader=loader, cache=cache, epoch=values["epoch"],
                          learning_rate=learning_rate, print_freq=values["print_freq"], save_freq=values["save_freq"],
                          resume=values["resume"], overwrite=values["overwrite"],
                          image_loss_only=values["image_loss_only"], record=flags)


def train_step(
    model: CLIP,
    prompt_learner: AnomalyCLIP_PromptLearner,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    features_list: Sequence[int],
    feature_map_layer: int = 0,
    image_loss_only: bool = False,
    reference_arithmetic: bool = False,
) -> LossTerms:
    """One optimisation step of the prompt learner (method §6): frozen image forward, then :func:`prompt_step`.

    Args:
        images: ``(B, 3, S, S)`` preprocessed images on the model's device.
        labels: ``(B,)`` image labels.
        masks: ``(B, S, S)`` or ``(B, 1, S, S)`` binary ground-truth masks.
    """
    with torch.no_grad():
        image_embedding, patch_tokens = model.encode_image(images, features_list, DPAM_LAYER, reference_arithmetic)
    return prompt_step(model, prompt_learner, optimizer, image_embedding, patch_tokens, labels, masks,
                       images.shape[-1], feature_map_layer, image_loss_only)


def prompt_step(
    model: CLIP,
    prompt_learner: AnomalyCLIP_PromptLearner,
    optimizer: torch.optim.Optimizer,
    image_embedding: torch.Tensor,
    patch_tokens: Sequence[torch.Tensor],
    labels: torch.Tensor,
    masks: torch.Tensor,
    image_size: int,
    feature_map_layer: int = 0,
    image_loss_only: bool = False,
) -> LossTerms:
    """The learnable part of a step: text features, loss, backward and Adam update.

    Args:
        image_embedding: ``(B, D)`` image embeddings (constants; normalised here).
        patch_tokens: Per-layer ``(B, 1 + g*g, D)`` patch tokens (constants).
        image_size: Side S of the ground-truth masks and maps.
        image_loss_only: Back-propagate the image loss alone (the local loss is still reported).

    Returns:
        The loss terms, detached.
    """
    text_feats = scoring.text_features(model, prompt_learner)
    logits = scoring.image_logits(image_embedding, text_feats)
    maps = scoring.similarity_maps(patch_tokens, text_feats, image_size, feature_map_layer)
    gt = masks.reshape(masks.shape[0], *masks.shape[-2:]).to(maps[0].dtype)
    terms = anomalyclip_loss(logits, maps, labels.to(logits.device), gt)
    optimizer.zero_grad()
    (terms.image if image_loss_only else terms.total).backward()
    optimizer.step()
    return LossTerms(total=terms.total.detach(), local=terms.local.detach(), image=terms.image.detach())


def make_optimizer(prompt_learner: AnomalyCLIP_PromptLearner, learning_rate: float) -> torch.optim.Adam:
    return torch.optim.Adam(prompt_learner.parameters(), lr=learning_rate, betas=ADAM_BETAS)


def _checkpoint(prompt_learner, optimizer, epoch: int, config: TrainingConfig) -> dict[str, object]:
    flags = config.record.with_values(num_workers=config.loader.num_workers).values
    recorded = {key: value for key, value in flags.items() if isinstance(value, (int, float, str, list, type(None)))}
    return {
        "prompt_learner": {key: value.cpu() for key, value in prompt_learner.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "config": recorded,
    }


# Flags a resumed run takes from its checkpoint's config unless the command line gives them; a given
# one is applied for real (the learning rate in the optimizer too). Per-invocation flags (--device,
# --num_workers, the cache, --trust_backbone) are never taken from a file.
RESUMABLE_FLAGS = ("learning_rate", "epoch", "batch_size", "seed", "features_list", "feature_map_layer", "image_size",
                   "train_data_path", "backbone", "image_loss_only", "reference_arithmetic", "n_ctx", "depth",
                   "t_n_ctx", "print_freq", "save_freq", "dataset")


def resumed_config(config: TrainingConfig) -> TrainingConfig:
    """A new config for ``--resume``: the checkpoint's flags, except those the command line gave.

    So a resumed run equals an unbroken one (a ``--learning_rate`` given only to the first run
    stays). An original-format checkpoint (no config) leaves the config as it is.
    """
    if not config.resume:
        return config
    saved = read_prompt_checkpoint(config.resume).get("config")
    if not isinstance(saved, dict):
        return config
    taken = {name: saved[name] for name in RESUMABLE_FLAGS if name in saved and name not in config.record.given}
    return _config(config.record.with_values(**taken))


def _resume(checkpoint: dict[str, object] | None, optimizer: torch.optim.Optimizer, config, logger) -> int:
    """Restore the optimizer from our checkpoint; returns the first epoch still to train."""
    if checkpoint is None or "optimizer" not in checkpoint:
        return 1
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as exc:
        raise AnomalyCLIPError(f"--resume {config.resume}: its optimizer state does not fit ({exc})") from None
    saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    current = config.record.values
    changed = [f"--{name} {saved[name]} -> {current[name]}" for name in RESUMABLE_FLAGS
               if name in saved and saved[name] != current[name]]
    if changed:
        logger.info("resuming %s with flags that differ from its config, applied: %s", config.resume,
                    "; ".join(changed))
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate
    return int(checkpoint.get("epoch", 0)) + 1


def _check_save_path(config) -> None:
    """Refuse to replace another run's checkpoints without being asked to, or a user's files in --cache_dir."""
    if config.cache.enabled:
        feature_cache.check_folder(_cache_folder(config))
    existing = sorted(Path(config.save_path).glob("epoch_*.pth"))
    if existing and not (config.resume or config.overwrite):
        raise AnomalyCLIPError(f"{config.save_path} already holds checkpoints of another run ({existing[0].name}...): "
                               "choose another --save_path, continue it with --resume, or replace it with --overwrite")


def _check_masks(data: AnomalyDataset, config) -> None:
    """Anomalous images without masks would teach the local loss that their defects are normal."""
    availability = data.availability()
    if not availability.n_anomalous:
        raise AnomalyCLIPError(f"{config.train_data_path} holds no anomalous images, and the prompts learn from "
                               "normal and anomalous ones: train on an auxiliary dataset with defects (MVTec AD, VisA)")
    unmasked = availability.n_anomalous - availability.n_masked
    if unmasked and not config.image_loss_only:
        raise AnomalyCLIPError(f"{unmasked} of the {availability.n_anomalous} anomalous training images in "
                               f"{config.train_data_path} have no mask, so the local loss would learn their defects "
                               "as normal: give masks, or train with the image loss alone (--image_loss_only)")


def _loader(train_data: AnomalyDataset, config, device: torch.device) -> DataLoader:
    return DataLoader(
        train_data,
        batch_size=config.loader.batch_size,
        shuffle=True,
        num_workers=config.loader.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
        persistent_workers=False,
    )


def _index_loader(n_images: int, batch_size: int) -> DataLoader:
    """The dataset indices of each step, drawn exactly as :func:`_loader` draws its images.

    Both are shuffling DataLoaders over ``n_images`` items with their own generator, reseeded
    each epoch: the loader draws its base seed, then the sampler its permutation, from that
    generator, so for a given seed the cached run sees the same images in the same steps.
    """
    return DataLoader(range(n_images), batch_size=batch_size, shuffle=True, generator=torch.Generator())


def _seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    # Seeding each epoch's shuffle from (seed, epoch) makes a resumed run equal an unbroken one.
    loader.generator.manual_seed(seed * 100_003 + epoch)


def _encoded_batches(model: CLIP, data: AnomalyDataset, indices: Sequence[int], config, device: torch.device
                     ) -> Iterator[CachedBatch]:
    """The frozen features of the items ``indices`` of ``data``, one batch at a time, as CPU arrays."""
    loader = DataLoader(Subset(data, list(indices)), batch_size=config.loader.batch_size, shuffle=False,
                        num_workers=config.loader.num_workers, pin_memory=device.type == "cuda")
    with loader_batches(loader) as batches:
        for batch in batches:
            with torch.no_grad():
                embedding, tokens = model.encode_image(batch["img"].to(device, non_blocking=True),
                                                       list(config.model.features_list), DPAM_LAYER,
                                                       config.model.reference_arithmetic)
            count = len(embedding)
            yield CachedBatch(indices=[int(index) for index in batch["index"]],
                              embedding=embedding.float().cpu().numpy(),
                              patch_tokens=[t.float().cpu().numpy() for t in tokens],
                              masks=batch["img_mask"].reshape(count, *batch["img_mask"].shape[-2:]).numpy()
                              .astype(np.uint8),
                              labels=batch["anomaly"].numpy().astype(np.int64))


def _cache_folder(config) -> Path:
    return Path(config.cache.folder) if config.cache.folder else Path(config.save_path) / "feature_cache"


def _build_cache(config, world: distributed.World, model: CLIP, data: AnomalyDataset, device: torch.device,
                 folder: Path, key: dict | None, logger) -> FeatureCache | None:
    """Encode every image once; shards over the ranks, everything lands in rank 0's cache."""
    if world.is_main:
        feature_cache.remove(folder)  # a stale or half-written cache of ours; the manifest goes first
    shard = world.shard(len(data))
    batches = _encoded_batches(model, data, shard, config, device)
    holder: list[FeatureCache] = []
    progress = tqdm(total=len(data), desc="caching features", unit="img", disable=not world.is_main)

    def store(part: CachedBatch) -> None:
        if not holder:
            holder.append(_new_cache(config, len(data), part, folder, logger))
        holder[0].put(part.indices, part.embedding, part.patch_tokens, part.masks, part.labels)
        progress.update(len(part.indices))

    # A failure on rank 0 while storing (a full disk) travels in the next round's exchange, or in
    # the final check after the last round, so that every rank stops with it.
    storing_error: str | None = None
    try:
        for local, error in distributed.lockstep(world, batches, world.rounds(len(data), config.loader.batch_size)):
            outgoing = [[local] if local else []] + [[] for _ in range(world.size - 1)]
            for part in distributed.exchange(world, outgoing, error or storing_error):
                if storing_error is None:
                    _, storing_error = distributed.guarded(world, lambda part=part: store(part))
        distributed.together(world, lambda: _raise_if(storing_error))
    finally:
        progress.close()
    if not world.is_main:
        return None
    cache = holder[0]
    cache.seal(key)
    logger.info("frozen features of %d images cached (images per rank: %s)", len(data),
                world.shard_sizes(len(data)))
    return cache


def _raise_if(error: str | None) -> None:
    if error:
        raise AnomalyCLIPError(error)


def _new_cache(config, n_images: int, first: CachedBatch, folder: Path, logger) -> FeatureCache:
    shapes = CacheShapes(n_images, first.embedding.shape[-1], tuple(t.shape[1:] for t in first.patch_tokens),
                         config.model.image_size)
    size = feature_cache.format_bytes(shapes.nbytes())
    if not config.cache.keep and feature_cache.fits_in_memory(shapes, config.cache.memory_gb):
        logger.info("caching frozen features in memory (%s, budget %g GiB)", size, config.cache.memory_gb)
        return FeatureCache.in_memory(shapes)
    reason = "--keep_cache" if config.cache.keep else f"over the --cache_memory_gb {config.cache.memory_gb:g} budget"
    logger.info("caching frozen features on disk in %s (%s, %s)", folder, size, reason)
    return FeatureCache.on_disk(shapes, folder)


def _feature_cache(config, world: distributed.World, model: CLIP, data: AnomalyDataset, device: torch.device,
                   logger) -> tuple[FeatureCache | None, bool]:
    """Rank 0's cache (reused or built) and whether this run built it; other ranks get ``None``."""
    folder = _cache_folder(config)
    key, existing = None, None
    if world.is_main:
        key = feature_cache.cache_key(config.model.backbone, config.train_data_path, config.model.image_size,
                                      list(config.model.features_list), DPAM_LAYER,
                                      bool(config.model.reference_arithmetic), data.read_files())
        existing, why_not = feature_cache.reusable(folder, key)
        if why_not:
            logger.info("%s; rebuilding it", why_not)
    if distributed.broadcast_from_main(world, existing is not None):
        if existing is not None:
            logger.info("reusing the feature cache in %s (made with the same backbone, image size, features list, "
                        "meta.json and image files)", folder)
        return existing, False
    return _build_cache(config, world, model, data, device, folder, key, logger), True


def _check_epoch_losses(epoch: int, local_losses: list[float], image_losses: list[float]) -> None:
    if not all(math.isfinite(value) for value in local_losses + image_losses):
        raise AnomalyCLIPError(f"training diverged at epoch {epoch} (non-finite loss); lower --learning_rate")


def _end_epoch(epoch: int, config, prompt_learner, optimizer, local_losses, image_losses, logger) -> None:
    _check_epoch_losses(epoch, local_losses, image_losses)
    if epoch % config.print_freq == 0:
        logger.info("epoch [%d/%d], loss:%.4f, image_loss:%.4f", epoch, config.epoch,
                    np.mean(local_losses), np.mean(image_losses))
    if epoch % config.save_freq == 0 or epoch == config.epoch:
        atomic_torch_save(_checkpoint(prompt_learner, optimizer, epoch, config),
                          Path(config.save_path) / f"epoch_{epoch}.pth")


def _train_uncached(config, model, prompt_learner, optimizer, data, device, epochs: range, logger) -> int:
    """Today's trainer: the frozen forward in every step. Returns the number of image forwards."""
    loader = _loader(data, config, device)
    forwards = 0
    for epoch in epochs:
        _seed_epoch(loader, config.model.seed, epoch)
        local_losses, image_losses = [], []
        with loader_batches(loader) as batches:
            for batch in tqdm(batches, total=len(loader), desc=f"epoch {epoch}/{config.epoch}", unit="step",
                              leave=False):
                terms = train_step(model, prompt_learner, optimizer, batch["img"].to(device), batch["anomaly"],
                                   batch["img_mask"].to(device), list(config.model.features_list),
                                   config.model.feature_map_layer, config.image_loss_only,
                                   config.model.reference_arithmetic)
                forwards += len(batch["img"])
                local_losses.append(terms.local.item())
                image_losses.append(terms.image.item())
        _end_epoch(epoch, config, prompt_learner, optimizer, local_losses, image_losses, logger)
    return forwards


def _train_cached(config, model, prompt_learner, optimizer, cache: FeatureCache, device, epochs: range, logger) -> None:
    """The same steps as :func:`_train_uncached`, from the cached features."""
    order = _index_loader(cache.shapes.n_images, config.loader.batch_size)
    for epoch in epochs:
        _seed_epoch(order, config.model.seed, epoch)
        local_losses, image_losses = [], []
        for indices in tqdm(order, desc=f"epoch {epoch}/{config.epoch}", unit="step", leave=False):
            embedding, tokens, labels, masks = cache.batch(indices.numpy(), device)
            terms = prompt_step(model, prompt_learner, optimizer, embedding, tokens, labels, masks,
                                config.model.image_size, config.model.feature_map_layer, config.image_loss_only)
            local_losses.append(terms.local.item())
            image_losses.append(terms.image.item())
        _end_epoch(epoch, config, prompt_learner, optimizer, local_losses, image_losses, logger)


def _prepare(config, device: torch.device):
    train_data = AnomalyDataset(config.train_data_path, image_size=config.model.image_size, split="test")
    _check_masks(train_data, config)
    model, prompt_learner, checkpoint = load_model_and_prompts(config.model, device, config.resume)
    return train_data, model, prompt_learner, checkpoint


def train(config: TrainingConfig) -> Path:
    """Run training; returns the folder holding the checkpoints."""
    world, device = distributed.setup(config.model.device, resolve_device)
    try:
        with _held_folders(config, world):
            _train(config, world, device)
    finally:
        distributed.finish(world)
    return Path(config.save_path)


@contextlib.contextmanager
def _held_folders(config: TrainingConfig, world: distributed.World) -> Iterator[None]:
    """--save_path (and a --cache_dir elsewhere) for this run alone: a second run there stops at once."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(distributed.main_holds(world, config.save_path, "--save_path"))
        elsewhere = config.cache.folder and Path(config.cache.folder).resolve() != Path(config.save_path).resolve()
        if elsewhere and config.cache.enabled:
            stack.enter_context(distributed.main_holds(world, config.cache.folder, "--cache_dir"))
        yield


def _train(config: TrainingConfig, world: distributed.World, device: torch.device) -> None:
    if world.distributed and not config.cache.enabled:
        raise AnomalyCLIPError("--no_cache trains in one process: run it with python, not torchrun "
                               "(under torchrun the ranks share the caching pass)")
    distributed.together(world, lambda: _check_save_path(config))
    config = distributed.together(world, lambda: resumed_config(config))
    setup_seed(config.model.seed)
    configure_threads(config.model.threads)
    config = replaced(config, loader=replaced(config.loader, num_workers=resolve_num_workers(config.loader.num_workers,
                                                                                              device)))
    logger = get_logger(config.save_path, "anomalyclip.train", main_process=world.is_main)
    if world.is_main:
        remove_leftovers(config.save_path, "epoch_*.pth")  # of a run killed while saving
    train_data, model, prompt_learner, checkpoint = distributed.together(world, lambda: _prepare(config, device))
    optimizer = make_optimizer(prompt_learner, config.learning_rate)
    first_epoch = _resume(checkpoint, optimizer, config, logger)
    if first_epoch > config.epoch:
        logger.info("nothing to do: %s already holds epoch %d of %d", config.resume, first_epoch - 1, config.epoch)
        return
    epochs = range(first_epoch, config.epoch + 1)
    logger.info("training on %d images of %s (%s) on %s, epochs %d..%d", len(train_data),
                config.train_data_path, ", ".join(train_data.class_names), device, first_epoch, config.epoch)
    prompt_learner.train()
    if not config.cache.enabled:
        forwards = _train_uncached(config, model, prompt_learner, optimizer, train_data, device, epochs, logger)
        logger.info("frozen image forwards: %d", forwards)
        return
    cache, built = _feature_cache(config, world, model, train_data, device, logger)
    if not world.is_main:
        return  # rank 0 optimises alone from the gathered cache (see the README)
    try:
        logger.info("frozen image forwards: %d", len(train_data) if built else 0)
        _train_cached(config, model, prompt_learner, optimizer, cache, device, epochs, logger)
    finally:
        if cache.folder is not None and built and not config.cache.keep:
            feature_cache.remove(cache.folder)


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(argv))
    return 0

