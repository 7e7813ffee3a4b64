import time

import jwt
import pytest
from pydantic import SecretStr
from starlette.exceptions import HTTPException
from starlette.requests import Request

from lucerna.core.auth import Authenticator
from lucerna.core.settings import CoreSettings

SECRET = "test-secret-for-unit-tests-0123456789abcdef"


def _request(token: str | None) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def _token(scope: str, **claims: object) -> str:
    body = {"sub": "pacs-1", "scope": scope, "exp": int(time.time()) + 60, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(CoreSettings(auth_required=True, jwt_secret=SecretStr(SECRET)))


def test_missing_token_is_401(auth: Authenticator) -> None:
    with pytest.raises(HTTPException) as error:
        auth.require(_request(None), "ImagingStudy", "read")
    assert error.value.status_code == 401


def test_token_signed_with_another_key_is_401(auth: Authenticator) -> None:
    forged = jwt.encode({"sub": "x", "scope": "system/*.*", "exp": int(time.time()) + 60}, "other-key" * 4)
    with pytest.raises(HTTPException) as error:
        auth.require(_request(forged), "ImagingStudy", "read")
    assert error.value.status_code == 401
    assert "invalid bearer token" in str(error.value.detail)


def test_expired_token_is_401(auth: Authenticator) -> None:
    with pytest.raises(HTTPException) as error:
        auth.require(_request(_token("system/*.read", exp=int(time.time()) - 10)), "ImagingStudy", "read")
    assert error.value.status_code == 401


def test_scope_for_another_access_is_403(auth: Authenticator) -> None:
    with pytest.raises(HTTPException) as error:
        auth.require(_request(_token("system/ImagingStudy.read")), "ImagingStudy", "write")
    assert error.value.status_code == 403
    assert "system/ImagingStudy.write" in str(error.value.detail)


@pytest.mark.parametrize("scope", ["system/ImagingStudy.read", "system/*.read", "system/ImagingStudy.*"])
def test_matching_scopes_are_allowed(auth: Authenticator, scope: str) -> None:
    principal = auth.require(_request(_token(scope)), "ImagingStudy", "read")
    assert principal.subject == "pacs-1"


def test_auth_off_in_local_mode_lets_requests_through() -> None:
    local = Authenticator(CoreSettings(http_host="127.0.0.1"))
    assert local.require(_request(None), "ImagingStudy", "write").subject == "local"
