"""The FHIR R4 REST API under ``/fhir`` (JSON only, FHIR 4.0.1).

- ``GET /fhir/metadata``: the CapabilityStatement (no token needed, as SMART allows).
- ``GET /fhir/{type}/{id}`` (read), ``.../_history/{vid}`` (vread), ``.../_history`` (instance
  history), ``GET /fhir/{type}/_history`` (type history), ``GET /fhir/{type}?...`` and
  ``POST /fhir/{type}/_search`` (search) for every type in ``search.PARAMETERS``
  (``system/<Type>.read``; ``_include``/``_revinclude`` also need read on the types they can add).
- ``POST /fhir/Subscription``, ``PUT``/``DELETE /fhir/Subscription/{id}`` (``system/Subscription.write``);
  any other type's write is 405. A Subscription must be one to ``subscriptions.TOPIC`` that this
  server can serve (422 naming the element otherwise); it is stored ``requested`` and activated by
  its handshake (``notifier``). ``GET /fhir/Subscription/{id}/$status`` answers its status.

Reads send the stored body as is, with ``ETag``/``Last-Modified``; ``If-None-Match`` and
``If-Modified-Since`` answer 304. Searches page with ``_count``/``_offset`` and absolute
``self``/``first``/``previous``/``next``/``last`` links. Every error is an OperationOutcome.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from functools import cache
from typing import Any
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.convertors import PathConvertor, StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.subscription import Subscription
from lucerna.core.auth import Principal
from lucerna.core.logging import correlation_id
from lucerna.core.service import Resources
from lucerna.fhir.canonical import VOLATILE_META, canonical_sha256
from lucerna.fhir.capability import WRITABLE_TYPES, capability_statement
from lucerna.fhir.notifier import Notifier
from lucerna.fhir.outcome import (
    FHIR_JSON,
    FhirError,
    error_response,
    from_http_exception,
    operation_outcome,
    outcome_response,
)
from lucerna.fhir.read_audit import PATIENT_DATA_TYPES, FhirRead, ReadAuditor
from lucerna.fhir.repository import Repository
from lucerna.fhir.search import (
    DEFAULT_COUNT,
    MAX_COUNT,
    PARAMETERS,
    SearchError,
    SearchRequest,
    Summary,
    date_range,
    paging_links,
    params_of,
    parse_search,
    reference_criterion,
    reference_values,
)
from lucerna.fhir.store import Json, ResourceWrite, SearchQuery, StoredResource, VersionConflictError
from lucerna.fhir.subscriptions import SubscriptionError, admit

log = logging.getLogger(__name__)

FHIR_PATH = "/fhir"
MAX_BODY_BYTES = 1_000_000
MAX_REVINCLUDE = 1000  # resources one _revinclude adds to a page; more are cut, with a warning
SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})
ACCEPTABLE = JSON_FORMATS | {"*/*", "application/*"}
# Routes take every method and answer the ones they lack with a FHIR 405 (starlette's is plain).
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
HISTORY_PARAMETERS = frozenset({"_count", "_offset", "_since", "_format", "_pretty"})
# The audited read interaction (FHIR restful-interaction) of each route answering a GET.
INTERACTIONS = {
    "fhir-instance": "read",
    "fhir-vread": "vread",
    "fhir-history": "history-instance",
    "fhir-type-history": "history-type",
    "fhir-type": "search-type",
    "fhir-search-post": "search-type",
}

Handler = Callable[[Request, Repository, Principal], Awaitable[Response]]

# Types another service serves under /fhir (the audit service: AuditEvent). This API's routes never
# match them, whatever order the services' routes are in when they share one app (``lucerna up``).
SERVED_ELSEWHERE = ("AuditEvent",)
DISCLOSED = "disclosed"  # the request state's key of the stored versions an answer carries
_NOT_ELSEWHERE = f"(?!(?:{'|'.join(SERVED_ELSEWHERE)})(?:/|$))"


class _TypeConvertor(StringConvertor):
    regex = _NOT_ELSEWHERE + StringConvertor.regex


class _RestConvertor(PathConvertor):
    regex = _NOT_ELSEWHERE + PathConvertor.regex


register_url_convertor("fhir_type", _TypeConvertor())
register_url_convertor("fhir_rest", _RestConvertor())


@dataclass(frozen=True)
class Operation:
    """What a method on a path does and the access it needs on the path's type."""

    handler: Handler
    access: str


