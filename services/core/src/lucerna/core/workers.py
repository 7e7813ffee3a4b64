"""Worker processes: N copies of a process's services sharing its ports (docs/adr/0005).

The supervisor (the process the user or Kubernetes started) forks the workers before it starts any
thread or event loop, forwards SIGTERM and SIGINT to them, and exits once they have: with 0 after a
requested shutdown, non-zero as soon as one worker dies unexpectedly (the others are stopped
first), so that the process manager restarts the whole set. Each worker binds its own listening
socket with ``SO_REUSEPORT`` and the kernel spreads new connections over the workers listening.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_SECONDS = 30.0  # after forwarding a stop signal, workers still running are killed
ORPHAN_CHECK_SECONDS = 1.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, not yet listening.

    The server listens on it once it is ready, so that the kernel sends a worker connections only
    after its startup has finished.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def claim_port(host: str, port: int) -> int:
    """Check that nothing listens on ``host:port`` (a port shared with ``SO_REUSEPORT`` counts);
    the port, or the free port the OS picked when ``port`` is 0. Raises ``OSError`` when taken."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        probe.bind(address)
        return int(probe.getsockname()[1])


def supervise(
    count: int, run: Callable[[int], None], on_exit: Callable[[int], None] | None = None
) -> int:
    """Run ``run(index)`` in ``count`` forked worker processes until they stop; the exit status.

    ``on_exit(pid)`` is called for each worker reaped (its metrics' bookkeeping, ADR 0021)."""
    context = multiprocessing.get_context("fork")
    workers: list[BaseProcess] = []
    stopping = False
    failed = 0

    def stop_all(signum: int = signal.SIGTERM) -> None:
        for worker in workers:
            if worker.exitcode is None and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.kill(worker.pid, signum)

    def on_signal(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d worker processes on %s", count, signal.Signals(signum).name)
        stopping = True
        stop_all()

    supervisor = os.getpid()
    # Blocked while forking: a signal lands after the workers exist, never in a half-made one.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    try:
        for index in range(count):
            process = context.Process(
                target=_worker_main, args=(run, index, supervisor), name=f"lucerna-worker-{index}"
            )
            process.start()
            workers.append(process)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        deadline: float | None = None  # set once stopping: when stragglers get killed
        while running := {w.sentinel: w for w in workers if w.exitcode is None}:
            if stopping and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_SECONDS
            # A bounded wait: a stop signal arriving meanwhile starts the grace period in time.
            timeout = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            done = wait(list(running), timeout)
            ready = [worker for sentinel, worker in running.items() if sentinel in done]
            if not ready and deadline is not None and time.monotonic() >= deadline:
                log.error(
                    "worker processes still running %.0f s after the stop signal; killing them",
                    STOP_GRACE_SECONDS,
                )
                stop_all(signal.SIGKILL)
                deadline = time.monotonic() + STOP_GRACE_SECONDS
            for worker in ready:
                worker.join()
                if on_exit is not None and worker.pid is not None:
                    on_exit(worker.pid)
                if not stopping:
                    log.error(
                        "worker %s (pid %s) exited unexpectedly with status %s; stopping the others",
                        worker.name,
                        worker.pid,
                        worker.exitcode,
                    )
                    failed = worker.exitcode if worker.exitcode and worker.exitcode > 0 else 1
                    stopping = True
                    stop_all()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        stop_all(signal.SIGKILL)
    return failed


def _worker_main(run: Callable[[int], None], index: int, supervisor: int) -> None:
    # Own process group: a terminal's Ctrl-C reaches the supervisor only, which stops each worker
    # once (a second SIGINT would make uvicorn skip the graceful shutdown).
    os.setpgid(0, 0)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    threading.Thread(target=_stop_when_orphaned, args=(supervisor,), name="orphan-watch", daemon=True).start()
    run(index)


def _stop_when_orphaned(supervisor: int) -> None:
    """Stop this worker gracefully if the supervisor is gone (killed without forwarding a signal),
    and for good if that has not ended it within the grace period: with nobody left to kill it, a
    worker stuck in its shutdown would otherwise go on consuming work it can no longer finish."""
    while os.getppid() == supervisor:
        time.sleep(ORPHAN_CHECK_SECONDS)
    log.warning("the supervisor (pid %d) is gone; stopping", supervisor)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)
    log.error("still running %.0f s after its supervisor died; exiting now", STOP_GRACE_SECONDS)
    os._exit(1)
