"""Getting a file input's bytes: into the local cache of this process, or from the network into storage.

:func:`materialise` turns an input into a local file under ``<data_dir>/inputs``, written atomically
and cached: by content hash for data URIs, by key or URL hash otherwise. The cache holds at most
``input_cache_max_bytes``: each write evicts the least recently used files past it (a hit is a use),
so neither ``?n=1``, ``?n=2`` … of one URL nor many owners' inputs fill the disk. An ``https://`` URL
is streamed through the SSRF guard with the size cap (``file_input_max_bytes``) within a wall-clock
deadline (``input_fetch_deadline_seconds``). :func:`fetch_one` gets one URL or hub input into
storage for the fetch stage (``farm.lifecycle.fetch``): no GPU worker fetches anything over the
network, and a download reaches the cache only once it is stored, within the owner's quota. A hub id
is resolved to ONE weights file, size-checked: from the local Hugging Face cache when the hub is
offline (``HF_HUB_OFFLINE``), else downloaded from ``HF_ENDPOINT`` like any URL.

The last stage of ``farm.inputs``: imports refs, quota and staging. Import-light: no torch, no huggingface_hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

import httpx

from farm import netguard
from farm.config import Settings
from farm.errors import ObjectNotFound
from farm.inputs.quota import UploadQuotaError, UploadTooLargeError, check_stored
from farm.inputs.refs import STORED, Kind, _mib, decode_data_uri, kind_of, upload_key, upload_owner
from farm.inputs.staging import HUB_FILES, _suffix, store_blob
from farm.storage import Storage, get_storage

FETCH_TIMEOUT_SECONDS = 30.0  # per network operation (the deadline bounds the whole download)
CHUNK = 1 << 20

_owner: ContextVar[str | None] = ContextVar("farm_input_owner", default=None)


class RemoteNotFoundError(ValueError):
    """Raised when a URL input answers HTTP 404 (refused for good, like any ValueError here)."""


@contextlib.contextmanager
def owner_scope(owner: str) -> Iterator[None]:
    """Inside the block, upload URLs resolve only if ``owner`` uploaded them (the worker sets it)."""
    token = _owner.set(owner)
    try:
        yield
    finally:
        _owner.reset(token)


def _cache_dir(settings: Settings) -> Path:
    folder = settings.data_dir / "inputs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cached(folder: Path, digest: str) -> Path | None:
    found = next((p for p in sorted(folder.glob(f"{digest}.*")) if p.is_file()), None)
    if found is not None:
        with contextlib.suppress(OSError):  # a use: the last to be evicted (gone meanwhile: a miss below)
            os.utime(found)
    return found if found is not None and found.exists() else None


def _evict(folder: Path, keep: Path, settings: Settings) -> None:
    """Delete the least recently used files until the cache holds at most ``input_cache_max_bytes``;
    ``keep`` (the file just written, about to be read) stays, whatever its size."""
    files = []
    for path in folder.iterdir():
        try:
            st = path.stat()
        except OSError:  # gone meanwhile (another process evicts too)
            continue
        if stat.S_ISREG(st.st_mode) and not path.name.startswith(".tmp-"):
            files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= settings.input_cache_max_bytes:
            return
        if path != keep:
            path.unlink(missing_ok=True)
            total -= size


def _publish(folder: Path, digest: str, tmp: Path, head: bytes, settings: Settings) -> Path:
    final = folder / f"{digest}{_suffix(head)}"
    os.replace(tmp, final)  # atomic: a reader sees no file or the whole file
    _evict(folder, final, settings)
    return final


def _write(folder: Path, digest: str, data: bytes, settings: Settings) -> Path:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return _publish(folder, digest, Path(tmp), data[:16], settings)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stream(url: str, fh: BinaryIO, settings: Settings) -> bytes:
    """Write the URL's bytes to ``fh`` through the SSRF guard, capped and within the deadline; the first bytes."""
    limit = settings.file_input_max_bytes
    seconds = settings.input_fetch_deadline_seconds
    deadline = time.monotonic() + seconds
    late = f"the download did not finish within its {seconds:g} s deadline (FARM_INPUT_FETCH_DEADLINE_SECONDS)"
    try:
        with netguard.open_url(
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
    except httpx.TimeoutException as exc:
        if time.monotonic() >= deadline:
            raise TimeoutError(late) from exc
        raise TimeoutError(f"fetching it timed out: {netguard.describe(exc)}") from exc
    except httpx.HTTPError as exc:
        raise ConnectionError(f"fetching it failed: {netguard.describe(exc)}") from exc
    except netguard.UnresolvableURLError as exc:
        raise ConnectionError(str(exc)) from exc
    if size == 0:
        raise ValueError("it is empty")
    return head


@contextlib.contextmanager
def _downloaded(url: str, folder: Path, settings: Settings) -> Iterator[tuple[Path, bytes]]:
    """The URL's bytes in a temporary file of the cache folder, and their first bytes; the file is deleted
    when the block ends unless the block moved it into the cache (:func:`_publish`)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            head = _stream(url, fh, settings)
        yield Path(tmp), head
    finally:
        Path(tmp).unlink(missing_ok=True)


def _download(url: str, folder: Path, digest: str, settings: Settings) -> Path:
    with _downloaded(url, folder, settings) as (tmp, head):
        return _publish(folder, digest, tmp, head, settings)


def forget(value: str, settings: Settings) -> None:
    """Delete this process's cached copy of a data-URI input (``materialise`` names it by content hash), once
    it served its one use (a realtime frame's): no file of a frame outlives it."""
    if kind_of(value) != "data":
        return
    try:
        digest = hashlib.sha256(decode_data_uri(value, settings.file_input_max_bytes)).hexdigest()
    except ValueError:
        return  # never decoded, so never written
    with contextlib.suppress(OSError):  # gone already, or the cache is no folder (a fault)
        for copy in (settings.data_dir / "inputs").glob(f"{digest}.*"):
            copy.unlink()


def materialise(kind: Kind, value: str, settings: Settings) -> Path:
    """A local file holding the input: ValueError for a refused input, ConnectionError /
    TimeoutError / StorageError for a (possibly passing) failure to get it."""
    folder = _cache_dir(settings)
    if kind == "data":
        data = decode_data_uri(value, settings.file_input_max_bytes)
        digest = hashlib.sha256(data).hexdigest()
        return _cached(folder, digest) or _write(folder, digest, data, settings)
    if kind in ("upload", "stored"):
        key = value.removeprefix(STORED) if kind == "stored" else upload_key(value) or value
        owner = _owner.get()
        if owner is not None and upload_owner(key) != owner:
            raise ValueError("no such upload for this owner")
        digest = kind + "-" + hashlib.sha256(key.encode()).hexdigest()
        cached = _cached(folder, digest)
        if cached is not None:
            return cached
        storage = get_storage(settings)
        try:
            if kind == "upload":  # size and quota from metadata before a byte is read (presigned S3 PUTs are uncapped)
                check_stored(storage, key, settings)
            data = b"".join(storage.chunks(key, settings.file_input_max_bytes))
        except ObjectNotFound:
            raise ValueError("no such upload") from None
        except (UploadTooLargeError, UploadQuotaError) as exc:
            raise ValueError(str(exc)) from None
        cap = settings.file_input_max_bytes
        if len(data) > cap:
            raise ValueError(f"the file is more than the {_mib(cap)} allowed (FARM_FILE_INPUT_MAX_BYTES)")
        return _write(folder, digest, data, settings)
    digest = "url-" + hashlib.sha256(value.encode()).hexdigest()
    return _cached(folder, digest) or _download(value, folder, digest, settings)


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cached_hub_file(repo: str, names: tuple[str, ...], settings: Settings) -> Path:
    """The weights file of ``repo`` in the local Hugging Face cache (layout ``models--a--b/snapshots/<rev>``)."""
    folder = _hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = folder / "refs" / "main"
    if not ref.is_file():
        raise ValueError(f"hub id {repo!r} is not in the Hugging Face cache (HF_HUB_OFFLINE is set); give "
                         "an https:// URL, a data URI or an upload instead")
    snapshot = (folder / "snapshots" / ref.read_text().strip()).resolve()
    if folder.resolve() not in snapshot.parents:
        raise ValueError(f"hub id {repo!r} has a broken cache entry")
    found = [snapshot / n for n in names if (snapshot / n).is_file()]
    if not found:
        weights = sorted(p for p in snapshot.glob("*.safetensors") if p.is_file())
        if len(weights) != 1:
            raise ValueError(f"hub id {repo!r} has no {names[0]} and not exactly one .safetensors file; "
                             "give the file's URL instead")
        found = weights
    path = found[0].resolve()  # the cache links snapshot files to blobs
    size = path.stat().st_size
    if size > settings.file_input_max_bytes:
        raise ValueError(f"hub file {found[0].name} of {repo!r} is {_mib(size)}, more than the "
                         f"{_mib(settings.file_input_max_bytes)} allowed")
    return path


def _fetch_url(url: str, owner: str, storage: Storage, settings: Settings) -> str:
    """Get a URL into the owner's storage (within its quota); its key. The download reaches this process's
    cache only after it is stored: an owner whose quota is full leaves no copy on this host's disk."""
    folder = _cache_dir(settings)
    digest = "url-" + hashlib.sha256(url.encode()).hexdigest()
    cached = _cached(folder, digest)  # one download per process and URL while the cache keeps it
    if cached is not None:
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: downloaded again below
            return store_blob(owner, cached.read_bytes(), storage, settings)[0]
    with _downloaded(url, folder, settings) as (tmp, head):
        key, _ = store_blob(owner, tmp.read_bytes(), storage, settings)  # the quota first (UploadQuotaError)
        _publish(folder, digest, tmp, head, settings)
    return key


def _hub_download(repo: str, names: tuple[str, ...], owner: str, storage: Storage, settings: Settings) -> str:
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    misses = []
    for name in names:
        try:
            return _fetch_url(f"{endpoint}/{repo}/resolve/main/{name}", owner, storage, settings)
        except RemoteNotFoundError:
            misses.append(name)
        except ValueError as exc:
            raise ValueError(f"hub file {name} of {repo!r}: {exc}") from None
    raise ValueError(f"hub id {repo!r} has none of {', '.join(misses)}; give the file's URL instead")


def fetch_one(field: str, path: str, owner: str, settings: Settings, storage: Storage | None = None) -> str:
    """Get one URL or hub input into storage within its deadline; its ``farm-stored:`` path.

    ValueError: refused for good (too big, HTTP 4xx, an internal address, not in the cache);
    TimeoutError / ConnectionError / StorageError: could not be got now."""
    storage = storage or get_storage(settings)
    if kind_of(path) == "url":
        return STORED + _fetch_url(path, owner, storage, settings)
    names = HUB_FILES["loras" if field.startswith("loras") else "embeddings"]
    if not hub_offline():
        return STORED + _hub_download(path, names, owner, storage, settings)
    key, _ = store_blob(owner, _cached_hub_file(path, names, settings).read_bytes(), storage, settings)
    return STORED + key
