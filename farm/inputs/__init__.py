"""A user's file inputs (LoRA and embedding weights, source images and masks), in stages whose imports run one way:
``refs`` (parse and vet a reference) → ``quota`` (what an owner may keep in storage) →
``staging`` (data URIs to storage at submit) → ``retrieve`` (URLs and hub ids into storage; the local cache)
→ ``images`` (source images and masks vetted from their header at submit).

This package may import ``farm.config``, ``farm.errors``, ``farm.netguard``, ``farm.schemas``,
``farm.image_schemas``, ``farm.storage`` and ``db.locks``, ``db.session``, ``db.storage_usage``; nothing of it
imports the HTTP API or ``farm.lifecycle``. The names below are its public face; code of the farm imports
them from their stage.
"""

from farm.inputs.quota import UploadQuotaError, UploadTooLargeError, check_room, check_stored, store_within_quota
from farm.inputs.refs import (
    HUB_ID,
    STORED,
    WeightsRef,
    check_input,
    check_owner,
    decode_data_uri,
    kind_of,
    resolve_weights_path,
    upload_key,
    upload_owner,
)
from farm.inputs.retrieve import RemoteNotFoundError, fetch_one, hub_offline, materialise, owner_scope
from farm.inputs.staging import discard, pending, stage_inline, store_blob

__all__ = [
    "HUB_ID", "STORED", "RemoteNotFoundError", "UploadQuotaError", "UploadTooLargeError", "WeightsRef", "check_input",
    "check_owner", "check_room", "check_stored", "decode_data_uri", "discard", "fetch_one", "hub_offline", "kind_of",
    "materialise", "owner_scope", "pending", "resolve_weights_path", "stage_inline", "store_blob", "store_within_quota",
    "upload_key", "upload_owner",
]
