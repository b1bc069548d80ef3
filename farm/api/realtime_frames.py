"""A realtime frame, from the bytes a client sent to an input the lane may take (``farm.api.realtime_session``).

The same admission as an HTTP request (``farm.admission``), plus what a frame adds: the realtime image
cap, a seed drawn when none is given (the reply says which), and its data URIs, which ride in the frame
instead of being stored: their decoded bytes together are capped by ``FARM_INLINE_INPUT_MAX_BYTES`` and
counted against the owner's ``FARM_UPLOAD_QUOTA_BYTES`` (``farm.inputs.quota``) while held. Everything
here may touch the file system or storage: the session calls it in a thread for any frame that could.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any

from farm import admission
from farm.api.deps import Tenant
from farm.config import Settings
from farm.errors import InvalidInputError
from farm.inputs.refs import decode_data_uri, kind_of
from farm.realtime.wire import unpack
from farm.schemas import GenerateInput

log = logging.getLogger("farm.api.realtime")
OFF_LOOP_BYTES = 64 * 1024  # a frame this big is decoded and admitted in a thread, not on the event loop


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


def decode(payload: bytes | str) -> Any:
    return unpack(payload) if isinstance(payload, bytes) else json.loads(payload)


def inline_bytes(inp: GenerateInput, settings: Settings) -> int:
    """Decoded bytes of the frame's data-URI inputs together; FrameError past ``inline_input_max_bytes``."""
    refs = ([(f"loras.{i}.path", x.path) for i, x in enumerate(inp.loras)]
            + [(f"embeddings.{i}.path", x.path) for i, x in enumerate(inp.embeddings)])
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
                         "URL, or delete some uploads")


def take(data: Any, tenant: Tenant, settings: Settings) -> tuple[GenerateInput, int]:
    """:func:`admit`, then the frame's inline bytes, capped (:func:`inline_bytes`)."""
    inp = admit(data, tenant, settings)
    return inp, inline_bytes(inp, settings)


def admit(data: Any, tenant: Tenant, settings: Settings) -> GenerateInput:
    """The frame's input, validated as an HTTP request would be, plus the realtime bounds."""
    if not isinstance(data, dict):
        raise FrameError("invalid_input", f"a frame must be a map of input fields (got {type(data).__name__})",
                         "input")
    try:  # the fields, their bounds, file references and upload owners (farm.admission)
        inp = admission.admit(data, tenant.owner, settings)
    except InvalidInputError as exc:
        raise FrameError("invalid_input", str(exc), exc.field) from None
    cap = min(settings.realtime_max_images, tenant.max_images or settings.realtime_max_images)
    if inp.num_images > cap:
        raise FrameError("invalid_input", f"num_images: at most {cap} per realtime frame (got {inp.num_images})",
                         "num_images")
    if inp.seed is None:
        inp.seed = random.randrange(2**31)  # the reply says which
    return inp
