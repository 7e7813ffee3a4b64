"""The worker's detection postprocessing, restated in plain numpy for the evaluation (no service imports).

Mirrors ``lucerna.inference.postprocess``: per slice, boxes at or above the score threshold, greedy NMS;
then boxes linked across adjacent slices into lesions (IoU >= 0.2 with the lesion's box on the previous
slice, or one centre inside the other); a lesion's score is its best box's; its location is its largest box;
the top ``max_findings`` lesions by score are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GROUP_IOU = 0.2


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box with each of (n, 4) boxes."""
    x1, y1 = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x2, y2 = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (
        others[:, 3] - others[:, 1]
    )
    union = union - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy NMS: indexes kept, best first."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size:
        best = int(order[0])
        kept.append(best)
        rest = order[1:]
        order = rest[iou(boxes[best], boxes[rest]) <= threshold]
    return kept


@dataclass(eq=False)
class Lesion:
    """Boxes (z, x1, y1, x2, y2, score) on consecutive slices."""

    boxes: list[tuple[int, np.ndarray, float]] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The best box's score."""
        return max(s for _, _, s in self.boxes)

    @property
    def largest(self) -> tuple[int, np.ndarray, float]:
        """The largest box (first of equals in slice order)."""
        return max(self.boxes, key=lambda b: ((b[1][2] - b[1][0]) * (b[1][3] - b[1][1]), -b[0]))

    def centre(self) -> tuple[float, float, float]:
        """(z, y, x) in voxels: the largest box's centre, on its slice."""
        z, b, _ = self.largest
        return float(z), float((b[1] + b[3]) / 2), float((b[0] + b[2]) / 2)


def _centre_inside(a: np.ndarray, b: np.ndarray) -> bool:
    x, y = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    return bool(b[0] <= x <= b[2] and b[1] <= y <= b[3])


def lesions(
    outputs: np.ndarray, threshold: float, nms_iou: float = 0.3, max_findings: int = 20
) -> list[Lesion]:
    """Model outputs [slices, K, 5] (slice order) -> the worker's lesions, best first."""
    found: list[Lesion] = []
    open_: list[Lesion] = []
    for z, out in enumerate(outputs):
        raw = out[np.isfinite(out).all(axis=1) & (out[:, 4] >= threshold)]
        raw = raw[(raw[:, 2] > raw[:, 0]) & (raw[:, 3] > raw[:, 1])]
        kept = nms(raw[:, :4], raw[:, 4], nms_iou) if len(raw) else []
        extended: list[Lesion] = []
        for i in sorted(kept, key=lambda k: -raw[k, 4]):
            box = raw[i, :4]
            best, best_overlap = None, -1.0
            for lesion in open_:
                if lesion in extended:
                    continue
                last = lesion.boxes[-1][1]
                overlap = float(iou(box, last[None])[0])
                if (overlap >= GROUP_IOU or _centre_inside(box, last) or _centre_inside(last, box)) and (
                    overlap > best_overlap
                ):
                    best, best_overlap = lesion, overlap
            if best is None:
                best = Lesion()
                found.append(best)
            best.boxes.append((z, box, float(raw[i, 4])))
            extended.append(best)
        open_ = extended
    found.sort(key=lambda les: (-les.score, les.largest[0]))
    return found[:max_findings]
