"""Output storage: a local directory or any S3 server (the ``minio`` client).

Keys are deterministic, ``<owner>/<request_id>/<index>.<ext>``, so a redelivered task
overwrites an object instead of duplicating it.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from farm.config import Settings, get_settings
from farm.errors import ObjectNotFound, StorageError

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
EXTENSIONS = {"jpeg": "jpg", "png": "png"}


def object_key(owner: str, request_id: str, index: int, fmt: str) -> str:
    return f"{owner}/{request_id}/{index}.{EXTENSIONS[fmt]}"


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def current_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, and setting it
    for a moment would leak a wrong mask to files other threads create meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the only other way to read it
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes, durable: bool = False, mode: int = 0o666) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``: a reader never
    sees half a file and a rewrite replaces it whole. ``durable``: fsync the file and the folder.

    The file gets ``mode`` less the umask, as ``open()`` would give it (``mkstemp`` alone makes
    it 0600, which another account, e.g. a training job's, could not read).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, mode & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> None: ...
    def put_file(self, key: str, fh: BinaryIO, size: int, content_type: str) -> None: ...
    def usage(self, prefix: str) -> int: ...
    def get(self, key: str) -> bytes: ...
    def size(self, key: str) -> int: ...
    def chunks(self, key: str, limit: int) -> Iterator[bytes]: ...
    def url(self, key: str, expiry_seconds: int) -> str: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...


@contextmanager
def _os_errors(action: str, key: str) -> Iterator[None]:
    """An OSError of a local storage operation as a StorageError (its text names paths: server-log only)."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"cannot {action} {key!r}: {exc}") from exc


def _missing(key: str) -> int:
    raise ObjectNotFound(f"object {key!r} not found")


def _capped(read: Callable[[int], bytes], limit: int) -> Iterator[bytes]:
    left = limit + 1
    while left > 0:
        chunk = read(min(left, 1 << 20))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


class LocalStorage:
    """Objects as files under ``root``; URLs are ``file://`` URIs."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise StorageError(f"object key {key!r} escapes the storage root")
        return path

    def put(self, key: str, data: bytes, content_type: str) -> None:
        with _os_errors("store", key):
            atomic_write(self._path(key), data)

    def put_file(self, key: str, fh: BinaryIO, size: int, content_type: str) -> None:
        """Store ``size`` bytes read from ``fh`` as they come (never held whole), atomically."""
        with _os_errors("store", key):
            self._put_file(self._path(key), fh)

    def _put_file(self, path: Path, fh: BinaryIO) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(fh, out, 1 << 20)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def usage(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (a folder: ``owner/uploads/``)."""
        folder = self.root / prefix
        if not folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key!r} not found") from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc

    def size(self, key: str) -> int:
        """The object's size, from its metadata: nothing of it is read."""
        path = self._path(key)
        try:
            return path.stat().st_size if path.is_file() else _missing(key)
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc

    def chunks(self, key: str, limit: int) -> Iterator[bytes]:
        """The object's bytes in pieces, stopping after ``limit`` + 1 bytes (so a caller sees it pass ``limit``)."""
        try:
            with self._path(key).open("rb") as fh:
                yield from _capped(fh.read, limit)
        except FileNotFoundError:
            _missing(key)
        except OSError as exc:
            raise StorageError(f"cannot read {key!r}: {exc}") from exc

    def url(self, key: str, expiry_seconds: int) -> str:
        return self._path(key).as_uri()

    def list(self, prefix: str) -> list[str]:
        base = self.root
        if not base.exists():
            return []
        keys = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith(".tmp-"))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()


_S3_MISSING = ("NoSuchKey", "NoSuchObject", "NoSuchBucket", "NotFound", "ResourceNotFound")


