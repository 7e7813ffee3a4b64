"""WADO-RS over HTTP against the embedded store: byte-identical instances, metadata, frames, bulk data."""

import hashlib

import pytest

from lucerna.events.v1.events_pb2 import AuditRecord
from lucerna.metadata.bulkdata import read_dataset
from lucerna.metadata.frames import pixel_frames
from tests.unit.metadata.dicomweb_testkit import BASE_URL, Env, read_parts

pytestmark = pytest.mark.unit

ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _instance_path(env: Env, name: str) -> str:
    record = env.records[name]
    series = f"/dicom-web/studies/{record.study_uid}/series/{record.series_uid}"
    return f"{series}/instances/{record.sop_instance_uid}"


async def test_study_parts_are_the_stored_bytes(env: Env) -> None:
    study = env.records["a1-1"].study_uid
    response = await env.client.get(f"/dicom-web/studies/{study}", headers={"Accept": ANY_SYNTAX})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(
        'multipart/related; type="application/dicom"; boundary='
    )
    parts = read_parts(response.headers["content-type"], response.content)
    assert len(parts) == 5
    stored = {name: env.records[name] for name in ("a1-1", "a1-2", "a1-3", "a2-1", "a2-2")}
    expected = [env.bytes_of[r.sop_instance_uid] for r in stored.values()]
    assert [payload for _, payload in parts] == expected  # series number, instance number order
    for (headers, payload), record in zip(parts, stored.values(), strict=True):
        assert hashlib.sha256(payload).hexdigest() == record.sha256
        assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
        assert headers["content-location"] == BASE_URL + _instance_path(
            env, next(n for n, r in env.records.items() if r.sop_instance_uid == record.sop_instance_uid)
        )


async def test_series_and_instance_retrieval(env: Env) -> None:
    record = env.records["a2-1"]
    response = await env.client.get(f"/dicom-web/studies/{record.study_uid}/series/{record.series_uid}")
    assert [p for _, p in read_parts(response.headers["content-type"], response.content)] == [
        env.bytes_of[env.records["a2-1"].sop_instance_uid],
        env.bytes_of[env.records["a2-2"].sop_instance_uid],
    ]
    jpeg = env.records["JPEG-lossy.dcm"]
    response = await env.client.get(
        _instance_path(env, "JPEG-lossy.dcm"),
        headers={
            "Accept": 'multipart/related; type="application/dicom"; '
            f"transfer-syntax={jpeg.transfer_syntax_uid}"
        },
    )
    [(headers, payload)] = read_parts(response.headers["content-type"], response.content)
    assert payload == env.bytes_of[jpeg.sop_instance_uid]
    assert headers["content-type"] == f"application/dicom; transfer-syntax={jpeg.transfer_syntax_uid}"


