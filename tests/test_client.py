"""``farm.client`` against the live API (TLS, real worker), plus its parsing and retry rules offline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from farm.client import (
    AsyncClient,
    Completed,
    FarmClientError,
    FarmTimeoutError,
    GenerateInput,
    GenerateOutput,
    InProgress,
    Queued,
    RequestFailedError,
    Status,
    SyncClient,
)
from farm.client._common import SSEParser
from tests.api_stack import ApiStack, idle_input, tiny_input


def _client(stack: ApiStack, owner: str | None = None, **kw: Any) -> SyncClient:
    key = stack.make_key(owner or f"client-{uuid.uuid4().hex[:8]}")
    return SyncClient(stack.base_url, key=key, verify=str(stack.ca_path), **kw)


def _async_client(stack: ApiStack, owner: str | None = None) -> AsyncClient:
    key = stack.make_key(owner or f"client-{uuid.uuid4().hex[:8]}")
    return AsyncClient(stack.base_url, key=key, verify=str(stack.ca_path))


def _check_output(out: GenerateOutput, n: int = 1) -> None:
    assert isinstance(out, GenerateOutput)
    assert [(i.width, i.height) for i in out.images] == [(64, 64)] * n
    assert out.has_nsfw_concepts == [False] * n and out.prompt == "a lighthouse at dusk"
    assert out.timings["inference"] > 0


def test_the_client_imports_no_gpu_stack_and_no_celery() -> None:
    code = ("import sys, farm.client; heavy = ('torch', 'diffusers', 'transformers', 'celery', 'kombu'); "
            "print([m for m in heavy if m in sys.modules])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_submit_status_with_logs_result_and_stream(api_stack: ApiStack) -> None:
    with _client(api_stack) as farm:
        handle = farm.submit(GenerateInput(**tiny_input(seed=5, num_images=2, sync_mode=False)))
        assert isinstance(handle.status(), Queued | InProgress | Completed)
        events = list(handle.stream(with_logs=True))
        assert isinstance(events[-1], Completed) and events[-1].ok
        assert all(isinstance(e, Queued | InProgress) for e in events[:-1])
        done = farm.status(handle.request_id, with_logs=True)
        assert isinstance(done, Completed) and done.error is None
        assert done.metrics["inference_time"] > 0
        assert done.logs and {"timestamp", "level", "source", "message"} <= set(done.logs[0])
        assert any("completed 2 image(s)" in line["message"] for line in done.logs)
        out = handle.result()
        _check_output(out, 2)
        assert out.seed == 5 and out.images[0].url.startswith("http")
        assert httpx.get(out.images[0].url, timeout=10).content[:2] == b"\xff\xd8"  # a JPEG, presigned on S3


def test_subscribe_calls_on_queue_update_and_run_answers_directly(api_stack: ApiStack) -> None:
    updates: list[Status] = []
    enqueued: list[str] = []
    with _client(api_stack) as farm:
        out = farm.subscribe(tiny_input(seed=9), with_logs=True, on_queue_update=updates.append,
                             on_enqueue=enqueued.append, poll_interval=0.02)  # fmt: skip
        _check_output(out)
        assert out.seed == 9 and out.images[0].url.startswith("data:image/jpeg;base64,")  # sync_mode default
        assert len(enqueued) == 1 and updates and isinstance(updates[-1], Completed)
        assert updates[-1].logs
        streamed = farm.subscribe(tiny_input(seed=10), use_stream=True, on_queue_update=updates.append)
        _check_output(streamed)
        ran = farm.run(tiny_input(seed=11, num_images=2))
        _check_output(ran, 2)
        assert ran.seed == 11


def test_idempotent_submit_returns_the_same_request(api_stack: ApiStack) -> None:
    with _client(api_stack) as farm:
        key = uuid.uuid4().hex
        first = farm.submit(tiny_input(seed=3), idempotency_key=key)
        again = farm.submit(tiny_input(seed=3), idempotency_key=key)
        assert first.request_id == again.request_id
        first.wait(poll_interval=0.02)
        # without a key, the input's request_id is the key (as the server's own default)
        named = tiny_input(seed=4, request_id=f"mine-{uuid.uuid4().hex[:8]}")
        assert farm.submit(named).request_id == farm.submit(named).request_id


def test_cancel_and_a_cancelled_job_raise_with_its_error(api_stack: ApiStack) -> None:
    with _client(api_stack) as farm:
        handle = farm.submit(idle_input())
        try:
            status = handle.status()
            assert isinstance(status, Queued) and status.position >= 0
        finally:
            assert handle.cancel() == "CANCELLATION_REQUESTED"
        assert handle.cancel() == "ALREADY_COMPLETED"
        status = handle.status()
        assert isinstance(status, Completed) and not status.ok and status.error_type == "cancelled"
        with pytest.raises(RequestFailedError) as failed:
            handle.result()
        assert failed.value.error_type == "cancelled" and failed.value.request_id == handle.request_id
        with pytest.raises(RequestFailedError, match="cancel"):
            handle.wait()
        assert farm.cancel(uuid.uuid4().hex) == "NOT_FOUND"

        # a subscribe that times out cancels its job
        seen: list[str] = []
        with pytest.raises(FarmTimeoutError) as timed_out:
            farm.subscribe(idle_input(), timeout=0.5, on_enqueue=seen.append)
        assert timed_out.value.request_id == seen[0]
        late = farm.status(seen[0])
        assert isinstance(late, Completed) and late.error_type == "cancelled"


def test_invalid_input_is_422_with_the_field(api_stack: ApiStack) -> None:
    with _client(api_stack) as farm:
        with pytest.raises(FarmClientError) as bad:
            farm.submit(tiny_input(num_inference_steps=0))
        assert bad.value.status_code == 422 and bad.value.error_type == "validation_error"
        assert bad.value.field == "num_inference_steps"
        assert "num_inference_steps: must be between 1 and" in str(bad.value)
        with pytest.raises(FarmClientError) as bad_size:
            farm.run(tiny_input(image_size={"width": 65, "height": 64}))
        assert bad_size.value.errors[0][0] == "image_size.width"
        assert "multiple of 8" in bad_size.value.errors[0][1]
        assert isinstance(bad_size.value.detail, list)  # the server's {loc, msg, type} list, as sent


def test_another_owners_request_is_not_found_and_no_key_is_401(api_stack: ApiStack) -> None:
    with _client(api_stack, "alice") as alice, _client(api_stack, "mallory") as mallory:
        rid = alice.submit(tiny_input()).request_id
        for call in (lambda: mallory.status(rid), lambda: mallory.result(rid), lambda: list(mallory.stream(rid))):
            with pytest.raises(FarmClientError) as missing:
                call()
            assert missing.value.status_code == 404 and missing.value.error_type == "not_found"
        assert mallory.cancel(rid) == "NOT_FOUND"
        _check_output(alice.handle(rid).wait(poll_interval=0.02))
    with SyncClient(api_stack.base_url, key="", verify=str(api_stack.ca_path)) as anonymous:
        anonymous._http.headers.pop("Authorization", None)  # whatever FAL_KEY says
        with pytest.raises(FarmClientError) as unauthorized:
            anonymous.status(rid)
        assert unauthorized.value.status_code == 401 and unauthorized.value.error_type == "unauthorized"


def test_upload_returns_a_url_its_owner_can_read(api_stack: ApiStack, tmp_path: Path) -> None:
    with _client(api_stack, "uploader") as farm:
        url = farm.upload(b"\x00weights\x01", content_type="application/octet-stream", file_name="my lora.bin")
        assert url.startswith(api_stack.base_url + "/storage/files/uploader/uploads/")
        assert url.endswith("/my_lora.bin")
        path = tmp_path / "emb.safetensors"
        path.write_bytes(b"embedding bytes")
        url2 = farm.upload(path)
        assert url2.endswith("/emb.safetensors")
        got = farm._http.get(url2)
        assert got.status_code == 200 and got.content == b"embedding bytes"


def test_async_client_does_the_same(api_stack: ApiStack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _async_client(api_stack) as farm:
            handle = await farm.submit(tiny_input(seed=21, sync_mode=False))
            events = [e async for e in handle.stream()]
            assert isinstance(events[-1], Completed)
            status = await handle.status(with_logs=True)
            assert isinstance(status, Completed) and status.logs
            _check_output(await handle.result())

            updates: list[Status] = []

            async def on_update(status: Status) -> None:
                updates.append(status)

            _check_output(await farm.subscribe(tiny_input(seed=22), on_queue_update=on_update, poll_interval=0.02))
            assert updates and isinstance(updates[-1], Completed)
            _check_output(await farm.run(tiny_input(seed=23)))

            queued = await farm.submit(idle_input())
            assert await queued.cancel() == "CANCELLATION_REQUESTED"
            with pytest.raises(RequestFailedError):
                await queued.result()
            with pytest.raises(FarmClientError) as bad:
                await farm.submit(tiny_input(prompt=""))
            assert bad.value.status_code == 422 and bad.value.field == "prompt"
            path = tmp_path / "lora.bin"
            path.write_bytes(b"abc")
            assert (await farm.upload(path)).endswith("/lora.bin")

    asyncio.run(scenario())


# -- offline: configuration, error parsing, retries, SSE -------------------------------------


def test_url_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARM_API_URL", "farm.example:8443/")
    monkeypatch.delenv("FARM_API_KEY", raising=False)
    monkeypatch.setenv("FAL_KEY", "abc:def")
    with SyncClient() as farm:
        assert farm.endpoint.base_url == "https://farm.example:8443"
        assert farm._http.headers["Authorization"] == "Key abc:def"
        assert farm.endpoint.request_url("r1", "/status") == (
            "https://farm.example:8443/fal-ai/fast-lcm-diffusion/requests/r1/status"
        )
        assert farm.endpoint.run_url == "https://farm.example:8443/run/fal-ai/fast-lcm-diffusion"
    monkeypatch.setenv("FARM_API_KEY", "farm:key")
    with SyncClient("http://127.0.0.1:1") as farm:
        assert farm._http.headers["Authorization"] == "Key farm:key"


def _mock(answers: list[tuple[int, Any]]) -> tuple[SyncClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status, body = answers[min(len(seen), len(answers)) - 1]
        return httpx.Response(status, json=body) if body is not None else httpx.Response(status, text="bad gateway")

    client = SyncClient("http://farm.test", key="k:s", transport=httpx.MockTransport(handler))
    return client, seen


def test_proxy_errors_are_retried_with_the_same_idempotency_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("farm.client._sync.retry_delay", lambda *a: 0.0)
    client, seen = _mock([(502, None), (503, None), (200, {"request_id": "r1"})])
    assert client.submit({"prompt": "x"}).request_id == "r1"
    assert len(seen) == 3 and len({r.headers["Idempotency-Key"] for r in seen}) == 1
    assert json.loads(seen[0].content) == {"prompt": "x"}
    # a 5xx the farm answered itself (error_type) is final
    client, seen = _mock([(503, {"detail": "broker unavailable: down", "error_type": "broker_unavailable"})])
    with pytest.raises(FarmClientError) as err:
        client.submit({"prompt": "x"})
    assert len(seen) == 1 and err.value.status_code == 503 and err.value.error_type == "broker_unavailable"


def test_a_failed_job_result_raises_its_error() -> None:
    failed = {"status": "COMPLETED", "error": "images [0] failed: boom", "error_type": "render_error"}
    client, seen = _mock([(500, {"detail": "images [0] failed: boom", "error_type": "render_error"}),
                          (200, failed)])  # fmt: skip
    with pytest.raises(RequestFailedError) as err:
        client.result("r1")
    assert err.value.error_type == "render_error" and "boom" in str(err.value)
    assert [r.url.path for r in seen][-1].endswith("/requests/r1/status")


def test_sse_parser_skips_pings_and_joins_data_lines() -> None:
    parser = SSEParser()
    lines = [": ping", "", "event: status", 'data: {"status": "IN_QUEUE",', 'data:  "queue_position": 2}', "",
             'data: {"status": "COMPLETED"}', ""]  # fmt: skip
    assert parser.feed_all(lines) == [{"status": "IN_QUEUE", "queue_position": 2}, {"status": "COMPLETED"}]
