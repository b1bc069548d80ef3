"""fal_client's own upload flow (issue 21, item 5) against a live ``farm api`` over TLS.

The unmodified ``fal_client`` 1.0.x runs in its own Python process. Its upload hosts are module
constants with no env var (``REST_URL`` for the token, ``CDN_URL`` for ``/files/upload``), so the
script points them at the farm, as it lowers ``MULTIPART_THRESHOLD`` to reach the multipart path
with a small file: settings of the client in the client's process, not a stand-in for any server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from farm.api.cdn_upload import issue_token
from farm.config import Settings
from farm.storage import S3Storage
from tests.api_stack import APP, ApiStack, tiny_input
from tests.test_abuse import UPLOAD_CAP, guarded  # noqa: F401
from tests.test_abuse_storage import _tiny_lora, bucket  # noqa: F401

SCRIPT = r'''
import asyncio, io, json, sys
import fal_client, fal_client.client as fc
from PIL import Image

base, lora_path, tiny, threshold = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
fc.REST_URL = fc.CDN_URL = base  # fal's hosts are constants: pointed at the farm
if threshold:
    fc.MULTIPART_THRESHOLD = threshold
out = {}

def attempt(name, call):
    try:
        out[name] = {"url": call()}
    except Exception as exc:
        out[name] = {"error": type(exc).__name__, "message": str(exc)[:500],
                     "status": getattr(getattr(exc, "response", None), "status_code", None),
                     "body": getattr(getattr(exc, "response", None), "text", None)}

attempt("bytes", lambda: fal_client.upload(b"plain bytes", "text/plain", file_name="note.txt"))
if lora_path:
    attempt("file", lambda: fal_client.upload_file(lora_path))
    attempt("image", lambda: fal_client.upload_image(Image.new("RGB", (8, 8), (255, 0, 0)), format="png"))
    attempt("async", lambda: asyncio.run(fal_client.AsyncClient().upload(b"async bytes", "application/octet-stream")))
    if "url" in out["file"]:
        lora = {"path": out["file"]["url"]}
        out["run"] = fal_client.subscribe(tiny["app"], arguments=dict(tiny["input"], loras=[lora]))
print(json.dumps(out))
'''


def _run(stack: ApiStack, tmp_path: Path, key: str, lora: Path | None = None, threshold: int = 0,
         text: str = SCRIPT) -> dict[str, Any]:
    """Run the script (``text``) as ``key``'s owner; what it printed."""
    script = tmp_path / "upload_script.py"
    script.write_text(text)
    env = {k: v for k, v in stack.env.items() if not k.startswith("FAL_")}
    env.update(FAL_KEY=key, FAL_RUN_HOST=f"{stack.host}/run", FAL_QUEUE_RUN_HOST=stack.host,
               SSL_CERT_FILE=str(stack.ca_path), FAL_HOME_DIR=str(tmp_path / "fal-home"))  # fmt: skip
    tiny = {"app": APP, "input": tiny_input(seed=21)}
    done = subprocess.run([sys.executable, str(script), stack.base_url, str(lora or ""), json.dumps(tiny),
                           str(threshold)], env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, f"{done.stderr[-4000:]}\n--- api log ---\n{stack.log_tail()}"
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _plain(stack: ApiStack) -> httpx.Client:
    """A client with no key at all."""
    return httpx.Client(base_url=stack.base_url, verify=stack.ssl_context, timeout=60)


def test_fal_client_uploads_and_the_link_needs_no_key_but_only_its_owner_may_use_it(
        api_stack: ApiStack, tmp_path: Path) -> None:  # fmt: skip
    owner = "fal-uploader"
    key, other = api_stack.make_key(owner), api_stack.make_key("fal-other-owner")
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(_tiny_lora(api_stack, tmp_path / "files"))
    out = _run(api_stack, tmp_path, key, lora)

    urls = {name: out[name].get("url") for name in ("bytes", "file", "image", "async")}
    assert all(urls.values()), out
    expected = {"bytes": b"plain bytes", "file": lora.read_bytes(), "async": b"async bytes"}
    with _plain(api_stack) as plain:
        for name, url in urls.items():
            parts = urlsplit(url)
            assert parts.netloc == api_stack.host and parts.path.startswith(f"/cdn/storage/files/{owner}/uploads/")
            got = plain.get(url)  # by link, no key
            assert got.status_code == 200, (name, got.text)
            if name in expected:
                assert got.content == expected[name], name
        assert plain.get(urls["image"]).content.startswith(b"\x89PNG")
        assert urls["bytes"].split("?")[0].endswith("/note.txt")
        tampered = urls["bytes"][:-1] + ("0" if urls["bytes"][-1] != "0" else "1")
        assert plain.get(tampered).status_code == 403
        assert plain.get(urls["bytes"].replace("/note.txt", "/other.txt")).status_code == 403  # signed per file
        assert plain.get(urls["bytes"].split("?")[0]).status_code == 422  # no signature: refused, names it
        owner_only = urls["bytes"].split("?")[0].replace("/cdn/storage/", "/storage/")
        assert plain.get(owner_only).status_code == 401  # the unsigned owner URL still needs the key

    # usable as a LoRA by its owner: the job rendered with it
    assert out["run"]["seed"] == 21 and len(out["run"]["images"]) == 1
    # another owner naming it is refused at submit, naming the field and nothing of the owner's
    with api_stack.client(other) as farm:
        refused = farm.post(f"/{APP}", json=tiny_input(loras=[{"path": urls["file"]}]))
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["body", "loras", 0, "path"]
    assert refused.json()["detail"][0]["msg"] == "no such upload for this owner"
    assert owner not in refused.text


def test_upload_tokens_are_owner_bound_short_lived_and_void_with_their_key(api_stack: ApiStack,
                                                                           tmp_path: Path) -> None:
    key, other = api_stack.make_key("fal-token-a"), api_stack.make_key("fal-token-b")
    with api_stack.client(key) as farm:
        reply = farm.post("/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={})
        assert reply.status_code == 200, reply.text
        token = reply.json()
        assert farm.post("/storage/auth/token", params={"storage_type": "gcs"}, json={}).status_code == 422
    assert token["token_type"] == "Bearer" and token["base_url"] == api_stack.base_url
    with _plain(api_stack) as plain:
        assert plain.post("/storage/auth/token", json={}).status_code == 401  # a key is needed for a token
        send = {"Content-Type": "text/plain", "X-Fal-File-Name": "t.txt"}

        def upload(auth: str) -> httpx.Response:
            return plain.post("/files/upload", content=b"token bytes", headers={**send, "Authorization": auth})

        stored = upload(f"Bearer {token['token']}")
        assert stored.status_code == 200 and "/files/fal-token-a/uploads/" in stored.json()["access_url"]
        # the token is not an API key, and an API key is not a token
        assert plain.post(f"/{APP}", json=tiny_input(), headers={"Authorization": f"Key {token['token']}"}
                          ).status_code == 401  # fmt: skip
        assert upload(f"Key {key}").status_code == 401
        # forged: owner b's claims signed with another key; expired: signed by the farm's own key
        forged_settings = Settings(data_dir=tmp_path / "elsewhere", upload_signing_key="another farm's key")
        forged, _ = issue_token(forged_settings, "fal-token-b", None, 600)
        farm_settings = Settings(data_dir=Path(api_stack.env["FARM_DATA_DIR"]))
        expired, _ = issue_token(farm_settings, "fal-token-b", other.split(":")[0], -1)
        for bad, why in ((forged, "bad signature"), (expired, "expired"), ("", "Bearer")):
            refused = upload(f"Bearer {bad}".strip())
            assert refused.status_code == 401 and why in refused.json()["detail"], refused.text
        # revoking the key voids its tokens
        assert api_stack.farm("keys", "revoke", key.split(":")[0]).returncode == 0
        revoked = upload(f"Bearer {token['token']}")
        assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    assert not api_stack.sql("SELECT 1 FROM storage_usage WHERE owner = 'fal-token-b' AND bytes > 0")


def test_past_the_cap_fal_client_is_refused_413_and_nothing_stays(
        guarded: ApiStack, bucket: S3Storage, tmp_path: Path) -> None:  # noqa: F811
    owner = "fal-upload-cap"
    key = guarded.make_key(owner)
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (UPLOAD_CAP + 1))
    script_big = SCRIPT.replace('b"plain bytes", "text/plain"', f'open({str(big)!r}, "rb").read(), "a/b"')
    out = _run(guarded, tmp_path, key, text=script_big)
    assert "error" in out["bytes"], out  # the token route, then fal's fallback (initiate + PUT): both 413
    assert out["bytes"]["status"] == 413 and "FARM_MAX_UPLOAD_BYTES" in out["bytes"]["body"]

    with guarded.client(key) as farm:
        token = farm.post("/storage/auth/token", json={}).json()
    with _plain(guarded) as plain:
        auth = {"Authorization": f"Bearer {token['token']}"}
        chunks = (b"y" * 65536 for _ in range(UPLOAD_CAP // 65536 + 2))  # chunked: no Content-Length to refuse
        refused = plain.post("/files/upload", content=chunks, headers=auth)
        assert refused.status_code == 413 and "FARM_MAX_UPLOAD_BYTES" in refused.text
        assert owner not in refused.text and bucket.bucket not in refused.text
    # multipart (fal_client's path for big files, its threshold lowered here) is refused naming the cap
    out = _run(guarded, tmp_path, key, threshold=4)
    assert out["bytes"]["status"] == 413 and "FARM_MAX_UPLOAD_BYTES" in out["bytes"]["body"], out
    assert "multipart" in out["bytes"]["body"]
    assert bucket.list(f"{owner}/uploads/") == []

