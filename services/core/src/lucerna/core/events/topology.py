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
)


def queue(name: str) -> QueueSpec:
    """The spec of a declared queue; a typo is a start-up error, not a silent new queue."""
    for spec in QUEUES:
        if spec.name == name:
            return spec
    raise KeyError(f"queue {name!r} is not in the topology (events/topology.py)")
