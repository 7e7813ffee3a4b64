"""Companion processes: started once by the runner beside its workers, stopped when it stops."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
