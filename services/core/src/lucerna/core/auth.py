"""Bearer-token (JWT) authentication and SMART-style scopes for every HTTP endpoint.

Scopes follow SMART Backend Services: ``system/<Resource>.read|write`` (``*`` for any resource);
DICOMweb is guarded by the ImagingStudy resource. Verification is local (HS256 secret or an
RS256/ES256 public key); the gateway issues or forwards the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jwt
from starlette.exceptions import HTTPException
from starlette.requests import Request

from lucerna.core.settings import CoreSettings

LOCAL_PRINCIPAL_SUBJECT = "local"


@dataclass(frozen=True)
class Principal:
    """Who is calling, and what they may do."""

    subject: str
    scopes: frozenset[str]

    def allows(self, resource: str, access: str) -> bool:
        """True when a scope grants ``access`` (read/write) on ``resource``."""
        wanted = {f"system/{resource}.{access}", f"system/*.{access}", f"system/{resource}.*", "system/*.*"}
        return bool(self.scopes & wanted)


class Authenticator:
    """Checks bearer tokens against the configured key; lets everything through where auth is off."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings

    @cached_property
    def _key(self) -> str:
        if self.settings.jwt_public_key_file is not None:
            return self.settings.jwt_public_key_file.read_text()
        return self.settings.jwt_secret.get_secret_value()

    @property
    def _algorithms(self) -> list[str]:
        return ["RS256", "ES256"] if self.settings.jwt_public_key_file is not None else ["HS256"]

    def authenticate(self, request: Request) -> Principal:
        """The caller's principal; raises 401 for a missing or bad token."""
        if not self.settings.auth_enforced:
            return Principal(LOCAL_PRINCIPAL_SUBJECT, frozenset({"system/*.*"}))
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                options={"require": ["exp", "sub"], "verify_aud": self.settings.jwt_audience is not None},
            )
        except jwt.PyJWTError as error:
            raise HTTPException(
                401, f"invalid bearer token: {error}", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            ) from error
        scopes = claims.get("scope", "")
        return Principal(str(claims["sub"]), frozenset(scopes.split() if isinstance(scopes, str) else scopes))

    def require(self, request: Request, resource: str, access: str) -> Principal:
        """The caller's principal if a scope allows ``access`` on ``resource``; else 401/403."""
        principal = self.authenticate(request)
        if not principal.allows(resource, access):
            raise HTTPException(
                403,
                f"scope system/{resource}.{access} is required",
                {"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            )
        return principal
