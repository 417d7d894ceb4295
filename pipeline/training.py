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

import argparse
import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.constants import DPAM_LAYER
from AnomalyCLIP_lib.model import CLIP
from pipeline import distributed
from pipeline import feature_cache
from pipeline.atomic import atomic_torch_save, remove_leftovers
from dataset import AnomalyDataset, loader_batches
from pipeline.feature_cache import CacheShapes, FeatureCache
from loss import LossTerms, anomalyclip_loss
from prompt_ensemble import AnomalyCLIP_PromptLearner
from pipeline.cli import check_output_folder
from pipeline.cli import add_loader_args, add_model_args, cli_parser, check_args, run_cli
from utils import get_logger, setup_seed
from pipeline.loading import load_model_and_prompts, resolve_device, resolve_num_workers

ADAM_BETAS = (0.5, 0.999)


@dataclass
class CachedBatch:
    """The frozen features of a batch of images, on the CPU, keyed by dataset index."""

    indices: list[int]
    embedding: np.ndarray
    patch_tokens: list[np.ndarray]
    masks: np.ndarray
    labels: np.ndarray


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_parser("Train AnomalyCLIP prompts on an auxiliary dataset.")
    parser.add_argument("--train_data_path", default="./data/visa", help="dataset root holding meta.json")
    parser.add_argument("--save_path", default="./checkpoint", help="folder for epoch_N.pth and log.txt")
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
    args = parser.parse_args(argv)
    check_args(args, at_least_one=("epoch", "print_freq", "save_freq"), more=_check_train_flags)
    return args


def _check_train_flags(args: argparse.Namespace) -> None:
    if args.no_cache and (args.keep_cache or args.cache_dir):
        raise AnomalyCLIPError("--no_cache cannot be combined with --keep_cache or --cache_dir: drop one")
    if not (math.isfinite(args.cache_memory_gb) and args.cache_memory_gb >= 0):
        raise AnomalyCLIPError(f"--cache_memory_gb {args.cache_memory_gb} must be >= 0 (0 keeps the cache on disk)")
    if args.cache_dir:
        check_output_folder(args.cache_dir, "--cache_dir")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise AnomalyCLIPError(f"--learning_rate {args.learning_rate} must be a positive number (released: 0.001)")


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


