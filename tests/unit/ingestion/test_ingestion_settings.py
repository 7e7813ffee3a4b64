"""Ingestion settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lucerna.ingestion.settings import IngestionSettings


def test_defaults() -> None:
    settings = IngestionSettings()
    assert (settings.ae_title, settings.dimse_host, settings.dimse_port) == ("LUCERNA", "127.0.0.1", 11112)
    assert settings.allowed_calling_ae_titles == []
    assert settings.max_associations == 32
    assert settings.quiet_period_seconds == 2.0
    assert settings.max_stow_bytes == 2 * 1024**3


def test_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUCERNA_INGESTION_AE_TITLE", "HOSPITAL_AI ")
    monkeypatch.setenv("LUCERNA_INGESTION_ALLOWED_CALLING_AE_TITLES", "CT1, MR_2 ,,PACS")
    monkeypatch.setenv("LUCERNA_INGESTION_MAX_STOW_BYTES", "1048576")
    monkeypatch.setenv("LUCERNA_INGESTION_PUBLIC_BASE_URL", "https://pacs.example.org/")
    settings = IngestionSettings()
    assert settings.ae_title == "HOSPITAL_AI"
    assert settings.allowed_calling_ae_titles == ["CT1", "MR_2", "PACS"]
    assert settings.max_stow_bytes == 1048576
    assert settings.public_base_url == "https://pacs.example.org"


@pytest.mark.parametrize("title", ["", "A" * 17, "BACK\\SLASH", "TAB\tX"])
def test_invalid_ae_titles_refuse_to_start(title: str) -> None:
    with pytest.raises(ValidationError, match="AE title"):
        IngestionSettings(ae_title=title)
    with pytest.raises(ValidationError, match="AE title"):
        IngestionSettings(allowed_calling_ae_titles=["OK", title])


def test_the_maximum_idle_time_must_outlast_the_quiet_period() -> None:
    settings = IngestionSettings()
    assert (settings.max_idle_seconds, settings.claim_lease_seconds) == (60.0, 30.0)
    with pytest.raises(ValidationError, match="MAX_IDLE_SECONDS must exceed"):
        IngestionSettings(quiet_period_seconds=30, max_idle_seconds=30)
