"""The whole RabbitMQ topology, in one place, applied by every service at start.

Every event is routed by its routing key on one durable topic exchange to the quorum queues bound
to it, so no event is dropped for want of a consumer that is not deployed yet.
"""

from __future__ import annotations

from dataclasses import dataclass

EXCHANGE = "lucerna.events"
DEAD_LETTER_EXCHANGE = "lucerna.dead"

# Routing keys.
STUDY_READY = "study.ready"
AUDIT_RECORD = "audit.record"
INFERENCE_REQUESTED_STAT = "inference.requested.stat"  # + ".<model>"
INFERENCE_REQUESTED_ROUTINE = "inference.requested.routine"  # + ".<model>"
INFERENCE_STARTED = "inference.started"
INFERENCE_COMPLETED = "inference.completed"
INFERENCE_FAILED = "inference.failed"
REPORT_PUBLISHED = "fhir.report-published"


@dataclass(frozen=True)
class QueueSpec:
    """A consumer's durable quorum queue and the routing keys bound to it."""

    name: str
    bindings: tuple[str, ...]
    delivery_limit: int = 5

    @property
    def dead_letter_queue(self) -> str:
        """Where messages go once dead: ``<queue>.dead``."""
        return f"{self.name}.dead"


QUEUES: tuple[QueueSpec, ...] = (
    QueueSpec("orchestrator.study-ready", (STUDY_READY,)),
    QueueSpec("audit.records", (AUDIT_RECORD,)),
    # STAT work has its own queue, drained first: quorum queues on RabbitMQ 3.x have no priorities.
    QueueSpec("inference.stat", (f"{INFERENCE_REQUESTED_STAT}.*",)),
    QueueSpec("inference.routine", (f"{INFERENCE_REQUESTED_ROUTINE}.*",)),
    QueueSpec("orchestrator.job-events", (INFERENCE_STARTED, INFERENCE_COMPLETED, INFERENCE_FAILED)),
    QueueSpec("fhir.inference-completed", (INFERENCE_COMPLETED,)),
    QueueSpec("fhir.study-ready", (STUDY_READY,)),
    # Published results, for the FHIR service's subscription notifications.
    QueueSpec("fhir.report-published", (REPORT_PUBLISHED,)),
)


def queue(name: str) -> QueueSpec:
    """The spec of a declared queue; a typo is a start-up error, not a silent new queue."""
    return DEFAULT.queue(name)


@dataclass(frozen=True)
class Topology:
    """The exchanges and queues a bus declares; services use ``DEFAULT``, tests their own names."""

    exchange: str = EXCHANGE
    dead_letter_exchange: str = DEAD_LETTER_EXCHANGE
    queues: tuple[QueueSpec, ...] = QUEUES

    def queue(self, name: str) -> QueueSpec:
        """The spec of a declared queue; a typo is an error, not a silent new queue."""
        for spec in self.queues:
            if spec.name == name:
                return spec
        raise KeyError(f"queue {name!r} is not in the topology (events/topology.py)")

    def queues_for(self, routing_key: str) -> tuple[QueueSpec, ...]:
        """The queues a message with this routing key reaches, by AMQP topic matching."""
        return tuple(
            spec for spec in self.queues if any(topic_matches(b, routing_key) for b in spec.bindings)
        )


DEFAULT = Topology()


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic-exchange matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])
