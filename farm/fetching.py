"""Moving a request's LoRA / embedding inputs into storage before any GPU worker sees them.

* At submit, :func:`stage_inline` moves every base64 ``data:`` URI to storage (content-addressed
  ``<owner>/inputs/<sha256>.<ext>``) and puts ``farm-stored:<key>`` in its place, so the ledger
  row holds a key, not megabytes; the decoded bytes of one request's data URIs together are
  capped by ``inline_input_max_bytes``. Stored inputs count against the owner's
  ``upload_quota_bytes`` with its uploads (farm.upload_quota), so no tenant fills the disks.
* :func:`pending` lists what the fetch stage (``farm.lifecycle.fetch``) must still get: ``https://``
  URLs and Hugging Face hub ids. :func:`fetch_one` gets one of them within its wall-clock deadline
  (``input_fetch_deadline_seconds``) and the size cap (``file_input_max_bytes``) into storage.
* A hub id is resolved to ONE weights file, size-checked: from the local Hugging Face cache when
  the hub is offline (``HF_HUB_OFFLINE``), else downloaded from ``HF_ENDPOINT`` through the SSRF
  guard like any URL. The worker loads it from storage as a local file: diffusers is only ever
  handed an absolute path.

Import-light: no torch, no huggingface_hub.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from farm.config import Settings
from farm.errors import InvalidInputError, StorageError
from farm.files import HUB_ID, resolve_weights_path
from farm.inputs import STORED, RemoteNotFoundError, _mib, decode_data_uri, kind_of, materialise
from farm.schemas import GenerateInput
from farm.storage import Storage, get_storage
from farm.upload_quota import UploadQuotaError, store_within_quota

# The file names diffusers looks for first (LORA_WEIGHT_NAME(_SAFE), TEXT_INVERSION_NAME(_SAFE)).
HUB_FILES = {
    "loras": ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"),
    "embeddings": ("learned_embeds.safetensors", "learned_embeds.bin"),
}


def _fields(inp: GenerateInput) -> list[tuple[str, str]]:
    return ([(f"loras.{i}.path", x.path) for i, x in enumerate(inp.loras)]
            + [(f"embeddings.{i}.path", x.path) for i, x in enumerate(inp.embeddings)])


def _with_paths(inp: GenerateInput, paths: dict[str, str]) -> GenerateInput:
    """``inp`` with the paths of the named fields replaced."""
    if not paths:
        return inp
    loras = [x.model_copy(update={"path": paths.get(f"loras.{i}.path", x.path)}) for i, x in enumerate(inp.loras)]
    embs = [x.model_copy(update={"path": paths.get(f"embeddings.{i}.path", x.path)})
            for i, x in enumerate(inp.embeddings)]
    return inp.model_copy(update={"loras": loras, "embeddings": embs})


def _suffix(data: bytes) -> str:
    head = data[:16]
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20:
        return ".safetensors"
    return ".bin"


def store_blob(owner: str, data: bytes, storage: Storage, settings: Settings, prefix: str = "") -> tuple[str, bool]:
    """Put ``data`` at its content-addressed key under ``<owner>/inputs/``; (key, newly written). A new blob
    counts against the owner's ``upload_quota_bytes`` with its uploads (UploadQuotaError, 413, beyond it)."""
    key = f"{owner}/inputs/{prefix}{hashlib.sha256(data).hexdigest()}{_suffix(data)}"
    if storage.exists(key):
        return key, False
    store_within_quota(storage, owner, key, io.BytesIO(data), len(data), "application/octet-stream", settings)
    return key, True


def stage_inline(inp: GenerateInput, owner: str, settings: Settings,
                 storage: Storage | None = None) -> tuple[GenerateInput, list[str]]:
    """Move the request's data URIs to storage (see the module docstring); the new input and the keys
    written now (the caller deletes them if the submit is then refused). InvalidInputError names the
    field where the request's inline bytes pass ``inline_input_max_bytes``."""
    inline = [(field, path) for field, path in _fields(inp) if kind_of(path) == "data"]
    if not inline:
        return inp, []
    blobs: dict[str, bytes] = {}
    total, cap = 0, settings.inline_input_max_bytes
    for field, path in inline:
        try:
            blobs[field] = decode_data_uri(path, settings.file_input_max_bytes)
        except ValueError as exc:
            raise InvalidInputError(field, str(exc)) from None
        total += len(blobs[field])
        if total > cap:
            raise InvalidInputError(field, f"the request's data URIs hold {_mib(total)} together by here, more than "
                                           f"the {_mib(cap)} allowed inline (FARM_INLINE_INPUT_MAX_BYTES); upload "
                                           "the file (POST /storage/upload) or give an https:// URL")
    storage = storage or get_storage(settings)
    paths, written = {}, []
    try:
        for field, data in blobs.items():
            key, new = store_blob(owner, data, storage, settings)
            paths[field] = STORED + key
            if new:
                written.append(key)
    except (StorageError, UploadQuotaError):
        discard(written, settings, storage)
        raise
    return _with_paths(inp, paths), written


def discard(keys: list[str], settings: Settings, storage: Storage | None = None) -> None:
    """Delete blobs :func:`stage_inline` wrote for a submit that was refused."""
    if not keys:
        return
    storage = storage or get_storage(settings)
    for key in keys:
        try:
            storage.delete(key)
        except Exception:  # noqa: S112  (best effort: a content-addressed blob left behind is harmless)
            continue


def pending(inp: GenerateInput, settings: Settings) -> list[tuple[str, str]]:
    """(field, path) of each input the fetch stage must get: URLs and hub ids."""
    out = []
    for field, path in _fields(inp):
        kind = kind_of(path)
        if kind == "url" or (kind is None and HUB_ID.match(path) and _is_hub(path, settings)):
            out.append((field, path))
    return out


def _is_hub(path: str, settings: Settings) -> bool:
    try:
        return resolve_weights_path(path, settings).kind == "hub"
    except ValueError:
        return False


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


def _hub_download(repo: str, names: tuple[str, ...], settings: Settings) -> Path:
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    misses = []
    for name in names:
        try:
            return materialise("url", f"{endpoint}/{repo}/resolve/main/{name}", settings)
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
        local = materialise("url", path, settings)  # the local cache, by URL: one download per process
    else:
        names = HUB_FILES["loras" if field.startswith("loras") else "embeddings"]
        local = (_cached_hub_file(path, names, settings) if hub_offline()
                 else _hub_download(path, names, settings))
    key, _ = store_blob(owner, local.read_bytes(), storage, settings)
    return STORED + key
