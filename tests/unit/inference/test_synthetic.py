"""The synthetic CT generator: geometry, ground truth and the DICOM it writes."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from lucerna.inference import synthetic


@pytest.fixture(scope="module")
def chest() -> synthetic.ChestPhantom:
    return synthetic.chest_ct(seed=7, slices=48, n_nodules=4)


def test_chest_shape_spacing_and_seed(chest: synthetic.ChestPhantom) -> None:
    assert chest.volume.shape == (48, 512, 512)
    assert chest.volume.dtype == np.int16
    dz, py, px = chest.spacing
    assert 1.25 <= dz <= 2.5
    assert 0.6 <= py == px <= 0.8
    again = synthetic.chest_ct(seed=7, slices=48, n_nodules=4)
    assert np.array_equal(again.volume, chest.volume)
    assert again.nodules == chest.nodules


def test_chest_tissues_have_plausible_hu(chest: synthetic.ChestPhantom) -> None:
    vol = chest.volume
    assert np.median(vol[:, :5, :5]) < -950  # air outside the body
    lung = vol[chest.lung_mask]
    assert -900 < np.median(lung) < -780
    assert (vol > 500).any()  # bone


def test_nodules_lie_in_the_lung_with_their_density(chest: synthetic.ChestPhantom) -> None:
    assert len(chest.nodules) == 4
    for nodule in chest.nodules:
        assert 3.0 <= nodule.diameter_mm <= 30.0
        z, y, x = (round(c) for c in nodule.center)
        assert chest.lung_mask[z, y, x]
        core = float(chest.volume[z, y, x])  # one voxel: noise is at most 25 HU sigma
        if nodule.kind == "ground-glass":
            assert -800 < core < -250
        else:  # solid, or the solid core of a part-solid nodule
            assert -120 < core < 180


def test_head_labels_follow_the_hemorrhage() -> None:
    head = synthetic.head_ct(seed=3, slices=24, hemorrhage=True)
    assert head.hemorrhages
    assert head.slice_labels.any()
    bleed = head.hemorrhages[0]
    z, y, x = (round(c) for c in bleed.center)
    assert head.slice_labels[z]
    assert 45 < head.volume[z, y - 1 : y + 2, x - 1 : x + 2].mean() < 100
    normal = synthetic.head_ct(seed=3, slices=24, hemorrhage=False)
    assert not normal.hemorrhages
    assert not normal.slice_labels.any()


def test_window_maps_hu_linearly_and_clips() -> None:
    hu = np.array([-1350, -600, 150, 2000], dtype=np.int16)
    assert synthetic.window(hu, -600, 1500).tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("signed", [False, True])
def test_dicom_instances_parse_with_the_attributes(chest: synthetic.ChestPhantom, signed: bool) -> None:
    study = synthetic.to_dicom(chest, signed=signed)
    assert len(study.instances) == 48
    first = pydicom.dcmread(io.BytesIO(study.instances[0]))
    second = pydicom.dcmread(io.BytesIO(study.instances[1]))
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.Modality == "CT"
    assert first.BodyPartExamined == "CHEST"
    assert first.StudyInstanceUID == second.StudyInstanceUID == study.study_uid
    assert first.SeriesInstanceUID == second.SeriesInstanceUID == study.series_uid
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    assert [float(v) for v in first.PixelSpacing] == pytest.approx(
        [chest.spacing[1], chest.spacing[2]], abs=1e-5
    )
    assert float(first.SliceThickness) == chest.spacing[0]
    assert float(first.ImagePositionPatient[2]) - float(second.ImagePositionPatient[2]) == pytest.approx(
        chest.spacing[0]
    )
    assert first.PatientID and first.StudyDescription
    hu = first.pixel_array.astype(np.int32) * int(first.RescaleSlope) + int(first.RescaleIntercept)
    assert np.array_equal(hu, chest.volume[0])


def test_head_study_is_head() -> None:
    study = synthetic.head_study(seed=1, slices=4, hemorrhage=True)
    ds = pydicom.dcmread(io.BytesIO(study.instances[0]))
    assert ds.BodyPartExamined == "HEAD"
    assert isinstance(study.phantom, synthetic.HeadPhantom)
