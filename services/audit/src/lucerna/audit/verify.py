"""Verification for auditors: a DiagnosticReport back to the signed log.

``export_bundle`` gathers, from a running platform, everything the chain needs into one
self-contained JSON bundle: the report, its Observations, its Provenance and the model's Device as
served at ``/fhir``; the audit log entries of the publication and of the job (their exact bytes);
their inclusion proofs; and the signed checkpoint they lead to. ``verify_bundle`` checks it with
nothing but pinned public keys:

1. the checkpoint's ML-DSA-65 signature (a pinned key of the log's origin);
2. each entry's leaf hash, included in that checkpoint's tree (RFC 9162 inclusion proof);
3. the publication entry names this report's job and carries the canonical SHA-256 of the report,
   of each Observation, of the Provenance and of the model Device, exactly as the bundle holds them;
4. the job entry records the model, version and weights SHA-256 of that Device, and the instance
   set SHA-256 that the Provenance names as the report's source;
5. the report's results are the bundle's Observations and the Provenance targets the report.

Any changed byte — in a resource, an entry, a proof or the checkpoint — fails a check, and the
failure names it. The Fabric anchor of the checkpoint is not checked yet (issue 5: the anchor
service is still to come); the result says so.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from lucerna.audit import merkle
from lucerna.audit.checkpoints import Checkpoint, CheckpointError, TrustedKey, verify
from lucerna.events.v1 import events_pb2
from lucerna.fhir import codes
from lucerna.fhir.canonical import canonical_sha256

BUNDLE_FORMAT = "lucerna-proof-bundle/1"
JOB_SYSTEM = "urn:lucerna:job"


class VerificationError(Exception):
    """A check of the chain failed; the message names which and why."""


@dataclass
class Report:
    """What was checked, in order; ``anchored`` is None while anchoring is not deployed."""

    checks: list[str] = field(default_factory=list)
    anchored: bool | None = None

    def passed(self, check: str) -> None:
        """Record a check that held."""
        self.checks.append(check)


def export_bundle(base_url: str, report_id: str, client: httpx.Client) -> dict[str, Any]:
    """The proof bundle of a DiagnosticReport, read from a running platform at ``base_url``."""
    report = _get_json(client, f"{base_url}/fhir/DiagnosticReport/{report_id}")
    job = _job_of(report)
    resources: dict[str, Any] = {f"DiagnosticReport/{report_id}": report}
    for reference in [item["reference"] for item in report.get("result", [])]:
        resources[reference] = _get_json(client, f"{base_url}/fhir/{reference}")
    provenances = _get_json(
        client, f"{base_url}/fhir/Provenance", params={"target": f"DiagnosticReport/{report_id}"}
    ).get("entry", [])
    if len(provenances) != 1:
        raise VerificationError(
            f"DiagnosticReport/{report_id} has {len(provenances)} Provenance resources, not 1"
        )
    provenance = provenances[0]["resource"]
    resources[f"Provenance/{provenance['id']}"] = provenance
    model = next(agent["who"]["reference"] for agent in provenance["agent"] if _is_performer(agent))
    resources[model] = _get_json(client, f"{base_url}/fhir/{model}")

    note = client.get(f"{base_url}/api/audit/checkpoints/latest")
    note.raise_for_status()
    size = Checkpoint.parse(note.text.split("\n\n")[0] + "\n").size
    entries = []
    for key in (f"audit-result-published:{job}", f"audit-job-finished:{job}"):
        entry = _get_json(client, f"{base_url}/api/audit/entries", params={"key": key})
        if entry["seq"] >= size:
            raise VerificationError(
                f"log entry {key} is not under a signed checkpoint yet; try again shortly"
            )
        proof = _get_json(
            client, f"{base_url}/api/audit/proofs/inclusion/{entry['seq']}", params={"size": str(size)}
        )
        entries.append(
            {"seq": entry["seq"], "key": key, "data": entry["data"], "inclusion_proof": proof["proof"]}
        )
    keys = _get_json(client, f"{base_url}/.well-known/lucerna-audit-keys")
    return {
        "format": BUNDLE_FORMAT,
        "report": f"DiagnosticReport/{report_id}",
        "resources": resources,
        "entries": entries,
        "checkpoint": note.text,
        "published_keys": keys,
    }


def verify_bundle(
    bundle: Mapping[str, Any], trusted: Iterable[TrustedKey], origin: str | None = None
) -> Report:
    """Check the whole chain of a bundle (see the module docstring); ``VerificationError`` names
    the first check that fails."""
    if bundle.get("format") != BUNDLE_FORMAT:
        raise VerificationError(f"not a proof bundle of format {BUNDLE_FORMAT}: {bundle.get('format')!r}")
    result = Report()
    try:
        checkpoint = verify(bundle["checkpoint"], trusted, origin=origin)
    except CheckpointError as error:
        raise VerificationError(f"checkpoint: {error}") from error
    result.passed(f"checkpoint {checkpoint.origin} size {checkpoint.size} signed by a pinned key")

    records = {}
    for entry in bundle["entries"]:
        data = base64.b64decode(entry["data"])
        try:
            merkle.verify_inclusion(
                merkle.leaf_hash(data),
                entry["seq"],
                checkpoint.size,
                [base64.b64decode(node) for node in entry["inclusion_proof"]],
                checkpoint.root,
            )
        except merkle.ProofError as error:
            raise VerificationError(f"log entry {entry['seq']} ({entry['key']}): {error}") from error
        record = events_pb2.AuditRecord()
        record.ParseFromString(data)
        records[entry["key"]] = record
        result.passed(f"log entry {entry['seq']} ({entry['key']}) included in the checkpoint")

    resources: Mapping[str, Any] = bundle["resources"]
    report_ref = bundle["report"]
    report = resources[report_ref]
    job = _job_of(report)
    published = _record(records, f"audit-result-published:{job}", events_pb2.AuditRecord.RESULT_PUBLISHED)
    if published.sha256 != canonical_sha256(report):
        raise VerificationError(f"{report_ref}: its canonical SHA-256 is not the one the log recorded")
    for reference, resource in resources.items():
        logged = published.details.get(reference, "")
        if logged.rpartition(":")[2] != canonical_sha256(resource):
            raise VerificationError(f"{reference}: its canonical SHA-256 is not the one the log recorded")
    result.passed(f"{len(resources)} resources hash to what the publication entry recorded")

    provenance = next(r for ref, r in resources.items() if ref.startswith("Provenance/"))
    targets = {target["reference"] for target in provenance["target"]}
    if report_ref not in targets:
        raise VerificationError(f"the Provenance does not target {report_ref}")
    results = {item["reference"] for item in report.get("result", [])}
    if not results <= set(resources) or not results <= targets:
        raise VerificationError(f"{report_ref}: its results are not the Observations the Provenance covers")
    result.passed("the Provenance covers the report and its Observations")

    finished = _record(records, f"audit-job-finished:{job}", events_pb2.AuditRecord.JOB_FINISHED)
    model_ref = next(agent["who"]["reference"] for agent in provenance["agent"] if _is_performer(agent))
    device = resources[model_ref]
    weights = {i["value"] for i in device.get("identifier", []) if i.get("system") == codes.WEIGHTS_SHA256}
    if finished.details.get("weights_sha256") not in weights or finished.details.get(
        "model_version"
    ) != device.get("version", [{}])[0].get("value"):
        raise VerificationError(f"{model_ref}: the model or weights differ from the job the log recorded")
    source = _instance_set(provenance)
    if finished.sha256 != source:
        raise VerificationError("the Provenance's instance set is not the one the job ran over, as logged")
    model = f"{finished.details['model']} {finished.details['model_version']}"
    result.passed(f"job {job}: model {model}, its weights and the instance set as logged")
    return result


def _record(records: Mapping[str, events_pb2.AuditRecord], key: str, action: int) -> events_pb2.AuditRecord:
    record = records.get(key)
    if record is None:
        raise VerificationError(f"the bundle has no log entry {key}")
    if record.action != action:
        raise VerificationError(
            f"log entry {key} is not a {events_pb2.AuditRecord.Action.Name(action)} record"
        )
    return record


def _job_of(report: Mapping[str, Any]) -> str:
    for identifier in report.get("identifier", []):
        if identifier.get("system") == JOB_SYSTEM:
            return str(identifier["value"])
    raise VerificationError(f"DiagnosticReport/{report.get('id')} names no job ({JOB_SYSTEM})")


def _is_performer(agent: Mapping[str, Any]) -> bool:
    return any(coding.get("code") == "performer" for coding in agent.get("type", {}).get("coding", []))


def _instance_set(provenance: Mapping[str, Any]) -> str:
    for entity in provenance.get("entity", []):
        for extension in entity.get("extension", []):
            if extension.get("url") == codes.INSTANCE_SET_SHA256:
                return str(extension["valueString"])
    raise VerificationError("the Provenance names no instance set")


def _get_json(client: httpx.Client, url: str, params: Mapping[str, str] | None = None) -> Any:
    response = client.get(url, params=params)
    if response.status_code != 200:
        raise VerificationError(f"GET {response.url}: {response.status_code} {response.text[:300]}")
    return json.loads(response.content)
