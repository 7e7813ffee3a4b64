"""The direct decoding of common elements gives what pydicom's conversion gives, or steps aside."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from lucerna.ingestion import records
from lucerna.ingestion.raw_values import header_encoding, raw_json
from tests.factories import ct_slice

TEST_FILES = Path(get_testdata_file("CT_small.dcm") or "").parent  # pydicom's bundled corpus, no download


def odd_values() -> Dataset:
    ds = ct_slice("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", 3, size=16)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "AXIAL"]  # an empty value among others
    ds.StudyDescription = "  leading spaces kept  "
    ds.SeriesDescription = ""
    ds.ReferringPhysicianName = "Doe^John^^Dr=ドウ^ジョン"
    ds.PatientComments = "a\\backslash in text"
    ds.ImagePositionPatient = ["-125.5", "1e2", " 3 "]
    ds.WindowCenter = ["40", "400"]
    ds.add_new(0x00181310, "US", [0, 256, 256, 0])  # Acquisition Matrix
    ds.add_new(0x00280106, "SS", -2000)  # Smallest Image Pixel Value
    ds.add_new(0x00189327, "FD", float("nan"))
    ds.add_new(0x00091010, "LO", "LUCERNA TEST")
    ds.add_new(0x00091011, "OB", b"\x01\x02\x03")
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def encode(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_each_element_matches_pydicom_or_is_left_to_it(syntax: str) -> None:
    ds = pydicom.dcmread(BytesIO(encode(odd_values(), syntax)), defer_size=1024)
    encoding = header_encoding(ds)
    assert encoding == "utf_8"
    fast = 0
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        direct = raw_json(raw, encoding, 1024) if isinstance(raw, pydicom.dataelem.RawDataElement) else None
        if direct is not None:
            fast += 1
            assert direct == records._element_json(ds[tag], encoding), f"{tag}"
    assert fast >= 25


def test_headers_of_pydicoms_corpus_are_the_same_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    assert len(files) > 50
    both: list[dict[str, object]] = [{}, {}]
    for index, decode in enumerate((raw_json, lambda *_: None)):
        monkeypatch.setattr(records, "raw_json", decode)
        for path in files:
            both[index][path.name] = outcome(records.parse_instance, path.read_bytes())
    assert both[0] == both[1]


def outcome(parse: Callable[[bytes], records.ParsedInstance], data: bytes) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return vars(parse(data))
        except records.InvalidInstanceError as refused:
            return (refused.reason, refused.message)
