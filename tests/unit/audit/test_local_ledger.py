"""When `lucerna up` starts the local Fabric ledger beside the audit service, and how anchoring is
pointed at it; the launcher's own check stands in for Fabric (a script that answers like it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from lucerna.audit.local_ledger import SCRIPT, LocalLedgerError, plan
from lucerna.audit.service import LEDGER_TOKEN_VARIABLE, AuditService
from lucerna.audit.settings import AuditSettings
from lucerna.core.settings import CoreSettings

pytestmark = pytest.mark.unit

INSTALLED = "import sys; sys.exit(0)"
NOT_INSTALLED = (
    "import sys; print('Fabric is missing at /nowhere: run infra/local/install.sh fabric'); sys.exit(3)"
)


@pytest.fixture
def repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory shaped like the repository, with a launcher whose check says "installed"."""
    launcher = tmp_path / SCRIPT
    launcher.parent.mkdir(parents=True)
    launcher.write_text(INSTALLED)
    monkeypatch.chdir(tmp_path)
    for name in ("LUCERNA_AUDIT_ANCHOR_TARGET", "LUCERNA_AUDIT_ANCHOR_TOKEN", LEDGER_TOKEN_VARIABLE):
        # Set first, so that what companion_command writes into os.environ is undone after the test.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return tmp_path


def core(mode: str = "local", **extra: object) -> CoreSettings:
    settings = {"mode": mode, "data_dir": Path("var"), **extra}
    if mode == "production":
        settings |= {"jwt_secret": SecretStr("production-secret-0123456789abcdef")}
    return CoreSettings.model_validate(settings)


def test_by_default_local_mode_runs_it_beside_the_log_on_its_own_ports(repository: Path) -> None:
    ledger = plan(AuditSettings(), core())
    assert ledger is not None
    assert ledger.command == [
        sys.executable,
        str(repository / SCRIPT),
        "--dir",
        str(repository / "var" / "ledger"),
        "--port",
        "19050",
    ]
    assert ledger.target == "127.0.0.1:19060"
    moved = plan(AuditSettings(local_ledger_port=21000), core())
    assert moved is not None and moved.command[-1] == "21000" and moved.target == "127.0.0.1:21010"


def test_by_default_it_stays_off_where_it_cannot_or_should_not_run(repository: Path) -> None:
    assert plan(AuditSettings(), core("production")) is None
    assert plan(AuditSettings(anchor_target="anchor.internal:8095"), core()) is None
    assert plan(AuditSettings(local_ledger=False), core()) is None
    (repository / SCRIPT).write_text(NOT_INSTALLED)
    assert plan(AuditSettings(), core()) is None
    (repository / SCRIPT).unlink()
    assert plan(AuditSettings(), core()) is None


def test_asked_for_every_obstacle_is_named(repository: Path) -> None:
    on = AuditSettings(local_ledger=True)
    assert plan(on, core("production")) is not None  # an explicit choice holds in production mode
    with pytest.raises(LocalLedgerError, match=r"LUCERNA_AUDIT_ANCHOR_TARGET=anchor\.internal:8095 both"):
        plan(AuditSettings(local_ledger=True, anchor_target="anchor.internal:8095"), core())
    (repository / SCRIPT).write_text(NOT_INSTALLED)
    with pytest.raises(LocalLedgerError, match=r"Fabric is missing at /nowhere: run infra/local/install\.sh"):
        plan(on, core())
    (repository / SCRIPT).unlink()
    with pytest.raises(LocalLedgerError, match=r"launcher .*infra/local/ledger.py is missing: run lucerna"):
        plan(on, core())


def test_the_companion_points_anchoring_at_it_for_this_process_and_the_workers(repository: Path) -> None:
    service = AuditService(AuditSettings(local_ledger=True))
    command = service.companion_command(core())
    assert command is not None and command[1] == str(repository / SCRIPT)
    token = os.environ["LUCERNA_AUDIT_ANCHOR_TOKEN"]
    assert len(token) >= 32
    assert os.environ[LEDGER_TOKEN_VARIABLE] == token  # what the launcher hands the anchor service
    assert os.environ["LUCERNA_AUDIT_ANCHOR_TARGET"] == "127.0.0.1:19060"
    assert service.settings.anchor_target == "127.0.0.1:19060"  # this process's own service object
    assert (
        service.settings.anchor_token is not None
        and service.settings.anchor_token.get_secret_value() == token
    )
    assert AuditSettings().anchor_target == "127.0.0.1:19060"  # a worker reading its environment


def test_a_given_token_is_kept_and_no_ledger_means_nothing_changes(repository: Path) -> None:
    service = AuditService(AuditSettings(local_ledger=True, anchor_token=SecretStr("operator-chosen-token")))
    assert service.companion_command(core()) is not None
    assert os.environ[LEDGER_TOKEN_VARIABLE] == "operator-chosen-token"
    os.environ.pop("LUCERNA_AUDIT_ANCHOR_TARGET")
    off = AuditService(AuditSettings(local_ledger=False))
    assert off.companion_command(core()) is None
    assert "LUCERNA_AUDIT_ANCHOR_TARGET" not in os.environ and off.settings.anchor_target is None
