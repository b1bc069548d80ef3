"""The API process's side of the realtime lane: push frames to Redis, route the workers' replies.

One hub per API process (made at the first realtime connection): one Redis client, one pub/sub
subscription to the process's reply channel, and a future per frame in flight. A frame costs one
round trip to push (``RPUSH`` + trim + expiry, pipelined); its reply arrives on the channel. A
reply whose frame was given up (timeout, hang-up) is dropped. The session forgets each frame's
future however its wait ends, so ``waiting`` holds only frames a connection still waits for
(``farm_realtime_frames_waiting``), and takes a frame no one waits for off the lane. The hub also
keeps what each owner's frames hold in this process (``hold`` / ``release``), for
``FARM_REALTIME_OWNER_MAX_BYTES`` and the upload quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from farm.metrics.defs import REALTIME_WAITING
from farm.realtime.lane import LANE_MAX, LANE_TTL_SECONDS, Reply, connections_key, lane_key, reply_channel

log = logging.getLogger("farm.api.realtime")
CONNECTION_TTL_SECONDS = 30.0  # an open connection's entry in the owner's set lives this long unless refreshed
SUBSCRIBE_TIMEOUT_SECONDS = 5.0
UNREACHABLE = "the realtime lane (Redis) is unreachable"  # the cause (a host, a port) goes to the log only


class LaneUnavailableError(Exception):
    """Raised when the realtime lane (Redis) cannot be reached."""


class Hub:
    def __init__(self, broker_url: str, connect_timeout: float) -> None:
        self.redis: Any = aioredis.Redis.from_url(broker_url, socket_connect_timeout=connect_timeout,
                                                  health_check_interval=30)
        self.process_id = uuid.uuid4().hex
        self.channel = reply_channel(self.process_id)
        self.waiting: dict[str, asyncio.Future[Reply]] = {}
        self.held: dict[str, list[int]] = {}  # owner → [frame bytes, inline input bytes] of its frames held here
        self._subscribed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()  # frames being withdrawn from the lane

    async def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="farm-realtime-replies")
        try:
            await asyncio.wait_for(self._subscribed.wait(), SUBSCRIBE_TIMEOUT_SECONDS)
        except TimeoutError:
            raise LaneUnavailableError(UNREACHABLE) from None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.redis.aclose()

    async def _read(self) -> None:
        failing = False
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                if failing:
                    log.info("realtime replies: subscribed again")
                failing = False
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._deliver(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: frames in flight time out; subscribe again
                self._subscribed.clear()
                if not failing:
                    log.warning("realtime replies: %s; subscribing again", exc)
                failing = True
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):  # the connection is gone already
                    await pubsub.aclose()

    def _deliver(self, data: bytes) -> None:
        try:
            reply = Reply.decode(data)
        except Exception as exc:
            log.warning("realtime replies: undecodable reply dropped (%s)", exc)
            return
        fut = self.waiting.pop(reply.id, None)
        REALTIME_WAITING.set(len(self.waiting))
        if fut is not None and not fut.done():
            fut.set_result(reply)

    async def submit(self, model_key: str, frame_id: str, encoded: bytes) -> asyncio.Future[Reply]:
        """Push a frame (``Frame.encode()``) onto the model's realtime lane; the future gets its reply."""
        if not self._subscribed.is_set():
            raise LaneUnavailableError(UNREACHABLE)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting[frame_id] = fut
        REALTIME_WAITING.set(len(self.waiting))
        key = lane_key(model_key)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(key, encoded)
                pipe.ltrim(key, -LANE_MAX, -1)
                pipe.expire(key, LANE_TTL_SECONDS)
                await pipe.execute()
        except BaseException as exc:  # cancelled (the client left) too: nothing waits for this frame
            self.forget(frame_id)
            if not isinstance(exc, Exception):
                raise
            log.warning("realtime lane %s: %s", key, exc)  # the detail (hosts, ports) stays in this log
            raise LaneUnavailableError(UNREACHABLE) from exc
        return fut

    def forget(self, frame_id: str) -> None:
        """Stop waiting for ``frame_id`` (answered, timed out, superseded, or its connection went)."""
        self.waiting.pop(frame_id, None)
        REALTIME_WAITING.set(len(self.waiting))

    def withdraw(self, model_key: str, encoded: bytes) -> None:
        """Take a frame no one waits for any more (timed out, superseded, hung up) off the lane, in the
        background and best effort: else it would stay in Redis, whole, until a worker takes it or the
        lane expires (each push renews the expiry)."""
        task = asyncio.create_task(self._withdraw(lane_key(model_key), encoded), name="farm-realtime-withdraw")
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _withdraw(self, key: str, encoded: bytes) -> None:
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                await self.redis.lrem(key, 1, encoded)
        except Exception as exc:  # Redis is away: the lane's expiry and the workers' expiry check remain
            log.debug("realtime lane %s: a frame could not be withdrawn: %s", key, exc)

    def hold(self, owner: str, size: int, inline: int, limit: int) -> bool:
        """Count a frame of ``size`` bytes (``inline`` of them data-URI inputs) for ``owner``, if its frames
        held in this process stay within ``limit`` bytes; False (nothing counted) if not."""
        held = self.held.setdefault(owner, [0, 0])
        if held[0] + size > limit:
            return False
        held[0] += size
        held[1] += inline
        return True

    def release(self, owner: str, size: int, inline: int) -> None:
        held = self.held.get(owner)
        if held is None:
            return
        held[0] -= size
        held[1] -= inline
        if held[0] <= 0:
            del self.held[owner]

    def inline_held(self, owner: str) -> int:
        """Bytes of data-URI inputs ``owner``'s frames hold in this process (they count against its quota)."""
        return self.held.get(owner, [0, 0])[1]

    async def admit(self, owner: str, conn_id: str, limit: int) -> int | None:
        """Count connection ``conn_id`` for ``owner``; None if admitted, else how many are open already."""
        now = time.time()
        key = connections_key(owner)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zadd(key, {conn_id: now + CONNECTION_TTL_SECONDS})
            pipe.zcard(key)
            pipe.expire(key, int(CONNECTION_TTL_SECONDS) + 1)
            count = int((await pipe.execute())[2])
        if count > limit:
            await self.redis.zrem(key, conn_id)
            return count - 1
        return None

    async def refresh(self, owner: str, conn_id: str) -> None:
        key = connections_key(owner)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {conn_id: time.time() + CONNECTION_TTL_SECONDS})
            pipe.expire(key, int(CONNECTION_TTL_SECONDS) + 1)
            await pipe.execute()

    async def leave(self, owner: str, conn_id: str) -> None:
        await self.redis.zrem(connections_key(owner), conn_id)


async def get_hub(state: Any, broker_url: str, connect_timeout: float) -> Hub:
    """The hub of this app (``app.state``), made at the first call (no await between the look and the
    assignment: one hub per app) and started."""
    hub: Hub | None = getattr(state, "realtime_hub", None)
    if hub is None:
        hub = Hub(broker_url, connect_timeout)
        state.realtime_hub = hub
    await hub.start()
    return hub
