"""The one ingestion function: stored once, duplicates recognised, conflicts and bad input refused,
nothing half-written when a store fails, and no audit record lost when the audit trail fails."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from lucerna.core.events.ports import Envelope, PublishError
from lucerna.core.service import Resources
from lucerna.ingestion.audit import RELAY_AFTER, AuditRelay
from lucerna.ingestion.ingest import Ports, ingest
from lucerna.ingestion.outcomes import Disposition, FailureReason

SOURCE = "stow:tester@127.0.0.1"


class _Delegate:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class BrokenMetadata(_Delegate):
    """The real store, except that instance writes fail."""

    async def put_instances(self, records: Any) -> Any:
        raise ConnectionError("metadata store unreachable")


class PoisonedMetadata(_Delegate):
    """The real store refusing any batch that holds one given instance."""

    def __init__(self, inner: Any, poisoned: str) -> None:
        super().__init__(inner)
        self.poisoned = poisoned

    async def put_instances(self, records: Any) -> Any:
        if any(r.sop_instance_uid == self.poisoned for r in records):
            raise ValueError("document refused")
        return await self._inner.put_instances(records)


class PartialMetadata(_Delegate):
    """A store without transactions: the first batch writes its first record, then fails."""

    failed = False

    async def put_instances(self, records: Any) -> Any:
        if not self.failed and len(records) > 1:
            self.failed = True
            await self._inner.put_instances(records[:1])
            raise ConnectionError("connection reset in the middle of the batch")
        return await self._inner.put_instances(records)


class RefusingAuditTrail(_Delegate):
    """The real audit trail, except that it refuses records while ``down``."""

    down = True

    async def record(self, envelope: Envelope) -> None:
        if self.down:
            raise PublishError("no confirm in time")
        await self._inner.record(envelope)


async def test_a_new_instance_is_stored_recorded_and_audited(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    data = ct()
    [outcome] = await ingest(ports, [data], SOURCE)
    sha = hashlib.sha256(data).hexdigest()
    assert outcome.disposition is Disposition.STORED
    assert (outcome.sha256, outcome.size) == (sha, len(data))
    assert await resources.blobs.get(sha) == data
    record = await resources.metadata.get_instance(outcome.sop_instance_uid or "")
    assert record is not None and record.sha256 == sha and record.source == SOURCE
    await events.settle()
    [envelope] = events.audit
    [audit] = events.audit_records()
    assert envelope.message_id == f"instance-stored:{outcome.sop_instance_uid}:{sha}"
    assert envelope.correlation_id == outcome.study_uid
    assert audit.action == audit.INSTANCE_STORED
    assert (audit.sop_instance_uid, audit.sha256, audit.actor, audit.service) == (
        outcome.sop_instance_uid,
        sha,
        SOURCE,
        "ingestion",
    )


async def test_identical_bytes_again_are_already_stored(
    ports: Ports, events: Any, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    data = ct()
    first = await ingest(ports, [data], SOURCE)
    again = await ingest(ports, [data], "dimse:MODALITY@10.0.0.1")
    assert first[0].disposition is Disposition.STORED
    assert again[0].disposition is Disposition.ALREADY_STORED
    assert again[0].succeeded
    assert len(stored_blobs()) == 1
    await events.settle()
    assert len(events.audit) == 1


async def test_same_uid_with_other_bytes_is_refused_and_leaves_nothing(
    ports: Ports, resources: Resources, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    sop, study = generate_uid(), generate_uid()
    original = ct(study=study, SOPInstanceUID=sop)
    await ingest(ports, [original], SOURCE)
    [outcome] = await ingest(ports, [ct(study=study, SOPInstanceUID=sop, PatientName="OTHER^NAME")], SOURCE)
    assert outcome.disposition is Disposition.FAILED
    assert outcome.failure_reason is FailureReason.DUPLICATE_SOP_INSTANCE
    assert outcome.sop_instance_uid == sop
    assert stored_blobs() == [resources.settings.blobs_path.joinpath(*_blob_path(original))]
    record = await resources.metadata.get_instance(sop)
    assert record is not None and record.sha256 == hashlib.sha256(original).hexdigest()


async def test_conflict_inside_one_batch(
    ports: Ports, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    sop = generate_uid()
    outcomes = await ingest(
        ports, [ct(SOPInstanceUID=sop), ct(SOPInstanceUID=sop, PatientName="B^B")], SOURCE
    )
    assert [o.disposition for o in outcomes] == [Disposition.STORED, Disposition.FAILED]
    assert outcomes[1].failure_reason is FailureReason.DUPLICATE_SOP_INSTANCE
    assert len(stored_blobs()) == 1


async def test_bad_instances_fail_alone(
    ports: Ports, events: Any, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    good = ct()
    outcomes = await ingest(ports, [b"not dicom", good, ct(SeriesInstanceUID=None)], SOURCE)
    assert [o.disposition for o in outcomes] == [Disposition.FAILED, Disposition.STORED, Disposition.FAILED]
    assert outcomes[0].failure_reason is FailureReason.CANNOT_UNDERSTAND
    assert outcomes[2].failure_reason is FailureReason.DATA_SET_DOES_NOT_MATCH
    assert "SeriesInstanceUID is missing" in outcomes[2].message
    assert len(stored_blobs()) == 1
    await events.settle()
    assert len(events.audit) == 1


async def test_another_study_than_expected_is_refused(
    ports: Ports, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    wanted = generate_uid()
    outcomes = await ingest(ports, [ct(study=wanted), ct()], SOURCE, expected_study_uid=wanted)
    assert outcomes[0].disposition is Disposition.STORED
    assert outcomes[1].failure_reason is FailureReason.DATA_SET_DOES_NOT_MATCH
    assert wanted in outcomes[1].message
    assert len(stored_blobs()) == 1


async def test_a_failed_metadata_write_leaves_no_blob(
    resources: Resources, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    broken = Ports(
        blobs=resources.blobs, metadata=BrokenMetadata(resources.metadata), audit=resources.audit_trail
    )
    outcomes = await ingest(broken, [ct(), ct()], SOURCE)
    assert {o.failure_reason for o in outcomes} == {FailureReason.PROCESSING_FAILURE}
    assert stored_blobs() == []


async def test_a_record_the_store_refuses_fails_alone(
    resources: Resources, events: Any, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    poisoned = generate_uid()
    store = PoisonedMetadata(resources.metadata, poisoned)
    ports = Ports(blobs=resources.blobs, metadata=store, audit=resources.audit_trail)
    outcomes = await ingest(ports, [ct(), ct(SOPInstanceUID=poisoned), ct()], SOURCE)
    assert [o.disposition for o in outcomes] == [Disposition.STORED, Disposition.FAILED, Disposition.STORED]
    assert outcomes[1].failure_reason is FailureReason.PROCESSING_FAILURE
    assert len(stored_blobs()) == 2
    await events.settle()
    assert len(events.audit) == 2


async def test_a_partly_written_batch_is_completed_and_fully_audited(
    resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    ports = Ports(
        blobs=resources.blobs, metadata=PartialMetadata(resources.metadata), audit=resources.audit_trail
    )
    outcomes = await ingest(ports, [ct(), ct()], SOURCE)
    assert [o.disposition for o in outcomes] == [Disposition.STORED, Disposition.STORED]
    await events.settle()
    assert sorted(r.sop_instance_uid for r in events.audit_records()) == sorted(
        o.sop_instance_uid for o in outcomes
    )


async def test_a_published_audit_record_leaves_the_outbox(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    await ingest(ports, [ct(), ct()], SOURCE)
    later = datetime.now(UTC) + timedelta(hours=1)
    assert await resources.metadata.pending_audit(later) == []
    assert await AuditRelay(resources.metadata, resources.audit_trail).run_once(later) == 0
    await events.settle()
    assert len(events.audit) == 2


async def test_an_audit_trail_outage_keeps_the_instance_and_relays_its_audit_record_later(
    resources: Resources, events: Any, ct: Callable[..., bytes], stored_blobs: Callable[[], list[Path]]
) -> None:
    trail = RefusingAuditTrail(resources.audit_trail)
    ports = Ports(blobs=resources.blobs, metadata=resources.metadata, audit=trail)
    data = ct()
    [outcome] = await ingest(ports, [data], SOURCE)
    assert outcome.disposition is Disposition.STORED  # the trail is down; the store is not
    sop = outcome.sop_instance_uid or ""
    assert await resources.metadata.get_instance(sop) is not None
    assert len(stored_blobs()) == 1
    relay = AuditRelay(resources.metadata, trail)
    assert await relay.run_once() == 0  # too young: the ingestion call may still be publishing it
    later = datetime.now(UTC) + RELAY_AFTER * 2
    assert await relay.run_once(later) == 0  # the trail is still down
    assert [r.sop_instance_uid for r in await resources.metadata.pending_audit(later)] == [sop]

    trail.down = False
    assert await relay.run_once(later) == 1
    assert await relay.run_once(later) == 0  # relayed once
    await events.settle()
    [envelope] = events.audit
    assert envelope.message_id == f"instance-stored:{sop}:{hashlib.sha256(data).hexdigest()}"
    [record] = events.audit_records()
    assert (record.sop_instance_uid, record.actor) == (sop, SOURCE)
    assert await resources.metadata.pending_audit(later) == []


async def test_concurrent_identical_stores_keep_one_instance(
    ports: Ports, resources: Resources, ct: Callable[..., bytes]
) -> None:
    data = ct()
    first, second = await asyncio.gather(ingest(ports, [data], SOURCE), ingest(ports, [data], SOURCE))
    assert sorted(o[0].disposition.value for o in (first, second)) == ["already_stored", "stored"]
    assert await resources.blobs.get(hashlib.sha256(data).hexdigest()) == data


def _blob_path(data: bytes) -> tuple[str, str, str]:
    sha = hashlib.sha256(data).hexdigest()
    return sha[:2], sha[2:4], sha