def fhir_routes(
    resources: Resources,
    repository: Callable[[], Repository | None],
    *,
    notifier: Callable[[], Notifier | None] = lambda: None,
    auditor: Callable[[], ReadAuditor | None] = lambda: None,
    base_url: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_revinclude: int = MAX_REVINCLUDE,
    software_version: str = "0.1.0",
) -> Sequence[BaseRoute]:
    """The FHIR API's routes; ``repository`` and ``notifier`` give the running ones (None until
    started; Subscription writes need the notifier; reads are audited through the auditor).

    ``base_url``: the public ``.../fhir`` base for links and ``fullUrl`` (default: the request's own).
    """
    api = FhirApi(
        resources,
        repository=repository,
        notifier=notifier,
        auditor=auditor,
        base_url=base_url,
        max_body_bytes=max_body_bytes,
        max_revinclude=max_revinclude,
        software_version=software_version,
    )
    return [
        Route(f"{FHIR_PATH}/metadata", api.metadata, methods=ANY_METHOD, name="fhir-metadata"),
        api.route("/{type}/_history", {"GET": Operation(api.type_history, "read")}, "fhir-type-history"),
        api.route(
            "/{type}/_search",
            {"POST": Operation(api.search, "read"), "GET": Operation(api.search, "read")},
            "fhir-search-post",
        ),
        api.route("/{type}/{id}/_history/{vid}", {"GET": Operation(api.vread, "read")}, "fhir-vread"),
        api.route("/{type}/{id}/_history", {"GET": Operation(api.instance_history, "read")}, "fhir-history"),
        api.route(
            "/{type}/{id}/$status",
            {"GET": Operation(api.subscription_status, "read")},
            "fhir-subscription-status",
        ),
        api.route(
            "/{type}/{id}",
            {
                "GET": Operation(api.read, "read"),
                "PUT": Operation(api.update, "write"),
                "DELETE": Operation(api.delete, "write"),
            },
            "fhir-instance",
        ),
        api.route(
            "/{type}",
            {"GET": Operation(api.search, "read"), "POST": Operation(api.create, "write")},
            "fhir-type",
        ),
        # Anything else under /fhir is a FHIR 404, not the app's plain one.
        Route(f"{FHIR_PATH}/{{rest:fhir_rest}}", api.unknown, methods=ANY_METHOD, name="fhir-unknown"),
    ]


