"""The realtime lane of a model's pool on Redis: names and envelopes (API ↔ workers).

- ``farm:realtime:<model-key>``: a list of frames (msgpack envelopes), taken by any worker of the
  model (``BLMPOP``), ahead of its batches. Bounded: every push trims it to :data:`LANE_MAX` and
  sets an expiry, so frames nobody takes never pile up (each connection has at most one frame
  here at a time; latest-wins buffering happens in the API, per connection).
- ``farm:realtime:reply:<api-process>``: a pub/sub channel per API process; the worker publishes
  each reply there, the process routes it to its connection by frame id.
- ``farm:realtime:conns:<owner>``: a sorted set of the owner's open connections (score: when the
  entry expires unless refreshed), for the per-owner connection limit across API processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from farm.realtime.wire import pack, unpack

LANE_MAX = 10_000  # frames waiting per model, whatever happens
LANE_TTL_SECONDS = 60  # a lane no one pushes to for this long goes away (with any stale frames)


def lane_key(model_key: str) -> str:
    return f"farm:realtime:{model_key}"


def reply_channel(process_id: str) -> str:
    return f"farm:realtime:reply:{process_id}"


def connections_key(owner: str) -> str:
    return f"farm:realtime:conns:{owner}"


@dataclass(frozen=True)
class Frame:
    """One frame for a worker: the admitted input (a JSON-able dict), whose it is, where to reply."""

    id: str
    reply: str
    owner: str
    input: dict[str, Any]
    expires: float  # Unix time: a worker drops the frame after this (the API has answered a timeout)
    names: dict[str, str] = field(default_factory=dict)  # input field → the client's (image_url → image_bytes)

    def encode(self) -> bytes:
        return pack({"id": self.id, "reply": self.reply, "owner": self.owner, "input": self.input,
                     "expires": self.expires, "names": self.names})  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Frame:
        d = unpack(data)
        return cls(str(d["id"]), str(d["reply"]), str(d["owner"]), dict(d["input"]), float(d["expires"]),
                   {str(k): str(v) for k, v in (d.get("names") or {}).items()})


@dataclass(frozen=True)
class Reply:
    """A worker's answer to a frame: the client's msgpack bytes, or an error."""

    id: str
    body: bytes = b""  # the result, packed for the client as is
    model: str = ""
    gpu_seconds: float = 0.0
    error: str = ""
    reason: str = ""
    field: str = ""  # the input field a bad-input error names

    def encode(self) -> bytes:
        return pack({"id": self.id, "body": self.body, "model": self.model, "gpu": self.gpu_seconds,
                     "error": self.error, "reason": self.reason, "field": self.field})  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        d = unpack(data)
        return cls(str(d["id"]), bytes(d.get("body") or b""), str(d.get("model") or ""), float(d.get("gpu") or 0),
                   str(d.get("error") or ""), str(d.get("reason") or ""), str(d.get("field") or ""))  # fmt: skip
