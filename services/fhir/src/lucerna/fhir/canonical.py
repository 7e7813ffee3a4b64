"""Canonical JSON of a FHIR resource and its SHA-256, the hash the audit log keeps.

FHIR's canonical JSON (the signature rules of the FHIR JSON page): no insignificant whitespace,
object properties in sorted order, UTF-8, and without ``meta.versionId`` and ``meta.lastUpdated``,
which the server changes on every write of the same content. Everything else is kept, ``id``
included: the hash identifies one resource, not only its content. Property names are ASCII, so
Python's code-point order equals RFC 8785's UTF-16 order; JSON read back from a server is
parsed by the R4B model first, so that a server's equivalent spelling (``+00:00`` for ``Z``,
``1.50`` for ``1.5``) hashes like the resource that was published; numbers are written in their
shortest round-trip form.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource

VOLATILE_META = ("versionId", "lastUpdated")


def canonical_json(resource: Resource | Mapping[str, Any]) -> bytes:
    """The resource's canonical JSON, UTF-8 encoded."""
    parsed = (
        resource
        if isinstance(resource, Resource)
        else get_fhir_model_class(str(resource.get("resourceType"))).model_validate(resource)
    )
    data: dict[str, Any] = json.loads(parsed.model_dump_json())
    meta = data.get("meta")
    if isinstance(meta, Mapping):
        kept = {key: value for key, value in meta.items() if key not in VOLATILE_META}
        if kept:
            data["meta"] = kept
        else:
            del data["meta"]
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def canonical_sha256(resource: Resource | Mapping[str, Any]) -> str:
    """Hex SHA-256 of the resource's canonical JSON."""
    return hashlib.sha256(canonical_json(resource)).hexdigest()
