"""``farm/hold``: a STAND-IN for a GPU model, for scheduling work on a CPU machine.

It computes nothing: each image is *held* for ``FARM_HOLD_MS`` milliseconds (a sleep, as if
a GPU were busy) and comes back as a flat image of the requested size, its colour derived
from ``seed + index``. So fan-out, batching, lanes and leases can be measured with real
workers, broker, ledger and storage, and the hold time is the "GPU" time to compare with.
Import-light: a worker of ``farm/hold`` never imports torch, diffusers or transformers.
There is no safety checker (``nsfw`` is always False); LoRAs and embeddings are ignored, and so are
source images (image-to-image, inpainting: held as long as a text-to-image image; the flat image has
the source's output size, as a rendered one would).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence

from PIL import Image

from farm.config import Settings, get_settings
from farm.errors import RenderError
from farm.schemas import GenerateInput
from models.registry import ModelSpec, get_model
from models.rendered import PendingRender, ProgressHook, Ready, RenderedImage, RenderItem, RenderResult, SourceImages

__all__ = ["HoldRenderer", "flat_colour"]

log = logging.getLogger(__name__)
STAND_IN_NOTE = "stand-in, held not rendered"


def flat_colour(seed: int, index: int) -> tuple[int, int, int]:
    """The RGB colour of image ``index`` of a request with ``seed`` (depends on ``seed + index`` only)."""
    digest = hashlib.sha256(str(seed + index).encode()).digest()
    return digest[0], digest[1], digest[2]


def _output_size(item: RenderItem) -> tuple[int, int]:
    """The size of ``item``'s image: its source's output size (``crop_output``), else the request's size."""
    if item.source is not None and item.source.output_size is not None:
        return item.source.output_size
    return item.params.size


class HoldRenderer:
    """A ``models.protocol.Renderer`` that holds each image instead of rendering it."""

    spec: ModelSpec
    device: str
    loads: int
    stand_in_note = STAND_IN_NOTE
    recompiles = 0  # nothing is compiled
    cold_renders = 0

    def __init__(self, spec: ModelSpec, device: str, settings: Settings) -> None:
        if spec.family != "hold":
            raise RenderError(f"{spec.name} is not a hold stand-in")
        self.spec = spec
        self.device = device
        self.settings = settings
        self.hold_seconds = settings.hold_ms / 1000
        self.loads = 1
        self.micro_batch = spec.max_batch
        self.load_seconds = 0.0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_name: str, device: str = "cpu", settings: Settings | None = None) -> HoldRenderer:
        settings = settings or get_settings()
        renderer = cls(get_model(model_name, settings), device, settings)
        log.warning("%s is a STAND-IN (holds %d ms per image, renders flat images): "
                    "for scheduling measurements only", model_name, settings.hold_ms)
        return renderer

    def find_max_batch(self) -> int:
        return self.settings.batch_size or self.spec.max_batch

    def warm_compiled(self) -> float:
        """Nothing to compile."""
        return 0.0

    def render(self, params: GenerateInput, seed: int, indices: Sequence[int],
               source: SourceImages | None = None) -> RenderResult:
        """Hold ``len(indices)`` × hold_ms, then return flat images; image ``i`` is coloured by ``seed + i``."""
        return self.render_items([RenderItem(params, seed, i, source=source) for i in indices])

    def begin_items(self, items: Sequence[RenderItem], on_progress: ProgressHook | None = None) -> PendingRender:
        """As ``render_items``: nothing is left to finish."""
        return Ready(self.render_items(items, on_progress))

    def render_items(self, items: Sequence[RenderItem], on_progress: ProgressHook | None = None) -> RenderResult:
        """Hold each image hold_ms (``on_progress`` after each), then return flat images."""
        items = list(items)
        if not items:
            raise RenderError("no image indices to render")
        for item in items:
            if item.params.model_name != self.spec.name:
                raise RenderError(f"this worker serves {self.spec.name!r}, not {item.params.model_name!r}")
            if not 0 <= item.index < item.params.num_images:
                raise RenderError(f"image index {item.index} outside 0..{item.params.num_images - 1} (num_images)")
        with self._lock:
            t0 = time.perf_counter()
            for _ in items:
                time.sleep(self.hold_seconds)
                if on_progress is not None:
                    on_progress()
            held = time.perf_counter() - t0
        images = [
            RenderedImage(index=i.index, seed=i.seed + i.index, image=Image.new("RGB", _output_size(i),
                          flat_colour(i.seed, i.index)), nsfw=False, render_seconds=held / len(items), tag=i.tag)
            for i in items
        ]
        log.info("%s (%s): held %d image(s) for %.3f s", self.spec.name, STAND_IN_NOTE, len(items), held)
        return RenderResult(images=images, prompt=items[0].params.prompt, inference_seconds=held)
