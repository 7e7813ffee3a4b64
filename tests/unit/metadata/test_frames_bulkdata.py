"""Frames split from native and encapsulated pixel data, bulk data URIs and values (pure)."""

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from lucerna.metadata.bulkdata import (
    as_little_endian,
    element_value,
    is_bulk_placeholder,
    little_endian,
    read_dataset,
    with_bulkdata_uris,
)
from lucerna.metadata.errors import InvalidRequestError, NotAcceptableError, NotFoundError
from lucerna.metadata.frames import parse_frame_list, pixel_frames
from tests.unit.metadata.dicomweb_testkit import bundled_file, part10

pytestmark = pytest.mark.unit


def _frames(name: str):  # type: ignore[no-untyped-def]
    ds = read_dataset(bundled_file(name))
    return ds, pixel_frames(ds, str(ds.file_meta.TransferSyntaxUID))


def test_native_single_frame_is_the_pixel_data() -> None:
    ds, frames = _frames("CT_small.dcm")
    assert not frames.encapsulated
    assert frames.media_type == "application/octet-stream"
    assert frames.part_transfer_syntax == "1.2.840.10008.1.2.1"
    assert frames.frames == (ds.PixelData,)


def test_native_multi_frame_is_sliced_by_frame_size() -> None:
    ds, frames = _frames("rtdose.dcm")  # implicit VR, 15 frames of 10x10 32-bit
    assert len(frames.frames) == 15
    assert all(len(frame) == 10 * 10 * 4 for frame in frames.frames)
    assert b"".join(frames.frames) == ds.PixelData
    assert frames.select([15, 1]) == [frames.frames[14], frames.frames[0]]


def test_big_endian_native_frames_are_served_little_endian() -> None:
    _, little = _frames("MR_small.dcm")
    _, big = _frames("MR_small_bigendian.dcm")
    assert big.frames == little.frames


@pytest.mark.parametrize(
    ("name", "media_type", "count", "magic"),
    [
        ("SC_rgb_rle_2frame.dcm", "image/dicom-rle", 2, b"\x03\x00\x00\x00"),  # 3 RLE segments
        ("JPEG-lossy.dcm", "image/jpeg", 1, b"\xff\xd8"),
        ("JPEG2000.dcm", "image/jp2", 1, b"\xff\x4f"),
        ("MR_small_jpeg_ls_lossless.dcm", "image/jls", 1, b"\xff\xd8"),
    ],
)
def test_encapsulated_frames_keep_their_compressed_bytes(
    name: str, media_type: str, count: int, magic: bytes
) -> None:
    ds, frames = _frames(name)
    assert frames.encapsulated
    assert frames.media_type == media_type
    assert frames.part_transfer_syntax == str(ds.file_meta.TransferSyntaxUID)
    assert len(frames.frames) == count
    assert all(frame.startswith(magic) for frame in frames.frames)
    assert all(frame in ds.PixelData for frame in frames.frames)


def test_one_bit_frames_are_cut_at_bit_offsets() -> None:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.NumberOfFrames = 3, 3, 1, 1, 3
    bits = "110010011" + "000000001" + "111111111"  # pixel order, least significant bit first
    packed = int(bits[::-1], 2).to_bytes(4, "little")
    ds.PixelData = packed
    frames = pixel_frames(ds, ExplicitVRLittleEndian)
    expected = [int(bits[i * 9 : (i + 1) * 9][::-1], 2).to_bytes(2, "little") for i in range(3)]
    assert list(frames.frames) == expected


def test_frame_numbers_out_of_range_are_404() -> None:
    _, frames = _frames("CT_small.dcm")
    with pytest.raises(NotFoundError, match="frame 2 is out of range: this instance has 1 frame"):
        frames.select([1, 2])


def test_no_pixel_data_is_404() -> None:
    ds = read_dataset(bundled_file("rtplan.dcm"))
    with pytest.raises(NotFoundError, match="no pixel data"):
        pixel_frames(ds, "1.2.840.10008.1.2")


def test_video_is_not_split() -> None:
    ds, _ = _frames("CT_small.dcm")
    with pytest.raises(NotAcceptableError, match="video"):
        pixel_frames(ds, "1.2.840.10008.1.2.4.102")


@pytest.mark.parametrize("text", ["", "0", "1,,2", "a", "1;2", "-1"])
def test_malformed_frame_lists_are_400(text: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_frame_list(text)


def test_frame_lists() -> None:
    assert parse_frame_list("1") == [1]
    assert parse_frame_list("3,1,2") == [3, 1, 2]


def _with_nested_bulk() -> Dataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    item = Dataset()
    item.add_new(0x00420011, "OB", bytes(range(256)) * 8)  # Encapsulated Document, 2 KiB
    ds.add_new(0x00400555, "SQ", Sequence([Dataset(), item]))  # Acquisition Context Sequence
    ds.add_new(0x00660023, "OW", b"\x01\x02\x03\x04")  # Triangle Point Index List
    return ds


def test_bulk_placeholders_get_uris_at_any_depth() -> None:
    stored = {
        "7FE00010": {"vr": "OW"},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^J"}]},
        "00400555": {"vr": "SQ", "Value": [{}, {"00420011": {"vr": "OB"}}]},
        "00660023": {"vr": "OW", "InlineBinary": "AQIDBA=="},
    }
    annotated = with_bulkdata_uris(stored, lambda path: f"bulk/{path}")
    assert annotated["7FE00010"] == {"vr": "OW", "BulkDataURI": "bulk/7FE00010"}
    assert annotated["00400555"]["Value"][1]["00420011"] == {
        "vr": "OB",
        "BulkDataURI": "bulk/00400555/1/00420011",
    }
    assert annotated["00660023"] == stored["00660023"]
    assert annotated["00100010"] == stored["00100010"]
    assert stored["7FE00010"] == {"vr": "OW"}  # the stored record is not changed
    assert is_bulk_placeholder({"vr": "OB"}) and not is_bulk_placeholder({"vr": "PN"})


def test_bulk_values_are_read_from_the_stored_bytes() -> None:
    ds = read_dataset(part10(_with_nested_bulk()))
    assert element_value(ds, "00400555/1/00420011").value == bytes(range(256)) * 8
    assert element_value(ds, "00660023").value == b"\x01\x02\x03\x04"
    for path, message in [
        ("00400555/5/00420011", "no sequence item 5"),
        ("00100010", "00100010 is not in this instance"),
        ("nonsense", "expected a tag"),
    ]:
        with pytest.raises(NotFoundError, match=message):
            element_value(ds, path)


def test_big_endian_words_are_swapped() -> None:
    assert little_endian(b"\x01\x02\x03\x04", 2) == b"\x02\x01\x04\x03"
    assert little_endian(b"\x01\x02\x03\x04", 4) == b"\x04\x03\x02\x01"
    ds = pydicom.dcmread(BytesIO(bundled_file("MR_small_bigendian.dcm")))
    value = element_value(ds, "7FE00010")
    assert not value.little_endian
    assert as_little_endian(value) == pydicom.dcmread(BytesIO(bundled_file("MR_small.dcm"))).PixelData
