"""The local Fabric ledger of ``lucerna up``: a Fabric network and the anchor service on it, kept in
one folder so that the ledger outlives a restart, for local use and for auditors.

The audit service starts it as its companion process (``LUCERNA_AUDIT_LOCAL_LEDGER``) with its
folder beside the audit log (``<data dir>/ledger``): the log and the ledger that anchors it live and
go together. The first start builds the network (crypto material, channel, chaincode); every later
start resumes it on the same ledger, identities and ports. A ledger that cannot be resumed is never
silently built anew, because the log's recorded anchors name transactions on it: the error says
what to remove. Standard library only (it reuses ``servers.py``)::

    LUCERNA_ANCHOR_TOKEN=... python infra/local/ledger.py --dir var/ledger [--port 19050]

Ports, all on loopback: the Fabric network on ``PORT`` .. ``PORT+9`` (orderer, its admin and
operations ports, the chaincode server, each org's peer with its chaincode and operations ports) and
the anchor service's gRPC on ``PORT+10``. The default block, 19050-19060, is outside the test
fixtures' blocks (Fabric from 17050, the anchor service from 18095, Triton from 18800). Stops
cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers  # the sibling script, importable once its folder is on the path

DEFAULT_PORT = 19050
PORTS = 11  # the network's ten and the anchor service's one
TOKEN_VARIABLE = "LUCERNA_ANCHOR_TOKEN"  # noqa: S105 -- the variable's name, not a secret
STATE_FILE = "ledger.json"
_FABRIC_BASE = 17050  # FabricNetwork's first port at port offset 0
_WATCH_SECONDS = 1.0


class LedgerError(servers.ServerError):
    """The local ledger cannot start (or resume); the message says why and what to do."""


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: unwinds whatever is running (a BaseException, so that no
    ``except Exception`` on the way swallows it)."""


def fabric_missing() -> str | None:
    """Why the network cannot run here (Fabric's binaries or Go missing), or None when it can."""
    try:
        servers.FabricNetwork._check_installed()  # the one place that knows what the network needs
    except servers.ServerError as error:
        return str(error)
    return None


