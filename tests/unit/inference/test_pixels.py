"""Decoding pixel data of every common transfer syntax, on pydicom's bundled test files."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from lucerna.inference.pixels import UndecodablePixels, decode

# Never get_testdata_files(): it tries to download the files it does not bundle.
FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"


def read(name: str) -> bytes:
    return (FILES / name).read_bytes()


def reference(name: str) -> np.ndarray:
    return decode(read(name)).frames


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
        ("MR_small_expb.dcm", "1.2.840.10008.1.2.2"),
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
        ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
        ("MR_small_padded.dcm", "1.2.840.10008.1.2.1"),
    ],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(name: str, syntax: str) -> None:
    assert pydicom.dcmread(FILES / name).file_meta.TransferSyntaxUID == syntax
    decoded = decode(read(name))
    assert decoded.monochrome
    assert decoded.frames.dtype == np.float32
    assert decoded.frames.shape == (1, 64, 64)
    np.testing.assert_array_equal(decoded.frames, reference("MR_small.dcm"))


def test_rescale_slope_and_intercept_give_hounsfield_units() -> None:
    raw = pydicom.dcmread(FILES / "CT_small.dcm")
    decoded = decode(read("CT_small.dcm"))
    assert (raw.RescaleSlope, raw.RescaleIntercept) == (1, -1024)
    np.testing.assert_array_equal(decoded.frames[0], raw.pixel_array.astype(np.float32) - 1024)
    assert decoded.modality == "CT"
    assert decoded.sop_instance_uid == raw.SOPInstanceUID
    geometry = decoded.geometry[0]
    assert geometry.pixel_spacing == (0.661468, 0.661468)
    assert geometry.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert geometry.position is not None


def test_deflated_explicit_little_endian_decodes() -> None:
    assert pydicom.dcmread(FILES / "image_dfl.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    decoded = decode(read("image_dfl.dcm"))
    assert decoded.frames.shape == (1, 512, 512)
    # Same data set written uncompressed: the deflate wrapper changes nothing in the pixels.
    plain = pydicom.dcmread(FILES / "image_dfl.dcm")
    np.testing.assert_array_equal(decoded.frames[0], plain.pixel_array.astype(np.float32))


def test_jpeg_lossless_process_14_matches_rle_of_the_same_image() -> None:
    jpeg = decode(read("SC_rgb_jpeg_gdcm.dcm"))
    rle = decode(read("SC_rgb_rle.dcm"))
    assert not jpeg.monochrome
    np.testing.assert_array_equal(jpeg.frames, rle.frames)


@pytest.mark.parametrize(
    ("name", "mean_error", "max_error"),
    [
        ("SC_rgb_dcmtk_+eb+cr.dcm", 0.5, 2),  # high quality, RGB
        ("SC_rgb_jpeg_dcmtk.dcm", 1.0, 8),  # YBR_FULL
        ("SC_rgb_jpeg_lossy_gdcm.dcm", 3.0, 80),  # low quality: rings at the edges of the colour bars
    ],
)
def test_jpeg_baseline_matches_the_lossless_image_within_the_codec_tolerance(
    name: str, mean_error: float, max_error: int
) -> None:
    lossy = decode(read(name)).frames.astype(np.int16)
    exact = decode(read("SC_rgb_rle.dcm")).frames.astype(np.int16)
    assert lossy.shape == exact.shape == (1, 100, 100, 3)
    error = np.abs(lossy - exact)
    assert error.mean() < mean_error
    assert error.max() <= max_error


def test_jpeg_ls_near_lossless_stays_within_its_error_bound() -> None:
    lossy = decode(read("SC_rgb_jls_lossy_line.dcm")).frames.astype(np.int16)
    exact = decode(read("SC_rgb_rle.dcm")).frames.astype(np.int16)
    near = pydicom.dcmread(FILES / "SC_rgb_jls_lossy_line.dcm")
    assert near.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.81"
    assert np.abs(lossy - exact).max() <= 3  # NEAR parameter of the encoder


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("JPGExtended.dcm", (1, 1024, 256)),
        ("JPEG2000.dcm", (1, 1024, 256)),
        ("693_J2KI.dcm", (1, 512, 512)),
        ("JPEGLSNearLossless_16.dcm", (1, 50, 10)),
    ],
)
def test_lossy_monochrome_syntaxes_decode(name: str, shape: tuple[int, ...]) -> None:
    decoded = decode(read(name))
    assert decoded.monochrome
    assert decoded.frames.shape == shape
    assert np.isfinite(decoded.frames).all()


def test_jpeg2000_lossy_ct_is_in_hounsfield_units() -> None:
    frames = decode(read("693_J2KI.dcm")).frames
    assert -3000 - 1024 < frames.min() < -1024 < frames.max() < 3000


def test_multiframe_has_one_plane_per_frame() -> None:
    decoded = decode(read("SC_rgb_rle_2frame.dcm"))
    assert decoded.frames.shape == (2, 100, 100, 3)
    assert len(decoded.geometry) == 2


def test_truncated_pixel_data_raises_naming_the_instance() -> None:
    uid = pydicom.dcmread(FILES / "MR_truncated.dcm").SOPInstanceUID
    with pytest.raises(UndecodablePixels, match=f"instance {uid}: pixel data .* cannot be decoded"):
        decode(read("MR_truncated.dcm"))


def test_broken_jpeg_stream_raises() -> None:
    uid = pydicom.dcmread(FILES / "JPEG-lossy.dcm").SOPInstanceUID
    with pytest.raises(UndecodablePixels, match=f"instance {uid}: pixel data \\(JPEG Extended"):
        decode(read("JPEG-lossy.dcm"))


def test_no_pixel_data_raises() -> None:
    with pytest.raises(UndecodablePixels, match="has no Pixel Data"):
        decode(read("test-SR.dcm"))


def test_not_dicom_raises_with_the_given_uid() -> None:
    with pytest.raises(UndecodablePixels, match=r"instance 1\.2\.3: not a readable DICOM Part-10 file"):
        decode(b"definitely not DICOM", "1.2.3")


def test_wrong_rows_and_columns_raise() -> None:
    ds = pydicom.dcmread(FILES / "MR_small.dcm")
    ds.Rows = 128
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UndecodablePixels, match=ds.SOPInstanceUID):
        decode(buffer.getvalue())


def test_unsupported_transfer_syntax_raises() -> None:
    ds = pydicom.dcmread(FILES / "MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(UndecodablePixels, match="cannot be decoded"):
        decode(buffer.getvalue())


def test_explicit_little_endian_reference_is_what_we_compare_against() -> None:
    assert pydicom.dcmread(FILES / "MR_small.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
