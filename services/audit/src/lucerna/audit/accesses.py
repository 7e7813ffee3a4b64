"""Patient-data accesses around the log: what an entry becomes when its record carries PHI, and the
AuditEvent index of ``PATIENT_DATA_READ`` entries; the at-rest keys, the sealed-PHI store and the
index, opened and closed together.

A record names its patient as a FHIR reference (``patient``: FHIR reads) or as DICOM does
(``dicom_patient``: DICOMweb reads); both are indexed as the FHIR Patient, the DICOM one mapped with
the FHIR service's own function and settings (``LUCERNA_FHIR_PATIENT_IDENTIFIER_SYSTEM``,
``LUCERNA_FHIR_ISSUER_SYSTEMS``), so one search by Patient finds FHIR and DICOMweb reads alike.

Order of an append (``AuditService.submit``): seal the PHI and keep the first blob under the entry's
key, append the entry (committing to that blob), then index it. A crash between steps is repaired by
the redelivery: the same blob, the same entry, and an index row put again (idempotent).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lucerna.audit.appender import GroupAppender
from lucerna.audit.auditevents import (
    AuditEventIndex,
    IndexedEvent,
    MongoAuditEventIndex,
    SqliteAuditEventIndex,
    indexed,
)
from lucerna.audit.phi import (
    PHI_DIGEST,
    MongoPhiStore,
    PhiKeys,
    PhiStore,
    SqlitePhiStore,
    committed,
    split_phi,
)
from lucerna.core.settings import CoreSettings
from lucerna.events.v1 import events_pb2
from lucerna.fhir.publishing import PublishingSettings, patient_resource_id
from lucerna.fhir.settings import FhirSettings


class PhiIntegrityError(RuntimeError):
    """An entry's sealed PHI is missing or not the blob the entry commits to."""


@dataclass(frozen=True)
class Disclosure:
    """An indexed access with what it takes to render it: the entry's record (without PHI) and its
    PHI, opened (None when it has none)."""

    event: IndexedEvent
    record: events_pb2.AuditRecord
    phi: events_pb2.AuditRecord | None
    leaf_hash: bytes


class Accesses:
    """The at-rest keys, the sealed PHI and the AuditEvent index."""

    def __init__(
        self,
        keys: PhiKeys,
        phi: PhiStore,
        index: AuditEventIndex,
        publishing: PublishingSettings | None = None,
    ) -> None:
        self.keys = keys
        self.phi = phi
        self.index = index
        self.publishing = publishing or PublishingSettings()
        # Records arrive one message at a time: their writes are grouped into transactions.
        self._keep_first: GroupAppender[tuple[str, bytes], bytes] = GroupAppender(phi.keep_first)
        self._put: GroupAppender[IndexedEvent, bool] = GroupAppender(index.put)

    async def start(self) -> None:
        """Open the stores."""
        await self.phi.start()
        await self.index.start()

    async def close(self) -> None:
        """Close the stores."""
        await self.index.close()
        await self.phi.close()

    async def ping(self) -> bool:
        """Both stores answer."""
        return await self.phi.ping() and await self.index.ping()

    async def entry_data(self, key: str, record: events_pb2.AuditRecord) -> bytes:
        """The entry's bytes: the record when it holds no PHI; else the record without PHI,
        committing to the blob kept for ``key`` (the first one sealed for it)."""
        cleared, phi = split_phi(record)
        if phi is None:
            return record.SerializeToString(deterministic=True)
        blob = await self._keep_first.append((key, self.keys.seal(key, phi)))
        return committed(cleared, blob)

    async def indexed(self, seq: int, key: str, record: events_pb2.AuditRecord) -> None:
        """Index the entry ``seq`` if its record is a patient-data access."""
        if record.action != events_pb2.AuditRecord.PATIENT_DATA_READ:
            return
        reference = patient_reference(record, self.publishing)
        patient = self.keys.patient_index(reference) if reference else ""
        await self._put.append(indexed(seq, key, record, patient))

    async def opened(self, event: IndexedEvent, data: bytes, leaf_hash: bytes) -> Disclosure:
        """The access ``event`` with its entry's record (``data``) and its PHI opened, to render it."""
        record = events_pb2.AuditRecord.FromString(data)
        digest = record.details.get(PHI_DIGEST)
        if digest is None:
            return Disclosure(event, record, None, leaf_hash)
        blob = await self.phi.get(event.key)
        if blob is None or hashlib.sha256(blob).hexdigest() != digest:
            what = "missing" if blob is None else "not the blob the entry commits to"
            raise PhiIntegrityError(f"the sealed PHI of log entry {event.seq} is {what}")
        phi = self.keys.open(event.key, blob)
        phi.patient = patient_reference(phi, self.publishing)  # the Patient it was indexed under
        return Disclosure(event, record, phi, leaf_hash)


def patient_reference(record: events_pb2.AuditRecord, publishing: PublishingSettings) -> str:
    """The FHIR Patient a record names ("" for none): its ``patient``, else the Patient that the FHIR
    service files its DICOM patient under (``lucerna.fhir.publishing.patient_resource_id``)."""
    if record.patient:
        return record.patient
    dicom = record.dicom_patient
    if not record.HasField("dicom_patient") or not dicom.patient_id:
        return ""
    return "Patient/" + patient_resource_id(dicom.patient_id, dicom.issuer_of_patient_id or None, publishing)


def build_accesses(settings: CoreSettings, key_dir: Path) -> Accesses:
    """Beside the log: MongoDB, or SQLite files of their own; the PHI keys in ``key_dir``."""
    keys = PhiKeys.load_or_create(key_dir)
    publishing = FhirSettings().publishing()  # the FHIR service's Patient ids, from the same settings
    if settings.metadata_backend == "mongodb":
        url, database = settings.mongodb_url.get_secret_value(), settings.mongodb_database
        return Accesses(keys, MongoPhiStore(url, database), MongoAuditEventIndex(url, database), publishing)
    data_dir = settings.data_dir
    return Accesses(
        keys,
        SqlitePhiStore(data_dir / "audit-phi.sqlite"),
        SqliteAuditEventIndex(data_dir / "audit-events.sqlite"),
        publishing,
    )
