"""NMS, lesions across slices, mapping boxes back to the frame, measurements, classification."""

from __future__ import annotations

import numpy as np
import pytest

from lucerna.inference.postprocess import findings, iou, nms
from lucerna.inference.preprocess import Item
from tests.unit.inference.inference_kit import CLASSIFIER, DETECTOR, manifest

CANDIDATES = 10


def outputs(per_slice: list[list[tuple[float, float, float, float, float]]]) -> np.ndarray:
    """Detector output: each slice's candidates padded with zero-score rows, as the model returns them."""
    result = np.zeros((len(per_slice), CANDIDATES, 5), np.float32)
    for i, boxes in enumerate(per_slice):
        for j, box in enumerate(sorted(boxes, key=lambda b: -b[4])):
            result[i, j] = box
    return result


def items(
    count: int, rows: int = 32, columns: int = 32, spacing: tuple[float, float] | None = (1.0, 1.0)
) -> list[Item]:
    return [Item(f"1.2.{i}", 1, rows, columns, spacing) for i in range(count)]


def test_iou_and_nms() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=float)
    assert iou(boxes[0], boxes[1:]) == pytest.approx([81 / 119, 0.0, 1.0])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5) == [3, 2]
    assert nms(boxes, scores, 0.9) == [3, 1, 2]


def test_boxes_below_the_threshold_and_overlapping_weaker_ones_are_dropped() -> None:
    model = manifest(DETECTOR)
    out = outputs([[(4, 4, 12, 12, 0.9), (5, 5, 13, 13, 0.8), (20, 20, 24, 24, 0.4)]])
    result = findings(out, items(1), model)
    assert len(result) == 1
    assert result[0].probability == pytest.approx(0.9)


def test_boxes_map_back_to_the_frame_size() -> None:
    model = manifest(DETECTOR)  # model input 32 x 32
    out = outputs([[(8, 4, 16, 12, 0.9)]])
    for rows, columns in ((512, 512), (256, 256), (97, 61)):
        location = findings(out, items(1, rows, columns), model)[0].locations[0]
        assert (location.x_min, location.y_min) == pytest.approx((8 * columns / 32, 4 * rows / 32))
        assert (location.x_max, location.y_max) == pytest.approx((16 * columns / 32, 12 * rows / 32))
        assert (location.sop_instance_uid, location.frame) == ("1.2.0", 1)


def test_boxes_are_clipped_to_the_frame() -> None:
    model = manifest(DETECTOR)
    location = findings(outputs([[(-3, 30, 10, 40, 0.9)]]), items(1, 64, 64), model)[0].locations[0]
    assert (location.x_min, location.y_min, location.x_max, location.y_max) == (0, 60, 20, 64)


def test_boxes_on_adjacent_slices_group_into_one_lesion_located_where_it_is_largest() -> None:
    model = manifest(DETECTOR)
    out = outputs(
        [
            [(10, 10, 14, 14, 0.6)],
            [(9, 9, 16, 15, 0.8)],  # largest: 7 x 6 model pixels
            [(10, 10, 15, 15, 0.7), (25, 25, 29, 29, 0.9)],  # the second is another lesion
            [],
            [(10, 10, 14, 14, 0.6)],  # a gap: a third lesion
        ]
    )
    result = findings(out, items(5, 512, 512, (0.7, 0.8)), model)
    assert [round(f.probability, 2) for f in result] == [0.9, 0.8, 0.6]
    nodule = result[1]
    assert [loc.sop_instance_uid for loc in nodule.locations] == ["1.2.1", "1.2.0", "1.2.2"]
    first = nodule.locations[0]
    assert (first.x_min, first.x_max) == pytest.approx((9 * 16, 16 * 16))
    # Diameter: the longest side of the largest box in mm: width 7*16 px * 0.8 mm vs height 6*16 px * 0.7 mm.
    (diameter,) = nodule.measurements
    assert (diameter.name, diameter.unit) == ("diameter", "mm")
    assert diameter.value == pytest.approx(7 * 16 * 0.8, abs=0.01)
    assert nodule.code == "786838002"
    assert nodule.body_site_code == "39607008"


def test_without_grouping_every_box_is_a_finding_and_max_findings_caps_them() -> None:
    model = manifest(
        DETECTOR, postprocessing={**DETECTOR["postprocessing"], "group_slices": False, "max_findings": 2}
    )
    out = outputs([[(10, 10, 14, 14, 0.6)], [(10, 10, 14, 14, 0.7)], [(10, 10, 14, 14, 0.8)]])
    result = findings(out, items(3), model)
    assert [round(f.probability, 2) for f in result] == [0.8, 0.7]


def test_no_pixel_spacing_means_no_diameter() -> None:
    result = findings(outputs([[(10, 10, 14, 14, 0.9)]]), items(1, spacing=None), manifest(DETECTOR))
    assert len(result) == 1
    assert not result[0].measurements


def test_classification_max_makes_one_finding_on_the_most_probable_slice() -> None:
    model = manifest(CLASSIFIER)
    result = findings(np.array([[0.1], [0.7], [0.9], [0.3]], np.float32), items(4, 512, 400), model)
    assert len(result) == 1
    (location,) = result[0].locations
    assert location.sop_instance_uid == "1.2.2"
    assert (location.x_min, location.y_min, location.x_max, location.y_max) == (0, 0, 400, 512)
    assert result[0].probability == pytest.approx(0.9)
    assert result[0].display == "Hemorrhage"


def test_classification_below_the_threshold_makes_no_finding() -> None:
    assert findings(np.array([[0.1], [0.49]], np.float32), items(2), manifest(CLASSIFIER)) == []


def test_classification_none_makes_one_finding_per_positive_slice() -> None:
    model = manifest(
        CLASSIFIER, postprocessing={**CLASSIFIER["postprocessing"], "aggregate": "none", "max_findings": 5}
    )
    result = findings(np.array([[0.6], [0.2], [0.9]], np.float32), items(3), model)
    assert [f.locations[0].sop_instance_uid for f in result] == ["1.2.2", "1.2.0"]


def test_outputs_must_match_the_inputs() -> None:
    with pytest.raises(ValueError, match="2 outputs for 3 inputs"):
        findings(np.zeros((2, 1), np.float32), items(3), manifest(CLASSIFIER))
