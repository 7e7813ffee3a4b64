"""The shipped models on the real local Triton: the manifest checks, and inference throughput."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from lucerna.core.model_manifest import Manifest, TensorSpec, load_repository
from lucerna.inference.triton import InferenceError, ModelMismatchError, TritonClient, TritonUnavailable
from tests.conftest import LocalTriton

REPOSITORY = Path(__file__).resolve().parents[3] / "infra" / "triton" / "models"


class Random:
    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.data = np.random.default_rng(0).integers(0, 256, (count, *shape), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, start: int, stop: int) -> np.ndarray:
        return self.data[start:stop]


@pytest.fixture
async def client(triton: LocalTriton) -> AsyncIterator[TritonClient]:
    client = TritonClient(triton.grpc_url, concurrency=4)
    yield client
    await client.close()


def manifests() -> dict[str, Manifest]:
    found = load_repository(REPOSITORY)
    assert {"lung-nodule-detector", "lung-nodule-detector-int8", "head-ct-hemorrhage"} <= set(found)
    return found


async def test_every_shipped_model_matches_its_manifest(client: TritonClient) -> None:
    for manifest in manifests().values():
        await client.check_model(manifest)
        assert await client.ready(manifest)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            {"inputs": (TensorSpec(name="image", datatype="UINT8", shape=(3, 256, 256)),)},
            "input 'image' has shape [3, 512, 512] (without the batch dimension),"
            " the manifest says [3, 256, 256]",
        ),
        (
            {"inputs": (TensorSpec(name="image", datatype="FP32", shape=(3, 512, 512)),)},
            "input 'image' is UINT8, the manifest says FP32",
        ),
        (
            {"outputs": (TensorSpec(name="boxes", datatype="FP32", shape=(100, 5)),)},
            "output 'boxes' is missing (Triton has ['detections'])",
        ),
        ({"max_batch_size": 64}, "Triton's max_batch_size 16 is below the manifest's 64"),
        ({"version": "2"}, "Triton does not serve it"),
    ],
)
async def test_a_manifest_unlike_the_served_model_is_refused(
    client: TritonClient, change: dict[str, object], problem: str
) -> None:
    manifest = manifests()["lung-nodule-detector"].model_copy(update=change)
    with pytest.raises(ModelMismatchError) as refused:
        await client.check_model(manifest)
    assert problem in str(refused.value)
    assert "lung-nodule-detector" in str(refused.value)


async def test_an_unreachable_triton_is_unavailable_not_a_mismatch() -> None:
    client = TritonClient("127.0.0.1:9", request_timeout=5.0)
    manifest = manifests()["head-ct-hemorrhage"]
    try:
        assert not await client.ready(manifest)
        with pytest.raises(TritonUnavailable):
            await client.check_model(manifest)
        with pytest.raises(TritonUnavailable):
            await client.infer(manifest, Random(2, (1, 256, 256)))
    finally:
        await client.close()


async def test_100_slices_through_the_detector(client: TritonClient) -> None:
    manifest = manifests()["lung-nodule-detector"]
    inputs = Random(100, (3, 512, 512))
    await client.infer(manifest, Random(1, (3, 512, 512)))  # warm up the session
    started = time.perf_counter()
    outputs = await client.infer(manifest, inputs)
    seconds = time.perf_counter() - started
    assert outputs.shape == (100, 100, 5)
    assert outputs.dtype == np.float32
    # Same inputs one by one give the same outputs: batching and ordering keep every slice's result.
    first = Random(0, (3, 512, 512))
    first.data = inputs.data[:3]
    single = await client.infer(manifest, first)
    np.testing.assert_allclose(single, outputs[:3], rtol=1e-4, atol=1e-4)
    print(
        f"\n100 slices 3x512x512 through lung-nodule-detector: {seconds:.2f} s ({100 / seconds:.1f} slices/s)"
    )


async def test_inputs_in_shared_memory_give_the_same_outputs_and_survive_a_triton_restart(
    triton: LocalTriton, client: TritonClient
) -> None:
    manifest = manifests()["lung-nodule-detector-int8"]
    inputs = Random(20, manifest.inputs[0].shape)  # a batch of 16 and one of 4: two region sizes
    shared = TritonClient(triton.grpc_url, concurrency=2, shared_memory_token=triton.access_token)
    try:
        assert shared.uses_shared_memory
        expected = await client.infer(manifest, inputs)
        np.testing.assert_allclose(await shared.infer(manifest, inputs), expected, rtol=1e-5, atol=1e-5)
        # A restarted Triton has forgotten the regions: they are registered again, nothing fails.
        await asyncio.to_thread(triton.stop)
        await asyncio.to_thread(triton.start)
        np.testing.assert_allclose(await shared.infer(manifest, inputs), expected, rtol=1e-5, atol=1e-5)
    finally:
        await shared.close()


async def test_shared_memory_needs_the_servers_token(triton: LocalTriton) -> None:
    manifest = manifests()["lung-nodule-detector-int8"]
    wrong = TritonClient(triton.grpc_url, shared_memory_token="not-the-token")
    try:
        # Refused, and not taken for Triton being away (the worker would wait for ever).
        with pytest.raises(InferenceError, match="restricted"):
            await wrong.infer(manifest, Random(1, manifest.inputs[0].shape))
    finally:
        await wrong.close()
