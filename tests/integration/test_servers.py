"""Smoke tests for the server fixtures: each real server answers its own protocol."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import httpx
import pymongo
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


async def test_rabbitmq_round_trips_a_message(rabbitmq_url: str) -> None:
    connection = await aio_pika.connect(rabbitmq_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
        message = await queue.get(timeout=5)
        await message.ack()
        assert message.body == b"ping"


async def test_rabbitmq_restart_keeps_durable_quorum_queue_and_messages(rabbitmq: Any) -> None:
    queue_name = f"smoke.restart.{uuid.uuid4().hex}"
    connection = await aio_pika.connect(rabbitmq.url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(
            aio_pika.Message(b"survives", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
        )

    await asyncio.to_thread(rabbitmq.restart)

    connection = await aio_pika.connect(rabbitmq.url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(timeout=10)
        await message.ack()
        assert message.body == b"survives"
        await queue.delete(if_unused=False, if_empty=False)


def test_elasticsearch_is_healthy_and_indexes(elasticsearch_url: str) -> None:
    with httpx.Client(base_url=elasticsearch_url, timeout=30) as client:
        # The integ-test zip has no rest-root module, so `GET /` (the client's info()) answers 405.
        nodes = client.get("/_nodes/_local").raise_for_status().json()["nodes"]
        assert [node["version"] for node in nodes.values()] == ["8.19.3"]
        health = client.get("/_cluster/health").raise_for_status().json()
        assert health["status"] in {"green", "yellow"}

        index = f"smoke-{uuid.uuid4().hex}"
        client.put(
            f"/{index}/_doc/1", params={"refresh": "true"}, json={"name": "Doe^Jane"}
        ).raise_for_status()
        hits = client.post(f"/{index}/_search", json={"query": {"match": {"name": "doe"}}}).raise_for_status()
        assert hits.json()["hits"]["total"]["value"] == 1
        client.delete(f"/{index}").raise_for_status()


def test_ferretdb_speaks_mongodb(mongodb_url: str) -> None:
    assert mongodb_url.startswith("mongodb://127.0.0.1:")
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongodb_url, serverSelectionTimeoutMS=5000
    )
    try:
        assert client.admin.command("ping")["ok"] == 1.0
        collection = client["smoke"][uuid.uuid4().hex]
        collection.create_index("uid", unique=True)
        collection.insert_one({"uid": "1.2.3", "modality": "CT"})
        assert collection.find_one({"uid": "1.2.3"}, {"_id": 0}) == {"uid": "1.2.3", "modality": "CT"}
        collection.drop()
    finally:
        client.close()


def test_orthanc_serves_rest_dicomweb_and_dimse(orthanc: Any) -> None:
    with httpx.Client(base_url=orthanc.http_url, timeout=10) as client:
        system = client.get("/system").raise_for_status().json()
        assert system["DicomAet"] == orthanc.ae_title == "ORTHANC"
        assert system["DicomPort"] == orthanc.dicom_port
        assert "dicom-web" in client.get("/plugins").raise_for_status().json()
        studies = client.get("/dicom-web/studies")  # the session's Orthanc may hold other tests' studies
        assert studies.status_code == 200
        assert isinstance(studies.json(), list)

        orthanc.add_modality("smoke", "SMOKE", "127.0.0.1", 11199)
        assert "smoke" in client.get("/modalities").raise_for_status().json()

    ae = AE(ae_title="LUCERNA")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.ae_title)
    assert assoc.is_established
    try:
        status = assoc.send_c_echo()
        assert status.Status == 0x0000
    finally:
        assoc.release()
