"""The auditors' HTTP API (``system/AuditEvent.read``); hashes and signatures in base64.

- ``GET /api/audit/entries/{seq}``: one entry: its key, bytes, leaf hash and the audit record it holds;
  ``GET /api/audit/entries?key=``: the entry of an event's message id (e.g. ``audit-job-finished:<job>``).
- ``GET /api/audit/proofs/inclusion/{seq}?size=``: the entry's inclusion proof in the tree of ``size``
  entries (default: the latest checkpoint's), with that tree's root.
- ``GET /api/audit/proofs/consistency?from=&to=``: the consistency proof between two tree sizes.
- ``GET /api/audit/checkpoints/latest`` and ``/api/audit/checkpoints/{size}``: a signed checkpoint, as
  the C2SP signed note (``text/plain``); ``GET /api/audit/checkpoints?limit=&before=``: their history,
  newest first (JSON).
- ``GET /api/audit/anchors``: whether checkpoints are anchored on the ledger, the latest anchor, and
  why anchoring stopped if it did; ``?covering=N``: the smallest anchored checkpoint of at least N
  entries. ``GET /api/audit/anchors/{size}``: where the checkpoint of that size landed (transaction id,
  block number, the note as anchored); ``/api/audit/anchors/{size}/ledger``: the same read back from
  the ledger now, through the anchor service.
- ``GET /.well-known/lucerna-audit-keys``: the public keys checkpoints are signed with (no token).

Errors are ``{"error": "..."}`` with 400, 401/403, 404 or 503.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from lucerna.audit.anchoring import Anchor, Anchorer, AnchorError
from lucerna.audit.keys import Keyring
from lucerna.audit.log import AuditLog, LogRangeError, StoredEntry
from lucerna.core.service import Resources
from lucerna.events.v1 import events_pb2

RESOURCE = "AuditEvent"
NOTE_MEDIA_TYPE = "text/plain; charset=utf-8"
MAX_LIMIT = 1000

Handler = Callable[[Request, AuditLog], Awaitable[Response]]


def audit_routes(
    resources: Resources,
    audit_log: Callable[[], AuditLog | None],
    keyring: Callable[[], Keyring | None],
    anchorer: Callable[[], Anchorer | None] = lambda: None,
) -> Sequence[BaseRoute]:
    """The routes; ``audit_log``, ``keyring`` and ``anchorer`` give the running ones (None until
    started; the anchorer stays None when anchoring is not configured)."""

    def guarded(path: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            resources.auth.require(request, RESOURCE, "read")
            running = audit_log()
            if running is None:
                raise HTTPException(503, "the audit service is starting; try again shortly")
            try:
                return await handler(request, running)
            except LogRangeError as error:
                raise HTTPException(404, str(error)) from error

        return Route(path, endpoint, methods=["GET"])

    async def anchors(request: Request, _: AuditLog) -> Response:
        running = anchorer()
        covering = request.query_params.get("covering")
        if covering is not None:
            size = _number(covering, "covering")
            found = None if running is None else await running.store.covering(size)
            if found is None:
                raise HTTPException(404, f"no anchored checkpoint covers {size} entries yet")
            return JSONResponse(found.to_json())
        latest = None if running is None else await running.store.latest()
        return JSONResponse(
            {
                "enabled": running is not None,
                "latest": None if latest is None else latest.to_json(),
                "halted": None if running is None else running.halted,
            }
        )

    async def anchor(request: Request, _: AuditLog) -> Response:
        size = _number(request.path_params["size"], "size")
        running = anchorer()
        found = None if running is None else await running.store.at(size)
        if found is None:
            raise HTTPException(404, f"no checkpoint of size {size} has been anchored")
        return JSONResponse(found.to_json())

    async def on_ledger(request: Request, _: AuditLog) -> Response:
        size = _number(request.path_params["size"], "size")
        running = anchorer()
        if running is None:
            raise HTTPException(404, "checkpoints are not anchored on a ledger here")
        try:
            found: Anchor | None = await running.ledger.by_size(running.origin, size)
        except AnchorError as error:
            raise HTTPException(503, f"the ledger cannot be read now: {error}") from error
        if found is None:
            raise HTTPException(404, f"the ledger holds no checkpoint of size {size} for {running.origin}")
        return JSONResponse(found.to_json())

    async def public_keys(_: Request) -> Response:
        ring = keyring()
        if ring is None:
            raise HTTPException(503, "the audit service is starting; try again shortly")
        await asyncio.to_thread(ring.refresh)  # a rotated key is listed within REFRESH_SECONDS
        return JSONResponse({"origin": ring.origin, "keys": ring.public_keys()})

    return [
        guarded("/api/audit/entries", _entry_by_key),
        guarded("/api/audit/entries/{seq}", _entry),
        guarded("/api/audit/proofs/inclusion/{seq}", _inclusion),
        guarded("/api/audit/proofs/consistency", _consistency),
        guarded("/api/audit/checkpoints/latest", _latest),
        guarded("/api/audit/checkpoints/{size}", _checkpoint),
        guarded("/api/audit/checkpoints", _checkpoints),
        guarded("/api/audit/anchors", anchors),
        guarded("/api/audit/anchors/{size}", anchor),
        guarded("/api/audit/anchors/{size}/ledger", on_ledger),
        Route("/.well-known/lucerna-audit-keys", public_keys, methods=["GET"]),
    ]


async def _entry(request: Request, audit_log: AuditLog) -> Response:
    seq = _number(request.path_params["seq"], "seq")
    return _entry_response(await audit_log.entry(seq), f"the log has no entry {seq}")


async def _entry_by_key(request: Request, audit_log: AuditLog) -> Response:
    key = request.query_params.get("key")
    if not key:
        raise HTTPException(400, "give key= (an event's message id) or ask for /api/audit/entries/<seq>")
    return _entry_response(await audit_log.entry_by_key(key), f"the log has no entry with key {key!r}")


def _entry_response(entry: StoredEntry | None, missing: str) -> Response:
    if entry is None:
        raise HTTPException(404, missing)
    record = events_pb2.AuditRecord()
    record.ParseFromString(entry.data)
    return JSONResponse(
        {
            "seq": entry.seq,
            "key": entry.key,
            "appended_at": entry.appended_at.isoformat(),
            "leaf_hash": _b64(entry.leaf_hash),
            "data": _b64(entry.data),
            "record": MessageToDict(record, preserving_proto_field_name=True),
        }
    )


async def _inclusion(request: Request, audit_log: AuditLog) -> Response:
    seq = _number(request.path_params["seq"], "seq")
    size = await _size_or_latest(request, audit_log, "size")
    entry = await audit_log.entry(seq)
    if entry is None:
        raise HTTPException(404, f"the log has no entry {seq}")
    proof = await audit_log.inclusion_proof(seq, size)
    return JSONResponse(
        {
            "seq": seq,
            "tree_size": size,
            "leaf_hash": _b64(entry.leaf_hash),
            "root_hash": _b64(await audit_log.root(size)),
            "proof": [_b64(node) for node in proof],
        }
    )


async def _consistency(request: Request, audit_log: AuditLog) -> Response:
    old = _number(request.query_params.get("from", ""), "from")
    new = await _size_or_latest(request, audit_log, "to")
    proof = await audit_log.consistency_proof(old, new)
    return JSONResponse({"from": old, "to": new, "proof": [_b64(node) for node in proof]})


async def _latest(_: Request, audit_log: AuditLog) -> Response:
    latest = await audit_log.latest_checkpoint()
    if latest is None:
        raise HTTPException(404, "no checkpoint has been signed yet")
    return PlainTextResponse(latest.note(), media_type=NOTE_MEDIA_TYPE)


async def _checkpoint(request: Request, audit_log: AuditLog) -> Response:
    size = _number(request.path_params["size"], "size")
    signed = await audit_log.checkpoint(size)
    if signed is None:
        raise HTTPException(404, f"no checkpoint was signed at size {size}")
    return PlainTextResponse(signed.note(), media_type=NOTE_MEDIA_TYPE)


async def _checkpoints(request: Request, audit_log: AuditLog) -> Response:
    limit = _number(request.query_params.get("limit", "100"), "limit")
    if not 1 <= limit <= MAX_LIMIT:
        raise HTTPException(400, f"limit must be between 1 and {MAX_LIMIT}")
    before = request.query_params.get("before")
    found = await audit_log.checkpoints(limit, None if before is None else _number(before, "before"))
    items: list[dict[str, Any]] = [
        {"size": signed.checkpoint.size, "root_hash": _b64(signed.checkpoint.root), "note": signed.note()}
        for signed in found
    ]
    return JSONResponse({"checkpoints": items})


async def _size_or_latest(request: Request, audit_log: AuditLog, name: str) -> int:
    given = request.query_params.get(name)
    if given is not None:
        return _number(given, name)
    latest = await audit_log.latest_checkpoint()
    if latest is None:
        raise HTTPException(404, f"no checkpoint has been signed yet; give {name}=")
    return latest.checkpoint.size


def _number(text: str, name: str) -> int:
    if not text.isdigit():
        raise HTTPException(400, f"{name} must be a whole number, not {text!r}")
    return int(text)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
