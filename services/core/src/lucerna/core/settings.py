"""Platform settings from ``LUCERNA_*`` environment variables; production mode refuses unsafe defaults."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_JWT_SECRET = "lucerna-local-development-secret-change-me"  # noqa: S105 - the default production refuses
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """The CPUs this process may run on, at most ``MAX_DEFAULT_WORKERS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


class CoreSettings(BaseSettings):
    """What every service reads: where the stores, the bus and the HTTP listener are."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_", extra="ignore")

    mode: Literal["local", "production"] = "local"
    log_level: str = "INFO"

    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Processes serving the same services on the same ports (docs/adr/0005); 1: one process, no supervisor.
    workers: int = Field(default_factory=default_workers, ge=1)
    data_dir: Path = Path("var")

    metadata_backend: Literal["sqlite", "mongodb"] = "sqlite"
    mongodb_url: SecretStr = SecretStr("mongodb://127.0.0.1:27017")
    mongodb_database: str = "lucerna"

    search_backend: Literal["sqlite", "elasticsearch"] = "sqlite"
    elasticsearch_url: SecretStr = SecretStr("http://127.0.0.1:9200")
    elasticsearch_index: str = "lucerna-studies"

    bus_backend: Literal["inprocess", "rabbitmq"] = "inprocess"
    rabbitmq_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    # In-process bus: messages a queue holds for a consumer before it drops the oldest.
    bus_max_held_messages: int = Field(default=10_000, ge=1)

    blob_dir: Path | None = None  # default: <data_dir>/blobs

    # Auth: None means "required unless local mode on a loopback address" (see docs/adr/0003).
    auth_required: bool | None = None
    jwt_secret: SecretStr = SecretStr(DEV_JWT_SECRET)  # HS256 shared secret
    jwt_public_key_file: Path | None = None  # RS256/ES256 public key (PEM); preferred in production
    jwt_issuer: str | None = None
    jwt_audience: str | None = None

    @property
    def blobs_path(self) -> Path:
        """Where instance bytes are stored."""
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def auth_enforced(self) -> bool:
        """Whether HTTP endpoints demand a bearer token."""
        if self.auth_required is not None:
            return self.auth_required
        return not (self.mode == "local" and _is_loopback(self.http_host))

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> CoreSettings:
        if self.mode != "production":
            return self
        problems = []
        if not self.auth_enforced:
            problems.append("LUCERNA_AUTH_REQUIRED must not be false")
        if self.jwt_public_key_file is None and self.jwt_secret.get_secret_value() == DEV_JWT_SECRET:
            problems.append("set LUCERNA_JWT_PUBLIC_KEY_FILE or a non-default LUCERNA_JWT_SECRET")
        if self.bus_backend == "rabbitmq" and "guest:guest@" in self.rabbitmq_url.get_secret_value():
            problems.append("LUCERNA_RABBITMQ_URL uses the default guest credentials")
        if problems:
            raise ValueError("refusing to start in production mode: " + "; ".join(problems))
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
