"""A job for a model that no live worker serves: it waits, and the user is told why (issue: first hour)."""

from __future__ import annotations

import dataclasses

from tests.api_stack import APP, IDLE_MODEL, idle_input, tiny_input
from tests.services import free_port
from tests.test_stack import _ledger, builtin_dir, stack  # noqa: F401  (fixtures)
from tests.workers import run_farm

SD15 = "runwayml/stable-diffusion-v1-5"


def test_the_submitter_is_told_that_no_live_worker_serves_the_model(stack):  # noqa: F811
    done = run_farm(["generate", "--model", SD15, "a red fox", "--timeout", "2"], stack["env"])
    assert done.returncode != 0  # nobody renders it: the client gives up after 2 s
    assert f"no live worker serves {SD15}" in done.stderr and "none has joined this farm yet" in done.stderr
    (rid,) = [r[0] for r in _ledger(stack, "SELECT id FROM jobs")]
    logs = _ledger(stack, "SELECT level, message FROM job_logs WHERE job_id = :id ORDER BY id", id=rid)
    assert any(level == "WARNING" and f"no live worker serves {SD15}" in message for level, message in logs)
    status = run_farm(["status", rid], stack["env"])
    assert f"no live worker serves {SD15}" in status.stdout, status.stdout


def test_require_live_worker_refuses_the_submit_naming_the_model(stack):  # noqa: F811
    env = dict(stack["env"], FARM_REQUIRE_LIVE_WORKER="true")
    done = run_farm(["generate", "--model", SD15, "a red fox", "--timeout", "5"], env)
    assert done.returncode != 0
    assert f"no live worker serves {SD15}" in done.stderr, done.stderr
    assert _ledger(stack, "SELECT count(*) FROM jobs") == [(0,)]  # refused before anything was recorded


def test_require_live_worker_answers_503_over_http_naming_the_model(api_stack, tmp_path):
    """The same setting on ``farm api``: the queue submit answers 503 ``no_live_worker`` at once."""
    strict = dataclasses.replace(api_stack, env=dict(api_stack.env, FARM_REQUIRE_LIVE_WORKER="true"),
                                 port=free_port(), log_path=tmp_path / "strict-api.log", proc=None, _ssl=None)
    key = api_stack.make_key("unserved-http")
    before = api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'unserved-http'")
    strict.start()
    try:
        with strict.client(key) as c:
            r = c.post(f"/{APP}", json=idle_input())
            served = c.post(f"/{APP}", json=tiny_input())  # a model that a live worker serves is accepted
    finally:
        strict.stop()
    assert r.status_code == 503, r.text
    assert IDLE_MODEL in r.text and "no live worker serves" in r.text, r.text
    assert served.status_code == 200, served.text
    after = api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'unserved-http'")
    assert after[0][0] == before[0][0] + 1  # only the served job was recorded
