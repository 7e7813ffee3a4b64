"""Study assembly: one study.ready per burst, after its boundary and the quiet period (or the maximum
idle time), announced again when its claimer died before acknowledging it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.uid import generate_uid

from lucerna.core.events.ports import Envelope, PublishError
from lucerna.core.service import Resources
from lucerna.ingestion.assembly import StudyAssembler, end_of_burst
from lucerna.ingestion.ingest import Ports, ingest
from lucerna.ingestion.service import IngestionService
from lucerna.ingestion.settings import IngestionSettings

QUIET = timedelta(seconds=2)
MAX_IDLE = timedelta(seconds=60)
LEASE = timedelta(seconds=30)


def assembler_for(resources: Resources, bus: Any = None) -> StudyAssembler:
    return StudyAssembler(
        resources.metadata, bus or resources.bus, resources.audit_trail, QUIET, max_idle=MAX_IDLE, lease=LEASE
    )


async def store_burst(ports: Ports, ct: Callable[..., bytes], study: str, count: int) -> None:
    outcomes = await ingest(ports, [ct(study=study) for _ in range(count)], "dimse:CT1@10.0.0.5")
    assert all(o.succeeded for o in outcomes)
    await end_of_burst(ports.metadata, [study])


async def test_one_study_ready_per_burst(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    assembler = assembler_for(resources)
    study = generate_uid()
    await store_burst(ports, ct, study, 3)

    assert await assembler.run_once(datetime.now(UTC)) == []  # boundary seen, but not yet quiet
    later = datetime.now(UTC) + QUIET * 2
    [claimed] = await assembler.run_once(later)
    assert (claimed.study_uid, claimed.burst, claimed.burst_instances) == (study, 1, 3)
    assert await assembler.run_once(later + LEASE * 10) == []  # published and acknowledged: once

    await store_burst(ports, ct, study, 2)
    [second] = await assembler.run_once(datetime.now(UTC) + QUIET * 2)
    assert (second.burst, second.burst_instances, second.total_instances) == (2, 2, 5)

    await events.settle()
    first_event, second_event = events.studies_ready()
    assert (first_event.study_instance_uid, first_event.burst, first_event.burst_instances) == (study, 1, 3)
    assert (second_event.burst, second_event.burst_instances, second_event.total_instances) == (2, 2, 5)
    assert list(first_event.modalities) == ["CT"] and list(first_event.sources) == ["dimse:CT1@10.0.0.5"]
    assert [e.message_id for e in events.ready] == [f"study-ready:{study}:1", f"study-ready:{study}:2"]
    assert {e.correlation_id for e in events.ready} == {study}
    audits = [r for r in events.audit_records() if r.action == r.STUDY_READY]
    assert [(r.study_instance_uid, r.details["burst"]) for r in audits] == [(study, "1"), (study, "2")]


async def test_no_boundary_no_study_ready_until_the_maximum_idle_time(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    study = generate_uid()
    await ingest(ports, [ct(study=study), ct(study=study)], "dimse:CT1@10.0.0.5")  # association still open
    assembler = assembler_for(resources)
    assert await assembler.run_once(datetime.now(UTC) + QUIET * 10) == []
    # The association never ended (or the process that held it died): idle long enough is ended.
    [ready] = await assembler.run_once(datetime.now(UTC) + MAX_IDLE + QUIET)
    assert (ready.study_uid, ready.burst, ready.burst_instances) == (study, 1, 2)
    await events.settle()
    assert [e.message_id for e in events.ready] == [f"study-ready:{study}:1"]


async def test_a_burst_claimed_by_a_process_that_died_is_announced_after_the_lease(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    study = generate_uid()
    await store_burst(ports, ct, study, 2)
    claimed_at = datetime.now(UTC) + QUIET * 2
    # Another process claims the burst and dies before publishing it.
    [lost] = await resources.metadata.claim_ready(claimed_at, quiet=QUIET, max_idle=MAX_IDLE, lease=LEASE)
    assembler = assembler_for(resources)
    assert await assembler.run_once(claimed_at + LEASE / 2) == []  # its lease still runs
    [ready] = await assembler.run_once(claimed_at + LEASE + QUIET)
    assert ready == lost
    assert await assembler.run_once(claimed_at + LEASE * 10) == []  # acknowledged this time
    await events.settle()
    [event] = events.studies_ready()
    assert (event.study_instance_uid, event.burst, event.burst_instances) == (study, 1, 2)
    assert [e.message_id for e in events.ready] == [f"study-ready:{study}:1"]


class FlakyBus:
    """Refuses study.ready until told to recover."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.down = True

    async def publish(self, envelope: Envelope) -> None:
        if self.down and envelope.routing_key == "study.ready":
            raise PublishError("broker unreachable")
        await self.inner.publish(envelope)


