"""Losses of SPEC §6 against values computed by hand (plain arithmetic, numbers written out)."""

import math

import pytest
import torch

from loss import BinaryDiceLoss, FocalLoss, anomalyclip_loss, layer_loss_parts

SMOOTH = 1e-5

# Two images of 1 x 2 pixels; per pixel (p_normal, p_anomaly, ground truth). Image 0's pixels
# are the mirror image of each other's classes, so a flatten that pairs a pixel's normal
# probability with another pixel's anomaly probability changes the loss.
PIXELS = [[(0.7, 0.3, 1), (0.4, 0.6, 0)], [(0.95, 0.05, 0), (0.2, 0.8, 1)]]


def _maps(pixels) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 2, 1, W)`` probabilities and ``(B, 1, W)`` masks of per-image pixel lists."""
    probs = torch.tensor([[[[p[c] for p in image]] for c in (0, 1)] for image in pixels], dtype=torch.float64)
    masks = torch.tensor([[[float(p[2]) for p in image]] for image in pixels], dtype=torch.float64)
    return probs, masks


def _focal_by_hand(pixels) -> float:
    """mean over pixels of -(1 - pt)^2 log pt, pt = p_target (1 - s) + p_other s + s (one-hot clamped to [s, 1-s])."""
    terms = []
    for image in pixels:
        for p_normal, p_anomaly, truth in image:
            p_target, p_other = (p_anomaly, p_normal) if truth else (p_normal, p_anomaly)
            pt = p_target * (1 - SMOOTH) + p_other * SMOOTH + SMOOTH
            terms.append(-((1 - pt) ** 2) * math.log(pt))
    return sum(terms) / len(terms)


def _dice_by_hand(probs: list[list[float]], truths: list[list[float]]) -> float:
    """1 - mean over images of (2 sum p g + 1) / (sum p + sum g + 1)."""
    ratios = [(2 * sum(p * g for p, g in zip(ps, gs)) + 1) / (sum(ps) + sum(gs) + 1) for ps, gs in zip(probs, truths)]
    return 1 - sum(ratios) / len(ratios)


def test_focal_loss_equals_the_hand_computation():
    probs, masks = _maps(PIXELS)
    loss = FocalLoss()(probs, masks)
    # pt of the four pixels: 0.3 + 1.4e-5, 0.4 + 1.2e-5, 0.95 + 1e-6, 0.8 + 4e-6.
    pts = [0.300014, 0.400012, 0.950001, 0.800004]
    written_out = sum(-((1 - pt) ** 2) * math.log(pt) for pt in pts) / 4
    assert written_out == pytest.approx(0.2321985728486236, abs=1e-15)
    assert _focal_by_hand(PIXELS) == pytest.approx(written_out, abs=1e-15)
    assert loss.item() == pytest.approx(written_out, rel=1e-12)
    # The mask may come as (B, 1, H, W) too (the loader's shape).
    assert FocalLoss()(probs, masks[:, None]).item() == pytest.approx(written_out, rel=1e-12)


def test_focal_loss_of_a_certain_right_answer_is_nearly_zero_and_of_a_wrong_one_large():
    right, masks = _maps([[(1.0, 0.0, 0), (0.0, 1.0, 1)]])
    # pt = 1 (1 - s) + 0 s + s = 1: (1 - 1)^2 log 1 = 0.
    assert FocalLoss()(right, masks).item() == pytest.approx(0.0, abs=1e-12)
    wrong, masks = _maps([[(0.0, 1.0, 0), (1.0, 0.0, 1)]])
    # pt = 0 (1 - s) + 1 s + s = 2e-5: -(1 - 2e-5)^2 log(2e-5)
    assert FocalLoss()(wrong, masks).item() == pytest.approx(-((1 - 2e-5) ** 2) * math.log(2e-5), rel=1e-12)


def test_dice_loss_equals_the_hand_computation():
    probs = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[0.5, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    # image 0: (2 * 1.5 + 1) / (1.75 + 2 + 1) = 4 / 4.75; image 1: (2 * 0 + 1) / (0.5 + 1 + 1) = 1 / 2.5
    expected = 1 - (4 / 4.75 + 1 / 2.5) / 2
    assert expected == pytest.approx(0.37894736842105264, abs=1e-15)
    assert BinaryDiceLoss()(probs, target).item() == pytest.approx(expected, rel=1e-12)
    assert _dice_by_hand([[0.5, 1.0, 0.0, 0.25], [0.5, 0, 0, 0]], [[1, 1, 0, 0], [0, 0, 0, 1]]) == pytest.approx(
        expected, abs=1e-15)


def test_layer_parts_are_focal_and_both_dice_terms_by_hand():
    probs, masks = _maps(PIXELS)
    parts = layer_loss_parts(probs, masks)
    anomaly = [[p[1] for p in image] for image in PIXELS]
    normal = [[p[0] for p in image] for image in PIXELS]
    truths = [[p[2] for p in image] for image in PIXELS]
    assert parts["focal"].item() == pytest.approx(_focal_by_hand(PIXELS), rel=1e-12)
    # anomaly: image 0 (2 * 0.3 + 1) / (0.9 + 1 + 1), image 1 (2 * 0.8 + 1) / (0.85 + 1 + 1)
    assert parts["dice_anomaly"].item() == pytest.approx(1 - (1.6 / 2.9 + 2.6 / 2.85) / 2, rel=1e-12)
    assert _dice_by_hand(anomaly, truths) == pytest.approx(1 - (1.6 / 2.9 + 2.6 / 2.85) / 2, abs=1e-15)
    # normal against 1 - gt: image 0 (2 * 0.4 + 1) / (1.1 + 1 + 1), image 1 (2 * 0.95 + 1) / (1.15 + 1 + 1)
    assert parts["dice_normal"].item() == pytest.approx(1 - (1.8 / 3.1 + 2.9 / 3.15) / 2, rel=1e-12)
    assert _dice_by_hand(normal, [[1 - g for g in gs] for gs in truths]) == pytest.approx(
        1 - (1.8 / 3.1 + 2.9 / 3.15) / 2, abs=1e-15)


def test_whole_objective_by_hand():
    """total = 4 * sum over layers (focal + dice_anomaly + dice_normal) + CE of the image logits."""
    second_layer = [[(0.5, 0.5, 1), (0.9, 0.1, 0)], [(0.6, 0.4, 0), (0.1, 0.9, 1)]]
    layers = [PIXELS, second_layer]
    maps = [_maps(pixels)[0] for pixels in layers]
    masks = _maps(PIXELS)[1]  # (B, H, W) = (2, 1, 2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    terms = anomalyclip_loss(logits, maps, labels, masks)

    # CE: image 0 -log(e^2 / (e^2 + 1)) = log(1 + e^-2); image 1 log(1 + e^-1).
    image_loss = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert image_loss == pytest.approx((0.1269280110429726 + 0.31326168751822286) / 2, abs=1e-15)
    local = 0.0
    for pixels in layers:
        truths = [[p[2] for p in image] for image in pixels]
        local += (_focal_by_hand(pixels) + _dice_by_hand([[p[1] for p in image] for image in pixels], truths)
                  + _dice_by_hand([[p[0] for p in image] for image in pixels], [[1 - g for g in gs] for gs in truths]))
    local *= 4
    assert terms.image.item() == pytest.approx(image_loss, rel=1e-12)
    assert terms.local.item() == pytest.approx(local, rel=1e-12)
    assert terms.total.item() == pytest.approx(local + image_loss, rel=1e-12)
    assert anomalyclip_loss(logits, maps, labels, masks, local_weight=1.0).local.item() == pytest.approx(
        local / 4, rel=1e-12)


def test_objective_gradients_reach_the_maps_and_logits():
    probs = _maps(PIXELS)[0].requires_grad_()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    anomalyclip_loss(logits, [probs], torch.tensor([0, 1]), _maps(PIXELS)[1]).total.backward()
    # d CE / d logits = (softmax - onehot) / B: image 0 softmax (e^2, 1) / (e^2 + 1), label 0.
    e2 = math.exp(2)
    assert logits.grad[0, 0].item() == pytest.approx((e2 / (e2 + 1) - 1) / 2, rel=1e-12)
    assert probs.grad is not None and bool(torch.all(torch.isfinite(probs.grad)))
