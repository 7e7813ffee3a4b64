"""The worker supervisor (docs/adr/0005), each case in a child Python that plays `lucerna up`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lucerna.core.workers import claim_port, reuse_port_socket

# A supervisor of two workers; each writes "<index> started", and "<index> stopped" on SIGTERM.
# A worker listed in DIES exits at once with status 7.
SUPERVISOR = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from lucerna.core.workers import supervise

    folder, dies = Path(sys.argv[1]), {int(i) for i in sys.argv[2:]}

    def run(index: int) -> None:
        def stop(*_):
            (folder / f"{index}.stopped").touch()
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)  # before "started": a SIGTERM after it finds the handler
        (folder / f"{index}.started").write_text(str(os.getpid()))
        if index in dies:
            sys.exit(7)
        while True:
            time.sleep(0.05)

    sys.exit(supervise(2, run))
    """
)


def start(folder: Path, *dies: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(folder), *map(str, dies)])


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_sigterm_stops_every_worker_gracefully_and_exits_0(tmp_path: Path) -> None:
    supervisor = start(tmp_path)
    wait_for(lambda: len(list(tmp_path.glob("*.started"))) == 2)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(10) == 0
    assert sorted(p.name for p in tmp_path.glob("*.stopped")) == ["0.stopped", "1.stopped"]


def test_a_worker_dying_stops_the_others_and_fails_the_supervisor(tmp_path: Path) -> None:
    supervisor = start(tmp_path, 1)
    assert supervisor.wait(10) == 7
    assert (tmp_path / "0.stopped").exists()


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    supervisor = start(tmp_path)
    wait_for(lambda: len(list(tmp_path.glob("*.started"))) == 2)
    supervisor.kill()
    supervisor.wait(10)
    wait_for(lambda: len(list(tmp_path.glob("*.stopped"))) == 2)


def test_workers_share_a_port_that_a_plain_bind_finds_taken() -> None:
    first = reuse_port_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = reuse_port_socket("127.0.0.1", port)
    try:
        first.listen()
        second.listen()
        with pytest.raises(OSError):
            claim_port("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        first.close()
        second.close()
    assert claim_port("127.0.0.1", port) == port
    assert claim_port("127.0.0.1", 0) > 0


def test_a_bound_socket_gets_no_connections_before_it_listens() -> None:
    # What keeps a worker that is still starting from being sent requests.
    listening = reuse_port_socket("127.0.0.1", 0)
    port = listening.getsockname()[1]
    starting = reuse_port_socket("127.0.0.1", port)
    try:
        listening.listen()
        listening.settimeout(5)
        for _ in range(20):  # a connection sent to the bound socket would be refused
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            accepted, _ = listening.accept()
            accepted.close()
    finally:
        listening.close()
        starting.close()
