"""``lucerna verify`` and ``lucerna export-proof``: the auditor's commands (see ``verify``); and
``lucerna audit-keys list|rotate``: the operator's, on the audit service's key directory."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from lucerna.audit import phi
from lucerna.audit.keys import REFRESH_SECONDS, Keyring, KeyringError, parse_public_keys
from lucerna.audit.settings import AuditSettings
from lucerna.audit.verify import VerificationError, export_bundle, read_back_anchor, verify_bundle
from lucerna.core.settings import CoreSettings

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


def default_key_dir() -> Path:
    """The service's key directory: ``LUCERNA_AUDIT_KEY_DIR``, else ``<LUCERNA_DATA_DIR>/audit-keys``."""
    return AuditSettings().key_directory(CoreSettings().data_dir)


_COLUMNS = {
    "kind": "KIND",
    "name": "NAME",
    "key_id": "KEY ID",
    "algorithm": "ALGORITHM",
    "created": "CREATED",
    "active": "ACTIVE",
}


def list_keys(key_dir: Path | None, *, as_json: bool = False) -> int:
    """Print the signing keys and the PHI at-rest keys (public facts only), newest first."""
    directory = key_dir or default_key_dir()
    try:
        rows = _signing_rows(directory) + _phi_rows(directory)
    except (KeyringError, phi.PhiKeyError, OSError) as error:
        print(f"audit-keys: {error}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"audit keys in {directory}")
    table = [_COLUMNS, *({**row, "active": "yes" if row["active"] else ""} for row in rows)]
    widths = {column: max(len(line[column]) for line in table) for column in _COLUMNS}
    for line in table:
        print("  ".join(line[column].ljust(widths[column]) for column in _COLUMNS).rstrip())
    return 0


def rotate_keys(key_dir: Path | None, *, phi_key: bool = False) -> int:
    """Make a new signing key (or, with ``phi_key``, a new PHI at-rest key) the active one."""
    directory = key_dir or default_key_dir()
    try:
        _existing(directory)
        if phi_key:
            key = phi.rotate(directory)
            print(
                f"rotated the PHI at-rest key: {key.name} (key ID {key.key_id.hex()}) seals new records;"
                " older keys stay to open older records (keep them, and back up the new one)"
            )
        else:
            held = Keyring(directory, create=False)
            if not held.signing_keys():
                print(f"audit-keys: no signing key in {directory}: nothing to rotate", file=sys.stderr)
                return 1
            ring = Keyring(directory, held.active.name.rsplit("/key-", 1)[0], create=False)
            new = ring.rotate()
            print(
                f"rotated the audit signing key: {new.name} (key ID {new.key_id.hex()}) signs new"
                " checkpoints; older keys stay published and keep verifying"
                " (keep them, and back up the new one)"
            )
    except (KeyringError, phi.PhiKeyError, OSError) as error:
        print(f"audit-keys: {error}", file=sys.stderr)
        return 1
    print(f"a running audit service takes it up within {REFRESH_SECONDS:g} s, without a restart")
    return 0


def _existing(directory: Path) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no audit key directory at {directory} (the audit service makes it on first start;"
            " set LUCERNA_AUDIT_KEY_DIR or LUCERNA_DATA_DIR as the service has them, or pass --key-dir)"
        )


def _signing_rows(directory: Path) -> list[dict[str, Any]]:
    _existing(directory)
    ring = Keyring(directory, create=False)
    return [
        {
            "kind": "signing",
            "name": key["name"],
            "key_id": key["key_id"],
            "algorithm": key["algorithm"],
            "created": key["created"],
            "active": key["active"],
        }
        for key in (ring.public_keys() if ring.signing_keys() else [])
    ]


def _phi_rows(directory: Path) -> list[dict[str, Any]]:
    ring = phi.load_ring(directory)
    newest = max(ring, default=None)
    rows: list[dict[str, Any]] = [
        {
            "kind": "phi",
            "name": key.name,
            "key_id": key.key_id.hex(),
            "algorithm": phi.ALGORITHM,
            "created": key.created.isoformat(),
            "active": number == newest,
        }
        for number, key in sorted(ring.items(), reverse=True)
    ]
    index = directory / phi.INDEX_KEY_FILE
    if index.exists():  # one key for good: the blind index must find records of every PHI key
        created = datetime.fromtimestamp(index.stat().st_mtime, UTC).isoformat()
        rows.append(
            {
                "kind": "phi-index",
                "name": phi.INDEX_KEY_FILE,
                "key_id": "-",
                "algorithm": "HMAC-SHA256",
                "created": created,
                "active": True,
            }
        )
    return rows


def _client() -> httpx.Client:
    token = os.environ.get("LUCERNA_TOKEN")
    headers: dict[str, Any] = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(headers=headers, timeout=30)
