"""A user's file reference (LoRA / embedding ``path``), parsed and vetted without any I/O but a stat.

Accepted: a file under the allowed root (``files_root``; no path may point outside it), a hub id
``owner/name``, a base64 ``data:`` URI (decoded size at most ``file_input_max_bytes``), one of our own
upload URLs (``…/storage/files/<owner>/uploads/<id>/<name>``, only for the owner who uploaded it), or an
``https://`` URL (``http://`` only for an allow-listed host), vetted by the SSRF guard (``farm.netguard``)
without a DNS lookup. ``farm-stored:<key>`` is a form only the farm writes (refused in user input).

The first stage of ``farm.inputs``: imports no other module of it.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

import httpx

from farm import netguard
from farm.config import Settings
from farm.errors import InvalidInputError

if TYPE_CHECKING:
    from farm.schemas import GenerateInput

Kind = Literal["data", "upload", "url", "stored"]
STORED = "farm-stored:"  # prefix of an input the farm moved to storage (never accepted from a user)

UPLOAD_PATH = re.compile(r"/storage/files/(?P<owner>[^/]+)/uploads/(?P<id>[0-9a-f]{32})/(?P<name>[^/]+)$")

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def kind_of(path: str) -> Kind | None:
    """``data``, ``upload``, ``url`` or ``stored`` for a remote input, None for anything else."""
    if path.startswith(STORED):
        return "stored"
    lowered = path[:8].lower()
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith(("http://", "https://")):
        return "upload" if upload_key(path) else "url"
    return None


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:`` URI; ValueError naming the reason when it is not acceptable."""
    header, comma, data = uri[5:].partition(",")
    if not comma:
        raise ValueError("a data URI needs a ',' before its data")
    if header.split(";")[-1].strip().lower() != "base64":
        raise ValueError("a data URI must be base64-encoded ('data:<type>;base64,<data>')")
    if "%" in data:
        data = unquote(data)
    if any(c.isspace() for c in data[:64]) or any(c.isspace() for c in data[-64:]):
        data = "".join(data.split())
    estimate = len(data) * 3 // 4 - data[-2:].count("=")
    if estimate > max_bytes:
        raise ValueError(f"data URI holds about {_mib(estimate)}, more than the {_mib(max_bytes)} allowed")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data URI is not valid base64: {exc}") from None
    if not raw:
        raise ValueError("data URI is empty")
    if len(raw) > max_bytes:
        raise ValueError(f"data URI holds {_mib(len(raw))}, more than the {_mib(max_bytes)} allowed")
    return raw


def upload_key(url: str) -> str | None:
    """The storage key behind one of our upload URLs, or None."""
    try:
        path = httpx.URL(url).raw_path.split(b"?", 1)[0].decode("ascii")
    except (httpx.InvalidURL, UnicodeDecodeError, TypeError):
        return None
    m = UPLOAD_PATH.search(path)
    if m is None:
        return None
    owner, name = unquote(m["owner"]), unquote(m["name"])
    if "/" in owner or "/" in name or name in (".", ".."):
        return None
    return f"{owner}/uploads/{m['id']}/{name}"


def upload_owner(key: str) -> str:
    return key.split("/", 1)[0]


def check_input_url(url: str, settings: Settings) -> Kind:
    """Validate a URL input without any network access: ``upload`` or ``url``; ValueError if refused."""
    if upload_key(url):
        return "upload"
    parsed = netguard.parse_url(url, ("https", "http"))
    target = netguard.vet(parsed, settings, schemes=("https", "http"), resolve=False)  # numeric hosts only
    if parsed.scheme == "http":
        host = parsed.raw_host.decode("ascii").lower().rstrip(".")
        port = parsed.port or 80
        entries = netguard.allow_entries(settings)
        by_name = any(e.host == host and e.port in (None, port) for e in entries)
        maybe = target is None and any(e.network is not None for e in entries)  # decided when resolved
        if not (by_name or maybe or (target is not None and target.allowlisted)):
            raise netguard.UnsafeURLError("plain http:// is refused for file inputs; use https://")
    return "url"


def check_input(path: str, settings: Settings) -> Kind | None:
    """Validate a remote input (no network): its kind, or None if ``path`` is not one."""
    kind = kind_of(path)
    if kind == "stored":
        raise ValueError("only https:// URLs, base64 data: URIs, paths under the files root or hub ids are accepted")
    if kind == "data":
        decode_data_uri(path, settings.file_input_max_bytes)
    elif kind is not None:
        kind = check_input_url(path, settings)
    return kind


def check_owner(inp: GenerateInput, owner: str) -> None:
    """Raise InvalidInputError if ``inp`` uses an upload URL of another owner (checked at submit)."""
    paths = [(f"loras.{i}.path", x.path) for i, x in enumerate(inp.loras)]
    paths += [(f"embeddings.{i}.path", x.path) for i, x in enumerate(inp.embeddings)]
    for field, path in paths:
        key = upload_key(path) if kind_of(path) == "upload" else None
        if key is not None and upload_owner(key) != owner:
            raise InvalidInputError(field, "no such upload for this owner")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NOT_ALLOWED = "not a file under the allowed files root (FARM_FILES_ROOT), nor a hub id like 'owner/name'"


@dataclass(frozen=True)
class WeightsRef:
    kind: Literal["local", "hub", "data", "upload", "url", "stored"]
    value: str  # absolute path for local, repo id for hub, the URL / data URI itself otherwise


def resolve_weights_path(path: str, settings: Settings) -> WeightsRef:
    """Map a user's ``path`` to a local file under the allowed root, or a hub id.

    Raises ValueError with the reason when the path is not acceptable.
    """
    if not path or not path.strip():
        raise ValueError("must not be empty")
    if "\x00" in path:
        raise ValueError("must not contain NUL bytes")
    remote = check_input(path, settings)  # no network access; the worker fetches
    if remote is not None:
        return WeightsRef(remote, path)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path) and not Path(path).is_absolute():
        raise ValueError("only https:// URLs, base64 data: URIs, paths under the files root or hub ids are accepted")
    if ".." in PurePosixPath(path).parts:
        raise ValueError("must not contain '..'")
    root = settings.effective_files_root
    candidate = Path(path)
    candidate = candidate if candidate.is_absolute() else root / candidate
    resolved = candidate.resolve()
    inside = resolved == root or root in resolved.parents
    if inside and resolved.is_file():
        return WeightsRef("local", str(resolved))
    if not Path(path).is_absolute() and HUB_ID.match(path):
        return WeightsRef("hub", path)
    # one answer for a path that is missing and one that exists outside the root (no file-existence
    # oracle), and no server path in it
    raise ValueError(NOT_ALLOWED)
