"""fal's upload protocol: ``POST /storage/upload/initiate`` then a credential-less PUT.

Local storage (HMAC-signed farm URL) in process; S3 (presigned PUT to the S3 server) on the
live stack. The file URL is an input for its owner only; caps and quotas apply.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from farm import inputs
from farm.config import Settings, reset_settings
from farm.errors import InvalidInputError
from farm.schemas import GenerateInput
from tests.api_stack import ApiStack

BASE = "https://farm.test"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    from db.migrate import ensure_schema
    from db.session import dispose_engines

    data = tmp_path_factory.mktemp("uploads-data")
    mp = pytest.MonkeyPatch()
    mp.setenv("FARM_DATA_DIR", str(data))
    for name in ("FARM_DATABASE_URL", "FARM_STORAGE_URL", "FARM_BROKER_URL", "FARM_UPLOAD_SIGNING_KEY"):
        mp.delenv(name, raising=False)
    reset_settings()
    ensure_schema()
    yield Settings(data_dir=data, max_upload_bytes=1000, upload_quota_bytes=2500)
    dispose_engines()
    mp.undo()
    reset_settings()


@pytest.fixture(scope="module")
def api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    from farm.api.app import create_app
    from farm.api_keys import create_key

    keys = {owner: create_key(owner)[1] for owner in ("ann", "ben", "cat")}
    with TestClient(create_app(settings), base_url=BASE) as client:
        yield client, keys


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Key {key}"}


def _initiate(client: TestClient, key: str, name: str = "style.safetensors") -> dict[str, str]:
    body = {"content_type": "application/octet-stream", "file_name": name}
    query = {"storage_type": "fal-cdn-v3"}
    reply = client.post("/storage/upload/initiate", params=query, json=body, headers=_auth(key))
    assert reply.status_code == 200, reply.text
    return reply.json()


def _put(client: TestClient, url: str, data: bytes) -> httpx.Response:
    return client.put(url.removeprefix(BASE), content=data, headers={"Content-Type": "application/octet-stream"})


def test_local_signed_url_round_trip_owner_only(api: tuple[TestClient, dict[str, str]], settings: Settings) -> None:
    client, keys = api
    target = _initiate(client, keys["ann"], "../My LoRA!.safetensors")
    assert target["upload_url"].startswith(f"{BASE}/storage/upload/signed/ann/")
    assert target["file_url"].startswith(f"{BASE}/storage/files/ann/uploads/")
    assert target["file_url"].endswith("/My_LoRA_.safetensors")
    # not there until the PUT, which needs no key
    assert client.get(target["file_url"], headers=_auth(keys["ann"])).status_code == 404
    stored = _put(client, target["upload_url"], b"lora bytes")
    assert stored.status_code == 200, stored.text
    assert stored.json() == {"file_url": target["file_url"], "file_size": 10}
    assert client.get(target["file_url"], headers=_auth(keys["ann"])).content == b"lora bytes"
    assert client.get(target["file_url"], headers=_auth(keys["ben"])).status_code == 404
    # an input for its owner only: refused at submit for another owner, and where the worker reads it
    p = GenerateInput.model_validate({"prompt": "a fox", "loras": [{"path": target["file_url"]}]})
    inputs.check_owner(p, "ann")
    with pytest.raises(InvalidInputError, match="loras.0.path: no such upload for this owner"):
        inputs.check_owner(p, "ben")
    with inputs.owner_scope("ann"):
        assert inputs.materialise("upload", target["file_url"], settings).read_bytes() == b"lora bytes"
    with inputs.owner_scope("ben"), pytest.raises(ValueError, match="no such upload for this owner"):
        inputs.materialise("upload", target["file_url"], settings)


def test_signed_url_refuses_tampering_expiry_and_keys(api: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = api
    target = _initiate(client, keys["ben"], "a.bin")
    parts = urlsplit(target["upload_url"])
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    other_owner = parts.path.replace("/signed/ben/", "/signed/ann/") + "?" + parts.query
    later = parts.path + "?" + urlencode({**query, "expires": int(query["expires"]) + 3600})
    forged = parts.path + "?" + urlencode({**query, "signature": "0" * 64})
    not_ascii = parts.path + "?" + urlencode({**query, "signature": "é" * 32})  # a 403 too, not a 500
    for url in (other_owner, later, forged, not_ascii):
        reply = client.put(url, content=b"x")
        assert reply.status_code == 403 and reply.json()["error_type"] == "invalid_upload_url", reply.text
        assert "signature" in reply.json()["detail"]
    from farm.api.uploads import sign

    settings = client.app.state.settings  # type: ignore[attr-defined]
    key = "/".join(["ben", "uploads", *parts.path.split("/")[-2:]])
    expired = parts.path + "?" + urlencode({"expires": 1000, "signature": sign(settings, key, 1000)})
    reply = client.put(expired, content=b"x")
    assert reply.status_code == 403 and "expired" in reply.json()["detail"]
    assert client.get(target["file_url"], headers=_auth(keys["ben"])).status_code == 404  # nothing stored


def test_initiate_validates_and_needs_a_key(api: tuple[TestClient, dict[str, str]]) -> None:
    client, keys = api
    assert client.post("/storage/upload/initiate", json={"content_type": "a/b", "file_name": "x"}).status_code == 401
    for body, field in (({"file_name": "x"}, "content_type"), ({"content_type": "nonsense", "file_name": "x"},
                        "content_type"), ({"content_type": "a/b", "file_name": ""}, "file_name")):  # fmt: skip
        reply = client.post("/storage/upload/initiate", json=body, headers=_auth(keys["ben"]))
        assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", field], reply.text


def test_cap_and_quota(api: tuple[TestClient, dict[str, str]]) -> None:
    """max_upload_bytes 1000 per file, upload_quota_bytes 2500 per owner (this module's settings)."""
    client, keys = api
    too_big = _put(client, _initiate(client, keys["cat"])["upload_url"], b"x" * 1001)
    # answered at the door (farm.api.guard) from the declared length, before the body is read
    assert too_big.status_code == 413 and "FARM_MAX_UPLOAD_BYTES" in too_big.json()["detail"], too_big.text
    assert "FARM_MAX_UPLOAD_BYTES" in too_big.json()["detail"]
    streamed = client.put(_initiate(client, keys["cat"])["upload_url"].removeprefix(BASE),
                          content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length  # fmt: skip
    assert streamed.status_code == 413
    for _ in range(2):
        assert _put(client, _initiate(client, keys["cat"])["upload_url"], b"x" * 1000).status_code == 200
    target = _initiate(client, keys["cat"])  # 2000 of 2500 used: there is room
    over = _put(client, target["upload_url"], b"x" * 600)
    assert over.status_code == 413 and over.json()["error_type"] == "upload_quota_exceeded", over.text
    assert client.get(target["file_url"], headers=_auth(keys["cat"])).status_code == 404
    assert _put(client, target["upload_url"], b"x" * 500).status_code == 200  # exactly the quota
    full = client.post("/storage/upload/initiate", json={"content_type": "a/b", "file_name": "x"},
                       headers=_auth(keys["cat"]))  # fmt: skip
    assert full.status_code == 413 and "FARM_UPLOAD_QUOTA_BYTES" in full.json()["detail"]
    assert _initiate(client, keys["ben"])  # other owners are not affected


def test_s3_uploads_go_through_the_farm_on_the_live_stack(api_stack: ApiStack) -> None:
    key, other = api_stack.make_key("s3-uploader"), api_stack.make_key("s3-other")
    with api_stack.client(key) as farm:
        reply = farm.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "e.png"})
        assert reply.status_code == 200, reply.text
        target = reply.json()
    s3 = urlsplit(target["upload_url"])
    assert s3.netloc == api_stack.host and "X-Amz-Signature" not in s3.query  # the farm caps it, not S3
    with httpx.Client(verify=api_stack.ssl_context) as plain:  # no key: the URL is the credential
        assert plain.put(target["upload_url"], content=b"png bytes", headers={"Content-Type": "image/png"}).is_success
    with api_stack.client(key) as farm:
        assert farm.get(target["file_url"]).content == b"png bytes"
    with api_stack.client(other) as farm:
        assert farm.get(target["file_url"]).status_code == 404
