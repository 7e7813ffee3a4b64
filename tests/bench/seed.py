"""Seed a metadata store with many synthetic instances directly (for QIDO latency benchmarks).

Writing 100,000 instances through STOW-RS would measure ingestion, not search; this writes the
same records ingestion would, through the store's own port, in batches.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from lucerna.core.dicom.attributes import derive
from lucerna.core.storage.ports import InstanceRecord, MetadataStore

SURNAMES = ["SMITH", "JONES", "MILLER", "GARCIA", "MUELLER", "DUBOIS", "ROSSI", "TANAKA", "NOVAK", "SILVA"]
GIVEN = ["ANNA", "JOHN", "MARIA", "LI", "OMAR", "EVA", "PAUL", "SARA", "IVAN", "NINA"]
MODALITIES = ["CT", "MR", "CR", "US", "PT"]


def _element(vr: str, value: object) -> dict[str, object]:
    return {"vr": vr, "Value": [value]}


def records(studies: int, per_study: int, seed: int = 7) -> Iterator[InstanceRecord]:
    """``studies`` x ``per_study`` instances with varied names, dates and modalities."""
    rng = random.Random(seed)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    for s in range(studies):
        study_uid = f"2.25.{1000 + s}"
        name = f"{rng.choice(SURNAMES)}{s % 97}^{rng.choice(GIVEN)}"
        date = (start + timedelta(days=rng.randrange(0, 2000))).strftime("%Y%m%d")
        modality = rng.choice(MODALITIES)
        for i in range(per_study):
            series_uid = f"{study_uid}.{i % 4}"
            sop_uid = f"{study_uid}.{i % 4}.{i}"
            dataset = {
                "00080016": _element("UI", CTImageStorage),
                "00080018": _element("UI", sop_uid),
                "00080020": _element("DA", date),
                "00080030": _element("TM", "101500"),
                "00080050": _element("SH", f"ACC{s:06d}"),
                "00080060": _element("CS", modality),
                "00081030": _element("LO", f"{modality} STUDY {s}"),
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
                "00100020": _element("LO", f"PID{s:06d}"),
                "0020000D": _element("UI", study_uid),
                "0020000E": _element("UI", series_uid),
                "00200011": _element("IS", i % 4 + 1),
                "00200013": _element("IS", i + 1),
            }
            yield InstanceRecord(
                study_uid=study_uid,
                series_uid=series_uid,
                sop_instance_uid=sop_uid,
                sop_class_uid=CTImageStorage,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                sha256=hashlib.sha256(sop_uid.encode()).hexdigest(),
                size=524_288,
                source="bench:seed",
                received_at=datetime.now(UTC),
                dataset=dataset,
                attributes=derive(dataset),
            )


async def _put(store: MetadataStore, batch: list[InstanceRecord]) -> int:
    # As ingestion does once their audit records are published: the outbox stays small.
    outcomes = await store.put_instances(batch)
    await store.clear_audit([record.sop_instance_uid for record in batch])
    return len(outcomes)


async def seed(store: MetadataStore, studies: int, per_study: int, batch: int = 500) -> int:
    """Write the records in batches; returns how many were written."""
    pending: list[InstanceRecord] = []
    written = 0
    for record in records(studies, per_study):
        pending.append(record)
        if len(pending) == batch:
            written += await _put(store, pending)
            pending = []
    if pending:
        written += await _put(store, pending)
    return written
