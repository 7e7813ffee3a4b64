"""An ``InferenceCompleted`` as one FHIR transaction: the publishing model of ADR 0012.

Pure domain: no transport, no storage. ``publication`` builds, from the event, what the service
knows of the study (``StudyFacts``, filled from ``StudyReady``) and its settings, every resource as
an R4B model (validated on construction), with ids derived from stable keys so that a redelivered
event yields byte-identical resources, the transaction ``Bundle`` (PUT ``<Type>/<id>``), the
conditional-create query of each resource (for a FHIR server that assigns its own ids) and the
SHA-256 of each resource's canonical JSON for the audit log.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import pydantic

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.endpoint import Endpoint
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.resource import Resource
from lucerna.events.v1 import events_pb2
from lucerna.fhir import codes
from lucerna.fhir.canonical import canonical_sha256

Json = dict[str, Any]
R = TypeVar("R", bound=Resource)


class PublishingError(ValueError):
    """The event or the study facts cannot make valid FHIR resources; the message says why."""


@dataclass(frozen=True)
class InstanceFacts:
    """One instance of a series."""

    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class SeriesFacts:
    """One series of a study."""

    series_instance_uid: str
    modality: str
    number_of_instances: int
    body_part: str = ""  # DICOM BodyPartExamined
    instances: tuple[InstanceFacts, ...] = ()


@dataclass(frozen=True)
class StudyFacts:
    """What the FHIR service knows of a study: everything a ``StudyReady`` carries, and optional
    header values that a richer source (the metadata store) may add."""

    study_instance_uid: str
    patient_id: str
    modalities: tuple[str, ...]
    series: tuple[SeriesFacts, ...]
    number_of_instances: int
    issuer_of_patient_id: str | None = None
    patient_name: str | None = None  # DICOM PN: family^given^middle^prefix^suffix
    started: datetime | None = None
    accession_number: str | None = None
    description: str | None = None

    @classmethod
    def from_study_ready(cls, ready: events_pb2.StudyReady, site_timezone: tzinfo = UTC) -> StudyFacts:
        """The facts a ``StudyReady`` event gives (its instance set is the whole study so far);
        a study time without a DICOM time zone offset is taken in ``site_timezone``."""
        by_series: dict[str, list[events_pb2.InstanceRef]] = {}
        for ref in ready.instances:
            by_series.setdefault(ref.series_instance_uid, []).append(ref)
        series = tuple(
            SeriesFacts(
                series_instance_uid=uid,
                modality=refs[0].modality,
                number_of_instances=len(refs),
                body_part=refs[0].body_part,
                instances=tuple(InstanceFacts(ref.sop_instance_uid, ref.sop_class_uid) for ref in refs),
            )
            for uid, refs in by_series.items()
        )
        return cls(
            study_instance_uid=ready.study_instance_uid,
            patient_id=ready.patient_id,
            modalities=tuple(ready.modalities),
            series=series,
            number_of_instances=ready.total_instances or len(ready.instances),
            description=ready.study_description or None,
            issuer_of_patient_id=ready.issuer_of_patient_id or None,
            patient_name=ready.patient_name or None,
            started=dicom_datetime(ready.study_date, ready.study_time, ready.timezone_offset, site_timezone),
            accession_number=ready.accession_number or None,
        )


def dicom_datetime(date: str, time: str, offset: str, site_timezone: tzinfo) -> datetime | None:
    """A DICOM DA + TM (+ TimezoneOffsetFromUTC) as an aware datetime; None without a valid date
    and time (a date alone is not a start time)."""
    match = re.fullmatch(r"(\d{4})(\d{2})(\d{2})", date.strip())
    clock = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", time.strip())
    if match is None or clock is None:
        return None
    zone = site_timezone
    if re.fullmatch(r"[+-]\d{4}", offset.strip()):
        sign = 1 if offset.strip()[0] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(offset.strip()[1:3]), minutes=int(offset.strip()[3:5])))
    year, month, day = (int(part) for part in match.groups())
    hour, minute, second, fraction = clock.groups()
    try:
        return datetime(
            year,
            month,
            day,
            int(hour),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=zone,
        )
    except ValueError:
        return None


@dataclass(frozen=True)
class PublishingSettings:
    """Deployment choices of publishing (filled from the service's settings)."""

    # Configurable: a hospital sets its MRN system (e.g. "urn:oid:1.2.3.4.5" or its URL).
    patient_identifier_system: str = codes.DEFAULT_PATIENT_ID_SYSTEM
    # DICOM Issuer of Patient ID -> identifier system, for sites with several issuers.
    issuer_systems: Mapping[str, str] = field(default_factory=dict)
    dicomweb_base_url: str = "http://127.0.0.1:8080/dicom-web"
    platform_name: str = "Lucerna"

    def __post_init__(self) -> None:
        if urlsplit(self.dicomweb_base_url).scheme not in ("http", "https"):
            raise ValueError(f"dicomweb_base_url must be an http(s) URL, not {self.dicomweb_base_url!r}")

    def patient_system(self, issuer: str | None) -> str:
        """The identifier system of a PatientID from this issuer."""
        if not issuer:
            return self.patient_identifier_system
        # An unmapped issuer still gets its own system: two issuers' equal IDs are two patients.
        return self.issuer_systems.get(issuer, f"{self.patient_identifier_system}:{quote(issuer, safe='')}")


@dataclass(frozen=True)
class PublishedResource:
    """One resource of a publication, with what storing and auditing it needs."""

    resource: Resource
    reference: str  # "<Type>/<id>"
    if_none_exist: str  # conditional-create query on its identifier
    sha256: str  # of its canonical JSON


@dataclass(frozen=True)
class Publication:
    """The resources of one result, in transaction order, and their transaction Bundle."""

    endpoint: Endpoint
    patient: Patient
    imaging_study: ImagingStudy
    model_device: Device
    platform_device: Device
    observations: tuple[Observation, ...]
    report: DiagnosticReport
    provenance: Provenance
    entries: tuple[PublishedResource, ...]
    bundle: Bundle

    def sha256(self, reference: str) -> str:
        """The canonical SHA-256 of the resource at ``<Type>/<id>``."""
        for entry in self.entries:
            if entry.reference == reference:
                return entry.sha256
        raise KeyError(reference)


def resource_id(resource_type: str, *key: str) -> str:
    """A deterministic id: the first 32 hex digits of SHA-256 over the type and the stable key."""
    return hashlib.sha256("\n".join((resource_type, *key)).encode("utf-8")).hexdigest()[:32]


def patient_resource_id(patient_id: str, issuer: str | None, settings: PublishingSettings) -> str:
    """The id of the Patient of a DICOM PatientID from this issuer: the one publishing files the
    study under, and the one the audit service indexes DICOMweb reads under (so both agree)."""
    return resource_id("Patient", settings.patient_system(issuer), patient_id)


def publication(
    completed: events_pb2.InferenceCompleted, study: StudyFacts, settings: PublishingSettings
) -> Publication:
    """The FHIR resources and transaction that publish one inference result."""
    _check_event(completed, study)
    completed_at = _timestamp(completed.completed_at.ToDatetime(tzinfo=UTC))
    endpoint, patient, imaging_study = imaging_resources(study, settings)
    patient_ref = f"Patient/{patient.id}"
    study_ref = f"ImagingStudy/{imaging_study.id}"
    model_device = _build(Device, _model_device(completed, settings))
    platform_device = _build(Device, _platform_device(settings))
    model_ref = f"Device/{model_device.id}"

    observations = tuple(
        _build(
            Observation,
            _observation(
                completed,
                index,
                finding,
                patient_ref=patient_ref,
                study_ref=study_ref,
                model_ref=model_ref,
                completed_at=completed_at,
            ),
        )
        for index, finding in enumerate(completed.findings, start=1)
    )
    observation_refs = [f"Observation/{obs.id}" for obs in observations]
    report = _build(
        DiagnosticReport,
        _report(completed, patient_ref, study_ref, observation_refs, completed_at),
    )
    report_ref = f"DiagnosticReport/{report.id}"
    provenance = _build(
        Provenance,
        _provenance(
            completed,
            targets=[report_ref, *observation_refs],
            study_ref=study_ref,
            model_ref=model_ref,
            platform_ref=f"Device/{platform_device.id}",
            completed_at=completed_at,
        ),
    )
    entries = (
        *(
            _published(resource, _identifier_query(resource))
            for resource in (
                endpoint,
                patient,
                imaging_study,
                model_device,
                platform_device,
                *observations,
                report,
            )
        ),
        # Provenance has no identifier in R4: its report identifies it.
        _published(provenance, f"target={quote(report_ref, safe='/')}"),
    )
    bundle = _build(
        Bundle,
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{uuid.UUID(hex=str(entry.resource.id))}",
                    "resource": resource_json(entry.resource),
                    "request": {"method": "PUT", "url": entry.reference},
                }
                for entry in entries
            ],
        },
    )
    return Publication(
        endpoint=endpoint,
        patient=patient,
        imaging_study=imaging_study,
        model_device=model_device,
        platform_device=platform_device,
        observations=observations,
        report=report,
        provenance=provenance,
        entries=entries,
        bundle=bundle,
    )


