"""Input images of image-to-image and inpainting: bytes to a checked PIL image, sized as fal does.

Import-light (PIL only, no torch), so the API can refuse a bad image before any worker sees it,
and the batching key can use :func:`step_plan` without loading a model.

**Decoding** (:func:`decode_image`, :func:`decode_mask`). Accepted: PNG, JPEG, WebP (an animated
PNG or WebP gives its first frame). Anything else is refused naming the format (GIF, BMP, TIFF, …:
fewer decoders reachable from a tenant's bytes; convert to PNG). ``Image.open`` reads only the
header, so width × height is checked against the pixel cap (``FARM_MAX_INPUT_PIXELS``) before a
single pixel is decoded: a decompression bomb costs a header read. Then the pixels are decoded (a
truncated file is refused, never padded) and the EXIF orientation is applied
(``ImageOps.exif_transpose``), so a phone photo is upright. An image with alpha is flattened onto
white (a transparent sketch canvas reads as paper); a mask with alpha onto black (transparent:
keep). Every refusal is an ``InvalidInputError`` naming the caller's field (``image_url``,
``mask_url``, ``image_bytes``), never a path or URL.

**Sizing** (:func:`plan_size`), with ``min_side``/``max_side`` the farm's side bounds and sides
snapped to the nearest multiple of 8 (what every model here accepts) inside them:

* no ``image_size``: the input's own size, snapped (a 1024×1024 input gives 1024×1024, as fal's
  client tests expect); an input larger than ``max_side`` (or smaller than ``min_side``) is first
  scaled, aspect ratio kept, until it fits;
* ``image_size`` W×H, ``preserve_aspect_ratio`` false (fal's default): the output is W×H; the input
  is scaled to cover W×H and centre-cropped to it (``ImageOps.fit``), never stretched;
* ``image_size`` W×H, ``preserve_aspect_ratio`` true: the input is scaled to fit inside W×H,
  aspect ratio kept, and each side snapped (which may change the ratio by a few pixels, as fal says
  of its own snapping to 32);
* ``crop_output`` (fal: "the output cropped to the proper aspect ratio after generating"): the
  rendered image is centre-cropped to the largest box of the input's exact aspect ratio, undoing
  the snapping; with a W×H cover-crop there is nothing to undo.

**Strength** (:func:`step_plan`) follows diffusers: of an ``n``-step LCM schedule the last
``int(n * strength)`` steps run. When that is 0, the schedule passed to diffusers is lengthened
to the shortest one (n' > n) where ``int(n' * strength)`` is 1, so one step runs at the noise
level ``strength`` asks for. LCM's schedule has at most 50 steps (its ``original_inference_steps``):
below 1/50 no step can run, and such a strength is refused.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from farm.errors import InvalidInputError
from models.rendered import SourceImages

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
SIDE_MULTIPLE = 8
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps: the longest schedule it makes


@dataclass(frozen=True)
class StepPlan:
    """How a request's ``num_inference_steps`` and ``strength`` run: two requests share a batch only if
    their plans are equal (the timesteps of a batch are one)."""

    pipeline_steps: int  # num_inference_steps passed to diffusers
    steps_run: int  # denoising steps that actually run: int(pipeline_steps * strength)


def step_plan(num_inference_steps: int, strength: float, max_steps: int = LCM_ORIGINAL_STEPS) -> StepPlan:
    """The steps of an image-to-image or inpainting render (see the module doc); a strength outside (0, 1]
    or too small for any schedule is refused naming ``strength``."""
    if not 0.0 < strength <= 1.0:
        raise InvalidInputError("strength", f"must be greater than 0 and at most 1 (got {strength})")
    if num_inference_steps < 1:
        raise InvalidInputError("num_inference_steps", f"must be at least 1 (got {num_inference_steps})")
    for steps in range(num_inference_steps, max(num_inference_steps, max_steps) + 1):
        run = min(int(steps * strength), steps)  # diffusers' get_timesteps, the same float expression
        if run >= 1:
            return StepPlan(steps, run)
    raise InvalidInputError(
        "strength", f"{strength} is too small: LCM's longest schedule ({max_steps} steps) runs no step below "
        f"{1 / max_steps:g}")


def effective_steps(num_inference_steps: int, strength: float) -> int:
    """Denoising steps that actually run: ``int(num_inference_steps * strength)``, at least 1."""
    return step_plan(num_inference_steps, strength).steps_run


_MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _signature(data: bytes) -> str | None:
    """The accepted format ``data`` starts like, if any (to tell a cut-off image from something else)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def media_type(data: bytes) -> str:
    """The media type of an accepted image format ``data`` starts like (for a data URI); else octet-stream."""
    return _MEDIA_TYPES.get(_signature(data) or "", "application/octet-stream")


