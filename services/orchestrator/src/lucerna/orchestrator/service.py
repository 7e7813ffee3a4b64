"""The orchestrator deployable: workflow rules, the job state machine, timeouts, dead letters and
the job API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from starlette.routing import BaseRoute

from lucerna.core.events.ports import DeadLetter, Envelope
from lucerna.core.model_manifest import ManifestError, load_repository
from lucerna.core.service import Resources
from lucerna.core.settings import CoreSettings
from lucerna.orchestrator.api import job_routes
from lucerna.orchestrator.errors import ConfigurationError
from lucerna.orchestrator.rules import load_rules
from lucerna.orchestrator.settings import OrchestratorSettings
from lucerna.orchestrator.store import JobStore
from lucerna.orchestrator.workflow import INFERENCE_QUEUES, Policy, Workflow

log = logging.getLogger(__name__)

STUDY_READY_QUEUE = "orchestrator.study-ready"
JOB_EVENTS_QUEUE = "orchestrator.job-events"


SWEEPER_STOP_SECONDS = 5.0


class OrchestratorService:
    """``study.ready`` in, ``inference.requested`` out, job events and dead letters applied."""

    name = "orchestrator"

    def __init__(self, settings: OrchestratorSettings | None = None) -> None:
        self._settings = settings
        self._store: JobStore | None = None
        self._workflow: Workflow | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def settings(self) -> OrchestratorSettings:
        """This service's settings (read from the environment on first use)."""
        if self._settings is None:
            self._settings = OrchestratorSettings()
        return self._settings

    @property
    def workflow(self) -> Workflow | None:
        """The running workflow, if started."""
        return self._workflow

    async def readiness(self) -> dict[str, bool]:
        """Started and the job store reachable."""
        workflow = self._workflow
        return {"jobs": workflow is not None and await workflow.store.ping()}

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        """The job API."""
        return job_routes(resources, lambda: self._workflow)

    async def start(self, resources: Resources) -> None:
        """Check the rules against the model repository, open the job store, consume the study and
        job events and the inference queues' dead letters, and start the sweeper."""
        settings = self.settings
        models = load_models(settings.model_repository)
        rules = load_rules(settings.rules_file, models)
        store = build_store(resources.settings)
        await store.start()
        self._store = store
        policy = Policy(
            max_attempts=settings.max_attempts,
            timeout_seconds=math.ceil(settings.job_timeout_seconds),
            retry_backoff=timedelta(seconds=settings.retry_backoff_seconds),
            retry_backoff_max=timedelta(seconds=settings.retry_backoff_max_seconds),
        )
        workflow = Workflow(store, resources.bus, rules, models, policy=policy)
        if resources.settings.bus_backend == "inprocess":
            # That bus kept nothing across the restart: every open job's request is published again.
            recovered = await workflow.recover_lost_requests()
            if recovered:
                log.info("requesting %d open jobs again after a restart", recovered)

        async def study_ready(envelope: Envelope) -> None:
            await workflow.on_study_ready(envelope)

        async def job_event(envelope: Envelope) -> None:
            await workflow.on_job_event(envelope)

        async def dead_letter(dead: DeadLetter) -> None:
            await workflow.on_dead_letter(dead)

        bus = resources.bus
        await bus.consume(STUDY_READY_QUEUE, study_ready, prefetch=settings.prefetch)
        await bus.consume(JOB_EVENTS_QUEUE, job_event, prefetch=settings.prefetch)
        for queue in INFERENCE_QUEUES:
            await bus.consume_dead_letters(queue, dead_letter, prefetch=settings.prefetch)
        self._workflow = workflow
        self._stopping = asyncio.Event()
        self._sweeper = asyncio.create_task(
            _sweep(workflow, settings.sweep_interval_seconds, self._stopping), name="orchestrator-sweeper"
        )
        log.info(
            "orchestrator started",
            extra={"models": models, "rules": [rule.name for rule in rules.rules]},
        )

    async def stop(self) -> None:
        """Stop sweeping and close the job store (the bus, closed after, returns what is in flight)."""
        if self._sweeper is not None:
            # The flag ends the loop even if a database call swallowed the cancellation.
            self._stopping.set()
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper], timeout=SWEEPER_STOP_SECONDS)
            self._sweeper = None
        self._workflow = None
        if self._store is not None:
            await self._store.close()
            self._store = None


def load_models(repository: Path) -> dict[str, str]:
    """The model repository's models and versions; ``ConfigurationError`` when it cannot be read."""
    try:
        manifests = load_repository(repository)
    except ManifestError as exc:
        raise ConfigurationError(f"model repository (LUCERNA_ORCHESTRATOR_MODEL_REPOSITORY): {exc}") from exc
    return {name: manifest.version for name, manifest in manifests.items()}


def build_store(settings: CoreSettings) -> JobStore:
    """The job store beside the platform's metadata store: MongoDB, or a SQLite file of its own."""
    if settings.metadata_backend == "mongodb":
        from lucerna.orchestrator.mongo_store import MongoJobStore  # noqa: PLC0415 - optional server adapter

        return MongoJobStore(settings.mongodb_url.get_secret_value(), settings.mongodb_database)
    from lucerna.orchestrator.sqlite_store import SqliteJobStore  # noqa: PLC0415

    return SqliteJobStore(settings.data_dir / "orchestrator.sqlite")


async def _sweep(workflow: Workflow, interval: float, stopping: asyncio.Event) -> None:
    """Sweep every ``interval`` seconds until ``stopping`` is set (or the task is cancelled)."""
    while not stopping.is_set():
        try:
            await workflow.sweep()
        except Exception:
            log.exception("orchestrator sweep failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)


SERVICE = OrchestratorService()