class FhirApi:
    """The endpoints, over the repository that ``repository()`` gives once the service runs."""

    def __init__(
        self,
        resources: Resources,
        *,
        repository: Callable[[], Repository | None],
        notifier: Callable[[], Notifier | None],
        auditor: Callable[[], ReadAuditor | None],
        base_url: str | None,
        max_body_bytes: int,
        max_revinclude: int,
        software_version: str,
    ) -> None:
        self.auth = resources.auth
        self.repository = repository
        self.notifier = notifier
        self.auditor = auditor
        self.base_url = base_url.rstrip("/") if base_url else None
        self.max_body_bytes = max_body_bytes
        self.max_revinclude = max_revinclude
        self.software_version = software_version
        self.started = datetime.now(UTC)
        self._capabilities: dict[str, bytes] = {}

    # --- Dispatch --------------------------------------------------------------------------------

    def route(self, path: str, operations: Mapping[str, Operation], name: str) -> Route:
        """A route whose methods map to ``operations``, checked (type, method, token, format) first."""
        allowed = ", ".join(sorted({*operations, *(["HEAD"] if "GET" in operations else [])}))

        def operation_for(request: Request) -> tuple[Operation, Principal, Repository]:
            resource_type = _resource_type(request)
            operation = operations.get("GET" if request.method == "HEAD" else request.method)
            if operation is None:
                raise FhirError(
                    405,
                    f"{request.method} is not supported on {request.url.path}",
                    headers={"Allow": allowed},
                )
            if operation.access == "write" and resource_type not in WRITABLE_TYPES:
                raise FhirError(
                    405,
                    f"{resource_type} is read-only here; only {', '.join(sorted(WRITABLE_TYPES))} "
                    "can be created, updated or deleted",
                    headers={"Allow": "GET, HEAD"},
                )
            _check_format(request)
            principal = self.auth.require(request, resource_type, operation.access)
            repository = self.repository()
            if repository is None:
                raise FhirError(
                    503, "the FHIR service is starting; try again shortly", headers={"Retry-After": "5"}
                )
            return operation, principal, repository

        interaction = INTERACTIONS.get(name)

        async def endpoint(request: Request) -> Response:
            principal: Principal | None = None
            try:
                operation, principal, repository = operation_for(request)
                response = await operation.handler(request, repository, principal)
            except FhirError as error:
                response = error_response(error)
            except HTTPException as error:
                response = error_response(from_http_exception(error))
            except SearchError as error:
                response = error_response(FhirError(400, str(error)))
            except VersionConflictError as error:
                response = error_response(FhirError(412, f"If-Match does not hold: {error}", code="conflict"))
            except Exception:  # the client gets an OperationOutcome; the log gets the traceback
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                response = error_response(
                    FhirError(500, "internal error; see the server log for this request's X-Request-ID")
                )
            if interaction is not None and principal is not None:
                self._audit(request, principal, interaction, response)
            return response

        typed = path.replace("{type}", "{type:fhir_type}")
        return Route(f"{FHIR_PATH}{typed}", endpoint, methods=ANY_METHOD, name=name)

    def _audit(self, request: Request, principal: Principal, interaction: str, response: Response) -> None:
        """Queue the audit of a read of patient data (writes and other types are not reads of it):
        what the handler disclosed (``_disclose``) and the request as asked, nothing parsed here."""
        resource_type = request.path_params["type"]
        auditor = self.auditor()
        if auditor is None or resource_type not in PATIENT_DATA_TYPES:
            return
        method = request.method
        if method not in ("GET", "HEAD") and interaction != "search-type":
            return
        scope = request.scope
        id = request.path_params.get("id")
        state = scope.get("state") or {}
        asked = scope["query_string"].decode("latin-1")
        form = state.get("search_form")
        if form:
            asked = f"{asked}&{form}" if asked else form
        status = response.status_code
        auditor.note(
            FhirRead(
                actor=principal.subject,
                interaction=interaction,
                resource_type=resource_type,
                reference=f"{resource_type}/{id}" if id else "",
                query=f"{scope['path']}?{asked}" if asked else scope["path"],
                status=status,
                disclosed=state.get(DISCLOSED, ()) if status < 300 else (),
                at=time.time(),
                request_id=correlation_id.get() or "",
                traceparent=request.headers.get("traceparent"),
            )
        )

    async def unknown(self, request: Request) -> Response:
        """404 for a path under /fhir that names no interaction this server offers."""
        return error_response(
            FhirError(
                404, f"{request.url.path} is not a FHIR interaction this server offers", code="not-supported"
            )
        )

    async def metadata(self, request: Request) -> Response:
        """The CapabilityStatement (no token needed)."""
        if request.method not in ("GET", "HEAD"):
            return error_response(
                FhirError(
                    405, f"{request.method} is not supported on /metadata", headers={"Allow": "GET, HEAD"}
                )
            )
        try:
            _check_format(request)
        except FhirError as error:
            return error_response(error)
        base = self._base(request)
        body = self._capabilities.get(base)
        if body is None:
            statement = capability_statement(base, self.started, self.software_version)
            body = self._capabilities[base] = _dumps(statement)
        return Response(body, media_type=FHIR_JSON)

    def _base(self, request: Request) -> str:
        return self.base_url or str(request.base_url).rstrip("/") + FHIR_PATH

    # --- Reads -----------------------------------------------------------------------------------

    async def read(self, request: Request, repository: Repository, _: Principal) -> Response:
        """The current version of a resource."""
        resource_type, id = request.path_params["type"], request.path_params["id"]
        stored = await repository.store.read(resource_type, id)
        if stored is None:
            raise FhirError(404, f"{resource_type}/{id} is not known")
        _disclose(request, [stored])
        return _version_response(request, stored)

    async def vread(self, request: Request, repository: Repository, _: Principal) -> Response:
        """One version of a resource."""
        resource_type, id, vid = (request.path_params[key] for key in ("type", "id", "vid"))
        version = int(vid) if vid.isdigit() else None
        stored = await repository.store.vread(resource_type, id, version) if version else None
        if stored is None:
            raise FhirError(404, f"{resource_type}/{id} has no version {vid}")
        _disclose(request, [stored])
        return _version_response(request, stored)

    async def instance_history(self, request: Request, repository: Repository, _: Principal) -> Response:
        """The versions of one resource, newest first."""
        resource_type, id = request.path_params["type"], request.path_params["id"]
        if await repository.store.read(resource_type, id) is None:
            raise FhirError(404, f"{resource_type}/{id} is not known")
        return await self._history(request, repository, resource_type, id)

    async def type_history(self, request: Request, repository: Repository, _: Principal) -> Response:
        """The versions of every resource of a type, newest first."""
        return await self._history(request, repository, request.path_params["type"], None)

    async def _history(
        self, request: Request, repository: Repository, resource_type: str, id: str | None
    ) -> Response:
        pairs = list(request.query_params.multi_items())
        ignored = _refuse_unknown(request, pairs, HISTORY_PARAMETERS, "history")
        query = dict(pair for pair in pairs if pair[0] not in ignored)
        count = _integer("_count", query.get("_count"), DEFAULT_COUNT, 0, MAX_COUNT)
        offset = _integer("_offset", query.get("_offset"), 0, 0, None)
        since = None
        if "_since" in query:
            try:
                since = date_range(query["_since"])[0]
            except ValueError:
                raise FhirError(400, f"_since: {query['_since']!r} is not a FHIR instant") from None
        versions, total = await repository.store.history(
            resource_type, id, since=since, count=count, offset=offset
        )
        _disclose(request, versions)
        base = self._base(request)
        path = f"{base}/{resource_type}" + (f"/{id}" if id else "") + "/_history"
        used = [(name, value) for name, value in pairs if name not in ignored]
        entries = [_history_entry(base, stored) for stored in versions]
        links = paging_links(path, used, count=count, offset=offset, total=total, found=len(versions))
        return _bundle("history", total, links, entries)

    # --- Search ----------------------------------------------------------------------------------

    async def search(self, request: Request, repository: Repository, principal: Principal) -> Response:
        """A search: the matches of a page, what they include and what refers to them."""
        resource_type = request.path_params["type"]
        pairs = list(request.query_params.multi_items())
        if request.method == "POST":
            pairs += await self._form(request)
        parsed = parse_search(resource_type, pairs, strict=_prefers_strict(request))
        _authorize_includes(principal, parsed)
        page = await repository.index.search(parsed.query)
        base = self._base(request)
        entries = [
            _entry(base, stored, "match", _shape(stored, parsed.summary, parsed.elements))
            for stored in page.resources
        ]
        notes = [f"ignored: {', '.join(parsed.ignored)}"] if parsed.ignored else []
        added = await self._included(repository, parsed, page.resources, notes)
        entries += [_entry(base, stored, "include", stored.body) for stored in added]
        _disclose(request, [*page.resources, *added])
        if notes:
            warning = operation_outcome("; ".join(notes), code="informational", severity="warning")
            entries.append(
                b'{"fullUrl":"urn:uuid:%s","resource":%s,"search":{"mode":"outcome"}}'
                % (uuid.uuid4().hex.encode(), _dumps(warning))
            )
        links = paging_links(
            f"{base}/{resource_type}",
            list(parsed.used),
            count=parsed.query.count,
            offset=parsed.query.offset,
            total=page.total,
            found=len(page.resources),
        )
        return _bundle("searchset", page.total, links, entries)

    async def _included(
        self,
        repository: Repository,
        parsed: SearchRequest,
        matches: list[StoredResource],
        notes: list[str],
    ) -> list[StoredResource]:
        if not matches or not (parsed.includes or parsed.revincludes):
            return []
        seen = {stored.reference for stored in matches}
        added: list[StoredResource] = []
        if parsed.includes:
            bodies = [json.loads(stored.body) for stored in matches if stored.body is not None]
            wanted: list[str] = []
            for include in parsed.includes:
                param = params_of(include.source_type)[include.param]
                for resource in bodies:
                    wanted += [
                        reference
                        for reference in reference_values(resource, param)
                        if _included_type(reference, include.target_type)
                    ]
            references = [reference for reference in dict.fromkeys(wanted) if reference not in seen]
            for stored in await repository.store.read_many(references):
                seen.add(stored.reference)
                added.append(stored)
        references = [stored.reference for stored in matches]
        for include in parsed.revincludes:
            query = SearchQuery(
                resource_type=include.source_type,
                criteria=(reference_criterion(include.param, references),),
                count=self.max_revinclude + 1,
                with_total=False,
            )
            found = (await repository.index.search(query)).resources
            if len(found) > self.max_revinclude:
                notes.append(f"_revinclude={include} added only the first {self.max_revinclude} resources")
                found = found[: self.max_revinclude]
            for stored in found:
                if stored.reference not in seen:
                    seen.add(stored.reference)
                    added.append(stored)
        return added

    async def _form(self, request: Request) -> list[tuple[str, str]]:
        media_type = _media_type(request)
        body = await self._body(request)
        if not body:
            return []
        if media_type != "application/x-www-form-urlencoded":
            raise FhirError(415, "a _search body must be application/x-www-form-urlencoded")
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError) as error:
            raise FhirError(400, f"the _search body is not a valid form: {error}") from error
        request.state.search_form = body.decode("utf-8")  # audited with the query string: it was asked too
        return pairs

    # --- Writes (Subscription) -------------------------------------------------------------------

    async def create(self, request: Request, repository: Repository, _: Principal) -> Response:
        """Create a Subscription under a new id (an id in the body is ignored, as FHIR says)."""
        resource_type = request.path_params["type"]
        id = uuid.uuid4().hex
        resource = _admitted(await self._resource(request, resource_type, id, body_id=None), None)
        notifier = self._notifier()
        [outcome] = await repository.write([_write(resource_type, id, resource, None)])
        await notifier.subscription_written(outcome.stored)
        return _written(request, self._base(request), outcome.stored, 201)

    async def update(self, request: Request, repository: Repository, _: Principal) -> Response:
        """Replace a Subscription's content (``If-Match`` makes it conditional on the version)."""
        resource_type, id = request.path_params["type"], request.path_params["id"]
        resource = await self._resource(request, resource_type, id, body_id=id)
        if_match = _if_match(request)
        current = await repository.store.read(resource_type, id)
        if current is None:
            raise FhirError(
                404, f"{resource_type}/{id} is not known; create it with POST (update does not create)"
            )
        resource = _admitted(resource, json.loads(current.body) if current.body is not None else None)
        notifier = self._notifier()
        [outcome] = await repository.write([_write(resource_type, id, resource, if_match)])
        await notifier.subscription_written(outcome.stored)
        return _written(request, self._base(request), outcome.stored, 201 if current.deleted else 200)

    async def delete(self, request: Request, repository: Repository, _: Principal) -> Response:
        """Delete a Subscription (a new version that reads as 410 Gone)."""
        resource_type, id = request.path_params["type"], request.path_params["id"]
        deleted = await repository.delete(resource_type, id, if_match=_if_match(request))
        if deleted is not None:
            message = f"{resource_type}/{id} deleted (version {deleted.version_id})"
            return outcome_response(
                200,
                operation_outcome(message, code="informational", severity="information"),
                {"ETag": _etag(deleted)},
            )
        if await repository.store.read(resource_type, id) is None:
            raise FhirError(404, f"{resource_type}/{id} is not known")
        message = f"{resource_type}/{id} was already deleted"
        return outcome_response(200, operation_outcome(message, code="informational", severity="information"))

    async def subscription_status(self, request: Request, repository: Repository, _: Principal) -> Response:
        """``$status`` of one Subscription (Subscriptions Backport IG): a searchset of its status."""
        resource_type, id = request.path_params["type"], request.path_params["id"]
        if resource_type != "Subscription":
            raise FhirError(
                404, f"$status is an operation on Subscription, not {resource_type}", code="not-supported"
            )
        stored = await repository.store.read(resource_type, id)
        if stored is None:
            raise FhirError(404, f"{resource_type}/{id} is not known")
        if stored.deleted:
            raise FhirError(410, f"{stored.reference} was deleted (version {stored.version_id})")
        try:
            bundle = await self._notifier().status(stored, self._base(request))
        except SubscriptionError as error:
            raise FhirError(422, f"{stored.reference} is not served here: {error}") from None
        return Response(
            _dumps(bundle.model_dump(mode="json", by_alias=True, exclude_none=True)), media_type=FHIR_JSON
        )

    def _notifier(self) -> Notifier:
        notifier = self.notifier()
        if notifier is None:
            raise FhirError(
                503, "subscriptions are starting; try again shortly", headers={"Retry-After": "5"}
            )
        return notifier

    async def _resource(self, request: Request, resource_type: str, id: str, body_id: str | None) -> Json:
        if _media_type(request) not in JSON_FORMATS:
            raise FhirError(415, "the body must be application/fhir+json")
        try:
            document = json.loads(await self._body(request))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FhirError(400, f"the body is not valid JSON: {error}") from error
        if not isinstance(document, dict):
            raise FhirError(400, "the body must be a JSON object (a FHIR resource)")
        if document.get("resourceType") != resource_type:
            raise FhirError(
                400,
                f"the body's resourceType is {document.get('resourceType')!r}; the URL says {resource_type}",
            )
        if body_id is not None and document.get("id") != body_id:
            raise FhirError(400, f"the body's id is {document.get('id')!r}; the URL says {body_id!r}")
        document["id"] = id
        meta = document.get("meta")
        if isinstance(meta, dict):
            kept = {key: value for key, value in meta.items() if key not in VOLATILE_META}
            if kept:
                document["meta"] = kept
            else:
                del document["meta"]
        try:
            model = Subscription.model_validate(document)
        except ValidationError as error:
            raise FhirError(422, f"invalid {resource_type}: {_problems(resource_type, error)}") from None
        resource: Json = json.loads(model.model_dump_json())
        return resource

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise FhirError(413, f"the body is larger than {self.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise FhirError(413, f"the body is larger than {self.max_body_bytes} bytes")
        return bytes(body)


# --- Helpers -------------------------------------------------------------------------------------


def _disclose(request: Request, resources: list[StoredResource]) -> None:
    """Note the stored versions an answer carries, for its audit (``FhirApi._audit``): the worker
    finds their patients in them, so the response is never parsed again."""
    setattr(request.state, DISCLOSED, resources)


def _resource_type(request: Request) -> str:
    resource_type: str = request.path_params["type"]
    if resource_type not in PARAMETERS:
        raise FhirError(
            404,
            f"resource type {resource_type!r} is not served here; served: {', '.join(PARAMETERS)}",
            code="not-supported",
        )
    return resource_type


def _check_format(request: Request) -> None:
    requested = request.query_params.get("_format")
    if requested is not None:
        if requested.split(";")[0].strip().lower() not in JSON_FORMATS:
            raise FhirError(406, f"_format={requested} is not served; only JSON (_format=json)")
        return  # _format overrides Accept
    accept = request.headers.get("accept")
    if accept:
        kinds = {part.split(";")[0].strip().lower() for part in accept.split(",")}
        if not kinds & ACCEPTABLE:
            raise FhirError(406, f"Accept: {accept} is not served; only application/fhir+json")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _prefers_strict(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(part.strip().replace(" ", "") == "handling=strict" for part in prefer.split(","))


def _refuse_unknown(
    request: Request, pairs: Iterable[tuple[str, str]], known: frozenset[str], what: str
) -> set[str]:
    unknown = {name for name, _ in pairs if name not in known}
    if unknown and _prefers_strict(request):
        raise FhirError(400, f"unknown {what} parameter(s): {', '.join(sorted(unknown))}")
    return unknown


def _integer(name: str, raw: str | None, default: int, low: int, high: int | None) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise FhirError(400, f"{name} must be a whole number, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise FhirError(400, f"{name} must be {bound}, not {value}")
    return value


def _authorize_includes(principal: Principal, parsed: SearchRequest) -> None:
    """``_include``/``_revinclude`` add resources of other types: the token must let the caller read
    each type they can add (for ``_include`` without a target type, each served target type), so
    that a search never returns what a read would refuse."""
    for include in parsed.includes:
        param = params_of(include.source_type)[include.param]
        targets = [include.target_type] if include.target_type else param.targets
        for target in targets:
            if target in PARAMETERS and not principal.allows(target, "read"):
                _forbid(target, f"_include={include}")
    for include in parsed.revincludes:
        if not principal.allows(include.source_type, "read"):
            _forbid(include.source_type, f"_revinclude={include}")


def _forbid(resource_type: str, why: str) -> None:
    raise FhirError(
        403,
        f"scope system/{resource_type}.read is required for {why}",
        headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
    )


def _included_type(reference: str, target_type: str | None) -> bool:
    kind = reference.partition("/")[0]
    return kind in PARAMETERS and (target_type is None or kind == target_type)


def _etag(stored: StoredResource) -> str:
    return f'W/"{stored.version_id}"'


def _http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(UTC), usegmt=True)


def _version_response(request: Request, stored: StoredResource) -> Response:
    headers = {"ETag": _etag(stored), "Last-Modified": _http_date(stored.last_updated)}
    if stored.body is None:
        raise FhirError(410, f"{stored.reference} was deleted (version {stored.version_id})", headers=headers)
    if _not_modified(request, stored):
        return Response(status_code=304, headers=headers)
    summary, elements = _read_shaping(request)
    return Response(_shape(stored, summary, elements), headers=headers, media_type=FHIR_JSON)


def _read_shaping(request: Request) -> tuple[Summary | None, tuple[str, ...]]:
    raw = request.query_params.get("_summary")
    summary = None
    if raw is not None:
        try:
            summary = Summary(raw)
        except ValueError:
            raise FhirError(400, f"_summary must be true, false, text or data, not {raw!r}") from None
        if summary is Summary.COUNT:
            raise FhirError(400, "_summary=count applies to searches, not reads")
    elements = tuple(
        part.strip() for part in request.query_params.get("_elements", "").split(",") if part.strip()
    )
    return summary, elements


def _not_modified(request: Request, stored: StoredResource) -> bool:
    """RFC 9110: If-None-Match (weak comparison) decides when present, else If-Modified-Since."""
    none_match = request.headers.get("if-none-match")
    if none_match is not None:
        current = str(stored.version_id)
        tags = {tag.strip().removeprefix("W/").strip('"') for tag in none_match.split(",")}
        return "*" in tags or current in tags
    modified_since = request.headers.get("if-modified-since")
    if modified_since:
        try:
            since = parsedate_to_datetime(modified_since)
        except (TypeError, ValueError):
            return False  # RFC 9110: an invalid date is ignored
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        # HTTP dates have whole seconds; the stored time has milliseconds.
        return stored.last_updated.replace(microsecond=0) <= since
    return False


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    version = raw.strip().removeprefix("W/").strip('"')
    if not version.isdigit():
        raise FhirError(400, f'If-Match must be a version ETag such as W/"3", not {raw!r}')
    return int(version)


def _write(resource_type: str, id: str, resource: Json, if_match: int | None) -> ResourceWrite:
    return ResourceWrite(resource_type, id, resource, canonical_sha256(resource), if_match)


def _admitted(resource: Json, current: Json | None) -> Json:
    try:
        return admit(resource, current)
    except SubscriptionError as error:
        raise FhirError(422, f"unsupported Subscription: {error}") from None


def _written(request: Request, base: str, stored: StoredResource, status: int) -> Response:
    headers = {
        "ETag": _etag(stored),
        "Last-Modified": _http_date(stored.last_updated),
        "Location": f"{base}/{stored.reference}/_history/{stored.version_id}",
    }
    if "return=minimal" in request.headers.get("prefer", "").replace(" ", ""):
        return Response(status_code=status, headers=headers)
    return Response(stored.body, status, headers=headers, media_type=FHIR_JSON)


def _problems(resource_type: str, error: ValidationError) -> str:
    problems = []
    for item in error.errors()[:10]:
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{resource_type}.{where}: {item['msg']}" if where else item["msg"])
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


# --- Shaping (_summary, _elements) ---------------------------------------------------------------


@dataclass(frozen=True)
class _Elements:
    summary: frozenset[str]
    mandatory: frozenset[str]


@cache
def _elements_of(resource_type: str) -> _Elements:
    """A type's summary and mandatory top-level elements (JSON names, ``_x`` extensions included)."""
    summary: set[str] = {"resourceType", "id", "meta"}
    mandatory: set[str] = {"resourceType", "id", "meta"}
    fields = get_fhir_model_class(resource_type).model_fields
    for field in fields.values():
        extra = field.json_schema_extra
        if not isinstance(extra, dict) or field.alias is None:
            continue
        names = {field.alias, f"_{field.alias}"}
        if extra.get("summary_element_property"):
            summary |= names
        # Complex required elements are required fields; primitive ones are flagged in the extra.
        if field.is_required() or extra.get("element_required") or extra.get("one_of_many_required"):
            mandatory |= names
    return _Elements(frozenset(summary), frozenset(mandatory))


def _shape(stored: StoredResource, summary: Summary | None, elements: tuple[str, ...]) -> bytes | None:
    """The body as ``_summary``/``_elements`` want it (the stored bytes when they want it whole),
    tagged SUBSETTED when elements were left out."""
    if stored.body is None or ((summary is None or summary is Summary.FALSE) and not elements):
        return stored.body
    resource: Json = json.loads(stored.body)
    known = _elements_of(stored.resource_type)
    kept: set[str]
    if summary is Summary.TRUE:
        kept = set(known.summary)
    elif summary is Summary.TEXT:
        kept = {*known.mandatory, "text"}
    elif summary is Summary.DATA:
        kept = set(resource) - {"text"}
    else:
        prefix = f"{stored.resource_type}."
        wanted = {name.removeprefix(prefix) for name in elements}
        kept = {*known.mandatory, *wanted, *(f"_{name}" for name in wanted)}
    shaped = {key: value for key, value in resource.items() if key in kept}
    if len(shaped) == len(resource):
        return stored.body
    meta = dict(shaped.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    shaped["meta"] = meta
    return _dumps(shaped)


# --- Bundles -------------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _entry(base: str, stored: StoredResource, mode: str, body: bytes | None) -> bytes:
    return b'{"fullUrl":%s,"resource":%s,"search":{"mode":"%s"}}' % (
        _dumps(f"{base}/{stored.reference}"),
        body or b"null",
        mode.encode(),
    )


def _history_entry(base: str, stored: StoredResource) -> bytes:
    if stored.body is None:
        request = {"method": "DELETE", "url": stored.reference}
        status = "204 No Content"
    elif stored.version_id == 1:
        request = {"method": "POST", "url": stored.resource_type}
        status = "201 Created"
    else:
        request = {"method": "PUT", "url": stored.reference}
        status = "200 OK"
    response = {
        "status": status,
        "etag": _etag(stored),
        "lastModified": stored.last_updated.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    resource = b',"resource":%s' % stored.body if stored.body is not None else b""
    return b'{"fullUrl":%s%s,"request":%s,"response":%s}' % (
        _dumps(f"{base}/{stored.reference}"),
        resource,
        _dumps(request),
        _dumps(response),
    )


def _bundle(kind: str, total: int | None, links: list[Json], entries: list[bytes]) -> Response:
    """A Bundle assembled from already-serialised entries (the stored bodies are not parsed again)."""
    head: Json = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "meta": {"lastUpdated": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")},
        "type": kind,
    }
    if total is not None:
        head["total"] = total
    head["link"] = links
    body = _dumps(head)
    if entries:
        body = body[:-1] + b',"entry":[' + b",".join(entries) + b"]}"
    return Response(body, media_type=FHIR_JSON)