def _header(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """``data`` opened lazily (the header read, no pixel), its format and size checked; errors name ``field``."""
    if not data:
        raise InvalidInputError(field, "is empty, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInputError(field, f"image has more than {max_pixels} pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        known = _signature(data)
        reason = f"{known} image is truncated or corrupt" if known else "is not an image (PNG, JPEG or WebP expected)"
        raise InvalidInputError(field, reason) from None
    if image.format not in ACCEPTED_FORMATS:
        raise InvalidInputError(field, f"image format {image.format} is not supported (PNG, JPEG or WebP)")
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidInputError(
            field, f"image is {width}x{height}: more than {max_pixels} pixels (FARM_MAX_INPUT_PIXELS)")
    return image


def header_size(data: bytes, field: str, max_pixels: int) -> tuple[int, int]:
    """The upright (width, height) of an image from its header alone (format and pixel cap checked, no pixel
    decoded: a decompression bomb costs a header read); InvalidInputError naming ``field``."""
    with _header(data, field, max_pixels) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112)
    return (height, width) if orientation in _ROTATED else (width, height)


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Open ``data`` lazily, check format and header size, then decode it (pixels read here, not later)."""
    image = _header(data, field, max_pixels)
    try:
        image.load()  # the first frame only
        oriented = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        raise InvalidInputError(field, f"{image.format} image is truncated or corrupt") from None
    return oriented if oriented is not None else image


def _flatten(image: Image.Image, background: int) -> Image.Image:
    """``image`` without alpha: composited onto a grey level (255 white, 0 black)."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (background, background, background, 255))
        return Image.alpha_composite(flat, rgba).convert("RGB")
    return image


def decode_image(data: bytes, field: str = "image_url", max_pixels: int = 4096 * 4096) -> Image.Image:
    """An RGB image from ``data`` (see the module doc: formats, pixel cap before decoding, EXIF orientation)."""
    return _flatten(_open(data, field, max_pixels), 255).convert("RGB")


def decode_mask(data: bytes, size: tuple[int, int], field: str = "mask_url",
                max_pixels: int = 4096 * 4096) -> Image.Image:
    """A greyscale (``L``) mask from ``data``, white = repaint; it must have the image's ``size`` (after the
    EXIF orientation of each)."""
    mask = _flatten(_open(data, field, max_pixels), 0).convert("L")
    if mask.size != size:
        raise InvalidInputError(field, f"mask is {mask.width}x{mask.height}, the image is {size[0]}x{size[1]}: "
                                "they must be the same size")
    return mask


@dataclass(frozen=True)
class SizePlan:
    """How an input image becomes the render's input (see :func:`plan_size`)."""

    render: tuple[int, int]  # (width, height) the model renders: the request's image_size
    fit: bool  # True: cover render and centre-crop (ImageOps.fit); False: resize to render
    output: tuple[int, int]  # the size after crop_output (== render without it)


def _snap(value: float, min_side: int, max_side: int) -> int:
    low = math.ceil(min_side / SIDE_MULTIPLE) * SIDE_MULTIPLE
    high = max(low, max_side // SIDE_MULTIPLE * SIDE_MULTIPLE)
    return min(high, max(low, SIDE_MULTIPLE * math.floor(value / SIDE_MULTIPLE + 0.5)))  # halves round up


def _aspect_box(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The largest box of ``size``'s aspect ratio inside ``box`` (whole pixels)."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return min(box[0], max(1, round(size[0] * scale))), min(box[1], max(1, round(size[1] * scale)))


def plan_size(size: tuple[int, int], target: tuple[int, int] | None = None, *, preserve_aspect_ratio: bool = False,
              crop_output: bool = False, min_side: int = 64, max_side: int = 2048) -> SizePlan:
    """The render and output sizes of an input of ``size`` for a request's ``target`` image size (the
    rules are in the module doc)."""
    width, height = size
    if target is not None and not preserve_aspect_ratio:
        return SizePlan(render=target, fit=True, output=target)
    if target is None:
        scale = min(1.0, max_side / max(width, height))
        if min(width, height) * scale < min_side:
            scale = min_side / min(width, height)
    else:
        scale = min(target[0] / width, target[1] / height)
    render = _snap(width * scale, min_side, max_side), _snap(height * scale, min_side, max_side)
    return SizePlan(render=render, fit=False, output=_aspect_box(size, render) if crop_output else render)


def resize_to(image: Image.Image, plan: SizePlan, resample: Image.Resampling) -> Image.Image:
    """``image`` at ``plan.render`` (covered and centre-cropped, or resized), with ``resample``."""
    if image.size == plan.render:
        return image
    if plan.fit:
        return ImageOps.fit(image, plan.render, method=resample)
    return image.resize(plan.render, resample=resample)


def prepare_sources(image: bytes, mask: bytes | None = None, *, strength: float = 0.95,
                    target: tuple[int, int] | None = None, preserve_aspect_ratio: bool = False,
                    crop_output: bool = False, max_pixels: int = 4096 * 4096, min_side: int = 64,
                    max_side: int = 2048, image_field: str = "image_url",
                    mask_field: str = "mask_url") -> SourceImages:
    """Decode, check and size a request's image (and mask) for the renderer: ``result.image.size`` is the
    size the request must render (its ``image_size``); ``result.output_size`` the size of its images."""
    step_plan(LCM_ORIGINAL_STEPS, strength)  # refuses a strength no schedule can run, before decoding
    picture = decode_image(image, image_field, max_pixels)
    plan = plan_size(picture.size, target, preserve_aspect_ratio=preserve_aspect_ratio, crop_output=crop_output,
                     min_side=min_side, max_side=max_side)
    sized_mask = None
    if mask is not None:
        sized_mask = resize_to(decode_mask(mask, picture.size, mask_field, max_pixels), plan,
                               Image.Resampling.BILINEAR)
    return SourceImages(image=resize_to(picture, plan, Image.Resampling.LANCZOS), mask=sized_mask,
                        strength=strength, output_size=plan.output)