async def test_unpublished_events_are_kept_and_nothing_more_is_claimed(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    bus = FlakyBus(resources.bus)
    assembler = assembler_for(resources, bus)
    first, second = generate_uid(), generate_uid()
    await store_burst(ports, ct, first, 1)
    later = datetime.now(UTC) + QUIET * 2
    assert [r.study_uid for r in await assembler.run_once(later)] == [first]
    assert assembler.pending == 1

    await store_burst(ports, ct, second, 1)
    assert await assembler.run_once(datetime.now(UTC) + QUIET * 2) == []  # still pending: claims nothing

    bus.down = False
    assert [r.study_uid for r in await assembler.run_once(datetime.now(UTC) + QUIET * 2)] == [second]
    assert assembler.pending == 0
    assert await assembler.run_once(datetime.now(UTC) + LEASE * 10) == []  # both acknowledged
    await events.settle()
    assert [e.study_instance_uid for e in events.studies_ready()] == [first, second]


async def test_the_service_loop_announces_a_stow_burst_once(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    service = IngestionService(
        IngestionSettings(dimse_enabled=False, quiet_period_seconds=0.1, assembly_interval_seconds=0.02)
    )
    await service.start(resources)
    try:
        study = generate_uid()
        await store_burst(ports, ct, study, 2)
        for _ in range(200):
            if events.ready:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # several more scans: still one event
    finally:
        await service.stop()
    [ready] = events.studies_ready()
    assert (ready.study_instance_uid, ready.burst_instances) == (study, 2)


async def test_study_ready_carries_what_rules_match_on_and_the_instance_set(
    ports: Ports, resources: Resources, events: Any, ct: Callable[..., bytes]
) -> None:
    study = generate_uid()
    described = {
        "StudyDescription": "CT THORAX",
        "PatientName": "DOE^JANE",
        "AccessionNumber": "ACC-77",
        "StudyDate": "20260917",
        "StudyTime": "101500",
    }
    dimse = [ct(study=study, number=n, BodyPartExamined="chest", **described) for n in (1, 2)]
    stow = [ct(study=study, number=3, **described)]  # no BodyPartExamined
    assert all(o.succeeded for o in await ingest(ports, dimse, "dimse:CT@SITE1@10.0.0.5"))
    assert all(o.succeeded for o in await ingest(ports, stow, "stow:ris@10.0.0.9"))
    await end_of_burst(ports.metadata, [study])
    await assembler_for(resources).run_once(datetime.now(UTC) + QUIET * 2)

    await events.settle()
    [ready] = events.studies_ready()
    stored = await resources.metadata.list_instances(study)
    assert ready.study_description == "CT THORAX"
    assert list(ready.body_parts) == ["CHEST"]
    assert list(ready.calling_ae_titles) == ["CT@SITE1"]  # the host after the last "@" is not part of it
    assert list(ready.sop_class_uids) == sorted({r.sop_class_uid for r in stored})
    assert [(i.sop_instance_uid, i.sha256, i.series_instance_uid) for i in ready.instances] == [
        (r.sop_instance_uid, r.sha256, r.series_uid) for r in stored
    ]
    assert {i.modality for i in ready.instances} == {"CT"}
    assert sorted(i.body_part for i in ready.instances) == ["", "CHEST", "CHEST"]
    header = (ready.patient_name, ready.accession_number, ready.study_date, ready.study_time)
    assert header == ("DOE^JANE", "ACC-77", "20260917", "101500")
    assert (ready.issuer_of_patient_id, ready.timezone_offset) == ("", "")
