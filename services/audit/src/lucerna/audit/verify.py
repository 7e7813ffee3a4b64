"""Verification for auditors: a DiagnosticReport back to the signed log.

``export_bundle`` gathers, from a running platform, everything the chain needs into one
self-contained JSON bundle: the report, its Observations, its Provenance and the model's Device as
served at ``/fhir``; the audit log entries of the publication and of the job (their exact bytes);
their inclusion proofs; the signed checkpoint they lead to (the first checkpoint anchored on the
Fabric ledger that covers them, when the log is anchored); and where that checkpoint was anchored.
``verify_bundle`` checks it with nothing but pinned public keys:

1. the checkpoint's ML-DSA-65 signature (a pinned key of the log's origin);
2. each entry's leaf hash, included in that checkpoint's tree (RFC 9162 inclusion proof);
3. the publication entry names this report's job and carries the canonical SHA-256 of the report,
   of each Observation, of the Provenance and of the model Device, exactly as the bundle holds them;
4. the job entry records the model, version and weights SHA-256 of that Device, and the instance
   set SHA-256 that the Provenance names as the report's source; the job's start entry lists that
   set's instances, and each one has its INSTANCE_STORED entry with the same SOP UID and SHA-256;
5. the report's results are the bundle's Observations and the Provenance targets the report;
6. the checkpoint is the one anchored on the ledger (the same signed note, size and root, with its
   channel, transaction id and block number); online, ``read_back_anchor`` also reads that anchor
   back from the ledger now (through the audit service and the anchor service) and it must agree.

Any changed byte — in a resource, an entry, a proof, the checkpoint or the anchor — fails a check,
and the failure names it. A log that is not anchored verifies up to step 5 and the result says the
anchor is missing (``Report.anchored`` False).
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
from lucerna.core.events.instance_set import instance_set_sha256, parse_instance_set
from lucerna.events.v1 import events_pb2
from lucerna.fhir import codes
from lucerna.fhir.canonical import canonical_sha256

BUNDLE_FORMAT = "lucerna-proof-bundle/1"
JOB_SYSTEM = "urn:lucerna:job"


class VerificationError(Exception):
    """A check of the chain failed; the message names which and why."""


@dataclass
class Report:
    """What was checked, in order; ``anchored``: whether the checkpoint's ledger anchor was checked."""

    checks: list[str] = field(default_factory=list)
    anchored: bool = False

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

    def entry(key: str) -> dict[str, Any]:
        found: dict[str, Any] = _get_json(client, f"{base_url}/api/audit/entries", params={"key": key})
        return found

    keys = [f"audit-result-published:{job}", f"audit-job-finished:{job}"]
    found = [entry(key) for key in keys]
    attempt = found[1]["record"].get("details", {}).get("attempt", "")
    keys.append(f"audit-job-started:{job}:{attempt}")
    found.append(entry(keys[-1]))
    try:
        instances = parse_instance_set(found[2]["record"].get("details", {}).get("instance_set", ""))
    except ValueError as error:
        raise VerificationError(f"log entry {keys[-1]}: its instance set: {error}") from error
    keys += [f"instance-stored:{uid}:{sha256}" for uid, sha256 in instances]
    found += [entry(key) for key in keys[3:]]
    needed = max(entry["seq"] for entry in found) + 1
    anchor: dict[str, Any] | None = None
    if _get_json(client, f"{base_url}/api/audit/anchors")["enabled"]:
        response = client.get(f"{base_url}/api/audit/anchors", params={"covering": str(needed)})
        if response.status_code == 404:
            raise VerificationError(
                f"the log entries of job {job} are not under an anchored checkpoint yet; try again shortly"
            )
        anchor = _json(response)
        note = _get_text(client, f"{base_url}/api/audit/checkpoints/{anchor['size']}")
    else:
        note = _get_text(client, f"{base_url}/api/audit/checkpoints/latest")
    size = Checkpoint.parse(note.split("\n\n")[0] + "\n").size
    if needed > size:
        raise VerificationError(
            f"the log entries of job {job} are not under a signed checkpoint yet; try again shortly"
        )
    entries = []
    for key, item in zip(keys, found, strict=True):
        proof = _get_json(
            client, f"{base_url}/api/audit/proofs/inclusion/{item['seq']}", params={"size": str(size)}
        )
        entries.append(
            {"seq": item["seq"], "key": key, "data": item["data"], "inclusion_proof": proof["proof"]}
        )
    return {
        "format": BUNDLE_FORMAT,
        "report": f"DiagnosticReport/{report_id}",
        "resources": resources,
        "entries": entries,
        "checkpoint": note,
        "anchor": anchor,
        "published_keys": _get_json(client, f"{base_url}/.well-known/lucerna-audit-keys"),
    }


