"""Ingestion settings from ``LUCERNA_INGESTION_*`` environment variables."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GIB = 1024**3


def _check_ae_title(value: str) -> str:
    # PS3.5 Table 6.2-1: AE is 1-16 characters of the default repertoire, no backslash or controls,
    # and leading/trailing spaces are not significant.
    title = value.strip()
    if not 0 < len(title) <= 16 or "\\" in title or not all(32 <= ord(c) < 127 for c in title):
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return title


class IngestionSettings(BaseSettings):
    """The DIMSE listener, the STOW-RS limits and study assembly."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_INGESTION_", extra="ignore")

    ae_title: str = "LUCERNA"
    dimse_enabled: bool = True  # False for a STOW-RS-only deployment
    dimse_host: str = "127.0.0.1"
    dimse_port: int = Field(default=11112, ge=0, le=65535)  # 0: any free port (tests; one per worker)
    # Calling AE titles allowed to associate, comma-separated; empty: any.
    allowed_calling_ae_titles: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_associations: int = Field(default=32, ge=1)
    # How long an idle association may wait for the peer before it is aborted.
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    store_timeout_seconds: float = Field(default=120.0, gt=0)  # longest one C-STORE may take to be ingested

    max_stow_bytes: int = Field(default=2 * GIB, ge=1)
    # The external root of RetrieveURLs, e.g. https://pacs.example.org behind the gateway; else the request's.
    public_base_url: str | None = None

    quiet_period_seconds: float = Field(default=2.0, ge=0)
    assembly_interval_seconds: float = Field(default=0.5, gt=0)
    # A burst whose boundary never came (a process died, an association hung) is announced once its
    # study has been idle this long.
    max_idle_seconds: float = Field(default=60.0, gt=0)
    # A claimed burst not acknowledged (published) within this long is claimed again: its claimer died.
    claim_lease_seconds: float = Field(default=30.0, gt=0)
    # How often the audit relay publishes the audit records left in the store's outbox (bus down).
    audit_relay_interval_seconds: float = Field(default=1.0, gt=0)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return _check_ae_title(value)

    @model_validator(mode="after")
    def _idle_outlasts_quiet(self) -> IngestionSettings:
        if self.max_idle_seconds <= self.quiet_period_seconds:
            raise ValueError(
                "LUCERNA_INGESTION_MAX_IDLE_SECONDS must exceed LUCERNA_INGESTION_QUIET_PERIOD_SECONDS"
            )
        return self

    @field_validator("allowed_calling_ae_titles", mode="before")
    @classmethod
    def _split_titles(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in (p.strip() for p in value.split(",")) if part]
        return value

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _valid_titles(cls, value: list[str]) -> list[str]:
        return [_check_ae_title(title) for title in value]

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None
