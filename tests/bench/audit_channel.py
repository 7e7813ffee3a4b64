"""Appends/s through the audit append API over the post-quantum channel (ADR 0017).

Usage: uv run python -m tests.bench.audit_channel [--seconds 20] [--clients 4] [--producers 256]

``--clients`` channel clients, each in a process of its own with one gRPC session (as the platform's
services hold) and ``--producers`` concurrent appends in flight, into the audit service's append path
as it runs in this process: the gRPC server, the group commit into the SQLite log (``synchronous=FULL``)
and the checkpointer signing every 1,000 entries or second. Clients and server share this machine's
cores, so the figure includes both ends' AES-GCM, protobuf and gRPC work; ``appends_per_frame`` is how
many appends the clients' batches carried on average. Beside it, the same records appended in this
process straight to the append path (no channel) in the same run, and the cost of a handshake (both
sides).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from lucerna.audit.appender import GroupAppender
from lucerna.audit.grpc_api import AppendApi, AppendSessions
from lucerna.audit.keys import Keyring
from lucerna.audit.log import Appended, LogEntry, SqliteAuditLog
from lucerna.audit.service import Checkpointer
from lucerna.core.audit_channel import AuditChannelClient
from lucerna.core.pqchannel import Identity, Initiator, Responder
from lucerna.events.v1 import events_pb2
from tests.bench.audit import ORIGIN, TARGET_APPENDS, record


async def _appending(folder: Path, name: str, args: argparse.Namespace, *, channel: bool) -> dict[str, Any]:
    audit_log = SqliteAuditLog(folder / f"{name}.sqlite")
    await audit_log.start()
    checkpointer = Checkpointer(audit_log, Keyring(folder / "keys", ORIGIN), ORIGIN, every=1000, interval=1.0)
    appender: GroupAppender[LogEntry, Appended] = GroupAppender(audit_log.append)

    async def submit(key: str, message: events_pb2.AuditRecord) -> Appended:
        appended = await appender.append(LogEntry(key, message.SerializeToString(deterministic=True)))
        checkpointer.counted([appended])
        return appended

    server = Identity.generate("bench/audit")
    identities = [Identity.generate(f"bench/service-{n}") for n in range(args.clients)]
    sessions = AppendSessions(
        server, {i.name: i.public_key for i in identities}, submit, max_in_flight=args.producers
    )
    api = AppendApi("127.0.0.1:0", sessions, max_message_bytes=64 * 1024)
    await api.start()
    stopping = asyncio.Event()
    checkpointing = asyncio.create_task(checkpointer.run(stopping))
    figures: dict[str, Any] = {}
    if not channel:
        began = time.perf_counter()
        total = await _produce(None, 0, args.seconds, args.clients * args.producers, submit)
        rate = total / (time.perf_counter() - began)
    else:
        # Each client in a process of its own, as the platform's services are.
        with ProcessPoolExecutor(args.clients, mp_context=multiprocessing.get_context("spawn")) as pool:
            loop = asyncio.get_running_loop()
            jobs = [
                loop.run_in_executor(
                    pool,
                    _client_process,
                    f"127.0.0.1:{api.port}",
                    identity,
                    server,
                    n,
                    args.seconds,
                    args.producers,
                )
                for n, identity in enumerate(identities)
            ]
            clients = await asyncio.gather(*jobs)
            rate = sum(client_rate for client_rate, _, _ in clients)
            appends, frames = sum(c[1] for c in clients), sum(c[2] for c in clients)
            figures["appends_per_frame"] = round(appends / frames, 1)
    stopping.set()
    await checkpointing
    await api.stop()
    entries, checkpoints = await audit_log.size(), len(await audit_log.checkpoints(limit=1000))
    await audit_log.close()
    return {"appends_per_s": round(rate), **figures, "entries": entries, "checkpoints": checkpoints}


def _client_process(
    target: str, identity: Identity, server: Identity, n: int, seconds: float, producers: int
) -> tuple[float, int, int]:
    """Appends/s of one client process, timed from its first append after the handshake; the appends
    and the frames that carried them."""

    async def run() -> tuple[float, int, int]:
        client = AuditChannelClient(target, identity, {server.name: server.public_key}, server.name)
        await client.append(f"warm-up:{n}", events_pb2.AuditRecord.FromString(record(0)))  # the handshake
        try:
            began, frames_before = time.perf_counter(), client.records_sent
            done = await _produce(client, n, seconds, producers, None)
            return done / (time.perf_counter() - began), done, client.records_sent - frames_before
        finally:
            await client.close()

    return asyncio.run(run())


async def _produce(
    client: AuditChannelClient | None, n: int, seconds: float, producers: int, submit: Any
) -> int:
    deadline = time.perf_counter() + seconds
    counter = iter(range(n * 10**9, (n + 1) * 10**9))

    async def one() -> int:
        done = 0
        while time.perf_counter() < deadline:
            i = next(counter)
            message = events_pb2.AuditRecord.FromString(record(i))
            if client is not None:
                await client.append(f"instance-stored:{i}", message)
            else:
                await submit(f"instance-stored:{i}", message)
            done += 1
        return done

    return sum(await asyncio.gather(*(one() for _ in range(producers))))


def handshake_ms(rounds: int = 50) -> dict[str, float]:
    """CPU time of one full handshake, both sides, in this process."""
    server, client = Identity.generate("bench/audit"), Identity.generate("bench/service")
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        initiator = Initiator(client, {server.name: server.public_key}, server.name)
        responder = Responder(server, {client.name: client.public_key})
        message3, _ = initiator.finish(responder.respond(initiator.start()))
        responder.finish(message3)
        times.append((time.perf_counter() - began) * 1000)
    return {"handshake_ms_p50": round(statistics.median(times), 2)}


def main() -> int:
    """Run and print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--producers", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lucerna-bench-audit-channel-") as tmp:
        folder = Path(tmp)
        over = asyncio.run(_appending(folder, "channel", args, channel=True))
        direct = asyncio.run(_appending(folder, "direct", args, channel=False))
    results = {
        "over_channel": over,
        "direct_same_run": direct,
        **handshake_ms(),
        "target_appends_per_s": TARGET_APPENDS,
        "settings": vars(args),
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
