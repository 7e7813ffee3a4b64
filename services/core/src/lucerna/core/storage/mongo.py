"""The metadata store on MongoDB (pymongo's async API), within what FerretDB v1 also serves.

Collections follow ``_qido``: ``instances`` (``_id`` = SOP Instance UID; record fields, derived
attributes, the header), ``series`` and ``studies`` (``_id`` = their UID; the representative's
attributes and data set, aggregates maintained on write). Data sets (and an instance's derived
attributes) are kept as JSON text, not as nested documents: no query looks inside them (matching
uses top-level copies), FerretDB decodes them over ten times faster, and DICOM JSON's NaN, 64-bit
unsigned integers or odd keys cannot trip BSON. A study document also
carries the number of its latest burst and its change ``version``. The search index's
outbox is a small collection of its own, ``index_outbox`` (``_id`` = Study Instance UID, the
``version`` to index, ``changed_at`` of the oldest change not yet indexed), so that the indexer's
frequent polls read a few small documents, not every study. There are no transactions and no
``$lookup``: instances are inserted once (a taken ``_id`` answers DUPLICATE or CONFLICT), a study,
its series and its outbox entry change only under the study's lease (see ``_Leases``), and
conditions on another collection are resolved by a first query into a UID list.

Two more small outboxes keep events that must not be lost, so that their relays poll a few small
documents too: ``assembly_outbox`` holds each burst not yet announced (``_id`` = ``<study>:<burst>``;
open, or claimed with ``claimed_at`` and not yet acknowledged), ``audit_outbox`` points at the
instances whose audit record is not yet published (``_id`` = SOP Instance UID). A pointer is
inserted before its instance, with the put's time as ``created_at``, the instance's ``stored_at``:
it is the created instance's own pointer exactly when the two are equal. So no created instance
lacks its pointer, and a pointer left by a put whose instance turned out a duplicate or a conflict
(or by a write that died) is told apart and dropped by ``pending_audit``; no instance document is
ever updated for its audit record (FerretDB rewrites a whole document to change one field).

A process that dies between inserting instances and updating their series and study leaves those
aggregates short by the instances it inserted; the instances themselves are intact, and
re-sending them answers DUPLICATE.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, DeleteOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from lucerna.core.dicom.attributes import derive
from lucerna.core.storage import _qido, _search
from lucerna.core.storage._qido import UID_OF, Condition, Plan
from lucerna.core.storage.ports import (
    DicomJson,
    InstanceRecord,
    Level,
    PutOutcome,
    Query,
    ReadyStudy,
    StudyPatient,
)

Document = dict[str, Any]

_COLLECTION: dict[Level, str] = {"study": "studies", "series": "series", "instance": "instances"}
_SORT: dict[Level, list[tuple[str, int]]] = {
    "study": [("StudyDate", DESCENDING), ("_id", ASCENDING)],
    "series": [("StudyInstanceUID", ASCENDING), ("SeriesNumber", ASCENDING), ("_id", ASCENDING)],
    "instance": [
        ("StudyInstanceUID", ASCENDING), ("SeriesNumber", ASCENDING), ("SeriesInstanceUID", ASCENDING),
        ("InstanceNumber", ASCENDING), ("_id", ASCENDING),
    ],
}
_PROJECTION: dict[Level, list[str]] = {
    "study": ["dataset", *_qido.AGGREGATES_OF["study"]],
    "series": ["StudyInstanceUID", "dataset", *_qido.AGGREGATES_OF["series"]],
    "instance": ["StudyInstanceUID", "SeriesInstanceUID", "dataset"],
}
_INDEXES: dict[Level, list[list[tuple[str, int]]]] = {
    "study": [
        _SORT["study"], [("PatientName", ASCENDING)], [("PatientID", ASCENDING)],
        [("AccessionNumber", ASCENDING)],
    ],
    "series": [_SORT["series"], [("Modality", ASCENDING)]],
    "instance": [_SORT["instance"], [("SeriesInstanceUID", ASCENDING), ("stored_at", ASCENDING)]],
}
_DUPLICATE_KEY = 11000
_READY_FIELDS = ["NumberOfStudyRelatedInstances", "PatientID", "ModalitiesInStudy"]
# An audit pointer whose instance is still missing after this long belongs to a write that died.
_ORPHAN_AUDIT_POINTER = timedelta(minutes=10)


async def answers(client: AsyncMongoClient[Any] | None, within: float = 3.0) -> bool:
    """True when the server behind ``client`` answers a ping within ``within`` seconds."""
    if client is None:
        return False
    try:
        async with asyncio.timeout(within):
            await client.admin.command("ping")
    except (PyMongoError, TimeoutError):
        return False
    return True


def _field(level: Level, attribute: str) -> str:
    """The document field holding an attribute at a level (a row's own UID is its ``_id``)."""
    return "_id" if attribute == UID_OF[level] else attribute


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _dumps(dataset: DicomJson) -> str:
    """A data set as compact JSON text (NaN and big integers pass as Python's json writes them)."""
    return json.dumps(dataset, separators=(",", ":"))


@dataclass
class _StudyDelta:
    """What one put adds to a study."""

    first: InstanceRecord
    attributes: dict[str, Any]
    instances: int = 0
    new_series: int = 0
    modalities: set[str] = field(default_factory=set)
    sources: set[str] = field(default_factory=set)
    last_arrival: datetime | None = None
    burst: int = 0  # the burst the put joined

    def add(self, record: InstanceRecord, attributes: dict[str, Any]) -> None:
        """Count one created instance."""
        self.instances += 1
        if attributes.get("Modality"):
            self.modalities.add(attributes["Modality"])
        self.sources.add(record.source)
        arrival = _utc(record.received_at)
        self.last_arrival = max(self.last_arrival or arrival, arrival)


class _Leases:
    """Mutual exclusion per study, across processes, by inserting a document with a unique ``_id``.

    FerretDB v1 applies an update as a read, a change and a write outside any transaction
    (FerretDB issue #3040), so two concurrent updates of one document can lose one another, even
    ``$inc`` and conditional updates; an insert of a taken ``_id`` fails atomically on both servers.
    Every change of a study's (or its series') document is made while holding the study's lease.
    A lease left by a process that died expires after ``LEASE_SECONDS``.
    """

    LEASE_SECONDS = 60.0
    WAIT_SECONDS = 30.0

    def __init__(self, collection: Callable[[], AsyncCollection[Document]]) -> None:
        self._collection = collection

    async def take(self, key: str) -> str | None:
        """The lease's token, or None when another holder has it."""
        token = uuid.uuid4().hex
        leases = self._collection()
        now = datetime.now(UTC)
        try:
            expires = now + timedelta(seconds=self.LEASE_SECONDS)
            await leases.insert_one({"_id": key, "token": token, "expires": expires})
        except DuplicateKeyError:
            await leases.delete_one({"_id": key, "expires": {"$lt": now}})  # its holder died
            return None
        return token

    async def release(self, key: str, token: str) -> None:
        """Give the lease back."""
        await self._collection().delete_one({"_id": key, "token": token})

    @asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        """Hold the lease, waiting for it (``TimeoutError`` after ``WAIT_SECONDS``)."""
        deadline = time.monotonic() + self.WAIT_SECONDS
        delay = 0.001
        while (token := await self.take(key)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the lease on study {key} stayed busy for {self.WAIT_SECONDS:.0f} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            await self.release(key, token)


class MongoMetadataStore:
    """The metadata store in a MongoDB (or FerretDB) database."""

    def __init__(self, url: str, database: str) -> None:
        self._url = url
        self._database = database
        self._client: AsyncMongoClient[Document] | None = None
        self._leases = _Leases(lambda: self._named("leases"))

    def _named(self, name: str) -> AsyncCollection[Document]:
        if self._client is None:
            raise RuntimeError("the MongoDB metadata store is not started")
        return self._client[self._database][name]

    def _collection(self, level: Level) -> AsyncCollection[Document]:
        return self._named(_COLLECTION[level])

    async def start(self) -> None:
        """Connect and create the indexes."""
        self._client = AsyncMongoClient(self._url, tz_aware=True)
        for level, indexes in _INDEXES.items():
            for keys in indexes:
                await self._collection(level).create_index(keys)
        await self._outbox().create_index([("changed_at", ASCENDING)])
        await self._named("assembly_outbox").create_index([("study", ASCENDING)])
        await self._named("audit_outbox").create_index([("created_at", ASCENDING)])

    def _outbox(self) -> AsyncCollection[Document]:
        return self._named("index_outbox")

    async def _outbox_changed(self, study_uid: str, version: int, now: datetime) -> None:
        """Ask for the study's re-indexing at this version (study lease held; the last write of a
        change, so that an indexer seeing the version sees the whole change)."""
        update = {"$set": {"version": version}, "$setOnInsert": {"changed_at": now}}
        await self._outbox().update_one({"_id": study_uid}, update, upsert=True)

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> bool:
        """True when the server answers within three seconds."""
        return await answers(self._client)

    async def put_instances(self, records: Sequence[InstanceRecord]) -> list[PutOutcome]:
        """Point the audit outbox at the instances, insert them in one round trip, then update each
        study (its series, its open burst) once, under the study's lease."""
        if not records:
            return []
        now = datetime.now(UTC)
        attributes = [record.attributes or derive(record.dataset) for record in records]
        documents = [_instance_document(r, a, now) for r, a in zip(records, attributes, strict=True)]
        pointed_before = await self._point_audit([record.sop_instance_uid for record in records], now)
        failed = await self._insert(documents)
        outcomes = [PutOutcome.CREATED] * len(records)
        if failed:
            wanted = {"_id": {"$in": [records[i].sop_instance_uid for i in failed]}}
            existing = {doc["_id"]: doc["sha256"] async for doc in self._collection("instance").find(wanted)}
            for i in failed:
                same = existing.get(records[i].sop_instance_uid) == records[i].sha256
                outcomes[i] = PutOutcome.DUPLICATE if same else PutOutcome.CONFLICT
        # A created instance whose pointer was already there (left by another put) makes it its own.
        adopted = [
            UpdateOne({"_id": record.sop_instance_uid}, {"$set": {"created_at": now}}, upsert=True)
            for record, outcome in zip(records, outcomes, strict=True)
            if outcome is PutOutcome.CREATED and record.sop_instance_uid in pointed_before
        ]
        if adopted:
            await self._named("audit_outbox").bulk_write(adopted, ordered=False)
        by_study: dict[str, list[tuple[InstanceRecord, dict[str, Any]]]] = {}
        for record, attrs, outcome in zip(records, attributes, outcomes, strict=True):
            if outcome is PutOutcome.CREATED:
                by_study.setdefault(record.study_uid, []).append((record, attrs))
        for study_uid, members in by_study.items():
            async with self._leases.held(study_uid):
                delta = _StudyDelta(*members[0])
                for series_uid in dict.fromkeys(r.series_uid for r, _ in members):
                    in_series = [(r, a) for r, a in members if r.series_uid == series_uid]
                    delta.new_series += await self._add_to_series(series_uid, in_series)
                for record, attrs in members:
                    delta.add(record, attrs)
                delta.burst = await self._add_to_burst(study_uid, delta)
                await self._add_to_study(study_uid, delta, now)
        return outcomes

    async def _point_audit(self, sop_instance_uids: Sequence[str], now: datetime) -> set[str]:
        """Insert the audit outbox's pointers, before the instances they point at; the SOP Instance
        UIDs that already had one (left as they are)."""
        uids = list(dict.fromkeys(sop_instance_uids))
        try:
            await self._named("audit_outbox").insert_many(
                [{"_id": uid, "created_at": now} for uid in uids], ordered=False
            )
        except BulkWriteError as error:
            errors = error.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors):
                raise
            return {uids[e["index"]] for e in errors}
        return set()

    async def _add_to_burst(self, study_uid: str, delta: _StudyDelta) -> int:
        """Count a put into the study's open burst (one round trip), or open its next one (study
        lease held); the burst's number. Written before the study, whose ``burst`` then catches up."""
        outbox = self._named("assembly_outbox")
        joined = await outbox.find_one_and_update(
            {"study": study_uid, "claimed_at": None},
            {
                "$inc": {"burst_instances": delta.instances},
                "$set": {"boundary": False, "boundary_at": None},
                "$addToSet": {"sources": {"$each": sorted(delta.sources)}},
                "$max": {"last_arrival": delta.last_arrival},
            },  # no projection: FerretDB v1's findAndModify has none
        )
        if joined is not None:
            return int(joined["burst"])
        study = await self._collection("study").find_one({"_id": study_uid}, ["burst"])
        burst = 1 if study is None else int(study["burst"]) + 1
        while True:
            try:
                await outbox.insert_one({
                    "_id": f"{study_uid}:{burst}", "study": study_uid, "burst": burst,
                    "burst_instances": delta.instances, "sources": sorted(delta.sources),
                    "last_arrival": delta.last_arrival, "boundary": False, "boundary_at": None,
                    "claimed_at": None,
                })
            except DuplicateKeyError:  # a claimed burst a dead writer numbered before the study knew
                burst += 1
                continue
            return burst

    async def _insert(self, documents: list[Document]) -> list[int]:
        """Insert; the indexes of documents whose ``_id`` was already taken (in the database or
        earlier in the batch). Any other failure removes what this call inserted and raises."""
        try:
            await self._collection("instance").insert_many(documents, ordered=False)
        except BulkWriteError as error:
            errors = error.details.get("writeErrors", [])
            taken = sorted(e["index"] for e in errors if e.get("code") == _DUPLICATE_KEY)
            if len(taken) == len(errors):
                return taken
            failed = {e["index"] for e in errors}
            inserted = [doc["_id"] for i, doc in enumerate(documents) if i not in failed]
            await self._collection("instance").delete_many({"_id": {"$in": inserted}})
            raise
        return []

    async def _add_to_series(
        self, series_uid: str, members: list[tuple[InstanceRecord, dict[str, Any]]]
    ) -> bool:
        """Count the members into their series (study lease held); True when this created it."""
        record, attributes = members[0]
        update = {
            "$inc": {"NumberOfSeriesRelatedInstances": len(members)},
            "$setOnInsert": {
                "StudyInstanceUID": record.study_uid,
                **_qido.level_fields(attributes, "series"),
                "representative": record.sop_instance_uid,
                "dataset": _dumps(_qido.project(record.dataset, "series")),
            },
        }
        before = await self._collection("series").find_one_and_update(
            {"_id": series_uid}, update, upsert=True, return_document=ReturnDocument.BEFORE
        )
        return before is None

    async def _add_to_study(self, study_uid: str, delta: _StudyDelta, now: datetime) -> None:
        """Count a put into its study (lease held), and catch up with the burst it joined."""
        studies = self._collection("study")
        study = await studies.find_one({"_id": study_uid}, ["version"])
        if study is None:
            # Versions go on from a removed study's outbox entry, so that no version is reused.
            removed = await self._outbox().find_one({"_id": study_uid}, ["version"])
            version = 1 if removed is None else removed["version"] + 1
            await studies.insert_one(_study_document(study_uid, delta, version))
            await self._outbox_changed(study_uid, version, now)
            return
        update: Document = {
            "$inc": {
                "NumberOfStudyRelatedInstances": delta.instances,
                "NumberOfStudyRelatedSeries": delta.new_series,
                "version": 1,
            },
            "$max": {"burst": delta.burst},
        }
        if delta.modalities:
            update["$addToSet"] = {"ModalitiesInStudy": {"$each": sorted(delta.modalities)}}
        await studies.update_one({"_id": study_uid}, update)
        await self._outbox_changed(study_uid, study["version"] + 1, now)

    async def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """One instance by SOP Instance UID."""
        document = await self._collection("instance").find_one({"_id": sop_instance_uid})
        return None if document is None else _record(document)

    async def list_instances(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> list[InstanceRecord]:
        """The instances of a study, a series or one instance, in series/instance number order."""
        query: Document = {"StudyInstanceUID": study_uid}
        if series_uid is not None:
            query["SeriesInstanceUID"] = series_uid
        if sop_instance_uid is not None:
            query["_id"] = sop_instance_uid
        cursor = self._collection("instance").find(query).sort(
            [("SeriesNumber", ASCENDING), ("InstanceNumber", ASCENDING), ("_id", ASCENDING)]
        )
        return [_record(document) async for document in cursor]

    async def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove an instance and update its series and study (under the study's lease)."""
        instances = self._collection("instance")
        instance = await instances.find_one({"_id": sop_instance_uid}, ["StudyInstanceUID"])
        if instance is None:
            return
        study_uid = instance["StudyInstanceUID"]
        async with self._leases.held(study_uid):
            document = await instances.find_one_and_delete({"_id": sop_instance_uid})
            if document is not None:
                await self._named("audit_outbox").delete_one({"_id": sop_instance_uid})
                await self._remove_from_study(study_uid, document["SeriesInstanceUID"], sop_instance_uid)

    async def _remove_from_study(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> None:
        series = await self._collection("series").find_one_and_update(
            {"_id": series_uid}, {"$inc": {"NumberOfSeriesRelatedInstances": -1}},
            return_document=ReturnDocument.AFTER,
        )
        series_gone = series is not None and series["NumberOfSeriesRelatedInstances"] <= 0
        if series_gone:
            await self._collection("series").delete_one({"_id": series_uid})
        else:
            await self._replace_representative("series", series_uid, sop_instance_uid)
        studies = self._collection("study")
        study = await studies.find_one(
            {"_id": study_uid}, ["NumberOfStudyRelatedInstances", "version"]
        )
        if study is None:
            return
        now = datetime.now(UTC)
        if study["NumberOfStudyRelatedInstances"] <= 1:
            await studies.delete_one({"_id": study_uid})
            await self._named("assembly_outbox").delete_many({"study": study_uid})
            await self._outbox_changed(study_uid, study["version"] + 1, now)  # its tombstone
            return
        found = self._collection("series").find({"StudyInstanceUID": study_uid}, ["Modality"])
        modalities = {doc["Modality"] async for doc in found if doc.get("Modality")}
        update: Document = {
            "$inc": {
                "NumberOfStudyRelatedInstances": -1, "NumberOfStudyRelatedSeries": -int(series_gone),
                "version": 1,
            },
            "$set": {"ModalitiesInStudy": sorted(modalities)},
        }
        await self._named("assembly_outbox").update_one(
            {"study": study_uid, "claimed_at": None, "burst_instances": {"$gt": 0}},
            {"$inc": {"burst_instances": -1}},
        )
        await studies.update_one({"_id": study_uid}, update)
        await self._replace_representative("study", study_uid, sop_instance_uid)
        await self._outbox_changed(study_uid, study["version"] + 1, now)

    async def _replace_representative(self, level: Level, uid: str, removed: str) -> None:
        """Let the earliest remaining instance answer for a series or study whose representative left."""
        collection = self._collection(level)
        if await collection.find_one({"_id": uid, "representative": removed}, ["_id"]) is None:
            return
        cursor = self._collection("instance").find({UID_OF[level]: uid}, ["dataset", "attributes"])
        async for instance in cursor.sort([("stored_at", ASCENDING), ("_id", ASCENDING)]).limit(1):
            await collection.update_one({"_id": uid, "representative": removed}, {"$set": {
                "representative": instance["_id"],
                "dataset": _dumps(_qido.project(json.loads(instance["dataset"]), level)),
                **_qido.level_fields(json.loads(instance["attributes"]), level),
            }})

    async def study_patients(self, study_uids: Sequence[str]) -> dict[str, StudyPatient]:
        """The patient of each stored study named."""
        uids = list(dict.fromkeys(study_uids))
        if not uids:
            return {}
        cursor = self._collection("study").find(
            {"_id": {"$in": uids}}, {"PatientID": 1, "IssuerOfPatientID": 1}
        )
        return {
            document["_id"]: StudyPatient(
                document.get("PatientID") or "", document.get("IssuerOfPatientID") or ""
            )
            async for document in cursor
        }

    async def query(self, query: Query) -> list[DicomJson]:
        """QIDO-RS matching at one level (see ``_qido``)."""
        plan = _qido.plan(query)
        if plan.impossible:
            return []
        selector = await self._selector(plan)
        cursor = (
            self._collection(query.level).find(selector, _PROJECTION[query.level])
            .sort(_SORT[query.level]).skip(query.offset).limit(query.limit)
        )
        return [_result(query.level, document) async for document in cursor]

    async def _selector(self, plan: Plan) -> Document:
        clauses: list[Document] = []
        for level, conditions in plan.conditions.items():
            here = [_condition(level, condition) for condition in conditions]
            if level == plan.level:
                clauses.extend(here)
                continue
            key = _qido.link(plan.level, level)
            there = _field(level, key)
            found = self._collection(level).find(_all_of(here), [there])
            linked = {document[there] async for document in found if document.get(there) is not None}
            clauses.append({_field(plan.level, key): {"$in": sorted(linked)}})
        return _all_of(clauses)

    async def mark_boundary(self, study_uids: Sequence[str], at: datetime) -> None:
        """Set the boundary flag of these studies' open bursts (each under its study's lease)."""
        for study_uid in dict.fromkeys(study_uids):
            async with self._leases.held(study_uid):
                await self._named("assembly_outbox").update_one(
                    {"study": study_uid, "claimed_at": None},
                    {"$set": {"boundary": True, "boundary_at": _utc(at)}},
                )

    async def claim_ready(
        self, now: datetime, *, quiet: timedelta, max_idle: timedelta, lease: timedelta, limit: int = 100
    ) -> list[ReadyStudy]:
        """Claim ended bursts from the assembly outbox. A claimer takes the study's lease without
        waiting (a busy study is left for the next call), checks the burst is still claimable, and
        stamps its claim time."""
        now = _utc(now)
        claimable: Document = {"$and": [
            {"$or": [
                {"boundary": True, "last_arrival": {"$lt": now - quiet}},
                {"last_arrival": {"$lt": now - max_idle}},
            ]},
            {"$or": [{"claimed_at": None}, {"claimed_at": {"$lt": now - lease}}]},
        ]}
        outbox = self._named("assembly_outbox")
        found = outbox.find(claimable, ["study"]).sort("last_arrival", ASCENDING).limit(limit)
        candidates = [(document["_id"], document["study"]) async for document in found]
        ready: list[ReadyStudy] = []
        for burst_id, study_uid in candidates:
            token = await self._leases.take(study_uid)
            if token is None:
                continue
            try:
                burst = await outbox.find_one({"$and": [{"_id": burst_id}, claimable]})
                if burst is not None:
                    await outbox.update_one({"_id": burst_id}, {"$set": {"claimed_at": now}})
                    study = await self._collection("study").find_one({"_id": study_uid}, _READY_FIELDS)
                    ready.append(_ready(burst, study))
            finally:
                await self._leases.release(study_uid, token)
        return ready

    async def ack_ready(self, study_uid: str, burst: int) -> None:
        """Remove a claimed burst from the assembly outbox (under the study's lease)."""
        async with self._leases.held(study_uid):
            await self._named("assembly_outbox").delete_one(
                {"_id": f"{study_uid}:{burst}", "claimed_at": {"$ne": None}}
            )

    async def pending_audit(self, stored_before: datetime, limit: int = 100) -> list[InstanceRecord]:
        """The instances the audit outbox points at whose own pointer it is (``created_at`` equal to
        their ``stored_at``); drops the other pointers, and those of instances still missing long
        after. Instances are read by ``_id`` (an equality FerretDB pushes down, unlike ``$in``)."""
        pointers = self._named("audit_outbox")
        cursor = pointers.find({"created_at": {"$lt": _utc(stored_before)}}).sort("created_at", ASCENDING)
        pending = [document async for document in cursor.limit(limit)]
        instances = self._collection("instance")
        found = await asyncio.gather(*(instances.find_one({"_id": pointer["_id"]}) for pointer in pending))
        orphan_before = datetime.now(UTC) - _ORPHAN_AUDIT_POINTER
        records, stale = [], []
        for pointer, instance in zip(pending, found, strict=True):
            if instance is not None and _utc(instance["stored_at"]) == _utc(pointer["created_at"]):
                records.append(_record(instance))
            elif instance is not None or _utc(pointer["created_at"]) < orphan_before:
                # Only as read: a put that refreshed the pointer meanwhile keeps it.
                stale.append(DeleteOne({"_id": pointer["_id"], "created_at": pointer["created_at"]}))
        if stale:
            await pointers.bulk_write(stale, ordered=False)
        return records

    async def clear_audit(self, sop_instance_uids: Sequence[str]) -> None:
        """Drop the instances' pointers (one round trip; the outbox is small)."""
        if sop_instance_uids:
            await self._named("audit_outbox").delete_many({"_id": {"$in": list(sop_instance_uids)}})

    async def studies_to_index(self, limit: int = 500) -> list[tuple[DicomJson, int]]:
        """The outbox's studies, oldest change first, with their version; a removed study as its
        tombstone. Each study is read by ``_id`` (an equality FerretDB pushes down, unlike ``$in``)."""
        cursor = self._outbox().find({}, ["version"]).sort("changed_at", ASCENDING).limit(limit)
        pending = [(document["_id"], document["version"]) async for document in cursor]
        studies = self._collection("study")
        found = await asyncio.gather(
            *(studies.find_one({"_id": study_uid}, _PROJECTION["study"]) for study_uid, _ in pending)
        )
        return [
            (_search.tombstone(study_uid) if document is None else _result("study", document), version)
            for (study_uid, version), document in zip(pending, found, strict=True)
        ]

    async def mark_indexed(self, versions: Sequence[tuple[str, int]]) -> None:
        """Remove the outbox entries of studies still at the indexed version, in one delete (on
        FerretDB every delete reads the whole collection). Each study's lease is held meanwhile, so
        that no change is lost to the delete; a study whose lease is busy keeps its entry: it is
        being changed, and indexing it again is harmless."""
        taken = await asyncio.gather(
            *(self._leases.take(study_uid) for study_uid, _ in versions), return_exceptions=True
        )
        held = [
            (uid, version, token)
            for (uid, version), token in zip(versions, taken, strict=True) if isinstance(token, str)
        ]
        try:
            for failure in (token for token in taken if isinstance(token, BaseException)):
                raise failure
            outbox = self._outbox()
            entries = await asyncio.gather(*(outbox.find_one({"_id": uid}, ["version"]) for uid, *_ in held))
            done = [
                uid for (uid, version, _), entry in zip(held, entries, strict=True)
                if entry is not None and entry["version"] == version
            ]
            if done:
                await outbox.delete_many({"_id": {"$in": done}})
        finally:
            await asyncio.gather(*(self._leases.release(uid, token) for uid, _, token in held))

    async def iter_studies(self) -> AsyncIterator[DicomJson]:
        """Every study at study level, in Study Instance UID order."""
        async for document in self._collection("study").find({}, _PROJECTION["study"]).sort("_id", ASCENDING):
            yield _result("study", document)

    async def index_lag_seconds(self) -> float:
        """Age of the oldest change not yet indexed."""
        cursor = self._outbox().find({}, ["changed_at"]).sort("changed_at", ASCENDING)
        async for document in cursor.limit(1):
            return max(0.0, (datetime.now(UTC) - _utc(document["changed_at"])).total_seconds())
        return 0.0


def _instance_document(record: InstanceRecord, attributes: dict[str, Any], now: datetime) -> Document:
    return {
        "_id": record.sop_instance_uid,
        "StudyInstanceUID": record.study_uid,
        "SeriesInstanceUID": record.series_uid,
        "SeriesNumber": attributes.get("SeriesNumber"),  # for ordering; matching uses the series
        **_qido.level_fields(attributes, "instance"),
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "sha256": record.sha256,
        "size": record.size,
        "source": record.source,
        "received_at": record.received_at.isoformat(),  # exact round trip (BSON dates keep milliseconds)
        "stored_at": now,
        "dataset": _dumps(record.dataset),
        "attributes": json.dumps(attributes, separators=(",", ":")),
    }


def _study_document(study_uid: str, delta: _StudyDelta, version: int) -> Document:
    return {
        "_id": study_uid,
        **_qido.level_fields(delta.attributes, "study"),
        "ModalitiesInStudy": sorted(delta.modalities),
        "NumberOfStudyRelatedSeries": delta.new_series,
        "NumberOfStudyRelatedInstances": delta.instances,
        "representative": delta.first.sop_instance_uid,
        "dataset": _dumps(_qido.project(delta.first.dataset, "study")),
        "burst": delta.burst,
        "version": version,
    }


def _ready(burst: Mapping[str, Any], study: Mapping[str, Any] | None) -> ReadyStudy:
    """A claimed burst with its study's aggregates (a study document a dead writer never wrote:
    the burst's own count)."""
    study = study or {}
    return ReadyStudy(
        study_uid=burst["study"],
        burst=burst["burst"],
        burst_instances=burst["burst_instances"],
        total_instances=study.get("NumberOfStudyRelatedInstances", burst["burst_instances"]),
        patient_id=study.get("PatientID"),
        modalities=tuple(sorted(study.get("ModalitiesInStudy") or [])),
        sources=tuple(sorted(burst.get("sources") or [])),
    )


def _all_of(clauses: list[Document]) -> Document:
    """One filter for all clauses: a plain document when no field repeats (FerretDB pushes its
    equalities down), else ``$and``."""
    merged: Document = {}
    for clause in clauses:
        for name, test in clause.items():
            if name in merged:
                return {"$and": clauses}
            merged[name] = test
    return merged


def _condition(level: Level, condition: Condition) -> Document:
    name = _field(level, condition.attribute)
    # Plain equality where possible: FerretDB pushes it down to SQL, not $in or $eq.
    if condition.op == "in":
        values = list(condition.value)
        return {name: values[0]} if len(values) == 1 else {name: {"$in": values}}
    if condition.op == "eq":
        return {name: condition.value}
    if condition.op == "wildcard":
        return {name: {"$regex": _qido.wildcard_to_regex(condition.value)}}
    low, high = condition.value
    bounds = {op: bound for op, bound in (("$gte", low), ("$lte", high)) if bound is not None}
    return {name: bounds}


def _result(level: Level, document: Mapping[str, Any]) -> DicomJson:
    values = {kw: document.get(kw) for kw in _qido.AGGREGATES_OF[level]}
    values[UID_OF[level]] = document["_id"]
    for parent in _qido.UIDS_OF[level][:-1]:
        values[parent] = document[parent]
    return _qido.level_json(level, json.loads(document["dataset"]), values)


def _record(document: Mapping[str, Any]) -> InstanceRecord:
    return InstanceRecord(
        study_uid=document["StudyInstanceUID"],
        series_uid=document["SeriesInstanceUID"],
        sop_instance_uid=document["_id"],
        sop_class_uid=document["sop_class_uid"],
        transfer_syntax_uid=document["transfer_syntax_uid"],
        sha256=document["sha256"],
        size=document["size"],
        source=document["source"],
        received_at=datetime.fromisoformat(document["received_at"]),
        dataset=json.loads(document["dataset"]),
        attributes=json.loads(document["attributes"]),
    )
