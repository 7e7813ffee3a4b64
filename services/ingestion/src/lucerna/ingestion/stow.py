"""DICOMweb STOW-RS (PS3.18 10.5): ``POST /dicom-web/studies[/{study}]`` with Part-10 instances.

The body (multipart/related; type="application/dicom") is parsed as it streams in, with the size
limit enforced while reading; nothing is stored until it is complete and well-formed. Each part
then goes to the one ingestion function, and the response is the Store Instances Response Module
(PS3.18 Annex I) in application/dicom+json. Statuses and duplicates: docs/adr/0002.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from lucerna.core.auth import Authenticator
from lucerna.core.dicom.attributes import is_valid_uid
from lucerna.core.storage.ports import DicomJson
from lucerna.ingestion.assembly import end_of_burst
from lucerna.ingestion.ingest import Ports, ingest
from lucerna.ingestion.multipart import (
    MalformedMultipartError,
    MultipartParser,
    Part,
    PayloadTooLargeError,
    parse_content_type,
)
from lucerna.ingestion.outcomes import Disposition, FailureReason, InstanceOutcome
from lucerna.ingestion.settings import IngestionSettings

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
ACCEPTABLE = frozenset({DICOM_JSON, "application/json", "application/*", "*/*"})
IDENTITY_ENCODINGS = frozenset({"binary", "8bit", "7bit"})
WARNING_AGENT = "lucerna"
MAX_WARNINGS = 20  # Warning header fields per response; the body carries every failure anyway

# Store Instances Response Module (PS3.18 Table I.1-1) and SOP Instance Reference Macro tags.
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"


class StowRs:
    """The STOW-RS endpoint over the ingestion ports."""

    def __init__(self, ports: Ports, auth: Authenticator, settings: IngestionSettings) -> None:
        self._ports = ports
        self._auth = auth
        self._settings = settings

    def routes(self) -> Sequence[BaseRoute]:
        """POST on the studies resource and on one study (GET on the same paths is WADO-RS's)."""
        return [
            Route("/dicom-web/studies", self.store, methods=["POST"]),
            Route("/dicom-web/studies/{study}", self.store, methods=["POST"]),
        ]

    async def store(self, request: Request) -> Response:
        """Store the instances of one request."""
        principal = self._auth.require(request, "ImagingStudy", "write")
        study = request.path_params.get("study")
        if study is not None and not is_valid_uid(study):
            raise HTTPException(400, f"{study[:80]!r} in the request URL is not a valid Study Instance UID")
        boundary = _boundary(request.headers.get("content-type"))
        _check_accept(request.headers.get("accept"))
        _check_length(request.headers.get("content-length"), self._settings.max_stow_bytes)
        parts = await self._read(request, boundary)
        if not parts:
            raise HTTPException(400, "the multipart body holds no instances")

        client = request.client.host if request.client else "unknown"
        outcomes = await self._ingest(parts, f"stow:{principal.subject}@{client}", study, request)
        try:
            await end_of_burst(
                self._ports.metadata,
                (o.study_uid for o in outcomes if o.disposition is Disposition.STORED and o.study_uid),
            )
        except Exception:
            log.exception("could not mark the end of a STOW-RS burst")
        base = self._settings.public_base_url or str(request.base_url).rstrip("/")
        return store_response(outcomes, f"{base}/dicom-web", study)

    async def _read(self, request: Request, boundary: str) -> list[Part]:
        parser = MultipartParser(boundary, self._settings.max_stow_bytes)
        try:
            async for chunk in request.stream():
                parser.feed(chunk)
            return parser.finish()
        except PayloadTooLargeError as error:
            raise HTTPException(413, f"{error}; nothing was stored") from error
        except MalformedMultipartError as error:
            raise HTTPException(400, f"malformed multipart body: {error}; nothing was stored") from error
        except ClientDisconnect as error:
            log.info("STOW-RS client went away after %d bytes; nothing was stored", parser.received)
            raise HTTPException(400, "the request body ended early; nothing was stored") from error

    async def _ingest(
        self, parts: Sequence[Part], source: str, study: str | None, request: Request
    ) -> list[InstanceOutcome]:
        outcomes: list[InstanceOutcome | None] = []
        payloads: list[bytes] = []
        for number, part in enumerate(parts, start=1):
            refusal = _refusal(number, part)
            outcomes.append(refusal)
            if refusal is None:
                payloads.append(part.body)
        stored = iter(
            await ingest(
                self._ports,
                payloads,
                source,
                expected_study_uid=study,
                traceparent=request.headers.get("traceparent"),
            )
        )
        return [outcome or next(stored) for outcome in outcomes]


def _boundary(content_type: str | None) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` body; 415 or 400 otherwise."""
    expected = 'STOW-RS takes multipart/related; type="application/dicom" with one Part-10 instance per part'
    if not content_type:
        raise HTTPException(415, f"the request has no Content-Type; {expected}")
    try:
        media, params = parse_content_type(content_type)
    except ValueError as error:
        raise HTTPException(415, f"unreadable Content-Type: {error}; {expected}") from error
    if media != "multipart/related":
        raise HTTPException(415, f"Content-Type {media} is not supported; {expected}")
    part_type = params.get("type", DICOM).strip().lower()
    if part_type != DICOM:
        raise HTTPException(
            415,
            f'multipart/related with type="{part_type}" is not supported (metadata and bulk data STOW-RS is '
            f"not implemented); {expected}",
        )
    boundary = params.get("boundary")
    if not boundary:
        raise HTTPException(400, "the multipart/related Content-Type has no boundary parameter")
    return boundary


def _check_accept(accept: str | None) -> None:
    if not accept:
        return
    ranges = set()
    for item in accept.split(","):
        try:
            ranges.add(parse_content_type(item)[0])
        except ValueError:
            continue
    if not ranges & ACCEPTABLE:
        raise HTTPException(
            406, f"the STOW-RS response is {DICOM_JSON}; the Accept header allows only {accept!r}"
        )


def _check_length(content_length: str | None, limit: int) -> None:
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise HTTPException(413, f"the body ({content_length} bytes) exceeds the limit of {limit} bytes")


def _refusal(number: int, part: Part) -> InstanceOutcome | None:
    """Why a part is not handed to ingestion, or None when it is a Part-10 instance to try."""
    content_type = part.content_type
    # A part without Content-Type takes the type of the request (checked to be application/dicom).
    if content_type is not None and content_type != DICOM:
        shown = part.headers.get("content-type", "")[:80]
        return InstanceOutcome.failed(
            FailureReason.CANNOT_UNDERSTAND, f"part {number} is {shown!r}, not {DICOM}; it was not stored"
        )
    encoding = part.headers.get("content-transfer-encoding", "binary").strip().lower()
    if encoding not in IDENTITY_ENCODINGS:
        return InstanceOutcome.failed(
            FailureReason.CANNOT_UNDERSTAND,
            f"part {number} has Content-Transfer-Encoding {encoding!r}; send the instance's bytes as is",
        )
    return None


def store_response(outcomes: Sequence[InstanceOutcome], dicomweb_root: str, study: str | None) -> Response:
    """The PS3.18 Store Instances Response: 200 all stored, 202 some, 409 none (Table 10.5.3-1)."""
    succeeded = [o for o in outcomes if o.succeeded]
    failed = [o for o in outcomes if not o.succeeded]
    body: DicomJson = {}
    studies = {o.study_uid for o in succeeded}
    study_url = study or (next(iter(studies)) if len(studies) == 1 else None)
    body[RETRIEVE_URL] = _url(f"{dicomweb_root}/studies/{study_url}" if study_url else None)
    if failed:
        body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_failed_item(o) for o in failed]}
    if succeeded:
        body[REFERENCED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [_referenced_item(o, dicomweb_root) for o in succeeded],
        }
    status = 409 if not succeeded else 202 if failed else 200
    response = Response(
        json.dumps(body, separators=(",", ":")).encode(), status_code=status, media_type=DICOM_JSON
    )
    for warning in _warnings(outcomes)[:MAX_WARNINGS]:
        response.headers.append("Warning", warning)
    return response


def _uid(value: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _url(value: str | None) -> dict[str, Any]:
    return {"vr": "UR", "Value": [value]} if value else {"vr": "UR"}


def _failed_item(outcome: InstanceOutcome) -> DicomJson:
    assert outcome.failure_reason is not None  # a failed outcome always has its reason
    return {
        REFERENCED_SOP_CLASS_UID: _uid(outcome.sop_class_uid),
        REFERENCED_SOP_INSTANCE_UID: _uid(outcome.sop_instance_uid),
        FAILURE_REASON: {"vr": "US", "Value": [int(outcome.failure_reason)]},
    }


def _referenced_item(outcome: InstanceOutcome, root: str) -> DicomJson:
    url = (
        f"{root}/studies/{outcome.study_uid}/series/{outcome.series_uid}/instances/{outcome.sop_instance_uid}"
    )
    return {
        REFERENCED_SOP_CLASS_UID: _uid(outcome.sop_class_uid),
        REFERENCED_SOP_INSTANCE_UID: _uid(outcome.sop_instance_uid),
        RETRIEVE_URL: _url(url),
    }


def _warnings(outcomes: Sequence[InstanceOutcome]) -> list[str]:
    """RFC 9111 5.5-style ``299`` warnings: what was already stored, and why each failure failed."""
    warnings = []
    already = [o.sop_instance_uid or "" for o in outcomes if o.disposition is Disposition.ALREADY_STORED]
    if already:
        shown = ", ".join(already[:10]) + (", ..." if len(already) > 10 else "")
        warnings.append(
            _warning(
                f"{len(already)} instance(s) already stored with identical bytes, not stored again: {shown}"
            )
        )
    for number, outcome in enumerate(outcomes, start=1):
        if not outcome.succeeded:
            subject = outcome.sop_instance_uid or f"part {number}"
            warnings.append(_warning(f"{subject}: {outcome.failure_reason:04X} {outcome.message}"))
    return warnings


def _warning(text: str) -> str:
    printable = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:400]
    escaped = printable.replace("\\", "\\\\").replace('"', '\\"')
    return f'299 {WARNING_AGENT} "{escaped}"'
