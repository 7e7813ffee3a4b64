"""The Triton client: one gRPC connection (``tritonclient.grpc.aio``), model checks and batched inference.

At start-up ``check_model`` compares what Triton serves (model metadata and config: tensor names,
datatypes, shapes, max_batch_size, the version being ready) with the manifest and refuses a
mismatch with a precise error: a worker that fed a model the wrong tensors would produce wrong
findings, not errors. ``infer`` sends a series in requests of at most the batch size, several in
flight at once (Triton's dynamic batcher merges them), as compact UINT8 tensors.

Where the worker and Triton share a host (the local Triton), inputs can travel in system shared
memory instead of the gRPC message (``shared_memory_token``: the token of Triton's restricted
shared-memory protocol): a pool of regions, one per request in flight, registered once and written
in place. On this machine (2 cores shared by client, server and model) that brings Triton's cost
over onnxruntime called directly from about 42 % to 13-24 % for 100 slices of 3x512x512
(``tests/bench/inference.py``). Triton forgets registrations when it restarts;
a request that finds its region unknown registers it again and is sent once more.

Triton being unreachable, shutting down, or not (yet) serving the model raises ``TritonUnavailable``:
transient, the worker waits for Triton rather than retrying the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import InferInput, InferRequestedOutput  # type: ignore[import-untyped]
from tritonclient.grpc.aio import InferenceServerClient  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]
from tritonclient.utils import shared_memory as system_shm

from lucerna.core.model_manifest import Manifest, TensorSpec
from lucerna.inference import metrics

Array = npt.NDArray[Any]

_DATATYPES = {"UINT8": np.uint8, "INT16": np.int16, "FP16": np.float16, "FP32": np.float32}
# gRPC status codes after which Triton is taken to be away rather than the request to be wrong.
_AWAY = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
# Messages of a server that is up but does not serve the model (yet): loading, unloading, restarting.
_NOT_SERVING = ("unknown model", "is not ready", "not found", "unavailable")


class TritonUnavailable(Exception):  # noqa: N818 - the name the inference contract uses
    """Triton cannot be reached or does not serve the model now; transient."""


class ModelMismatchError(Exception):
    """What Triton serves differs from the model's manifest; the message says how."""


class InferenceError(Exception):
    """Triton refused a request for another reason than being unavailable."""


class Batches(Protocol):
    """Model inputs built on demand, ``batch(start, stop)`` giving ``(stop - start, *input shape)``."""

    def __len__(self) -> int: ...

    def batch(self, start: int, stop: int) -> Array: ...


class InferenceBackend(Protocol):
    """What the worker needs of Triton (a fake in unit tests)."""

    async def ready(self, manifest: Manifest) -> bool:
        """Whether Triton answers and serves the manifest's model version."""
        ...

    async def infer(self, manifest: Manifest, inputs: Batches) -> Array:
        """The model's output for every input, in order; ``TritonUnavailable`` when Triton is away."""
        ...


def _unavailable(error: InferenceServerException) -> bool:
    message = (error.message() or "").lower()
    if "restricted" in message:  # a refused access token comes as UNAVAILABLE: a misconfiguration
        return False
    return error.status() in _AWAY or any(text in message for text in _NOT_SERVING)


def _tensor_problems(
    kind: str, wanted: Sequence[TensorSpec], served: Sequence[Any], batched: bool
) -> list[str]:
    """How Triton's tensors (model metadata) differ from the manifest's."""
    problems = []
    by_name = {tensor.name: tensor for tensor in served}
    for spec in wanted:
        tensor = by_name.get(spec.name)
        if tensor is None:
            problems.append(f"{kind} {spec.name!r} is missing (Triton has {sorted(by_name)})")
            continue
        shape = tuple(int(d) for d in tensor.shape)[1 if batched else 0 :]
        if tensor.datatype != spec.datatype:
            problems.append(f"{kind} {spec.name!r} is {tensor.datatype}, the manifest says {spec.datatype}")
        if shape != spec.shape:
            problems.append(
                f"{kind} {spec.name!r} has shape {list(shape)} (without the batch dimension), "
                f"the manifest says {list(spec.shape)}"
            )
    extra = sorted(set(by_name) - {spec.name for spec in wanted})
    if kind == "input" and extra:
        problems.append(f"Triton's model also requires inputs {extra}")
    return problems


