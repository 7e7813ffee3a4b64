"""Slice ordering, windowing, resizing and channel stacking."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lucerna.core.model_manifest import Window
from lucerna.inference.pixels import FrameGeometry, decode
from lucerna.inference.preprocess import (
    Slice,
    neighbour_indexes,
    order_slices,
    prepare,
    resize,
    slices_of,
    window,
)
from tests.unit.inference.inference_kit import DETECTOR, ct_instance, manifest

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def a_slice(
    uid: str,
    *,
    z: float | None,
    number: int | None,
    orientation: tuple[float, ...] | None = AXIAL,
    frame: int = 1,
) -> Slice:
    position = None if z is None else (0.0, 0.0, z)
    return Slice(
        uid, frame, np.zeros((4, 4), np.float32), FrameGeometry(position, orientation, (1.0, 1.0)), number
    )  # type: ignore[arg-type]


def test_slices_are_ordered_head_to_feet_along_the_normal_whatever_the_input_order() -> None:
    slices = [a_slice(f"s{i}", z=float(i) * 2.5, number=100 - i) for i in range(20)]
    shuffled = slices[:]
    random.Random(7).shuffle(shuffled)
    ordered = order_slices(shuffled)
    assert [s.sop_instance_uid for s in ordered] == [f"s{i}" for i in reversed(range(20))]


def test_oblique_slices_are_ordered_by_the_projection_on_their_normal() -> None:
    # Rows along x, columns along (0, cos, -sin): the normal is (0, sin, cos).
    c, s = np.cos(0.3), np.sin(0.3)
    orientation = (1.0, 0.0, 0.0, 0.0, float(c), float(-s))
    slices = [
        Slice(
            f"s{i}",
            1,
            np.zeros((2, 2), np.float32),
            FrameGeometry((5.0, float(i * s), float(i * c)), orientation, None),
            None,
        )  # type: ignore[arg-type]
        for i in range(6)
    ]
    random.Random(1).shuffle(slices)
    assert [x.sop_instance_uid for x in order_slices(slices)] == ["s5", "s4", "s3", "s2", "s1", "s0"]


def test_missing_geometry_falls_back_to_instance_number() -> None:
    slices = [a_slice("c", z=None, number=3), a_slice("a", z=1.0, number=1), a_slice("b", z=2.0, number=2)]
    assert [s.sop_instance_uid for s in order_slices(slices)] == ["a", "b", "c"]


def test_mixed_orientations_fall_back_to_instance_number() -> None:
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    slices = [a_slice("b", z=1.0, number=2), a_slice("a", z=2.0, number=1, orientation=coronal)]
    assert [s.sop_instance_uid for s in order_slices(slices)] == ["a", "b"]


def test_frames_of_one_instance_keep_their_order_without_positions() -> None:
    slices = [a_slice("m", z=None, number=1, frame=f) for f in (3, 1, 2)]
    assert [s.frame for s in order_slices(slices)] == [1, 2, 3]


def test_window_maps_the_range_linearly_and_clips() -> None:
    hu = np.array([-2000, -1350, -600, 150, 3000], dtype=np.float32)
    values = window(hu, Window(center=-600, width=1500))
    np.testing.assert_allclose(values, [0, 0, 127.5, 255, 255])


def test_resize_identity_area_and_bilinear() -> None:
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_array_equal(resize(image, 4, 4), image)
    # Area: each output pixel is the mean of a 2x2 block.
    np.testing.assert_allclose(resize(image, 2, 2), [[2.5, 4.5], [10.5, 12.5]])
    # Non-integer factor keeps the mean of the image (area preserves mass).
    odd = np.random.default_rng(0).uniform(0, 255, (7, 5)).astype(np.float32)
    assert resize(odd, 3, 2).mean() == pytest.approx(odd.mean(), rel=1e-5)
    # Bilinear up: a linear ramp stays a ramp between the end samples; constants stay constant.
    ramp = np.array([[0.0, 10.0]], dtype=np.float32)
    np.testing.assert_allclose(resize(ramp, 1, 4), [[0.0, 2.5, 7.5, 10.0]])
    assert np.allclose(resize(np.full((3, 3), 42, np.float32), 8, 5), 42)


def test_neighbours_repeat_the_edges() -> None:
    np.testing.assert_array_equal(neighbour_indexes(4, 1), [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    np.testing.assert_array_equal(neighbour_indexes(1, 2), [[0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(neighbour_indexes(3, 0), [[0], [1], [2]])


def test_prepare_orders_windows_resizes_and_stacks_channels_per_item() -> None:
    model = manifest(DETECTOR)  # 3 x 32 x 32, window -600/1500
    instances = []
    for number in range(1, 6):
        hu = np.full((64, 48), -1000 + 250 * number, dtype=np.float32)  # distinct per slice
        instances.append(decode(ct_instance("1.2", "1.2.3", number, hu=hu, z=float(number), spacing=0.5)))
    random.Random(3).shuffle(instances)
    prepared = prepare(slices_of(instances), model)
    assert len(prepared) == 5
    # Head to feet: z = 5 first.
    numbers = [
        next(i.instance_number for i in instances if i.sop_instance_uid == item.sop_instance_uid)
        for item in prepared.items
    ]
    assert numbers == [5, 4, 3, 2, 1]
    item = prepared.items[0]
    assert (item.rows, item.columns, item.frame, item.pixel_spacing) == (64, 48, 1, (0.5, 0.5))
    batch = prepared.batch(0, 5)
    assert batch.shape == (5, 3, 32, 32)
    assert batch.dtype == np.uint8
    levels = [min(255, int(np.rint((-1000 + 250 * n + 1350) * 255 / 1500))) for n in (5, 4, 3, 2, 1)]
    centre = [int(batch[i, 1, 0, 0]) for i in range(5)]
    assert centre == levels
    # Channel 0 is the previous slice, 2 the next; the ends repeat themselves.
    assert [int(batch[i, 0, 0, 0]) for i in range(5)] == [levels[0], *levels[:4]]
    assert [int(batch[i, 2, 0, 0]) for i in range(5)] == [*levels[1:], levels[4]]


def test_prepare_tolerates_a_single_slice() -> None:
    model = manifest(DETECTOR)
    hu = np.zeros((32, 32), np.float32)
    prepared = prepare(slices_of([decode(ct_instance("1.2", "1.2.3", 1, hu=hu))]), model)
    assert prepared.batch(0, 1).shape == (1, 3, 32, 32)
