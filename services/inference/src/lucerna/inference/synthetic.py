"""Synthetic CT phantoms with ground truth: chest CT with lung nodules, head CT with hemorrhage, DICOM writer.

The reference models are trained and evaluated on these phantoms, and the tests and benchmarks feed them to
the platform. Everything is seeded, so a seed names one study. Volumes are int16 Hounsfield units indexed
``[z, y, x]``; spacing is ``(slice, row, column)`` in mm.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

HU = npt.NDArray[np.int16]
F32 = npt.NDArray[np.float32]
NoduleKind = Literal["solid", "part-solid", "ground-glass"]
_KINDS: tuple[NoduleKind, ...] = ("solid", "part-solid", "ground-glass")
Spacing = tuple[float, float, float]

_AIR = -1000.0
_LUNG = -850.0
_SOFT = 40.0
_BONE = 700.0
_FAT = -90.0


@dataclass(frozen=True)
class Nodule:
    """A ground-truth nodule: center in voxel coordinates (z, y, x), effective diameter in mm."""

    center: tuple[float, float, float]
    diameter_mm: float
    kind: NoduleKind
    radii_mm: tuple[float, float, float]  # ellipsoid semi-axes (z, y, x)


@dataclass(frozen=True)
class Hemorrhage:
    """A ground-truth hyperdense blob: center in voxel coordinates (z, y, x), radii in mm (z, y, x)."""

    center: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    hu: float


@dataclass(frozen=True)
class ChestPhantom:
    """A chest CT volume with its nodules and lung mask."""

    volume: HU
    spacing: Spacing
    nodules: list[Nodule]
    lung_mask: npt.NDArray[np.bool_]
    seed: int


@dataclass(frozen=True)
class HeadPhantom:
    """A head CT volume with its hemorrhages and a per-slice label (True: hemorrhage on that slice)."""

    volume: HU
    spacing: Spacing
    hemorrhages: list[Hemorrhage]
    slice_labels: npt.NDArray[np.bool_]
    seed: int


@dataclass(frozen=True)
class SyntheticStudy:
    """DICOM Part-10 instances (one per slice, in slice order) and the phantom they were written from."""

    instances: list[bytes]
    phantom: ChestPhantom | HeadPhantom
    study_uid: str
    series_uid: str
    extra: dict[str, str] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cells: tuple[int, int, int]) -> F32:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled linearly along each axis."""
    grid = rng.uniform(-1.0, 1.0, size=(cells[0] + 1, cells[1] + 1, cells[2] + 1)).astype(np.float32)
    for axis, n in enumerate(shape):
        pos = np.linspace(0.0, cells[axis], n, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), cells[axis] - 1)
        frac = (pos - lo).astype(np.float32)
        a = np.take(grid, lo, axis=axis)
        b = np.take(grid, lo + 1, axis=axis)
        view = [1, 1, 1]
        view[axis] = n
        grid = a + (b - a) * frac.reshape(view)
    return grid


def _ellipsoid_box(
    center: tuple[float, float, float], radii_vox: tuple[float, float, float], shape: tuple[int, ...]
) -> tuple[slice, slice, slice] | None:
    """The voxel bounding box of an ellipsoid, clipped to the volume (None when it lies outside)."""
    out: list[slice] = []
    for c, r, n in zip(center, radii_vox, shape, strict=True):
        lo, hi = max(int(np.floor(c - r)) - 1, 0), min(int(np.ceil(c + r)) + 2, n)
        if lo >= hi:
            return None
        out.append(slice(lo, hi))
    return out[0], out[1], out[2]


