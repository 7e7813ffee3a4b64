"""Real servers for the integration tests and for local work: RabbitMQ, Elasticsearch, FerretDB, Orthanc,
a FHIR peer (a hospital's own FHIR server, for publishing tests), a Hyperledger Fabric network and
the anchor service on it.

Each class runs one server as a child process in its own session, keeps its data, logs and pid file
under ``<base_dir>/<name>``, and listens on loopback ports away from the servers' defaults so that
a developer's own servers do not collide. ``start()`` returns once the server answers its protocol.
The binaries come from ``infra/local/install.sh``. Standard library only, so it runs before
``uv sync``::

    python infra/local/servers.py start|stop|status [rabbitmq elasticsearch ferretdb orthanc fhir-peer fabric]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import string
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """A server could not be started or stopped; the message carries its log tail."""


def read_versions(path: Path = HERE / "versions.env") -> dict[str, str]:
    """Parse the KEY=VALUE pins that install.sh also sources."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip()
    return versions


VERSIONS = read_versions()


def cache_dir() -> Path:
    """Where install.sh keeps slow builds and downloads (keep in step with install.sh)."""
    return Path(os.environ.get("LUCERNA_CACHE") or Path.home() / ".cache" / "lucerna")


def port_is_free(port: int) -> bool:
    """True when nothing listens on the loopback port and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers do: connections in TIME_WAIT after a stop must not count as "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _accepts(port: int) -> bool:
    """True when something accepts TCP connections on the loopback port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the server")
        data += chunk
    return data


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method="GET")  # noqa: S310 -- URL built here from loopback ports
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 -- same
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass
class _Running:
    """The process this Python process started, kept so its exit status can be reaped."""

    process: subprocess.Popen[bytes]
    log: IO[bytes]


class Server(ABC):
    """One server process with its data under ``base_dir / name``."""

    name: ClassVar[str]
    start_timeout: ClassVar[float] = 60.0
    stop_timeout: ClassVar[float] = 30.0

    def __init__(self, base_dir: Path, *, port_offset: int = 0) -> None:
        # port_offset shifts every port, so that several test sessions can share one machine.
        self.port_offset = port_offset
        self.dir = Path(base_dir).resolve() / self.name
        self.log_file = self.dir / "server.log"
        self.pid_file = self.dir / "server.pid"
        self.started_in: float | None = None
        self._running: _Running | None = None

    # -- what each server defines -------------------------------------------------------------

    @property
    @abstractmethod
    def url(self) -> str:
        """Where clients connect."""

    @property
    @abstractmethod
    def ports(self) -> tuple[int, ...]:
        """Every loopback port the server binds."""

    @abstractmethod
    def _prepare(self) -> None:
        """Write configuration and create data folders before a start."""

    @abstractmethod
    def _command(self) -> list[str]:
        """The command line of the server process."""

    @abstractmethod
    def _is_ready(self) -> bool:
        """True once the server answers its own protocol."""

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _run_as(self) -> str | None:
        """The user to run the server as, or None for the current one."""
        return None

    def _graceful_stop(self, pid: int) -> None:
        os.killpg(pid, signal.SIGTERM)

    def _after_stop(self) -> None:  # noqa: B027 -- an optional hook; most servers need nothing here
        """Clean up helpers the server left outside its process group."""

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Start the server and wait until it answers, or raise ServerError with its log tail."""
        if self.is_running():
            raise ServerError(f"{self.name} already runs (pid file {self.pid_file}); stop it first")
        busy = [port for port in self.ports if not port_is_free(port)]
        if busy:
            raise ServerError(f"{self.name}: loopback port(s) {busy} already in use by another process")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        began = time.monotonic()
        log = self.log_file.open("ab")
        user = self._run_as()
        try:
            process = subprocess.Popen(  # noqa: S603 -- fixed command lines built by this module
                self._command(),
                cwd=self.dir,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                group=pwd.getpwnam(user).pw_gid if user else None,
                extra_groups=[] if user else None,
            )
        except OSError as error:
            log.close()
            raise ServerError(f"{self.name}: cannot run {self._command()[0]}: {error}") from error
        self._running = _Running(process, log)
        self.pid_file.write_text(f"{process.pid}\n")
        deadline = began + (timeout if timeout is not None else self.start_timeout)
        while True:
            if process.poll() is not None:
                self._forget()
                raise ServerError(
                    f"{self.name} exited with status {process.returncode} while starting\n{self.log_tail()}"
                )
            if self._ready_now():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"{self.name} did not answer on {self.url} within {deadline - began:.0f}s\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)
        self.started_in = time.monotonic() - began

    def stop(self, timeout: float | None = None) -> None:
        """Stop the server gracefully, killing it after the timeout; a stopped server is left alone."""
        pid = self._pid()
        if pid is not None and self._group_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                self._graceful_stop(pid)
            deadline = time.monotonic() + (timeout if timeout is not None else self.stop_timeout)
            while self._group_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._group_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while self._group_alive(pid):
                    if time.monotonic() > deadline:
                        raise ServerError(f"{self.name}: process group {pid} survived SIGKILL")
                    time.sleep(0.05)
        self._forget()
        self._after_stop()

    def restart(self, timeout: float | None = None) -> None:
        """Stop and start again on the same data, ports and configuration."""
        self.stop()
        self.start(timeout)

    def is_running(self) -> bool:
        """True while a process started for this server (by any Python process) is alive."""
        pid = self._pid()
        return pid is not None and self._group_alive(pid)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log, for error messages."""
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_file})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_file} ---\n{tail}"

    # -- helpers ------------------------------------------------------------------------------

    def _ready_now(self) -> bool:
        try:
            return self._is_ready()
        except (OSError, ValueError, struct.error):
            return False

    def _pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _group_alive(self, pgid: int) -> bool:
        """True while any non-zombie process remains in the server's process group."""
        if self._running is not None and self._running.process.pid == pgid:
            self._running.process.poll()  # reap our own child so it does not linger as a zombie
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # After the ")" closing the command name: state, ppid, pgrp, ...
            if fields[0] != "Z" and int(fields[2]) == pgid:
                return True
        return False

    def _forget(self) -> None:
        if self._running is not None:
            self._running.process.poll()
            self._running.log.close()
            self._running = None
        self.pid_file.unlink(missing_ok=True)


