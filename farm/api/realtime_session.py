"""One realtime connection: read frames, keep the newest ``max_buffering``, send each to the lane.

Two tasks share the socket. The reader decodes and admits every frame the client sends (bad input
gets an ``x-fal-error`` text frame naming the field, and the connection goes on) and appends it to
a deque of ``max_buffering`` frames: when the client sends faster than the pool renders, the
oldest waiting frame is dropped (latest wins) and the queue is never longer. The sender takes the
oldest waiting frame, pushes it to the model's realtime lane, waits for its reply (at most
``FARM_REALTIME_FRAME_TIMEOUT``) and sends it on: one frame of a connection is at a worker at a
time. A frame for another model than the frames before it makes them stale: those waiting are
dropped and the one at a worker is no longer waited for (a model without workers never delays
the next model's frames behind its timeouts). A third task, every ``FARM_REALTIME_USAGE_SECONDS``
and at close, adds the frames answered and their GPU seconds to the owner's usage (one upsert),
keeps the connection counted in the owner's limit, and closes the socket if the key was revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from typing import Any

from fastapi import WebSocket
from fastapi.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from farm import admission
from farm.accounting import check_quota
from farm.api.deps import Tenant
from farm.api.realtime_hub import Hub, LaneUnavailableError
from farm.config import Settings
from farm.errors import FarmError, InvalidInputError
from farm.realtime.lane import Frame
from farm.realtime.wire import (
    CLOSE_OVER_LIMIT,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
    close_reason,
    error_frame,
    unpack,
)
from farm.schemas import GenerateInput
from models.registry import get_model

log = logging.getLogger("farm.api.realtime")


class Superseded(Exception):
    """Set on the reply future of a frame at a worker when a frame for another model arrives."""


class FrameError(Exception):
    """Raised when a frame cannot be admitted: ``error`` and ``reason`` go to the client."""

    def __init__(self, error: str, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.error, self.reason, self.field = error, reason, field


def _request_id(data: Any) -> str | None:
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and rid else None


def admit(data: Any, tenant: Tenant, settings: Settings) -> GenerateInput:
    """The frame's input, validated as an HTTP request would be, plus the realtime bounds."""
    if not isinstance(data, dict):
        raise FrameError("invalid_input", f"a frame must be a map of input fields (got {type(data).__name__})",
                         "input")
    try:  # the fields, their bounds, file references and upload owners (farm.admission)
        inp = admission.admit(data, tenant.owner, settings)
    except InvalidInputError as exc:
        raise FrameError("invalid_input", str(exc), exc.field) from None
    cap = min(settings.realtime_max_images, tenant.max_images or settings.realtime_max_images)
    if inp.num_images > cap:
        raise FrameError("invalid_input", f"num_images: at most {cap} per realtime frame (got {inp.num_images})",
                         "num_images")
    if inp.seed is None:
        inp.seed = random.randrange(2**31)  # the reply says which
    return inp


