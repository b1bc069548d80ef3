"""Dataset shard writers: WebDataset tars, Hugging Face imagefolder, or Parquet with images.

Every shard is written images and metadata first and ``{shard:05d}_stats.json`` last, each
file whole (``Destination.put`` is atomic): a shard whose stats file exists is complete.
Sample keys follow img2dataset, ``SSSSSIIII`` (5-digit shard, 4-digit index in the shard).

Layouts under the destination root:

* ``webdataset``: ``00000.tar`` (``<key>.<ext>`` + ``<key>.json`` per sample, in key order),
  ``00000.parquet`` (the metadata, one row per sample) and ``00000_stats.json``;
* ``imagefolder``: ``00000/<key>.<ext>`` + ``00000/metadata.jsonl`` (one metadata file per
  shard folder, each line with ``file_name``) and ``00000_stats.json``;
* ``parquet``: ``00000.parquet`` with ``key``, ``image`` (``{bytes, path}``, declared as a
  Hugging Face ``Image`` in the schema metadata) and the metadata; and ``00000_stats.json``.

In the Parquet files and ``metadata.jsonl`` a nested metadata value (a dict or list) is a JSON
string, so a column keeps one type in every shard; ``<key>.json`` keeps it as JSON. A
metadata key should keep one type across shards (``datasets`` refuses shards whose
metadata types differ), e.g. ``""`` rather than ``None`` for a missing text.
"""

from __future__ import annotations

import io
import json
import mimetypes
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from farm.bulk import arrow
from farm.config import Settings, get_settings
from farm.errors import InvalidInputError, StorageError
from farm.storage import atomic_write

FORMATS = ("webdataset", "imagefolder", "parquet")
IMAGE_EXTS = ("jpg", "png")
MAX_SHARD_SIZE = 10_000  # the key has 4 digits for the index in a shard

CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".png": "image/png",
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".tar": "application/x-tar",
    ".parquet": "application/vnd.apache.parquet",
}
# the Hugging Face features of a ``parquet`` shard; other columns take their Arrow types
HF_FEATURES = {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}}


def sample_key(shard: int, index_in_shard: int) -> str:
    """The img2dataset-style key ``SSSSSIIII`` of a sample."""
    if shard < 0:
        raise InvalidInputError("shard", f"must be at least 0 (got {shard})")
    if not 0 <= index_in_shard < MAX_SHARD_SIZE:
        raise InvalidInputError("index_in_shard", f"must be between 0 and {MAX_SHARD_SIZE - 1} (got {index_in_shard})")
    return f"{shard:05d}{index_in_shard:04d}"


def stats_name(shard: int) -> str:
    """The name of a shard's stats file, whose presence marks the shard complete."""
    return f"{shard:05d}_stats.json"


@dataclass
class ShardSample:
    """One rendered image and its metadata."""

    key: str
    image: bytes
    ext: str
    meta: dict[str, Any]


class Destination(Protocol):
    """Where a dataset goes; ``put`` writes a file whole or not at all."""

    url: str

    def put(self, name: str, data: bytes) -> None: ...
    def exists(self, name: str) -> bool: ...
    def get(self, name: str) -> bytes: ...


def _check_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("..", "") for part in name.split("/")) or "\\" in name:
        raise InvalidInputError("name", f"{name!r} is not a relative path inside the dataset")
    return path.as_posix()


