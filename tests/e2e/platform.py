"""Run the platform as a user does (`lucerna up`) in a child process, for e2e tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on right now, and not handed out before by this process (the
    kernel may offer a port again once its probe socket is closed, before its user binds it)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def real_server_settings(
    mongodb_url: str, elasticsearch_url: str, rabbitmq_url: str, name: str = "lucerna"
) -> dict[str, str]:
    """The LUCERNA_* settings of the real-server configuration (FerretDB, Elasticsearch, RabbitMQ);
    ``name`` picks the database and index, so runs sharing servers stay apart."""
    return {
        "LUCERNA_METADATA_BACKEND": "mongodb",
        "LUCERNA_MONGODB_URL": mongodb_url,
        "LUCERNA_MONGODB_DATABASE": name.replace("-", "_"),
        "LUCERNA_SEARCH_BACKEND": "elasticsearch",
        "LUCERNA_ELASTICSEARCH_URL": elasticsearch_url,
        "LUCERNA_ELASTICSEARCH_INDEX": name.lower().replace("_", "-"),
        "LUCERNA_BUS_BACKEND": "rabbitmq",
        "LUCERNA_RABBITMQ_URL": rabbitmq_url,
    }


STOP_TIMEOUT_SECONDS = 45.0  # beyond the supervisor's 30 s grace for its workers


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), read from /proc."""
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found += [child, *_descendants(child)]
    return found


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


class LucernaProcess:
    """`lucerna up` with its own data folder and ports; extra settings as LUCERNA_* variables
    (``LUCERNA_WORKERS``: worker processes, by default as many as the machine's CPUs, at most 4);
    ``only``: the services to run (default: all installed); ``serve``: run this one service alone
    (`lucerna serve <name>`, as in Kubernetes) instead of `lucerna up`."""

    def __init__(
        self,
        data_dir: Path,
        settings: dict[str, str] | None = None,
        only: list[str] | None = None,
        serve: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.only = only
        self.serve = serve
        self.http_port = free_port()
        self.dimse_port = free_port()
        self.ae_title = "LUCERNA"
        self.env = {
            **os.environ,
            "LUCERNA_DATA_DIR": str(data_dir),
            "LUCERNA_HTTP_PORT": str(self.http_port),
            "LUCERNA_INGESTION_DIMSE_PORT": str(self.dimse_port),
            "LUCERNA_INGESTION_AE_TITLE": self.ae_title,
            # The local Triton that `lucerna up` starts beside it, on ports of its own.
            "LUCERNA_INFERENCE_LOCAL_GRPC_PORT": str(free_port()),
            "LUCERNA_INFERENCE_LOCAL_HTTP_PORT": str(free_port()),
            "LUCERNA_INFERENCE_LOCAL_METRICS_PORT": str(free_port()),
            # No local Fabric ledger of its own unless a test asks for one (it anchors elsewhere or not).
            "LUCERNA_AUDIT_LOCAL_LEDGER": "false",
            **(settings or {}),
        }
        self.log_path = data_dir / "lucerna.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The HTTP root."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def rabbitmq_url(self) -> str | None:
        """The broker (and virtual host) it uses, in the real-server configuration."""
        return self.env.get("LUCERNA_RABBITMQ_URL")

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root."""
        return f"{self.base_url}/dicom-web"

    def start(self, timeout: float = 60.0) -> None:
        """Start and wait until /healthz answers 200."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        command = [sys.executable, "-m", "lucerna.core.cli"]
        command += ["serve", self.serve] if self.serve else ["up"]
        if self.only:
            command += ["--only", ",".join(self.only)]
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lucerna exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"lucerna not healthy after {timeout}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, in the middle of whatever it does."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), then kill it and whatever it started (workers, companions) if
        it hangs longer than its own grace period: nothing of it may live on into the next test."""
        if self.process is None or self.process.poll() is not None:
            return
        descendants = _descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited, else None."""
        return None if self.process is None else self.process.poll()

    def worker_pids(self) -> list[int]:
        """The worker processes of the supervisor (none when it runs with one worker)."""
        if self.process is None:
            return []
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        # Companion processes (the local Triton) run in sessions of their own; workers do not.
        return [int(pid) for pid in children.split() if _session_of(int(pid)) != int(pid)]

    def log_entries(self) -> list[dict[str, Any]]:
        """The JSON log lines so far."""
        entries = []
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def wait_for_log(
        self, matches: Callable[[dict[str, Any]], bool], count: int = 1, timeout: float = 30.0
    ) -> None:
        """Wait until ``count`` log entries match."""
        deadline = time.monotonic() + timeout
        while sum(1 for entry in self.log_entries() if matches(entry)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"expected log entries not seen after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's log (and of its companions' logs), for error messages."""
        tails = []
        for path in [self.log_path, *sorted(self.data_dir.glob("*-companion.log"))]:
            if path.exists():
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                tails.append(f"--- {path.name}\n{tail}")
        return "\n".join(tails)