class KeptFabricNetwork(servers.FabricNetwork):
    """A ``FabricNetwork`` whose ledger outlives its processes: the first start builds it and writes
    ``ledger.json``; later starts resume the orderer, the peers and the chaincode server on it."""

    @property
    def first_port(self) -> int:
        """The network's first port (it binds ten from there)."""
        return _FABRIC_BASE + self.port_offset

    @property
    def state_file(self) -> Path:
        """Written once the network is built; its presence means there is a ledger to resume."""
        return self.dir / STATE_FILE

    def start(self, timeout: float | None = None) -> None:
        """Resume the kept ledger, or build the network when there is none yet."""
        if not self.state_file.exists():
            # Without the state file no build ever finished, so nothing was anchored: the leftovers
            # of an interrupted first start may go (FabricNetwork.start removes them).
            super().start(timeout)
            state = {
                "fabric_version": servers.VERSIONS["FABRIC_VERSION"],
                "first_port": self.first_port,
                "package_id": self.package_id,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            self.state_file.write_text(json.dumps(state, indent=2) + "\n")
            return
        self._resume(timeout)

    def _resume(self, timeout: float | None) -> None:
        state = json.loads(self.state_file.read_text())
        keep = f"it anchors an audit log: remove {self.dir.parent} only together with that log"
        if state["first_port"] != self.first_port:
            first = state["first_port"]
            raise LedgerError(
                f"the ledger in {self.dir} was built on ports {first}-{first + 9} "
                f"(they are in its channel configuration), not {self.first_port}: start it with "
                f"--port {first}, or build a new one elsewhere ({keep})"
            )
        if self.is_running():
            raise servers.ServerError(f"{self.name} already runs under {self.dir}; stop it first")
        busy = [port for port in self.ports if not servers.port_is_free(port)]
        if busy:
            raise servers.ServerError(
                f"{self.name}: loopback port(s) {busy} already in use by another process"
            )
        began = time.monotonic()
        deadline = began + (timeout if timeout is not None else self.start_timeout)
        self._check_installed()
        self.chaincode_server.configure(
            CHAINCODE_ID=state["package_id"],
            CHAINCODE_SERVER_ADDRESS=self.chaincode_server.url,
            ANCHORS_ADMIN_MSP=self.admin_msp,
        )
        try:
            self.orderer.start()
            for peer in self.peers.values():
                peer.start()
            self.chaincode_server.start()
            self._wait_for_chaincode(deadline)
        except servers.ServerError as error:
            self.stop()
            raise LedgerError(f"the ledger in {self.dir} could not be resumed ({keep}):\n{error}") from error
        except BaseException:
            self.stop()
            raise
        self.package_id = state["package_id"]
        self.started_in = time.monotonic() - began


class LocalLedger:
    """The network and the anchor service, under ``folder`` (``fabric/``, ``anchor/``)."""

    def __init__(self, folder: Path, port: int, token: str) -> None:
        self.network = KeptFabricNetwork(folder, port_offset=port - _FABRIC_BASE)
        self.anchor = servers.AnchorService(
            folder, self.network, port_offset=port + 10 - servers.AnchorService.base_port, token=token
        )

    @property
    def processes(self) -> list[servers.Server]:
        """Every process of the ledger, in start order."""
        network = self.network
        return [network.orderer, *network.peers.values(), network.chaincode_server, self.anchor]

    def start(self) -> None:
        """Clear what a killed launcher left running, then start the network and the anchor service."""
        self.stop()  # processes of ours (pid files in our folder) that a SIGKILLed launcher left behind
        self.network.start()
        self.anchor.start()

    def stop(self) -> None:
        """The anchor service first (it uses the network), then the network."""
        self.anchor.stop()
        self.network.stop()

    def dead(self) -> servers.Server | None:
        """A process of the ledger that has exited, or None while all run."""
        return next((process for process in self.processes if not process.is_running()), None)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run the ledger until SIGTERM/SIGINT; 1 when it cannot start or a process of it dies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, help="where the ledger is kept (created); required to run")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"first of {PORTS} loopback ports")
    parser.add_argument(
        "--check", action="store_true", help="only say whether Fabric and Go are installed: exit 0, or 3"
    )
    args = parser.parse_args(argv)
    missing = fabric_missing()
    if args.check:
        print(missing or f"ok: Fabric at {servers.fabric_home()}")
        return 3 if missing else 0
    if args.dir is None:
        parser.error("--dir is required: the folder where the ledger is kept")
    token = os.environ.get(TOKEN_VARIABLE)
    if not token:
        parser.error(f"set {TOKEN_VARIABLE}: the anchor service requires it as a bearer token on every call")
    if missing:
        print(f"ledger: {missing}", file=sys.stderr)
        return 1
    folder: Path = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ledger = LocalLedger(folder, args.port, token)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        how = "resuming" if ledger.network.state_file.exists() else "building"
        print(f"ledger: {how} the Fabric network in {ledger.network.dir}", flush=True)
        ledger.start()
        print(
            f"ledger: anchor service on {ledger.anchor.address} (channel {ledger.network.channel}, "
            f"chaincode {ledger.network.chaincode}); Fabric network on ports {args.port}-{args.port + 9}",
            flush=True,
        )
        while (dead := ledger.dead()) is None:
            time.sleep(_WATCH_SECONDS)
    except Stopped as stop:
        print(f"ledger: {stop}: stopping", flush=True)
        return 0
    except servers.ServerError as error:
        print(f"ledger: cannot start: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the stop short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ledger.stop()
        print("ledger: stopped", flush=True)
    print(f"ledger: {dead.name} exited; stopped the rest\n{dead.log_tail()}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
