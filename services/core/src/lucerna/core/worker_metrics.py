"""Prometheus metrics summed over the worker processes (docs/adr/0021).

Each worker counts in its own memory, and a scrape of the shared port reaches one worker at random.
In prometheus_client's multiprocess mode every process keeps its values in memory-mapped files of
one directory, and ``/metrics`` reads them all. prometheus_client picks the mode once, when it is
first imported (``prometheus_client.values.ValueClass``), so the supervisor names the directory
before anything imports it: this module imports prometheus_client only inside its functions, and
``lucerna.core.cli`` imports the HTTP app (and so the metrics) only after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client itself


@contextlib.contextmanager
def shared_across_workers() -> Iterator[Path]:
    """A fresh private directory (0700) for the workers' metric files, named in
    ``PROMETHEUS_MULTIPROC_DIR`` while the block runs; removed, and the variable restored, after.

    In the system temp directory (``TMPDIR``; tmpfs on most hosts, and a memory-mapped file on a
    network volume would be slow), unique per supervisor, so two supervisors sharing a data
    directory never mix or wipe each other's counts.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before the worker processes' metrics directory was set,"
            " so each worker would count apart; import it later (ADR 0021)"
        )
    previous = os.environ.get(DIRECTORY_VARIABLE)
    directory = Path(tempfile.mkdtemp(prefix="lucerna-metrics-"))  # empty, mode 0700
    os.environ[DIRECTORY_VARIABLE] = str(directory)
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(DIRECTORY_VARIABLE, None)
        else:
            os.environ[DIRECTORY_VARIABLE] = previous
        shutil.rmtree(directory, ignore_errors=True)


def discard_own_files() -> None:
    """Remove this process's metric files: the supervisor's, made when it imported the services
    before forking. It serves nothing, so they hold only zeros, which would pull a ``livemin``
    gauge down to 0 for as long as the supervisor lives. Anything it counted later would go to the
    unlinked files, unseen."""
    directory = os.environ.get(DIRECTORY_VARIABLE)
    if directory:
        for path in Path(directory).glob(f"*_{os.getpid()}.db"):
            path.unlink(missing_ok=True)


def worker_exited(pid: int) -> None:
    """Drop a reaped worker's live gauges; its counters and histograms stay in the sums."""
    directory = os.environ.get(DIRECTORY_VARIABLE)
    if directory:
        from prometheus_client import multiprocess  # noqa: PLC0415 - see the module's docstring

        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def exposition() -> bytes:
    """The text of ``/metrics``: every worker's metrics in multiprocess mode, else this process's
    own (one worker, or the app under test), with the process and GC collectors."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess  # noqa: PLC0415

    directory = os.environ.get(DIRECTORY_VARIABLE)
    if not directory:
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
