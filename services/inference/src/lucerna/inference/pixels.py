"""Part-10 bytes to frames: pixel data decoded and, for monochrome images, in modality units.

pydicom 3 decodes the uncompressed syntaxes (implicit/explicit VR little endian, big endian,
deflated) itself and the compressed ones (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE)
through the pylibjpeg plugins. Rescale Slope/Intercept (or a Modality LUT) is applied, so CT frames
are in Hounsfield units. Whatever cannot be decoded raises ``UndecodablePixels`` with a reason naming
the SOP Instance UID: a job over such an instance fails for good, it is not retried.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut

Array = npt.NDArray[Any]

Vector3 = tuple[float, float, float]


class UndecodablePixels(Exception):  # noqa: N818 - the name the inference contract uses
    """An instance whose pixels cannot be read; the message names the SOP Instance UID and why."""


class NoPixelData(UndecodablePixels):
    """An instance without pixels at all (a structured report, a key object selection, ...)."""


@dataclass(frozen=True)
class FrameGeometry:
    """Where one frame lies in the patient: enough to order slices and measure in millimetres."""

    position: Vector3 | None  # ImagePositionPatient of the frame's first pixel, mm
    orientation: tuple[float, float, float, float, float, float] | None  # row then column cosines
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing), mm


@dataclass(frozen=True)
class DecodedInstance:
    """One instance's frames. Monochrome: float32 ``(frames, rows, columns)`` in modality units;
    colour: the decoded ``(frames, rows, columns, samples)`` in RGB, as stored (no rescale)."""

    sop_instance_uid: str
    series_instance_uid: str
    modality: str
    patient_id: str
    instance_number: int | None
    frames: Array
    geometry: tuple[FrameGeometry, ...]  # one per frame

    @property
    def monochrome(self) -> bool:
        """Whether the frames are single-sample (grey-level) images."""
        return self.frames.ndim == 3


def decode(data: bytes, sop_instance_uid: str = "") -> DecodedInstance:
    """The frames of one Part-10 file; ``UndecodablePixels`` naming the instance when they cannot be read.

    ``sop_instance_uid`` names the instance in errors raised before its own UID could be read.
    """
    label = sop_instance_uid or "(unknown SOP Instance UID)"
    try:
        dataset = dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise UndecodablePixels(f"instance {label}: not a readable DICOM Part-10 file: {exc}") from exc
    label = str(dataset.get("SOPInstanceUID", "")) or label
    if "PixelData" not in dataset:
        raise NoPixelData(f"instance {label}: has no Pixel Data (7FE0,0010)")
    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    try:
        with warnings.catch_warnings():
            # Excess padding after the last frame is dropped by pydicom; nothing to act on.
            warnings.simplefilter("ignore", UserWarning)
            pixels = dataset.pixel_array
    except MemoryError:
        raise
    except Exception as exc:
        name = getattr(syntax, "name", None) or str(syntax or "no transfer syntax")
        raise UndecodablePixels(f"instance {label}: pixel data ({name}) cannot be decoded: {exc}") from exc
    frames_count = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    try:
        frames = _frames_axis(pixels, frames_count, samples)
        if samples == 1:
            frames = np.asarray(apply_modality_lut(frames, dataset), dtype=np.float32)
    except (ValueError, TypeError, AttributeError) as exc:
        raise UndecodablePixels(f"instance {label}: pixel data cannot be interpreted: {exc}") from exc
    number = dataset.get("InstanceNumber")
    return DecodedInstance(
        sop_instance_uid=label,
        series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
        modality=str(dataset.get("Modality", "")),
        patient_id=str(dataset.get("PatientID", "")),
        instance_number=int(number) if number not in (None, "") else None,
        frames=frames,
        geometry=_geometry(dataset, frames.shape[0]),
    )


def _frames_axis(pixels: Array, frames: int, samples: int) -> Array:
    """The decoded array with a leading frame axis, checked against the header's frame count."""
    expected = 3 if samples == 1 else 4
    if pixels.ndim == expected - 1 and frames == 1:
        pixels = pixels[np.newaxis]
    if pixels.ndim != expected or pixels.shape[0] != frames:
        raise ValueError(
            f"decoded shape {pixels.shape} does not match {frames} frame(s) of {samples} sample(s) per pixel"
        )
    return pixels


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        numbers = tuple(float(v) for v in cast("Sequence[float]", value))
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers


def _geometry(dataset: Dataset, frames: int) -> tuple[FrameGeometry, ...]:
    """Per-frame position, orientation and spacing: from the per-frame and shared functional groups of
    an enhanced multi-frame image, else from the top-level attributes (the same for every frame)."""
    shared = _functional_group(dataset.get("SharedFunctionalGroupsSequence"), 0)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    top = _plane(dataset, dataset, dataset)
    result = []
    for index in range(frames):
        own = _functional_group(per_frame, index)
        if own is None and shared is None:
            result.append(top)
            continue
        groups = [g for g in (own, shared) if g is not None]
        position = next((p for g in groups if (p := _nested(g, "PlanePositionSequence")) is not None), None)
        orientation = next(
            (o for g in groups if (o := _nested(g, "PlaneOrientationSequence")) is not None), None
        )
        measures = next((m for g in groups if (m := _nested(g, "PixelMeasuresSequence")) is not None), None)
        plane = _plane(position, orientation, measures)
        result.append(
            FrameGeometry(
                plane.position or top.position,
                plane.orientation or top.orientation,
                plane.pixel_spacing or top.pixel_spacing,
            )
        )
    return tuple(result)


def _functional_group(sequence: Sequence[Dataset] | None, index: int) -> Dataset | None:
    if not sequence or index >= len(sequence):
        return None
    return sequence[index]


def _nested(group: Dataset, keyword: str) -> Dataset | None:
    sequence = group.get(keyword)
    return sequence[0] if sequence else None


def _plane(position: Dataset | None, orientation: Dataset | None, measures: Dataset | None) -> FrameGeometry:
    ipp = _floats(position.get("ImagePositionPatient") if position is not None else None, 3)
    iop = _floats(orientation.get("ImageOrientationPatient") if orientation is not None else None, 6)
    spacing = _floats(measures.get("PixelSpacing") if measures is not None else None, 2)
    if spacing is not None and not all(s > 0 for s in spacing):
        spacing = None
    return FrameGeometry(
        position=cast("Vector3 | None", ipp),
        orientation=cast("tuple[float, float, float, float, float, float] | None", iop),
        pixel_spacing=cast("tuple[float, float] | None", spacing),
    )
