"""``lucerna verify`` and ``lucerna export-proof``: the auditor's commands (see ``verify``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from lucerna.audit.keys import parse_public_keys
from lucerna.audit.verify import VerificationError, export_bundle, read_back_anchor, verify_bundle

DEFAULT_BASE_URL = "http://127.0.0.1:8080"


def export_proof(report_id: str, out: Path, base_url: str = DEFAULT_BASE_URL) -> int:
    """Write the proof bundle of a DiagnosticReport to ``out``."""
    try:
        with _client() as client:
            bundle = export_bundle(base_url.rstrip("/"), report_id, client)
    except (VerificationError, httpx.HTTPError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 1
    out.write_text(json.dumps(bundle, indent=1, sort_keys=True))
    print(f"wrote the proof bundle of DiagnosticReport/{report_id} to {out}")
    return 0


def verify(
    report_id: str | None, *, offline: Path | None, keys: Path | None, base_url: str = DEFAULT_BASE_URL
) -> int:
    """Verify a report online (from the platform) or a bundle offline (with pinned keys only)."""
    try:
        on_ledger = None
        if offline is not None:
            if keys is None:
                print("verify --offline needs --keys (the pinned public keys)", file=sys.stderr)
                return 2
            bundle = json.loads(offline.read_text())
        else:
            assert report_id is not None
            with _client() as client:
                bundle = export_bundle(base_url.rstrip("/"), report_id, client)
                on_ledger = read_back_anchor(base_url.rstrip("/"), bundle, client)
        published = json.loads(keys.read_text()) if keys is not None else bundle["published_keys"]
        if keys is None:
            print(
                "warning: the keys come from the platform itself; pin them with --keys to check independently"
            )
        report = verify_bundle(
            bundle, parse_public_keys(published["keys"]), origin=published.get("origin"), on_ledger=on_ledger
        )
    except (VerificationError, httpx.HTTPError, ValueError, KeyError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    for check in report.checks:
        print(f"ok  {check}")
    if not report.anchored:
        print("--  Fabric anchor: none (this log's checkpoints are not anchored on a ledger)")
    elif offline is not None:
        print("--  Fabric anchor: not read back from the ledger (offline); run online to read it back")
    print(f"verified: {bundle['report']}")
    return 0


def _client() -> httpx.Client:
    token = os.environ.get("LUCERNA_TOKEN")
    headers: dict[str, Any] = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(headers=headers, timeout=30)
