"""The one ingestion function: Part-10 bytes in, each instance stored once (blob + record + audit) or refused.

Both transports call it: STOW-RS with the instances of one request, the DIMSE SCP with the instance
of one C-STORE. Nothing is half-written: an instance that fails leaves neither blob nor record
behind, and its failure does not affect the other instances of the batch. A stored instance's audit
record is due from the moment it is stored (the store's audit outbox): it is published at once, or
by the relay when the bus is back (``audit``), so a bus outage fails no store.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from lucerna.core.audit_trail import AuditTrail
from lucerna.core.storage.ports import BlobRef, BlobStore, InstanceRecord, MetadataStore, PutOutcome
from lucerna.ingestion import audit, metrics
from lucerna.ingestion.outcomes import Disposition, FailureReason, InstanceOutcome
from lucerna.ingestion.records import InvalidInstanceError, ParsedInstance, build_record, parse_instance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ports:
    """What ingestion writes to."""

    blobs: BlobStore
    metadata: MetadataStore
    audit: AuditTrail


@dataclass(frozen=True)
class _Prepared:
    index: int
    parsed: ParsedInstance
    blob: BlobRef


async def ingest(
    ports: Ports,
    payloads: Sequence[bytes],
    source: str,
    *,
    expected_study_uid: str | None = None,
    traceparent: str | None = None,
) -> list[InstanceOutcome]:
    """Store each Part-10 instance of ``payloads``; one outcome per payload, in order.

    ``source`` is ``dimse:<calling AE>@<host>`` or ``stow:<client>@<host>``; ``expected_study_uid``
    refuses instances of another study (STOW-RS to ``/studies/{study}``).
    """
    transport = source.partition(":")[0] or "unknown"
    started = time.perf_counter()
    received_at = datetime.now(UTC)
    outcomes: list[InstanceOutcome | None] = [None] * len(payloads)

    # Parse (CPU, GIL-bound) and hash + write (mostly outside the GIL) overlap across instances.
    prepared: list[_Prepared] = []
    results = await asyncio.gather(
        *(_prepare(ports, index, data, expected_study_uid) for index, data in enumerate(payloads))
    )
    for index, result in enumerate(results):
        if isinstance(result, InstanceOutcome):
            outcomes[index] = result
        else:
            prepared.append(result)

    if prepared:
        records = [build_record(p.parsed, p.blob, source, received_at) for p in prepared]
        written = await _put_records(ports, prepared, records)
        stored = []
        for item, record, outcome in zip(prepared, records, written, strict=True):
            outcomes[item.index] = outcome
            if outcome.disposition is Disposition.STORED:
                stored.append(record)
        await audit.publish_stored(ports.metadata, ports.audit, stored, traceparent)

    final = [outcome for outcome in outcomes if outcome is not None]
    assert len(final) == len(payloads), "every payload has an outcome"
    _observe(transport, final, time.perf_counter() - started)
    return final


async def _prepare(
    ports: Ports, index: int, data: bytes, expected_study_uid: str | None
) -> _Prepared | InstanceOutcome:
    try:
        parsed = await asyncio.to_thread(parse_instance, data)
    except InvalidInstanceError as invalid:
        return InstanceOutcome.failed(
            invalid.reason,
            invalid.message,
            sop_class_uid=invalid.sop_class_uid,
            sop_instance_uid=invalid.sop_instance_uid,
        )
    except Exception as error:  # odd input fails its instance, never the request
        log.exception("unexpected error reading an instance")
        return InstanceOutcome.failed(FailureReason.CANNOT_UNDERSTAND, f"the instance is unreadable: {error}")
    if expected_study_uid is not None and parsed.study_uid != expected_study_uid:
        return _failed(
            parsed,
            FailureReason.DATA_SET_DOES_NOT_MATCH,
            f"StudyInstanceUID {parsed.study_uid} is not the study {expected_study_uid} of the request",
        )
    try:
        blob = await ports.blobs.put(data)
    except OSError as error:
        log.exception("blob write failed for %s", parsed.sop_instance_uid)
        reason = (
            FailureReason.OUT_OF_RESOURCES
            if error.errno in (errno.ENOSPC, errno.EDQUOT)
            else FailureReason.PROCESSING_FAILURE
        )
        return _failed(parsed, reason, f"the instance's bytes could not be stored: {error.strerror or error}")
    except Exception:
        log.exception("blob write failed for %s", parsed.sop_instance_uid)
        return _failed(parsed, FailureReason.PROCESSING_FAILURE, "the instance's bytes could not be stored")
    return _Prepared(index, parsed, blob)


async def _put_records(
    ports: Ports, prepared: Sequence[_Prepared], records: Sequence[InstanceRecord]
) -> list[InstanceOutcome]:
    results, retried = await _write(ports, records)
    outcomes = []
    for item, record, result in zip(prepared, records, results, strict=True):
        if result is None:
            await _release_blob(ports, item)
            outcomes.append(
                _failed(item.parsed, FailureReason.PROCESSING_FAILURE, "the metadata store did not take it")
            )
        elif result is PutOutcome.CREATED or (
            retried and result is PutOutcome.DUPLICATE and await _written_by_failed_batch(ports, record)
        ):
            outcomes.append(_succeeded(item, Disposition.STORED, "stored"))
        elif result is PutOutcome.DUPLICATE:
            # The record already points at these very bytes, so a blob we (re)wrote is in use.
            outcomes.append(
                _succeeded(item, Disposition.ALREADY_STORED, "already stored with identical bytes")
            )
        else:
            await _release_blob(ports, item)
            outcomes.append(
                _failed(
                    item.parsed,
                    FailureReason.DUPLICATE_SOP_INSTANCE,
                    "this SOP Instance UID is already stored with different bytes; it is not overwritten",
                )
            )
    return outcomes


async def _write(ports: Ports, records: Sequence[InstanceRecord]) -> tuple[list[PutOutcome | None], bool]:
    """The store's outcome per record (None: not written), and whether the batch had to be retried.

    A failed batch is retried record by record, so that one record the store refuses does not fail
    the others; upserts keyed by SOP Instance UID make the retry safe.
    """
    try:
        return list(await ports.metadata.put_instances(records)), False
    except Exception:
        log.exception("metadata write failed for a batch of %d instances", len(records))
        if len(records) == 1:
            return [None], False
    results: list[PutOutcome | None] = []
    for record in records:
        try:
            results += await ports.metadata.put_instances([record])
        except Exception:
            log.exception("metadata write failed for %s", record.sop_instance_uid)
            results.append(None)
    return results, True


async def _written_by_failed_batch(ports: Ports, record: InstanceRecord) -> bool:
    """Whether a duplicate found on retry is the failed batch's own partial write (a store without
    transactions may keep part of a batch): then it is new, and its audit record is still due."""
    stored = await ports.metadata.get_instance(record.sop_instance_uid)
    if stored is None or stored.source != record.source:
        return False
    at = stored.received_at if stored.received_at.tzinfo else stored.received_at.replace(tzinfo=UTC)
    return abs(at - record.received_at) < timedelta(milliseconds=2)  # BSON keeps milliseconds


async def _release_blob(ports: Ports, item: _Prepared) -> None:
    """Delete a blob this call created, unless a record (a concurrent, identical store) now uses it."""
    if not item.blob.created:
        return
    try:
        record = await ports.metadata.get_instance(item.parsed.sop_instance_uid)
        if record is not None and record.sha256 == item.blob.sha256:
            return
        await ports.blobs.delete(item.blob.sha256)
    except Exception:
        log.exception("could not remove blob %s of a failed instance", item.blob.sha256)


def _succeeded(item: _Prepared, disposition: Disposition, message: str) -> InstanceOutcome:
    parsed = item.parsed
    return InstanceOutcome(
        disposition,
        sop_class_uid=parsed.sop_class_uid,
        sop_instance_uid=parsed.sop_instance_uid,
        study_uid=parsed.study_uid,
        series_uid=parsed.series_uid,
        sha256=item.blob.sha256,
        size=item.blob.size,
        message=message,
    )


def _failed(parsed: ParsedInstance, reason: FailureReason, message: str) -> InstanceOutcome:
    return InstanceOutcome.failed(
        reason,
        message,
        sop_class_uid=parsed.sop_class_uid,
        sop_instance_uid=parsed.sop_instance_uid,
        study_uid=parsed.study_uid,
        series_uid=parsed.series_uid,
    )


def _observe(transport: str, outcomes: Sequence[InstanceOutcome], seconds: float) -> None:
    for outcome in outcomes:
        metrics.INSTANCES.labels(transport, outcome.disposition.value).inc()
        if outcome.disposition is Disposition.STORED:
            metrics.BYTES.labels(transport).inc(outcome.size)
        elif outcome.disposition is Disposition.FAILED:
            log.info(
                "instance refused: %s",
                outcome.message,
                extra={
                    "sop_instance_uid": outcome.sop_instance_uid,
                    "failure_reason": f"{outcome.failure_reason:04X}",
                },
            )
    metrics.INGEST_LATENCY.labels(transport).observe(seconds)
