"""DICOM test data made on the spot: small synthetic CT studies as Part-10 files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_slice(
    study_uid: str, series_uid: str, number: int, *, patient: str = "DOE^JOHN", size: int = 64
) -> Dataset:
    """One CT slice with the attributes PACS send and QIDO matches on."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient
    ds.PatientID = "PID-" + patient.split("^", maxsplit=1)[0]
    ds.StudyDate = "20260115"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "CT CHEST"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (np.arange(size * size, dtype=np.int16) % 400).tobytes()
    return ds


def write_ct_study(folder: Path, slices: int = 3, *, patient: str = "DOE^JOHN", size: int = 64) -> str:
    """Write a study of ``slices`` files into ``folder``; returns its Study Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for number in range(1, slices + 1):
        ds = ct_slice(study_uid, series_uid, number, patient=patient, size=size)
        ds.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)
    return study_uid
