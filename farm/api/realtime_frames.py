"""A realtime frame, from the bytes a client sent to an input the lane may take (``farm.api.realtime_session``).

The same admission as an HTTP request (``farm.admission``), plus what a frame adds: the realtime image
cap, a seed drawn when none is given (the reply says which), and its data URIs, which ride in the frame
instead of being stored: their decoded bytes together are capped by ``FARM_INLINE_INPUT_MAX_BYTES`` and
counted against the owner's ``FARM_UPLOAD_QUOTA_BYTES`` (``farm.inputs.quota``) while held. Everything
here may touch the file system or storage: the session calls it in a thread for any frame that could.

Image-to-image and inpainting frames (the ``…/image-to-image/realtime`` and ``…/inpainting/realtime``
sockets) carry their images as fal's sketch demo sends them, raw ``image_bytes`` / ``mask_bytes`` (msgpack
bin), or as ``image_url`` / ``mask_url`` data URIs (older demos) or the owner's upload URLs. Raw bytes
become data URIs here, so that they pass the very checks a data URI passes (format and pixel cap from the
header, mask size, the inline cap, the quota) and ride in the frame to the worker: nothing is stored,
no job row is written. An error about them names the field the client sent (``image_bytes``).
"""

from __future__ import annotations

import base64
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from farm import admission
from farm.api.deps import Tenant
from farm.config import Settings
from farm.errors import InvalidInputError
from farm.image_schemas import TEXT_TO_IMAGE, file_refs
from farm.inputs.refs import decode_data_uri, kind_of
from farm.realtime.wire import unpack
from farm.schemas import GenerateInput

log = logging.getLogger("farm.api.realtime")
OFF_LOOP_BYTES = 64 * 1024  # a frame this big is decoded and admitted in a thread, not on the event loop
RAW_FIELDS = {"image_bytes": "image_url", "mask_bytes": "mask_url"}  # fal's sketch demo → the input's field
FILE_FIELDS = ("loras", "embeddings", *RAW_FIELDS, *RAW_FIELDS.values())  # frames admitted off the event loop
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"RIFF", "image/webp"))


