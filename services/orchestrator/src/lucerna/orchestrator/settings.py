"""Orchestrator settings from ``LUCERNA_ORCHESTRATOR_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_RULES = Path(__file__).resolve().parent / "default_rules.yaml"


class OrchestratorSettings(BaseSettings):
    """Workflow rules, the model repository, job timeouts and attempts, and the sweeper."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_ORCHESTRATOR_", extra="ignore")

    # Which models run on which studies (docs/workflow-rules.md); default: the rules shipped here.
    rules_file: Path = DEFAULT_RULES
    # The Triton model repository whose manifests (lucerna.yaml) give each model's version.
    model_repository: Path = Path("infra/triton/models")
    # A job running longer than this (from the worker taking it) is re-queued as a new attempt.
    job_timeout_seconds: float = Field(default=300.0, gt=0)
    # Attempts a job gets before it is dead (timeouts count; an operator's retry adds one more).
    max_attempts: int = Field(default=3, ge=1)
    # A timed-out job waits about base * 2**(attempt - 1) seconds before its next attempt is queued.
    retry_backoff_seconds: float = Field(default=5.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=300.0, ge=0)
    # How often overdue jobs and unpublished requests are looked for.
    sweep_interval_seconds: float = Field(default=1.0, gt=0)
    # Events handled at once per consumed queue.
    prefetch: int = Field(default=16, ge=1)
