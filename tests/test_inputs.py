"""LoRA / embedding inputs as data URIs, https URLs and our own uploads: validated, capped,
refused for internal targets, fetched through the SSRF guard, and rendered with the tiny model."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from farm import inputs
from farm.admission import parse_input
from farm.config import Settings, reset_settings
from farm.errors import InvalidInputError
from farm.schemas import GenerateInput, admitted_input
from models.registry import TINY_MODEL
from models.renderer import DiffusersRenderer
from tests.receivers import Receiver


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A data dir and files root for the module, also in the environment (validators, ledger)."""
    from db.migrate import ensure_schema
    from db.session import dispose_engines

    data = tmp_path_factory.mktemp("inputs-data")
    (data / "files").mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("FARM_DATA_DIR", str(data))
    mp.setenv("FARM_FILES_ROOT", str(data / "files"))
    for name in ("FARM_DATABASE_URL", "FARM_STORAGE_URL", "FARM_BROKER_URL", "FARM_WEBHOOK_ALLOWLIST"):
        mp.delenv(name, raising=False)
    reset_settings()
    ensure_schema()
    yield Settings(data_dir=data, files_root=data / "files")
    dispose_engines()
    mp.undo()
    reset_settings()


@pytest.fixture(scope="module")
def renderer(settings: Settings) -> DiffusersRenderer:
    return DiffusersRenderer.load(TINY_MODEL, device="cpu", settings=settings)


@pytest.fixture(scope="module")
def lora(renderer: DiffusersRenderer, settings: Settings) -> bytes:
    """The bytes of a real LoRA for the tiny model (safetensors)."""
    from tests.test_models import _make_lora

    return (settings.effective_files_root / _make_lora(settings)).read_bytes()


def data_uri(data: bytes, media: str = "application/octet-stream") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def params(**kw: object) -> GenerateInput:
    base = {"model_name": TINY_MODEL, "prompt": "a red fox", "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 2, "guidance_scale": 1.0, "num_images": 1, "format": "png"}
    return GenerateInput.model_validate({**base, **kw})


def stored_params(**kw: object) -> GenerateInput:
    """An input as read back from the ledger (the farm's own ``farm-stored:`` paths pass)."""
    return admitted_input(params(**{k: [] for k in kw}).model_dump(mode="json") | kw)


def png(renderer: DiffusersRenderer, p: GenerateInput) -> bytes:
    from models.encode import encode_image

    return encode_image(renderer.render(p, 7, [0]).images[0].image, "png")[0]


def refused_at_validation(path: str, reason: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_input({"prompt": "x", "loras": [{"path": path}]})
    assert info.value.field == "loras.0.path" and reason in info.value.reason, info.value.reason


# -- data URIs --------------------------------------------------------------------------------------


def test_data_uri_lora_renders_like_the_local_file(renderer, settings, lora):
    local = params(loras=[{"path": "loras/tiny/pytorch_lora_weights.safetensors"}])
    inline = params(loras=[{"path": data_uri(lora)}])
    assert png(renderer, inline) == png(renderer, local) != png(renderer, params())
    cached = sorted((settings.data_dir / "inputs").glob("*.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == lora
    assert not list((settings.data_dir / "inputs").glob(".tmp-*"))
    assert renderer.pipe.get_list_adapters() == {}


def test_data_uri_embedding_is_accepted(renderer, settings):
    import torch
    from safetensors.torch import save

    blob = save({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))})
    emb = params(prompt="a photo of <s0> <s1>", embeddings=[{"path": data_uri(blob), "tokens": ["<s0>", "<s1>"]}])
    assert png(renderer, emb) != png(renderer, params(prompt="a photo of <s0> <s1>"))


def test_data_uri_checks_and_size_cap(settings, monkeypatch):
    refused_at_validation("data:text/plain,hello", "must be base64")
    refused_at_validation("data:application/octet-stream;base64", "needs a ','")
    refused_at_validation("data:;base64,!!!!", "not valid base64")
    refused_at_validation("data:;base64,", "empty")
    monkeypatch.setenv("FARM_FILE_INPUT_MAX_BYTES", "1000")
    reset_settings()
    try:
        parse_input({"prompt": "x", "loras": [{"path": data_uri(b"a" * 1000)}]})
        refused_at_validation(data_uri(b"a" * 1001), "more than the 1000 bytes allowed")
        refused_at_validation(data_uri(b"a" * 10**6), "holds about 1000000 bytes")
        with pytest.raises(InvalidInputError, match="embeddings.0.path: .*more than"):
            parse_input({"prompt": "x", "embeddings": [{"path": data_uri(b"a" * 2000)}]})
    finally:
        monkeypatch.delenv("FARM_FILE_INPUT_MAX_BYTES")
        reset_settings()


# -- URLs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/lora.safetensors", "https://[::1]/lora.safetensors",
    "https://[::ffff:127.0.0.1]/x", "https://169.254.169.254/latest/meta-data/", "https://2130706433/x",
    "https://10.0.0.1/x", "https://100.64.0.1/x",
])
def test_urls_of_internal_addresses_are_refused_at_validation(settings, url):
    refused_at_validation(url, "refused")


