"""OperationOutcome responses: every error the FHIR API answers is one, with the HTTP status that fits
and a ``diagnostics`` text that says precisely what was wrong."""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.responses import Response

from lucerna.fhir.store import Json

FHIR_JSON = "application/fhir+json; fhirVersion=4.0"

# The FHIR issue type (IssueType value set) that best describes each status this API answers with.
_ISSUE_CODES: Mapping[int, str] = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    500: "exception",
    503: "transient",
}


class FhirError(Exception):
    """An error a FHIR request ends with: its status, FHIR issue code and diagnostics."""

    def __init__(
        self,
        status: int,
        diagnostics: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = code or _ISSUE_CODES.get(status, "processing")
        self.headers = dict(headers or {})


def operation_outcome(diagnostics: str, *, code: str, severity: str = "error") -> Json:
    """An OperationOutcome with one issue."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def outcome_response(status: int, outcome: Json, headers: Mapping[str, str] | None = None) -> Response:
    """A FHIR JSON response carrying ``outcome``."""
    body = json.dumps(outcome, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, status, headers=dict(headers or {}), media_type=FHIR_JSON)


def error_response(error: FhirError) -> Response:
    """The OperationOutcome response for ``error``."""
    return outcome_response(
        error.status, operation_outcome(error.diagnostics, code=error.code), error.headers
    )


def from_http_exception(exc: HTTPException) -> FhirError:
    """The ``FhirError`` for a starlette ``HTTPException`` (auth's 401/403), its headers kept
    (``WWW-Authenticate``)."""
    return FhirError(exc.status_code, str(exc.detail), headers=exc.headers)
