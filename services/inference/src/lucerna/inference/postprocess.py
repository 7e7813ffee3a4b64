"""Model outputs to findings: thresholds, NMS, lesions across slices, measurements, image locations.

Detection output per slice is ``(candidates, 5)`` = (x_min, y_min, x_max, y_max, score) in model
input pixels, sorted by score, without NMS. Boxes are mapped back to the frame's own pixel
coordinates (the model input was resized from the frame), kept above the score threshold, reduced
by NMS per slice and, when the manifest asks, grouped across adjacent slices into lesions: a box
joins a lesion whose box on the previous slice overlaps it (IoU at least ``GROUP_IOU``, or one box's
centre inside the other). A lesion's probability is its best box's score; its first location is the
slice where it is largest, followed by its other slices in order; its diameter is the longest side
of that largest box in millimetres (Pixel Spacing).

Classification output per slice is one probability; ``aggregate: max`` makes one finding when the
highest slice probability reaches the threshold, located on that slice as a whole-frame box;
``aggregate: none`` makes one finding per slice at or above the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from lucerna.core.model_manifest import Manifest
from lucerna.events.v1 import events_pb2
from lucerna.inference.preprocess import Item

Array = npt.NDArray[Any]

GROUP_IOU = 0.2


@dataclass(frozen=True)
class Box:
    """One kept detection on one slice, in that frame's pixel coordinates."""

    slice_index: int  # position in the ordered series
    item: Item
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    score: float

    @property
    def area_mm2(self) -> float:
        """Area in mm² (in pixels when the frame has no Pixel Spacing)."""
        row_mm, column_mm = self.item.pixel_spacing or (1.0, 1.0)
        return (self.x_max - self.x_min) * column_mm * (self.y_max - self.y_min) * row_mm

    def location(self) -> events_pb2.ImageLocation:
        """The box as an event location."""
        return events_pb2.ImageLocation(
            sop_instance_uid=self.item.sop_instance_uid,
            frame=self.item.frame,
            x_min=self.x_min,
            y_min=self.y_min,
            x_max=self.x_max,
            y_max=self.y_max,
        )


@dataclass
class Lesion:
    """Boxes on consecutive slices taken to be one lesion."""

    boxes: list[Box] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The best box's score."""
        return max(box.score for box in self.boxes)

    @property
    def largest(self) -> Box:
        """The box with the largest area (the first of equals, in slice order)."""
        return max(self.boxes, key=lambda box: (box.area_mm2, -box.slice_index))


def iou(box: Array, others: Array) -> Array:
    """Intersection over union of one (4,) box with each of (n, 4) boxes."""
    x_min = np.maximum(box[0], others[:, 0])
    y_min = np.maximum(box[1], others[:, 1])
    x_max = np.minimum(box[2], others[:, 2])
    y_max = np.minimum(box[3], others[:, 3])
    intersection = np.clip(x_max - x_min, 0, None) * np.clip(y_max - y_min, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0)


def nms(boxes: Array, scores: Array, threshold: float) -> list[int]:
    """Indexes of the boxes kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size:
        best = int(order[0])
        kept.append(best)
        rest = order[1:]
        order = rest[iou(boxes[best], boxes[rest]) <= threshold]
    return kept


def slice_boxes(raw: Array, item: Item, slice_index: int, manifest: Manifest) -> list[Box]:
    """One slice's detections above the threshold, mapped to its frame and reduced by NMS."""
    settings = manifest.postprocessing
    rows, columns = manifest.preprocessing.size
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, 5)
    raw = raw[np.isfinite(raw).all(axis=1) & (raw[:, 4] >= settings.score_threshold)]
    if not raw.size:
        return []
    boxes = raw[:, :4] * np.array([item.columns / columns, item.rows / rows] * 2)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, item.columns)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, item.rows)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores = boxes[valid], raw[valid, 4]
    kept = []
    for i in nms(boxes, scores, settings.nms_iou):
        x_min, y_min, x_max, y_max = (float(v) for v in boxes[i])
        kept.append(Box(slice_index, item, x_min, y_min, x_max, y_max, float(scores[i])))
    return kept


def group_lesions(boxes_per_slice: Sequence[Sequence[Box]]) -> list[Lesion]:
    """Boxes linked across adjacent slices into lesions, greedily by score."""
    lesions: list[Lesion] = []
    open_lesions: list[Lesion] = []  # lesions with a box on the previous slice
    for boxes in boxes_per_slice:
        extended: list[Lesion] = []
        for box in sorted(boxes, key=lambda b: -b.score):
            match = _best_match(box, [lesion for lesion in open_lesions if lesion not in extended])
            if match is None:
                match = Lesion()
                lesions.append(match)
            match.boxes.append(box)
            extended.append(match)
        open_lesions = extended
    return lesions


