"""Signed webhooks from the ledger outbox, delivered to a real receiver on loopback.

Signatures are checked with PyNaCl (libsodium), independent of the ``cryptography`` code
that signs, using the key fetched from the JWKS route. Ledgers: SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from db import ledger
from db.migrate import ensure_schema, upgrade
from db.models import utcnow
from db.session import dispose_engines, session_scope
from farm.config import Settings, get_settings, reset_settings
from farm.schemas import GenerateInput
from farm.status import JobStatus
from farm.storage import get_storage, object_key
from farm.webhooks import dispatcher, outbox, routes, signing
from tests.receivers import Receiver

REPO = Path(__file__).resolve().parents[1]
TINY = "farm/tiny-lcm"


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, farm_env, monkeypatch) -> Settings:
    """A migrated ledger, loopback allow-listed for webhooks; the settings."""
    monkeypatch.setenv("FARM_WEBHOOK_ALLOWLIST", json.dumps(["127.0.0.1"]))
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("FARM_DATABASE_URL", url)
        reset_settings()
        upgrade(url)
    else:
        reset_settings()
        ensure_schema()
    signing.forget_keys()
    yield get_settings()
    signing.forget_keys()


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def make_job(url: str | None, status: JobStatus = JobStatus.COMPLETED, owner: str = "alice", **extra: Any) -> str:
    """A finished job (one stored 64x64 image when COMPLETED), outbox row enqueued as the worker does."""
    rid = uuid.uuid4().hex
    inp = GenerateInput(model_name=TINY, prompt="a lighthouse", image_size={"width": 64, "height": 64},
                        format="png", **extra)
    settings = get_settings()
    with session_scope() as s:
        job, _ = ledger.create_job(s, request_id=rid, owner=owner, model_name=TINY, model_key="tiny-lcm",
                                   lane="queue", source="api", input=inp.model_dump(mode="json"), seed=5,
                                   num_images=1)
        job.webhook_url = url
    if status == JobStatus.COMPLETED:
        key = object_key(owner, rid, 0, "png")
        get_storage(settings).put(key, b"\x89PNG fake", "image/png")
        with session_scope() as s:
            ledger.record_image(s, job_id=rid, index=0, seed=5, object_key=key, width=64, height=64,
                                content_type="image/png", size_bytes=9, nsfw=False, render_seconds=0.01)
    with session_scope() as s:
        assert ledger.finish_job(s, rid, status, error=None if status == JobStatus.COMPLETED else "it broke")
        job = ledger.get_job(s, rid)
        assert job is not None
        outbox.enqueue(s, job, settings)
    return rid


def delivery(rid: str) -> tuple[Any, list[Any]]:
    with session_scope() as s:
        row = outbox.get_delivery(s, rid)
        assert row is not None
        return row, outbox.list_attempts(s, row.id)


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_signature_verifies_with_pynacl_and_the_jwks_route(env, receiver):
    rid = make_job(receiver.url("/hook"), sync_mode=True)
    assert dispatcher.deliver_due_once() == 1

    jwks = TestClient(_jwks_app()).get("/.well-known/jwks.json").json()
    [jwk] = jwks["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA") and len(b64url(jwk["x"])) == 32
    [req] = receiver.requests
    h = req.headers
    assert h["X-Fal-Webhook-Request-Id"] == rid and h["X-Fal-Webhook-User-Id"] == "alice"
    assert abs(int(h["X-Fal-Webhook-Timestamp"]) - time.time()) < 60
    assert h["Content-Type"] == "application/json"
    # independent check: libsodium, the message built here from the documented layout
    msg = "\n".join([rid, "alice", h["X-Fal-Webhook-Timestamp"], hashlib.sha256(req.body).hexdigest()]).encode()
    VerifyKey(b64url(jwk["x"])).verify(msg, bytes.fromhex(h["X-Fal-Webhook-Signature"]))
    digest, other = (hashlib.sha256(b).hexdigest().encode() for b in (req.body, b"{}"))
    with pytest.raises(BadSignatureError):
        VerifyKey(b64url(jwk["x"])).verify(msg.replace(digest, other), bytes.fromhex(h["X-Fal-Webhook-Signature"]))
    assert signing.verify(jwks, h, req.body) and not signing.verify(jwks, h, req.body + b" ")

    body = json.loads(req.body)
    assert body["request_id"] == body["gateway_request_id"] == rid
    assert (body["status"], body["error"]) == ("OK", None)
    assert body["payload"]["images"][0]["url"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    assert body["payload"]["seed"] == 5 and body["payload"]["prompt"] == "a lighthouse"
    row, attempts = delivery(rid)
    assert (row.status, row.attempts, row.delivered_at is not None) == ("delivered", 1, True)
    assert [(a.status_code, a.error) for a in attempts] == [(200, None)] and attempts[0].duration_ms > 0


def _jwks_app() -> FastAPI:
    app = FastAPI()
    app.include_router(routes.router)
    return app


def test_retry_after_500s_then_delivered(env, receiver):
    receiver.script = [(500, {}, b"boom"), (500, {}, b"boom")]
    rid = make_job(receiver.url("/hook"), status=JobStatus.FAILED)
    now = utcnow()
    for i in range(3):
        assert dispatcher.deliver_due_once(now=now + timedelta(hours=i)) == 1
    assert dispatcher.deliver_due_once(now=now + timedelta(hours=9)) == 0
    row, attempts = delivery(rid)
    assert (row.status, row.attempts, row.last_error) == ("delivered", 3, None)
    assert [a.status_code for a in attempts] == [500, 500, 200]
    assert len(receiver.requests) == 3 and len({r.body for r in receiver.requests}) == 1
    body = json.loads(receiver.requests[0].body)
    assert (body["status"], body["payload"], body["error"]) == ("ERROR", None, "it broke")


def test_no_attempt_after_410(env, receiver):
    receiver.default = (410, {}, b"gone")
    rid = make_job(receiver.url("/hook"))
    now = utcnow()
    assert dispatcher.deliver_due_once(now=now) == 1
    assert dispatcher.deliver_due_once(now=now + timedelta(days=1)) == 0
    row, attempts = delivery(rid)
    assert (row.status, row.attempts, [a.status_code for a in attempts]) == ("gone", 1, [410])
    assert len(receiver.requests) == 1


def test_backoff_doubles_with_full_jitter_until_failed(env, receiver, monkeypatch):
    monkeypatch.setenv("FARM_WEBHOOK_BACKOFF_SECONDS", "10")
    monkeypatch.setenv("FARM_WEBHOOK_BACKOFF_MAX_SECONDS", "40")
    monkeypatch.setenv("FARM_WEBHOOK_MAX_ATTEMPTS", "5")
    reset_settings()
    settings = get_settings()
    rng = random.Random(1)
    for attempt, ceiling in [(1, 10), (2, 20), (3, 40), (4, 40), (9, 40)]:
        delays = [dispatcher.backoff_delay(attempt, settings, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= ceiling and max(delays) > 0.8 * ceiling  # full jitter

    receiver.default = (503, {}, b"busy")
    rid = make_job(receiver.url("/hook"))
    now = utcnow()
    for attempt, ceiling in [(1, 10), (2, 20), (3, 40), (4, 40)]:
        assert dispatcher.deliver_due_once(now=now) == 1
        row, _ = delivery(rid)
        assert row.status == "pending" and row.attempts == attempt and row.last_error == "HTTP 503"
        assert timedelta(0) <= row.next_attempt_at - now <= timedelta(seconds=ceiling)
        now = row.next_attempt_at
    assert dispatcher.deliver_due_once(now=now) == 1
    row, attempts = delivery(rid)
    assert (row.status, row.attempts, len(attempts)) == ("failed", 5, 5)
    assert dispatcher.deliver_due_once(now=now + timedelta(days=1)) == 0


def test_url_refused_at_delivery_fails_without_a_request(env, receiver, monkeypatch):
    rid = make_job(receiver.url("/hook"))
    monkeypatch.setenv("FARM_WEBHOOK_ALLOWLIST", "[]")  # e.g. the allow-list changed since submit
    reset_settings()
    assert dispatcher.deliver_due_once() == 1
    row, attempts = delivery(rid)
    assert row.status == "failed" and "refused" in row.last_error and "loopback" in row.last_error
    assert [(a.status_code, "loopback" in (a.error or "")) for a in attempts] == [(None, True)]
    assert receiver.requests == []


def test_unreachable_receiver_is_retried(env):
    rid = make_job("http://127.0.0.1:9/hook")  # discard port: connection refused
    assert dispatcher.deliver_due_once() == 1
    row, attempts = delivery(rid)
    assert row.status == "pending" and "ConnectError" in (row.last_error or "")
    assert attempts[0].status_code is None


def test_outbox_rows_only_with_a_url_and_once(env, receiver):
    rid = make_job(receiver.url("/hook"))
    with session_scope() as s:
        job = ledger.get_job(s, rid)
        assert job is not None and not outbox.enqueue(s, job)  # idempotent
    assert make_job(None) and dispatcher.deliver_due_once() == 1
    with session_scope() as s:
        from sqlalchemy import func, select

        from db.models import WebhookDelivery

        assert s.scalar(select(func.count()).select_from(WebhookDelivery)) == 1


def test_cancel_enqueues_an_error_webhook(env, receiver):
    from farm.lifecycle import submit as submission

    rid = uuid.uuid4().hex
    with session_scope() as s:
        job, _ = ledger.create_job(s, request_id=rid, owner="bob", model_name=TINY, model_key="tiny-lcm",
                                   lane="queue", source="api", input={"prompt": "x"}, seed=1, num_images=1)
        job.webhook_url = receiver.url("/cancelled")
    assert submission.cancel(rid, owner="bob") == "CANCELLATION_REQUESTED"
    assert dispatcher.deliver_due_once() == 1
    body = json.loads(receiver.requests[0].body)
    assert (body["status"], body["payload"], body["error"]) == ("ERROR", None, "cancelled by request")
    assert receiver.requests[0].headers["X-Fal-Webhook-User-Id"] == "bob"


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_pending_and_abandoned_rows_survive_a_restart(env, receiver):
    """Row A was never tried; row B was claimed by a dispatcher that then died. A new process
    (nothing shared but the ledger and the key file) delivers both, B once its lease is over."""
    a = make_job(receiver.url("/a"))
    b = make_job(receiver.url("/b"))
    claimed = dispatcher.claim_due(env, utcnow())
    assert {c.job_id for c in claimed} == {a, b}
    with session_scope() as s:  # give A back, as if it had never been claimed
        row = outbox.get_delivery(s, a)
        assert row is not None
        row.next_attempt_at, row.leased_until = utcnow(), None
    dispose_engines()
    code = (
        "from datetime import timedelta\nfrom db.models import utcnow\nfrom farm.config import get_settings\n"
        "from farm.webhooks import dispatcher as d\ns = get_settings()\n"
        "print(d.deliver_due_once(s), d.deliver_due_once(s, now=utcnow() + d.lease(s) + timedelta(seconds=1)))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]
    assert sorted(r.path for r in receiver.requests) == ["/a", "/b"]
    assert delivery(a)[0].status == delivery(b)[0].status == "delivered"


def test_run_forever_delivers_and_stops(env, receiver, monkeypatch):
    monkeypatch.setenv("FARM_WEBHOOK_POLL_SECONDS", "0.05")
    reset_settings()

    async def scenario() -> str:
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run_forever(stop))
        await asyncio.sleep(0.2)  # idle polling first
        rid = await asyncio.to_thread(make_job, receiver.url("/live"))
        for _ in range(200):
            if receiver.requests:
                break
            await asyncio.sleep(0.05)
        stop.set()
        # the loop returns once stop is set (the bound only keeps a broken loop from hanging the test);
        # an attempt already sent is not waited for by the loop but finishes in its own thread and is
        # recorded: poll the row (bounded) rather than race that thread
        await asyncio.wait_for(task, 30)
        status = "pending"
        for _ in range(200):
            status = delivery(rid)[0].status
            if status != "pending":
                break
            await asyncio.sleep(0.05)
        return status

    assert asyncio.run(scenario()) == "delivered"
    assert len(receiver.requests) == 1


def test_key_is_created_once_even_when_processes_race(tmp_path):
    path = tmp_path / "keys" / "webhook.pem"
    code = (
        "import sys\nfrom farm.config import Settings\nfrom farm.webhooks import signing\n"
        "print(signing.jwks(Settings(data_dir=sys.argv[1], webhook_key_path=sys.argv[2]))['keys'][0]['x'])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(path)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
             for _ in range(6)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(outs) == 1 and all(p.returncode == 0 for p in procs)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["webhook.pem"]  # no temp files left
    signing.forget_keys()
    assert signing.jwks(Settings(data_dir=tmp_path, webhook_key_path=path))["keys"][0]["x"] in outs


# -- end to end: a worker process finishes the job and enqueues the webhook -------------------------


def test_worker_enqueues_webhooks_for_completed_and_failed_jobs(
    redis_server, postgres_server, s3_server, tmp_path, monkeypatch
):
    from farm.lifecycle import submit as submission
    from farm.status import Lane
    from tests.workers import WorkerProcess, clean_env, run_farm

    db_url = postgres_server.new_database(f"wh_{uuid.uuid4().hex[:10]}")
    farm_vars = {
        "FARM_BROKER_URL": f"redis://127.0.0.1:{redis_server.port}/14",
        "FARM_DATABASE_URL": db_url,
        "FARM_STORAGE_URL": f"s3://wh-{uuid.uuid4().hex[:8]}/out",
        "FARM_S3_ENDPOINT": s3_server.endpoint,
        "FARM_S3_ACCESS_KEY": "testing",
        "FARM_S3_SECRET_KEY": "testing",
        "FARM_DATA_DIR": str(tmp_path / "data"),
        "FARM_WEBHOOK_ALLOWLIST": '["127.0.0.1"]',
    }
    env = clean_env(**farm_vars)
    assert run_farm(["db", "upgrade"], env).returncode == 0
    for name in list(os.environ):
        if name.startswith("FARM_"):
            monkeypatch.delenv(name)
    for k, v in farm_vars.items():
        monkeypatch.setenv(k, v)
    reset_settings()
    signing.forget_keys()
    worker = WorkerProcess(env).start()
    try:
        with Receiver() as rx:
            base = {"model_name": TINY, "prompt": "a fox", "image_size": {"width": 64, "height": 64},
                    "num_inference_steps": 2, "sync_mode": False}
            ok = submission.submit(GenerateInput(**base), owner="carol", webhook_url=rx.url("/ok"))
            bad_lora = "data:application/octet-stream;base64," + base64.b64encode(b"not a lora").decode()
            bad = submission.submit(GenerateInput(**base, loras=[{"path": bad_lora}]), owner="carol",
                                     lane=Lane.QUEUE, webhook_url=rx.url("/bad"))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with session_scope() as s:
                    states = [ledger.get_job(s, r).status for r in (ok, bad)]  # type: ignore[union-attr]
                if all(JobStatus(x).is_terminal for x in states):
                    break
                time.sleep(0.2)
            assert states == [JobStatus.COMPLETED, JobStatus.FAILED], worker.output[-3000:]
            assert dispatcher.deliver_due_once() == 2
            got = {r.path: json.loads(r.body) for r in rx.requests}
    finally:
        worker.stop()
        dispose_engines()
        reset_settings()
    assert got["/ok"]["status"] == "OK" and got["/ok"]["payload"]["images"][0]["width"] == 64
    assert got["/ok"]["payload"]["images"][0]["url"].startswith("http://")  # presigned S3 URL
    assert got["/bad"]["status"] == "ERROR" and got["/bad"]["payload"] is None
    # moved to storage at submit, materialised by the worker, not weights: named by its field, no key or path
    assert "loras.0.path: the LoRA file is neither a valid safetensors file (" in got["/bad"]["error"]
    assert "farm-stored" not in got["/bad"]["error"] and "/inputs/" not in got["/bad"]["error"]


def test_deliveries_in_flight_are_capped_per_owner(env, receiver, monkeypatch):
    monkeypatch.setenv("FARM_WEBHOOK_DELIVERIES_PER_OWNER", "2")
    reset_settings()
    settings = get_settings()
    many = [make_job(receiver.url(f"/m{i}"), owner="mallory") for i in range(5)]
    other = make_job(receiver.url("/o"), owner="olive")
    now = utcnow()
    first = dispatcher.claim_due(settings, now)
    assert sorted(c.job_id for c in first if c.owner == "mallory") == sorted(many[:2])  # oldest first, two
    assert [c.job_id for c in first if c.owner == "olive"] == [other]  # not behind mallory's backlog
    assert dispatcher.claim_due(settings, now) == []  # mallory's two slots are held, by whichever process
    assert all(c.body is None for c in first)  # the outbox holds no body: it is built per attempt
    dispatcher.deliver(first[0], settings, now)  # one attempt over: one slot free again
    again = dispatcher.claim_due(settings, now)
    assert [c.owner for c in again] == ["mallory"] and again[0].job_id in many[2:]
    # a lease that ran out (its dispatcher died) frees the slot as well
    later = now + dispatcher.lease(settings) + timedelta(seconds=1)
    assert len([c for c in dispatcher.claim_due(settings, later) if c.owner == "mallory"]) == 2


def test_sync_mode_images_inline_up_to_a_total_cap_then_urls(env, receiver, monkeypatch):
    small = make_job(receiver.url("/small"), sync_mode=True)  # one 9-byte image
    monkeypatch.setenv("FARM_SYNC_INLINE_MAX_BYTES", "8")
    reset_settings()
    big = make_job(receiver.url("/big"), sync_mode=True)
    assert dispatcher.deliver_due_once() == 2
    got = {r.path: json.loads(r.body)["payload"]["images"][0]["url"] for r in receiver.requests}
    assert got["/big"].startswith("file://")  # beyond the cap: a URL (presigned on S3), not a data URI
    assert got["/small"].startswith("file://")  # enqueued before the cap changed: its body is built at delivery
    with session_scope() as s:
        from farm.results import build_output

        job = ledger.get_job(s, small)
        assert job is not None  # built now, with today's cap: the same job gives a URL too
        assert build_output(s, job, get_storage(), get_settings()).images[0].url.startswith("file://")
    monkeypatch.setenv("FARM_SYNC_INLINE_MAX_BYTES", "9")
    reset_settings()
    with session_scope() as s:
        job = ledger.get_job(s, big)
        assert job is not None
        assert build_output(s, job, get_storage(), get_settings()).images[0].url.startswith("data:image/png;base64,")
