"""Test helpers for the inference worker: manifests, slices and CT instances made on the spot."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from lucerna.core.events.inprocess import InProcessBus
from lucerna.core.events.ports import Envelope, PublishError
from lucerna.core.model_manifest import Manifest

DETECTOR: dict[str, Any] = {
    "name": "lung-nodule-detector",
    "version": "1",
    "title": "test detector",
    "task": "detection",
    "weights": {"file": "1/model.onnx", "sha256": "0" * 64},
    "max_batch_size": 4,
    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [3, 32, 32]}],
    "outputs": [{"name": "detections", "datatype": "FP32", "shape": [10, 5]}],
    "preprocessing": {"window": {"center": -600, "width": 1500}, "size": [32, 32], "context_slices": 1},
    "postprocessing": {
        "score_threshold": 0.5,
        "nms_iou": 0.3,
        "group_slices": True,
        "max_findings": 5,
        "aggregate": "none",
    },
    "finding": {
        "code": {"system": "http://snomed.info/sct", "code": "786838002", "display": "Pulmonary nodule"},
        "body_site": {"system": "http://snomed.info/sct", "code": "39607008", "display": "Lung structure"},
        "measurements": ["diameter"],
    },
}

CLASSIFIER: dict[str, Any] = {
    **DETECTOR,
    "name": "head-ct-hemorrhage",
    "task": "classification",
    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 16, 16]}],
    "outputs": [{"name": "probability", "datatype": "FP32", "shape": [1]}],
    "preprocessing": {"window": {"center": 40, "width": 80}, "size": [16, 16], "context_slices": 0},
    "postprocessing": {
        "score_threshold": 0.5,
        "nms_iou": 0.5,
        "group_slices": False,
        "max_findings": 1,
        "aggregate": "max",
    },
    "finding": {
        "code": {"system": "http://snomed.info/sct", "code": "50960005", "display": "Hemorrhage"},
        "body_site": {"system": "http://snomed.info/sct", "code": "12738006", "display": "Brain structure"},
        "measurements": [],
    },
}


def manifest(base: dict[str, Any], **changes: Any) -> Manifest:
    """A manifest from ``base`` with top-level keys replaced."""
    return Manifest.model_validate({**base, **changes})


def ct_instance(
    study_uid: str,
    series_uid: str,
    number: int,
    *,
    hu: np.ndarray,
    z: float | None = None,
    spacing: float = 0.7,
    patient_id: str = "PID-1",
    sop_uid: str | None = None,
) -> bytes:
    """One CT slice as Part-10 bytes with the given HU image (stored with intercept -1024)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [0.0, 0.0, float(-number if z is None else z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = hu.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = (hu.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class RecordingBus(InProcessBus):
    """The in-process bus, remembering what was published and refusing routing keys on demand."""

    def __init__(self) -> None:
        super().__init__(retry_base_delay=0.01, retry_max_delay=0.05, shutdown_grace=1.0)
        self.published: list[Envelope] = []
        self.refuse: set[str] = set()

    async def publish(self, envelope: Envelope) -> None:
        if envelope.routing_key in self.refuse:
            raise PublishError(f"refused {envelope.routing_key}")
        self.published.append(envelope)
        await super().publish(envelope)

    def of(self, routing_key: str) -> list[Envelope]:
        return [e for e in self.published if e.routing_key == routing_key]


class Blobs:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        self.data[sha256] = data
        return sha256

    async def get(self, sha256: str) -> bytes:
        return self.data[sha256]
