"""A manifest's image columns: each row's source image (and mask), for dataset augmentation.

A row with an ``image`` (or ``image_url``) column renders image-to-image, and with a ``mask`` (or
``mask_url``) column too, inpainting, through the same admission, staging and fetch path as a queue job
(``farm.admission``, ``farm.lifecycle.submit.submit_many``). A cell is either

* a URL (``https://``, a data URI or the owner's farm upload URL): kept as given; the fetch stage gets
  an ``https://`` one into storage under the SSRF guard and the download deadline, as for LoRA URLs;
* a path of a file under the job's root (``FARM_BULK_ROOT``; a job started over HTTP: its owner's folder
  ``<FARM_BULK_ROOT>/tenants/<owner>``, so no tenant names another's files; relative paths are taken from
  it, and no path may resolve outside it, symlinks included): read when the row is read (size within
  ``FARM_FILE_INPUT_MAX_BYTES``, image and mask together within ``FARM_INLINE_INPUT_MAX_BYTES``, its
  header checked by admission through a data URI) and hashed; the ledger keeps the path and the hash,
  never the bytes. At submit the file is read again (:func:`submitted`) and sent as a data URI, staged to
  storage content-addressed within the owner's upload quota (an image shared by many rows is stored once);
  a file whose bytes changed since fails its sample, naming the field.

Errors name the column and the reason, never a server path.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm.config import Settings
from farm.errors import InvalidInputError
from farm.inputs.refs import kind_of

COLUMNS = {"image": "image_url", "image_url": "image_url", "mask": "mask_url", "mask_url": "mask_url"}
SHA256 = "source_sha256"  # params key: {field: sha256} of the local files a sample was read with
SUBMIT_BYTES = 64 * 2**20  # a submit takes no more samples once their files hold this many bytes


class ColumnProblem(ValueError):
    """A bad image cell: ``"<column>: <reason>"``."""


@dataclass
class RowSource:
    """What a row's image columns name: as given (``given``, by input field), what admission is shown
    (``refs``: a local file as a data URI), the column each field came from, and the local files' hashes."""

    given: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


def _local(value: str, column: str, root: Path) -> Path:
    """The file ``value`` names under ``root``; ColumnProblem when it is outside it or no file."""
    path = (root / value).resolve()  # an absolute value replaces root, and is then held to it like the rest
    if not path.is_relative_to(root):
        raise ColumnProblem(f"{column}: must be a URL or a file under the bulk root (FARM_BULK_ROOT)")
    if not path.is_file():
        raise ColumnProblem(f"{column}: no such file under the bulk root")
    return path


def _read(path: Path, column: str, settings: Settings) -> bytes:
    cap = settings.file_input_max_bytes
    try:
        size = path.stat().st_size
        if size > cap:
            raise ColumnProblem(f"{column}: the file is {size} bytes, more than the {cap} allowed "
                                "(FARM_FILE_INPUT_MAX_BYTES)")
        data = path.read_bytes()
    except OSError as exc:
        raise ColumnProblem(f"{column}: cannot read the file: {exc.strerror or 'unreadable'}") from None
    if len(data) > cap:  # grew since the stat
        raise ColumnProblem(f"{column}: the file is more than the {cap} bytes allowed (FARM_FILE_INPUT_MAX_BYTES)")
    return data


def _data_uri(path: Path, data: bytes) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def root(image_root: str | None, settings: Settings) -> Path:
    """Where a job's image-column files are: its ``image_root`` folder of the bulk root (over HTTP: the owner's),
    else the bulk root itself; never outside it."""
    bulk = settings.effective_bulk_root
    folder = (bulk / image_root).resolve() if image_root else bulk
    if not folder.is_relative_to(bulk):
        raise InvalidInputError("image_root", "must be inside the bulk root (FARM_BULK_ROOT)")
    return folder


def take(record: dict[str, Any], text: bool, root: Path, settings: Settings) -> RowSource | None:
    """Pop the image columns out of ``record``; the row's sources, or None for a text-to-image row.
    ColumnProblem for a bad cell (see the module docstring)."""
    source = RowSource()
    inline = 0
    for column in [c for c in record if c in COLUMNS]:
        value = record.pop(column)
        if value is None or (text and value == ""):
            continue
        name = COLUMNS[column]
        if name in source.given:
            raise ColumnProblem(f"{column}: the row gives {source.columns[name]} too; give one of them")
        if not isinstance(value, str) or not value.strip():
            raise ColumnProblem(f"{column}: must be a URL or a path under the bulk root (got {type(value).__name__})")
        value = value.strip()
        source.given[name], source.columns[name] = value, column
        if kind_of(value) is not None:
            source.refs[name] = value  # vetted by admission
            continue
        path = _local(value, column, root)
        data = _read(path, column, settings)
        inline += len(data)
        if inline > settings.inline_input_max_bytes:
            raise ColumnProblem(f"{column}: the row's image files hold {inline} bytes together, more than the "
                                f"{settings.inline_input_max_bytes} allowed (FARM_INLINE_INPUT_MAX_BYTES)")
        source.refs[name] = _data_uri(path, data)
        source.sha256[name] = hashlib.sha256(data).hexdigest()
    if "mask_url" in source.given and "image_url" not in source.given:
        raise ColumnProblem(f"{source.columns['mask_url']}: a mask needs an image column (image)")
    return source if source.given else None


def submitted(fields: dict[str, Any], params: dict[str, Any], root: Path,
              settings: Settings) -> tuple[dict[str, Any], int]:
    """A sample's input as submitted, and the bytes of files read for it: its local files (``params``
    holds their hashes) as data URIs, checked against the hashes they were read with; InvalidInputError
    naming the field when one is gone, outside the root or changed."""
    sha256: dict[str, str] = params.get(SHA256) or {}
    out, read = dict(fields), 0
    for name in sha256:
        value = str(fields.get(name))
        try:
            path = _local(value, name, root)
            data = _read(path, name, settings)
        except ColumnProblem as exc:
            raise InvalidInputError(str(exc)) from None
        if hashlib.sha256(data).hexdigest() != sha256[name]:
            raise InvalidInputError(name, "the file changed since the manifest was read")
        out[name], read = _data_uri(path, data), read + len(data)
    return out, read
