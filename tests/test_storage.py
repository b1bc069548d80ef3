"""Storage: local folder and a real S3 server over HTTP (SeaweedFS), deterministic keys."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
import uuid
from urllib.parse import parse_qs, urlparse

import pytest

from farm.config import Settings
from farm.errors import ObjectNotFound, StorageError
from farm.storage import LocalStorage, S3Storage, data_uri, make_storage, object_key
from tests.services import S3Server


def test_keys_and_data_uris():
    assert object_key("acme", "req-1", 3, "jpeg") == "acme/req-1/3.jpg"
    assert object_key("acme", "req-1", 0, "png") == "acme/req-1/0.png"
    assert data_uri(b"\x89PNG", "image/png") == "data:image/png;base64,iVBORw=="


def test_local_storage_overwrites_and_refuses_escapes(tmp_path):
    store = make_storage(Settings(storage_url=(tmp_path / "o").as_uri(), data_dir=tmp_path))
    assert isinstance(store, LocalStorage)
    store.put("a/r/0.jpg", b"one", "image/jpeg")
    store.put("a/r/0.jpg", b"two", "image/jpeg")  # a redelivery rewrites, never duplicates
    assert store.get("a/r/0.jpg") == b"two"
    assert store.list("a/") == ["a/r/0.jpg"]
    assert store.url("a/r/0.jpg", 60) == (tmp_path / "o" / "a" / "r" / "0.jpg").as_uri()
    with pytest.raises(StorageError, match="escapes"):
        store.put("../x.jpg", b"", "image/jpeg")
    with pytest.raises(StorageError, match="not found"):
        store.get("a/r/9.jpg")


def test_bad_storage_url_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="file:///path or s3://bucket/prefix"):
        make_storage(Settings(storage_url="ftp://x", data_dir=tmp_path))
    with pytest.raises(StorageError, match="FARM_S3_ENDPOINT"):
        make_storage(Settings(storage_url="s3://bucket", data_dir=tmp_path))


def test_s3_storage_on_a_real_server(s3_server, tmp_path):
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    settings = Settings(storage_url=f"s3://{bucket}/pre/fix", s3_endpoint=s3_server.url, s3_access_key="testing",
                        s3_secret_key="testing", data_dir=tmp_path)
    store = make_storage(settings)
    assert isinstance(store, S3Storage)
    store.put("o/r/0.png", b"\x89PNG-one", "image/png")
    store.put("o/r/0.png", b"\x89PNG-two", "image/png")
    store.put("o/r/1.png", b"\x89PNG-1", "image/png")
    assert store.list("o/r/") == ["o/r/0.png", "o/r/1.png"]
    assert store.get("o/r/0.png") == b"\x89PNG-two"
    url = store.url("o/r/0.png", 123)
    assert urlparse(url).path == f"/{bucket}/pre/fix/o/r/0.png"
    assert parse_qs(urlparse(url).query)["X-Amz-Expires"] == ["123"]
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"\x89PNG-two"
        assert resp.headers["Content-Type"] == "image/png"
    store.delete("o/r/1.png")
    assert store.list("o/r/") == ["o/r/0.png"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_missing_object_is_object_not_found(kind, request, tmp_path):
    """Both storages say a missing object the same way: exists() is False and every read raises
    ObjectNotFound (a StorageError), so no caller matches error strings."""
    if kind == "local":
        store = make_storage(Settings(storage_url=f"file://{tmp_path}/out", data_dir=tmp_path))
    else:
        s3 = request.getfixturevalue("s3_server")
        store = make_storage(Settings(storage_url=f"s3://t-{uuid.uuid4().hex[:8]}/p", s3_endpoint=s3.url,
                                      s3_access_key="testing", s3_secret_key="testing", data_dir=tmp_path))
    store.put("o/r/0.png", b"\x89PNG", "image/png")
    assert store.exists("o/r/0.png") and not store.exists("o/r/1.png")
    for read in (store.get, store.size, lambda key: b"".join(store.chunks(key, 10))):
        with pytest.raises(ObjectNotFound, match="not found"):
            read("o/r/1.png")
    assert issubclass(ObjectNotFound, StorageError)


def test_the_s3_server_refuses_a_wrong_key(s3_server: S3Server, tmp_path) -> None:
    """The S3 server of the tests checks signatures as MinIO or AWS do: a wrong secret, an unknown access key
    and an unsigned request are all refused, and nothing they tried is stored."""
    from minio import Minio
    from minio.error import S3Error

    def storage(access_key: str, secret_key: str) -> S3Storage:
        store = make_storage(Settings(storage_url=f"s3://{bucket}/p", s3_endpoint=s3_server.url, data_dir=tmp_path,
                                      s3_access_key=access_key, s3_secret_key=secret_key))
        assert isinstance(store, S3Storage)
        return store

    bucket = f"t-{uuid.uuid4().hex[:8]}"
    good = storage(s3_server.access_key, s3_server.secret_key)
    good.put("o/r/0.png", b"\x89PNG", "image/png")
    for access_key, secret_key, code in ((s3_server.access_key, "not-the-secret", "SignatureDoesNotMatch"),
                                         ("nobody", s3_server.secret_key, "InvalidAccessKeyId")):
        client = Minio(s3_server.endpoint, access_key=access_key, secret_key=secret_key, secure=False)
        with pytest.raises(S3Error) as refused:
            client.get_object(bucket, "p/o/r/0.png")
        assert refused.value.code == code
        bad = storage(access_key, secret_key)
        with pytest.raises(StorageError, match="cannot (store|create bucket)"):
            bad.put("o/r/1.png", b"\x89PNG", "image/png")
        with pytest.raises(StorageError, match="cannot read") as read:
            bad.get("o/r/0.png")
        assert not isinstance(read.value, ObjectNotFound)  # refused, not missing
        with pytest.raises(urllib.error.HTTPError) as presigned:
            urllib.request.urlopen(bad.url("o/r/0.png", 60), timeout=10)
        assert presigned.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{s3_server.url}/{bucket}/p/o/r/0.png", timeout=10)
    assert anonymous.value.code == 403
    assert good.list("o/r/") == ["o/r/0.png"]


def test_the_s3_server_restarts_on_its_data(s3_server: S3Server, tmp_path) -> None:
    """What the fault harness does to S3 (``stop()`` kills weed, ``start()`` starts it again on the same ports
    and data directory): objects stored before are there after, and the same client stores again."""
    store = make_storage(Settings(storage_url=f"s3://t-{uuid.uuid4().hex[:8]}/p", s3_endpoint=s3_server.url,
                                  s3_access_key=s3_server.access_key, s3_secret_key=s3_server.secret_key,
                                  data_dir=tmp_path))
    store.put("o/r/0.png", b"\x89PNG-before", "image/png")
    s3_server.stop()
    with pytest.raises(ConnectionRefusedError):  # really down
        socket.create_connection(("127.0.0.1", s3_server.port), timeout=5).close()
    s3_server.start()
    assert store.get("o/r/0.png") == b"\x89PNG-before"
    store.put("o/r/1.png", b"\x89PNG-after", "image/png")
    assert store.list("o/r/") == ["o/r/0.png", "o/r/1.png"]
