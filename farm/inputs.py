"""File inputs given as URLs or data URIs (LoRA and embedding paths).

Accepted, besides local paths and hub ids (``farm.files``):

- ``data:[<type>];base64,<data>``: decoded size at most ``file_input_max_bytes``, checked
  when the request is validated;
- our own upload URLs (``…/storage/files/<owner>/uploads/<id>/<name>``, made by
  ``POST /storage/upload``): read straight from storage, never over the network, and only
  for the owner who uploaded them;
- ``https://`` URLs (``http://`` only for an allow-listed host): fetched through the SSRF
  guard (``farm.netguard``), streamed with the same size cap, within a wall-clock deadline.

No GPU worker fetches anything over the network: data URIs are moved to storage at submit,
URLs and hub ids are fetched to storage by the fetch stage before the job's batches can be
claimed (``farm.fetching``, ``farm.lifecycle.fetch``); the ledger then holds
``farm-stored:<key>`` for them, a form only the farm writes (refused in user input).

:func:`materialise` turns an input into a local file under ``<data_dir>/inputs``, written
atomically and cached: by content hash for data URIs, by key or URL hash otherwise.
Import-light: no torch.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

import httpx

from farm import netguard
from farm.config import Settings
from farm.errors import InvalidInputError, ObjectNotFound

if TYPE_CHECKING:
    from farm.schemas import GenerateInput

Kind = Literal["data", "upload", "url", "stored"]
STORED = "farm-stored:"  # prefix of an input the farm moved to storage (never accepted from a user)

UPLOAD_PATH = re.compile(r"/storage/files/(?P<owner>[^/]+)/uploads/(?P<id>[0-9a-f]{32})/(?P<name>[^/]+)$")
FETCH_TIMEOUT_SECONDS = 30.0  # per network operation (the deadline bounds the whole download)
CHUNK = 1 << 20

_owner: ContextVar[str | None] = ContextVar("farm_input_owner", default=None)


class RemoteNotFoundError(ValueError):
    """Raised when a URL input answers HTTP 404 (refused for good, like any ValueError here)."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


# -- recognising and validating -------------------------------------------------------------------


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


@contextlib.contextmanager
def owner_scope(owner: str) -> Iterator[None]:
    """Inside the block, upload URLs resolve only if ``owner`` uploaded them (the worker sets it)."""
    token = _owner.set(owner)
    try:
        yield
    finally:
        _owner.reset(token)


def check_owner(inp: GenerateInput, owner: str) -> None:
    """Raise InvalidInputError if ``inp`` uses an upload URL of another owner (checked at submit)."""
    paths = [(f"loras.{i}.path", x.path) for i, x in enumerate(inp.loras)]
    paths += [(f"embeddings.{i}.path", x.path) for i, x in enumerate(inp.embeddings)]
    for field, path in paths:
        key = upload_key(path) if kind_of(path) == "upload" else None
        if key is not None and upload_owner(key) != owner:
            raise InvalidInputError(field, "no such upload for this owner")


# -- materialising --------------------------------------------------------------------------------


def _suffix(head: bytes) -> str:
    """``.safetensors`` when the bytes look like one (u64 header length, then JSON), else ``.bin``."""
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20:
        return ".safetensors"
    return ".bin"


def _cache_dir(settings: Settings) -> Path:
    folder = settings.data_dir / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cached(folder: Path, digest: str) -> Path | None:
    return next((p for p in sorted(folder.glob(f"{digest}.*")) if p.is_file()), None)


def _publish(folder: Path, digest: str, tmp: Path, head: bytes) -> Path:
    final = folder / f"{digest}{_suffix(head)}"
    os.replace(tmp, final)  # atomic: a reader sees no file or the whole file
    return final


def _write(folder: Path, digest: str, data: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return _publish(folder, digest, Path(tmp), data[:16])
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(url: str, folder: Path, digest: str, settings: Settings) -> Path:
    limit = settings.file_input_max_bytes
    seconds = settings.input_fetch_deadline_seconds
    deadline = time.monotonic() + seconds
    late = f"the download did not finish within its {seconds:g} s deadline (FARM_INPUT_FETCH_DEADLINE_SECONDS)"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh, netguard.open_url(
            "GET", url, settings, timeout=FETCH_TIMEOUT_SECONDS, tls_unless_allowlisted=True, deadline=deadline
        ) as response:
            if response.status_code == 404:
                raise RemoteNotFoundError("fetching it answered HTTP 404")
            if response.status_code != 200:
                raise ValueError(f"fetching it answered HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ValueError(f"it is {_mib(int(declared))}, more than the {_mib(limit)} allowed")
            size, head = 0, b""
            for chunk in response.iter_bytes(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ValueError(f"it is more than the {_mib(limit)} allowed")
                if time.monotonic() > deadline:
                    raise TimeoutError(late)
                head = head or chunk[:16]
                fh.write(chunk)
        if size == 0:
            raise ValueError("it is empty")
        return _publish(folder, digest, Path(tmp), head)
    except httpx.TimeoutException as exc:
        if time.monotonic() >= deadline:
            raise TimeoutError(late) from exc
        raise TimeoutError(f"fetching it timed out: {netguard.describe(exc)}") from exc
    except httpx.HTTPError as exc:
        raise ConnectionError(f"fetching it failed: {netguard.describe(exc)}") from exc
    except netguard.UnresolvableURLError as exc:
        raise ConnectionError(str(exc)) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def materialise(kind: Kind, value: str, settings: Settings) -> Path:
    """A local file holding the input: ValueError for a refused input, ConnectionError /
    TimeoutError / StorageError for a (possibly passing) failure to get it."""
    folder = _cache_dir(settings)
    if kind == "data":
        data = decode_data_uri(value, settings.file_input_max_bytes)
        digest = hashlib.sha256(data).hexdigest()
        return _cached(folder, digest) or _write(folder, digest, data)
    if kind in ("upload", "stored"):
        key = value.removeprefix(STORED) if kind == "stored" else upload_key(value) or value
        owner = _owner.get()
        if owner is not None and upload_owner(key) != owner:
            raise ValueError("no such upload for this owner")
        digest = kind + "-" + hashlib.sha256(key.encode()).hexdigest()
        cached = _cached(folder, digest)
        if cached is not None:
            return cached
        from farm import upload_quota
        from farm.storage import get_storage

        storage = get_storage(settings)
        try:
            if kind == "upload":  # size and quota from metadata before a byte is read (presigned S3 PUTs are uncapped)
                upload_quota.check_stored(storage, key, settings)
            data = b"".join(storage.chunks(key, settings.file_input_max_bytes))
        except ObjectNotFound:
            raise ValueError("no such upload") from None
        except (upload_quota.UploadTooLargeError, upload_quota.UploadQuotaError) as exc:
            raise ValueError(str(exc)) from None
        cap = settings.file_input_max_bytes
        if len(data) > cap:
            raise ValueError(f"the file is more than the {_mib(cap)} allowed (FARM_FILE_INPUT_MAX_BYTES)")
        return _write(folder, digest, data)
    digest = "url-" + hashlib.sha256(value.encode()).hexdigest()
    return _cached(folder, digest) or _download(value, folder, digest, settings)
