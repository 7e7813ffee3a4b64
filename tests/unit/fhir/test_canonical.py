"""Canonical JSON and its SHA-256: sorted, compact, UTF-8, without the server's volatile meta."""

from __future__ import annotations

import hashlib
import json

import pytest
from fhir.resources.R4B.observation import Observation

from lucerna.fhir.canonical import canonical_json, canonical_sha256

pytestmark = pytest.mark.unit

OBSERVATION = {
    "resourceType": "Observation",
    "id": "c4d7aabf534fd4213b8619b8cf7c5091",
    "meta": {
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "AIAST"}]
    },
    "status": "preliminary",
    "code": {"text": "Nodule pulmonaire — lobe inférieur"},
    "effectiveDateTime": "2026-11-21T09:30:05Z",
    "valueQuantity": {"value": 21.6, "unit": "mm"},
}


def test_sorted_compact_utf8() -> None:
    text = canonical_json(Observation.model_validate(OBSERVATION))
    assert (
        text
        == (
            '{"code":{"text":"Nodule pulmonaire — lobe inférieur"},'
            '"effectiveDateTime":"2026-11-21T09:30:05Z","id":"c4d7aabf534fd4213b8619b8cf7c5091",'
            '"meta":{"security":[{"code":"AIAST",'
            '"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue"}]},'
            '"resourceType":"Observation","status":"preliminary",'
            '"valueQuantity":{"unit":"mm","value":21.6}}'
        ).encode()
    )
    assert canonical_sha256(Observation.model_validate(OBSERVATION)) == hashlib.sha256(text).hexdigest()


def test_model_and_json_hash_alike() -> None:
    """JSON read back from a server hashes like the model, whatever its key order and spelling."""
    from_server = json.loads(json.dumps(OBSERVATION, indent=2))
    from_server["effectiveDateTime"] = "2026-11-21T09:30:05+00:00"
    from_server["valueQuantity"] = {"unit": "mm", "value": 21.60}
    assert canonical_sha256(from_server) == canonical_sha256(Observation.model_validate(OBSERVATION))


def test_volatile_meta_is_ignored() -> None:
    stored = json.loads(json.dumps(OBSERVATION))
    stored["meta"] |= {"versionId": "7", "lastUpdated": "2026-11-21T10:00:00.123Z"}
    assert canonical_sha256(stored) == canonical_sha256(OBSERVATION)


def test_meta_left_empty_is_dropped() -> None:
    bare = {key: value for key, value in OBSERVATION.items() if key != "meta"}
    stored = bare | {"meta": {"versionId": "2", "lastUpdated": "2026-11-21T10:00:00Z"}}
    assert b'"meta"' not in canonical_json(stored)
    assert canonical_sha256(stored) == canonical_sha256(bare)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("valueQuantity", "value"), 21.7),
        (("status",), "final"),
        (("id",), "another"),
        (("meta", "security"), []),
    ],
)
def test_any_other_change_changes_the_hash(path: tuple[str, ...], value: object) -> None:
    changed = json.loads(json.dumps(OBSERVATION))
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert canonical_sha256(changed) != canonical_sha256(OBSERVATION)


def test_unknown_resource_type_is_refused() -> None:
    with pytest.raises(ValueError, match="Nope"):
        canonical_sha256({"resourceType": "Nope"})