def test_plain_http_and_other_schemes_are_refused(settings):
    refused_at_validation("http://example.com/lora.safetensors", "plain http:// is refused")
    for path in ("file:///etc/passwd", "s3://bucket/key", "ftp://example.com/x", "gopher://x/"):
        refused_at_validation(path, "only https:// URLs")


def test_a_name_that_resolves_inside_is_refused_by_the_fetch_stage(renderer, settings):
    with Receiver() as rx:
        url = rx.url("/lora.safetensors", host="localhost", scheme="https")
        p = params(loras=[{"path": url}])  # a name: validation does no DNS
        assert inputs.pending(p, settings) == [("loras.0.path", url)]
        with pytest.raises(ValueError, match=r"localhost \(.*\) is a loopback address"):
            inputs.fetch_one("loras.0.path", url, "ann", settings)
        # and a worker never fetches: an unfetched URL fails the render, naming the field
        with pytest.raises(InvalidInputError, match=r"loras.0.path: was not fetched before rendering"):
            renderer.render(p, 1, [0])
        assert rx.requests == []


def test_stored_form_is_refused_in_user_input(settings):
    refused_at_validation("farm-stored:ann/inputs/abc.safetensors", "only https:// URLs")


@pytest.fixture
def tls_receiver(tmp_path, monkeypatch) -> Iterator[Receiver]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    with Receiver(tls=ctx) as rx:
        yield rx


def test_allow_listed_https_url_is_fetched_once_and_renders(renderer, settings, lora, tls_receiver, monkeypatch):
    rx = tls_receiver
    rx.default = (200, {"Content-Type": "application/octet-stream"}, lora)
    monkeypatch.setenv("FARM_WEBHOOK_ALLOWLIST", json.dumps([f"localhost:{rx.port}"]))
    reset_settings()
    allowed = settings.model_copy(update={"webhook_allowlist": [f"localhost:{rx.port}"]})
    try:
        url = rx.url("/weights/lora.safetensors", host="localhost")
        stored = inputs.fetch_one("loras.0.path", url, "ann", allowed)  # the fetch stage's step
        assert stored.startswith("farm-stored:ann/inputs/") and stored.endswith(".safetensors")
        assert inputs.fetch_one("loras.0.path", url, "ann", allowed) == stored  # from the cache
        with inputs.owner_scope("ann"):
            with_url = png(renderer, stored_params(loras=[{"path": stored}]))
        assert with_url == png(renderer, params(loras=[{"path": data_uri(lora)}]))
        with inputs.owner_scope("ben"), pytest.raises(InvalidInputError, match="loras.0.path: no such upload"):
            renderer.render(stored_params(loras=[{"path": stored}]), 1, [0])  # another owner's stored input
        assert len(rx.requests) == 1 and rx.requests[0].server_name == "localhost"
        # plain http to the same allow-listed host and port is accepted; elsewhere it is not
        assert inputs.check_input(rx.url("/x", host="localhost", scheme="http"), allowed) == "url"
    finally:
        monkeypatch.delenv("FARM_WEBHOOK_ALLOWLIST")
        reset_settings()


def test_url_downloads_are_capped_and_checked(settings, tls_receiver):
    rx = tls_receiver
    capped = settings.model_copy(update={"webhook_allowlist": ["localhost"], "file_input_max_bytes": 100_000})

    def fetch(path: str) -> Path:
        return inputs.materialise("url", rx.url(path, host="localhost"), capped)

    rx.script = [(200, {}, b"x" * 100_001)]
    with pytest.raises(ValueError, match="it is 100001 bytes, more than the 100000 bytes allowed"):
        fetch("/declared-too-big")
    rx.chunked = True  # no Content-Length: counted while streaming
    rx.script = [(200, {}, b"x" * 300_000)]
    with pytest.raises(ValueError, match="more than the"):
        fetch("/streamed-too-big")
    rx.script = [(404, {}, b"nope")]
    with pytest.raises(ValueError, match="HTTP 404"):
        fetch("/missing")
    with Receiver() as internal:
        rx.script = [(302, {"Location": internal.url("/secret")}, b"")]
        with pytest.raises(ValueError, match="loopback"):
            fetch("/redirect")
        assert internal.requests == []
    rx.script = [(200, {}, b"small enough")]
    assert fetch("/ok").read_bytes() == b"small enough"
    assert not list((settings.data_dir / "inputs").glob(".tmp-*"))