def imaging_resources(
    study: StudyFacts, settings: PublishingSettings
) -> tuple[Endpoint, Patient, ImagingStudy]:
    """The study's DICOMweb Endpoint, its Patient and its ImagingStudy, as a publication has them."""
    if not study.patient_id:
        raise PublishingError(
            f"study {study.study_instance_uid} has no PatientID: no Patient to file it under"
        )
    endpoint = _build(Endpoint, _endpoint(settings))
    patient = _build(Patient, _patient(study, settings))
    imaging_study = _build(
        ImagingStudy, _imaging_study(study, f"Patient/{patient.id}", f"Endpoint/{endpoint.id}")
    )
    return endpoint, patient, imaging_study


def resource_json(resource: Resource) -> Json:
    """The resource as JSON (what is stored and sent)."""
    data: Json = resource.model_dump(mode="json", by_alias=True, exclude_none=True)
    return data


def _check_event(completed: events_pb2.InferenceCompleted, study: StudyFacts) -> None:
    required = {
        "job_id": completed.job_id,
        "study_instance_uid": completed.study_instance_uid,
        "model": completed.model,
        "model_version": completed.model_version,
        "weights_sha256": completed.weights_sha256,
        "instance_set_sha256": completed.instance_set_sha256,
    }
    missing = [name for name, value in required.items() if not value]
    if missing:
        raise PublishingError(f"InferenceCompleted lacks {', '.join(missing)}")
    if not completed.HasField("completed_at"):
        raise PublishingError("InferenceCompleted lacks completed_at")
    if completed.study_instance_uid != study.study_instance_uid:
        raise PublishingError(
            f"result of study {completed.study_instance_uid} given facts of study {study.study_instance_uid}"
        )
    if not study.patient_id:
        raise PublishingError(f"study {study.study_instance_uid} has no PatientID: no Patient to publish for")
    if completed.patient_id and completed.patient_id != study.patient_id:
        raise PublishingError(
            f"result for PatientID {completed.patient_id!r}, study facts for {study.patient_id!r}"
        )


