"""Frames in modality units to a model's input: slices in anatomical order, windowed, resized, stacked.

Slices are ordered along the slice normal (the cross product of ImageOrientationPatient's row and
column cosines, dotted with ImagePositionPatient), head to feet for axial slices, falling back to
InstanceNumber when the geometry is missing or inconsistent. Each slice is windowed (HU to 0..255),
resized to the manifest's size
(area averaging to shrink, bilinear to enlarge; plain numpy) and stacked with its ``k`` neighbours
on each side as channels, the first and last slice repeated at the ends. Every item keeps what is
needed to map a result back: its instance, frame, original size and pixel spacing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from lucerna.core.model_manifest import Manifest, Window
from lucerna.inference.pixels import DecodedInstance, FrameGeometry

Array = npt.NDArray[Any]

# Orientations closer than this (cosine components) count as the same plane.
_ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Slice:
    """One frame of one instance, in modality units, with its geometry."""

    sop_instance_uid: str
    frame: int  # 1-based
    pixels: Array  # (rows, columns), float32
    geometry: FrameGeometry
    instance_number: int | None


@dataclass(frozen=True)
class Item:
    """What one model input came from: enough to map outputs back to the frame."""

    sop_instance_uid: str
    frame: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # (row, column) mm


@dataclass(frozen=True)
class Prepared:
    """A series ready for the model: one windowed, resized image per slice, in order, and the indexes
    of each item's channels (its neighbours), stacked lazily per batch."""

    images: Array  # (slices, rows, columns) uint8
    channels: Array  # (slices, 2k+1) indexes into images
    items: tuple[Item, ...]

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, start: int, stop: int) -> Array:
        """Model inputs ``start:stop`` as ``(n, 2k+1, rows, columns)`` uint8."""
        return np.asarray(self.images[self.channels[start:stop]])


def slices_of(instances: Sequence[DecodedInstance]) -> list[Slice]:
    """Every frame of the (monochrome) instances as slices."""
    result = []
    for instance in instances:
        for index in range(instance.frames.shape[0]):
            result.append(
                Slice(
                    instance.sop_instance_uid,
                    index + 1,
                    instance.frames[index],
                    instance.geometry[index],
                    instance.instance_number,
                )
            )
    return result


def order_slices(slices: Sequence[Slice]) -> list[Slice]:
    """Slices from the furthest to the nearest along the slice normal (for axial slices: head to feet,
    the usual reading order and the phantoms' order) when every slice has the same orientation and a
    position, else by InstanceNumber (then frame); ties keep their given order."""
    orientation = _common_orientation(slices) if slices else None
    if orientation is not None:
        row, column = np.array(orientation[:3]), np.array(orientation[3:])
        normal = np.cross(row, column)
        distances = [float(np.dot(np.array(s.geometry.position), normal)) for s in slices]
        order = sorted(range(len(slices)), key=lambda i: (-distances[i], slices[i].frame))
        return [slices[i] for i in order]
    fallback = sorted(
        range(len(slices)),
        key=lambda i: (slices[i].instance_number is None, slices[i].instance_number or 0, slices[i].frame),
    )
    return [slices[i] for i in fallback]


def _common_orientation(slices: Sequence[Slice]) -> tuple[float, ...] | None:
    first = slices[0].geometry.orientation
    if first is None:
        return None
    for item in slices:
        orientation, position = item.geometry.orientation, item.geometry.position
        if orientation is None or position is None:
            return None
        if max(abs(a - b) for a, b in zip(orientation, first, strict=True)) > _ORIENTATION_TOLERANCE:
            return None
    return first


def window(pixels: Array, settings: Window) -> Array:
    """Modality values mapped linearly from [center - width/2, center + width/2] to 0..255 (float32)."""
    lower = settings.center - settings.width / 2
    scaled = (pixels.astype(np.float32) - np.float32(lower)) * np.float32(255.0 / settings.width)
    return np.clip(scaled, 0.0, 255.0)


def resize(image: Array, rows: int, columns: int) -> Array:
    """A 2-D image resized to ``rows`` x ``columns``: area averaging along an axis that shrinks,
    bilinear (pixel centres aligned) along one that grows, untouched along one that keeps its size."""
    in_rows, in_columns = image.shape
    result = image.astype(np.float32, copy=False)
    if in_rows != rows:
        result = _resampling(in_rows, rows) @ result
    if in_columns != columns:
        result = result @ _resampling(in_columns, columns).T
    return result


@lru_cache(maxsize=64)
def _resampling(size_in: int, size_out: int) -> Array:
    """The (size_out, size_in) matrix that resamples one axis (read-only; cached per size pair)."""
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    if size_out < size_in:
        scale = size_in / size_out
        for out in range(size_out):
            start, stop = out * scale, (out + 1) * scale
            for source in range(int(np.floor(start)), min(int(np.ceil(stop)), size_in)):
                overlap = min(stop, source + 1) - max(start, source)
                if overlap > 0:
                    matrix[out, source] = overlap / scale
    else:
        scale = size_in / size_out
        for out in range(size_out):
            centre = min(max((out + 0.5) * scale - 0.5, 0.0), size_in - 1.0)
            low = int(np.floor(centre))
            high = min(low + 1, size_in - 1)
            fraction = centre - low
            matrix[out, low] += 1.0 - fraction
            matrix[out, high] += fraction
    matrix.setflags(write=False)
    return matrix


def neighbour_indexes(count: int, context: int) -> Array:
    """For each of ``count`` slices, the indexes of slices i-k..i+k, clamped at the ends."""
    offsets = np.arange(-context, context + 1)
    return np.clip(np.arange(count)[:, np.newaxis] + offsets[np.newaxis, :], 0, count - 1)


def prepare(slices: Sequence[Slice], manifest: Manifest) -> Prepared:
    """Order, window, resize and index the slices of one series for ``manifest``'s model."""
    ordered = order_slices(slices)
    settings = manifest.preprocessing
    rows, columns = settings.size
    images = np.empty((len(ordered), rows, columns), dtype=np.uint8)
    for index, item in enumerate(ordered):
        resized = resize(window(item.pixels, settings.window), rows, columns)
        images[index] = np.rint(resized).clip(0, 255).astype(np.uint8)
    items = tuple(
        Item(s.sop_instance_uid, s.frame, s.pixels.shape[0], s.pixels.shape[1], s.geometry.pixel_spacing)
        for s in ordered
    )
    return Prepared(images, neighbour_indexes(len(ordered), settings.context_slices), items)