ACCESS_HEADER = "triton-grpc-protocol-triton-access-token"  # Triton's restricted-protocol header
_REGION_UNKNOWN = "shared memory region"


@dataclass
class _Region:
    name: str
    handle: Any = None
    size: int = 0
    registered: bool = False


class SharedMemoryInputs:
    """System shared-memory regions for request inputs, one per request in flight, created on first
    use (large enough for the biggest batch seen) and registered with Triton."""

    def __init__(self, client: InferenceServerClient, token: str, regions: int) -> None:
        self._client = client
        self._headers = {ACCESS_HEADER: token}
        prefix = f"lucerna-{os.getpid()}-{secrets.token_hex(4)}"
        self._all = [_Region(f"{prefix}-{index}") for index in range(regions)]
        self._free: asyncio.LifoQueue[_Region] = asyncio.LifoQueue()
        for region in self._all:
            self._free.put_nowait(region)

    @contextlib.asynccontextmanager
    async def holding(self, data: Array) -> AsyncIterator[_Region]:
        """A registered region holding ``data``, for the time of one request."""
        region = await self._free.get()
        try:
            if region.size < data.nbytes:
                await self._release(region)
                region.handle = system_shm.create_shared_memory_region(
                    region.name, f"/{region.name}", data.nbytes
                )
                region.size = data.nbytes
            if not region.registered:
                await self._client.register_system_shared_memory(
                    region.name, f"/{region.name}", region.size, headers=self._headers
                )
                region.registered = True
            system_shm.set_shared_memory_region(region.handle, [np.ascontiguousarray(data)])
            yield region
        finally:
            self._free.put_nowait(region)

    def forget_registrations(self) -> None:
        """Triton restarted (it lost every registration): register again on next use."""
        for region in self._all:
            region.registered = False

    async def close(self) -> None:
        """Unregister and remove every region."""
        for region in self._all:
            await self._release(region)

    async def _release(self, region: _Region) -> None:
        if region.registered:
            with contextlib.suppress(InferenceServerException):
                await self._client.unregister_system_shared_memory(region.name, headers=self._headers)
            region.registered = False
        if region.handle is not None:
            system_shm.destroy_shared_memory_region(region.handle)
            region.handle, region.size = None, 0


