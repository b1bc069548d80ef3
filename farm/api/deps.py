"""Dependencies of the routes: settings, and the tenant behind ``Authorization: Key …``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from farm.api.error_bodies import AuthError
from farm.api.guard import STATE_KEY
from farm.api_keys import cached_key, verify_key
from farm.config import Settings

api_key_header = APIKeyHeader(
    name="Authorization",
    scheme_name="FalKey",
    description="`Key <id>:<secret>`, as made by `farm keys create` (fal's `FAL_KEY`).",
    auto_error=False,
)


@dataclass(frozen=True)
class Tenant:
    """Who is asking, and the limits that apply to them."""

    owner: str
    key_id: str | None
    max_in_flight: int
    max_images: int | None


async def get_settings(request: Request) -> Settings:
    """The app's settings (async: FastAPI would run a plain function in a worker thread)."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_tenant(
    request: Request, settings: SettingsDep, authorization: Annotated[str | None, Security(api_key_header)]
) -> Tenant:
    """The key's owner; without auth (``FARM_AUTH_ENABLED=false``) the default owner.

    A key verified a moment ago is answered from memory on the event loop (``farm.api_keys``:
    revocation still applies); any other goes to the ledger from a worker thread.
    """
    # verified by farm.api.guard before the body was read
    return await tenant_for(settings, authorization, getattr(request.state, STATE_KEY, None))


async def tenant_for(settings: Settings, authorization: str | None, door: Any = None) -> Tenant:
    """:func:`get_tenant` for an ``Authorization`` header (also a websocket's); ``door``: the
    (token, key) that farm.api.guard verified for this request, if any."""
    if not settings.auth_enabled:
        return Tenant(settings.default_owner, None, settings.max_jobs_in_flight, None)
    if not authorization:
        raise AuthError("missing Authorization header: send `Authorization: Key <id>:<secret>`")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "key" or not token.strip():
        raise AuthError("the Authorization header must be `Key <id>:<secret>`")
    key = door[1] if door is not None and door[0] == token else cached_key(token)
    if key is None:
        # abandonable: a caller's deadline (a realtime socket's admission) stops waiting on a stuck ledger
        key = await anyio.to_thread.run_sync(verify_key, token, abandon_on_cancel=True)
    if key is None:
        raise AuthError("invalid or revoked API key")
    limit = key.max_in_flight if key.max_in_flight is not None else settings.max_jobs_in_flight
    return Tenant(key.owner, key.id, limit, key.max_images)


TenantDep = Annotated[Tenant, Depends(get_tenant)]
