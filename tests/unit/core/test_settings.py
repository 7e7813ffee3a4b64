import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from lucerna.core.settings import CoreSettings


def test_local_mode_on_loopback_needs_no_token() -> None:
    assert CoreSettings(http_host="127.0.0.1").auth_enforced is False


def test_local_mode_on_a_public_address_still_requires_tokens() -> None:
    assert CoreSettings(http_host="0.0.0.0").auth_enforced is True


def test_explicit_auth_setting_wins() -> None:
    assert CoreSettings(auth_required=True).auth_enforced is True


def test_production_refuses_default_secrets_and_disabled_auth() -> None:
    with pytest.raises(ValidationError) as error:
        CoreSettings(mode="production", auth_required=False, bus_backend="rabbitmq")
    message = str(error.value)
    assert "LUCERNA_AUTH_REQUIRED" in message
    assert "LUCERNA_JWT_SECRET" in message
    assert "guest credentials" in message


def test_production_starts_with_real_secrets(tmp_path: Path) -> None:
    settings = CoreSettings(
        mode="production",
        http_host="0.0.0.0",
        jwt_secret=SecretStr("a-real-secret-of-enough-length-0123456789"),
        bus_backend="rabbitmq",
        rabbitmq_url=SecretStr("amqp://lucerna:s3cret@rabbit:5672/"),
        data_dir=tmp_path,
    )
    assert settings.auth_enforced is True
    assert settings.blobs_path == tmp_path / "blobs"


def test_secrets_do_not_appear_in_the_settings_repr() -> None:
    settings = CoreSettings(rabbitmq_url=SecretStr("amqp://u:topsecret@h:5672/"))
    assert "topsecret" not in repr(settings)


def test_workers_default_to_the_cpus_at_most_four(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUCERNA_WORKERS", raising=False)
    assert CoreSettings().workers == max(1, min(len(os.sched_getaffinity(0)), 4))
    monkeypatch.setenv("LUCERNA_WORKERS", "1")
    assert CoreSettings().workers == 1
    monkeypatch.setenv("LUCERNA_WORKERS", "0")
    with pytest.raises(ValidationError):
        CoreSettings()