class RabbitMQ(Server):
    """RabbitMQ from the Debian package, run with its own node name, ports, epmd and data folder.

    ``restart()`` stops the node and starts it on the same data, so durable queues and persistent
    messages survive it. It blocks; call it with ``asyncio.to_thread`` from async code.
    """

    name = "rabbitmq"
    start_timeout = 90.0
    stop_timeout = 60.0
    bin_dir = Path("/usr/lib/rabbitmq/bin")

    def __init__(
        self,
        base_dir: Path,
        *,
        port_offset: int = 0,
        node_name: str = "lucerna-test@localhost",
    ) -> None:
        super().__init__(base_dir, port_offset=port_offset)
        self.port = 5673 + port_offset
        self.dist_port = 25673 + port_offset
        # A private epmd keeps this node apart from any other Erlang node on the machine.
        self.epmd_port = 24369 + port_offset
        self.node_name = node_name
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, self.dist_port, self.epmd_port)

    def vhost_url(self, vhost: str) -> str:
        """The URL of a virtual host of its own (created, guest allowed), so that the platforms
        of different tests share the broker but none of its queues."""
        for args in (("add_vhost", vhost), ("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")):
            result = self._ctl(*args)
            if result.returncode != 0 and "already_exists" not in result.stderr + result.stdout:
                raise ServerError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr or result.stdout}")
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/{vhost}"

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.dir),
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.node_name,
            RABBITMQ_NODE_IP_ADDRESS=LOOPBACK,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.dir / "rabbitmq.pid"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
        )
        return env

    def _prepare(self) -> None:
        if not (self.bin_dir / "rabbitmq-server").exists():
            raise ServerError(f"{self.bin_dir}/rabbitmq-server is missing: run infra/local/install.sh")
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {LOOPBACK}:{self.port}\n"
            "log.console = true\n"
            "log.console.level = info\n"
            "log.console.use_colors = off\n"
            "log.file = false\n"
        )

    def _command(self) -> list[str]:
        return [str(self.bin_dir / "rabbitmq-server")]

    def _is_ready(self) -> bool:
        # The AMQP listener opens near the end of boot (a Connection.Start frame proves it serves);
        # the boot is over once the node logs so.
        with self.log_file.open("rb") as log:
            log.seek(self._log_offset)
            if b"Server startup complete" not in log.read():
                return False
        with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            frame_type, _channel, size = struct.unpack(">BHI", _recv_exact(sock, 7))
            payload = _recv_exact(sock, min(size, 4))
        return frame_type == 1 and payload == b"\x00\x0a\x00\x0a"

    def _ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 -- fixed rabbitmqctl command line
            [str(self.bin_dir / "rabbitmqctl"), "-n", self.node_name, *args],
            env=self._environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _graceful_stop(self, pid: int) -> None:
        # rabbitmqctl stop lets the node flush its queues; the signal is the fallback.
        try:
            result = self._ctl("stop", timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            result = None
        if result is None or result.returncode != 0:
            os.killpg(pid, signal.SIGTERM)

    def _after_stop(self) -> None:
        epmd = shutil.which("epmd")
        if not epmd:
            return
        # epmd refuses to die while a node is registered, so this never hurts a live node; a node
        # that just stopped may still be registered for a moment, so ask until the port is free.
        deadline = time.monotonic() + 15
        while not port_is_free(self.epmd_port) and time.monotonic() < deadline:
            subprocess.run(  # noqa: S603 -- fixed epmd command line
                [epmd, "-port", str(self.epmd_port), "-kill"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            time.sleep(0.2)


class Elasticsearch(Server):
    """Elasticsearch from Maven Central's integ-test zip, single node, security off, 512 MiB heap.

    Elasticsearch refuses to run as root, so under root it runs as the unprivileged user that
    install.sh creates (``LUCERNA_SERVER_USER``, default ``lucerna``), owning its folder.
    """

    name = "elasticsearch"
    start_timeout = 180.0
    version = VERSIONS["ELASTICSEARCH_VERSION"]

    def __init__(self, base_dir: Path, *, port_offset: int = 0) -> None:
        super().__init__(base_dir, port_offset=port_offset)
        self.port = 9201 + port_offset
        self.transport_port = 9301 + port_offset

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port, self.transport_port)

    @classmethod
    def home(cls) -> Path:
        """The unpacked distribution (keep in step with install.sh)."""
        if os.environ.get("LUCERNA_ES_HOME"):
            return Path(os.environ["LUCERNA_ES_HOME"])
        if os.geteuid() == 0:
            return Path(f"/opt/lucerna/elasticsearch-{cls.version}")
        return cache_dir() / f"elasticsearch-{cls.version}"

    @staticmethod
    def java_home() -> Path:
        """A JDK 17 (Elasticsearch 8 runs on 17+; the integ-test zip bundles none)."""
        for candidate in (
            os.environ.get("LUCERNA_ES_JAVA_HOME"),
            "/usr/lib/jvm/java-17-openjdk-amd64",
            "/usr/lib/jvm/java-17-openjdk-arm64",
            os.environ.get("JAVA_HOME"),
        ):
            if candidate and (Path(candidate) / "bin" / "java").exists():
                return Path(candidate)
        java = shutil.which("java")
        if java:
            return Path(java).resolve().parents[1]
        raise ServerError("no JDK found for Elasticsearch: run infra/local/install.sh")

    def _run_as(self) -> str | None:
        if os.geteuid() != 0:
            return None
        user = os.environ.get("LUCERNA_SERVER_USER", "lucerna")
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise ServerError(
                f"user {user!r} to run Elasticsearch is missing: run infra/local/install.sh"
            ) from None
        return user

    def _prepare(self) -> None:
        home = self.home()
        if not (home / "bin" / "elasticsearch").exists():
            raise ServerError(f"Elasticsearch is missing at {home}: run infra/local/install.sh")
        config = self.dir / "config"
        if config.exists():
            shutil.rmtree(config)
        shutil.copytree(home / "config", config)
        (config / "elasticsearch.yml").write_text(
            "cluster.name: lucerna-test\n"
            "node.name: lucerna-test\n"
            "discovery.type: single-node\n"
            f"network.host: {LOOPBACK}\n"
            f"http.port: {self.port}\n"
            f"transport.port: {self.transport_port}\n"
            f"path.data: {self.dir / 'data'}\n"
            f"path.logs: {self.dir / 'logs'}\n"
            "xpack.security.enabled: false\n"
            "cluster.routing.allocation.disk.threshold_enabled: false\n"
            "action.destructive_requires_name: false\n"
        )
        for sub in ("data", "logs", "tmp"):
            (self.dir / sub).mkdir(exist_ok=True)
        user = self._run_as()
        if user:
            self._hand_over(user)

    def _hand_over(self, user: str) -> None:
        """Give the server user its folder, after checking it can reach it."""
        entry = pwd.getpwnam(user)
        for parent in self.dir.parents:
            mode = parent.stat().st_mode
            if parent.stat().st_uid != entry.pw_uid and not mode & stat.S_IXOTH:
                raise ServerError(
                    f"Elasticsearch runs as {user!r}, which cannot enter {parent}; "
                    "choose a base directory outside root's home (e.g. under /tmp)"
                )
        for path in (self.dir, *self.dir.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ES_", "CLI_JAVA_OPTS", "JAVA_TOOL_OPTIONS"))
        }
        env.update(
            ES_JAVA_HOME=str(self.java_home()),
            ES_PATH_CONF=str(self.dir / "config"),
            ES_JAVA_OPTS="-Xms512m -Xmx512m",
            ES_TMPDIR=str(self.dir / "tmp"),
            HOME=str(self.dir),
        )
        return env

    def _command(self) -> list[str]:
        return [str(self.home() / "bin" / "elasticsearch")]

    def _is_ready(self) -> bool:
        status, body = _http_get(f"{self.url}/_cluster/health?wait_for_status=yellow&timeout=1s")
        return status == 200 and json.loads(body).get("status") in {"green", "yellow"}


class FerretDB(Server):
    """FerretDB v1 on its SQLite handler: a MongoDB wire-protocol server for the tests."""

    name = "ferretdb"
    start_timeout = 30.0
    version = VERSIONS["FERRETDB_VERSION"]

    def __init__(self, base_dir: Path, *, port_offset: int = 0) -> None:
        super().__init__(base_dir, port_offset=port_offset)
        self.port = 27018 + port_offset

    @property
    def url(self) -> str:
        return f"mongodb://{LOOPBACK}:{self.port}/"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    @classmethod
    def binary(cls) -> Path:
        """The binary install.sh built (keep in step with install.sh)."""
        if os.environ.get("LUCERNA_FERRETDB_BIN"):
            return Path(os.environ["LUCERNA_FERRETDB_BIN"])
        return cache_dir() / f"ferretdb-{cls.version}-{VERSIONS['FERRETDB_PATCHES']}" / "ferretdb"

    def _prepare(self) -> None:
        if not self.binary().exists():
            raise ServerError(f"FerretDB is missing at {self.binary()}: run infra/local/install.sh")
        for sub in ("data", "state"):
            (self.dir / sub).mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(self.binary()),
            "--handler=sqlite",
            f"--sqlite-url=file:{self.dir / 'data'}/",
            f"--listen-addr={LOOPBACK}:{self.port}",
            f"--state-dir={self.dir / 'state'}",
            "--debug-addr=-",
            "--telemetry=disable",
        ]

    def _is_ready(self) -> bool:
        return mongo_ping(LOOPBACK, self.port)


def _bson_document(fields: Mapping[str, int | str]) -> bytes:
    body = b""
    for key, value in fields.items():
        name = key.encode() + b"\x00"
        if isinstance(value, int):
            body += b"\x10" + name + struct.pack("<i", value)
        else:
            text = value.encode() + b"\x00"
            body += b"\x02" + name + struct.pack("<i", len(text)) + text
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def mongo_ping(host: str, port: int, timeout: float = 2.0) -> bool:
    """Send the MongoDB ``ping`` command as an OP_MSG and report whether the server said ok."""
    op_msg = 2013
    body = struct.pack("<I", 0) + b"\x00" + _bson_document({"ping": 1, "$db": "admin"})
    message = struct.pack("<iiii", 16 + len(body), 1, 0, op_msg) + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(message)
        length, _request_id, _response_to, opcode = struct.unpack("<iiii", _recv_exact(sock, 16))
        reply = _recv_exact(sock, length - 16)
    ok_double = b"\x01ok\x00" + struct.pack("<d", 1.0)
    return opcode == op_msg and ok_double in reply


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc may send to (C-STORE) or accept queries from."""

    aet: str
    host: str
    port: int

    def as_config(self) -> dict[str, str | int]:
        """Orthanc's JSON form of a modality."""
        return {"AET": self.aet, "Host": self.host, "Port": self.port}


class Orthanc(Server):
    """Orthanc from the Debian package with the DICOMweb plugin: a reference PACS for the tests."""

    name = "orthanc"
    start_timeout = 30.0
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

    def __init__(
        self,
        base_dir: Path,
        *,
        port_offset: int = 0,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
    ) -> None:
        super().__init__(base_dir, port_offset=port_offset)
        self.http_port = 8043 + port_offset
        self.dicom_port = 4243 + port_offset
        self.ae_title = ae_title
        self.modalities: dict[str, Modality] = dict(modalities or {})

    @property
    def http_url(self) -> str:
        """Orthanc's REST API; DICOMweb is under ``/dicom-web``."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def url(self) -> str:
        return self.http_url

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS)."""
        return f"{self.http_url}/dicom-web"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.http_port, self.dicom_port)

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Let Orthanc send to another DICOM node; applies at once if it runs, and on later starts."""
        modality = Modality(aet, host, port)
        self.modalities[name] = modality
        if not self.is_running():
            return
        request = urllib.request.Request(  # noqa: S310 -- loopback URL built here
            f"{self.http_url}/modalities/{name}",
            data=json.dumps(modality.as_config()).encode(),
            method="PUT",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 -- same
            if response.status != 200:
                raise ServerError(f"Orthanc refused modality {name}: HTTP {response.status}")

    def _prepare(self) -> None:
        if shutil.which("Orthanc") is None or not self.plugin.exists():
            raise ServerError("Orthanc or its DICOMweb plugin is missing: run infra/local/install.sh")
        config = {
            "Name": "lucerna-test-orthanc",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {name: m.as_config() for name, m in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (self.dir / "orthanc.json").write_text(json.dumps(config, indent=2))

    def _command(self) -> list[str]:
        return [shutil.which("Orthanc") or "Orthanc", str(self.dir / "orthanc.json")]

    def _is_ready(self) -> bool:
        status, body = _http_get(f"{self.http_url}/system")
        if status != 200 or json.loads(body).get("DicomAet") != self.ae_title:
            return False
        with socket.create_connection((LOOPBACK, self.dicom_port), timeout=2):
            return True


class FhirPeer(Server):
    """The FHIR peer: an in-memory FHIR R4 server (HAPI FHIR's plain server, built from ``fhir-peer/``)
    standing in for a hospital's own FHIR server. ``url`` is its base (``.../fhir``).

    It keeps nothing across a stop. ``fail(status, count)`` makes it answer the next ``count`` (default:
    every) FHIR request with that status until ``ok()``; ``reset()`` forgets all resources;
    ``requests()`` lists the FHIR requests it saw.
    """

    name = "fhir-peer"
    start_timeout = 60.0
    version = VERSIONS["FHIR_PEER_VERSION"]
    source_dir = HERE / "fhir-peer"

    def __init__(self, base_dir: Path, *, port_offset: int = 0, tuned_for_speed: bool = False) -> None:
        super().__init__(base_dir, port_offset=port_offset)
        self.port = 8091 + port_offset
        self.tuned_for_speed = tuned_for_speed

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/fhir"

    @property
    def admin_url(self) -> str:
        """The test-only control endpoints (failures, delays, reset, the request record)."""
        return f"http://{LOOPBACK}:{self.port}/admin"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    @classmethod
    def jar(cls) -> Path:
        """The jar install.sh built (keep in step with install.sh)."""
        if os.environ.get("LUCERNA_FHIR_PEER_JAR"):
            return Path(os.environ["LUCERNA_FHIR_PEER_JAR"])
        return cache_dir() / f"fhir-peer-{cls.version}" / "fhir-peer.jar"

    @classmethod
    def source_hash(cls) -> str:
        """The hash install.sh records beside the jar: sha256sum of each source file, hashed again."""
        listing = "".join(
            f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(cls.source_dir)}\n"
            for path in sorted(
                [
                    cls.source_dir / "pom.xml",
                    *(p for p in (cls.source_dir / "src").rglob("*") if p.is_file()),
                ],
                key=lambda path: str(path.relative_to(cls.source_dir)).encode(),
            )
        )
        return hashlib.sha256(listing.encode()).hexdigest()

    def fail(self, status: int = 503, count: int | None = None, retry_after: int | None = None) -> None:
        """Answer the next ``count`` FHIR requests (all when None) with ``status`` and an OperationOutcome."""
        query = f"status={status}"
        if count is not None:
            query += f"&count={count}"
        if retry_after is not None:
            query += f"&retry_after={retry_after}"
        self._admin(f"fail?{query}")

    def delay(self, seconds: float) -> None:
        """Hold every FHIR request for ``seconds`` before serving it (0: no delay)."""
        self._admin(f"delay?ms={round(seconds * 1000)}")

    def ok(self) -> None:
        """End injected failures and delays."""
        self._admin("ok")

    def reset(self) -> None:
        """Forget every resource, failure, delay and recorded request."""
        self._admin("reset")

    def requests(self) -> list[dict[str, object]]:
        """The FHIR requests seen since the start or the last reset, oldest first (last 1000)."""
        status, body = _http_get(f"{self.admin_url}/requests", timeout=10)
        if status != 200:
            raise ServerError(f"{self.name}: GET /admin/requests answered {status}")
        seen: list[dict[str, object]] = json.loads(body)
        return seen

    def _admin(self, action: str) -> None:
        request = urllib.request.Request(f"{self.admin_url}/{action}", method="POST")  # noqa: S310 -- loopback URL built here
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 -- same
                status = int(response.status)
        except urllib.error.HTTPError as error:
            raise ServerError(
                f"{self.name}: POST /admin/{action} answered {error.code}: {error.read()!r}"
            ) from None
        if status != 204:
            raise ServerError(f"{self.name}: POST /admin/{action} answered {status}")

    def _prepare(self) -> None:
        jar = self.jar()
        if not jar.exists():
            raise ServerError(f"the FHIR peer is missing at {jar}: run infra/local/install.sh fhir-peer")
        stamp = jar.parent / "source.sha256"
        if not os.environ.get("LUCERNA_FHIR_PEER_JAR") and (
            not stamp.exists() or stamp.read_text().strip() != self.source_hash()
        ):
            raise ServerError(
                f"{jar} was built from other sources than {self.source_dir}: "
                "run infra/local/install.sh fhir-peer"
            )

    def _command(self) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise ServerError("no java on PATH for the FHIR peer: run infra/local/install.sh")
        # A short-lived test server: the C1 compiler alone and a serial GC start it faster. A
        # benchmark wants the JVM's defaults (full JIT, G1): ``tuned_for_speed``.
        flags = (
            ["-Xmx1g"]
            if self.tuned_for_speed
            else ["-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]
        )
        return [
            java,
            *flags,
            "-jar",
            str(self.jar()),
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
        ]

    def _is_ready(self) -> bool:
        status, _body = _http_get(f"{self.url}/metadata")
        return status == 200


# -- Hyperledger Fabric ----------------------------------------------------------------------------

FABRIC_NETWORK_DIR = REPO_ROOT / "infra" / "fabric" / "network"
FABRIC_CHAINCODE_DIR = REPO_ROOT / "infra" / "fabric" / "chaincode"
_FABRIC_COMMANDS = ("peer", "orderer", "osnadmin", "configtxgen", "cryptogen")


class FabricError(ServerError):
    """A Fabric command failed: the message carries the command's error output."""


def fabric_home() -> Path:
    """The Fabric binaries and sampleconfig install.sh built (keep in step with install.sh)."""
    if os.environ.get("LUCERNA_FABRIC_HOME"):
        return Path(os.environ["LUCERNA_FABRIC_HOME"])
    return cache_dir() / f"fabric-{VERSIONS['FABRIC_VERSION']}"


def _ops_healthy(port: int) -> bool:
    """True when a Fabric node's operations endpoint says it is healthy."""
    status, _body = _http_get(f"http://{LOOPBACK}:{port}/healthz")
    return status == 200


def _list_env(*paths: Path) -> str:
    """A list setting in the form Fabric's configuration reads from an environment variable."""
    return "[" + ",".join(str(path) for path in paths) + "]"


class _FabricNode(Server):
    """One process of the network; ``FabricNetwork`` writes the material it reads before a start."""

    start_timeout = 60.0

    def __init__(self, base_dir: Path, settings: Mapping[str, str], *, ports: tuple[int, ...]) -> None:
        super().__init__(base_dir)
        self._settings = dict(settings)
        self._ports = ports

    @property
    def ports(self) -> tuple[int, ...]:
        return self._ports

    @property
    def url(self) -> str:
        """Its gRPC endpoint, on the first of its ports."""
        return f"{LOOPBACK}:{self._ports[0]}"

    def configure(self, **settings: str) -> None:
        """Add environment settings for the next start."""
        self._settings.update(settings)

    def _environment(self) -> dict[str, str]:
        # A developer's own CORE_/ORDERER_ settings would silently change the network.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CORE_", "ORDERER_", "FABRIC_"))}
        env.update(self._settings)
        return env

    def _prepare(self) -> None:
        (self.dir / "data").mkdir(exist_ok=True)


class FabricOrderer(_FabricNode):
    """The single Raft orderer, with the channel participation API on its admin port."""

    name = "orderer"

    def __init__(self, base_dir: Path, settings: Mapping[str, str], *, ports: tuple[int, ...]) -> None:
        super().__init__(base_dir, settings, ports=ports)
        self.port, self.admin_port, self.operations_port = ports

    def _command(self) -> list[str]:
        return [str(fabric_home() / "bin" / "orderer")]

    def _is_ready(self) -> bool:
        # Its operations endpoint answers before the admin API (osnadmin's) listens: wait for both.
        return _ops_healthy(self.operations_port) and _accepts(self.admin_port)


class FabricPeer(_FabricNode):
    """A peer of one organisation (its folder: ``<network>/<org>/peer``)."""

    name = "peer"

    def __init__(self, base_dir: Path, settings: Mapping[str, str], *, ports: tuple[int, ...]) -> None:
        super().__init__(base_dir, settings, ports=ports)
        self.port, self.chaincode_port, self.operations_port = ports

    def _command(self) -> list[str]:
        return [str(fabric_home() / "bin" / "peer"), "node", "start"]

    def _is_ready(self) -> bool:
        return _ops_healthy(self.operations_port)


class AnchorsChaincode(_FabricNode):
    """The anchors chaincode as a service: one process that both peers dial."""

    name = "chaincode"
    binary_name = "anchors-cc"

    def __init__(self, base_dir: Path, settings: Mapping[str, str], *, ports: tuple[int, ...]) -> None:
        super().__init__(base_dir, settings, ports=ports)
        (self.port,) = ports

    @property
    def url(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def _prepare(self) -> None:
        if not (self.dir / self.binary_name).exists():
            raise ServerError(f"{self.dir / self.binary_name} is missing: FabricNetwork builds it")

    def _command(self) -> list[str]:
        return [str(self.dir / self.binary_name)]

    def _is_ready(self) -> bool:
        with socket.create_connection((LOOPBACK, self.port), timeout=1):
            return True


@dataclass(frozen=True)
class FabricOrg:
    """What a client of one organisation needs: its MSP ID, its peer, TLS roots and identities."""

    msp_id: str
    domain: str
    peer_address: str
    crypto_dir: Path

    @property
    def peer_tls_root_cert(self) -> Path:
        """The TLS CA certificate that signed the peer's TLS certificate."""
        return self.crypto_dir / "tlsca" / f"tlsca.{self.domain}-cert.pem"

    @property
    def peer_host_name(self) -> str:
        """The name in the peer's TLS certificate (127.0.0.1 is in it too)."""
        return f"peer0.{self.domain}"

    def msp_dir(self, user: str = "User1") -> Path:
        """The MSP folder of one of the organisation's identities (``User1`` or ``Admin``)."""
        return self.crypto_dir / "users" / f"{user}@{self.domain}" / "msp"

    def certificate(self, user: str = "User1") -> Path:
        """The identity's X.509 certificate (PEM)."""
        return self.msp_dir(user) / "signcerts" / f"{user}@{self.domain}-cert.pem"

    def private_key(self, user: str = "User1") -> Path:
        """The identity's private key (PEM, PKCS #8)."""
        return self.msp_dir(user) / "keystore" / "priv_sk"


class FabricNetwork:
    """A whole Fabric v2.5 network as processes: one Raft orderer, one peer for each of Org1MSP and
    Org2MSP, channel ``lucerna``, and the anchors chaincode deployed as a service (approved by both
    orgs; its endorsement policy is the channel default, MAJORITY of the two orgs, i.e. both).

    Every ``start()`` builds a fresh network in ``<base_dir>/fabric`` (crypto, channel, ledgers);
    there is no restart on the same ledger. ``invoke``/``query`` run the ``peer`` CLI as Org1's
    User1. Started in about 7 s once the chaincode binary is in Go's build cache.
    """

    name = "fabric"
    channel = "lucerna"
    chaincode = "anchors"
    chaincode_version = "1.0"
    start_timeout = 240.0
    stop_timeout = 30.0
    admin_msp = "Org1MSP"

    def __init__(self, base_dir: Path, *, port_offset: int = 0) -> None:
        self.port_offset = port_offset
        self.dir = Path(base_dir).resolve() / self.name
        self.crypto_dir = self.dir / "crypto"
        self.config_dir = self.dir / "config"
        self.started_in: float | None = None
        self.package_id: str | None = None
        # Ten consecutive ports, each with its own last digit: a session on the next block (+10)
        # never needs a port of this one.
        p = 17050 + port_offset
        self._orderer_ports = (p, p + 1, p + 2)
        self._chaincode_ports = (p + 3,)
        self._peer_ports = {"org1": (p + 4, p + 5, p + 6), "org2": (p + 7, p + 8, p + 9)}
        orderer_org = self.crypto_dir / "ordererOrganizations" / "orderer.lucerna.test"
        self._orderer_org = orderer_org
        self.orderer_tls_root_cert = orderer_org / "tlsca" / "tlsca.orderer.lucerna.test-cert.pem"
        self.orgs = {
            org: FabricOrg(
                f"Org{n}MSP",
                f"{org}.lucerna.test",
                f"{LOOPBACK}:{self._peer_ports[org][0]}",
                self.crypto_dir / "peerOrganizations" / f"{org}.lucerna.test",
            )
            for n, org in ((1, "org1"), (2, "org2"))
        }
        self.orderer = FabricOrderer(self.dir, self._orderer_settings(), ports=self._orderer_ports)
        self.peers = {
            org: FabricPeer(self.dir / org, self._peer_settings(org), ports=self._peer_ports[org])
            for org in self.orgs
        }
        self.chaincode_server = AnchorsChaincode(self.dir, {}, ports=self._chaincode_ports)

    # -- what clients use ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Org1's peer (gRPC over TLS: root ``orgs['org1'].peer_tls_root_cert``)."""
        return self.orgs["org1"].peer_address

    @property
    def orderer_address(self) -> str:
        """The orderer's gRPC endpoint (TLS root ``orderer_tls_root_cert``)."""
        return self.orderer.url

    @property
    def ports(self) -> tuple[int, ...]:
        """Every loopback port of the network."""
        return (
            *self._orderer_ports,
            *self._chaincode_ports,
            *self._peer_ports["org1"],
            *self._peer_ports["org2"],
        )

    def invoke(self, function: str, *args: str) -> str:
        """Submit a transaction endorsed by both peers and wait until it commits; the CLI's output.

        ``FabricError`` carries the chaincode's message when an endorsement or the commit fails.
        """
        line = [
            "chaincode",
            "invoke",
            *self._orderer_flags(),
            "--channelID",
            self.channel,
            "--name",
            self.chaincode,
            "--ctor",
            json.dumps({"Args": [function, *args]}),
            "--waitForEvent",
            *self._all_peers_flags(),
        ]
        result = self._cli(line, org="org1", user="User1")
        return result.stdout + result.stderr

    def query(self, function: str, *args: str, org: str = "org1") -> str:
        """Evaluate a transaction on one org's peer (nothing is ordered); the result on stdout."""
        line = [
            "chaincode",
            "query",
            "--channelID",
            self.channel,
            "--name",
            self.chaincode,
            "--ctor",
            json.dumps({"Args": [function, *args]}),
        ]
        return self._cli(line, org=org, user="User1").stdout

    def client_environment(self, org: str = "org1", user: str = "User1") -> dict[str, str]:
        """The environment under which the ``peer`` CLI acts as ``user`` of ``org`` on its peer."""
        fabric_org = self.orgs[org]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CORE_", "ORDERER_", "FABRIC_"))}
        env.update(
            FABRIC_CFG_PATH=str(self.config_dir),
            CORE_PEER_LOCALMSPID=fabric_org.msp_id,
            CORE_PEER_MSPCONFIGPATH=str(fabric_org.msp_dir(user)),
            CORE_PEER_ADDRESS=fabric_org.peer_address,
            CORE_PEER_TLS_ENABLED="true",
            CORE_PEER_TLS_ROOTCERT_FILE=str(fabric_org.peer_tls_root_cert),
        )
        return env

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float | None = None) -> None:
        """Generate the network, start its processes, create the channel and deploy the chaincode."""
        if self.is_running():
            raise ServerError(f"{self.name} already runs under {self.dir}; stop it first")
        busy = [port for port in self.ports if not port_is_free(port)]
        if busy:
            raise ServerError(f"{self.name}: loopback port(s) {busy} already in use by another process")
        began = time.monotonic()
        deadline = began + (timeout if timeout is not None else self.start_timeout)
        self._check_installed()
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        build = self._start_chaincode_build()
        try:
            self._generate()
            self.orderer.start()
            self._osnadmin_join()
            for peer in self.peers.values():
                peer.start()
            for org in self.orgs:
                self._cli(["channel", "join", "--blockpath", str(self._channel_block)], org=org, user="Admin")
            self._finish_chaincode_build(build)
            self._deploy_chaincode(deadline)
        except BaseException:
            if build.poll() is None:
                build.kill()
                build.wait()
            self.stop()
            raise
        self.started_in = time.monotonic() - began

    def stop(self, timeout: float | None = None) -> None:
        """Stop the chaincode, the peers and the orderer; a stopped network is left alone."""
        for node in (self.chaincode_server, *self.peers.values(), self.orderer):
            node.stop(timeout if timeout is not None else self.stop_timeout)

    def is_running(self) -> bool:
        """True while any process of the network is alive."""
        return any(node.is_running() for node in (self.orderer, *self.peers.values(), self.chaincode_server))

    # -- how it is built ----------------------------------------------------------------------

    @property
    def _channel_block(self) -> Path:
        return self.dir / f"{self.channel}.block"

    @staticmethod
    def _check_installed() -> None:
        home = fabric_home()
        missing = [name for name in _FABRIC_COMMANDS if not (home / "bin" / name).exists()]
        if missing or not (home / "sampleconfig" / "core.yaml").exists():
            raise ServerError(
                f"Fabric is missing at {home} ({', '.join(missing) or 'sampleconfig'}): "
                "run infra/local/install.sh fabric"
            )
        if shutil.which("go") is None:
            raise ServerError("no go on PATH to build the anchors chaincode")

    def _run(self, line: Sequence[str], *, env: Mapping[str, str] | None = None, what: str) -> str:
        try:
            result = subprocess.run(  # noqa: S603 -- fixed Fabric command lines built here
                list(line),
                env=dict(env) if env is not None else None,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd=self.dir,
            )
        except subprocess.TimeoutExpired:
            raise FabricError(f"{what} did not finish within 120 s") from None
        if result.returncode != 0:
            raise FabricError(f"{what} failed (exit {result.returncode}):\n{result.stderr or result.stdout}")
        return result.stdout

    def _generate(self) -> None:
        """Crypto material (cryptogen), the node configuration and the channel's genesis block."""
        bin_dir = fabric_home() / "bin"
        self._run(
            [
                str(bin_dir / "cryptogen"),
                "generate",
                f"--config={FABRIC_NETWORK_DIR / 'crypto-config.yaml'}",
                f"--output={self.crypto_dir}",
            ],
            what="cryptogen",
        )
        self.config_dir.mkdir()
        sample = fabric_home() / "sampleconfig"
        shutil.copy(sample / "orderer.yaml", self.config_dir / "orderer.yaml")
        core = (sample / "core.yaml").read_text()
        # The peers build chaincode packages with our ccaas builder (no Docker, no sampleconfig path).
        builder_line = "path: /opt/hyperledger/ccaas_builder"
        if builder_line not in core:
            raise ServerError(f"{sample / 'core.yaml'} no longer names the ccaas builder as expected")
        core = core.replace(builder_line, f"path: {FABRIC_NETWORK_DIR / 'ccaas-builder'}")
        # No Docker: an empty vm.endpoint keeps the peer from using it and from reporting itself
        # unhealthy for want of it (an empty CORE_VM_ENDPOINT is ignored by Fabric's viper).
        docker_line = "endpoint: unix:///var/run/docker.sock"
        if core.count(docker_line) != 1:
            raise ServerError(f"{sample / 'core.yaml'} no longer names the Docker endpoint as expected")
        core = core.replace(docker_line, 'endpoint: ""')
        (self.config_dir / "core.yaml").write_text(core)
        configtx = string.Template((FABRIC_NETWORK_DIR / "configtx.yaml").read_text()).substitute(
            orderer_port=self._orderer_ports[0],
            org1_peer_port=self._peer_ports["org1"][0],
            org2_peer_port=self._peer_ports["org2"][0],
        )
        # configtxgen resolves the MSP paths relative to configtx.yaml: it sits beside crypto/.
        (self.dir / "configtx.yaml").write_text(configtx)
        self._run(
            [
                str(bin_dir / "configtxgen"),
                "-configPath",
                str(self.dir),
                "-profile",
                "LucernaChannel",
                "-channelID",
                self.channel,
                "-outputBlock",
                str(self._channel_block),
            ],
            env={**os.environ, "FABRIC_CFG_PATH": str(self.dir)},
            what="configtxgen",
        )

    def _orderer_settings(self) -> dict[str, str]:
        node = self._orderer_org / "orderers" / "orderer.orderer.lucerna.test"
        tls = node / "tls"
        port, admin_port, operations_port = self._orderer_ports
        data = self.dir / "orderer" / "data"
        return {
            "FABRIC_CFG_PATH": str(self.config_dir),
            "FABRIC_LOGGING_SPEC": "INFO",
            "ORDERER_GENERAL_LISTENADDRESS": LOOPBACK,
            "ORDERER_GENERAL_LISTENPORT": str(port),
            "ORDERER_GENERAL_LOCALMSPID": "OrdererMSP",
            "ORDERER_GENERAL_LOCALMSPDIR": str(node / "msp"),
            "ORDERER_GENERAL_TLS_ENABLED": "true",
            "ORDERER_GENERAL_TLS_PRIVATEKEY": str(tls / "server.key"),
            "ORDERER_GENERAL_TLS_CERTIFICATE": str(tls / "server.crt"),
            "ORDERER_GENERAL_TLS_ROOTCAS": _list_env(tls / "ca.crt"),
            "ORDERER_GENERAL_CLUSTER_CLIENTCERTIFICATE": str(tls / "server.crt"),
            "ORDERER_GENERAL_CLUSTER_CLIENTPRIVATEKEY": str(tls / "server.key"),
            "ORDERER_GENERAL_CLUSTER_ROOTCAS": _list_env(tls / "ca.crt"),
            # No system channel: channels are joined through the admin API (osnadmin).
            "ORDERER_GENERAL_BOOTSTRAPMETHOD": "none",
            "ORDERER_CHANNELPARTICIPATION_ENABLED": "true",
            "ORDERER_ADMIN_LISTENADDRESS": f"{LOOPBACK}:{admin_port}",
            "ORDERER_ADMIN_TLS_ENABLED": "true",
            "ORDERER_ADMIN_TLS_PRIVATEKEY": str(tls / "server.key"),
            "ORDERER_ADMIN_TLS_CERTIFICATE": str(tls / "server.crt"),
            "ORDERER_ADMIN_TLS_ROOTCAS": _list_env(tls / "ca.crt"),
            "ORDERER_ADMIN_TLS_CLIENTAUTHREQUIRED": "true",
            "ORDERER_ADMIN_TLS_CLIENTROOTCAS": _list_env(tls / "ca.crt"),
            "ORDERER_FILELEDGER_LOCATION": str(data / "ledger"),
            "ORDERER_CONSENSUS_WALDIR": str(data / "etcdraft" / "wal"),
            "ORDERER_CONSENSUS_SNAPDIR": str(data / "etcdraft" / "snapshot"),
            "ORDERER_OPERATIONS_LISTENADDRESS": f"{LOOPBACK}:{operations_port}",
            "ORDERER_METRICS_PROVIDER": "disabled",
        }

    def _peer_settings(self, org: str) -> dict[str, str]:
        domain = f"{org}.lucerna.test"
        node = self.crypto_dir / "peerOrganizations" / domain / "peers" / f"peer0.{domain}"
        port, chaincode_port, operations_port = self._peer_ports[org]
        data = self.dir / org / "peer" / "data"
        address = f"{LOOPBACK}:{port}"
        return {
            "FABRIC_CFG_PATH": str(self.config_dir),
            "FABRIC_LOGGING_SPEC": "INFO",
            "CORE_PEER_ID": f"peer0.{domain}",
            "CORE_PEER_LOCALMSPID": f"Org{org[-1]}MSP",
            "CORE_PEER_MSPCONFIGPATH": str(node / "msp"),
            "CORE_PEER_LISTENADDRESS": address,
            "CORE_PEER_ADDRESS": address,
            "CORE_PEER_CHAINCODELISTENADDRESS": f"{LOOPBACK}:{chaincode_port}",
            "CORE_PEER_CHAINCODEADDRESS": f"{LOOPBACK}:{chaincode_port}",
            "CORE_PEER_GOSSIP_BOOTSTRAP": address,
            "CORE_PEER_GOSSIP_EXTERNALENDPOINT": address,
            # The first peer to join the channel dials the other org's anchor peer before that one
            # has joined and trusts its TLS CA, and fails; gossip retries after this interval (25 s
            # by default). Until the peers have met, discovery (the Fabric Gateway's endorsement
            # plan) knows no peer of the other org.
            "CORE_PEER_GOSSIP_RECONNECTINTERVAL": "1s",
            "CORE_PEER_TLS_ENABLED": "true",
            "CORE_PEER_TLS_CERT_FILE": str(node / "tls" / "server.crt"),
            "CORE_PEER_TLS_KEY_FILE": str(node / "tls" / "server.key"),
            "CORE_PEER_TLS_ROOTCERT_FILE": str(node / "tls" / "ca.crt"),
            "CORE_PEER_FILESYSTEMPATH": str(data / "ledger"),
            "CORE_LEDGER_SNAPSHOTS_ROOTDIR": str(data / "snapshots"),
            "CORE_OPERATIONS_LISTENADDRESS": f"{LOOPBACK}:{operations_port}",
            "CORE_METRICS_PROVIDER": "disabled",
        }

    def _orderer_flags(self) -> list[str]:
        return [
            "--orderer",
            self.orderer_address,
            "--ordererTLSHostnameOverride",
            "orderer.orderer.lucerna.test",
            "--tls",
            "--cafile",
            str(self.orderer_tls_root_cert),
        ]

    def _all_peers_flags(self) -> list[str]:
        flags = []
        for org in self.orgs.values():
            flags += ["--peerAddresses", org.peer_address, "--tlsRootCertFiles", str(org.peer_tls_root_cert)]
        return flags

    def _cli(self, args: Sequence[str], *, org: str, user: str) -> subprocess.CompletedProcess[str]:
        line = [str(fabric_home() / "bin" / "peer"), *args]
        try:
            result = subprocess.run(  # noqa: S603 -- fixed peer CLI command lines built here
                line,
                env=self.client_environment(org, user),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd=self.dir,
            )
        except subprocess.TimeoutExpired:
            raise FabricError(
                f"peer {' '.join(args[:2])} as {user}@{org} did not finish within 120 s"
            ) from None
        if result.returncode != 0:
            raise FabricError(
                f"peer {' '.join(args[:2])} as {user}@{org} failed (exit {result.returncode}):\n"
                f"{result.stderr or result.stdout}"
            )
        return result

    def _osnadmin_join(self) -> None:
        admin_tls = self._orderer_org / "users" / "Admin@orderer.lucerna.test" / "tls"
        self._run(
            [
                str(fabric_home() / "bin" / "osnadmin"),
                "channel",
                "join",
                "--channelID",
                self.channel,
                "--config-block",
                str(self._channel_block),
                "--orderer-address",
                f"{LOOPBACK}:{self.orderer.admin_port}",
                "--ca-file",
                str(self.orderer_tls_root_cert),
                "--client-cert",
                str(admin_tls / "client.crt"),
                "--client-key",
                str(admin_tls / "client.key"),
            ],
            what="osnadmin channel join",
        )

    def _start_chaincode_build(self) -> subprocess.Popen[bytes]:
        """``go build`` of the chaincode, run while the nodes start."""
        self.chaincode_server.dir.mkdir(parents=True)
        log = (self.chaincode_server.dir / "build.log").open("wb")
        with log:
            return subprocess.Popen(  # noqa: S603 -- fixed go build command line
                [
                    shutil.which("go") or "go",
                    "build",
                    "-mod=readonly",
                    "-trimpath",
                    "-o",
                    str(self.chaincode_server.dir / AnchorsChaincode.binary_name),
                    ".",
                ],
                cwd=FABRIC_CHAINCODE_DIR,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _finish_chaincode_build(self, build: subprocess.Popen[bytes]) -> None:
        try:
            status = build.wait(timeout=300)
        except subprocess.TimeoutExpired:
            build.kill()
            build.wait()
            status = -1
        if status != 0:
            log = (self.chaincode_server.dir / "build.log").read_text(errors="replace")
            raise FabricError(f"go build of the anchors chaincode failed (exit {status}):\n{log}")

    def _package(self) -> Path:
        """The ccaas package: metadata.json and code.tar.gz holding connection.json (our server)."""
        work = self.dir / "package"
        work.mkdir()
        connection = {"address": self.chaincode_server.url, "dial_timeout": "10s", "tls_required": False}
        (work / "connection.json").write_text(json.dumps(connection))
        (work / "metadata.json").write_text(json.dumps({"type": "ccaas", "label": self._label}))
        with tarfile.open(work / "code.tar.gz", "w:gz") as code:
            code.add(work / "connection.json", arcname="connection.json")
        package = self.dir / f"{self._label}.tar.gz"
        with tarfile.open(package, "w:gz") as archive:
            archive.add(work / "metadata.json", arcname="metadata.json")
            archive.add(work / "code.tar.gz", arcname="code.tar.gz")
        return package

    @property
    def _label(self) -> str:
        return f"{self.chaincode}_{self.chaincode_version}"

    def _deploy_chaincode(self, deadline: float) -> None:
        """Install on both peers, start the server, approve for both orgs, commit, wait for answers."""
        package = self._package()
        package_id = self._cli(
            ["lifecycle", "chaincode", "calculatepackageid", str(package)], org="org1", user="Admin"
        ).stdout.strip()
        self.package_id = package_id
        self.chaincode_server.configure(
            CHAINCODE_ID=package_id,
            CHAINCODE_SERVER_ADDRESS=self.chaincode_server.url,
            ANCHORS_ADMIN_MSP=self.admin_msp,
        )
        self.chaincode_server.start()
        for org in self.orgs:
            self._cli(["lifecycle", "chaincode", "install", str(package)], org=org, user="Admin")
        definition = [
            "--channelID",
            self.channel,
            "--name",
            self.chaincode,
            "--version",
            self.chaincode_version,
            "--sequence",
            "1",
        ]
        for org in self.orgs:
            self._cli(
                [
                    "lifecycle",
                    "chaincode",
                    "approveformyorg",
                    *self._orderer_flags(),
                    *definition,
                    "--package-id",
                    package_id,
                ],
                org=org,
                user="Admin",
            )
        self._cli(
            [
                "lifecycle",
                "chaincode",
                "commit",
                *self._orderer_flags(),
                *definition,
                *self._all_peers_flags(),
            ],
            org="org1",
            user="Admin",
        )
        self._wait_for_chaincode(deadline)

    def _wait_for_chaincode(self, deadline: float) -> None:
        """Until both peers answer a chaincode query: once both have the definition and have
        dialled the server. "Not found" for an origin never anchored is the contract's own answer."""
        probe = "lucerna.local/fabric-readiness-probe"
        while True:
            failures = []
            for org in self.orgs:
                try:
                    self.query("Latest", probe, org=org)
                except FabricError as error:
                    if "not found" not in str(error):
                        failures.append(str(error))
            if not failures:
                return
            if time.monotonic() > deadline:
                raise FabricError("the anchors chaincode does not answer:\n" + "\n".join(failures))
            time.sleep(0.5)


ANCHOR_SERVICE_DIR = REPO_ROOT / "services" / "anchor"


def anchor_service_binary() -> Path:
    """The ``lucerna-anchor`` binary built from the current sources of services/anchor, built on
    first use: cached under ``<cache>/anchor/<hash of the sources>`` so a repeat run reuses it and
    a changed source builds anew. Modules come from GOPROXY, checked against the committed go.sum."""
    sources = sorted(
        path
        for path in ANCHOR_SERVICE_DIR.rglob("*")
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum"))
    )
    digest = hashlib.sha256()
    for path in sources:
        digest.update(f"{path.relative_to(ANCHOR_SERVICE_DIR)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    binary = cache_dir() / "anchor" / digest.hexdigest()[:16] / "lucerna-anchor"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        raise ServerError("no go on PATH to build the anchor service (services/anchor)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: a concurrent session never runs a half-written file.
    partial = binary.with_name(f".lucerna-anchor.{os.getpid()}")
    env = {**os.environ, "GOFLAGS": "-mod=readonly", "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "auto")}
    try:
        result = subprocess.run(  # noqa: S603 -- fixed go build command line
            [go, "build", "-trimpath", "-o", str(partial), "./cmd/lucerna-anchor"],
            cwd=ANCHOR_SERVICE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ServerError("go build of the anchor service did not finish within 600 s") from None
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ServerError(
            f"go build of the anchor service failed (exit {result.returncode}):\n{result.stderr}"
        )
    partial.replace(binary)
    return binary


class AnchorService(Server):
    """The anchor service (services/anchor, gRPC ``lucerna.anchoring.v1.Anchors``) on a running
    ``FabricNetwork``, as ``user`` of ``org`` (Org1's User1 by default: Org1MSP is the chaincode's
    admin MSP, so it may register log keys), requiring ``token`` as a bearer token on every call.

    ``start()`` returns once the service can anchor: its health service says the Fabric Gateway
    has both orgs' peers endorse (gossip and discovery done), which is what a submit needs.
    """

    name = "anchor"
    start_timeout = 60.0
    stop_timeout = 30.0
    base_port = 18095

    def __init__(
        self,
        base_dir: Path,
        fabric: FabricNetwork,
        *,
        port_offset: int = 0,
        token: str | None = None,
        org: str = "org1",
        user: str = "User1",
    ) -> None:
        super().__init__(base_dir, port_offset=port_offset)
        self.fabric = fabric
        self.port = self.base_port + port_offset
        self.token = token if token is not None else secrets.token_urlsafe(32)
        self.org = org
        self.user = user
        self._binary: Path | None = None

    @property
    def address(self) -> str:
        """host:port of the gRPC server (plaintext, loopback)."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return self.address

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.port,)

    def _prepare(self) -> None:
        self._binary = anchor_service_binary()

    def _command(self) -> list[str]:
        if self._binary is None:
            raise ServerError("the anchor service's binary is not built: _prepare builds it")
        return [str(self._binary)]

    def _environment(self) -> dict[str, str]:
        org = self.fabric.orgs[self.org]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LUCERNA_ANCHOR_")}
        env.update(
            LUCERNA_ANCHOR_LISTEN=self.address,
            LUCERNA_ANCHOR_TOKEN=self.token,
            LUCERNA_ANCHOR_PEER_ENDPOINT=org.peer_address,
            LUCERNA_ANCHOR_PEER_TLS_ROOT_CERT=str(org.peer_tls_root_cert),
            LUCERNA_ANCHOR_PEER_HOST_OVERRIDE=org.peer_host_name,
            LUCERNA_ANCHOR_MSP_ID=org.msp_id,
            LUCERNA_ANCHOR_CERT=str(org.certificate(self.user)),
            LUCERNA_ANCHOR_KEYSTORE=str(org.msp_dir(self.user) / "keystore"),
            LUCERNA_ANCHOR_CHANNEL=self.fabric.channel,
            LUCERNA_ANCHOR_CHAINCODE=self.fabric.chaincode,
        )
        return env

    def can_anchor(self) -> bool:
        """True when the running service says Fabric would endorse a transaction now (its health)."""
        binary = self._binary or anchor_service_binary()
        try:
            probe = subprocess.run(  # noqa: S603 -- our own binary's health subcommand
                [str(binary), "health", "-addr", self.address, "-timeout", "1s"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
        return probe.returncode == 0

    def _is_ready(self) -> bool:
        return self.can_anchor()


SERVERS: dict[str, type[Server] | type[FabricNetwork]] = {
    cls.name: cls for cls in (RabbitMQ, Elasticsearch, FerretDB, Orthanc, FhirPeer, FabricNetwork)
}


def default_base_dir() -> Path:
    """Where the CLI keeps the servers' data: ``$LUCERNA_SERVERS_DIR`` or ``var/servers`` in the repo."""
    return Path(os.environ.get("LUCERNA_SERVERS_DIR") or REPO_ROOT / "var" / "servers")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line for developers: start, stop or show the test servers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument(
        "names", nargs="*", metavar="name", help=f"any of {', '.join(SERVERS)} (default: all)"
    )
    parser.add_argument("--base-dir", type=Path, default=default_base_dir())
    parser.add_argument("--port-offset", type=int, default=0, help="added to every default port")
    args = parser.parse_args(argv)
    base_dir: Path = args.base_dir
    names: list[str] = args.names or list(SERVERS)
    unknown = sorted(set(names) - set(SERVERS))
    if unknown:
        parser.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)}")
    if args.action == "start":
        # Elasticsearch's user must be able to enter the folder (mkdir's default mode is 0o755).
        base_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    for name in names:
        server = SERVERS[name](base_dir, port_offset=args.port_offset)
        if args.action == "start":
            if server.is_running():
                print(f"{name}: already running at {server.url}")
                continue
            try:
                server.start()
            except ServerError as error:
                print(f"{name}: FAILED\n{error}", file=sys.stderr)
                failed = True
                continue
            print(f"{name}: up in {server.started_in:.1f}s at {server.url}")
        elif args.action == "stop":
            running = server.is_running()
            server.stop()
            print(f"{name}: {'stopped' if running else 'was not running'}")
        else:
            print(f"{name}: {'running at ' + server.url if server.is_running() else 'stopped'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
