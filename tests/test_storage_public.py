"""FARM_S3_PUBLIC_ENDPOINT: URLs handed to clients (presigned result GETs; uploads go through the farm) name the
address clients reach the S3 server at, while the farm itself talks to FARM_S3_ENDPOINT (in Compose
``http://minio:9000``, which no browser can open). Here both are one SeaweedFS server, under two loopback names:
``127.0.0.1`` for the farm, ``localhost`` for the clients."""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlparse

from farm.config import Settings
from farm.storage import S3Storage, make_storage
from tests.services import S3Server


def _settings(s3: S3Server, data_dir: Path, public: str | None) -> Settings:
    return Settings(data_dir=data_dir, storage_url=f"s3://pub-{uuid.uuid4().hex[:12]}/outputs",
                    s3_endpoint=s3.url, s3_access_key=s3.access_key, s3_secret_key=s3.secret_key,
                    s3_region=s3.region, s3_public_endpoint=public)


def test_client_urls_name_the_public_endpoint_and_work(s3_server: S3Server, farm_env: Path) -> None:
    public = f"localhost:{s3_server.port}"
    storage = make_storage(_settings(s3_server, farm_env, f"http://{public}"))
    assert isinstance(storage, S3Storage)
    storage.put("alice/r1/0.jpg", b"result bytes", "image/jpeg")

    url = storage.url("alice/r1/0.jpg", 60)
    assert urlparse(url).scheme == "http" and urlparse(url).netloc == public, url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"result bytes"


def test_without_a_public_endpoint_urls_name_the_farms_endpoint(s3_server: S3Server, farm_env: Path) -> None:
    storage = make_storage(_settings(s3_server, farm_env, None))
    assert isinstance(storage, S3Storage)
    assert urlparse(storage.url("k.jpg", 60)).netloc == s3_server.endpoint


def test_presigning_for_the_public_endpoint_never_reaches_it(s3_server: S3Server, farm_env: Path) -> None:
    """The API may not reach the clients' address itself (a published port, an ingress): signing is offline, so a
    name that does not even resolve still gives a URL, with the public endpoint's scheme."""
    storage = make_storage(_settings(s3_server, farm_env, "https://s3.farm.invalid"))
    assert isinstance(storage, S3Storage)
    url = urlparse(storage.url("alice/r1/0.jpg", 60))
    assert (url.scheme, url.netloc) == ("https", "s3.farm.invalid")
    assert "X-Amz-Signature=" in url.query
