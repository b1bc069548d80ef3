"""Staging a request's file inputs at submit: data URIs move to storage, URLs and hub ids are listed.

* :func:`stage_inline` puts ``farm-stored:<key>`` in place of every base64 ``data:`` URI
  (content-addressed ``<owner>/inputs/<sha256>.<ext>``), so the ledger row holds a key, not
  megabytes; the decoded bytes of one request's data URIs together are capped by
  ``inline_input_max_bytes``. :func:`held` stores the blobs in the transaction that records the
  job, under the owner's storage lock, so a refused submit never deletes a blob that a concurrent
  admitted one refers to. Stored inputs count against the owner's ``upload_quota_bytes`` with its
  uploads (``farm.inputs.quota``), so no tenant fills the disks.
* :func:`pending` lists what the fetch stage (``farm.lifecycle.fetch``) must still get: ``https://``
  URLs and Hugging Face hub ids (``farm.inputs.retrieve``).

The third stage of ``farm.inputs``: imports refs and quota.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from farm.config import Settings
from farm.errors import InvalidInputError
from farm.image_schemas import file_refs
from farm.inputs.quota import delete_held, listed, store_held
from farm.inputs.refs import HUB_ID, STORED, _mib, decode_data_uri, kind_of, resolve_weights_path
from farm.schemas import GenerateInput
from farm.storage import Storage, get_storage

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

IMAGE_FIELDS = ("image_url", "mask_url")  # source images of image-to-image / inpainting (farm.image_schemas)
# The file names diffusers looks for first (LORA_WEIGHT_NAME(_SAFE), TEXT_INVERSION_NAME(_SAFE)).
HUB_FILES = {
    "loras": ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin"),
    "embeddings": ("learned_embeds.safetensors", "learned_embeds.bin"),
}


def _with_paths(inp: GenerateInput, paths: dict[str, str]) -> GenerateInput:
    """``inp`` with the paths of the named fields replaced."""
    if not paths:
        return inp
    loras = [x.model_copy(update={"path": paths.get(f"loras.{i}.path", x.path)}) for i, x in enumerate(inp.loras)]
    embs = [x.model_copy(update={"path": paths.get(f"embeddings.{i}.path", x.path)})
            for i, x in enumerate(inp.embeddings)]
    images = {name: paths[name] for name in IMAGE_FIELDS if name in paths}
    return inp.model_copy(update={"loras": loras, "embeddings": embs, **images})


def _suffix(data: bytes) -> str:
    head = data[:16]
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20:
        return ".safetensors"
    return ".bin"


def blob_key(owner: str, data: bytes, prefix: str = "") -> str:
    """The content-addressed key of ``data`` under ``<owner>/inputs/``."""
    return f"{owner}/inputs/{prefix}{hashlib.sha256(data).hexdigest()}{_suffix(data)}"


def store_blob(owner: str, data: bytes, storage: Storage, settings: Settings, prefix: str = "") -> tuple[str, bool]:
    """Put ``data`` at its content-addressed key under ``<owner>/inputs/`` in a transaction of its own; (key,
    newly written). A new blob counts against the owner's ``upload_quota_bytes`` (UploadQuotaError, 413)."""
    from db.session import session_scope

    key = blob_key(owner, data, prefix)
    with session_scope() as s:
        return key, _put_missing(s, owner, key, data, storage, settings)


def _put_missing(s: Session, owner: str, key: str, data: bytes, storage: Storage, settings: Settings) -> bool:
    """Store the blob unless it is there, under the owner's storage lock held in ``s``; whether it was written."""
    from db import storage_usage

    storage_usage.hold(s, owner, lambda: listed(storage, owner))  # the lock first: the look below stays true
    if storage.exists(key):
        return False
    store_held(s, storage, owner, key, io.BytesIO(data), len(data), "application/octet-stream", settings)
    return True


def stage_inline(inp: GenerateInput, owner: str, settings: Settings) -> tuple[GenerateInput, dict[str, bytes]]:
    """The request's data URIs as ``farm-stored:`` keys (see the module docstring), and the blobs to store
    under those keys: nothing is stored yet (:func:`held` does, in the submit's transaction).
    InvalidInputError names the field where the request's inline bytes pass ``inline_input_max_bytes``."""
    inline = [(field, path) for field, path in file_refs(inp) if kind_of(path) == "data"]
    if not inline:
        return inp, {}
    paths: dict[str, str] = {}
    blobs: dict[str, bytes] = {}
    total, cap = 0, settings.inline_input_max_bytes
    for field, path in inline:
        try:
            data = decode_data_uri(path, settings.file_input_max_bytes)
        except ValueError as exc:
            raise InvalidInputError(field, str(exc)) from None
        total += len(data)
        if total > cap:
            raise InvalidInputError(field, f"the request's data URIs hold {_mib(total)} together by here, more than "
                                           f"the {_mib(cap)} allowed inline (FARM_INLINE_INPUT_MAX_BYTES); upload "
                                           "the file (POST /storage/upload) or give an https:// URL")
        key = blob_key(owner, data)
        paths[field], blobs[key] = STORED + key, data
    return _with_paths(inp, paths), blobs


@contextmanager
def held(s: Session, owner: str, blobs: dict[str, bytes], settings: Settings,
         storage: Storage | None = None) -> Iterator[None]:
    """Store the submit's blobs that are missing, in ``s``, the transaction that records the jobs naming
    them, under the owner's storage lock held until it ends; if the block raises (the submit is refused),
    delete the ones stored here before the lock goes.

    So no blob a live job refers to is ever deleted: a concurrent submit of the same data URI either
    committed its job before this one took the lock (the blob was there: this submit wrote nothing, and
    deletes nothing), or waits for the lock and then finds the blob gone and stores it again.
    UploadQuotaError (413) when a new blob does not fit in the owner's quota."""
    if not blobs:
        yield
        return
    storage = storage or get_storage(settings)
    written: list[str] = []
    try:
        for key, data in blobs.items():
            if _put_missing(s, owner, key, data, storage, settings):
                written.append(key)
        yield
    except BaseException:
        discard(s, owner, written, storage)
        raise


def discard(s: Session, owner: str, keys: list[str], storage: Storage) -> None:
    """Delete blobs :func:`held` wrote for a refused submit, under the lock it holds in ``s``; best effort:
    a blob left behind (its delete failed, logged here) is used again by the same bytes, and deleted with
    the last job that names it (``farm.inputs.retention``); its count may be rolled back with the refused
    submit's transaction, so the owner's counter can then be short by its size."""
    for key in keys:
        try:
            delete_held(s, owner=owner, key=key, storage=storage)
        except Exception as exc:
            log.warning("a refused submit's stored input could not be deleted (it stays): %s", exc)


def pending(inp: GenerateInput, settings: Settings) -> list[tuple[str, str]]:
    """(field, path) of each input the fetch stage must get: URLs and hub ids."""
    out = []
    for field, path in file_refs(inp):
        kind = kind_of(path)
        if kind == "url" or (kind is None and HUB_ID.match(path) and _is_hub(path, settings)):
            out.append((field, path))
    return out


def _is_hub(path: str, settings: Settings) -> bool:
    try:
        return resolve_weights_path(path, settings).kind == "hub"
    except ValueError:
        return False


