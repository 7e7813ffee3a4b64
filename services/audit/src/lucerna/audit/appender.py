"""Group commit: many concurrent appends become one durable transaction.

Every audit record arrives as its own message, and an append is acknowledged only once it is durable
(``synchronous=FULL``: one fsync per transaction). One transaction per record would cap the log at
a few hundred records a second; so each caller waits on a shared batch: the first caller of a batch
starts a flush, the others join it, and all are answered when the one transaction commits. Order is
kept: batches are flushed one after the other, entries in arrival order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

E = TypeVar("E")
R = TypeVar("R")


class GroupAppender(Generic[E, R]):
    """Appends entries through ``append_many`` in batches of at most ``max_batch``."""

    def __init__(
        self, append_many: Callable[[Sequence[E]], Awaitable[Sequence[R]]], max_batch: int = 1024
    ) -> None:
        self._append_many = append_many
        self._max_batch = max_batch
        self._pending: list[tuple[E, asyncio.Future[R]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def append(self, entry: E) -> R:
        """Append ``entry`` with whatever else is waiting; its result once the batch is durable."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, done))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await done

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let the callers already scheduled join this batch
        while self._pending:
            batch, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            try:
                results = await self._append_many([entry for entry, _ in batch])
            except Exception as error:  # noqa: BLE001 - handed to every caller of the batch, which retries its message
                for _, done in batch:
                    if not done.done():
                        done.set_exception(error)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)