def read_back_anchor(base_url: str, bundle: Mapping[str, Any], client: httpx.Client) -> dict[str, Any] | None:
    """The bundle's anchor as the ledger holds it now (None if the bundle has no anchor)."""
    anchor = bundle.get("anchor")
    if not anchor:
        return None
    found: dict[str, Any] = _get_json(client, f"{base_url}/api/audit/anchors/{int(anchor['size'])}/ledger")
    return found


def verify_bundle(
    bundle: Mapping[str, Any],
    trusted: Iterable[TrustedKey],
    origin: str | None = None,
    on_ledger: Mapping[str, Any] | None = None,
) -> Report:
    """Check the whole chain of a bundle (see the module docstring); ``VerificationError`` names
    the first check that fails. ``on_ledger``: the anchor as read back from the ledger now, to
    compare with the bundle's (``read_back_anchor``)."""
    if bundle.get("format") != BUNDLE_FORMAT:
        raise VerificationError(f"not a proof bundle of format {BUNDLE_FORMAT}: {bundle.get('format')!r}")
    result = Report()
    try:
        checkpoint = verify(bundle["checkpoint"], trusted, origin=origin)
    except CheckpointError as error:
        raise VerificationError(f"checkpoint: {error}") from error
    result.passed(f"checkpoint {checkpoint.origin} size {checkpoint.size} signed by a pinned key")
    records = _included_records(bundle["entries"], checkpoint, result)
    resources: Mapping[str, Any] = bundle["resources"]
    report = resources[bundle["report"]]
    job = _job_of(report)
    _check_publication(bundle["report"], resources, records, job, result)
    finished = _check_job(resources, records, job, result)
    _check_instances(records, job, finished, result)
    _check_anchor(bundle, checkpoint, on_ledger, result)
    return result


def _included_records(
    entries: Iterable[Mapping[str, Any]], checkpoint: Checkpoint, result: Report
) -> dict[str, events_pb2.AuditRecord]:
    """Each entry's record by its key, once its inclusion in the checkpoint is proved."""
    records = {}
    for entry in entries:
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
    result.passed(f"{len(records)} log entries included in the checkpoint")
    return records


def _check_publication(
    report_ref: str,
    resources: Mapping[str, Any],
    records: Mapping[str, events_pb2.AuditRecord],
    job: str,
    result: Report,
) -> None:
    """The resources hash to what the publication entry recorded, and link to each other."""
    report = resources[report_ref]
    published = _record(records, f"audit-result-published:{job}", events_pb2.AuditRecord.RESULT_PUBLISHED)
    if published.sha256 != canonical_sha256(report):
        raise VerificationError(f"{report_ref}: its canonical SHA-256 is not the one the log recorded")
    for reference, resource in resources.items():
        logged = published.details.get(reference, "")
        if logged.rpartition(":")[2] != canonical_sha256(resource):
            raise VerificationError(f"{reference}: its canonical SHA-256 is not the one the log recorded")
    result.passed(f"{len(resources)} resources hash to what the publication entry recorded")

    provenance = _provenance(resources)
    targets = {target["reference"] for target in provenance["target"]}
    if report_ref not in targets:
        raise VerificationError(f"the Provenance does not target {report_ref}")
    results = {item["reference"] for item in report.get("result", [])}
    if not results <= set(resources) or not results <= targets:
        raise VerificationError(f"{report_ref}: its results are not the Observations the Provenance covers")
    result.passed("the Provenance covers the report and its Observations")