class S3Storage:
    """Objects in an S3 bucket under an optional prefix; URLs are presigned GETs."""

    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        if not settings.s3_endpoint:
            raise StorageError("FARM_STORAGE_URL is s3://… but FARM_S3_ENDPOINT is not set")
        self.client = _minio(settings.s3_endpoint, settings.s3_secure, settings)
        # URLs handed to clients (results) are signed for the endpoint they reach, when it differs
        # (signing is offline: the region is given, so the API never has to reach that address itself)
        public = settings.s3_public_endpoint
        self.public_client = _minio(public, None, settings) if public else self.client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._bucket_checked = False

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _read_error(self, key: str, exc: Exception) -> StorageError:
        """ObjectNotFound for a missing object, else a StorageError naming the bucket."""
        if getattr(exc, "code", None) in _S3_MISSING:
            return ObjectNotFound(f"object {key!r} not found")
        return StorageError(f"cannot read {key!r} from bucket {self.bucket!r}: {exc}")

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        from minio.error import S3Error

        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageError(f"cannot create bucket {self.bucket!r}: {exc}") from exc
        self._bucket_checked = True

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self._ensure_bucket()
        try:
            self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data), content_type)
        except Exception as exc:
            raise StorageError(f"cannot store {key!r} in bucket {self.bucket!r}: {exc}") from exc

    def put_file(self, key: str, fh: BinaryIO, size: int, content_type: str) -> None:
        """Store ``size`` bytes read from ``fh`` in parts (the client streams them), never held whole."""
        self._ensure_bucket()
        try:
            self.client.put_object(self.bucket, self._key(key), fh, size, content_type, part_size=16 * 2**20)
        except Exception as exc:
            raise StorageError(f"cannot store {key!r} in bucket {self.bucket!r}: {exc}") from exc

    def usage(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (a folder: ``owner/uploads/``), by a LIST: only to start an owner's
        storage counter (``db.storage_usage``), never per request."""
        self._ensure_bucket()
        objects = self.client.list_objects(self.bucket, prefix=self._key(prefix), recursive=True)
        return sum(int(o.size or 0) for o in objects)

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, self._key(key))
        except Exception as exc:
            raise self._read_error(key, exc) from exc
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def size(self, key: str) -> int:
        """The object's size, from a HEAD request: nothing of it is read."""
        try:
            return int(self.client.stat_object(self.bucket, self._key(key)).size or 0)
        except Exception as exc:
            raise self._read_error(key, exc) from exc

    def chunks(self, key: str, limit: int) -> Iterator[bytes]:
        """The object's bytes in pieces, stopping after ``limit`` + 1 bytes (so a caller sees it pass ``limit``)."""
        try:
            response = self.client.get_object(self.bucket, self._key(key))
        except Exception as exc:
            raise self._read_error(key, exc) from exc
        try:
            yield from _capped(response.read, limit)
        finally:
            response.close()
            response.release_conn()

    def url(self, key: str, expiry_seconds: int) -> str:
        return self.public_client.presigned_get_object(
            self.bucket, self._key(key), expires=timedelta(seconds=expiry_seconds)
        )

    def list(self, prefix: str) -> list[str]:
        self._ensure_bucket()
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        objects = self.client.list_objects(self.bucket, prefix=full, recursive=True)
        return sorted((o.object_name or "")[strip:] for o in objects)

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True


def _minio(endpoint: str, secure: bool | None, settings: Settings) -> Any:
    """A client of ``endpoint`` (``host:port`` or ``http(s)://host:port``; ``secure`` None: from its scheme)."""
    from minio import Minio

    if "://" in endpoint:
        parsed = urlparse(endpoint)
        secure = parsed.scheme == "https" if secure is None else secure
        endpoint = parsed.netloc
    return Minio(endpoint, access_key=settings.s3_access_key or None, secret_key=settings.s3_secret_key or None,
                 secure=bool(secure), region=settings.s3_region)


def make_storage(settings: Settings) -> Storage:
    url = settings.effective_storage_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"FARM_STORAGE_URL {url!r} names no bucket")
        return S3Storage(parsed.netloc, parsed.path, settings)
    raise StorageError(f"FARM_STORAGE_URL must be file:///path or s3://bucket/prefix (got {url!r})")


_storages: dict[tuple[object, ...], Storage] = {}


def get_storage(settings: Settings | None = None) -> Storage:
    """A storage client per configuration, made once per process."""
    settings = settings or get_settings()
    ident = (settings.effective_storage_url, settings.s3_endpoint, settings.s3_access_key, settings.s3_secure,
             settings.s3_public_endpoint)
    if ident not in _storages:
        _storages[ident] = make_storage(settings)
    return _storages[ident]
