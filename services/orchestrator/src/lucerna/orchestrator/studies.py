"""What the orchestrator knows of a study: the last ``study.ready`` snapshot and its instance set.

An instance set is identified by its SHA-256 over the sorted ``"<sop_instance_uid>:<sha256>\\n"``
lines of its instances, so the same instances (in any order) always give the same set and job id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from lucerna.core.events import instance_set as instance_sets


@dataclass(frozen=True)
class InstanceRef:
    """One stored instance, enough for a worker to read its bytes (by SHA-256) from the blob store."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sha256: str
    modality: str = ""
    body_part: str = ""
    transfer_syntax_uid: str = ""


def distinct(instances: Iterable[InstanceRef]) -> tuple[InstanceRef, ...]:
    """The instances with each SOP Instance UID once (its first occurrence), in order."""
    seen: dict[str, InstanceRef] = {}
    for instance in instances:
        seen.setdefault(instance.sop_instance_uid, instance)
    return tuple(seen.values())


def instance_set_sha256(instances: Iterable[InstanceRef]) -> str:
    """The set's identity (``lucerna.core.events.instance_set``)."""
    return instance_sets.instance_set_sha256((i.sop_instance_uid, i.sha256) for i in instances)


@dataclass(frozen=True)
class StudySnapshot:
    """A study as its last ``study.ready`` described it (what workflow rules match on)."""

    study_uid: str
    burst: int
    ready_at: datetime
    study_description: str
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    sop_class_uids: tuple[str, ...]
    calling_ae_titles: tuple[str, ...]
    instances: tuple[InstanceRef, ...]

    @property
    def instance_set_sha256(self) -> str:
        """The identity of the study's instance set."""
        return instance_set_sha256(self.instances)
