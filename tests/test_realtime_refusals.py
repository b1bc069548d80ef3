"""Every refusal of a realtime socket answers at once, every time, on a real ``farm api`` over TLS.

A client once waited 600 s on a refused socket (``test_spent_quota_closes_the_socket_and_refuses_new_ones``).
Here each refusal reason is met ``ROUNDS`` times in a row, each try under a client-side deadline that fails
the test instead of hanging: the websockets asyncio client inside ``asyncio.timeout``, so that a connection
that never answers is cancelled (the sync client's failure paths join its reader thread without a bound).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import pytest
from sqlalchemy import create_engine, text
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.api_stack import APP, ApiStack, tiny_input
from tests.services import free_port

ROUNDS = 20
TRY_SECONDS = 20.0  # one refusal, connect to close; a refusal takes milliseconds


async def _refusal(stack: ApiStack, query: str = "", key: str | None = None) -> tuple[int, str]:
    """Open the socket and read until it is closed: the close code and reason the server sent."""
    headers = {"Authorization": f"Key {key}"} if key else None
    url = f"wss://{stack.host}/run/{APP}/realtime{query}"
    async with asyncio.timeout(TRY_SECONDS):
        async with connect(url, ssl=stack.ssl_context, additional_headers=headers, open_timeout=TRY_SECONDS,
                           close_timeout=5) as ws:
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


def _refused_every_time(stack: ApiStack, expected: tuple[int, str], query: str = "", key: str | None = None) -> None:
    code, start = expected

    async def rounds() -> None:
        for n in range(ROUNDS):
            try:
                got = await _refusal(stack, query, key)
            except TimeoutError:
                pytest.fail(f"refusal {n + 1} of {ROUNDS} ({start!r}) got no answer within {TRY_SECONDS:g} s:\n"
                            f"{stack.log_tail()}")
            assert got[0] == code and got[1].startswith(start), (n, got)

    asyncio.run(rounds())


def _token(stack: ApiStack, key: str) -> str:
    with stack.client(key) as c:
        reply = c.post("/tokens/", json={"allowed_apps": ["fast-lcm-diffusion"], "token_expiration": 120})
    assert reply.status_code == 200, reply.text
    token = reply.json()
    assert isinstance(token, str)
    return token


def test_every_refusal_answers_at_once_every_time(api_stack: ApiStack) -> None:
    alice, bob = api_stack.make_key("rf-alice"), api_stack.make_key("rf-bob")
    token = _token(api_stack, alice)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    _refused_every_time(api_stack, (4001, "missing credentials"))
    _refused_every_time(api_stack, (4001, "invalid or revoked API key"), key="nobody:nothing")
    _refused_every_time(api_stack, (4001, "invalid realtime token (bad signature)"), query=f"?fal_jwt_token={forged}")
    _refused_every_time(api_stack, (4003, "the realtime token belongs to another owner"),
                        query=f"?fal_jwt_token={token}", key=bob)
    _refused_every_time(api_stack, (4022, "max_buffering: must be an integer between 1 and 8 (got '0'; "
                                          "FARM_REALTIME_BUFFERING_CAP)"),
                        query="?max_buffering=0", key=alice)


def test_over_the_connection_limit_is_refused_every_time(api_stack: ApiStack) -> None:
    key = api_stack.make_key("rf-one", "--max-in-flight", "1")

    async def held_open_then_refused() -> None:
        url = f"wss://{api_stack.host}/run/{APP}/realtime"
        async with asyncio.timeout(TRY_SECONDS):
            held = await connect(url, ssl=api_stack.ssl_context, additional_headers={"Authorization": f"Key {key}"},
                                 open_timeout=TRY_SECONDS, close_timeout=5)
        try:
            # the upgrade is accepted before the connection is counted: a rendered frame says it was
            async with asyncio.timeout(60):
                await held.send(msgpack.packb(tiny_input(request_id="held")))
                assert msgpack.unpackb(await held.recv())["request_id"] == "held"
            for n in range(ROUNDS):
                try:
                    code, reason = await _refusal(api_stack, key=key)
                except TimeoutError:
                    pytest.fail(f"refusal {n + 1} got no answer within {TRY_SECONDS:g} s:\n{api_stack.log_tail()}")
                assert code == 4029 and reason == "owner rf-one has 1 realtime connection(s) open: the limit is 1"
        finally:
            async with asyncio.timeout(TRY_SECONDS):
                await held.close()

    asyncio.run(held_open_then_refused())


def test_a_spent_quota_is_refused_every_time(api_stack: ApiStack, tmp_path: Path) -> None:
    """A second ``farm api`` gives the owner a quota that today's recorded usage has spent."""
    key = api_stack.make_key("rf-spent")
    today = datetime.now(UTC).date()
    engine = create_engine(api_stack.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO usage (owner, model, day, source, images, frames, gpu_seconds) "
                              "VALUES ('rf-spent', 'farm/tiny-lcm', :day, 'realtime', 0, 1, 5.0)"), {"day": today})
    finally:
        engine.dispose()
    env = {**api_stack.env, "FARM_OWNER_DAILY_GPU_SECONDS": json.dumps({"rf-spent": 1})}
    capped = ApiStack(env=env, db_url=api_stack.db_url, bucket=api_stack.bucket, port=free_port(),
                      ca_path=api_stack.ca_path, log_path=tmp_path / "api.log", worker=api_stack.worker)
    try:
        capped.start()
        _refused_every_time(capped, (4029, "daily GPU-second quota spent"), key=key)
    finally:
        capped.stop()

