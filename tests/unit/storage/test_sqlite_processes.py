"""Several worker processes (docs/adr/0005) opening and writing one SQLite file at the same moment."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
from pathlib import Path

from lucerna.core.storage.sqlite import SqliteMetadataStore, SqliteSearchIndex

PROCESSES = 4


def open_at_once(path: Path, ready: multiprocessing.synchronize.Barrier) -> None:
    async def run() -> None:
        ready.wait()
        metadata = SqliteMetadataStore(path / "metadata.sqlite")
        search = SqliteSearchIndex(path / "search.sqlite")
        await metadata.start()
        await search.start()
        assert await metadata.ping()
        await search.close()
        await metadata.close()

    asyncio.run(run())


def test_processes_starting_together_on_a_new_file_all_start(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for attempt in range(10):  # a narrow race: without the retry, about one in twenty failed
        folder = tmp_path / str(attempt)
        folder.mkdir()
        ready = context.Barrier(PROCESSES)
        processes = [context.Process(target=open_at_once, args=(folder, ready)) for _ in range(PROCESSES)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(30)
        assert [p.exitcode for p in processes] == [0] * PROCESSES, f"attempt {attempt}"