def _content_type(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    return CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


class LocalDestination:
    """A dataset in a local folder (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = str(self.root)

    def _path(self, name: str) -> Path:
        path = (self.root / _check_name(name)).resolve()
        if self.root not in path.parents:
            raise InvalidInputError("name", f"{name!r} escapes the dataset folder {self.root}")
        return path

    def put(self, name: str, data: bytes) -> None:
        atomic_write(self._path(name), data, durable=True)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{name!r} not found in {self.root}") from None


class S3Destination:
    """A dataset under ``s3://bucket/prefix``, on the S3 server of the farm's settings."""

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        from farm.storage import S3Storage

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise InvalidInputError("dest", f"must look like s3://bucket/prefix (got {url!r})")
        # the same client, endpoint, credentials and bucket creation as the farm's output storage
        self._store = S3Storage(parsed.netloc, parsed.path, settings or get_settings())
        self.bucket = parsed.netloc
        self.prefix = self._store.prefix
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def put(self, name: str, data: bytes) -> None:
        # one put_object: S3 shows an object whole or not at all
        self._store.put(_check_name(name), data, _content_type(name))

    def exists(self, name: str) -> bool:
        return self._store.exists(_check_name(name))

    def get(self, name: str) -> bytes:
        return self._store.get(_check_name(name))


def open_destination(dest: str, settings: Settings | None = None) -> Destination:
    """``s3://bucket/prefix`` → S3Destination; a path or ``file://`` URI → LocalDestination."""
    if dest.startswith("s3://"):
        return S3Destination(dest, settings)
    if dest.startswith("file://"):
        return LocalDestination(Path(unquote(urlparse(dest).path)))
    return LocalDestination(Path(dest))


# -- shard writing --------------------------------------------------------------------------------


def _flat(value: Any) -> Any:
    """A nested value as a JSON string; scalars unchanged."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list | tuple) else value


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}


def _table(rows: list[dict[str, Any]], fixed: dict[str, Any] | None = None) -> Any:
    """An Arrow table of ``rows`` (nested values as JSON strings); ``fixed``: typed columns first."""
    pa = arrow.pyarrow()

    arrays: dict[str, Any] = dict(fixed or {})
    for name, values in _columns(rows).items():
        if name in arrays:
            continue
        flat = [_flat(v) for v in values]
        try:
            arrays[name] = pa.array(flat)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            # mixed scalar types in one column: keep every value, as JSON text
            arrays[name] = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values])
    return pa.table(arrays)


def _parquet_bytes(table: Any) -> bytes:
    pq = arrow.parquet()

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # fixed mtime, owner and mode: the same samples give the same bytes
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _check_samples(samples: list[ShardSample]) -> list[ShardSample]:
    if len(samples) > MAX_SHARD_SIZE:
        raise InvalidInputError("samples", f"at most {MAX_SHARD_SIZE} per shard (got {len(samples)})")
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise InvalidInputError("samples", "keys must be distinct within a shard")
    for s in samples:
        if s.ext not in IMAGE_EXTS:
            raise InvalidInputError("ext", f"must be one of {', '.join(IMAGE_EXTS)} (got {s.ext!r})")
        if not s.key or "." in s.key or "/" in s.key:
            raise InvalidInputError("key", f"must be a plain name without '.' or '/' (got {s.key!r})")
    return sorted(samples, key=lambda s: s.key)


def _write_webdataset(dest: Destination, shard: int, samples: list[ShardSample]) -> list[str]:
    members: list[tuple[str, bytes]] = []
    rows: list[dict[str, Any]] = []
    for s in samples:
        meta = {**s.meta, "key": s.key}
        members += [(f"{s.key}.{s.ext}", s.image), (f"{s.key}.json", _json(meta))]
        rows.append({"key": s.key, **s.meta})
    tar_name, parquet_name = f"{shard:05d}.tar", f"{shard:05d}.parquet"
    dest.put(tar_name, _tar_bytes(members))
    dest.put(parquet_name, _parquet_bytes(_table(rows)))
    return [tar_name, parquet_name]


def _write_imagefolder(dest: Destination, shard: int, samples: list[ShardSample]) -> list[str]:
    folder = f"{shard:05d}"
    names: list[str] = []
    lines: list[bytes] = []
    for s in samples:
        file_name = f"{s.key}.{s.ext}"
        dest.put(f"{folder}/{file_name}", s.image)
        names.append(f"{folder}/{file_name}")
        meta = {k: _flat(v) for k, v in s.meta.items()}
        lines.append(_json({"file_name": file_name, **meta, "key": s.key}))
    dest.put(f"{folder}/metadata.jsonl", b"".join(line + b"\n" for line in lines))
    return [*names, f"{folder}/metadata.jsonl"]


def _write_parquet(dest: Destination, shard: int, samples: list[ShardSample]) -> list[str]:
    pa = arrow.pyarrow()

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fixed = {
        "key": pa.array([s.key for s in samples], pa.string()),
        "image": pa.array([{"bytes": s.image, "path": f"{s.key}.{s.ext}"} for s in samples], image_type),
    }
    rows = [{k: v for k, v in s.meta.items() if k not in fixed} for s in samples]
    table = _table(rows, fixed)
    # the Hugging Face features: `datasets` decodes `image` as an Image
    hf = {"info": {"features": HF_FEATURES}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()})
    name = f"{shard:05d}.parquet"
    dest.put(name, _parquet_bytes(table))
    return [name]


_WRITERS = {"webdataset": _write_webdataset, "imagefolder": _write_imagefolder, "parquet": _write_parquet}


def write_shard(dest: Destination, fmt: str, shard: int, samples: list[ShardSample], failed: int = 0) -> dict[str, Any]:
    """Write one shard in ``fmt``, its stats file last; return the stats."""
    if fmt not in _WRITERS:
        raise InvalidInputError("format", f"must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if shard < 0:
        raise InvalidInputError("shard", f"must be at least 0 (got {shard})")
    ordered = _check_samples(samples)
    files = _WRITERS[fmt](dest, shard, ordered)
    stats: dict[str, Any] = {
        "shard": shard,
        "count": len(ordered),
        "successes": len(ordered),
        "failed": failed,
        "nsfw": sum(1 for s in ordered if s.meta.get("nsfw") is True),
        "render_seconds": float(sum(s.meta.get("render_seconds") or 0.0 for s in ordered)),
        "format": fmt,
        "files": [*files, stats_name(shard)],
    }
    dest.put(stats_name(shard), json.dumps(stats, indent=2).encode())
    return stats


def write_stats(dest: Destination, stats: dict[str, Any]) -> None:
    """Write the job-wide ``_stats.json`` at the dataset root."""
    dest.put("_stats.json", json.dumps(stats, indent=2, ensure_ascii=False).encode())
