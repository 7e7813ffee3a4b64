"""Audit service settings from ``LUCERNA_AUDIT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class AuditSettings(BaseSettings):
    """The log's origin, its signing keys, and how often checkpoints are signed."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_AUDIT_", extra="ignore")

    # The log's name in its checkpoints (C2SP tlog-checkpoint origin): a schema-less URL.
    origin: str = "lucerna.local/audit-log"
    # Where the ML-DSA-65 signing keys and the PHI at-rest keys live (default:
    # <LUCERNA_DATA_DIR>/audit-keys); private keys 0600. `lucerna audit-keys` lists and rotates them.
    key_dir: Path | None = None
    # A checkpoint is signed once this many entries arrived since the last one, or after the interval.
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_interval_ms: int = Field(default=1000, ge=10)
    # Records appended per transaction at most (they arrive in bursts).
    prefetch: int = Field(default=256, ge=1)
    # The anchor service (host:port, gRPC) that puts checkpoints on the Fabric ledger; unset: no
    # anchoring. Its bearer token, when it asks for one (never logged).
    anchor_target: str | None = None
    anchor_token: SecretStr | None = None
    # A local Fabric network and anchor service (infra/local/ledger.py), started by `lucerna up` /
    # `lucerna serve audit` as this service's companion and kept in <LUCERNA_DATA_DIR>/ledger; the
    # anchor target and token then point at it. Unset: on in local mode when Fabric and Go are
    # installed and no anchor target is set, off otherwise; true: on, or refuse to start saying why.
    local_ledger: bool | None = None
    # The first of its 11 loopback ports: the Fabric network's 10, then the anchor service's.
    local_ledger_port: int = Field(default=19050, ge=1024, le=65535 - 10)
    # The append API over the post-quantum channel (gRPC, ADR 0017), e.g. "127.0.0.1:8097"; unset: off.
    grpc_listen: str | None = None
    # This service's channel identity (ML-DSA-65 key pair, JSON, mode 0600) and the clients it trusts
    # (JSON: name -> base64 public key). Unset in local mode: both from <LUCERNA_DATA_DIR>/audit-channel,
    # created there; production mode needs both files.
    grpc_identity_file: Path | None = None
    grpc_trust_file: Path | None = None
    # Largest gRPC message either way (a record is a few hundred bytes; a handshake message ~3.5 KiB).
    grpc_max_message_bytes: int = Field(default=64 * 1024, ge=8 * 1024)
    # Appends one session may have in flight before the server stops reading its stream.
    grpc_max_in_flight: int = Field(default=256, ge=1)

    def key_directory(self, data_dir: Path) -> Path:
        """The signing and PHI at-rest keys' directory: ``key_dir``, else ``<data_dir>/audit-keys``."""
        return self.key_dir or data_dir / "audit-keys"