def _checkpoint(prompt_learner, optimizer, epoch: int, args: argparse.Namespace) -> dict[str, object]:
    config = {key: value for key, value in vars(args).items() if isinstance(value, (int, float, str, list, type(None)))}
    return {
        "prompt_learner": {key: value.cpu() for key, value in prompt_learner.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "config": config,
    }


# Flags a resumed run may change; each is applied for real (the learning rate in the optimizer too).
RESUMABLE_FLAGS = ("learning_rate", "epoch", "batch_size", "seed", "features_list", "feature_map_layer", "image_size",
                   "train_data_path", "backbone", "image_loss_only", "reference_arithmetic")


def _resume(checkpoint: dict[str, object] | None, optimizer: torch.optim.Optimizer, args, logger) -> int:
    """Restore the optimizer from our checkpoint; returns the first epoch still to train."""
    if checkpoint is None or "optimizer" not in checkpoint:
        return 1
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as exc:
        raise AnomalyCLIPError(f"--resume {args.resume}: its optimizer state does not fit ({exc})") from None
    saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    changed = [f"--{name} {saved[name]} -> {getattr(args, name)}" for name in RESUMABLE_FLAGS
               if name in saved and saved[name] != getattr(args, name)]
    if changed:
        logger.info("resuming %s with flags that differ from its config, applied: %s", args.resume, "; ".join(changed))
    for group in optimizer.param_groups:
        group["lr"] = args.learning_rate
    return int(checkpoint.get("epoch", 0)) + 1


def _check_save_path(args) -> None:
    """Refuse to replace another run's checkpoints without being asked to, or a user's files in --cache_dir."""
    if not args.no_cache:
        feature_cache.check_folder(_cache_folder(args))
    existing = sorted(Path(args.save_path).glob("epoch_*.pth"))
    if existing and not (args.resume or args.overwrite):
        raise AnomalyCLIPError(f"{args.save_path} already holds checkpoints of another run ({existing[0].name}...): "
                               "choose another --save_path, continue it with --resume, or replace it with --overwrite")


def _check_masks(data: AnomalyDataset, args) -> None:
    """Anomalous images without masks would teach the local loss that their defects are normal."""
    availability = data.availability()
    if not availability.n_anomalous:
        raise AnomalyCLIPError(f"{args.train_data_path} holds no anomalous images, and the prompts learn from "
                               "normal and anomalous ones: train on an auxiliary dataset with defects (MVTec AD, VisA)")
    unmasked = availability.n_anomalous - availability.n_masked
    if unmasked and not args.image_loss_only:
        raise AnomalyCLIPError(f"{unmasked} of the {availability.n_anomalous} anomalous training images in "
                               f"{args.train_data_path} have no mask, so the local loss would learn their defects "
                               "as normal: give masks, or train with the image loss alone (--image_loss_only)")


def _loader(train_data: AnomalyDataset, args, device: torch.device) -> DataLoader:
    return DataLoader(
        train_data,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
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


def _encoded_batches(model: CLIP, data: AnomalyDataset, indices: Sequence[int], args, device: torch.device
                     ) -> Iterator[CachedBatch]:
    """The frozen features of the items ``indices`` of ``data``, one batch at a time, as CPU arrays."""
    loader = DataLoader(Subset(data, list(indices)), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    position = 0
    with loader_batches(loader) as batches:
        for batch in batches:
            with torch.no_grad():
                embedding, tokens = model.encode_image(batch["img"].to(device, non_blocking=True), args.features_list,
                                                       DPAM_LAYER, args.reference_arithmetic)
            count = len(embedding)
            yield CachedBatch(indices=list(indices[position:position + count]),
                              embedding=embedding.float().cpu().numpy(),
                              patch_tokens=[t.float().cpu().numpy() for t in tokens],
                              masks=batch["img_mask"].reshape(count, *batch["img_mask"].shape[-2:]).numpy()
                              .astype(np.uint8),
                              labels=batch["anomaly"].numpy().astype(np.int64))
            position += count


def _cache_folder(args) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path(args.save_path) / "feature_cache"


def _build_cache(args, world: distributed.World, model: CLIP, data: AnomalyDataset, device: torch.device,
                 folder: Path, key: dict | None, logger) -> FeatureCache | None:
    """Encode every image once; shards over the ranks, everything lands in rank 0's cache."""
    if world.is_main:
        feature_cache.remove(folder)  # a stale or half-written cache of ours; the manifest goes first
    shard = world.shard(len(data))
    batches = _encoded_batches(model, data, shard, args, device)
    holder: list[FeatureCache] = []
    progress = tqdm(total=len(data), desc="caching features", unit="img", disable=not world.is_main)

    def store(part: CachedBatch) -> None:
        if not holder:
            holder.append(_new_cache(args, len(data), part, folder, logger))
        holder[0].put(part.indices, part.embedding, part.patch_tokens, part.masks, part.labels)
        progress.update(len(part.indices))

    # A failure on rank 0 while storing (a full disk) travels in the next round's exchange, or in
    # the final check after the last round, so that every rank stops with it.
    storing_error: str | None = None
    try:
        for local, error in distributed.lockstep(world, batches, world.rounds(len(data), args.batch_size)):
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


def _new_cache(args, n_images: int, first: CachedBatch, folder: Path, logger) -> FeatureCache:
    shapes = CacheShapes(n_images, first.embedding.shape[-1], tuple(t.shape[1:] for t in first.patch_tokens),
                         args.image_size)
    size = feature_cache.format_bytes(shapes.nbytes())
    if not args.keep_cache and feature_cache.fits_in_memory(shapes, args.cache_memory_gb):
        logger.info("caching frozen features in memory (%s, budget %g GiB)", size, args.cache_memory_gb)
        return FeatureCache.in_memory(shapes)
    reason = "--keep_cache" if args.keep_cache else f"over the --cache_memory_gb {args.cache_memory_gb:g} budget"
    logger.info("caching frozen features on disk in %s (%s, %s)", folder, size, reason)
    return FeatureCache.on_disk(shapes, folder)


def _feature_cache(args, world: distributed.World, model: CLIP, data: AnomalyDataset, device: torch.device,
                   logger) -> tuple[FeatureCache | None, bool]:
    """Rank 0's cache (reused or built) and whether this run built it; other ranks get ``None``."""
    folder = _cache_folder(args)
    key, existing = None, None
    if world.is_main:
        key = feature_cache.cache_key(args.backbone, args.train_data_path, args.image_size, args.features_list,
                                      DPAM_LAYER, bool(args.reference_arithmetic))
        existing, why_not = feature_cache.reusable(folder, key)
        if why_not:
            logger.info("%s; rebuilding it", why_not)
    if distributed.broadcast_from_main(world, existing is not None):
        if existing is not None:
            logger.info("reusing the feature cache in %s (made with the same backbone, image size, features list "
                        "and meta.json)", folder)
        return existing, False
    return _build_cache(args, world, model, data, device, folder, key, logger), True


def _check_epoch_losses(epoch: int, local_losses: list[float], image_losses: list[float]) -> None:
    if not all(math.isfinite(value) for value in local_losses + image_losses):
        raise AnomalyCLIPError(f"training diverged at epoch {epoch} (non-finite loss); lower --learning_rate")


def _end_epoch(epoch: int, args, prompt_learner, optimizer, local_losses, image_losses, logger) -> None:
    _check_epoch_losses(epoch, local_losses, image_losses)
    if epoch % args.print_freq == 0:
        logger.info("epoch [%d/%d], loss:%.4f, image_loss:%.4f", epoch, args.epoch,
                    np.mean(local_losses), np.mean(image_losses))
    if epoch % args.save_freq == 0 or epoch == args.epoch:
        atomic_torch_save(_checkpoint(prompt_learner, optimizer, epoch, args),
                          Path(args.save_path) / f"epoch_{epoch}.pth")


def _train_uncached(args, model, prompt_learner, optimizer, data, device, epochs: range, logger) -> int:
    """Today's trainer: the frozen forward in every step. Returns the number of image forwards."""
    loader = _loader(data, args, device)
    forwards = 0
    for epoch in epochs:
        _seed_epoch(loader, args.seed, epoch)
        local_losses, image_losses = [], []
        with loader_batches(loader) as batches:
            for batch in tqdm(batches, total=len(loader), desc=f"epoch {epoch}/{args.epoch}", unit="step",
                              leave=False):
                terms = train_step(model, prompt_learner, optimizer, batch["img"].to(device), batch["anomaly"],
                                   batch["img_mask"].to(device), args.features_list, args.feature_map_layer[0],
                                   args.image_loss_only, args.reference_arithmetic)
                forwards += len(batch["img"])
                local_losses.append(terms.local.item())
                image_losses.append(terms.image.item())
        _end_epoch(epoch, args, prompt_learner, optimizer, local_losses, image_losses, logger)
    return forwards


def _train_cached(args, model, prompt_learner, optimizer, cache: FeatureCache, device, epochs: range, logger) -> None:
    """The same steps as :func:`_train_uncached`, from the cached features."""
    order = _index_loader(cache.shapes.n_images, args.batch_size)
    for epoch in epochs:
        _seed_epoch(order, args.seed, epoch)
        local_losses, image_losses = [], []
        for indices in tqdm(order, desc=f"epoch {epoch}/{args.epoch}", unit="step", leave=False):
            embedding, tokens, labels, masks = cache.batch(indices.numpy(), device)
            terms = prompt_step(model, prompt_learner, optimizer, embedding, tokens, labels, masks, args.image_size,
                                args.feature_map_layer[0], args.image_loss_only)
            local_losses.append(terms.local.item())
            image_losses.append(terms.image.item())
        _end_epoch(epoch, args, prompt_learner, optimizer, local_losses, image_losses, logger)


def _prepare(args, device: torch.device):
    train_data = AnomalyDataset(args.train_data_path, image_size=args.image_size, split="test")
    _check_masks(train_data, args)
    model, prompt_learner, checkpoint = load_model_and_prompts(args, device, args.resume)
    return train_data, model, prompt_learner, checkpoint


def train(args: argparse.Namespace) -> Path:
    """Run training; returns the folder holding the checkpoints."""
    world, device = distributed.setup(args.device, resolve_device)
    try:
        with _held_folders(args, world):
            _train(args, world, device)
    finally:
        distributed.finish(world)
    return Path(args.save_path)


@contextlib.contextmanager
def _held_folders(args: argparse.Namespace, world: distributed.World) -> Iterator[None]:
    """--save_path (and a --cache_dir elsewhere) for this run alone: a second run there stops at once."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(distributed.main_holds(world, args.save_path, "--save_path"))
        if args.cache_dir and not args.no_cache and Path(args.cache_dir).resolve() != Path(args.save_path).resolve():
            stack.enter_context(distributed.main_holds(world, args.cache_dir, "--cache_dir"))
        yield


def _train(args: argparse.Namespace, world: distributed.World, device: torch.device) -> None:
    if world.distributed and args.no_cache:
        raise AnomalyCLIPError("--no_cache trains in one process: run it with python, not torchrun "
                               "(under torchrun the ranks share the caching pass)")
    distributed.together(world, lambda: _check_save_path(args))
    setup_seed(args.seed)
    args.num_workers = resolve_num_workers(args.num_workers, device)
    logger = get_logger(args.save_path, "anomalyclip.train", main_process=world.is_main)
    if world.is_main:
        remove_leftovers(args.save_path, "epoch_*.pth")  # of a run killed while saving
    train_data, model, prompt_learner, checkpoint = distributed.together(world, lambda: _prepare(args, device))
    optimizer = make_optimizer(prompt_learner, args.learning_rate)
    first_epoch = _resume(checkpoint, optimizer, args, logger)
    if first_epoch > args.epoch:
        logger.info("nothing to do: %s already holds epoch %d of %d", args.resume, first_epoch - 1, args.epoch)
        return
    epochs = range(first_epoch, args.epoch + 1)
    logger.info("training on %d images of %s (%s) on %s, epochs %d..%d", len(train_data),
                args.train_data_path, ", ".join(train_data.class_names), device, first_epoch, args.epoch)
    prompt_learner.train()
    if args.no_cache:
        forwards = _train_uncached(args, model, prompt_learner, optimizer, train_data, device, epochs, logger)
        logger.info("frozen image forwards: %d", forwards)
        return
    cache, built = _feature_cache(args, world, model, train_data, device, logger)
    if not world.is_main:
        return  # rank 0 optimises alone from the gathered cache (see the README)
    try:
        logger.info("frozen image forwards: %d", len(train_data) if built else 0)
        _train_cached(args, model, prompt_learner, optimizer, cache, device, epochs, logger)
    finally:
        if cache.folder is not None and built and not args.keep_cache:
            feature_cache.remove(cache.folder)


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
