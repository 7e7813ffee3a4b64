"""The reference networks: a 2.5D lung-nodule detector and a head-CT hemorrhage slice classifier.

Detector: a small strided backbone (C3 stride 4, C4 stride 8, C5 stride 16), a top-down FPN, SE + CBAM
attention fused as ``x * (se(x) + cbam(x))`` and an anchor-free head (FCOS-like: one objectness logit and
four box distances per location). ``forward_export`` takes the UINT8 image, scales it, decodes the boxes
and keeps the top 100 locations, which is the ONNX contract the worker relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias
from torch import nn

TOPK = 100
DETECTOR_VARIANTS = ("full", "single-scale", "no-attention")


def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    """Conv + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def sep_conv(c: int) -> nn.Sequential:
    """Depthwise-separable 3x3 conv: the high-resolution levels can afford nothing heavier on a CPU."""
    return nn.Sequential(
        nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False),
        nn.BatchNorm2d(c),
        nn.Conv2d(c, c, 1, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
    )


class SEBlock(nn.Module):
    """Squeeze-and-excitation: returns per-channel weights in (0, 1), shape [N, C, 1, 1]."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(c // r, 4), 1)
        self.fc2 = nn.Conv2d(max(c // r, 4), c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class CBAM(nn.Module):
    """CBAM as a weight map: channel attention (avg+max pooled MLP) times spatial attention (7x7 conv)."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(c, max(c // r, 4), 1), nn.ReLU(), nn.Conv2d(max(c // r, 4), c, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ch = torch.sigmoid(
            self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        )
        xc = x * ch
        sp = torch.sigmoid(self.spatial(torch.cat([xc.mean(1, keepdim=True), xc.amax(1, keepdim=True)], 1)))
        return ch * sp


class AttentionFusion(nn.Module):
    """Dual attention from the design notes: ``x * (se(x) + cbam(x))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.se = SEBlock(c)
        self.cbam = CBAM(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.se(x) + self.cbam(x))


class NoduleDetector(nn.Module):
    """FPN + attention anchor-free detector; ``variant`` switches the ablation arms."""

    def __init__(self, variant: str = "full", in_ch: int = 3, fpn_ch: int = 32) -> None:
        super().__init__()
        if variant not in DETECTOR_VARIANTS:
            raise ValueError(f"unknown detector variant {variant!r}; expected one of {DETECTOR_VARIANTS}")
        self.variant = variant
        self.multi_scale = variant != "single-scale"
        self.attention = variant != "no-attention"
        self.stem = conv_bn(in_ch, 12, 2)  # stride 2
        self.c3 = nn.Sequential(conv_bn(12, 24, 2), sep_conv(24))  # stride 4
        self.c4 = nn.Sequential(conv_bn(24, 48, 2), conv_bn(48, 48))  # stride 8
        self.c5 = nn.Sequential(conv_bn(48, 96, 2), conv_bn(96, 96))  # stride 16
        self.lat5 = nn.Conv2d(96, fpn_ch, 1)
        if self.multi_scale:
            self.lat4 = nn.Conv2d(48, fpn_ch, 1)
            self.lat3 = nn.Conv2d(24, fpn_ch, 1)
        self.stride = 4 if self.multi_scale else 16
        self.att = AttentionFusion(fpn_ch) if self.attention else nn.Identity()
        self.tower = nn.Sequential(sep_conv(fpn_ch), sep_conv(fpn_ch))
        self.obj = nn.Conv2d(fpn_ch, 1, 1)
        self.box = nn.Conv2d(fpn_ch, 4, 1)
        # Objectness starts at a 1% prior (RetinaNet) so the focal loss does not drown in easy negatives.
        nn.init.constant_(self.obj.bias, -4.6)
        nn.init.zeros_(self.box.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float image in [0, 1] -> (objectness logits [N,1,h,w], box distances in pixels [N,4,h,w])."""
        x = (x - 0.5) / 0.25
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        p = self.lat5(c5)  # P5 = conv(C5)
        if self.multi_scale:
            # Top-down: the notes' pseudo-code writes ``P4 = P5 + up(conv(C4))``; shapes only agree when the
            # coarser map is the one upsampled, so P4 = up(P5) + conv(C4) and P3 = up(P4) + conv(C3).
            p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lat4(c4)
            p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.lat3(c3)
        f = self.tower(self.att(p))
        dist = torch.exp(self.box(f).clamp(max=6.0)) * self.stride
        return self.obj(f), dist

    def decode(self, obj: torch.Tensor, dist: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Objectness and distances -> [N, h*w, 5] boxes (x1, y1, x2, y2, score) in input pixels."""
        n, _, h, w = obj.shape
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) * self.stride
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * self.stride
        cy = ys.view(1, h, 1).expand(1, h, w).reshape(1, h * w)
        cx = xs.view(1, 1, w).expand(1, h, w).reshape(1, h * w)
        d = dist.reshape(n, 4, h * w)
        x1 = (cx - d[:, 0]).clamp(0.0, float(size[1]))
        y1 = (cy - d[:, 1]).clamp(0.0, float(size[0]))
        x2 = (cx + d[:, 2]).clamp(0.0, float(size[1]))
        y2 = (cy + d[:, 3]).clamp(0.0, float(size[0]))
        score = torch.sigmoid(obj.reshape(n, h * w))
        return torch.stack([x1, y1, x2, y2, score], dim=2)

    def forward_export(self, image: torch.Tensor) -> torch.Tensor:
        """UINT8 [N, 3, H, W] -> detections [N, 100, 5] sorted by score, descending."""
        x = image.to(torch.float32) / 255.0
        obj, dist = self.forward(x)
        dets = self.decode(obj, dist, (x.shape[2], x.shape[3]))
        _, idx = torch.topk(dets[:, :, 4], TOPK, dim=1)
        return torch.gather(dets, 1, idx.unsqueeze(2).expand(-1, -1, 5))


class HemorrhageClassifier(nn.Module):
    """Slice-level classifier: a small CNN with SE attention, global average+max pooling and a logit."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16, 2),  # 128
            conv_bn(16, 24, 2),  # 64
            conv_bn(24, 32, 2),  # 32
            conv_bn(32, 32),
            conv_bn(32, 64, 2),  # 16
            conv_bn(64, 64),
        )
        self.se = SEBlock(64)
        self.fc = nn.Linear(128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float image in [0, 1] [N, 1, H, W] -> logit [N, 1]."""
        f = self.features((x - 0.5) / 0.25)
        f = f * self.se(f)
        # Max pooling keeps a small bleed from being averaged away over the whole slice.
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        return self.fc(pooled)

    def forward_export(self, image: torch.Tensor) -> torch.Tensor:
        """UINT8 [N, 1, 256, 256] -> probability [N, 1]."""
        return torch.sigmoid(self.forward(image.to(torch.float32) / 255.0))


class ExportWrapper(nn.Module):
    """Exposes ``forward_export`` as ``forward`` for torch.onnx."""

    def __init__(self, net: NoduleDetector | HemorrhageClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.forward_export(image)
