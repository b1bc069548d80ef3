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

Caps, cheapest first, so that frames cost what HTTP requests cost: a frame over
``FARM_REALTIME_MAX_FRAME_BYTES`` closes the socket (1009, naming the limit; ``farm api`` has uvicorn
stop reading it there); a big frame is decoded and admitted off the event loop; its data URIs together
are capped by ``FARM_INLINE_INPUT_MAX_BYTES`` and, while held, count against the owner's
``FARM_UPLOAD_QUOTA_BYTES`` with its uploads; and an owner's frames held in this process (waiting or at
a worker) stay within ``FARM_REALTIME_OWNER_MAX_BYTES``: the connection's oldest waiting frames go
first (latest wins), else the new frame gets an error frame. A frame's bytes are released however
its wait ends (answered, timed out, superseded, dropped, hung up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from fastapi import WebSocket
from fastapi.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from farm.accounting import check_quota
from farm.api.deps import Tenant
from farm.api.realtime_frames import (
    FILE_FIELDS,
    OFF_LOOP_BYTES,
    FrameError,
    Waiting,
    decode,
    quota_room,
    raw_names,
    request_id,
    take,
)
from farm.api.realtime_hub import Hub, LaneUnavailableError
from farm.config import Settings
from farm.errors import FarmError
from farm.image_schemas import TEXT_TO_IMAGE
from farm.realtime.lane import Frame
from farm.realtime.wire import (
    CLOSE_OVER_LIMIT,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
    close_reason,
    error_frame,
)
from farm.schemas import GenerateInput
from models.registry import get_model

log = logging.getLogger("farm.api.realtime")


class Superseded(Exception):
    """Set on the reply future of a frame at a worker when a frame for another model arrives."""


class RealtimeSession:
    def __init__(self, ws: WebSocket, hub: Hub, tenant: Tenant, settings: Settings, conn_id: str,
                 buffering: int, task: str = TEXT_TO_IMAGE) -> None:
        self.ws = ws
        self.task = task  # the socket's endpoint: text-to-image (the app's root), image-to-image or inpainting
        self.hub = hub
        self.tenant = tenant
        self.settings = settings
        self.conn_id = conn_id
        self.pending: deque[Waiting] = deque(maxlen=buffering)
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
            while self.pending:
                self._release(self.pending.popleft())
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
        limit = self.settings.realtime_max_frame_bytes
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            payload = message["bytes"] if message.get("bytes") is not None else message.get("text") or ""
            size = len(payload)  # uvicorn stops reading at the same limit under `farm api`; this holds elsewhere
            if size > limit:
                await self.close(CLOSE_TOO_BIG, f"frame of {size} bytes: more than the {limit} allowed "
                                 "(FARM_REALTIME_MAX_FRAME_BYTES)")
                return
            off_loop = size > OFF_LOOP_BYTES
            data: Any = None
            try:
                data = await run_in_threadpool(decode, payload) if off_loop else decode(payload)
            except Exception:
                await self._send_text(error_frame("invalid_frame", "a frame must be a msgpack map (binary) or JSON "
                                                  "(text)", field="input"))
                continue
            del payload, message
            rid, names = request_id(data), raw_names(data)
            try:
                if off_loop or (isinstance(data, dict) and any(data.get(f) for f in FILE_FIELDS)):
                    # file references are checked on the file system or in storage, images and data URIs
                    # decoded: off the event loop
                    inp, inline = await run_in_threadpool(take, data, self.tenant, self.settings, self.task)
                else:
                    inp, inline = take(data, self.tenant, self.settings, self.task)
                del data
                if inline:  # what the owner's frames hold already counts too (what this one would drop does not)
                    dropping = self.pending[0].inline if len(self.pending) == self.pending.maxlen else 0
                    adding = self.hub.inline_held(self.tenant.owner) + inline - dropping
                    await run_in_threadpool(quota_room, self.tenant.owner, adding, self.settings)
                self._supersede(inp.model_name)
                self._hold(Waiting(inp, rid, size, inline, names or None))
            except FrameError as exc:
                extra: dict[str, Any] = {"field": exc.field} if exc.field else {}
                if rid is not None:
                    extra["request_id"] = rid
                await self._send_text(error_frame(exc.error, exc.reason, **extra))
                continue
            self.wake.set()

    def _hold(self, frame: Waiting) -> None:
        """Queue ``frame``, counted in the owner's bytes: the oldest waiting frames go first if need be
        (latest wins); FrameError if it still does not fit (the owner's other connections hold the rest)."""
        if len(self.pending) == self.pending.maxlen:
            self._drop(self.pending.popleft())
        cap = self.settings.realtime_owner_max_bytes
        while not self.hub.hold(self.tenant.owner, frame.size, frame.inline, cap):
            if not self.pending:
                raise FrameError("over_limit", f"this owner's realtime frames held now and this one's {frame.size} "
                                 f"bytes would pass the {cap} allowed (FARM_REALTIME_OWNER_MAX_BYTES); send it "
                                 "again once frames were answered")
            self._drop(self.pending.popleft())
        self.pending.append(frame)

    def _drop(self, frame: Waiting) -> None:
        self._release(frame)
        self.dropped += 1

    def _release(self, frame: Waiting) -> None:
        self.hub.release(self.tenant.owner, frame.size, frame.inline)

    def _supersede(self, model: str) -> None:
        """A frame for ``model`` arrived: frames of other models, waiting or at a worker, are stale."""
        stale = [w for w in self.pending if w.inp.model_name != model]
        if stale:
            kept = [w for w in self.pending if w.inp.model_name == model]
            self.pending.clear()
            self.pending.extend(kept)
            for frame in stale:
                self._drop(frame)
        if self.inflight is not None and self.inflight[0] != model and not self.inflight[1].done():
            self.inflight[1].set_exception(Superseded())

    async def _serve(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                await self.wake.wait()
                continue
            await self._one(self.pending.popleft())

    async def _one(self, waiting: Waiting) -> None:
        """Send one frame to the lane and its reply to the client. However this ends (a hang-up cancels
        it while it waits), its bytes and its future are let go, and a frame not answered is taken off
        the lane."""
        self.seq += 1
        inp, timeout = waiting.inp, self.settings.realtime_frame_timeout
        frame = Frame(id=f"{self.conn_id}:{self.seq}", reply=self.hub.channel, owner=self.tenant.owner,
                      input=inp.model_dump(mode="json"), expires=time.time() + timeout, names=waiting.names or {})
        encoded, model_key = frame.encode(), get_model(inp.model_name).key
        answered = False
        try:
            answered = await self._exchange(frame.id, model_key, encoded, inp, waiting.request_id)
        finally:
            self.inflight = None
            self.hub.forget(frame.id)
            self._release(waiting)
            if not answered:
                self.hub.withdraw(model_key, encoded)

    async def _exchange(self, frame_id: str, model_key: str, encoded: bytes, inp: GenerateInput,
                        rid: str | None) -> bool:
        """Whether a worker answered (its reply, or its error, was sent on to the client)."""
        timeout = self.settings.realtime_frame_timeout
        extra = {"request_id": rid} if rid else {}
        try:
            fut = await self.hub.submit(model_key, frame_id, encoded)
        except LaneUnavailableError as exc:
            await self._send_text(error_frame("unavailable", str(exc), **extra))
            return False
        self.inflight = (inp.model_name, fut)
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except Superseded:  # a frame for another model came: this one's answer is not wanted any more
            self.dropped += 1
            return False
        except TimeoutError:
            await self._send_text(error_frame(
                "timeout", f"no worker of {inp.model_name} answered within {timeout:g} s", **extra))
            return False
        if reply.error:
            field = {"field": reply.field} if reply.field else {}
            await self._send_text(error_frame(reply.error, reply.reason, **field, **extra))
            return True
        await self._send_bytes(reply.body)
        self.frames += 1
        counted = self.usage.setdefault(reply.model or inp.model_name, [0, 0.0])
        counted[0] += 1
        counted[1] += reply.gpu_seconds
        return True

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
