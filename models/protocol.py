"""What a worker needs of a loaded model: the :class:`Renderer` protocol.

Import-light (no torch): the diffusers renderer (``models.renderer``) and the scheduling stand-in
(``models.hold``) both satisfy it; workers (tasks/) are typed against it, never probe with ``getattr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from models.registry import ModelSpec
from models.rendered import PendingRender, ProgressHook, RenderItem, RenderResult


@runtime_checkable
class Renderer(Protocol):
    """One model loaded once on one device; renders groups of images, each with its own params and seed."""

    spec: ModelSpec
    device: str
    loads: int  # how many times a pipeline was loaded (stays 1 in steady state)
    micro_batch: int  # the most images one pass renders

    @property
    def recompiles(self) -> int:
        """Graphs torch.compile built after warm-up (0 without FARM_COMPILE; see ``models.speed``)."""

    @property
    def cold_renders(self) -> int:
        """Micro-batches that ran uncompiled after warm-up although FARM_COMPILE is set."""

    @property
    def stand_in_note(self) -> str | None:
        """What a stand-in says it did instead of rendering (``farm/hold``); None for a real model."""

    def find_max_batch(self) -> int:
        """The most images one batch may hold on this device."""

    def warm_compiled(self) -> float:
        """With FARM_COMPILE: compile every shape this worker serves before it joins; seconds taken."""

    def begin_items(self, items: Sequence[RenderItem], on_progress: ProgressHook | None = None) -> PendingRender:
        """Denoise ``items``; the result may still be finishing (decode, safety check) when this returns.

        An item with ``source`` images renders image-to-image or inpainting (``models.rendered.SourceImages``);
        a renderer that cannot render them from the images (a stand-in) says so in ``stand_in_note``."""

    def render_items(self, items: Sequence[RenderItem], on_progress: ProgressHook | None = None) -> RenderResult:
        """Render ``items`` to the end."""