def _build(model: type[R], data: Json) -> R:
    """The R4B model of ``data``; invalid content raises a ``PublishingError`` naming the resource."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        raise PublishingError(f"invalid {data.get('resourceType')} {data.get('id')}: {error}") from error


def _published(resource: Resource, if_none_exist: str) -> PublishedResource:
    return PublishedResource(
        resource=resource,
        reference=f"{resource.get_resource_type()}/{resource.id}",
        if_none_exist=if_none_exist,
        sha256=canonical_sha256(resource),
    )


def _identifier_query(resource: Resource) -> str:
    """``identifier=system|value`` on the resource's first identifier, escaped as FHIR search asks."""
    identifier = resource_json(resource)["identifier"][0]

    def token(text: str) -> str:
        for special in ("\\", "|", ",", "$"):
            text = text.replace(special, "\\" + special)
        return quote(text, safe=":/")

    return f"identifier={token(identifier['system'])}|{token(identifier['value'])}"


def _timestamp(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _float32(value: float) -> float:
    """The shortest decimal that is the same float32 (the event's floats), not its float64 noise."""
    if not math.isfinite(value):
        return value
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


def _meta_ai() -> Json:
    return {"security": [dict(codes.AIAST)]}


def _endpoint(settings: PublishingSettings) -> Json:
    return {
        "resourceType": "Endpoint",
        "id": resource_id("Endpoint", settings.dicomweb_base_url),
        "identifier": [{"system": codes.DICOMWEB_ENDPOINT, "value": settings.dicomweb_base_url}],
        "status": "active",
        "connectionType": dict(codes.WADO_RS),
        "name": f"{settings.platform_name} DICOMweb",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": settings.dicomweb_base_url,
    }


def _patient(study: StudyFacts, settings: PublishingSettings) -> Json:
    system = settings.patient_system(study.issuer_of_patient_id)
    data: Json = {
        "resourceType": "Patient",
        "id": patient_resource_id(study.patient_id, study.issuer_of_patient_id, settings),
        "identifier": [{"use": "usual", "system": system, "value": study.patient_id}],
    }
    if study.issuer_of_patient_id:
        data["identifier"][0]["assigner"] = {"display": study.issuer_of_patient_id}
    if study.patient_name and study.patient_name.strip("^ "):
        parts = [part.strip() for part in study.patient_name.split("^")]
        name: Json = {"text": " ".join(part for part in (*parts[1:3], parts[0]) if part)}
        if parts[0]:
            name["family"] = parts[0]
        if given := [part for part in parts[1:3] if part]:
            name["given"] = given
        data["name"] = [name]
    return data


def _imaging_study(study: StudyFacts, patient_ref: str, endpoint_ref: str) -> Json:
    identifiers: list[Json] = [{"system": codes.DICOM_UID, "value": f"urn:oid:{study.study_instance_uid}"}]
    if study.accession_number:
        identifiers.append(
            {"type": {"coding": [dict(codes.ACCESSION_TYPE)]}, "value": study.accession_number}
        )
    data: Json = {
        "resourceType": "ImagingStudy",
        "id": resource_id("ImagingStudy", study.study_instance_uid),
        "identifier": identifiers,
        "status": "available",
        "modality": [_modality(modality) for modality in study.modalities],
        "subject": {"reference": patient_ref},
        "endpoint": [{"reference": endpoint_ref}],
        "numberOfSeries": len(study.series),
        "numberOfInstances": study.number_of_instances,
        "series": [_series(series) for series in study.series],
    }
    if study.started is not None:
        data["started"] = _timestamp(study.started)
    if study.description:
        data["description"] = study.description
    return data


def _modality(modality: str) -> Json:
    return {"system": codes.DCM, "code": modality}


def _series(series: SeriesFacts) -> Json:
    if not series.modality:
        raise PublishingError(f"series {series.series_instance_uid} has no modality")
    data: Json = {
        "uid": series.series_instance_uid,
        "modality": _modality(series.modality),
        "numberOfInstances": series.number_of_instances,
    }
    if series.body_part:
        data["bodySite"] = dict(codes.BODY_PARTS.get(series.body_part.upper(), {"display": series.body_part}))
    if series.instances:
        data["instance"] = [
            {
                "uid": instance.sop_instance_uid,
                "sopClass": {"system": codes.RFC3986, "code": f"urn:oid:{instance.sop_class_uid}"},
            }
            for instance in series.instances
        ]
    return data


def _model_key(completed: events_pb2.InferenceCompleted) -> str:
    return f"{completed.model}|{completed.model_version}|{completed.weights_sha256}"


def _model_device(completed: events_pb2.InferenceCompleted, settings: PublishingSettings) -> Json:
    return {
        "resourceType": "Device",
        "id": resource_id("Device", completed.model, completed.model_version, completed.weights_sha256),
        "identifier": [
            {"system": codes.MODEL, "value": _model_key(completed)},
            {"system": codes.WEIGHTS_SHA256, "value": completed.weights_sha256},
        ],
        "status": "active",
        "manufacturer": settings.platform_name,
        "deviceName": [{"name": completed.model, "type": "model-name"}],
        "type": {"text": "AI algorithm"},
        "version": [{"value": completed.model_version}],
    }


def _platform_device(settings: PublishingSettings) -> Json:
    return {
        "resourceType": "Device",
        "id": resource_id("Device", "platform", settings.platform_name),
        "identifier": [{"system": codes.PLATFORM, "value": settings.platform_name}],
        "status": "active",
        "deviceName": [{"name": settings.platform_name, "type": "user-friendly-name"}],
        "type": {"text": "AI platform"},
    }


def _coding(system: str, code: str, display: str) -> Json:
    data: Json = {"system": system, "code": code}
    if display:
        data["display"] = display
    return data


def _finding_concept(finding: events_pb2.Finding) -> Json:
    return {"coding": [_coding(finding.code_system, finding.code, finding.display)], "text": finding.display}


def _observation(
    completed: events_pb2.InferenceCompleted,
    index: int,
    finding: events_pb2.Finding,
    *,
    patient_ref: str,
    study_ref: str,
    model_ref: str,
    completed_at: str,
) -> Json:
    where = f"finding {index} of job {completed.job_id}"
    if not finding.code_system or not finding.code:
        raise PublishingError(
            f"{where} has no code (code_system {finding.code_system!r}, code {finding.code!r})"
        )
    if not 0.0 <= finding.probability <= 1.0:  # NaN fails too
        raise PublishingError(f"{where} has probability {finding.probability}, not in [0, 1]")
    components: list[Json] = [
        {
            "code": {"coding": [dict(codes.PROBABILITY)], "text": "Probability"},
            "valueQuantity": {
                "value": _float32(finding.probability),
                "unit": "1",
                "system": codes.UCUM,
                "code": "1",
            },
        }
    ]
    for measurement in finding.measurements:
        if not measurement.name or not measurement.unit or not math.isfinite(measurement.value):
            raise PublishingError(
                f"{where}: measurement {measurement.name!r} needs a name, a finite value and a UCUM unit"
            )
        coding = codes.MEASUREMENTS.get(measurement.name, _coding(codes.LUCERNA_CODE, measurement.name, ""))
        components.append(
            {
                "code": {"coding": [dict(coding)], "text": measurement.name},
                "valueQuantity": {
                    "value": measurement.value,
                    "unit": measurement.unit,
                    "system": codes.UCUM,
                    "code": measurement.unit,
                },
            }
        )
    data: Json = {
        "resourceType": "Observation",
        "id": resource_id("Observation", completed.job_id, str(index)),
        "meta": _meta_ai(),
        "identifier": [{"system": codes.JOB, "value": f"{completed.job_id}/{index}"}],
        "status": "preliminary",
        "category": [{"coding": [dict(codes.IMAGING_CATEGORY)]}],
        "code": _finding_concept(finding),
        "subject": {"reference": patient_ref},
        "effectiveDateTime": completed_at,
        "issued": completed_at,
        "valueCodeableConcept": {"coding": [dict(codes.PRESENT)], "text": "Present"},
        "device": {"reference": model_ref},
        "derivedFrom": [{"reference": study_ref}],
        "component": components,
    }
    if locations := [_location(where, location) for location in finding.locations]:
        data["extension"] = locations
    if finding.body_site_code:
        data["bodySite"] = {
            "coding": [_coding(codes.SNOMED, finding.body_site_code, finding.body_site_display)],
            "text": finding.body_site_display or finding.body_site_code,
        }
    return data


def _location(where: str, location: events_pb2.ImageLocation) -> Json:
    if not location.sop_instance_uid or location.frame < 1:
        raise PublishingError(f"{where}: a location needs a SOP Instance UID and a 1-based frame")
    box = [_float32(v) for v in (location.x_min, location.y_min, location.x_max, location.y_max)]
    if not all(math.isfinite(v) for v in box) or box[0] > box[2] or box[1] > box[3]:
        raise PublishingError(f"{where}: box {box} is not (x_min, y_min, x_max, y_max) in order")
    return {
        "url": codes.IMAGE_LOCATION,
        "extension": [
            {"url": "sopInstanceUid", "valueId": location.sop_instance_uid},
            {"url": "frameNumber", "valuePositiveInt": location.frame},
            *(
                {"url": name, "valueDecimal": value}
                for name, value in zip(("xMin", "yMin", "xMax", "yMax"), box, strict=True)
            ),
        ],
    }


def _report(
    completed: events_pb2.InferenceCompleted,
    patient_ref: str,
    study_ref: str,
    observation_refs: Sequence[str],
    completed_at: str,
) -> Json:
    identifiers: list[Json] = [{"system": codes.JOB, "value": completed.job_id}]
    if completed.result_id:
        identifiers.append({"system": codes.RESULT, "value": completed.result_id})
    page = presented_html(completed).encode("utf-8")
    data: Json = {
        "resourceType": "DiagnosticReport",
        "id": resource_id("DiagnosticReport", completed.job_id),
        "meta": _meta_ai(),
        "identifier": identifiers,
        "status": "preliminary",
        "category": [{"coding": [dict(codes.RADIOLOGY_SECTION)]}],
        "code": {"coding": [dict(codes.IMAGING_REPORT)], "text": f"AI result: {completed.model}"},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": completed_at,
        "issued": completed_at,
        "imagingStudy": [{"reference": study_ref}],
        "conclusion": conclusion(completed),
        "presentedForm": [
            {
                "contentType": "text/html",
                "language": "en",
                "data": base64.b64encode(page).decode("ascii"),
                "size": len(page),
                "title": f"{completed.model} {completed.model_version} findings",
                "creation": completed_at,
            }
        ],
    }
    if observation_refs:
        data["result"] = [{"reference": ref} for ref in observation_refs]
    concepts: dict[tuple[str, str], Json] = {}
    for finding in completed.findings:
        concepts.setdefault((finding.code_system, finding.code), _finding_concept(finding))
    if concepts:
        data["conclusionCode"] = list(concepts.values())
    return data


def _provenance(
    completed: events_pb2.InferenceCompleted,
    *,
    targets: Sequence[str],
    study_ref: str,
    model_ref: str,
    platform_ref: str,
    completed_at: str,
) -> Json:
    return {
        "resourceType": "Provenance",
        "id": resource_id("Provenance", completed.job_id),
        "target": [{"reference": ref} for ref in targets],
        "occurredDateTime": completed_at,
        "recorded": completed_at,
        "activity": {"coding": [dict(codes.CREATE)]},
        "agent": [
            {"type": {"coding": [dict(codes.PERFORMER)]}, "who": {"reference": model_ref}},
            {"type": {"coding": [dict(codes.ASSEMBLER)]}, "who": {"reference": platform_ref}},
        ],
        "entity": [
            {
                "extension": [
                    {"url": codes.INSTANCE_SET_SHA256, "valueString": completed.instance_set_sha256}
                ],
                "role": "source",
                "what": {
                    "reference": study_ref,
                    "identifier": {
                        "system": codes.DICOM_UID,
                        "value": f"urn:oid:{completed.study_instance_uid}",
                    },
                },
            }
        ],
    }


def conclusion(completed: events_pb2.InferenceCompleted) -> str:
    """The report's human-readable conclusion: findings per code, with the largest measurement."""
    if not completed.findings:
        return "No finding above the model's operating threshold. AI result, not reviewed by a radiologist."
    groups: dict[tuple[str, str], list[events_pb2.Finding]] = {}
    for finding in completed.findings:
        groups.setdefault((finding.code_system, finding.code), []).append(finding)
    parts = []
    for findings in groups.values():
        text = f"{findings[0].display or findings[0].code}: {len(findings)} found"
        measurements = [m for finding in findings for m in finding.measurements]
        if measurements:
            largest = max(measurements, key=lambda m: m.value)
            text += f" (largest {largest.name} {largest.value:.1f} {largest.unit})"
        parts.append(text)
    return "; ".join(parts) + ". AI result, not reviewed by a radiologist."


def presented_html(completed: events_pb2.InferenceCompleted) -> str:
    """The report's HTML form: a table of the findings, every value escaped."""
    esc = html.escape
    rows = []
    for index, finding in enumerate(completed.findings, start=1):
        measurements = ", ".join(f"{m.name} {m.value:.1f} {m.unit}" for m in finding.measurements)
        locations = "; ".join(
            f"{loc.sop_instance_uid} frame {loc.frame} "
            f"[{_float32(loc.x_min)}, {_float32(loc.y_min)}, {_float32(loc.x_max)}, {_float32(loc.y_max)}]"
            for loc in finding.locations
        )
        cells = (
            str(index),
            finding.display,
            f"{finding.code_system}|{finding.code}",
            f"{_float32(finding.probability):.3f}",
            finding.body_site_display,
            measurements,
            locations,
        )
        rows.append("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in cells) + "</tr>")
    header = "".join(
        f"<th>{name}</th>"
        for name in ("#", "Finding", "Code", "Probability", "Body site", "Measurements", "Location")
    )
    body = f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows else ""
    title = esc(f"{completed.model} {completed.model_version}")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title></head><body>"
        f"<h1>AI result: {title}</h1>"
        f"<p>{esc(conclusion(completed))}</p>{body}"
        f"<p>Study {esc(completed.study_instance_uid)}, job {esc(completed.job_id)}.</p>"
        "</body></html>"
    )
