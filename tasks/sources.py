"""A claimed image-to-image or inpainting job's source images, read from storage and sized for the renderer.

By the time a worker claims such a job its images are in storage (a data URI was staged at submit, a URL
fetched by the fetch stage; an upload URL is read as the owner's upload). Their bytes are checked and
sized here (``models.source_image.prepare_sources``: format, pixel cap before decoding, mask size, EXIF
orientation, fal's sizing rules): a bad image fails the job with an error naming the field (an
InvalidInputError is final, farm.lifecycle.retry), as the API refuses it at submit when it has the bytes.
The job renders at the image's size: ``image_size`` on the render's params is the prepared size.
Realtime frames (``tasks.realtime``) get theirs through :func:`prepared`: a frame's data URI is decoded in
memory, never written.
"""

from __future__ import annotations

from farm.config import Settings
from farm.errors import InvalidInputError
from farm.image_schemas import image_fields
from farm.inputs.refs import decode_data_uri, kind_of
from farm.inputs.retrieve import materialise, owner_scope
from farm.lifecycle.claim import Claimed
from farm.schemas import GenerateInput, ImageSize
from models.rendered import SourceImages
from models.source_image import prepare_sources


def _read(field: str, ref: str, owner: str, settings: Settings) -> bytes:
    kind = kind_of(ref)
    if kind not in ("stored", "upload", "data"):  # a URL is fetched into storage before any claim
        raise InvalidInputError(field, "was not fetched before rendering")
    try:
        if kind == "data":
            return decode_data_uri(ref, settings.file_input_max_bytes)
        with owner_scope(owner):
            return materialise(kind, ref, settings).read_bytes()
    except ValueError as exc:
        raise InvalidInputError(field, str(exc)) from None


def sources_of(claimed: Claimed, settings: Settings) -> tuple[GenerateInput, SourceImages | None]:
    """The claimed job's params (``image_size``: the size it renders) and its prepared source images."""
    return prepared(claimed.params, claimed.owner, settings)


def prepared(params: GenerateInput, owner: str, settings: Settings,
             names: dict[str, str] | None = None) -> tuple[GenerateInput, SourceImages | None]:
    """``params`` sized to its source images, and the images; errors name ``names[field]`` where given (a
    realtime frame's ``image_bytes``)."""
    names = names or {}
    refs = dict(image_fields(params))
    if "image_url" not in refs:
        return params, None
    image_field, mask_field = names.get("image_url", "image_url"), names.get("mask_url", "mask_url")
    image = _read(image_field, refs["image_url"], owner, settings)
    mask = _read(mask_field, refs["mask_url"], owner, settings) if "mask_url" in refs else None
    target = params.size if "image_size" in params.model_fields_set and params.image_size is not None else None
    source = prepare_sources(
        image, mask, strength=float(getattr(params, "strength", 0.95)), target=target,
        preserve_aspect_ratio=bool(getattr(params, "preserve_aspect_ratio", False)),
        crop_output=bool(getattr(params, "crop_output", False)), max_pixels=settings.max_input_pixels,
        min_side=settings.min_image_side, max_side=settings.max_image_side, image_field=image_field,
        mask_field=mask_field,
    )  # fmt: skip
    width, height = source.image.size
    sized = params.model_copy(update={"image_size": ImageSize.model_construct(width=width, height=height)})
    return sized, source