# -- uploads ----------------------------------------------------------------------------------------


@pytest.fixture
def api(settings: Settings) -> tuple[TestClient, dict[str, str]]:
    from farm.api.app import create_app
    from farm.api_keys import create_key

    keys = {owner: create_key(owner)[1] for owner in ("ann", "ben")}
    app_settings = settings.model_copy(update={"max_upload_bytes": 2 * 2**20})
    return TestClient(create_app(app_settings), base_url="https://farm.test"), keys


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Key {key}"}


def test_upload_round_trip_and_use_as_lora(api, renderer, settings, lora):
    client, keys = api
    reply = client.post("/storage/upload", params={"file_name": "../My LoRA!.safetensors"}, content=lora,
                        headers={**_auth(keys["ann"]), "Content-Type": "application/octet-stream"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["file_name"] == "My_LoRA_.safetensors" and body["file_size"] == len(lora)
    url = body["url"]
    assert url.startswith("https://farm.test/storage/files/ann/uploads/") and url.endswith("/My_LoRA_.safetensors")
    # readable by its owner only
    path = url.removeprefix("https://farm.test")
    assert client.get(path, headers=_auth(keys["ann"])).content == lora
    assert client.get(path, headers=_auth(keys["ben"])).status_code == 404
    assert client.get(path).status_code == 401
    # usable as an input by the same owner, from storage (no network), and by nobody else
    p = params(loras=[{"path": url}])
    inputs.check_owner(p, "ann")
    with pytest.raises(InvalidInputError, match="loras.0.path: no such upload for this owner"):
        inputs.check_owner(p, "ben")
    with inputs.owner_scope("ann"):
        assert png(renderer, p) == png(renderer, params(loras=[{"path": data_uri(lora)}]))
    with inputs.owner_scope("ben"), pytest.raises(InvalidInputError, match="no such upload"):
        renderer.render(p, 1, [0])


def test_an_upload_over_the_cap_is_refused_before_it_is_read(settings):
    """A presigned S3 PUT cannot be capped: an object over max_upload_bytes (written straight to storage
    here, as such a PUT would write it) is refused as an input from its size, naming the setting, and deleted."""
    from farm.storage import get_storage

    upload_id = "a" * 32
    storage = get_storage(settings)
    storage.put(f"cat/uploads/{upload_id}/big.bin", b"x" * 2000, "application/octet-stream")
    url = f"https://farm.test/storage/files/cat/uploads/{upload_id}/big.bin"
    capped = settings.model_copy(update={"max_upload_bytes": 1000})
    try:
        with inputs.owner_scope("cat"), pytest.raises(ValueError, match="2000 bytes.*FARM_MAX_UPLOAD_BYTES"):
            inputs.materialise("upload", url, capped)
        assert storage.list("cat/uploads/") == []  # never usable: deleted, so its owner's quota has room again
    finally:
        storage.delete(f"cat/uploads/{upload_id}/big.bin")


def test_upload_multipart_limits_and_auth(api):
    client, keys = api
    files = {"file": ("emb.safetensors", b"\x00" * 1000, "application/octet-stream")}
    reply = client.post("/storage/upload", files=files, headers=_auth(keys["ben"]))
    assert reply.status_code == 200, reply.text
    assert reply.json()["file_name"] == "emb.safetensors" and reply.json()["file_size"] == 1000
    assert inputs.kind_of(reply.json()["url"]) == "upload"
    assert client.post("/storage/upload", content=b"x").status_code == 401
    too_big = b"x" * (2 * 2**20 + 1)
    assert client.post("/storage/upload", content=too_big, headers=_auth(keys["ben"])).status_code == 413
    streamed = iter([too_big[:2**20], too_big[2**20:]])  # no Content-Length
    assert client.post("/storage/upload", content=streamed, headers=_auth(keys["ben"])).status_code == 413
    big_part = {"file": ("big.bin", too_big, "application/octet-stream")}
    assert client.post("/storage/upload", files=big_part, headers=_auth(keys["ben"])).status_code == 413
    assert client.post("/storage/upload", content=b"", headers=_auth(keys["ben"])).status_code == 400
    no_file = client.post("/storage/upload", files={"a": (None, "b")}, headers=_auth(keys["ben"]))
    assert no_file.status_code == 400 and "no file part" in no_file.json()["detail"]


# -- hub ids (the hub is unreachable here: a local Hugging Face cache, and a hub endpoint on loopback) ------


def _hf_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """``repo`` in the Hugging Face cache layout: refs/main → snapshots/<rev>/<file> → blobs/<sha>."""
    folder = root / ("models--" + repo.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "snapshots" / rev).mkdir(parents=True)
    (folder / "blobs").mkdir()
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (folder / "snapshots" / rev / name).symlink_to(blob)
    return folder


def test_hub_ids_resolve_from_the_local_cache_with_a_size_check(renderer, settings, lora, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _hf_cache(tmp_path / "hub", "acme/tiny-lora", {"pytorch_lora_weights.safetensors": lora, "README.md": b"hi"})
    _hf_cache(tmp_path / "hub", "acme/two-files", {"a.safetensors": lora, "b.safetensors": lora})
    p = params(loras=[{"path": "acme/tiny-lora"}])
    assert inputs.pending(p, settings) == [("loras.0.path", "acme/tiny-lora")]
    stored = inputs.fetch_one("loras.0.path", "acme/tiny-lora", "ann", settings)
    assert stored.startswith("farm-stored:ann/inputs/")
    with inputs.owner_scope("ann"):  # rendered from the stored copy, handed to diffusers as an absolute path
        assert png(renderer, stored_params(loras=[{"path": stored}])) == png(renderer, params(
            loras=[{"path": data_uri(lora)}]))
    small = settings.model_copy(update={"file_input_max_bytes": len(lora) - 1})
    with pytest.raises(ValueError, match=r"hub file pytorch_lora_weights.safetensors of 'acme/tiny-lora' is .* more"):
        inputs.fetch_one("loras.0.path", "acme/tiny-lora", "ann", small)
    with pytest.raises(ValueError, match="not exactly one .safetensors file"):
        inputs.fetch_one("loras.0.path", "acme/two-files", "ann", settings)
    with pytest.raises(ValueError, match="'acme/absent' is not in the Hugging Face cache"):
        inputs.fetch_one("loras.0.path", "acme/absent", "ann", settings)


def test_hub_ids_online_are_downloaded_through_the_guard(settings, lora, tls_receiver, monkeypatch):
    rx = tls_receiver
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", rx.url("", host="localhost"))
    rx.on_request = lambda rec: (200, {}, b"learned " + rec.path.encode()) if "learned_embeds.bin" in rec.path \
        else (404, {}, b"no")
    allowed = settings.model_copy(update={"webhook_allowlist": [f"localhost:{rx.port}"]})
    stored = inputs.fetch_one("embeddings.0.path", "acme/emb", "ann", allowed)
    assert [r.path for r in rx.requests] == ["/acme/emb/resolve/main/learned_embeds.safetensors",
                                             "/acme/emb/resolve/main/learned_embeds.bin"]
    got = inputs.materialise("stored", stored, settings).read_bytes()
    assert got == b"learned /acme/emb/resolve/main/learned_embeds.bin"
    with pytest.raises(ValueError, match="hub id 'acme/none' has none of"):
        inputs.fetch_one("loras.0.path", "acme/none", "ann", allowed)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # an internal hub endpoint, not allow-listed
    with pytest.raises(ValueError, match="loopback"):
        inputs.fetch_one("loras.0.path", "acme/other", "ann", settings)


def test_stage_inline_moves_data_uris_to_storage_with_a_total_cap(settings, lora):
    from db.session import session_scope
    from farm.inputs import staging
    from farm.storage import get_storage

    p = params(loras=[{"path": data_uri(lora)}], embeddings=[{"path": data_uri(b"e" * 100)}])
    staged, blobs = inputs.stage_inline(p, "cat", settings)
    paths = [staged.loras[0].path, staged.embeddings[0].path]
    assert all(x.startswith("farm-stored:cat/inputs/") for x in paths) and len(blobs) == 2
    assert get_storage(settings).list("cat/") == []  # stored only in the submit's transaction (staging.held)
    with session_scope() as s, staging.held(s, "cat", blobs, settings):
        pass
    assert get_storage(settings).get(paths[0].removeprefix("farm-stored:")) == lora
    capped = settings.model_copy(update={"inline_input_max_bytes": len(lora) + 99})
    with pytest.raises(InvalidInputError, match="embeddings.0.path: the request's data URIs hold"):
        inputs.stage_inline(p, "dot", capped)
    assert get_storage(settings).list("dot/") == []
    blobs = inputs.stage_inline(params(loras=[{"path": data_uri(b"x" * 10)}]), "cat", settings)[1]
    with pytest.raises(RuntimeError), session_scope() as s, staging.held(s, "cat", blobs, settings):
        assert get_storage(settings).exists(next(iter(blobs)))
        raise RuntimeError("refused")  # the submit is refused: the blob it stored goes, the others stay
    assert len(get_storage(settings).list("cat/inputs/")) == 2
