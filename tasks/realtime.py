"""The realtime lane in a worker: frames taken from Redis ahead of every batch, answered inline.

A thread of the worker's pool process waits on its model's lane (``farm.realtime.lane``) with
``BLMPOP``: one round trip gives it every frame waiting, up to the worker's batch size. Frames of
compatible inputs render as one batch, through the same renderer as batches; each image is encoded
at once and the reply, images inline, is published on the API process's channel. No job row, no
upload. A frame past its expiry (its API answered a timeout) is dropped unrendered.

A frame's data URIs ride in the frame: the renderer decodes each into the worker's input cache
(``farm.inputs.retrieve.materialise``), and the copy is deleted once the frame's group is rendered,
so nothing a frame brought outlives it (HTTP and bulk jobs never hand a worker a data URI: theirs are
stored at submit and cached by key, so no batch shares these files).

Image-to-image and inpainting frames (fal's sketch demo) carry their image as a data URI (the API made
it from ``image_bytes``): it is decoded in memory, checked and sized (``tasks.sources.prepared``, as a
job's are) and rendered as the frame's source; a bad one is answered with an error naming the field
the client sent. Frames are grouped by the batching key of jobs (``db.batches.compat_key``): tasks,
sizes, step plans and source images never share a render.

An error reply says what the farm's own errors say (written for users: bad input, unreadable weights);
anything else (an OSError, a storage or library error may name paths, keys, hosts) gets a fixed
sentence, and the detail goes to this worker's log, once.

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
from farm.errors import BrokerUnavailableError, FarmError, InvalidInputError, StorageError
from farm.image_schemas import admitted_input, weight_refs
from farm.inputs.retrieve import forget, owner_scope
from farm.realtime.lane import Frame, Reply, lane_key
from farm.realtime.wire import pack
from farm.schemas import GenerateInput
from models.encode import encode_image
from models.prompt import expand_prompt
from models.protocol import Renderer
from models.rendered import RenderItem
from tasks.sources import prepared

log = logging.getLogger(__name__)
WAIT_SECONDS = 1  # BLMPOP timeout: how often the thread looks at its stop flag
FAILED = "the frame could not be rendered (an internal error; the worker's log has the details)"
INVALID = "the frame's input could not be read by the worker (the worker's log has the details)"


def public_reason(exc: BaseException) -> str:
    """What the frame's client is told: the farm's own errors as they are, a fixed sentence otherwise."""
    if isinstance(exc, FarmError) and not isinstance(exc, StorageError | BrokerUnavailableError):
        return str(exc) or FAILED
    return FAILED


def forget_inline(inputs: list[GenerateInput], settings: Settings) -> None:
    """Delete the worker's copies of these inputs' data URIs (``farm.inputs.retrieve.forget``)."""
    for inp in inputs:
        for _, path in weight_refs(inp):
            forget(path, settings)


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
            except Exception as exc:  # the API admitted it: a version skew; the text may quote megabytes
                log.warning("realtime frame %s: unreadable input: %s", frame.id, str(exc)[:500])
                replies.append((frame.reply, Reply(frame.id, error="invalid_input", reason=INVALID)))
        groups: dict[str, list[tuple[Frame, GenerateInput]]] = {}
        for frame, inp in frames:
            groups.setdefault(compat_key(inp.model_dump(mode="json"), frame.owner), []).append((frame, inp))
        with gate.frames():
            for group in groups.values():
                try:
                    replies.extend(self._render(group))
                finally:
                    forget_inline([inp for _, inp in group], self.settings)
        if replies:
            pipe = self.redis.pipeline(transaction=False)
            for channel, reply in replies:
                pipe.publish(channel, reply.encode())
            pipe.execute()

    def _sources(self, group: list[tuple[Frame, GenerateInput]]) -> tuple[list[RenderItem], list[tuple[str, Reply]]]:
        """The group's render items, each frame's source images prepared; an error reply for each frame whose
        images cannot be (naming the client's field)."""
        items, errors = [], []
        for frame, inp in group:
            try:
                params, source = prepared(inp, frame.owner, self.settings, frame.names)
            except InvalidInputError as exc:  # the API read the header; this is the rest of the file
                errors.append((frame.reply, Reply(frame.id, error="invalid_input", reason=str(exc), field=exc.field)))
                continue
            except FarmError as exc:
                errors.append((frame.reply, Reply(frame.id, error=exc.error_type, reason=public_reason(exc))))
                continue
            except Exception:  # storage, cache or ledger trouble reading its images: this frame fails alone
                log.exception("realtime frame %s: its source images could not be read", frame.id)
                errors.append((frame.reply, Reply(frame.id, error="render_error", reason=FAILED)))
                continue
            items += [RenderItem(params, inp.seed or 0, i, tag=frame.id, source=source) for i in range(inp.num_images)]
        return items, errors

    def _render(self, group: list[tuple[Frame, GenerateInput]]) -> list[tuple[str, Reply]]:
        items, errors = self._sources(group)
        failed = {reply.id for _, reply in errors}
        group = [(frame, inp) for frame, inp in group if frame.id not in failed]
        if not group:
            return errors
        try:
            t0 = time.perf_counter()
            with owner_scope(group[0][0].owner):
                result = self.renderer.render_items(items)
            gpu = time.perf_counter() - t0
        except Exception as exc:
            error = exc.error_type if isinstance(exc, FarmError) else "render_error"
            log.warning("realtime frame(s) %s failed: %s: %s", [f.id for f, _ in group], type(exc).__name__, exc)
            return errors + [(f.reply, Reply(f.id, error=error, reason=public_reason(exc))) for f, _ in group]
        by_frame: dict[str, list[Any]] = {}
        for image in result.images:
            by_frame.setdefault(image.tag, []).append(image)
        total = max(1, len(items))
        out = errors
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