async def test_single_part_instance(env: Env) -> None:
    response = await env.client.get(
        _instance_path(env, "CT_small.dcm"), headers={"Accept": "application/dicom"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom")
    assert response.content == env.bytes_of[env.records["CT_small.dcm"].sop_instance_uid]


async def test_transcoding_is_refused_with_406(env: Env) -> None:
    response = await env.client.get(
        _instance_path(env, "JPEG-lossy.dcm"),
        headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
        },
    )
    assert response.status_code == 406
    error = response.json()["error"]
    assert "does not transcode" in error and "1.2.840.10008.1.2.4.51" in error
    study = env.records["a1-1"].study_uid
    assert (
        await env.client.get(f"/dicom-web/studies/{study}", headers={"Accept": "image/png"})
    ).status_code == 406
    single = await env.client.get(f"/dicom-web/studies/{study}", headers={"Accept": "application/dicom"})
    assert single.status_code == 406  # five instances do not fit a single-part answer


async def test_unknown_resources_are_404_with_what_is_missing(env: Env) -> None:
    record = env.records["a1-1"]
    cases = {
        "/dicom-web/studies/1.2.3.999": "study 1.2.3.999 is not stored",
        f"/dicom-web/studies/{record.study_uid}/series/1.2.3.999": (
            f"series 1.2.3.999 is not in study {record.study_uid}"
        ),
        f"/dicom-web/studies/{record.study_uid}/series/{record.series_uid}/instances/1.2.3.999": (
            "instance 1.2.3.999 is not stored"
        ),
        f"/dicom-web/studies/1.2.3.999/series/{record.series_uid}/instances/{record.sop_instance_uid}": (
            f"instance {record.sop_instance_uid} is not in series {record.series_uid} of study 1.2.3.999"
        ),
        "/dicom-web/studies/1.2.3.999/metadata": "study 1.2.3.999 is not stored",
    }
    for path, message in cases.items():
        response = await env.client.get(path)
        assert response.status_code == 404, path
        assert message in response.json()["error"]


async def test_metadata_carries_bulk_data_uris(env: Env) -> None:
    record = env.records["CT_small.dcm"]
    response = await env.client.get(_instance_path(env, "CT_small.dcm") + "/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    [dataset] = response.json()
    uri = dataset["7FE00010"]["BulkDataURI"]
    assert uri == f"{BASE_URL}{_instance_path(env, 'CT_small.dcm')}/bulkdata/7FE00010"
    assert dataset["00100010"] == record.dataset["00100010"]
    pixels = await env.client.get(uri.removeprefix(BASE_URL))
    assert pixels.status_code == 200
    [(headers, payload)] = read_parts(pixels.headers["content-type"], pixels.content)
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert payload == read_dataset(env.bytes_of[record.sop_instance_uid]).PixelData


async def test_study_and_series_metadata(env: Env) -> None:
    record = env.records["a1-1"]
    study = (await env.client.get(f"/dicom-web/studies/{record.study_uid}/metadata")).json()
    assert [d["00080018"]["Value"][0] for d in study] == [
        env.records[n].sop_instance_uid for n in ("a1-1", "a1-2", "a1-3", "a2-1", "a2-2")
    ]
    series = (
        await env.client.get(f"/dicom-web/studies/{record.study_uid}/series/{record.series_uid}/metadata")
    ).json()
    assert len(series) == 3
    assert all("BulkDataURI" in d["7FE00010"] for d in series)


async def test_bulkdata_of_a_non_pixel_element(env: Env) -> None:
    record = env.records["CT_small.dcm"]
    dataset = read_dataset(env.bytes_of[record.sop_instance_uid])
    binary = next(e for e in dataset if e.VR in {"OB", "OW"} and e.tag != 0x7FE00010 and e.value)
    response = await env.client.get(_instance_path(env, "CT_small.dcm") + f"/bulkdata/{binary.tag:08X}")
    assert response.status_code == 200
    [(_, payload)] = read_parts(response.headers["content-type"], response.content)
    assert payload == binary.value
    missing = await env.client.get(_instance_path(env, "CT_small.dcm") + "/bulkdata/00091234")
    assert missing.status_code == 404


async def test_native_frames(env: Env) -> None:
    record = env.records["CT_small.dcm"]
    response = await env.client.get(_instance_path(env, "CT_small.dcm") + "/frames/1")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="application/octet-stream"')
    [(headers, payload)] = read_parts(response.headers["content-type"], response.content)
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert payload == read_dataset(env.bytes_of[record.sop_instance_uid]).PixelData


async def test_encapsulated_frames_come_compressed_with_their_media_type(env: Env) -> None:
    record = env.records["SC_rgb_rle_2frame.dcm"]
    expected = pixel_frames(
        read_dataset(env.bytes_of[record.sop_instance_uid]), record.transfer_syntax_uid
    ).frames
    response = await env.client.get(_instance_path(env, "SC_rgb_rle_2frame.dcm") + "/frames/2,1")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith('multipart/related; type="image/dicom-rle"')
    parts = read_parts(response.headers["content-type"], response.content)
    assert [payload for _, payload in parts] == [expected[1], expected[0]]
    assert {h["content-type"] for h, _ in parts} == {"image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5"}
    jpeg = await env.client.get(
        _instance_path(env, "JPEG-lossy.dcm") + "/frames/1",
        headers={"Accept": 'multipart/related; type="image/jpeg"'},
    )
    [(headers, payload)] = read_parts(jpeg.headers["content-type"], jpeg.content)
    assert headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.51"
    assert payload.startswith(b"\xff\xd8")


async def test_frame_errors(env: Env) -> None:
    path = _instance_path(env, "SC_rgb_rle_2frame.dcm") + "/frames/"
    out_of_range = await env.client.get(path + "1,3")
    assert out_of_range.status_code == 404
    assert "frame 3 is out of range: this instance has 2 frame(s)" in out_of_range.json()["error"]
    assert (await env.client.get(path + "1,x")).status_code == 400
    assert (await env.client.get(path + "0")).status_code == 400
    decompress = await env.client.get(
        path + "1", headers={"Accept": 'multipart/related; type="application/octet-stream"'}
    )
    assert decompress.status_code == 406
    assert "image/dicom-rle" in decompress.json()["error"]
    as_is = await env.client.get(
        path + "1",
        headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
    )
    assert as_is.status_code == 200


async def test_retrieval_is_audited(env: Env) -> None:
    before = len(env.audits)
    record = env.records["b"]
    await env.client.get(_instance_path(env, "b") + "/metadata")
    [*_, envelope] = await env.wait_for_audits(before + 1)
    audit = AuditRecord.FromString(envelope.body)
    assert (
        audit.details["route"] == "/dicom-web/studies/{study}/series/{series}/instances/{instance}/metadata"
    )
    assert (audit.study_instance_uid, audit.series_instance_uid, audit.sop_instance_uid) == (
        record.study_uid,
        record.series_uid,
        record.sop_instance_uid,
    )
    assert envelope.correlation_id == record.study_uid
    assert audit.dicom_patient.patient_id == record.attributes["PatientID"]  # from the record served
    not_found = len(env.audits)
    await env.client.get("/dicom-web/studies/1.2.3.999/metadata")
    assert len(await env.wait_for_audits(not_found + 1, seconds=0.2)) == not_found  # only successful reads