class RealtimeSession:
    def __init__(self, ws: WebSocket, hub: Hub, tenant: Tenant, settings: Settings, conn_id: str,
                 buffering: int) -> None:
        self.ws = ws
        self.hub = hub
        self.tenant = tenant
        self.settings = settings
        self.conn_id = conn_id
        self.pending: deque[tuple[GenerateInput, str | None]] = deque(maxlen=buffering)
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.check_key = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.usage: dict[str, list[float]] = {}  # model → [frames, gpu seconds] not yet recorded
        self.inflight: tuple[str, asyncio.Future[Any]] | None = None  # model, reply of the frame at a worker
        self.seq = 0
        self.frames = 0
        self.dropped = 0

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._read(), name="reader"), asyncio.create_task(self._serve(), name="sender"),
                 asyncio.create_task(self._maintain(), name="maintainer")]  # fmt: skip
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, WebSocketDisconnect | RuntimeError | OSError):
                    log.error("realtime %s: %s failed", self.conn_id, task.get_name(), exc_info=exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._flush_usage()
            try:
                await self.hub.leave(self.tenant.owner, self.conn_id)
            except Exception as exc:  # the entry expires on its own
                log.debug("realtime %s: could not leave the connection set: %s", self.conn_id, exc)
            log.info("realtime %s (%s): closed after %d frame(s), %d dropped (latest wins)", self.conn_id,
                     self.tenant.owner, self.frames, self.dropped)

    async def _send_text(self, text: str) -> None:
        async with self.send_lock:
            await self.ws.send_text(text)

    async def _send_bytes(self, data: bytes) -> None:
        async with self.send_lock:
            await self.ws.send_bytes(data)

    async def close(self, code: int, reason: str) -> None:
        async with self.send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.close(code, close_reason(reason))

    async def _read(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            data: Any = None
            try:
                if message.get("bytes") is not None:
                    data = unpack(message["bytes"])
                else:
                    data = json.loads(message.get("text") or "")
            except Exception:
                await self._send_text(error_frame("invalid_frame", "a frame must be a msgpack map (binary) or JSON "
                                                  "(text)", field="input"))
                continue
            try:
                if isinstance(data, dict) and (data.get("loras") or data.get("embeddings")):
                    # file references are checked on the file system: off the event loop
                    inp = await run_in_threadpool(admit, data, self.tenant, self.settings)
                else:
                    inp = admit(data, self.tenant, self.settings)
            except FrameError as exc:
                extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
                if (rid := _request_id(data)) is not None:
                    extra["request_id"] = rid
                await self._send_text(error_frame(exc.error, exc.reason, **extra))
                continue
            self._supersede(inp.model_name)
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1
            self.pending.append((inp, _request_id(data)))
            self.wake.set()

    def _supersede(self, model: str) -> None:
        """A frame for ``model`` arrived: frames of other models, waiting or at a worker, are stale."""
        stale = sum(1 for inp, _ in self.pending if inp.model_name != model)
        if stale:
            kept = [item for item in self.pending if item[0].model_name == model]
            self.pending.clear()
            self.pending.extend(kept)
            self.dropped += stale
        if self.inflight is not None and self.inflight[0] != model and not self.inflight[1].done():
            self.inflight[1].set_exception(Superseded())

    async def _serve(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
                continue
            inp, request_id = self.pending.popleft()
            await self._one(inp, request_id)

    async def _one(self, inp: GenerateInput, request_id: str | None) -> None:
        self.seq += 1
        timeout = self.settings.realtime_frame_timeout
        frame = Frame(id=f"{self.conn_id}:{self.seq}", reply=self.hub.channel, owner=self.tenant.owner,
                      input=inp.model_dump(mode="json"), expires=time.time() + timeout)
        extra = {"request_id": request_id} if request_id else {}
        try:
            fut = await self.hub.submit(get_model(inp.model_name).key, frame)
        except LaneUnavailableError as exc:
            await self._send_text(error_frame("unavailable", str(exc), **extra))
            return
        self.inflight = (inp.model_name, fut)
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except Superseded:  # a frame for another model came: this one's answer is not wanted any more
            self.hub.forget(frame.id)
            self.dropped += 1
            return
        except TimeoutError:
            self.hub.forget(frame.id)
            await self._send_text(error_frame(
                "timeout", f"no worker of {inp.model_name} answered within {timeout:g} s", **extra))
            return
        finally:
            self.inflight = None
        if reply.error:
            await self._send_text(error_frame(reply.error, reply.reason, **extra))
            return
        await self._send_bytes(reply.body)
        self.frames += 1
        counted = self.usage.setdefault(reply.model or inp.model_name, [0, 0.0])
        counted[0] += 1
        counted[1] += reply.gpu_seconds

    async def _maintain(self) -> None:
        interval = self.settings.realtime_usage_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.check_key.wait(), interval)
            self.check_key.clear()
            await self._flush_usage()
            spent = await run_in_threadpool(quota_spent, self.tenant.owner, self.settings)
            if spent is not None:
                log.info("realtime %s (%s): %s: closing", self.conn_id, self.tenant.owner, spent)
                await self.close(CLOSE_OVER_LIMIT, spent)
                return
            try:
                await self.hub.refresh(self.tenant.owner, self.conn_id)
            except Exception as exc:  # Redis is away: frames fail meanwhile; try again next time
                log.debug("realtime %s: refresh failed: %s", self.conn_id, exc)
            if self.tenant.key_id is None:
                continue
            active = await _key_still_active(self.tenant.key_id)
            if active is None:  # a guard that cannot read fails closed
                await self.close(CLOSE_UNAVAILABLE, "cannot verify the API key now (ledger unreachable)")
                return
            if not active:
                log.info("realtime %s (%s): API key %s revoked: closing", self.conn_id, self.tenant.owner,
                         self.tenant.key_id)
                await self.close(CLOSE_UNAUTHORIZED, "API key revoked")
                return

    async def _flush_usage(self) -> None:
        if not self.usage:
            return
        usage, self.usage = self.usage, {}
        try:
            await run_in_threadpool(_record_usage, self.tenant.owner, usage)
        except Exception as exc:  # the ledger is away: keep the counts for the next flush
            log.warning("realtime %s: usage not recorded yet (%s); will retry", self.conn_id, exc)
            for model, (frames, gpu) in usage.items():
                counted = self.usage.setdefault(model, [0, 0.0])
                counted[0] += frames
                counted[1] += gpu


async def _key_still_active(key_id: str) -> bool | None:
    """Whether the key is still active; None when the ledger cannot say."""
    from farm.api_keys import active_key

    try:
        return await run_in_threadpool(active_key, key_id) is not None
    except Exception as exc:
        log.warning("realtime: cannot read API key %s: %s", key_id, exc)
        return None


def quota_spent(owner: str, settings: Settings) -> str | None:
    """Why ``owner`` may not render now (its daily GPU-second quota is spent, ``farm.accounting``), or None."""
    from db.session import session_scope

    with session_scope() as s:
        try:
            check_quota(s, owner, settings)
        except FarmError as exc:
            return str(exc)
    return None


def _record_usage(owner: str, usage: dict[str, list[float]]) -> None:
    from db.session import session_scope
    from db.usage_counters import UsageEntry, record_usage

    with session_scope() as s:
        record_usage(s, [UsageEntry(owner=owner, model=model, source="realtime", frames=int(frames),
                                    gpu_seconds=float(gpu)) for model, (frames, gpu) in usage.items()])
