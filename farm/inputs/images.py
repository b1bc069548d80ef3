"""Source images of image-to-image and inpainting requests, vetted at admission.

``image_url`` / ``mask_url`` take the forms a LoRA path takes, less the local ones: an ``https://`` URL
(vetted by the SSRF guard; the fetch stage gets it into storage before any worker claims the job), a
base64 ``data:`` URI (staged to storage at submit) or a farm upload URL of the request's owner. So they
count against the same caps (``file_input_max_bytes``, ``inline_input_max_bytes``) and the same
storage quota as LoRAs. Where the bytes are already here (a data URI; an upload, read once from
storage), the header is read now, before anything is recorded: format, pixel cap
(``max_input_pixels``, so a decompression bomb costs a header read) and, for inpainting, the mask's size
against the image's (after EXIF orientation). A URL's bytes are checked by the worker, which fails the
job with an error naming the field. Errors name the field, never a path, bucket or key.
"""

from __future__ import annotations

from farm.config import Settings
from farm.errors import InvalidInputError
from farm.image_schemas import image_fields
from farm.inputs.refs import check_input, decode_data_uri, kind_of, upload_key, upload_owner
from farm.inputs.retrieve import materialise, owner_scope
from farm.schemas import GenerateInput
from models.source_image import header_size, step_plan

FORMS = "must be an https:// URL, a base64 data: URI or a farm upload URL"


def _bytes_here(field: str, ref: str, owner: str | None, settings: Settings) -> bytes | None:
    """The reference's bytes if they are here without a download (data URI, the owner's upload); else None."""
    kind = kind_of(ref)
    if kind == "data":
        return decode_data_uri(ref, settings.file_input_max_bytes)
    if kind == "upload" and owner is not None:
        with owner_scope(owner):
            return materialise("upload", ref, settings).read_bytes()
    return None


def check_images(inp: GenerateInput, owner: str | None, settings: Settings) -> None:
    """Refuse a bad source image or mask reference (see the module doc); nothing for text-to-image."""
    fields = image_fields(inp)
    if not fields:
        return
    step_plan(inp.num_inference_steps, float(getattr(inp, "strength", 1.0)))  # a strength no schedule runs
    sizes: dict[str, tuple[int, int]] = {}
    for field, ref in fields:
        kind = kind_of(ref)
        if kind not in ("data", "upload", "url"):
            raise InvalidInputError(field, FORMS)
        key = upload_key(ref) if kind == "upload" else None
        if key is not None and owner is not None and upload_owner(key) != owner:
            raise InvalidInputError(field, "no such upload for this owner")
        try:
            check_input(ref, settings)  # the SSRF guard's vetting, no DNS
            data = _bytes_here(field, ref, owner, settings)
        except ValueError as exc:
            raise InvalidInputError(field, str(exc)) from None
        if data is not None:
            sizes[field] = header_size(data, field, settings.max_input_pixels)
    image, mask = sizes.get("image_url"), sizes.get("mask_url")
    if image is not None and mask is not None and image != mask:
        raise InvalidInputError("mask_url", f"mask is {mask[0]}x{mask[1]}, the image is {image[0]}x{image[1]}: "
                                "they must be the same size")
