"""Learn AnomalyCLIP's object-agnostic prompts on an auxiliary dataset (SPEC §6).

Example::

    python train.py --dataset mvtec --train_data_path ./data/mvtec \
        --save_path ./checkpoints/9_12_4_multiscale_visa --features_list 24 --epoch 15

Trains on the auxiliary dataset's TEST split (it has masks), all classes, shuffled. Every
``--save_freq`` epochs ``save_path/epoch_{n}.pth`` is written atomically; it holds
``{"prompt_learner": ...}`` (what the original code reads) plus our optimizer state, epoch and
config, so ``--resume`` continues exactly where training stopped.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from AnomalyCLIP_lib import scoring
from AnomalyCLIP_lib.errors import AnomalyCLIPError
from AnomalyCLIP_lib.model import CLIP
from dataset import AnomalyDataset
from distributed import several_processes
from loss import LossTerms, anomalyclip_loss
from prompt_ensemble import AnomalyCLIP_PromptLearner
from utils import (DPAM_LAYER, add_loader_args, add_model_args, atomic_torch_save, get_logger,
                   load_model_and_prompts, resolve_device, resolve_num_workers, run_cli, setup_seed)

ADAM_BETAS = (0.5, 0.999)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train AnomalyCLIP prompts on an auxiliary dataset.")
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
    args = parser.parse_args(argv)
    for name in ("epoch", "batch_size", "print_freq", "save_freq", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error("--num_workers must be >= 0")
    return args


def train_step(
    model: CLIP,
    prompt_learner: AnomalyCLIP_PromptLearner,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    features_list: Sequence[int],
    feature_map_layer: int = 0,
) -> LossTerms:
    """One optimisation step of the prompt learner (SPEC §6): frozen image forward, then :func:`prompt_step`.

    Args:
        images: ``(B, 3, S, S)`` preprocessed images on the model's device.
        labels: ``(B,)`` image labels.
        masks: ``(B, S, S)`` or ``(B, 1, S, S)`` binary ground-truth masks.
    """
    with torch.no_grad():
        image_embedding, patch_tokens = model.encode_image(images, features_list, DPAM_LAYER)
    return prompt_step(model, prompt_learner, optimizer, image_embedding, patch_tokens, labels, masks,
                       images.shape[-1], feature_map_layer)


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
) -> LossTerms:
    """The learnable part of a step: text features, loss, backward and Adam update.

    Args:
        image_embedding: ``(B, D)`` image embeddings (constants; normalised here).
        patch_tokens: Per-layer ``(B, 1 + g*g, D)`` patch tokens (constants).
        image_size: Side S of the ground-truth masks and maps.

    Returns:
        The loss terms, detached.
    """
    text_feats = scoring.text_features(model, prompt_learner)
    logits = scoring.image_logits(image_embedding, text_feats)
    maps = scoring.similarity_maps(patch_tokens, text_feats, image_size, feature_map_layer)
    gt = masks.reshape(masks.shape[0], *masks.shape[-2:]).to(maps[0].dtype)
    terms = anomalyclip_loss(logits, maps, labels.to(logits.device), gt)
    optimizer.zero_grad()
    terms.total.backward()
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


def _resume(checkpoint: dict[str, object] | None, optimizer: torch.optim.Optimizer, args) -> int:
    """Restore the optimizer from our checkpoint; returns the first epoch still to train."""
    if checkpoint is None or "optimizer" not in checkpoint:
        return 1
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as exc:
        raise AnomalyCLIPError(f"--resume {args.resume}: its optimizer state does not fit ({exc})") from None
    return int(checkpoint.get("epoch", 0)) + 1


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


def train(args: argparse.Namespace) -> Path:
    """Run training; returns the folder holding the checkpoints."""
    if several_processes():
        # Not yet sharded: K processes would train the same prompts and race on epoch_N.pth.
        raise AnomalyCLIPError("train.py runs in one process for now; run it with python, not torchrun "
                               "(test.py does run under torchrun)")
    setup_seed(args.seed)
    device = resolve_device(args.device)
    args.num_workers = resolve_num_workers(args.num_workers, device)
    save_path = Path(args.save_path)
    logger = get_logger(save_path, "anomalyclip.train")
    train_data = AnomalyDataset(args.train_data_path, image_size=args.image_size, split="test")
    model, prompt_learner, checkpoint = load_model_and_prompts(args, device, args.resume)
    optimizer = make_optimizer(prompt_learner, args.learning_rate)
    first_epoch = _resume(checkpoint, optimizer, args)
    if first_epoch > args.epoch:
        logger.info("nothing to do: %s already holds epoch %d of %d", args.resume, first_epoch - 1, args.epoch)
        return save_path
    loader = _loader(train_data, args, device)
    logger.info("training on %d images of %s (%s) on %s, epochs %d..%d", len(train_data),
                args.train_data_path, ", ".join(train_data.class_names), device, first_epoch, args.epoch)
    prompt_learner.train()
    for epoch in range(first_epoch, args.epoch + 1):
        # Seeding each epoch's shuffle from (seed, epoch) makes a resumed run equal an unbroken one.
        loader.generator.manual_seed(args.seed * 100_003 + epoch)
        local_losses, image_losses = [], []
        for batch in tqdm(loader, desc=f"epoch {epoch}/{args.epoch}", leave=False):
            terms = train_step(model, prompt_learner, optimizer, batch["img"].to(device), batch["anomaly"],
                               batch["img_mask"].to(device), args.features_list, args.feature_map_layer[0])
            local_losses.append(terms.local.item())
            image_losses.append(terms.image.item())
        if not all(math.isfinite(value) for value in local_losses + image_losses):
            raise AnomalyCLIPError(f"training diverged at epoch {epoch} (non-finite loss); lower --learning_rate")
        if epoch % args.print_freq == 0:
            logger.info("epoch [%d/%d], loss:%.4f, image_loss:%.4f", epoch, args.epoch,
                        np.mean(local_losses), np.mean(image_losses))
        if epoch % args.save_freq == 0 or epoch == args.epoch:
            atomic_torch_save(_checkpoint(prompt_learner, optimizer, epoch, args), save_path / f"epoch_{epoch}.pth")
    return save_path


def main(argv: Sequence[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
