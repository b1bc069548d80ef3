"""fal's realtime mode: ``wss://{run host}/fal-ai/fast-lcm-diffusion/realtime`` and ``POST /tokens/``.

The socket is served under ``/run`` and at the root, like the other routes, for each endpoint of the app:
text-to-image at ``…/fast-lcm-diffusion/realtime``, and ``…/image-to-image/realtime`` and
``…/inpainting/realtime`` (fal's sketch demo; frames carry ``image_bytes``, see ``farm.api.realtime_frames``).
Credentials, either:
``Authorization: Key <id>:<secret>`` on the upgrade (``fal_client.realtime(app, use_jwt=False)``),
or ``?fal_jwt_token=`` with a token from ``POST /tokens/`` (fal's JavaScript clients). Both given:
they must belong to the same owner. A refusal accepts the upgrade and closes at once with a 4xxx
code and a reason, which every client shows (an HTTP refusal of the upgrade carries none to a browser).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import APIRouter, Body, WebSocket
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, field_validator

from farm import events
from farm.api.deps import SettingsDep, Tenant, TenantDep, tenant_for
from farm.api.error_bodies import ERROR_RESPONSES
from farm.api.fal import APP_ALIAS, APP_ID
from farm.api.realtime_hub import Hub, get_hub
from farm.api.realtime_session import RealtimeSession, quota_spent
from farm.config import Settings
from farm.errors import FarmError
from farm.image_schemas import SUBPATHS, TEXT_TO_IMAGE
from farm.realtime import tokens
from farm.realtime.wire import (
    CLOSE_BAD_REQUEST,
    CLOSE_FORBIDDEN,
    CLOSE_OVER_LIMIT,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
    close_reason,
)

T = TypeVar("T")
log = logging.getLogger("farm.api.realtime")
router = APIRouter(tags=["realtime"])
_sessions: set[RealtimeSession] = set()
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # the lane is Redis lists and pub/sub (redis-py's URLs)
ADMIT_SECONDS = 10.0  # credentials, lane, limit and quota checks of a new connection, in all
CLOSE_SECONDS = 5.0  # sending a refusal, uncounting a connection
LANE_DOWN = "realtime is unavailable: the realtime lane (Redis) is unreachable; try again"
NO_REDIS = "realtime is unavailable: it needs a Redis broker (FARM_BROKER_URL=redis://…) and this farm has none"


class Refused(Exception):
    """Raised when a realtime connection is refused: closed with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def _app_of(name: str) -> str | None:
    """The app a token request names, normalised (fal-js sends the alias, newer ones the realtime path, an
    endpoint's too: ``…/image-to-image/realtime``); a token opens every endpoint of its app, as fal's do."""
    name = name.strip().strip("/").removesuffix("/realtime")
    for subpath in SUBPATHS:
        name = name.removesuffix(f"/{subpath}")
    return APP_ID if name in (APP_ALIAS, APP_ID) else None


class TokenRequest(BaseModel):
    allowed_apps: list[str] = Field(..., min_length=1, max_length=16,
                                    description="Apps the token may open: `fast-lcm-diffusion` (fal's clients send "
                                    "the alias) or `fal-ai/fast-lcm-diffusion`.")  # fmt: skip
    token_expiration: int = Field(120, ge=1, description="Seconds the token is valid (at most "
                                  "FARM_REALTIME_TOKEN_MAX_SECONDS).")  # fmt: skip

    @field_validator("allowed_apps")
    @classmethod
    def _apps(cls, v: list[str]) -> list[str]:
        for name in v:
            if _app_of(name) is None:
                raise ValueError(f"unknown app {name!r}: this farm serves {APP_ID}")
        return v


