"""Staging a request's file inputs at submit: data URIs move to storage, URLs and hub ids are listed.

* :func:`stage_inline` moves every base64 ``data:`` URI to storage (content-addressed
  ``<owner>/inputs/<sha256>.<ext>``) and puts ``farm-stored:<key>`` in its place, so the ledger
  row holds a key, not megabytes; the decoded bytes of one request's data URIs together are
  capped by ``inline_input_max_bytes``. Stored inputs count against the owner's
  ``upload_quota_bytes`` with its uploads (``farm.inputs.quota``), so no tenant fills the disks.
* :func:`pending` lists what the fetch stage (``farm.lifecycle.fetch``) must still get: ``https://``
  URLs and Hugging Face hub ids (``farm.inputs.retrieve``).

The third stage of ``farm.inputs``: imports refs and quota.
"""

from __future__ import annotations

import hashlib
import io

from farm.config import Settings
from farm.errors import InvalidInputError, StorageError
from farm.inputs.quota import UploadQuotaError, store_within_quota
from farm.inputs.refs import HUB_ID, STORED, _mib, decode_data_uri, kind_of, resolve_weights_path
from farm.schemas import GenerateInput
from farm.storage import Storage, get_storage

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


