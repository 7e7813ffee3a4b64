"""Training and evaluation data from the project's synthetic phantoms (``lucerna.inference.synthetic``).

Seed ranges never overlap: training 1000+, held-out evaluation 500000+, INT8 calibration 900000+.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

CHEST_WINDOW = (-600.0, 1500.0)
BRAIN_WINDOW = (40.0, 80.0)
TRAIN_SEED, EVAL_SEED, CALIB_SEED = 1000, 500_000, 900_000
# A nodule's cross-section is a training positive where it is at least half the nodule's diameter; the
# thinner caps at either end are neither positive nor negative (ignored by the loss).
MIN_SECTION = 0.5


def _load_synthetic() -> ModuleType:
    """Import the generator by path: the training venv does not install the service package."""
    path = Path(__file__).resolve().parents[1] / "src" / "lucerna" / "inference" / "synthetic.py"
    spec = importlib.util.spec_from_file_location("lucerna_synthetic", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lucerna_synthetic"] = module
    spec.loader.exec_module(module)
    return module


synthetic = _load_synthetic()


@dataclass
class ChestScan:
    """A windowed chest volume with per-slice boxes: ``boxes[z]`` rows are (x1, y1, x2, y2, positive)."""

    image: np.ndarray  # uint8 [z, y, x]
    spacing: tuple[float, float, float]
    nodules: list  # synthetic.Nodule
    boxes: list[np.ndarray]
    lung_points: np.ndarray  # [k, 3] voxel indices inside the lung, for random crops
    nodule_slices: list[tuple[int, int, int]]  # (z, row in boxes[z], positive) for nodule-centred crops


def slice_boxes(nodules: list, spacing: tuple[float, float, float], n_slices: int) -> list[np.ndarray]:
    """Per slice, the nodules' cross-section boxes in pixels with a positive (1) or ignore (0) flag."""
    out: list[list[list[float]]] = [[] for _ in range(n_slices)]
    dz, py, px = spacing
    for n in nodules:
        cz, cy, cx = n.center
        rz, ry, rx = n.radii_mm
        for z in range(max(int(np.floor(cz - rz / dz)), 0), min(int(np.ceil(cz + rz / dz)) + 1, n_slices)):
            f = 1.0 - ((z - cz) * dz / rz) ** 2
            if f <= 0.0:
                continue
            s = float(np.sqrt(f))
            hy, hx = ry * s / py, rx * s / px
            positive = s >= MIN_SECTION and 2 * min(ry, rx) * s >= 2.0
            out[z].append([cx - hx, cy - hy, cx + hx, cy + hy, float(positive)])
    return [np.asarray(b, dtype=np.float32).reshape(-1, 5) for b in out]


def chest_scan(seed: int, slices: int = 100, n_nodules: int | None = None) -> ChestScan:
    """Generate and window one synthetic chest scan."""
    ph = synthetic.chest_ct(seed, slices, n_nodules=n_nodules)
    image = synthetic.window(ph.volume, *CHEST_WINDOW)
    boxes = slice_boxes(ph.nodules, ph.spacing, slices)
    lung_points = np.argwhere(ph.lung_mask[:, ::8, ::8]) * np.array([1, 8, 8])
    nodule_slices = [(z, row, int(b[4])) for z, bs in enumerate(boxes) for row, b in enumerate(bs)]
    return ChestScan(image, ph.spacing, ph.nodules, boxes, lung_points, nodule_slices)


def stack_25d(image: np.ndarray, z: int) -> np.ndarray:
    """Slices z-1, z, z+1 as channels; the edge slice repeats (the worker's context_slices=1)."""
    n = image.shape[0]
    return np.stack([image[max(z - 1, 0)], image[z], image[min(z + 1, n - 1)]])


def sample_detector_batch(
    scans: list[ChestScan], rng: np.random.Generator, batch: int, crop: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random 2.5D crops: half centred near a nodule section, half anywhere in the lung; flips and jitter."""
    images = np.empty((batch, 3, crop, crop), dtype=np.float32)
    targets: list[np.ndarray] = []
    for b in range(batch):
        scan = scans[int(rng.integers(len(scans)))]
        size = scan.image.shape[1]
        if scan.nodule_slices and rng.random() < 0.5:
            z, row, _ = scan.nodule_slices[int(rng.integers(len(scan.nodule_slices)))]
            box = scan.boxes[z][row]
            cy, cx = (box[1] + box[3]) / 2, (box[0] + box[2]) / 2
            cy += rng.uniform(-0.4, 0.4) * crop
            cx += rng.uniform(-0.4, 0.4) * crop
        else:
            z, cy, cx = scan.lung_points[int(rng.integers(len(scan.lung_points)))]
        y0 = int(np.clip(round(cy - crop / 2), 0, size - crop))
        x0 = int(np.clip(round(cx - crop / 2), 0, size - crop))
        img = stack_25d(scan.image, int(z))[:, y0 : y0 + crop, x0 : x0 + crop].astype(np.float32)
        boxes = scan.boxes[int(z)].copy()
        boxes[:, [0, 2]] -= x0
        boxes[:, [1, 3]] -= y0
        if rng.random() < 0.5:
            img = img[:, :, ::-1]
            boxes[:, [0, 2]] = crop - boxes[:, [2, 0]]
        if rng.random() < 0.5:
            img = img[:, ::-1, :]
            boxes[:, [1, 3]] = crop - boxes[:, [3, 1]]
        if rng.random() < 0.5:  # the through-plane direction: the patient may lie either way
            img = img[::-1]
        img = img * rng.uniform(0.9, 1.1) + rng.uniform(-8.0, 8.0)
        images[b] = np.clip(img, 0, 255) / 255.0
        inside = (boxes[:, 2] > 0) & (boxes[:, 0] < crop) & (boxes[:, 3] > 0) & (boxes[:, 1] < crop)
        targets.append(boxes[inside])
    return images, targets


def chest_slices_for_calibration(
    n_scans: int, seed: int = CALIB_SEED, per_scan: int = 16
) -> list[np.ndarray]:
    """Batches of 8 windowed 2.5D slices from calibration scans, half of them through nodules."""
    rng = np.random.default_rng(seed)
    slices: list[np.ndarray] = []
    for s in range(n_scans):
        scan = chest_scan(seed + s, slices=64)
        zs = [z for z, _, _ in scan.nodule_slices]
        picks = list(rng.choice(zs, per_scan // 2)) if zs else []
        picks += list(rng.integers(0, scan.image.shape[0], per_scan - len(picks)))
        slices += [stack_25d(scan.image, int(z)) for z in picks]
    return [np.stack(slices[i : i + 8]) for i in range(0, len(slices), 8)]


def downsample2(image: np.ndarray) -> np.ndarray:
    """512 -> 256 by 2x2 averaging (the worker's resize of a 512 matrix to the model's 256)."""
    z, h, w = image.shape
    return image.reshape(z, h // 2, 2, w // 2, 2).astype(np.float32).mean(axis=(2, 4))


def head_slices(seed: int, hemorrhage: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic head CT: windowed uint8 slices [z, 256, 256] and per-slice labels."""
    ph = synthetic.head_ct(seed, hemorrhage=hemorrhage)
    hu = downsample2(ph.volume)
    return synthetic.window(hu, *BRAIN_WINDOW), ph.slice_labels.astype(np.float32)
