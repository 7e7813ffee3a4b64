"""Group commit: concurrent appends share transactions, keep their order, and fail together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from lucerna.audit.appender import GroupAppender

pytestmark = pytest.mark.unit


class Log:
    def __init__(self) -> None:
        self.entries: list[str] = []
        self.transactions = 0
        self.fail_next = False

    async def append_many(self, entries: Sequence[str]) -> list[int]:
        await asyncio.sleep(0.001)  # an fsync
        if self.fail_next:
            self.fail_next = False
            raise OSError("disk full")
        self.transactions += 1
        first = len(self.entries)
        self.entries.extend(entries)
        return list(range(first, first + len(entries)))


async def test_concurrent_appends_share_few_transactions_in_arrival_order() -> None:
    log = Log()
    appender = GroupAppender(log.append_many, max_batch=64)
    names = [f"record-{n}" for n in range(500)]
    seqs = await asyncio.gather(*(appender.append(name) for name in names))
    assert log.entries == names
    assert seqs == list(range(500))
    assert log.transactions <= 10


async def test_a_failed_transaction_fails_each_of_its_callers_and_the_next_batch_goes_on() -> None:
    log = Log()
    appender = GroupAppender(log.append_many)
    log.fail_next = True
    results = await asyncio.gather(*(appender.append(f"r{n}") for n in range(5)), return_exceptions=True)
    assert all(isinstance(result, OSError) for result in results)
    assert await appender.append("later") == 0
    assert log.entries == ["later"]
