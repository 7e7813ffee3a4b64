"""Part-10 bytes to records: identity, DICOM JSON without bulk data, refusals with their reasons."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from lucerna.core.storage.ports import BlobRef
from lucerna.ingestion.outcomes import FailureReason
from lucerna.ingestion.records import InvalidInstanceError, build_record, parse_instance
from tests.factories import ct_slice

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def slice_ds() -> Dataset:
    return ct_slice(STUDY, SERIES, 7, patient="Doe^Jane", size=16)


def test_identity_and_header(part10: Callable[[Dataset], bytes]) -> None:
    ds = slice_ds()
    parsed = parse_instance(part10(ds))
    assert (parsed.study_uid, parsed.series_uid) == (STUDY, SERIES)
    assert parsed.sop_instance_uid == ds.SOPInstanceUID
    assert parsed.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert parsed.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    header = parsed.dataset
    assert header["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert header["00200013"] == {"vr": "IS", "Value": [7]}
    assert header["00280010"] == {"vr": "US", "Value": [16]}
    assert not any(tag.startswith("0002") for tag in header), "file meta is not part of the data set"


def test_bulk_data_is_left_in_the_bytes(part10: Callable[[Dataset], bytes]) -> None:
    ds = slice_ds()
    ds.add_new(0x00091010, "LO", "LUCERNA TEST")  # private creator
    ds.add_new(0x00091011, "OB", b"\x01" * 1024)  # exactly 1 KiB: inline
    ds.add_new(0x00091012, "OB", b"\x02" * 1026)  # above: bulk
    item = Dataset()
    item.add_new(0x00091010, "LO", "LUCERNA TEST")
    item.add_new(0x00091013, "OB", b"\x03" * 4096)
    ds.add_new(0x00091014, "SQ", Sequence([item]))
    ds.add_new(0x00091015, "SQ", Sequence([]))
    header = parse_instance(part10(ds)).dataset
    assert header["7FE00010"] == {"vr": "OW"}
    assert header["00091011"]["vr"] == "OB" and len(header["00091011"]["InlineBinary"]) == 1368
    assert header["00091012"] == {"vr": "OB"}
    assert header["00091014"]["Value"][0]["00091013"] == {"vr": "OB"}
    assert header["00091015"] == {"vr": "SQ"}
    assert len(json.dumps(header)) < 4000


def test_huge_numeric_values_are_bulk_too(part10: Callable[[Dataset], bytes]) -> None:
    ds = slice_ds()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # 4-byte lengths: a DS may exceed 64 KiB
    ds.ContourData = [1.5] * 10_000
    ds.PixelSpacing = [0.5, 0.5]
    header = parse_instance(part10(ds)).dataset
    assert header["30060050"] == {"vr": "DS"}
    assert header["00280030"] == {"vr": "DS", "Value": [0.5, 0.5]}
    assert type(header["30060050"]["vr"]) is str


def test_nan_and_infinity_become_null(part10: Callable[[Dataset], bytes]) -> None:
    ds = slice_ds()
    ds.add_new(0x00091010, "LO", "LUCERNA TEST")
    ds.add_new(0x00091018, "FD", [math.nan, math.inf, 2.0])
    header = parse_instance(part10(ds)).dataset
    assert header["00091018"]["Value"] == [None, None, 2.0]
    json.dumps(header, allow_nan=False)


def test_record_carries_identity_hash_and_derived_fields(part10: Callable[[Dataset], bytes]) -> None:
    parsed = parse_instance(part10(slice_ds()))
    at = datetime(2026, 1, 1, tzinfo=UTC)
    record = build_record(parsed, BlobRef("ab" * 32, 1234, created=True), "stow:test@127.0.0.1", at)
    assert (record.sha256, record.size, record.source, record.received_at) == (
        "ab" * 32,
        1234,
        "stow:test@127.0.0.1",
        at,
    )
    assert record.attributes["PatientName"] == "DOE^JANE"
    assert record.attributes["StudyInstanceUID"] == STUDY
    assert record.dataset is parsed.dataset


def test_not_dicom_cannot_be_understood() -> None:
    with pytest.raises(InvalidInstanceError) as refused:
        parse_instance(b"%PDF-1.7 definitely not DICOM")
    assert refused.value.reason is FailureReason.CANNOT_UNDERSTAND
    assert refused.value.sop_instance_uid is None


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
def test_a_missing_uid_does_not_match(part10: Callable[[Dataset], bytes], keyword: str) -> None:
    ds = slice_ds()
    delattr(ds, keyword)
    with pytest.raises(InvalidInstanceError, match=f"{keyword} is missing") as refused:
        parse_instance(part10(ds))
    assert refused.value.reason is FailureReason.DATA_SET_DOES_NOT_MATCH


def test_an_invalid_uid_does_not_match_and_says_which(part10: Callable[[Dataset], bytes]) -> None:
    ds = slice_ds()
    ds.StudyInstanceUID = "1.2.03.4"
    with pytest.raises(
        InvalidInstanceError, match=r"StudyInstanceUID '1\.2\.03\.4' is not a valid UID"
    ) as refused:
        parse_instance(part10(ds))
    assert refused.value.reason is FailureReason.DATA_SET_DOES_NOT_MATCH
    assert refused.value.sop_instance_uid == ds.SOPInstanceUID  # still reported to the sender


def test_no_transfer_syntax_in_the_file_meta() -> None:
    ds = slice_ds()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    write_dataset(out, ds)
    with pytest.raises(InvalidInstanceError) as refused:
        parse_instance(out.getvalue())
    assert refused.value.reason is FailureReason.CANNOT_UNDERSTAND


def test_bytes_cut_inside_the_pixel_data_are_refused(part10: Callable[[Dataset], bytes]) -> None:
    data = part10(slice_ds())
    with pytest.raises(
        InvalidInstanceError, match=r"truncated: element \(7FE0,0010\) declares 512 bytes"
    ) as refused:
        parse_instance(data[:-100])
    assert refused.value.reason is FailureReason.CANNOT_UNDERSTAND


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])  # explicit, implicit VR
def test_large_pixel_data_is_described_without_being_read(
    part10: Callable[[Dataset], bytes], syntax: str
) -> None:
    ds = ct_slice(STUDY, SERIES, 7, size=64)  # 8 KiB of pixels: past the deferred-read size
    ds.file_meta.TransferSyntaxUID = syntax
    ds.add_new(0x7FE10010, "LO", "LUCERNA TEST")  # elements after the pixel data are kept
    ds.add_new(0x7FE11001, "LO", "after the pixels")
    header = parse_instance(part10(ds)).dataset
    assert header["7FE00010"] == {"vr": "OW"}
    assert "7FE11001" in header  # LO when explicit, UN (inline binary) when implicit


def test_bytes_cut_inside_large_pixel_data_are_refused(part10: Callable[[Dataset], bytes]) -> None:
    data = part10(ct_slice(STUDY, SERIES, 7, size=64))
    expected = r"truncated: element \(7FE0,0010\) declares 8192 bytes but only 8092 follow"
    with pytest.raises(InvalidInstanceError, match=expected):
        parse_instance(data[:-100])
