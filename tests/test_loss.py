"""Losses of SPEC §6 against hand computations."""

import torch
import torch.nn.functional as F

from loss import BinaryDiceLoss, FocalLoss, anomalyclip_loss, layer_loss_parts


def test_focal_loss_formula():
    probs = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]]]])  # (B=1, C=2, 1, 2)
    target = torch.tensor([[[0.0, 1.0]]])
    loss = FocalLoss()(probs, target)
    onehot = torch.tensor([[1 - 1e-5, 1e-5], [1e-5, 1 - 1e-5]])
    p = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    pt = (onehot * p).sum(1) + 1e-5
    expected = (-(1 - pt) ** 2 * pt.log()).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.item() < FocalLoss()(probs.flip(1), target).item()


def test_dice_loss_formula():
    probs = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    loss = BinaryDiceLoss()(probs, target)
    first = (2 * 1.5 + 1) / (1.75 + 2 + 1)
    second = 1.0
    torch.testing.assert_close(loss, torch.tensor(1 - (first + second) / 2))


def test_whole_objective_combines_terms():
    torch.manual_seed(0)
    logits = torch.randn(3, 2)
    maps = [torch.randn(3, 2, 8, 8).softmax(1) for _ in range(2)]
    labels = torch.tensor([0, 1, 1])
    gt = (torch.rand(3, 8, 8) > 0.7).float()
    terms = anomalyclip_loss(logits, maps, labels, gt)
    local = sum(sum(layer_loss_parts(m, gt).values()) for m in maps) * 4
    torch.testing.assert_close(terms.local, local)
    torch.testing.assert_close(terms.image, F.cross_entropy(logits, labels))
    torch.testing.assert_close(terms.total, local + F.cross_entropy(logits, labels))
    parts = layer_loss_parts(maps[0], gt)
    torch.testing.assert_close(parts["dice_normal"], BinaryDiceLoss()(maps[0][:, 0], 1 - gt))