@router.post(
    "/tokens/",
    response_model=str,
    summary="A short-lived token for the realtime socket (`?fal_jwt_token=`)",
    responses=ERROR_RESPONSES,
)
async def create_token(
    request: Annotated[TokenRequest, Body()], tenant: TenantDep, settings: SettingsDep
) -> str:
    """fal's REST `POST /tokens/`: the reply is the token, a JSON string."""
    if request.token_expiration > settings.realtime_token_max_seconds:
        from fastapi.exceptions import RequestValidationError

        raise RequestValidationError([{
            "loc": ("body", "token_expiration"), "type": "less_than_equal",
            "msg": f"must be at most {settings.realtime_token_max_seconds} (got {request.token_expiration})",
            "input": request.token_expiration}])  # fmt: skip
    apps = sorted({_app_of(a) or "" for a in request.allowed_apps})
    return await run_in_threadpool(tokens.issue, settings, tenant.owner, tenant.key_id, apps,
                                   request.token_expiration)


router.add_api_route("/tokens", create_token, methods=["POST"], response_model=str, include_in_schema=False)


def _buffering(ws: WebSocket, settings: Settings) -> int:
    """The client's ``max_buffering``, at most ``realtime_buffering_cap`` (each waiting frame is memory)."""
    cap = settings.realtime_buffering_cap
    raw = ws.query_params.get("max_buffering")
    if raw is None:
        return min(settings.realtime_max_buffering, cap)
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= cap:
        raise Refused(CLOSE_BAD_REQUEST, f"max_buffering: must be an integer between 1 and {cap} (got "
                      f"{raw[:20]!r}; FARM_REALTIME_BUFFERING_CAP)")
    return value


async def _authenticate(ws: WebSocket, settings: Settings) -> Tenant:
    header = ws.headers.get("authorization")
    token = ws.query_params.get("fal_jwt_token")
    if not settings.auth_enabled:
        return Tenant(settings.default_owner, None, settings.max_jobs_in_flight, None)
    if not header and not token:
        raise Refused(CLOSE_UNAUTHORIZED, "missing credentials: send `Authorization: Key <id>:<secret>` or "
                      "?fal_jwt_token= (POST /tokens/)")
    from_key: Tenant | None = None
    if header:
        try:
            from_key = await tenant_for(settings, header)
        except FarmError as exc:
            raise Refused(CLOSE_UNAUTHORIZED, str(exc)) from None
    if not token:
        assert from_key is not None
        return from_key
    try:
        claims = await _in_thread(tokens.verify, settings, token, APP_ID)
    except tokens.TokenError as exc:
        code = CLOSE_FORBIDDEN if "does not allow" in str(exc) else CLOSE_UNAUTHORIZED
        raise Refused(code, str(exc)) from None
    if from_key is not None and from_key.owner != claims.owner:
        raise Refused(CLOSE_FORBIDDEN, "the realtime token belongs to another owner than the API key")
    from farm.api_keys import active_key

    key = await _in_thread(active_key, claims.key_id) if claims.key_id else None
    if claims.key_id and key is None:
        raise Refused(CLOSE_UNAUTHORIZED, "the API key that made this realtime token was revoked")
    if key is not None and key.owner != claims.owner:
        raise Refused(CLOSE_FORBIDDEN, "the realtime token belongs to another owner than its key")
    limit = key.max_in_flight if key is not None and key.max_in_flight is not None else settings.max_jobs_in_flight
    return Tenant(claims.owner, claims.key_id, limit, key.max_images if key is not None else None)


async def _in_thread(func: Callable[..., T], *args: Any) -> T:
    """A blocking call (the ledger) that the admission deadline can stop waiting for: Starlette's
    run_in_threadpool cannot be cancelled, so a stuck ledger would hold the refusal for as long as it is
    stuck. The abandoned thread ends on its own when the call returns."""
    return await anyio.to_thread.run_sync(functools.partial(func, *args), abandon_on_cancel=True)


