"""fal's realtime wire format: binary msgpack both ways, errors as JSON text frames.

What fal's clients expect (``fal_client._decode_realtime_message``, fal-js ``realtime/protocol.ts``):

- client → server: a binary msgpack map, the model's input (fal-js 0.x adds ``request_id``);
- server → client, a result: a binary msgpack map, here ``images: [{content, width, height,
  content_type}]`` (the bytes inline), ``timings``, ``seed``, ``has_nsfw_concepts`` (and fal-js
  demos' ``nsfw_content_detected``), ``prompt`` and the client's ``request_id`` when it sent one;
- server → client, an error: a text frame ``{"type": "x-fal-error", "error", "reason"}`` (here
  also ``field`` for bad input, and ``request_id``); the connection stays open.
- A refusal (key, token, limits) closes the socket with a 4xxx code and a reason; a frame over
  ``FARM_REALTIME_MAX_FRAME_BYTES`` closes it with 1009 and a reason naming the limit.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

# close codes (RFC 6455 leaves 4000-4999 to applications): the HTTP status + 3000
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_BAD_REQUEST = 4022
CLOSE_OVER_LIMIT = 4029
CLOSE_UNAVAILABLE = 1013  # "try again later"
CLOSE_TOO_BIG = 1009  # RFC 6455 "message too big": a frame over FARM_REALTIME_MAX_FRAME_BYTES
CLOSE_REASON_BYTES = 123  # the most a close frame's reason may hold


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def error_frame(error: str, reason: str, **extra: Any) -> str:
    """The text frame of an error that leaves the connection open."""
    return json.dumps({"type": "x-fal-error", "error": error, "reason": reason, **extra})


def close_reason(reason: str) -> str:
    """``reason`` cut to what a close frame holds (whole UTF-8 characters)."""
    raw = reason.encode()
    if len(raw) <= CLOSE_REASON_BYTES:
        return reason
    return raw[: CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."
