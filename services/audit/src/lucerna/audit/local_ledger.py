"""The local Fabric ledger as the audit service's companion process: whether ``lucerna up`` starts
it, and how (``infra/local/ledger.py``, a Fabric network and the anchor service kept in
``<data dir>/ledger``, beside the log it anchors)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lucerna.audit.settings import AuditSettings
from lucerna.core.settings import CoreSettings

log = logging.getLogger(__name__)

# Relative to the working directory, as the model repository's default: `lucerna up` runs from the
# repository, where infra/local holds the Fabric launchers.
SCRIPT = Path("infra/local/ledger.py")
ANCHOR_PORT_OFFSET = 10  # the anchor service listens after the Fabric network's ten ports
_CHECK_SECONDS = 30.0


class LocalLedgerError(RuntimeError):
    """The local ledger was asked for (``LUCERNA_AUDIT_LOCAL_LEDGER=true``) but cannot run here."""


@dataclass(frozen=True)
class LocalLedger:
    """The companion's command line and the anchor service's address it will serve."""

    command: list[str]
    target: str


def fabric_missing(script: Path) -> str | None:
    """Why Fabric cannot run on this host (the launcher's own check), or None when it can."""
    try:
        check = subprocess.run(  # noqa: S603 -- our own launcher, run by this interpreter
            [sys.executable, str(script), "--check"],
            capture_output=True,
            text=True,
            timeout=_CHECK_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{script} --check did not answer within {_CHECK_SECONDS:.0f} s"
    if check.returncode == 0:
        return None
    return (check.stdout + check.stderr).strip() or f"{script} --check failed (exit {check.returncode})"


def plan(
    settings: AuditSettings,
    core: CoreSettings,
    *,
    script: Path = SCRIPT,
    missing: Callable[[Path], str | None] = fabric_missing,
) -> LocalLedger | None:
    """The local ledger to start, or None (see ``AuditSettings.local_ledger``).

    Asked for explicitly, every obstacle is an error that names it; by default (unset) it runs only
    where it can: local mode, no anchor service configured, the launcher and Fabric present.
    """
    asked = settings.local_ledger
    if asked is False:
        return None
    if settings.anchor_target:
        if asked:
            raise LocalLedgerError(
                "LUCERNA_AUDIT_LOCAL_LEDGER=true and LUCERNA_AUDIT_ANCHOR_TARGET="
                f"{settings.anchor_target} both name where to anchor: unset one of them"
            )
        return None
    if asked is None and core.mode != "local":
        return None
    script = script.resolve()
    if not script.is_file():
        reason = (
            f"the local ledger's launcher {script} is missing: run lucerna from the repository "
            "(infra/local), or set LUCERNA_AUDIT_LOCAL_LEDGER=false"
        )
        if asked:
            raise LocalLedgerError(reason)
        log.info("no local Fabric ledger: %s; checkpoints are not anchored", reason)
        return None
    absent = missing(script)
    if absent is not None:
        if asked:
            raise LocalLedgerError(f"LUCERNA_AUDIT_LOCAL_LEDGER=true, but {absent}")
        log.info("no local Fabric ledger (%s); checkpoints are not anchored", absent)
        return None
    port = settings.local_ledger_port
    folder = (core.data_dir / "ledger").resolve()
    return LocalLedger(
        [sys.executable, str(script), "--dir", str(folder), "--port", str(port)],
        f"127.0.0.1:{port + ANCHOR_PORT_OFFSET}",
    )
