"""The job store on MongoDB (pymongo's async API), within what FerretDB v1 also serves.

Collections, all prefixed ``orchestrator_`` (the database is shared with the imaging store, which
has its own ``studies``): ``jobs`` (``_id`` = job id; indexed copies of the fields queries use, the
whole job as JSON text in ``record``, and ``version``), ``job_claims``, ``instance_sets`` (``_id`` =
the set's SHA-256), ``studies`` (``_id`` = Study Instance UID) and ``dead_letters`` (``_id`` =
``<queue>:<message id>``).

A job changes by compare-and-set on its ``version``. FerretDB v1 does not apply even a conditional
update atomically (two concurrent ``update_one({"_id": id, "version": v})`` can both match; ADR
0007), but it does refuse a second insert of the same ``_id``. So a writer first inserts the claim
``<job id>:<version + 1>``: only one writer gets it, and only that writer updates the job, still
filtered on the version it read. The claim is removed after the update; a claim left by a writer
that died expires after ``CLAIM_SECONDS`` and is removed by the next writer that meets it. On
MongoDB 7 the claim is merely redundant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from lucerna.core.storage.mongo import answers
from lucerna.orchestrator.jobs import Job, JobState
from lucerna.orchestrator.records import (
    dead_letter_from_record,
    dead_letter_record,
    instances_from_json,
    instances_json,
    job_from_record,
    job_record,
    study_from_record,
    study_record,
)
from lucerna.orchestrator.store import DeadLetterRecord
from lucerna.orchestrator.studies import InstanceRef, StudySnapshot

Document = dict[str, Any]

PREFIX = "orchestrator_"
CLAIM_SECONDS = 10.0  # far longer than one update takes
_NEWEST = [("created_at", DESCENDING), ("_id", ASCENDING)]


class MongoJobStore:
    """The ``JobStore`` in a MongoDB (or FerretDB) database."""

    def __init__(self, url: str, database: str) -> None:
        self._url = url
        self._database = database
        self._client: AsyncMongoClient[Document] | None = None

    def _named(self, name: str) -> AsyncCollection[Document]:
        if self._client is None:
            raise RuntimeError("the MongoDB job store is not started")
        return self._client[self._database][PREFIX + name]

    async def start(self) -> None:
        """Connect and create the indexes."""
        if self._client is not None:
            return
        self._client = AsyncMongoClient(self._url, tz_aware=True)
        jobs = self._named("jobs")
        for keys in (
            _NEWEST,
            [("study_uid", ASCENDING), ("created_at", DESCENDING)],
            [("state", ASCENDING), ("created_at", DESCENDING)],
            [("model", ASCENDING), ("created_at", DESCENDING)],
            [("publish_pending", ASCENDING), ("publish_after", ASCENDING)],
            [("state", ASCENDING), ("deadline", ASCENDING)],
        ):
            await jobs.create_index(keys)
        await self._named("dead_letters").create_index([("dead_at", DESCENDING), ("_id", ASCENDING)])

    async def close(self) -> None:
        """Close the connections."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def ping(self) -> bool:
        """True when the server answers within three seconds."""
        return await answers(self._client)

    async def put_instance_set(self, sha256: str, instances: Sequence[InstanceRef]) -> None:
        """Insert the set once (a taken ``_id`` is the same set)."""
        document = {"_id": sha256, "instances": instances_json(instances)}
        with contextlib.suppress(DuplicateKeyError):
            await self._named("instance_sets").insert_one(document)

    async def get_instance_set(self, sha256: str) -> tuple[InstanceRef, ...] | None:
        """The set, or None."""
        document = await self._named("instance_sets").find_one({"_id": sha256})
        return None if document is None else instances_from_json(document["instances"])

    async def put_study(self, study: StudySnapshot) -> None:
        """Keep the instance set, then replace the snapshot unless a later burst's is kept (the
        upsert's insert then fails on the taken ``_id``)."""
        await self.put_instance_set(study.instance_set_sha256, study.instances)
        document = {"burst": study.burst, "record": json.dumps(study_record(study))}
        with contextlib.suppress(DuplicateKeyError):
            await self._named("studies").replace_one(
                {"_id": study.study_uid, "burst": {"$lte": study.burst}}, document, upsert=True
            )

    async def get_study(self, study_uid: str) -> StudySnapshot | None:
        """The snapshot with its instances, or None."""
        document = await self._named("studies").find_one({"_id": study_uid})
        if document is None:
            return None
        record = json.loads(document["record"])
        instances = await self.get_instance_set(record["instance_set_sha256"])
        return study_from_record(record, instances or ())

    async def create_job(self, job: Job) -> tuple[Job, bool]:
        """Insert unless the id is taken; the stored job and whether it was inserted."""
        document = {
            **_job_document(job),
            "_id": job.job_id,
            "study_uid": job.study_uid,
            "model": job.model,
            "created_at": job.created_at,
            "version": 0,
        }
        try:
            await self._named("jobs").insert_one(document)
        except DuplicateKeyError:
            stored = await self.get_job(job.job_id)
            if stored is None:  # pragma: no cover - jobs are never deleted
                raise
            return stored, False
        return _at_version(job, 0), True

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or None."""
        document = await self._named("jobs").find_one({"_id": job_id}, ["record", "version"])
        return None if document is None else _job(document)

    async def list_jobs(
        self,
        *,
        study_uid: str | None = None,
        state: JobState | None = None,
        model: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """Jobs meeting the filters, newest first."""
        selector: Document = {}
        for name, value in (("study_uid", study_uid), ("state", state and state.value), ("model", model)):
            if value is not None:
                selector[name] = value
        found = self._named("jobs").find(selector, ["record", "version"]).sort(_NEWEST)
        found = found.skip(offset).limit(limit)
        return [_job(document) async for document in found]

    async def update_job(self, job: Job) -> Job | None:
        """Compare-and-set on the version, under the version's claim (see the module docstring)."""
        claims = self._named("job_claims")
        claim = f"{job.job_id}:{job.version + 1}"
        now = datetime.now(UTC)
        try:
            await claims.insert_one({"_id": claim, "expires": now + timedelta(seconds=CLAIM_SECONDS)})
        except DuplicateKeyError:
            await claims.delete_one({"_id": claim, "expires": {"$lt": now}})  # its writer died
            return None
        try:
            result = await self._named("jobs").update_one(
                {"_id": job.job_id, "version": job.version},
                {"$set": {**_job_document(job), "version": job.version + 1}},
            )
        finally:
            await claims.delete_one({"_id": claim})
        return _at_version(job, job.version + 1) if result.matched_count == 1 else None

    async def due_publications(self, now: datetime, limit: int = 100) -> list[Job]:
        """The outbox's due jobs, oldest due first."""
        found = (
            self._named("jobs")
            .find({"publish_pending": True, "publish_after": {"$lte": now}}, ["record", "version"])
            .sort([("publish_after", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
        )
        return [_job(document) async for document in found]

    async def overdue_jobs(self, now: datetime, limit: int = 100) -> list[Job]:
        """Running jobs past their deadline."""
        found = (
            self._named("jobs")
            .find({"state": JobState.RUNNING.value, "deadline": {"$lte": now}}, ["record", "version"])
            .sort([("deadline", ASCENDING), ("_id", ASCENDING)])
            .limit(limit)
        )
        return [_job(document) async for document in found]

    async def add_dead_letter(self, record: DeadLetterRecord) -> bool:
        """Insert unless recorded already."""
        document = {
            "_id": record.record_id,
            "dead_at": record.dead_at,
            "record": json.dumps(dead_letter_record(record)),
        }
        try:
            await self._named("dead_letters").insert_one(document)
        except DuplicateKeyError:
            return False
        return True

    async def list_dead_letters(self, limit: int = 100, offset: int = 0) -> list[DeadLetterRecord]:
        """Newest first."""
        found = (
            self._named("dead_letters")
            .find({}, ["record"])
            .sort([("dead_at", DESCENDING), ("_id", ASCENDING)])
            .skip(offset)
            .limit(limit)
        )
        return [dead_letter_from_record(json.loads(document["record"])) async for document in found]


def _job_document(job: Job) -> Document:
    """The fields a change of the job sets."""
    return {
        "state": job.state.value,
        "publish_pending": job.publish_pending,
        "publish_after": job.publish_after,
        "deadline": job.deadline,
        "record": json.dumps(job_record(job), separators=(",", ":")),
    }


def _job(document: Document) -> Job:
    return job_from_record(json.loads(document["record"]), document["version"])


def _at_version(job: Job, version: int) -> Job:
    return dataclasses.replace(job, version=version)
