"""Inference settings from ``LUCERNA_INFERENCE_*`` environment variables."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class InferenceSettings(BaseSettings):
    """Where Triton and the models are, how much work runs at once, how Triton outages are waited out."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_INFERENCE_", extra="ignore")

    # Triton's gRPC endpoint (host:port, no scheme).
    triton_url: str = "127.0.0.1:8001"
    model_repository: Path = Path("infra/triton/models")
    # True: this service starts the local PyTriton server itself (``lucerna up``, tests); False in
    # Kubernetes, where NVIDIA's Triton container serves the same repository.
    triton_local: bool = True
    local_grpc_port: int = Field(default=8001, ge=1, le=65535)
    local_http_port: int = Field(default=8000, ge=1, le=65535)
    local_metrics_port: int = Field(default=8002, ge=1, le=65535)
    # onnxruntime threads per model inside the local server (0: onnxruntime's default).
    local_onnx_threads: int = Field(default=0, ge=0)
    # How long start-up waits for Triton before starting anyway, not ready, with the worker waiting.
    triton_start_timeout_seconds: float = Field(default=60.0, gt=0)
    # One Triton request's deadline; past it the request counts as Triton being unavailable.
    triton_request_timeout_seconds: float = Field(default=60.0, gt=0)

    # With the local Triton (same host): inputs in system shared memory instead of the gRPC message.
    triton_shared_memory: bool = True
    # Slices per Triton request, at most the model's max_batch_size (0: the model's).
    batch_size: int = Field(default=0, ge=0)
    # Triton requests in flight per job; Triton's dynamic batcher merges them.
    triton_concurrency: int = Field(default=4, ge=1)
    # Jobs processed at once by this process (decode, preprocess, infer, postprocess).
    processing_slots: int = Field(default=2, ge=1)
    # Unacknowledged deliveries held per queue; STAT gets its own so it never waits for routine credit.
    stat_prefetch: int = Field(default=4, ge=1)
    routine_prefetch: int = Field(default=8, ge=1)

    # While Triton is unavailable the job is held (not retried): back off from min to max between checks.
    triton_backoff_min_seconds: float = Field(default=0.5, gt=0)
    triton_backoff_max_seconds: float = Field(default=15.0, gt=0)

    # Models served and checked at start, comma-separated; empty: every model in the repository.
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Name of this worker in InferenceStarted (default: the host name).
    worker_name: str = Field(default_factory=socket.gethostname)
    # How often unpublished results (bus down when they were stored) are published again.
    outbox_interval_seconds: float = Field(default=5.0, gt=0)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("triton_url")
    @classmethod
    def _no_scheme(cls, value: str) -> str:
        if "://" in value or ":" not in value:
            raise ValueError(f"{value!r} is not host:port (Triton's gRPC endpoint, no scheme)")
        return value

    @model_validator(mode="after")
    def _backoff_ordered(self) -> InferenceSettings:
        if self.triton_backoff_max_seconds < self.triton_backoff_min_seconds:
            raise ValueError(
                "LUCERNA_INFERENCE_TRITON_BACKOFF_MAX_SECONDS must be at least "
                "LUCERNA_INFERENCE_TRITON_BACKOFF_MIN_SECONDS"
            )
        return self