class TritonClient:
    """``InferenceBackend`` over Triton's gRPC API, one connection reused by every call; inputs in
    system shared memory when ``shared_memory_token`` is given (Triton on the same host)."""

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 4,
        batch_size: int = 0,
        request_timeout: float = 60.0,
        shared_memory_token: str | None = None,
        shared_memory_regions: int = 8,
    ) -> None:
        self.url = url
        self._client = InferenceServerClient(url)
        self._concurrency = concurrency
        self._batch_size = batch_size
        self._request_timeout = request_timeout
        self._shared = (
            SharedMemoryInputs(self._client, shared_memory_token, max(shared_memory_regions, concurrency))
            if shared_memory_token
            else None
        )

    @property
    def uses_shared_memory(self) -> bool:
        """Whether inputs travel in system shared memory."""
        return self._shared is not None

    async def close(self) -> None:
        """Release the shared-memory regions, close the connection."""
        if self._shared is not None:
            with contextlib.suppress(InferenceServerException):
                await self._shared.close()
        await self._client.close()

    async def server_ready(self) -> bool:
        """Whether Triton answers as ready."""
        try:
            return bool(await self._client.is_server_ready(client_timeout=5.0))
        except InferenceServerException:
            return False

    async def ready(self, manifest: Manifest) -> bool:
        """Whether Triton answers and serves the manifest's model version."""
        try:
            return bool(
                await self._client.is_model_ready(manifest.name, manifest.version, client_timeout=5.0)
            )
        except InferenceServerException:
            return False

    async def check_model(self, manifest: Manifest) -> None:
        """Raise ``ModelMismatchError`` unless Triton serves the manifest's model as described;
        ``TritonUnavailable`` when Triton cannot be asked."""
        name, version = manifest.name, manifest.version
        try:
            metadata = await self._client.get_model_metadata(name, version, client_timeout=10.0)
            config = (await self._client.get_model_config(name, version, client_timeout=10.0)).config
            ready = await self._client.is_model_ready(name, version, client_timeout=10.0)
        except InferenceServerException as error:
            if error.status() in _AWAY:
                raise TritonUnavailable(f"Triton at {self.url} is unavailable: {error.message()}") from error
            raise ModelMismatchError(
                f"model {name} version {version}: Triton does not serve it: {error.message()}"
            ) from error
        problems = []
        if version not in metadata.versions:
            problems.append(f"Triton serves versions {list(metadata.versions)}, the manifest says {version}")
        if not ready:
            problems.append(f"version {version} is not ready")
        if config.max_batch_size < manifest.max_batch_size:
            problems.append(
                f"Triton's max_batch_size {config.max_batch_size} is below"
                f" the manifest's {manifest.max_batch_size}"
            )
        batched = config.max_batch_size > 0
        problems += _tensor_problems("input", manifest.inputs, metadata.inputs, batched)
        problems += _tensor_problems("output", manifest.outputs, metadata.outputs, batched)
        if problems:
            raise ModelMismatchError(
                f"model {name} version {version} on Triton {self.url}: " + "; ".join(problems)
            )

    async def infer(self, manifest: Manifest, inputs: Batches) -> Array:
        """The output for every input, in requests of at most the batch size, several in flight."""
        size = min(self._batch_size or manifest.max_batch_size, manifest.max_batch_size)
        spans = [(start, min(start + size, len(inputs))) for start in range(0, len(inputs), size)]
        slots = asyncio.Semaphore(self._concurrency)

        async def one(start: int, stop: int) -> Array:
            async with slots:
                return await self._request(manifest, inputs.batch(start, stop))

        parts = await asyncio.gather(*(one(start, stop) for start, stop in spans))
        output = manifest.outputs[0]
        if not parts:
            return np.zeros((0, *output.shape), dtype=_DATATYPES[output.datatype])
        return np.concatenate(parts)

    async def _request(self, manifest: Manifest, batch: Array) -> Array:
        spec = manifest.inputs[0]
        batch = np.ascontiguousarray(batch, dtype=_DATATYPES[spec.datatype])
        started = time.perf_counter()
        try:
            if self._shared is None:
                tensor = InferInput(spec.name, list(batch.shape), spec.datatype)
                tensor.set_data_from_numpy(batch)
                result = await self._infer(manifest, tensor)
            else:
                result = await self._infer_shared(manifest, batch)
        except InferenceServerException as error:
            metrics.TRITON_ERRORS.labels(manifest.name, error.status() or "unknown").inc()
            if _unavailable(error):
                raise TritonUnavailable(
                    f"Triton at {self.url} cannot run {manifest.name}: {error.message()}"
                ) from error
            raise InferenceError(
                f"Triton refused a request for {manifest.name}: {error.message()}"
            ) from error
        metrics.TRITON_LATENCY.labels(manifest.name).observe(time.perf_counter() - started)
        output = manifest.outputs[0]
        values = result.as_numpy(output.name)
        if values is None or values.shape != (batch.shape[0], *output.shape):
            raise InferenceError(
                f"{manifest.name} returned {output.name} of shape "
                f"{None if values is None else list(values.shape)} for a batch of {batch.shape[0]}"
            )
        return np.asarray(values)

    async def _infer(self, manifest: Manifest, tensor: InferInput) -> Any:
        return await self._client.infer(
            manifest.name,
            [tensor],
            model_version=manifest.version,
            outputs=[InferRequestedOutput(manifest.outputs[0].name)],
            client_timeout=self._request_timeout,
        )

    async def _infer_shared(self, manifest: Manifest, batch: Array) -> Any:
        assert self._shared is not None
        spec = manifest.inputs[0]
        for attempt in (1, 2):
            async with self._shared.holding(batch) as region:
                tensor = InferInput(spec.name, list(batch.shape), spec.datatype)
                tensor.set_shared_memory(region.name, batch.nbytes)
                try:
                    return await self._infer(manifest, tensor)
                except InferenceServerException as error:
                    if attempt == 2 or _REGION_UNKNOWN not in (error.message() or "").lower():
                        raise
                    self._shared.forget_registrations()  # Triton restarted since they were made
        raise AssertionError("unreachable")
