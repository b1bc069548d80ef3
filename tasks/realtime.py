"""The realtime lane in a worker: frames taken from Redis ahead of every batch, answered inline.

A thread of the worker's pool process waits on its model's lane (``farm.realtime.lane``) with
``BLMPOP``: one round trip gives it every frame waiting, up to the worker's batch size. Frames of
compatible inputs render as one batch, through the same renderer as batches; each image is encoded
at once and the reply, images inline, is published on the API process's channel. No job row, no
upload. A frame past its expiry (its API answered a timeout) is dropped unrendered.

Priority: :class:`Gate`. The batch loop (``tasks.render_batch``) waits at the gate before each
batch while frames are waiting or rendering, so a frame waits at most for the batch being rendered
when it arrived; a batch that waits keeps its lease alive meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from db.batches import compat_key
from farm.config import Settings
from farm.inputs.retrieve import owner_scope
from farm.realtime.lane import Frame, Reply, lane_key
from farm.realtime.wire import pack
from farm.schemas import GenerateInput, admitted_input
from models.encode import encode_image
from models.prompt import expand_prompt
from models.protocol import Renderer
from models.rendered import RenderItem

log = logging.getLogger(__name__)
WAIT_SECONDS = 1  # BLMPOP timeout: how often the thread looks at its stop flag


class Gate:
    """Frames first: a batch starts only while no frame waits or renders."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frames = 0

    @contextmanager
    def frames(self) -> Iterator[None]:
        with self._cond:
            self._frames += 1
        try:
            yield
        finally:
            with self._cond:
                self._frames -= 1
                self._cond.notify_all()

    def wait_turn(self, alive: Callable[[], None] | None = None, beat: float = 1.0) -> None:
        """Return once no frame waits or renders; call ``alive`` every ``beat`` seconds meanwhile."""
        with self._cond:
            while self._frames:
                self._cond.wait(beat)
                if alive is not None and self._frames:
                    alive()


gate = Gate()


class RealtimeServer:
    """Serves the model's realtime lane from a thread, with the process's renderer."""

    def __init__(self, renderer: Renderer, settings: Settings, max_batch: int) -> None:
        import redis

        self.renderer = renderer
        self.settings = settings
        self.max_batch = max(1, max_batch)
        self.key = lane_key(renderer.spec.key)
        self.redis = redis.Redis.from_url(settings.broker_url or "", socket_connect_timeout=settings.publish_timeout,
                                          socket_timeout=WAIT_SECONDS + 5, health_check_interval=30)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-realtime", daemon=True)

    def start(self) -> RealtimeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_SECONDS + 10)
        self.redis.close()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                got = self.redis.blmpop(WAIT_SECONDS, 1, self.key, direction="LEFT", count=self.max_batch)
                if failing:
                    log.info("realtime lane %s reachable again", self.key)
                failing = False
            except Exception as exc:  # Redis is away: try again in a moment
                if not failing:
                    log.warning("realtime lane %s: %s", self.key, exc)
                failing = True
                self._stop.wait(1.0)
                continue
            if got:
                try:
                    self.serve(cast(list[bytes], got[1]))
                except Exception:  # serve answers every frame it can; this is a bug
                    log.exception("realtime lane %s: unhandled error", self.key)

    def serve(self, raw: list[bytes]) -> None:
        """Render the frames ``raw`` (compatible ones together) and publish each reply."""
        now = time.time()
        frames: list[tuple[Frame, GenerateInput]] = []
        replies: list[tuple[str, Reply]] = []
        for data in raw:
            try:
                frame = Frame.decode(data)
            except Exception as exc:
                log.warning("realtime lane %s: undecodable frame dropped (%s)", self.key, exc)
                continue
            if frame.expires < now:
                continue  # its API answered a timeout already
            try:
                frames.append((frame, admitted_input(frame.input)))
            except Exception as exc:
                replies.append((frame.reply, Reply(frame.id, error="invalid_input", reason=str(exc))))
        groups: dict[str, list[tuple[Frame, GenerateInput]]] = {}
        for frame, inp in frames:
            groups.setdefault(compat_key(inp.model_dump(mode="json"), frame.owner), []).append((frame, inp))
        with gate.frames():
            for group in groups.values():
                replies.extend(self._render(group))
        if replies:
            pipe = self.redis.pipeline(transaction=False)
            for channel, reply in replies:
                pipe.publish(channel, reply.encode())
            pipe.execute()

    def _render(self, group: list[tuple[Frame, GenerateInput]]) -> list[tuple[str, Reply]]:
        items = [RenderItem(inp, inp.seed or 0, i, tag=frame.id) for frame, inp in group for i in range(inp.num_images)]
        try:
            t0 = time.perf_counter()
            with owner_scope(group[0][0].owner):
                result = self.renderer.render_items(items)
            gpu = time.perf_counter() - t0
        except Exception as exc:
            from farm.errors import FarmError

            error = exc.error_type if isinstance(exc, FarmError) else "render_error"
            log.warning("realtime frame(s) %s failed: %s", [f.id for f, _ in group], exc)
            return [(f.reply, Reply(f.id, error=error, reason=str(exc) or type(exc).__name__)) for f, _ in group]
        by_frame: dict[str, list[Any]] = {}
        for image in result.images:
            by_frame.setdefault(image.tag, []).append(image)
        total = max(1, len(items))
        out = []
        for frame, inp in group:
            images = by_frame.get(frame.id, [])
            share = gpu * len(images) / total
            encoded = [(encode_image(im.image, inp.format), im) for im in images]
            body: dict[str, Any] = {
                "images": [{"content": data, "width": im.image.width, "height": im.image.height,
                            "content_type": ctype} for (data, ctype), im in encoded],
                "timings": {"inference": result.inference_seconds * len(images) / total, "render": share},
                "seed": inp.seed or 0,
                "has_nsfw_concepts": [im.nsfw for im in images],
                "nsfw_content_detected": [im.nsfw for im in images],
                "prompt": expand_prompt(inp.prompt) if inp.expand_prompt else inp.prompt,
            }
            if inp.request_id:
                body["request_id"] = inp.request_id
            out.append((frame.reply, Reply(frame.id, body=pack(body), model=inp.model_name, gpu_seconds=share)))
        return out