async def _admit(ws: WebSocket, settings: Settings, conn_id: str) -> tuple[int, Tenant, Hub]:
    """The connection's buffering, tenant and hub, with the owner's connection counted; raises Refused."""
    buffering = _buffering(ws, settings)
    tenant = await _authenticate(ws, settings)
    if not (settings.broker_url or "").startswith(REDIS_SCHEMES):
        raise Refused(CLOSE_UNAVAILABLE, NO_REDIS)
    try:
        hub = await get_hub(ws.app.state, settings.broker_url or "", settings.publish_timeout)
        limit = min(settings.realtime_max_connections, tenant.max_in_flight)
        over = await hub.admit(tenant.owner, conn_id, limit)
    except Exception as exc:  # redis raises its own types for a dead server; they name hosts: the log only
        log.warning("realtime %s: the lane is unavailable: %s", conn_id, exc)
        raise Refused(CLOSE_UNAVAILABLE, LANE_DOWN) from None
    if over is not None:
        raise Refused(CLOSE_OVER_LIMIT, f"owner {tenant.owner} has {over} realtime connection(s) open: the "
                      f"limit is {limit}")
    try:
        spent = await _in_thread(quota_spent, tenant.owner, settings)
    except BaseException:
        await _leave(hub, tenant.owner, conn_id)
        raise
    if spent is not None:
        await _leave(hub, tenant.owner, conn_id)
        raise Refused(CLOSE_OVER_LIMIT, spent)
    return buffering, tenant, hub


async def _leave(hub: Hub, owner: str, conn_id: str) -> None:
    """Uncount a connection that is not opened after all (bounded; the entry expires on its own anyway)."""
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await hub.leave(owner, conn_id)
    except Exception as exc:
        log.debug("realtime %s: could not leave the connection set: %s", conn_id, exc)


async def _refuse(ws: WebSocket, conn_id: str, code: int, reason: str) -> None:
    """Close with ``code`` and ``reason``, at once: bounded, and never raises (a client that went away)."""
    log.info("realtime %s refused: %s", conn_id, reason)
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await ws.close(code, close_reason(reason))
    except Exception as exc:  # gone, or not reading: the server drops the connection when this returns
        log.debug("realtime %s: the refusal could not be sent: %s", conn_id, exc)


async def realtime(ws: WebSocket, task: str = TEXT_TO_IMAGE) -> None:
    """Frames in, results out (see ``farm.api.realtime_session``).

    The upgrade is accepted first, then the connection is admitted within ``ADMIT_SECONDS`` (credentials,
    the lane, the owner's connection limit and quota) or refused with a close code and a reason: every
    path out of admission closes the socket, a check that hangs (the ledger, Redis) included.
    """
    settings: Settings = ws.app.state.settings
    await ws.accept()
    conn_id = uuid.uuid4().hex[:16]
    try:
        async with asyncio.timeout(ADMIT_SECONDS):
            buffering, tenant, hub = await _admit(ws, settings, conn_id)
    except Refused as exc:
        await _refuse(ws, conn_id, exc.code, exc.reason)
        return
    except TimeoutError:
        await _refuse(ws, conn_id, CLOSE_UNAVAILABLE, f"realtime is unavailable: the connection could not be "
                      f"admitted within {ADMIT_SECONDS:g} s (the ledger or Redis is slow); try again")
        return
    except Exception:
        log.exception("realtime %s: admission failed", conn_id)
        await _refuse(ws, conn_id, CLOSE_UNAVAILABLE, "realtime is unavailable: an internal error; try again")
        return
    session = RealtimeSession(ws, hub, tenant, settings, conn_id, buffering, task)
    log.info("realtime %s (%s): open, max_buffering %d", conn_id, tenant.owner, buffering)
    _sessions.add(session)
    try:
        await session.run()
    finally:
        _sessions.discard(session)


def _key_changed(_key_id: str | None) -> None:
    """From the events listener's thread: every session checks its key at once (revocations close them)."""
    for session in list(_sessions):
        session.loop.call_soon_threadsafe(session.check_key.set)


events.on_key_change(_key_changed)

def _endpoint(task: str) -> Callable[[WebSocket], Any]:
    """The socket of one endpoint (a closure: FastAPI would read a ``task`` parameter as a query field)."""

    async def endpoint(ws: WebSocket) -> None:
        await realtime(ws, task)

    return endpoint


for prefix in ("/run", ""):
    router.add_api_websocket_route(f"{prefix}/{APP_ID}/realtime", _endpoint(TEXT_TO_IMAGE))
    for subpath in SUBPATHS:
        router.add_api_websocket_route(f"{prefix}/{APP_ID}/{subpath}/realtime", _endpoint(subpath))
