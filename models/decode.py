"""Stage 5b of a render: latents to pixels, split so that the CPU side can run off the render thread.

The pipeline is called with ``output_type="latent"``; :class:`Decoder` then does what its
``__call__`` would have done (``vae.decode(latents / scaling_factor)``, the SDXL watermark if one
is installed, denormalise, round to uint8) with the same operations in the same order, so a CPU
render stays byte-identical to the pipeline's own ``output_type="pil"``. On CUDA the uint8 pixels
are copied into pinned memory without waiting: the render thread goes straight on to queue the
next batch, and whoever calls :meth:`Decoded.images` (the uploader thread of ``farm.render``)
waits for the copy, then builds the PIL images, safety checks and encodes while the GPU denoises
the next batch.

fp16 VAEs decode in fp16. A VAE whose fp16 output is not finite (the stock SDXL VAE overflows in
fp16) is decoded again by an fp32 copy, made once; from then on that copy decodes every batch
(logged once). So an fp16-safe VAE never pays for fp32, and the stock one pays what diffusers'
``force_upcast`` pays, plus one wasted fp16 decode.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)


class Decoded:
    """The uint8 pixels of one decoded micro-batch (``[N, H, W, 3]``, on the CPU once ``ready``)."""

    def __init__(self, pixels: torch.Tensor, ready: Any = None) -> None:
        self.pixels = pixels
        self.ready = ready  # a CUDA event recorded after the copy, or None (already there)

    def images(self) -> list[Image.Image]:
        if self.ready is not None:
            self.ready.synchronize()
        return [Image.fromarray(a) for a in self.pixels.numpy()]


class Decoder:
    """Decodes a pipeline's latents with its VAE (``pipe.vae``, which may be a tiny decoder)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.fp32_vae: Any = None  # made on the first non-finite fp16 decode, then used for every batch
        self._lock = threading.Lock()

    @property
    def upcast(self) -> bool:
        return self.fp32_vae is not None

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> Decoded:
        vae = self.pipe.vae
        image = self._decode(self.fp32_vae or vae, latents)
        # waits for this decode on every fp16 batch (until an overflowing VAE is found out and upcast): the
        # decode does not overlap the next batch's denoising, only the finishing in the uploader thread does;
        # to be measured on a GPU before it is moved into Decoded.images()
        if image.dtype == torch.float16 and not bool(torch.isfinite(image).all()):
            self._make_fp32_copy(vae)
            image = self._decode(self.fp32_vae, latents)
        watermark = getattr(self.pipe, "watermark", None)
        if watermark is not None:
            image = watermark.apply_watermark(image)
        # VaeImageProcessor.postprocess(image, "pil"): denormalise in the VAE's dtype, then float32
        pixels = ((image * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)
        if pixels.device.type != "cuda":
            return Decoded(pixels)
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Decoded(host, ready)

    def _decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        config = vae.config
        latents = latents.to(vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:  # SDXL-style VAEs with per-channel latent statistics
            shape = (1, len(mean), 1, 1)
            m = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            s = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = latents * s / config.scaling_factor + m
        else:
            latents = latents / config.scaling_factor
        image: torch.Tensor = vae.decode(latents, return_dict=False)[0]
        return image

    def _make_fp32_copy(self, vae: Any) -> None:
        with self._lock:
            if self.fp32_vae is not None:
                return
            copy = type(vae).from_config(vae.config)
            copy.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
            self.fp32_vae = copy.to(device=vae.device, dtype=torch.float32).eval()
            log.warning("%s: the VAE's fp16 output was not finite: decoding in fp32 from now on", type(vae).__name__)
