"""The metadata store on MongoDB (pymongo's async API), within what FerretDB v1 also serves.

Collections follow ``_qido``: ``instances`` (``_id`` = SOP Instance UID; record fields, derived
attributes, the header), ``series`` and ``studies`` (``_id`` = their UID; the representative's
attributes and data set, aggregates maintained on write). Data sets (and an instance's derived
attributes) are kept as JSON text, not as nested documents: no query looks inside them (matching
uses top-level copies), FerretDB decodes them over ten times faster, and DICOM JSON's NaN, 64-bit
unsigned integers or odd keys cannot trip BSON. A study document also
carries the assembly state of its current burst and the index outbox (``version``, ``dirty``,
``changed_at``). There are no transactions and no ``$lookup``: instances are inserted once (a
taken ``_id`` answers DUPLICATE or CONFLICT), a study and its series change only under the study's
lease (see ``_Leases``), and conditions on another collection are resolved by a first query into
a UID list.

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

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from lucerna.core.dicom.attributes import derive
from lucerna.core.storage import _qido
from lucerna.core.storage._qido import UID_OF, Condition, Plan
from lucerna.core.storage.ports import (
    DicomJson,
    InstanceRecord,
    Level,
    PutOutcome,
    Query,
    ReadyStudy,
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
        [("AccessionNumber", ASCENDING)], [("dirty", ASCENDING), ("changed_at", ASCENDING)],
        [("boundary", ASCENDING), ("claimed", ASCENDING), ("last_arrival", ASCENDING)],
    ],
    "series": [_SORT["series"], [("Modality", ASCENDING)]],
    "instance": [_SORT["instance"], [("SeriesInstanceUID", ASCENDING), ("stored_at", ASCENDING)]],
}
_DUPLICATE_KEY = 11000


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

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> bool:
        """True when the server answers within three seconds."""
        if self._client is None:
            return False
        try:
            async with asyncio.timeout(3):
                await self._client.admin.command("ping")
        except (PyMongoError, TimeoutError):
            return False
        return True

    async def put_instances(self, records: Sequence[InstanceRecord]) -> list[PutOutcome]:
        """Insert the new instances in one round trip, then update each study (and its series)
        once, under the study's lease."""
        if not records:
            return []
        now = datetime.now(UTC)
        attributes = [record.attributes or derive(record.dataset) for record in records]
        documents = [_instance_document(r, a, now) for r, a in zip(records, attributes, strict=True)]
        failed = await self._insert(documents)
        outcomes = [PutOutcome.CREATED] * len(records)
        if failed:
            wanted = {"_id": {"$in": [records[i].sop_instance_uid for i in failed]}}
            existing = {doc["_id"]: doc["sha256"] async for doc in self._collection("instance").find(wanted)}
            for i in failed:
                same = existing.get(records[i].sop_instance_uid) == records[i].sha256
                outcomes[i] = PutOutcome.DUPLICATE if same else PutOutcome.CONFLICT
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
                await self._add_to_study(study_uid, delta, now)
        return outcomes

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
        """Count a put into its study (lease held): into the current burst, or a new one if claimed."""
        studies = self._collection("study")
        study = await studies.find_one({"_id": study_uid}, ["claimed", "sources"])
        if study is None:
            await studies.insert_one(_study_document(study_uid, delta, now))
            return
        new_burst = bool(study["claimed"])
        update: Document = {
            "$inc": {
                "NumberOfStudyRelatedInstances": delta.instances,
                "NumberOfStudyRelatedSeries": delta.new_series,
                "version": 1,
                **({"burst": 1} if new_burst else {"burst_instances": delta.instances}),
            },
            "$set": {
                "claimed": False,
                "boundary": False,
                "dirty": True,
                "sources": sorted(delta.sources if new_burst else {*study["sources"], *delta.sources}),
                **({"burst_instances": delta.instances} if new_burst else {}),
            },
            "$max": {"last_arrival": delta.last_arrival},
            "$min": {"changed_at": now},
        }
        if delta.modalities:
            update["$addToSet"] = {"ModalitiesInStudy": {"$each": sorted(delta.modalities)}}
        await studies.update_one({"_id": study_uid}, update)

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
        study = await studies.find_one({"_id": study_uid}, ["NumberOfStudyRelatedInstances", "claimed"])
        if study is None:
            return
        if study["NumberOfStudyRelatedInstances"] <= 1:
            await studies.delete_one({"_id": study_uid})
            return
        found = self._collection("series").find({"StudyInstanceUID": study_uid}, ["Modality"])
        modalities = {doc["Modality"] async for doc in found if doc.get("Modality")}
        update: Document = {
            "$inc": {
                "NumberOfStudyRelatedInstances": -1, "NumberOfStudyRelatedSeries": -int(series_gone),
                "version": 1,
            },
            "$set": {"ModalitiesInStudy": sorted(modalities), "dirty": True},
            "$min": {"changed_at": datetime.now(UTC)},
        }
        if not study["claimed"]:
            update["$inc"]["burst_instances"] = -1
        await studies.update_one({"_id": study_uid}, update)
        await self._replace_representative("study", study_uid, sop_instance_uid)

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
        """Set the boundary flag of these studies (each under its lease)."""
        for study_uid in dict.fromkeys(study_uids):
            async with self._leases.held(study_uid):
                await self._collection("study").update_one(
                    {"_id": study_uid}, {"$set": {"boundary": True, "boundary_at": _utc(at)}}
                )

    async def claim_ready(self, quiet_before: datetime, limit: int = 100) -> list[ReadyStudy]:
        """Hand out complete bursts. A claimer takes the study's lease without waiting (a busy
        study is left for the next call), checks the burst is still waiting, and marks it claimed."""
        studies = self._collection("study")
        waiting = {"boundary": True, "claimed": False, "last_arrival": {"$lt": _utc(quiet_before)}}
        ready: list[ReadyStudy] = []
        tried: list[str] = []
        while len(ready) < limit:
            found = studies.find({**waiting, "_id": {"$nin": tried}}, ["_id"])
            found = found.sort("last_arrival", ASCENDING).limit(limit - len(ready))
            candidates = [doc["_id"] async for doc in found]
            if not candidates:
                break
            for study_uid in candidates:
                tried.append(study_uid)
                token = await self._leases.take(study_uid)
                if token is None:
                    continue
                try:
                    study = await studies.find_one({**waiting, "_id": study_uid})
                    if study is not None:
                        await studies.update_one({"_id": study_uid}, {"$set": {"claimed": True}})
                        ready.append(_ready(study))
                finally:
                    await self._leases.release(study_uid, token)
        return ready

    async def studies_to_index(self, limit: int = 500) -> list[tuple[DicomJson, int]]:
        """Studies changed since last indexed, oldest change first, with their version."""
        cursor = self._collection("study").find({"dirty": True}, [*_PROJECTION["study"], "version"])
        return [
            (_result("study", document), document["version"])
            async for document in cursor.sort("changed_at", ASCENDING).limit(limit)
        ]

    async def mark_indexed(self, versions: Sequence[tuple[str, int]]) -> None:
        """Clear the outbox mark of studies still at the indexed version. A study whose lease is
        busy is left marked: it is being changed, and indexing it again is harmless."""
        for study_uid, version in versions:
            token = await self._leases.take(study_uid)
            if token is None:
                continue
            try:
                await self._collection("study").update_one(
                    {"_id": study_uid, "version": version},
                    {"$set": {"dirty": False}, "$unset": {"changed_at": ""}},
                )
            finally:
                await self._leases.release(study_uid, token)

    async def iter_studies(self) -> AsyncIterator[DicomJson]:
        """Every study at study level, in Study Instance UID order."""
        async for document in self._collection("study").find({}, _PROJECTION["study"]).sort("_id", ASCENDING):
            yield _result("study", document)

    async def index_lag_seconds(self) -> float:
        """Age of the oldest change not yet indexed."""
        cursor = self._collection("study").find({"dirty": True}, ["changed_at"]).sort("changed_at", ASCENDING)
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


def _study_document(study_uid: str, delta: _StudyDelta, now: datetime) -> Document:
    return {
        "_id": study_uid,
        **_qido.level_fields(delta.attributes, "study"),
        "ModalitiesInStudy": sorted(delta.modalities),
        "NumberOfStudyRelatedSeries": delta.new_series,
        "NumberOfStudyRelatedInstances": delta.instances,
        "representative": delta.first.sop_instance_uid,
        "dataset": _dumps(_qido.project(delta.first.dataset, "study")),
        "burst": 1,
        "burst_instances": delta.instances,
        "claimed": False,
        "boundary": False,
        "last_arrival": delta.last_arrival,
        "sources": sorted(delta.sources),
        "version": 1,
        "dirty": True,
        "changed_at": now,
    }


def _ready(study: Mapping[str, Any]) -> ReadyStudy:
    return ReadyStudy(
        study_uid=study["_id"],
        burst=study["burst"],
        burst_instances=study["burst_instances"],
        total_instances=study["NumberOfStudyRelatedInstances"],
        patient_id=study.get("PatientID"),
        modalities=tuple(sorted(study.get("ModalitiesInStudy") or [])),
        sources=tuple(sorted(study.get("sources") or [])),
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