def _paint_ellipsoid(
    vol: F32,
    center: tuple[float, float, float],
    radii_mm: tuple[float, float, float],
    spacing: Spacing,
    *,
    hu: float,
    edge_mm: float = 0.5,
) -> None:
    """Blend an ellipsoid of value ``hu`` into ``vol`` with a soft edge (partial-volume effect)."""
    radii_vox = (radii_mm[0] / spacing[0], radii_mm[1] / spacing[1], radii_mm[2] / spacing[2])
    box = _ellipsoid_box(center, radii_vox, vol.shape)
    if box is None:
        return
    zz, yy, xx = np.ogrid[box[0], box[1], box[2]]
    d = np.sqrt(
        ((zz - center[0]) * spacing[0] / radii_mm[0]) ** 2
        + ((yy - center[1]) * spacing[1] / radii_mm[1]) ** 2
        + ((xx - center[2]) * spacing[2] / radii_mm[2]) ** 2
    )
    r_mean = float(np.mean(radii_mm))
    alpha = np.clip((1.0 - d) * r_mean / edge_mm + 0.5, 0.0, 1.0).astype(np.float32)
    region = vol[box]
    region += alpha * (np.float32(hu) - region)


def _paint_segment(
    vol: F32,
    p0: npt.NDArray[np.float64],
    p1: npt.NDArray[np.float64],
    radius_mm: float,
    *,
    spacing: Spacing,
    hu: float,
) -> None:
    """Blend a capsule (a vessel segment, endpoints in mm) into ``vol``; the maximum wins, so tubes merge."""
    sp = np.asarray(spacing)
    lo = np.maximum(np.floor((np.minimum(p0, p1) - radius_mm) / sp).astype(int) - 1, 0)
    hi = np.minimum(np.ceil((np.maximum(p0, p1) + radius_mm) / sp).astype(int) + 2, vol.shape)
    if np.any(lo >= hi):
        return
    zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pz, py, px = zz * sp[0] - p0[0], yy * sp[1] - p0[1], xx * sp[2] - p0[2]
    d = p1 - p0
    t = np.clip((pz * d[0] + py * d[1] + px * d[2]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    dist = np.sqrt((pz - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (px - t * d[2]) ** 2)
    alpha = np.clip((radius_mm - dist) / 0.5 + 0.5, 0.0, 1.0).astype(np.float32)
    region = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    np.maximum(region, region + alpha * (np.float32(hu) - region), out=region)


def _vessel_tree(
    vol: F32,
    rng: np.random.Generator,
    root: npt.NDArray[np.float64],
    direction: npt.NDArray[np.float64],
    *,
    radius: float,
    spacing: Spacing,
    depth: int,
) -> None:
    """Grow a branching vessel: curved segments, each branch splitting in two narrower ones."""
    p = root
    d = direction / np.linalg.norm(direction)
    length = rng.uniform(25.0, 45.0) * radius / 3.0 + 10.0
    steps = max(int(length / 4.0), 2)
    for _ in range(steps):
        d = d + rng.normal(0.0, 0.15, 3)
        d /= np.linalg.norm(d)
        q = p + d * 4.0
        _paint_segment(vol, p, q, radius, spacing=spacing, hu=rng.uniform(20.0, 60.0))
        p = q
    if depth == 0 or radius < 0.9:
        return
    for _ in range(2):
        branch = d + rng.normal(0.0, 0.6, 3)
        _vessel_tree(
            vol, rng, p, branch, radius=radius * rng.uniform(0.62, 0.8), spacing=spacing, depth=depth - 1
        )


def chest_ct(
    seed: int,
    slices: int = 100,
    size: int = 512,
    n_nodules: int | None = None,
    noise_hu: float | None = None,
) -> ChestPhantom:
    """A synthetic chest CT: body, ribs, spine, textured lungs, 3D vessel trees and 3-30 mm nodules."""
    rng = np.random.default_rng(seed)
    px = float(rng.uniform(0.6, 0.8)) * 512 / size
    dz = float(rng.choice([1.25, 1.5, 2.0, 2.5]))
    spacing: Spacing = (dz, px, px)
    shape = (slices, size, size)
    z_mm = (np.arange(slices, dtype=np.float32) - slices / 2) * dz
    y_mm = (np.arange(size, dtype=np.float32) - size / 2) * px
    x_mm = (np.arange(size, dtype=np.float32) - size / 2) * px
    zz, yy, xx = z_mm[:, None, None], y_mm[None, :, None], x_mm[None, None, :]

    # Body: an ellipse slowly changing along z; a subcutaneous fat band under the skin.
    ax, ay = rng.uniform(150, 175), rng.uniform(105, 125)
    taper = (1.0 + 0.05 * np.cos(zz / (slices * dz) * np.pi)).astype(np.float32)
    r_body = (xx / (ax * taper)) ** 2 + (yy / (ay * taper)) ** 2
    vol = np.full(shape, _AIR, dtype=np.float32)
    # copyto broadcasts the mask without materialising it (boolean indexing would).
    np.copyto(vol, np.float32(_SOFT), where=r_body < 1.0)
    np.copyto(vol, np.float32(_FAT), where=(r_body < 1.0) & (r_body > 0.8))

    # Lungs: two ellipsoids, largest mid-volume, extending past both ends of a 100-slice scan.
    lung_mask = np.zeros(shape, dtype=bool)
    half_len = slices * dz * rng.uniform(0.6, 0.8)
    for side in (-1.0, 1.0):
        cx = side * ax * rng.uniform(0.42, 0.5)
        rx, ry = ax * rng.uniform(0.33, 0.38), ay * rng.uniform(0.68, 0.76)
        zf = np.sqrt(np.clip(1.0 - (zz / half_len) ** 2, 0.0, 1.0))
        lung = ((xx - cx) / (rx * zf + 1e-3)) ** 2 + ((yy + 5.0) / (ry * zf + 1e-3)) ** 2 < 1.0
        lung_mask |= lung
    texture = _smooth_noise(rng, shape, (max(slices // 8, 2), size // 16, size // 16))
    lung_vol = _LUNG + 25.0 * texture
    lungs = np.where(lung_mask, lung_vol, 0.0).astype(np.float32)

    # Vessels grow from each hilum (medial, mid-height) into the lung, in lung-only scratch space.
    for side in (-1.0, 1.0):
        hilum = np.array([slices * dz / 2, size * px / 2 - 5.0, size * px / 2 + side * ax * 0.2])
        for _ in range(int(rng.integers(5, 8))):
            direction = np.array([rng.normal(0, 0.7), rng.normal(0, 0.5), side * rng.uniform(0.4, 1.0)])
            _vessel_tree(lungs, rng, hilum, direction, radius=rng.uniform(3.0, 4.5), spacing=spacing, depth=4)
    vol = np.where(lung_mask, lungs, vol)

    nodules = _add_nodules(
        vol, rng, lung_mask, spacing, int(rng.integers(1, 6)) if n_nodules is None else n_nodules
    )
    _paint_bones(vol, rng, (zz, yy, xx), (ax, ay), taper)
    sigma = float(rng.uniform(12.0, 25.0)) if noise_hu is None else noise_hu
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    out = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    return ChestPhantom(out, spacing, nodules, lung_mask, seed)


def _add_nodules(
    vol: F32, rng: np.random.Generator, lung_mask: npt.NDArray[np.bool_], spacing: Spacing, count: int
) -> list[Nodule]:
    """Ellipsoid nodules wholly inside the lung, mostly small (the hard and clinically relevant range)."""
    nodules: list[Nodule] = []
    candidates = np.argwhere(lung_mask[::4, ::4, ::4]) * 4
    tries = 0
    while len(nodules) < count and tries < 200 and len(candidates):
        tries += 1
        diameter = float(np.clip(np.exp(rng.uniform(np.log(3.0), np.log(30.0))), 3.0, 30.0))
        if rng.random() < 0.4:
            diameter = float(rng.uniform(3.0, 8.0))
        elong = rng.uniform(0.85, 1.15, 3)
        r = diameter / 2 * elong / np.cbrt(np.prod(elong))
        radii = (float(r[0]), float(r[1]), float(r[2]))
        c = candidates[int(rng.integers(len(candidates)))].astype(float) + rng.uniform(0, 4, 3)
        center = (float(c[0]), float(c[1]), float(c[2]))
        # Keep the whole nodule in the lung, and apart from the other nodules.
        if not _inside(lung_mask, center, radii, spacing):
            continue
        if any(_dist_mm(center, n.center, spacing) < (diameter + n.diameter_mm) / 2 + 5 for n in nodules):
            continue
        kind = _KINDS[int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
        if kind == "solid":
            _paint_ellipsoid(vol, center, radii, spacing, hu=rng.uniform(0.0, 60.0))
        else:
            _paint_ellipsoid(vol, center, radii, spacing, hu=rng.uniform(-650.0, -400.0), edge_mm=1.0)
            if kind == "part-solid":
                core = (radii[0] * 0.45, radii[1] * 0.45, radii[2] * 0.45)
                _paint_ellipsoid(vol, center, core, spacing, hu=rng.uniform(0.0, 50.0))
        nodules.append(Nodule(center, round(diameter, 2), kind, radii))
    return nodules


def _paint_bones(
    vol: F32,
    rng: np.random.Generator,
    grid: tuple[F32, F32, F32],
    body: tuple[float, float],
    taper: F32,
) -> None:
    """Ribs (an interrupted ring inside the body wall that comes and goes along z), sternum and spine."""
    zz, yy, xx = grid
    ax, ay = body
    r = np.sqrt((xx / (ax * taper * 0.9)) ** 2 + (yy / (ay * taper * 0.9)) ** 2)
    rib_period = rng.uniform(22.0, 28.0)
    on_slice = (np.cos(2 * np.pi * (zz + 0.35 * yy) / rib_period) > 0.55) & (np.abs(xx) > 25.0)
    ribs = (np.abs(r - 0.93) < 0.035) & on_slice
    spine = ((xx / 16.0) ** 2 + ((yy - ay * 0.72) / 14.0) ** 2 < 1.0) | (
        (np.abs(xx) < 4.0) & (yy > ay * 0.72) & (yy < ay * 0.95)
    )
    sternum = (np.abs(xx) < 10.0) & (np.abs(yy + ay * 0.9) < 4.0)
    np.copyto(vol, np.float32(_BONE), where=ribs | spine | sternum)


def _inside(
    mask: npt.NDArray[np.bool_], c: tuple[float, float, float], radii: tuple[float, ...], spacing: Spacing
) -> bool:
    """Whether the six extreme points and the center of an ellipsoid lie inside ``mask``."""
    pts = [list(c)]
    for axis in range(3):
        for sign in (-1.0, 1.0):
            q = list(c)
            q[axis] += sign * (radii[axis] + 2.0) / spacing[axis]
            pts.append(q)
    for p in pts:
        idx = tuple(round(v) for v in p)
        if any(i < 0 or i >= n for i, n in zip(idx, mask.shape, strict=True)) or not mask[idx]:
            return False
    return True


def _dist_mm(a: tuple[float, float, float], b: tuple[float, float, float], spacing: Spacing) -> float:
    return float(np.sqrt(sum(((p - q) * s) ** 2 for p, q, s in zip(a, b, spacing, strict=True))))


def head_ct(
    seed: int,
    slices: int = 32,
    size: int = 512,
    hemorrhage: bool | None = None,
    noise_hu: float | None = None,
) -> HeadPhantom:
    """A synthetic head CT: skull, brain (grey/white contrast), ventricles, optionally hemorrhages."""
    rng = np.random.default_rng(seed)
    px = float(rng.uniform(0.42, 0.5)) * 512 / size
    dz = float(rng.choice([2.5, 5.0]))
    spacing: Spacing = (dz, px, px)
    shape = (slices, size, size)
    z_mm = (np.arange(slices, dtype=np.float32) - slices / 2) * dz
    y_mm = (np.arange(size, dtype=np.float32) - size / 2) * px
    x_mm = (np.arange(size, dtype=np.float32) - size / 2) * px
    zz, yy, xx = z_mm[:, None, None], y_mm[None, :, None], x_mm[None, None, :]

    a, b, c = rng.uniform(68, 76), rng.uniform(86, 96), max(slices * dz * 0.62, 50.0)
    r = np.sqrt((xx / a) ** 2 + (yy / b) ** 2 + (zz / c) ** 2)
    vol = np.full(shape, _AIR, dtype=np.float32)
    vol[r < 1.08] = 20.0  # scalp
    vol[r < 1.06] = rng.uniform(900, 1300)  # skull
    brain = r < 1.0
    cortex = 0.25 * _smooth_noise(rng, shape, (max(slices // 4, 2), 12, 12)) + (r > 0.8)
    grey_white = np.where(cortex > 0.5, 38.0, 29.0).astype(np.float32)
    vol = np.where(brain, grey_white, vol)
    csf = (((xx - 6) / 5.0) ** 2 + (yy / 22.0) ** 2 + (zz / 18.0) ** 2 < 1.0) | (
        ((xx + 6) / 5.0) ** 2 + (yy / 22.0) ** 2 + (zz / 18.0) ** 2 < 1.0
    )
    vol[csf & brain] = 5.0
    # Calcified choroid plexus: small bright spots a classifier must not call hemorrhage.
    for side in (-1.0, 1.0):
        centre = (slices / 2 + rng.uniform(-2, 2), size / 2 + 12 / px, size / 2 + side * 7 / px)
        _paint_ellipsoid(vol, centre, (2.0, 2.0, 2.0), spacing, hu=rng.uniform(120, 250))

    has = bool(rng.random() < 0.5) if hemorrhage is None else hemorrhage
    sites = np.argwhere(brain[:, ::8, ::8] & ~csf[:, ::8, ::8] & (r[:, ::8, ::8] < 0.92)) * np.array(
        [1, 8, 8]
    )
    vol, bleeds, labels = _add_hemorrhages(
        vol, rng, brain, sites, spacing=spacing, count=int(rng.integers(1, 3)) if has else 0
    )
    sigma = float(rng.uniform(3.0, 6.0)) if noise_hu is None else noise_hu
    vol += rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    out = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    return HeadPhantom(out, spacing, bleeds, labels, seed)


def _add_hemorrhages(
    vol: F32,
    rng: np.random.Generator,
    brain: npt.NDArray[np.bool_],
    sites: npt.NDArray[np.int64],
    *,
    spacing: Spacing,
    count: int,
) -> tuple[F32, list[Hemorrhage], npt.NDArray[np.bool_]]:
    """Hyperdense ellipsoids (50-90 HU) clipped to the brain; a slice is positive where one changed it."""
    bleeds: list[Hemorrhage] = []
    labels = np.zeros(vol.shape[0], dtype=bool)
    for _ in range(count):
        p = sites[int(rng.integers(len(sites)))]
        centre = (float(p[0]), float(p[1]), float(p[2]))
        radii = (float(rng.uniform(3, 15)), float(rng.uniform(3, 20)), float(rng.uniform(3, 20)))
        hu = float(rng.uniform(50, 90))
        before = vol.copy()
        _paint_ellipsoid(vol, centre, radii, spacing, hu=hu, edge_mm=1.0)
        vol = np.where(brain, vol, before)  # bleeds stay inside the skull
        bleeds.append(Hemorrhage(centre, radii, hu))
        labels |= (np.abs(vol - before) > 10.0).any(axis=(1, 2))
    return vol, bleeds, labels


def window(volume: npt.NDArray[np.int16] | F32, center: float, width: float) -> npt.NDArray[np.uint8]:
    """Map HU linearly to 0..255 over [center - width/2, center + width/2], clipped (the worker's window)."""
    lo = center - width / 2.0
    scaled = (volume.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    out: npt.NDArray[np.uint8] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def to_dicom(
    phantom: ChestPhantom | HeadPhantom,
    *,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    signed: bool = False,
) -> SyntheticStudy:
    """Write the phantom as CT Image Storage instances (Part-10 bytes, explicit VR little endian).

    Stored values are uint16 with RescaleIntercept -1024 (or int16 with intercept 0 when ``signed``).
    """
    chest = isinstance(phantom, ChestPhantom)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    vol = phantom.volume
    intercept = 0 if signed else -1024
    stored = vol if signed else (vol.astype(np.int32) - intercept).clip(0, 65535).astype(np.uint16)
    dz, py, px = phantom.spacing
    base = _study_dataset(phantom, patient_id, patient_name)
    base.StudyInstanceUID, base.SeriesInstanceUID = study_uid, series_uid
    base.FrameOfReferenceUID = generate_uid()
    base.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    base.PixelSpacing = [round(py, 6), round(px, 6)]
    base.SliceThickness = dz
    base.Rows, base.Columns = vol.shape[1], vol.shape[2]
    base.SamplesPerPixel, base.PhotometricInterpretation = 1, "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.PixelRepresentation = 1 if signed else 0
    base.RescaleIntercept, base.RescaleSlope, base.RescaleType = intercept, 1, "HU"
    base.WindowCenter, base.WindowWidth = (-600, 1500) if chest else (40, 80)
    origin_x, origin_y = -vol.shape[2] * px / 2, -vol.shape[1] * py / 2
    instances: list[bytes] = []
    for i in range(vol.shape[0]):
        ds = Dataset()
        ds.update(base)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        # Slices go from head to feet: z decreases with the instance number.
        z = -i * dz
        ds.ImagePositionPatient = [round(origin_x, 4), round(origin_y, 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.PixelData = stored[i].tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        instances.append(buf.getvalue())
    return SyntheticStudy(instances, phantom, study_uid, series_uid)


def _study_dataset(
    phantom: ChestPhantom | HeadPhantom, patient_id: str | None, patient_name: str | None
) -> Dataset:
    """Patient, study and series attributes shared by every instance of a phantom's series."""
    chest = isinstance(phantom, ChestPhantom)
    now = dt.datetime(2026, 1, 1, 12, 0, 0)
    base = Dataset()
    base.SOPClassUID = CTImageStorage
    base.PatientName = patient_name or f"Synthetic^{'Chest' if chest else 'Head'}{phantom.seed}"
    base.PatientID = patient_id or f"SYN{phantom.seed:08d}"
    base.PatientBirthDate, base.PatientSex = "19600101", "O"
    base.StudyDate = base.SeriesDate = now.strftime("%Y%m%d")
    base.StudyTime = base.SeriesTime = now.strftime("%H%M%S")
    base.AccessionNumber = f"ACC{phantom.seed:08d}"[:16]
    base.StudyID = "1"
    base.Modality = "CT"
    base.Manufacturer = "Lucerna synthetic"
    base.BodyPartExamined = "CHEST" if chest else "HEAD"
    base.StudyDescription = "CT CHEST SYNTHETIC" if chest else "CT HEAD SYNTHETIC"
    base.SeriesDescription = "Axial 2.5D" if chest else "Axial brain"
    base.SeriesNumber = 1
    return base


def chest_study(seed: int, slices: int = 100, patient_id: str | None = None) -> SyntheticStudy:
    """A synthetic chest CT study as DICOM instances plus its ground truth."""
    return to_dicom(chest_ct(seed, slices), patient_id=patient_id)


def head_study(
    seed: int, slices: int = 32, hemorrhage: bool | None = None, patient_id: str | None = None
) -> SyntheticStudy:
    """A synthetic head CT study as DICOM instances plus its ground truth."""
    return to_dicom(head_ct(seed, slices, hemorrhage=hemorrhage), patient_id=patient_id)
