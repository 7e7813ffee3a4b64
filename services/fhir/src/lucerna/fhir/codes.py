"""Code systems, codes and identifier systems of published results (ADR 0012).

Lucerna's own systems are URNs under ``urn:lucerna:``: the project has no published canonical web
base yet, and a URN makes no promise of a resolvable StructureDefinition that does not exist.
"""

from __future__ import annotations

from typing import Any

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
RFC3986 = "urn:ietf:rfc:3986"  # the system of a "urn:oid:" code (SOP classes) and identifier (UIDs)

# Identifier systems (conditional-create keys).
DICOM_UID = "urn:dicom:uid"
JOB = "urn:lucerna:job"
RESULT = "urn:lucerna:result"
MODEL = "urn:lucerna:model"
WEIGHTS_SHA256 = "urn:lucerna:model-weights-sha256"
PLATFORM = "urn:lucerna:platform"
DICOMWEB_ENDPOINT = "urn:lucerna:dicomweb-endpoint"
DEFAULT_PATIENT_ID_SYSTEM = "urn:lucerna:patient-id"

# Extensions.
IMAGE_LOCATION = "urn:lucerna:fhir:extension:image-location"
INSTANCE_SET_SHA256 = "urn:lucerna:fhir:extension:instance-set-sha256"

# Lucerna's local codes: what no standard terminology names (an AI model's score).
LUCERNA_CODE = "urn:lucerna:fhir:code"

# The HL7 AI Transparency IG's label, in v3-ObservationValue (not v3-ActReason).
AIAST: dict[str, Any] = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}

PRESENT: dict[str, Any] = {"system": SNOMED, "code": "52101004", "display": "Present"}
PROBABILITY: dict[str, Any] = {"system": LUCERNA_CODE, "code": "probability", "display": "Model probability"}
IMAGING_CATEGORY: dict[str, Any] = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
RADIOLOGY_SECTION: dict[str, Any] = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
IMAGING_REPORT: dict[str, Any] = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
ACCESSION_TYPE: dict[str, Any] = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
    "code": "ACSN",
    "display": "Accession ID",
}
CREATE: dict[str, Any] = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
    "code": "CREATE",
    "display": "create",
}
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
PERFORMER: dict[str, Any] = {"system": PARTICIPANT_TYPE, "code": "performer", "display": "Performer"}
ASSEMBLER: dict[str, Any] = {"system": PARTICIPANT_TYPE, "code": "assembler", "display": "Assembler"}
WADO_RS: dict[str, Any] = {
    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
    "code": "dicom-wado-rs",
    "display": "DICOM WADO-RS",
}

# Measurement names of the event (model manifests) with a standard code; others get a local code.
MEASUREMENTS: dict[str, dict[str, Any]] = {
    "diameter": {"system": SNOMED, "code": "81827009", "display": "Diameter"},
}

# DICOM BodyPartExamined (upper case) to SNOMED CT, after DICOM PS3.16 Annex L; others keep the
# DICOM term as the coding's display only.
BODY_PARTS: dict[str, dict[str, Any]] = {
    "CHEST": {"system": SNOMED, "code": "51185008", "display": "Thoracic structure"},
    "LUNG": {"system": SNOMED, "code": "39607008", "display": "Lung structure"},
    "HEAD": {"system": SNOMED, "code": "69536005", "display": "Head structure"},
    "BRAIN": {"system": SNOMED, "code": "12738006", "display": "Brain structure"},
}
