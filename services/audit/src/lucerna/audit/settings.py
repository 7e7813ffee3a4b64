"""Audit service settings from ``LUCERNA_AUDIT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AuditSettings(BaseSettings):
    """The log's origin, its signing keys, and how often checkpoints are signed."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_AUDIT_", extra="ignore")

    # The log's name in its checkpoints (C2SP tlog-checkpoint origin): a schema-less URL.
    origin: str = "lucerna.local/audit-log"
    # Where the ML-DSA-65 signing keys live (default: <LUCERNA_DATA_DIR>/audit-keys); private keys 0600.
    key_dir: Path | None = None
    # A checkpoint is signed once this many entries arrived since the last one, or after the interval.
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_interval_ms: int = Field(default=1000, ge=10)
    # Records appended per transaction at most (they arrive in bursts).
    prefetch: int = Field(default=256, ge=1)