class FrameError(Exception):
    """Raised when a frame cannot be admitted: ``error`` and ``reason`` go to the client."""

    def __init__(self, error: str, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.error, self.reason, self.field = error, reason, field


def request_id(data: Any) -> str | None:
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and rid else None


@dataclass(frozen=True)
class Waiting:
    """A frame admitted and held: its input, the client's request id, what it holds (frame bytes as
    received, decoded data-URI bytes)."""

    inp: GenerateInput
    request_id: str | None
    size: int
    inline: int
    names: dict[str, str] | None = None  # input field → the frame's own (image_url → image_bytes)


def decode(payload: bytes | str) -> Any:
    return unpack(payload) if isinstance(payload, bytes) else json.loads(payload)


def inline_bytes(inp: GenerateInput, settings: Settings) -> int:
    """Decoded bytes of the frame's data-URI inputs together; FrameError past ``inline_input_max_bytes``."""
    refs = file_refs(inp)
    total, cap = 0, settings.inline_input_max_bytes
    for field, path in refs:
        if kind_of(path) != "data":
            continue
        total += len(decode_data_uri(path, settings.file_input_max_bytes))  # admitted: it decodes
        if total > cap:
            raise FrameError("invalid_input", f"the frame's data URIs hold {total} bytes together by here, more "
                             f"than the {cap} allowed inline (FARM_INLINE_INPUT_MAX_BYTES): upload the file "
                             "(POST /storage/upload) and send its URL", field)
    return total


def quota_room(owner: str, adding: int, settings: Settings) -> None:
    """FrameError unless ``adding`` more bytes fit in the owner's upload quota (``farm.inputs.quota``)."""
    from farm.inputs.quota import UploadQuotaError, room

    try:
        left = room(owner, settings)
    except UploadQuotaError as exc:
        raise FrameError(exc.error_type, str(exc)) from None
    except Exception as exc:  # a guard that cannot read fails closed; the detail stays in the log
        log.warning("realtime (%s): upload quota unreadable: %s", owner, exc)
        raise FrameError("unavailable", "the upload quota cannot be read now, so a frame with data URIs cannot be "
                         "counted against it; try again") from None
    if adding > left:
        raise FrameError(UploadQuotaError.error_type, f"this owner's uploads and stored inputs would pass the "
                         f"{settings.upload_quota_bytes} bytes allowed (FARM_UPLOAD_QUOTA_BYTES) with the {adding} "
                         "bytes of data URIs its realtime frames would hold: upload the file once and send its "
                         "URL, or delete some uploads (DELETE on an upload's URL)")


def take(data: Any, tenant: Tenant, settings: Settings, task: str = TEXT_TO_IMAGE) -> tuple[GenerateInput, int]:
    """:func:`admit`, then the frame's inline bytes, capped (:func:`inline_bytes`)."""
    names = raw_names(data)
    inp = admit(data, tenant, settings, task)
    try:
        return inp, inline_bytes(inp, settings)
    except FrameError as exc:
        raise _renamed(exc, names) from None


def raw_names(data: Any) -> dict[str, str]:
    """The input fields a frame gives as raw bytes, and the frame's name for each (``image_url`` → ``image_bytes``)."""
    if not isinstance(data, dict):
        return {}
    return {field: raw for raw, field in RAW_FIELDS.items() if raw in data}


def _data_uri(raw: Any, field: str, settings: Settings) -> str:
    """Raw image bytes as a data URI (capped like one); FrameError naming ``field``."""
    if not isinstance(raw, bytes | bytearray):
        raise FrameError("invalid_input", f"{field}: must be the image file's bytes (msgpack bin; PNG, JPEG or "
                         f"WebP), got {type(raw).__name__}", field)
    if len(raw) > settings.file_input_max_bytes:
        raise FrameError("invalid_input", f"{field}: {len(raw)} bytes, more than the {settings.file_input_max_bytes}"
                         " allowed (FARM_FILE_INPUT_MAX_BYTES)", field)
    mime = next((m for sig, m in _SIGNATURES if raw.startswith(sig)), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def _renamed(exc: FrameError, names: dict[str, str]) -> FrameError:
    """``exc`` naming the frame's field (``image_bytes``) where it names the input's (``image_url``)."""
    if exc.field not in names:
        return exc
    raw = names[exc.field]
    reason = raw + exc.reason[len(exc.field):] if exc.reason.startswith(exc.field) else exc.reason
    return FrameError(exc.error, reason, raw)


def admit(data: Any, tenant: Tenant, settings: Settings, task: str = TEXT_TO_IMAGE) -> GenerateInput:
    """The frame's input, validated as an HTTP request would be, plus the realtime bounds. ``task``: the
    socket's endpoint (``farm.image_schemas``); at the app's root, the one the fields name."""
    if not isinstance(data, dict):
        raise FrameError("invalid_input", f"a frame must be a map of input fields (got {type(data).__name__})",
                         "input")
    names = raw_names(data)
    fields = dict(data)
    for field, raw in names.items():
        if field in fields:
            raise FrameError("invalid_input", f"{raw}: give either {raw} or {field}, not both", raw)
        fields[field] = _data_uri(fields.pop(raw), raw, settings)
    if task != TEXT_TO_IMAGE and "image_url" not in fields:
        raise FrameError("invalid_input", "image_bytes: required (the image's PNG/JPEG bytes; or image_url as a "
                         "data URI)", "image_bytes")
    for field, ref in image_fields_of(fields):
        if kind_of(ref) == "url":  # a worker's lane answers in milliseconds: it fetches nothing
            raise FrameError("invalid_input", f"{names.get(field, field)}: a realtime frame carries its image (raw "
                             "bytes, a data URI or an upload URL), not an https:// URL", names.get(field, field))
    try:  # the fields, their bounds, file references and upload owners (farm.admission)
        inp = admission.admit(fields, tenant.owner, settings, None if task == TEXT_TO_IMAGE else task)
    except InvalidInputError as exc:
        raise _renamed(FrameError("invalid_input", str(exc), exc.field), names) from None
    cap = min(settings.realtime_max_images, tenant.max_images or settings.realtime_max_images)
    if inp.num_images > cap:
        raise FrameError("invalid_input", f"num_images: at most {cap} per realtime frame (got {inp.num_images})",
                         "num_images")
    if inp.seed is None:
        inp.seed = random.randrange(2**31)  # the reply says which
    return inp


def image_fields_of(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, reference) of raw fields' source images given as strings."""
    return [(name, value) for name in ("image_url", "mask_url") if isinstance(value := fields.get(name), str)]
