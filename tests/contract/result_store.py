"""The contract of the inference result store, run against every adapter.

A test module imports these tests (``from tests.contract.result_store import *``) and defines the
fixtures ``result_store`` and ``other_result_store``: two started ``ResultStore`` adapters on the
same, empty backing database.
"""

from __future__ import annotations

import asyncio

from lucerna.events.v1 import events_pb2
from lucerna.inference.results import ResultStore

__all__ = [
    "test_a_result_is_stored_once_per_job",
    "test_concurrent_inserts_of_one_job_keep_one_result",
    "test_get_returns_what_was_stored",
    "test_outbox_lists_unpublished_results_oldest_first_until_marked",
    "test_unknown_job_has_no_result",
]


def completed(job_id: str, probability: float = 0.9) -> events_pb2.InferenceCompleted:
    return events_pb2.InferenceCompleted(
        job_id=job_id,
        attempt=1,
        study_instance_uid="1.2.3",
        model="lung-nodule-detector",
        model_version="1",
        weights_sha256="ab" * 32,
        findings=[
            events_pb2.Finding(
                code="786838002",
                probability=probability,
                locations=[
                    events_pb2.ImageLocation(
                        sop_instance_uid="1.2.3.4", frame=1, x_min=1, y_min=2, x_max=3, y_max=4
                    )
                ],
            )
        ],
        result_id=job_id,
    )


async def test_unknown_job_has_no_result(result_store: ResultStore) -> None:
    assert await result_store.get("0" * 32) is None
    assert await result_store.ping()


async def test_get_returns_what_was_stored(result_store: ResultStore) -> None:
    message = completed("a" * 32)
    stored, created = await result_store.insert(message)
    assert created
    assert stored.completed == message
    assert not stored.completed_published
    again = await result_store.get("a" * 32)
    assert again is not None
    assert again.completed == message
    assert again.job_id == "a" * 32
    assert not again.completed_published
    assert abs((again.stored_at - stored.stored_at).total_seconds()) < 0.01


async def test_a_result_is_stored_once_per_job(result_store: ResultStore) -> None:
    first, created = await result_store.insert(completed("b" * 32, 0.9))
    second, created_again = await result_store.insert(completed("b" * 32, 0.1))
    assert created and not created_again
    assert second.completed.findings[0].probability == first.completed.findings[0].probability
    assert abs(second.completed.findings[0].probability - 0.9) < 1e-6


async def test_concurrent_inserts_of_one_job_keep_one_result(
    result_store: ResultStore, other_result_store: ResultStore
) -> None:
    outcomes = await asyncio.gather(
        *(
            store.insert(completed("c" * 32, p))
            for store, p in [(result_store, 0.6), (other_result_store, 0.7)] * 4
        )
    )
    assert sum(created for _, created in outcomes) == 1
    winners = {round(stored.completed.findings[0].probability, 3) for stored, _ in outcomes}
    assert len(winners) == 1


async def test_outbox_lists_unpublished_results_oldest_first_until_marked(result_store: ResultStore) -> None:
    for job in ("d", "e", "f"):
        await result_store.insert(completed(job * 32))
        await asyncio.sleep(0.01)
    assert [r.job_id for r in await result_store.unpublished()] == ["d" * 32, "e" * 32, "f" * 32]
    assert [r.job_id for r in await result_store.unpublished(limit=2)] == ["d" * 32, "e" * 32]
    await result_store.mark_published("e" * 32)
    assert [r.job_id for r in await result_store.unpublished()] == ["d" * 32, "f" * 32]
    marked = await result_store.get("e" * 32)
    assert marked is not None and marked.completed_published
    await result_store.mark_published("d" * 32)
    await result_store.mark_published("f" * 32)
    assert await result_store.unpublished() == []
