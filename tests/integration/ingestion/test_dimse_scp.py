"""The DIMSE listener against real SCUs: pynetdicom from the test, DCMTK's echoscu and storescu."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pydicom.data
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.integration.ingestion.conftest import AE_TITLE, RunningIngestion

TEST_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
# One file per transfer syntax the listener accepts (compressed ones are stored as received).
TRANSFER_SYNTAX_SAMPLES = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
]


def dataset_bytes(part10: bytes) -> bytes:
    """The data set after the preamble and file meta group (whose implementation UIDs differ by writer)."""
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]


def scu(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


async def run_dcmtk(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, output.decode(errors="replace")


def relabel(names: list[str], folder: Path) -> list[Path]:
    """Copies of test files as one new study with fresh UIDs (pixel data untouched, still compressed)."""
    study = generate_uid()
    out = []
    for name in names:
        ds = pydicom.dcmread(TEST_FILES / name)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


async def test_pynetdicom_echo(ingestion: RunningIngestion) -> None:
    def echo() -> int:
        ae = scu()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", ingestion.dimse_port, ae_title=AE_TITLE)
        assert assoc.is_established
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.Status)

    assert await asyncio.to_thread(echo) == 0x0000


async def test_every_transfer_syntax_is_stored_as_received(
    ingestion: RunningIngestion, tmp_path: Path
) -> None:
    files = relabel(TRANSFER_SYNTAX_SAMPLES, tmp_path)

    def store() -> list[int]:
        ae = scu()
        for path in files:
            meta = pydicom.dcmread(path, stop_before_pixels=True)
            ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", ingestion.dimse_port, ae_title=AE_TITLE)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
        assoc.release()
        return statuses

    assert await asyncio.to_thread(store) == [0x0000] * len(files)
    resources = ingestion.resources
    for path in files:
        sent = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        record = await resources.metadata.get_instance(ds.SOPInstanceUID)
        assert record is not None, path.name
        assert record.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        assert record.source == "dimse:TESTSCU@127.0.0.1"
        stored = await resources.blobs.get(record.sha256)
        assert hashlib.sha256(stored).hexdigest() == record.sha256
        assert dataset_bytes(stored) == dataset_bytes(sent), f"{path.name} was not stored as received"
    [ready] = await ingestion.wait_ready(ds.StudyInstanceUID)  # released: the burst's boundary
    assert ready.burst_instances == len(files)


async def test_refusals_come_back_as_failure_statuses(ingestion: RunningIngestion) -> None:
    from tests.factories import ct_slice  # noqa: PLC0415 - only this test builds odd data sets

    sop = generate_uid()
    original = ct_slice(generate_uid(), generate_uid(), 1, size=8)
    original.SOPInstanceUID = sop
    changed = ct_slice(original.StudyInstanceUID, original.SeriesInstanceUID, 2, size=8)
    changed.SOPInstanceUID = sop
    no_study = ct_slice(generate_uid(), generate_uid(), 1, size=8)
    del no_study.StudyInstanceUID

    def store() -> list[tuple[int, str]]:
        ae = scu()
        ae.add_requested_context(original.SOPClassUID, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", ingestion.dimse_port, ae_title=AE_TITLE)
        assert assoc.is_established
        results = []
        for ds in (original, original, changed, no_study):
            status = assoc.send_c_store(ds)
            results.append((int(status.Status), str(status.get("ErrorComment", ""))))
        assoc.release()
        return results

    stored, again, conflicting, invalid = await asyncio.to_thread(store)
    assert stored == (0x0000, "")
    assert again == (0x0000, "")  # identical bytes: already stored, success
    assert conflicting[0] == 0x0111
    assert "different bytes" in conflicting[1]
    assert invalid == (0xA900, "StudyInstanceUID is missing")


@pytest.mark.parametrize(
    ("calling", "called"), [("INTRUDER", AE_TITLE), ("TESTSCU", "SOMEONE_ELSE")], ids=["calling", "called"]
)
async def test_unknown_ae_titles_are_rejected(ingestion: RunningIngestion, calling: str, called: str) -> None:
    def associate() -> Any:
        ae = scu(calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", ingestion.dimse_port, ae_title=called)
        if assoc.is_established:
            assoc.release()
        return assoc

    assoc = await asyncio.to_thread(associate)
    assert assoc.is_rejected


async def test_dcmtk_echoscu(ingestion: RunningIngestion) -> None:
    code, output = await run_dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(ingestion.dimse_port))
    assert code == 0, output


async def test_dcmtk_storescu_study(
    ingestion: RunningIngestion, ct_folder: Callable[..., tuple[str, list[Path]]]
) -> None:
    study, files = ct_folder(4)
    code, output = await run_dcmtk(
        "storescu",
        "-aet",
        "MODALITY1",
        "-aec",
        AE_TITLE,
        "127.0.0.1",
        str(ingestion.dimse_port),
        "+sd",
        str(files[0].parent),
    )
    assert code == 0, output
    records = await ingestion.resources.metadata.list_instances(study)
    assert len(records) == 4
    assert {r.source for r in records} == {"dimse:MODALITY1@127.0.0.1"}
    [ready] = await ingestion.wait_ready(study)
    assert (ready.burst, ready.burst_instances, list(ready.modalities)) == (1, 4, ["CT"])


async def test_dcmtk_storescu_from_a_calling_ae_not_allowed(
    ingestion: RunningIngestion, ct_folder: Callable[..., tuple[str, list[Path]]]
) -> None:
    study, files = ct_folder(1)
    code, output = await run_dcmtk(
        "storescu",
        "-aet",
        "STRANGER",
        "-aec",
        AE_TITLE,
        "127.0.0.1",
        str(ingestion.dimse_port),
        str(files[0]),
    )
    assert code != 0
    assert "Rejected" in output or "rejected" in output, output
    assert await ingestion.resources.metadata.list_instances(study) == []


async def test_an_aborted_association_still_ends_the_burst(
    ingestion: RunningIngestion, ct_folder: Callable[..., tuple[str, list[Path]]]
) -> None:
    study, files = ct_folder(2)

    def store_then_abort() -> list[int]:
        ae = scu()
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", ingestion.dimse_port, ae_title=AE_TITLE)
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
        assoc.abort()
        return statuses

    assert await asyncio.to_thread(store_then_abort) == [0, 0]
    [ready] = await ingestion.wait_ready(study)
    assert ready.burst_instances == 2
