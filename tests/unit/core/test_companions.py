"""Companion processes: started once by the runner beside its workers, stopped when it stops."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from starlette.routing import BaseRoute

from lucerna.core.cli import _companions
from lucerna.core.service import HasCompanion, Resources
from lucerna.core.settings import CoreSettings


class _WithCompanion:
    name = "with-companion"

    def __init__(self, pid_file: Path) -> None:
        self._pid_file = pid_file

    def routes(self, resources: Resources) -> Sequence[BaseRoute]:
        return ()

    async def start(self, resources: Resources) -> None:
        return None

    async def stop(self) -> None:
        return None

    def companion_command(self, settings: CoreSettings) -> list[str] | None:
        write_pid = f"open({str(self._pid_file)!r}, 'w').write(str(os.getpid()))"
        script = f"import os, time; {write_pid}; time.sleep(60)"
        return [sys.executable, "-c", script]


class _Plain(_WithCompanion):
    name = "plain"

    def companion_command(self, settings: CoreSettings) -> list[str] | None:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    return status != "Z"


def test_a_companion_runs_while_the_runner_does_and_stops_with_it(tmp_path: Path) -> None:
    pid_file = tmp_path / "companion.pid"
    service = _WithCompanion(pid_file)
    assert isinstance(service, HasCompanion)
    with _companions(CoreSettings(data_dir=tmp_path), [service, _Plain(tmp_path / "never")]):
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the companion did not start"
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        assert _alive(pid)
    assert not _alive(pid)
    assert not (tmp_path / "never").exists()
    assert (tmp_path / "with-companion-companion.log").exists()  # its output, apart from the runner's


class _SharingAToken(_WithCompanion):
    """As the local Triton and the local ledger do: the token is set as the companion is planned."""

    name = "sharing"

    def companion_command(self, settings: CoreSettings) -> list[str] | None:
        os.environ["LUCERNA_TEST_COMPANION_TOKEN"] = "shared-with-the-workers"
        get = "os.environ.get"
        seen = f"{get}('LUCERNA_TEST_COMPANION_TOKEN', '') + '|' + {get}('PROMETHEUS_MULTIPROC_DIR', '')"
        script = f"import os, time; open({str(self._pid_file)!r}, 'w').write({seen}); time.sleep(60)"
        return [sys.executable, "-c", script]


def test_a_companion_gets_what_its_service_set_but_not_the_workers_metrics_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = tmp_path / "seen"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.delenv("LUCERNA_TEST_COMPANION_TOKEN", raising=False)
    with _companions(CoreSettings(data_dir=tmp_path), [_SharingAToken(seen)]):
        deadline = time.monotonic() + 10
        while not seen.exists() or not seen.read_text():
            assert time.monotonic() < deadline, "the companion did not start"
            time.sleep(0.05)
    os.environ.pop("LUCERNA_TEST_COMPANION_TOKEN", None)
    assert seen.read_text() == "shared-with-the-workers|"