def _best_match(box: Box, candidates: Sequence[Lesion]) -> Lesion | None:
    best, best_overlap = None, -1.0
    this = np.array([box.x_min, box.y_min, box.x_max, box.y_max])
    for lesion in candidates:
        last = lesion.boxes[-1]
        other = np.array([[last.x_min, last.y_min, last.x_max, last.y_max]])
        overlap = float(iou(this, other)[0])
        if (overlap >= GROUP_IOU or _centre_inside(box, last) or _centre_inside(last, box)) and (
            overlap > best_overlap
        ):
            best, best_overlap = lesion, overlap
    return best


def _centre_inside(box: Box, other: Box) -> bool:
    x, y = (box.x_min + box.x_max) / 2, (box.y_min + box.y_max) / 2
    return other.x_min <= x <= other.x_max and other.y_min <= y <= other.y_max


def diameter_mm(box: Box) -> float | None:
    """The longest side of a box in millimetres; None without Pixel Spacing."""
    if box.item.pixel_spacing is None:
        return None
    row_mm, column_mm = box.item.pixel_spacing
    return max((box.x_max - box.x_min) * column_mm, (box.y_max - box.y_min) * row_mm)


def detection_findings(
    outputs: Array, items: Sequence[Item], manifest: Manifest
) -> list[events_pb2.Finding]:
    """Findings of a detector from its per-slice outputs (in slice order)."""
    per_slice = [slice_boxes(outputs[i], item, i, manifest) for i, item in enumerate(items)]
    if manifest.postprocessing.group_slices:
        lesions = group_lesions(per_slice)
    else:
        lesions = [Lesion([box]) for boxes in per_slice for box in boxes]
    lesions.sort(key=lambda lesion: (-lesion.score, lesion.largest.slice_index))
    findings = []
    for lesion in lesions[: manifest.postprocessing.max_findings]:
        largest = lesion.largest
        others = [box for box in sorted(lesion.boxes, key=lambda b: b.slice_index) if box is not largest]
        measurements = []
        if "diameter" in manifest.finding.measurements:
            diameter = diameter_mm(largest)
            if diameter is not None:
                measurements.append(
                    events_pb2.Measurement(name="diameter", value=round(diameter, 2), unit="mm")
                )
        findings.append(
            _finding(
                manifest, lesion.score, [largest.location(), *(b.location() for b in others)], measurements
            )
        )
    return findings


def classification_findings(
    outputs: Array, items: Sequence[Item], manifest: Manifest
) -> list[events_pb2.Finding]:
    """Findings of a classifier from its per-slice probabilities (in slice order)."""
    probabilities = np.asarray(outputs, dtype=np.float64).reshape(len(items), -1)[:, 0]
    threshold = manifest.postprocessing.score_threshold
    if manifest.postprocessing.aggregate == "max":
        chosen = [int(np.argmax(probabilities))] if len(items) else []
    else:
        chosen = [int(i) for i in np.argsort(-probabilities, kind="stable")]
    findings: list[events_pb2.Finding] = []
    for index in chosen:
        if probabilities[index] < threshold or len(findings) >= manifest.postprocessing.max_findings:
            break
        item = items[index]
        whole_frame = events_pb2.ImageLocation(
            sop_instance_uid=item.sop_instance_uid,
            frame=item.frame,
            x_min=0.0,
            y_min=0.0,
            x_max=float(item.columns),
            y_max=float(item.rows),
        )
        findings.append(_finding(manifest, float(probabilities[index]), [whole_frame], []))
    return findings


def findings(outputs: Array, items: Sequence[Item], manifest: Manifest) -> list[events_pb2.Finding]:
    """The findings of ``manifest``'s model from its outputs over ``items`` (in slice order)."""
    if len(outputs) != len(items):
        raise ValueError(f"{len(outputs)} outputs for {len(items)} inputs")
    if manifest.task == "detection":
        return detection_findings(outputs, items, manifest)
    return classification_findings(outputs, items, manifest)


def _finding(
    manifest: Manifest,
    probability: float,
    locations: list[events_pb2.ImageLocation],
    measurements: list[events_pb2.Measurement],
) -> events_pb2.Finding:
    spec = manifest.finding
    return events_pb2.Finding(
        code_system=spec.code.system,
        code=spec.code.code,
        display=spec.code.display,
        probability=probability,
        locations=locations,
        measurements=measurements,
        body_site_code=spec.body_site.code,
        body_site_display=spec.body_site.display,
    )