def _check_job(
    resources: Mapping[str, Any], records: Mapping[str, events_pb2.AuditRecord], job: str, result: Report
) -> events_pb2.AuditRecord:
    """The job entry names the Device's model and weights and the Provenance's instance set."""
    provenance = _provenance(resources)
    finished = _record(records, f"audit-job-finished:{job}", events_pb2.AuditRecord.JOB_FINISHED)
    model_ref = next(agent["who"]["reference"] for agent in provenance["agent"] if _is_performer(agent))
    device = resources[model_ref]
    weights = {i["value"] for i in device.get("identifier", []) if i.get("system") == codes.WEIGHTS_SHA256}
    if finished.details.get("weights_sha256") not in weights or finished.details.get(
        "model_version"
    ) != device.get("version", [{}])[0].get("value"):
        raise VerificationError(f"{model_ref}: the model or weights differ from the job the log recorded")
    if finished.sha256 != _instance_set(provenance):
        raise VerificationError("the Provenance's instance set is not the one the job ran over, as logged")
    model = f"{finished.details['model']} {finished.details['model_version']}"
    result.passed(f"job {job}: model {model}, its weights and the instance set as logged")
    return finished


def _check_instances(
    records: Mapping[str, events_pb2.AuditRecord],
    job: str,
    finished: events_pb2.AuditRecord,
    result: Report,
) -> None:
    """The job's instance set is the instances listed at its start, each stored as logged."""
    started_key = f"audit-job-started:{job}:{finished.details.get('attempt', '')}"
    started = _record(records, started_key, events_pb2.AuditRecord.JOB_STARTED)
    try:
        instances = parse_instance_set(started.details.get("instance_set", ""))
    except ValueError as error:
        raise VerificationError(f"log entry {started_key}: its instance set: {error}") from error
    if not instances or instance_set_sha256(instances) != finished.sha256:
        raise VerificationError(f"log entry {started_key}: its instances are not the job's instance set")
    for uid, sha256 in instances:
        stored = _record(records, f"instance-stored:{uid}:{sha256}", events_pb2.AuditRecord.INSTANCE_STORED)
        if (stored.sop_instance_uid, stored.sha256) != (uid, sha256):
            raise VerificationError(f"log entry instance-stored:{uid}:{sha256} is about another instance")
    result.passed(f"{len(instances)} instances, each stored as logged, make up the job's instance set")


def _check_anchor(
    bundle: Mapping[str, Any], checkpoint: Checkpoint, on_ledger: Mapping[str, Any] | None, result: Report
) -> None:
    anchor = bundle.get("anchor")
    if not anchor:
        return
    if (
        anchor.get("checkpoint") != bundle["checkpoint"]
        or anchor.get("size") != checkpoint.size
        or anchor.get("root") != checkpoint.root.hex()
    ):
        raise VerificationError("anchor: the anchored checkpoint is not the one the entries are proved in")
    where = (
        f"channel {anchor['channel']}, chaincode {anchor['chaincode']}: "
        f"transaction {anchor['transaction_id']} in block {anchor['block_number']} ({anchor['committed_at']})"
    )
    result.passed(f"checkpoint size {checkpoint.size} anchored on Fabric, {where}")
    if on_ledger is not None:
        for name in ("checkpoint", "size", "root", "transaction_id", "block_number", "channel", "chaincode"):
            if on_ledger.get(name) != anchor.get(name):
                raise VerificationError(
                    f"anchor: the ledger's {name} is not the bundle's "
                    f"({on_ledger.get(name)!r} != {anchor.get(name)!r})"
                )
        result.passed(f"the anchor read back from the ledger matches (block {on_ledger['block_number']})")
    result.anchored = True


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


def _provenance(resources: Mapping[str, Any]) -> Mapping[str, Any]:
    found: Mapping[str, Any] = next(r for ref, r in resources.items() if ref.startswith("Provenance/"))
    return found


def _instance_set(provenance: Mapping[str, Any]) -> str:
    for entity in provenance.get("entity", []):
        for extension in entity.get("extension", []):
            if extension.get("url") == codes.INSTANCE_SET_SHA256:
                return str(extension["valueString"])
    raise VerificationError("the Provenance names no instance set")


def _get_json(client: httpx.Client, url: str, params: Mapping[str, str] | None = None) -> Any:
    return _json(client.get(url, params=params))


def _get_text(client: httpx.Client, url: str) -> str:
    response = client.get(url)
    _ok(response)
    return response.text


def _json(response: httpx.Response) -> Any:
    _ok(response)
    return json.loads(response.content)


def _ok(response: httpx.Response) -> None:
    if response.status_code != 200:
        raise VerificationError(f"GET {response.url}: {response.status_code} {response.text[:300]}")
