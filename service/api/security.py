"""Optional API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time, never logged."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import ProblemError
from service.config import Settings

bearer_scheme = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


def key_matches(candidate: str, keys: list[str]) -> bool:
    """True when `candidate` equals one of `keys`; every key is compared, each in constant time."""
    given = candidate.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


def presented_key(request: Request) -> str | None:
    """The API key a request carries (bearer token first, as `require_api_key` reads it), or None."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def accepted_keys(settings: Settings) -> list[str]:
    """Every key that opens the API: the plain keys and the admin keys."""
    return [*settings.api_keys, *settings.admin_api_keys]


def unauthorized() -> ProblemError:
    """The 401 of a request without a valid key."""
    return ProblemError(401, "unauthorized", "a valid API key is required: send 'Authorization: Bearer <key>' or "
                        "'X-API-Key: <key>'", headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header_key: Annotated[str | None, Depends(header_scheme)],
) -> None:
    """When API keys are configured, the request must carry one of them (else 401)."""
    keys = accepted_keys(request.app.state.settings)
    if not keys:
        return
    candidate = bearer.credentials if bearer is not None else header_key
    if not candidate or not key_matches(candidate, keys):
        raise unauthorized()


async def require_admin_key(request: Request) -> None:
    """An admin-only endpoint (activating a detector): it needs an admin key (settings admin_api_keys). Without
    any keys configured there is no one to tell apart, so it is refused (403) and the CLI does it instead; a
    missing or unknown key is 401 (as on every endpoint), a plain key 403."""
    settings: Settings = request.app.state.settings
    if not accepted_keys(settings):
        raise ProblemError(403, "api_keys_not_configured", "activating a detector over HTTP needs API keys: "
                           "configure FISHER_GUARD_ADMIN_API_KEYS and call with an admin key, or use the CLI on the "
                           "server instead (`fisher-guard activate-detector PATH`, `fisher-guard activate-detector "
                           "--rollback --model NAME`)")
    key = presented_key(request)
    if not key or not key_matches(key, accepted_keys(settings)):
        raise unauthorized()
    if not key_matches(key, settings.admin_api_keys):
        raise ProblemError(403, "admin_key_required", "this endpoint needs an admin API key (settings "
                           "admin_api_keys); the key given is a plain one")
