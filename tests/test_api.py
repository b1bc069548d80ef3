"""The HTTP API over TLS on loopback: auth, tenants, idempotency, validation, limits, queue, cancel, run."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import httpx
import pytest

from tests.api_stack import APP, ApiStack, idle_input, tiny_input

JPEG = b"\xff\xd8\xff"


def req_path(rid: str, suffix: str = "", prefix: str = "") -> str:
    return f"{prefix}/{APP}/requests/{rid}{suffix}"


def wait_done(c: httpx.Client, rid: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = c.get(req_path(rid, "/status"), params={"logs": 1}).json()
        if body["status"] == "COMPLETED":
            return body
        time.sleep(0.05)
    raise AssertionError(f"request {rid} not completed within {timeout} s")


def submit(c: httpx.Client, body: dict[str, Any], prefix: str = "", **headers: str) -> str:
    r = c.post(f"{prefix}/{APP}", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def cancel_all(c: httpx.Client, rids: list[str]) -> None:
    for rid in rids:
        c.put(req_path(rid, "/cancel"))


def test_no_bad_or_revoked_key_gets_401(api_stack: ApiStack) -> None:
    key = api_stack.make_key("auth-owner", "--name", "ci")
    key_id = key.split(":")[0]
    probe = req_path("0123abcd", "/status")
    with api_stack.client() as c:
        for auth in (None, "Bearer x", f"Key {key_id}", f"Key {key_id}:wrong-secret", "Key nope:nope"):
            r = c.get(probe, headers={"Authorization": auth} if auth else {})
            assert r.status_code == 401, (auth, r.text)
            assert r.json()["error_type"] == "unauthorized" and r.json()["detail"]
            assert r.headers["www-authenticate"] == "Key"
        assert c.post(f"/{APP}", json=tiny_input()).status_code == 401
        assert c.post(f"/run/{APP}", json=tiny_input()).status_code == 401
    with api_stack.client(key) as c:
        assert c.get(probe).status_code == 404
    listed = api_stack.farm("keys", "list", "--owner", "auth-owner")
    assert key_id in listed.stdout and key.split(":")[1] not in listed.stdout
    assert api_stack.farm("keys", "revoke", key_id).returncode == 0
    with api_stack.client(key) as c:
        assert c.get(probe).status_code == 401
    assert api_stack.farm("keys", "revoke", key_id).returncode == 1  # already revoked
    stored = api_stack.sql("SELECT secret_hash FROM api_keys WHERE id = :id", id=key_id)
    assert stored == [(hashlib.sha256(key.split(":")[1].encode()).hexdigest(),)]  # only the hash is kept


def test_another_owners_request_is_404_on_every_route(api_stack: ApiStack) -> None:
    alice, bob = api_stack.make_key("iso-alice"), api_stack.make_key("iso-bob")
    with api_stack.client(alice) as a, api_stack.client(bob) as b:
        rid = submit(a, tiny_input(sync_mode=False, num_images=2), **{"Idempotency-Key": "iso-1"})
        final = wait_done(a, rid)
        assert final["error"] is None and final["metrics"]["inference_time"] >= 0
        for prefix in ("", "/queue"):
            for method, suffix in (("GET", "/status"), ("GET", "/status/stream"), ("GET", ""), ("PUT", "/cancel")):
                r = b.request(method, req_path(rid, suffix, prefix))
                assert r.status_code == 404, (prefix, method, suffix, r.text)
                assert r.json()["error_type"] == "not_found"
        assert b.put(req_path(rid, "/cancel")).json()["status"] == "NOT_FOUND"
        # the same idempotency key from another owner is another request
        other = submit(b, tiny_input(sync_mode=False, num_images=2), **{"Idempotency-Key": "iso-1"})
        assert other != rid
        # the owner reads the result: presigned URLs on the S3 server
        out = a.get(req_path(rid)).json()
        assert out["seed"] >= 0 and out["has_nsfw_concepts"] == [False, False] and len(out["images"]) == 2
        image = out["images"][0]
        assert (image["width"], image["height"], image["content_type"]) == (64, 64, "image/jpeg")
        assert "X-Amz-Signature" in image["url"]
        assert httpx.get(image["url"], timeout=10).content[:3] == JPEG
        r = a.put(req_path(rid, "/cancel"))
        assert (r.status_code, r.json()["status"]) == (400, "ALREADY_COMPLETED")
        # logs: items with timestamp, level, source, message
        assert {tuple(sorted(line)) for line in final["logs"]} == {("level", "message", "source", "timestamp")}
        messages = [line["message"] for line in final["logs"]]
        assert messages[0].startswith("queued 2 image(s)") and messages[-1] == "completed 2 image(s)"
        wait_done(b, other)
    rows = api_stack.sql("SELECT owner, lane, source FROM jobs WHERE id IN (:a, :b) ORDER BY owner", a=rid, b=other)
    assert rows == [("iso-alice", "queue", "api"), ("iso-bob", "queue", "api")]


def test_repeated_submit_with_an_idempotency_key_makes_one_job(api_stack: ApiStack) -> None:
    key = api_stack.make_key("idem")
    body = tiny_input(seed=5)
    with api_stack.client(key) as c:
        first = submit(c, body, **{"Idempotency-Key": "k-1"})
        assert submit(c, body, **{"Idempotency-Key": "k-1"}) == first
        r = c.post(f"/queue/{APP}", json=body, headers={"Idempotency-Key": "k-1"})
        assert r.json()["request_id"] == first and f"/queue/{APP}/requests/{first}" in r.json()["response_url"]
        # the input's request_id field works as the key too
        by_field = submit(c, tiny_input(request_id="my-req-1"))
        assert submit(c, tiny_input(request_id="my-req-1")) == by_field != first
        # a key reused for another input is refused, naming the key
        r = c.post(f"/{APP}", json=tiny_input(seed=6), headers={"Idempotency-Key": "k-1"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
        r = c.post(f"/{APP}", json=tiny_input(request_id="my-req-1", seed=9))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "request_id"]
        wait_done(c, first)
        wait_done(c, by_field)
        assert submit(c, body, **{"Idempotency-Key": "k-1"}) == first  # also once completed
    rows = api_stack.sql("SELECT idempotency_key, count(*) FROM jobs WHERE owner = 'idem' GROUP BY 1 ORDER BY 1")
    assert rows == [("k-1", 1), ("my-req-1", 1)]


@pytest.mark.parametrize(
    ("change", "loc", "message"),
    [
        ({"prompt": ""}, ["body", "prompt"], "must not be empty"),
        ({"image_size": {"width": 513, "height": 64}}, ["body", "image_size", "width"], "multiple of 8"),
        ({"num_inference_steps": 0}, ["body", "num_inference_steps"], "between 1 and 50"),
        ({"model_name": "nope/model"}, ["body", "model_name"], "unknown model"),
        ({"num_images": 10000}, ["body", "num_images"], "between 1 and 64"),
        ({"guidance_rescale": 2}, ["body", "guidance_rescale"], "less than or equal to 1 (got 2)"),
        ({"prompt": "a\u0000b"}, ["body", "prompt"], "NUL"),
        ({"colour": "red"}, ["body", "colour"], "Extra inputs are not permitted"),
    ],
)
def test_invalid_input_is_422_naming_the_field(api_stack: ApiStack, change: dict[str, Any], loc: list[str],
                                               message: str) -> None:  # fmt: skip
    key = api_stack.make_key("invalid")
    with api_stack.client(key) as c:
        for path in (f"/{APP}", f"/queue/{APP}", f"/run/{APP}"):
            r = c.post(path, json=tiny_input(**change))
            assert r.status_code == 422, r.text
            body = r.json()
            assert body["error_type"] == "validation_error"
            assert [e["loc"] for e in body["detail"]] == [loc] and message in body["detail"][0]["msg"]
    assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'invalid'") == [(0,)]


def test_key_limits_webhook_and_missing_fields_are_422(api_stack: ApiStack) -> None:
    key = api_stack.make_key("small", "--max-images", "2")
    with api_stack.client(key) as c:
        r = c.post(f"/{APP}", json=tiny_input(num_images=3))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "num_images"]
        assert "with this API key" in r.json()["detail"][0]["msg"]
        for hook in ("http://127.0.0.1:9/hook", "file:///etc/passwd", "http://[::ffff:127.0.0.1]/x"):
            r = c.post(f"/{APP}", json=tiny_input(), params={"fal_webhook": hook})
            assert r.status_code == 422, (hook, r.text)
            assert r.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
        r = c.post(f"/{APP}", json={"model_name": "farm/tiny-lcm"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
        r = c.post(f"/{APP}", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error_type"] == "validation_error"
    assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'small'") == [(0,)]


def test_jobs_in_flight_are_limited_per_owner(api_stack: ApiStack) -> None:
    key = api_stack.make_key("limited", "--max-in-flight", "2")
    other_key = api_stack.make_key("limited")  # the owner's limit counts all its keys' jobs
    rids: list[str] = []
    with api_stack.client(key) as c, api_stack.client(other_key) as c2:
        try:
            rids += [submit(c, idle_input()), submit(c2, idle_input())]
            r = c.post(f"/{APP}", json=idle_input())
            assert r.status_code == 429 and r.json()["error_type"] == "too_many_requests"
            assert "limit is 2" in r.json()["detail"]
            assert c.post(f"/run/{APP}", json=idle_input()).status_code == 429
            assert c.put(req_path(rids[0], "/cancel")).status_code == 202
            rids.append(submit(c, idle_input()))
        finally:
            cancel_all(c, rids)


def test_queue_position_from_zero_and_cancel_of_queued_requests(api_stack: ApiStack) -> None:
    key = api_stack.make_key("queued")
    with api_stack.client(key) as c:
        rids = [submit(c, idle_input(seed=i)) for i in range(3)]
        try:
            positions = [c.get(req_path(rid, "/status")).json() for rid in rids]
            assert [(p["status"], p["queue_position"], p["logs"]) for p in positions] == [
                ("IN_QUEUE", 0, None), ("IN_QUEUE", 1, None), ("IN_QUEUE", 2, None)
            ]  # fmt: skip
            r = c.put(req_path(rids[0], "/cancel", "/queue"))
            assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
            assert [c.get(req_path(rid, "/status")).json()["queue_position"] for rid in rids[1:]] == [0, 1]
            done = c.get(req_path(rids[0], "/status"), params={"logs": "true"}).json()
            assert done["status"] == "COMPLETED" and done["error_type"] == "cancelled" and done["error"]
            assert done["logs"][-1]["message"] == "cancellation requested"
            r = c.get(req_path(rids[0]))
            assert r.status_code == 400 and r.json()["error_type"] == "cancelled"
            r = c.get(req_path(rids[1]))
            assert r.status_code == 400 and r.json()["error_type"] == "request_in_progress"
            r = c.put(req_path(rids[0], "/cancel"))
            assert (r.status_code, r.json()["status"]) == (400, "ALREADY_COMPLETED")
            r = c.put(req_path("no-such-request", "/cancel"))
            assert (r.status_code, r.json()["status"]) == (404, "NOT_FOUND")
        finally:
            cancel_all(c, rids)


def test_a_cancelled_queued_request_never_starts(api_stack: ApiStack) -> None:
    key = api_stack.make_key("busy")
    with api_stack.client(key) as c:
        # keep the one worker busy, so that the next request waits in the queue
        busy = submit(c, tiny_input(num_images=16, image_size={"width": 128, "height": 128}, num_inference_steps=4,
                                    sync_mode=False))  # fmt: skip
        victim = submit(c, tiny_input(sync_mode=False))
        assert c.get(req_path(victim, "/status")).json()["status"] == "IN_QUEUE"
        assert c.put(req_path(victim, "/cancel")).status_code == 202
        seen = set()
        while (st := c.get(req_path(busy, "/status"), params={"logs": 1}).json())["status"] != "COMPLETED":
            seen.add(st["status"])
            if st["status"] == "IN_PROGRESS":
                assert isinstance(st["logs"], list)
            time.sleep(0.02)
        assert "IN_PROGRESS" in seen and st["error"] is None
        # the worker may have pulled the victim's batch ahead while rendering the busy one: then its
        # claim is closed by the cancel and the render aborted; either way nothing of it is stored
        deadline = time.monotonic() + 30
        while api_stack.sql("SELECT status FROM batches WHERE job_id = :id", id=victim) != [("cancelled",)]:
            assert time.monotonic() < deadline, api_stack.worker.output[-2000:]
            time.sleep(0.05)
    assert api_stack.sql("SELECT status FROM jobs WHERE id = :id", id=victim) == [("CANCELLED",)]
    assert api_stack.sql("SELECT count(*) FROM images WHERE job_id = :id", id=victim) == [(0,)]


def test_a_failed_request_is_completed_with_its_error(api_stack: ApiStack) -> None:
    key = api_stack.make_key("failing")
    with api_stack.client(key) as c:
        rid = submit(c, tiny_input(loras=[{"path": "nobody/no-such-lora"}]))  # the fetch stage cannot get it
        final = wait_done(c, rid)
        assert final["error_type"] == "file_download_error" and "nobody/no-such-lora" in final["error"]
        assert final["error"].startswith("loras.0.path: ")
        assert final["logs"][-1]["level"] == "ERROR"
        r = c.get(req_path(rid))
        assert r.status_code == 422 and r.json() == {"detail": final["error"], "error_type": "file_download_error"}


def test_status_stream_sends_events_until_completed(api_stack: ApiStack) -> None:
    key = api_stack.make_key("streamer")
    with api_stack.client(key) as c:
        rid = submit(c, tiny_input())
        events = []
        with c.stream("GET", req_path(rid, "/status/stream", "/queue"), params={"logs": 1}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
    assert events[-1]["status"] == "COMPLETED" and events[-1]["error"] is None
    assert all(e["status"] != "COMPLETED" for e in events[:-1])
    lines = [(line["timestamp"], line["message"]) for e in events for line in e["logs"]]
    assert len(lines) == len(set(lines)) and lines[-1][1] == "completed 1 image(s)"  # each log line once


def test_run_answers_the_output_directly(api_stack: ApiStack) -> None:
    key = api_stack.make_key("runner")
    with api_stack.client(key) as c:
        r = c.post(f"/run/{APP}", json=tiny_input(num_images=2, seed=3, format="png"))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["seed"] == 3 and out["prompt"] == "a lighthouse at dusk"
        assert [i["url"][:22] for i in out["images"]] == ["data:image/png;base64,"] * 2
        # streamed: status events, then the output
        events = []
        with c.stream("POST", f"/run/{APP}/stream", json=tiny_input(seed=4)) as r:
            for line in r.iter_lines():
                if line.startswith("event:"):
                    events.append(line[6:].strip())
        assert events[-1] == "output" and set(events[:-1]) <= {"status"}
        # a request that does not start in time is cancelled: 504, not retried by fal_client
        logged = len(api_stack.log_path.read_bytes())
        r = r_timeout = c.post(f"/run/{APP}", json=idle_input(), headers={"X-Fal-Request-Timeout": "1.5"})
        assert r.status_code == 504 and r.json()["error_type"] == "request_timeout"
        assert r.headers["x-fal-request-timeout-type"] == "user"
        # the caller's own limit is an outcome of its request, not a fault of the server: no ERROR logged
        assert b"ERROR" not in api_stack.log_path.read_bytes()[logged:]
        # a caller that hangs up cancels its request
        with pytest.raises(httpx.ReadTimeout):
            c.post(f"/run/{APP}", json=idle_input(seed=77), timeout=1)
        deadline = time.monotonic() + 10
        while api_stack.sql("SELECT status FROM jobs WHERE owner = 'runner' ORDER BY created_at")[-1] != ("CANCELLED",):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    rows = api_stack.sql("SELECT lane, status FROM jobs WHERE owner = 'runner' ORDER BY created_at")
    assert rows == [("sync", "COMPLETED"), ("sync", "COMPLETED"), ("sync", "CANCELLED"), ("sync", "CANCELLED")]
    # the ledger says why each was cancelled, as the caller was told (not "cancelled by request")
    assert "did not start within 1.5 s" in r_timeout.json()["detail"], r_timeout.text
    why = api_stack.sql("SELECT error, error_type FROM jobs WHERE owner = 'runner' AND status = 'CANCELLED' "
                        "ORDER BY created_at")
    assert why == [("did not start within 1.5 s (X-Fal-Request-Timeout); cancelled", "cancelled"),
                   ("the caller hung up before the request finished; cancelled", "cancelled")], why


def test_unknown_apps_and_routes_are_404_and_openapi_documents_every_route(api_stack: ApiStack) -> None:
    key = api_stack.make_key("explorer")
    with api_stack.client(key) as c:
        for method, path in (("POST", "/fal-ai/flux"), ("POST", f"/{APP}/upscale"),
                             ("GET", "/fal-ai/flux/requests/x/status"), ("POST", "/run/fal-ai/flux")):  # fmt: skip
            r = c.request(method, path, json=tiny_input())
            assert r.status_code == 404 and r.json()["error_type"] == "not_found", (method, path)
        unknown = c.post(f"/{APP}/upscale", json=tiny_input()).json()["detail"]  # names the endpoints that exist
        assert f"{APP}/image-to-image" in unknown and f"{APP}/inpainting" in unknown, unknown
        spec = c.get("/openapi.json").json()
    ops = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    for prefix in ("", "/queue"):
        base = f"{prefix}/{APP}"
        for op in (("POST", base), ("GET", f"{base}/requests/{{request_id}}/status"),
                   ("GET", f"{base}/requests/{{request_id}}/status/stream"), ("GET", f"{base}/requests/{{request_id}}"),
                   ("PUT", f"{base}/requests/{{request_id}}/cancel")):  # fmt: skip
            assert op in ops, op
    assert ("POST", f"/run/{APP}") in ops
    assert all(op.get("summary") and op.get("responses") for op in ops.values())
    assert {"GenerateInput", "GenerateOutput", "QueueStatus", "QueueSubmitted", "CancelResult", "ErrorBody",
            "ValidationErrorBody"} <= set(spec["components"]["schemas"])  # fmt: skip
