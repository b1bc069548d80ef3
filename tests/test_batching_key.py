"""The cross-request batching key (db.batches.compat_key): one key for ledger batches and realtime frames.

SDXL renders a frame with no negative prompt differently from one with a negative prompt, so the two
never share a GPU batch, on the batch path or the realtime lane (the realtime copy of the key once
dropped ``has_negative_prompt``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from db.batches import compat_key
from farm.config import get_settings
from farm.realtime.lane import Frame
from farm.schemas import GenerateInput
from tasks.realtime import RealtimeServer

SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def _key(owner: str = "alice", **fields: Any) -> str:
    return compat_key(GenerateInput.model_validate({"prompt": "a cat", "model_name": SDXL, **fields})
                      .model_dump(mode="json"), owner)


def test_negative_prompt_splits_the_key(farm_env: Path) -> None:
    assert _key(negative_prompt="blurry") != _key()
    assert _key(negative_prompt="blurry") == _key(negative_prompt="low quality", prompt="a dog", seed=4)
    assert _key(owner="bob") == _key()  # no LoRA: owners share


class _Renderer:
    """Records each GPU batch it is asked for, then fails it (the replies are errors: no image to encode)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def render_items(self, items: list[Any]) -> Any:
        self.batches.append(sorted({item.tag for item in items}))
        raise RuntimeError("not rendered")


class _Redis:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def pipeline(self, transaction: bool = False) -> _Redis:
        return self

    def publish(self, channel: str, data: bytes) -> None:
        self.published.append((channel, data))

    def execute(self) -> None:
        pass


def _serve(frames: dict[str, dict[str, Any]]) -> list[list[str]]:
    server = RealtimeServer.__new__(RealtimeServer)  # no Redis connection: serve() is given the frames
    server.renderer, server.redis, server.key = _Renderer(), _Redis(), "test"
    server.settings = get_settings()
    raw = [Frame(fid, "reply", "alice", {"prompt": "a cat", "model_name": SDXL, **fields}, time.time() + 60).encode()
           for fid, fields in frames.items()]
    server.serve(raw)
    assert len(server.redis.published) == len(frames)  # every frame answered
    return sorted(server.renderer.batches)


def test_realtime_frames_with_and_without_negative_prompt_do_not_share_a_batch(farm_env: Path) -> None:
    assert _serve({"a": {}, "b": {"negative_prompt": "blurry"}}) == [["a"], ["b"]]
    assert _serve({"a": {}, "b": {"seed": 3}, "c": {"negative_prompt": "x"}, "d": {"negative_prompt": "y"}}) == [
        ["a", "b"], ["c", "d"]]


def _image_key(task: str = "image-to-image", **fields: Any) -> str:
    from farm.image_schemas import admitted_input

    base: dict[str, Any] = {"prompt": "a cat", "model_name": SDXL, "image_url": "farm-stored:alice/inputs/a.bin"}
    if task == "inpainting":
        base["mask_url"] = "farm-stored:alice/inputs/m.bin"
    return compat_key(admitted_input({**base, **fields}).model_dump(mode="json"), "alice")


def test_image_tasks_never_share_with_other_tasks_sizes_or_step_plans(farm_env: Path) -> None:
    text = _key(image_size={"width": 512, "height": 512})
    i2i = _image_key(image_size={"width": 512, "height": 512}, num_inference_steps=4, strength=0.5)
    assert len({text, i2i, _image_key("inpainting", image_size={"width": 512, "height": 512},
                                      num_inference_steps=4, strength=0.5)}) == 3  # one task per batch
    # effective steps: int(4 * 0.5) = 2 and int(4 * 0.75) = 3 differ; int(4 * 0.6) = 2 is the same plan
    assert i2i != _image_key(image_size={"width": 512, "height": 512}, num_inference_steps=4, strength=0.75)
    assert i2i == _image_key(image_size={"width": 512, "height": 512}, num_inference_steps=4, strength=0.6,
                             prompt="a dog", seed=9)
    # sizes: another image_size, or another source image (no image_size: the image's own size), never share
    assert i2i != _image_key(image_size={"width": 512, "height": 768}, num_inference_steps=4, strength=0.5)
    assert _image_key() != _image_key(image_url="farm-stored:alice/inputs/b.bin")
    assert _image_key() != _image_key(preserve_aspect_ratio=True, image_size={"width": 512, "height": 512})


def test_source_images_share_a_batch_only_within_one_owner_and_one_mask(farm_env: Path) -> None:
    """A GPU batch fails or succeeds together: a job's source image and mask are its own input, so two
    owners' jobs on one public image, or one owner's jobs with other masks, never share a batch."""
    base = {"model_name": "farm/tiny-lcm", "prompt": "p", "num_inference_steps": 4, "strength": 0.5,
            "image_url": "https://example.com/cat.png"}
    masked = {**base, "mask_url": "https://example.com/mask-a.png"}
    assert compat_key(base, "alice") == compat_key(dict(base), "alice")
    assert compat_key(base, "alice") != compat_key(base, "bob")
    assert compat_key(masked, "alice") != compat_key({**masked, "mask_url": "https://example.com/mask-b.png"}, "alice")
