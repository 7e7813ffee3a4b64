"""Metrics summed over worker processes (docs/adr/0021): each case that needs a fresh
prometheus_client runs in a child Python, as `lucerna up` does."""

from __future__ import annotations

import inspect
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.multiprocess import MultiProcessCollector

from lucerna.core import worker_metrics
from lucerna.core.service import discover

# A supervisor of two workers over shared metric files, as `lucerna up` sets them up: worker i
# counts i + 1 requests and holds 10 jobs; it writes "<i>.started" and waits to be stopped.
SUPERVISOR = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from lucerna.core import worker_metrics
    from lucerna.core.workers import supervise

    folder = Path(sys.argv[1])
    with worker_metrics.shared_across_workers() as directory:
        (folder / "directory").write_text(f"{directory} {oct(directory.stat().st_mode & 0o777)}")
        from prometheus_client import Counter, Gauge

        requests = Counter("t_requests_total", "requests", ["route"])
        jobs = Gauge("t_jobs", "jobs held", multiprocess_mode="livesum")
        ready = Gauge("t_ready", "1 when ready", multiprocess_mode="livemin")
        ready.set(0)  # the supervisor's own value: discarded, it must not pull the minimum down

        def run(index: int) -> None:
            requests.labels("/x").inc(index + 1)
            jobs.set(10)
            ready.set(1)
            (folder / f"{index}.started").touch()
            while True:
                time.sleep(0.05)

        worker_metrics.discard_own_files()
        sys.exit(supervise(2, run, on_exit=worker_metrics.worker_exited))
    """
)


def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def samples(directory: Path) -> dict[str, float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))
    return {sample.name: sample.value for metric in registry.collect() for sample in metric.samples}


def test_workers_are_counted_together_and_the_directory_is_private_and_removed(tmp_path: Path) -> None:
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)])
    try:
        wait_for(lambda: len(list(tmp_path.glob("*.started"))) == 2)
        directory, mode = (tmp_path / "directory").read_text().split()
        assert mode == "0o700"
        assert samples(Path(directory)) == {"t_requests_total": 3.0, "t_jobs": 20.0, "t_ready": 1.0}
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(10) == 0
        assert not Path(directory).exists()
    finally:
        supervisor.kill()
        supervisor.wait()


def test_a_reaped_worker_leaves_the_live_gauges_and_stays_in_the_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(worker_metrics.DIRECTORY_VARIABLE, str(tmp_path))
    for name in ("counter_41.db", "histogram_41.db", "gauge_livesum_41.db", "gauge_livemin_41.db"):
        (tmp_path / name).write_bytes(b"")
    worker_metrics.worker_exited(41)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_41.db", "histogram_41.db"]


def test_it_refuses_once_prometheus_client_is_imported_and_the_cli_does_not_import_it() -> None:
    with pytest.raises(RuntimeError, match="imported before"), worker_metrics.shared_across_workers():
        pass  # this test process imported prometheus_client already
    check = "import sys, lucerna.core.cli; assert 'prometheus_client' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, check=False).returncode == 0


def test_one_process_serves_its_own_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(worker_metrics.DIRECTORY_VARIABLE, raising=False)
    assert "python_info" in worker_metrics.exposition().decode()  # the default registry's


def test_every_gauge_says_how_workers_combine() -> None:
    """The default multiprocess mode ("all") would give one series per worker pid."""
    discover()  # imports every installed service, and so its metrics
    modes = {
        f"{module_name}.{name}": gauge._multiprocess_mode
        for module_name, module in list(sys.modules.items())
        if module_name.startswith("lucerna.")
        for name, gauge in inspect.getmembers(module, lambda value: isinstance(value, Gauge))
    }
    assert modes["lucerna.ingestion.metrics.ASSOCIATIONS"] == "livesum"
    assert [name for name, mode in modes.items() if mode == "all"] == []
