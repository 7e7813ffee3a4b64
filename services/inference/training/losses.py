"""Focal loss (objectness) and DIoU loss (boxes), and the anchor-free target assignment."""

from __future__ import annotations

import numpy as np
import torch


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), summed over the valid locations."""
    p = torch.sigmoid(logits)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce * valid).sum()


def diou_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Summed 1 - DIoU of [K, 4] boxes (x1, y1, x2, y2): IoU - (centre distance / enclosing diagonal)^2."""
    ix1, iy1 = torch.max(pred[:, 0], target[:, 0]), torch.max(pred[:, 1], target[:, 1])
    ix2, iy2 = torch.min(pred[:, 2], target[:, 2]), torch.min(pred[:, 3], target[:, 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    iou = inter / (area_p + area_t - inter + eps)
    cpx, cpy = (pred[:, 0] + pred[:, 2]) / 2, (pred[:, 1] + pred[:, 3]) / 2
    ctx, cty = (target[:, 0] + target[:, 2]) / 2, (target[:, 1] + target[:, 3]) / 2
    ex1, ey1 = torch.min(pred[:, 0], target[:, 0]), torch.min(pred[:, 1], target[:, 1])
    ex2, ey2 = torch.max(pred[:, 2], target[:, 2]), torch.max(pred[:, 3], target[:, 3])
    diag = (ex2 - ex1) ** 2 + (ey2 - ey1) ** 2
    diou = iou - ((cpx - ctx) ** 2 + (cpy - cty) ** 2) / (diag + eps)
    return (1 - diou).sum()


def assign(
    targets: list[np.ndarray], h: int, w: int, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per location: objectness target, validity (0 = ignored) and the box it regresses ([B, 4, h, w]).

    A location is positive when its centre lies within max(0.75 stride, half the box radius) of a positive
    box's centre (centre sampling); smaller boxes win overlaps. Locations on an ignore box (a nodule's thin
    end cap) are excluded from the objectness loss.
    """
    b = len(targets)
    obj = np.zeros((b, 1, h, w), np.float32)
    valid = np.ones((b, 1, h, w), np.float32)
    boxes = np.zeros((b, 4, h, w), np.float32)
    ys = (np.arange(h, dtype=np.float32) + 0.5) * stride
    xs = (np.arange(w, dtype=np.float32) + 0.5) * stride
    for i, t in enumerate(targets):
        order = np.argsort(-(t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]))  # large first: small ones overwrite
        for x1, y1, x2, y2, positive in t[order]:
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            if positive:
                r = max(0.75 * stride, 0.25 * min(x2 - x1, y2 - y1))
                my = np.abs(ys - cy) <= r
                mx = np.abs(xs - cx) <= r
                m = my[:, None] & mx[None, :]
                obj[i, 0][m] = 1.0
                valid[i, 0][m] = 1.0
                boxes[i, :, m] = np.array([x1, y1, x2, y2], np.float32)
            else:
                my = (ys >= y1 - stride / 2) & (ys <= y2 + stride / 2)
                mx = (xs >= x1 - stride / 2) & (xs <= x2 + stride / 2)
                m = my[:, None] & mx[None, :] & (obj[i, 0] == 0)
                valid[i, 0][m] = 0.0
    return obj, valid, boxes
