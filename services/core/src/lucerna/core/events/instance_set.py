"""The identity of a set of instances, shared by whoever makes it (the orchestrator, for job ids),
logs it (the inference worker's JOB_STARTED audit record) and checks it (``lucerna verify``).

A set is its sorted ``"<sop_instance_uid>:<sha256>\\n"`` lines, one per SOP Instance UID (its first
occurrence), and is identified by the hex SHA-256 of that text: the same instances in any order, or
repeated, give the same set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def instance_set_text(instances: Iterable[tuple[str, str]]) -> str:
    """The set's canonical text from ``(sop_instance_uid, sha256)`` pairs."""
    first: dict[str, str] = {}
    for sop_instance_uid, sha256 in instances:
        first.setdefault(sop_instance_uid, sha256)
    return "".join(sorted(f"{uid}:{sha256}\n" for uid, sha256 in first.items()))


def instance_set_sha256(instances: Iterable[tuple[str, str]]) -> str:
    """The set's identity: the hex SHA-256 of its canonical text."""
    return hashlib.sha256(instance_set_text(instances).encode()).hexdigest()


def parse_instance_set(text: str) -> list[tuple[str, str]]:
    """The ``(sop_instance_uid, sha256)`` pairs of a canonical text; ValueError if it is not one."""
    pairs = []
    for line in text.splitlines():
        uid, _, sha256 = line.rpartition(":")
        if not uid or not sha256:
            raise ValueError(f"not an instance line: {line[:120]!r}")
        pairs.append((uid, sha256))
    if instance_set_text(pairs) != text:
        raise ValueError("the instance lines are not sorted, distinct and newline-terminated")
    return pairs
