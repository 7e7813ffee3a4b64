"""The CapabilityStatement served at ``/fhir/metadata``, built from the search parameters and the
interactions ``api`` implements, so that it cannot claim more than the server does."""

from __future__ import annotations

from datetime import datetime

from lucerna.fhir.search import COMMON, PARAMETERS, ParamType, SearchParam
from lucerna.fhir.store import Json
from lucerna.fhir.subscriptions import (
    FILTER_PARAMETERS,
    IMPLEMENTATION_GUIDE,
    STATUS_OPERATION,
    SUBSCRIPTION_PROFILE,
    TOPIC,
    TOPIC_CANONICAL,
    TOPIC_DESCRIPTION,
    TOPIC_RESOURCE,
)

FHIR_VERSION = "4.0.1"
READ_INTERACTIONS = ("read", "vread", "history-instance", "history-type", "search-type")
WRITE_INTERACTIONS = ("create", "update", "delete")
WRITABLE_TYPES = frozenset({"Subscription"})


def capability_statement(base_url: str, published: datetime, software_version: str) -> Json:
    """What the server at ``base_url`` (``.../fhir``) supports, as of ``published``."""
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": published.isoformat(timespec="seconds"),
        "publisher": "Lucerna",
        "kind": "instance",
        "software": {"name": "Lucerna FHIR results", "version": software_version},
        "implementation": {"description": "Lucerna AI results (FHIR R4)", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["json", "application/fhir+json"],
        "implementationGuide": [IMPLEMENTATION_GUIDE],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Search: comma-separated values are alternatives, repeated parameters must all "
                    "hold; _count (at most 1000), _offset, _sort, _total, _summary, _elements, "
                    "_include and _revinclude (no :iterate). Unknown parameters follow "
                    "Prefer: handling=strict|lenient (lenient by default)."
                ),
                "security": {
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": (
                        "Bearer tokens with SMART Backend Services scopes system/<Type>.read|write; "
                        "_include and _revinclude also need read on the types they can add. "
                        "/metadata needs no token."
                    ),
                },
                "resource": [_resource(resource_type) for resource_type in PARAMETERS],
            }
        ],
    }


def _resource(resource_type: str) -> Json:
    writable = resource_type in WRITABLE_TYPES
    interactions = (*READ_INTERACTIONS, *(WRITE_INTERACTIONS if writable else ()))
    described: Json = {
        "type": resource_type,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{resource_type}",
        "interaction": [{"code": code} for code in interactions],
        # Every version is kept; If-Match is honoured where the type can be updated at all.
        "versioning": "versioned-update" if writable else "versioned",
        "readHistory": True,
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalRead": "full-support",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchInclude": [
            f"{resource_type}:{param.name}"
            for param in PARAMETERS[resource_type]
            if param.type is ParamType.REFERENCE
        ],
        "searchRevInclude": [
            f"{source}:{param.name}"
            for source, params in PARAMETERS.items()
            for param in params
            if param.type is ParamType.REFERENCE and resource_type in param.targets
        ],
        "searchParam": [_search_param(param) for param in (*COMMON, *PARAMETERS[resource_type])],
    }
    if resource_type == "Subscription":
        described |= _subscriptions()
    # FHIR JSON has no empty arrays: a type nothing refers to has no searchRevInclude at all.
    return {key: value for key, value in described.items() if value != []}


def _subscriptions() -> Json:
    """What the Subscriptions Backport IG asks a server to say: its topics, the Subscription
    profile it serves and the ``$status`` operation."""
    filters = ", ".join(FILTER_PARAMETERS)
    return {
        "extension": [{"url": TOPIC_CANONICAL, "valueCanonical": TOPIC}],
        "supportedProfile": [SUBSCRIPTION_PROFILE],
        "documentation": (
            f"Topic-based Subscriptions (R5 Backport IG). Topic {TOPIC}: {TOPIC_DESCRIPTION}. Filters "
            f"(backport-filter-criteria): {TOPIC_RESOURCE}? with {filters}. Channel: rest-hook with "
            "application/fhir+json; payload content empty (default), id-only or full-resource. A new "
            "Subscription is requested until its handshake succeeds (then active) or fails (then error). "
            "No heartbeats, no backport-timeout."
        ),
        "operation": [{"name": "status", "definition": STATUS_OPERATION}],
    }


def _search_param(param: SearchParam) -> Json:
    described: Json = {"name": param.name, "type": param.type.value}
    if param.description:
        described["documentation"] = param.description
    return described
