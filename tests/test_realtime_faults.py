"""Realtime under a real fault: Redis (the realtime lane) SIGKILLed and started again empty.

A ``farm/hold`` worker and ``farm api`` on the module's private servers (``tests/faults.py``). The open
connection survives the outage: frames sent meanwhile get error frames (``unavailable`` or
``timeout``), never a closed socket, and once Redis is back the API's reply subscription and the
worker's lane wait reconnect by themselves and frames are answered again on the same connection.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import msgpack
import pytest

from tests.faults import FaultFarm, fault_farm_fixture, fault_servers_fixture  # noqa: F401
from tests.test_realtime import _socket

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _frame(i: int) -> bytes:
    return msgpack.packb({"model_name": "farm/hold", "prompt": f"frame {i}", "image_size": {"width": 64, "height": 64},
                          "request_id": f"f{i}"})  # fmt: skip


def test_realtime_connection_survives_a_redis_restart(ff: FaultFarm) -> None:
    ff.start(workers=1, api_env={"FARM_REALTIME_FRAME_TIMEOUT": "3"})
    assert ff.api is not None
    with _socket(ff.api, key=ff.key) as ws:
        ws.send(_frame(0))
        assert msgpack.unpackb(ws.recv(timeout=30))["request_id"] == "f0"

        server = ff.servers.redis
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        ws.send(_frame(1))
        during = json.loads(ws.recv(timeout=30))  # Redis is down: an error frame, the socket stays open
        assert during["type"] == "x-fal-error" and during["error"] in ("unavailable", "timeout"), during
        assert during["request_id"] == "f1"
        server.start()

        answered = None
        deadline = time.monotonic() + 60
        i = 2
        while answered is None and time.monotonic() < deadline:  # bounded: until the lane is back
            ws.send(_frame(i))
            reply = ws.recv(timeout=30)
            if isinstance(reply, bytes):
                answered = msgpack.unpackb(reply)
            else:
                assert json.loads(reply)["error"] in ("unavailable", "timeout"), reply
                time.sleep(0.5)
            i += 1
        assert answered is not None and answered["request_id"] == f"f{i - 1}"
        assert answered["images"][0]["width"] == 64


@pytest.mark.parametrize("server_name", ["postgres", "redis"])
def test_a_new_connection_is_refused_in_bounded_time_while_a_server_is_frozen(ff: FaultFarm, server_name: str) -> None:
    """PostgreSQL or Redis SIGSTOPped (TCP connections stay up, nothing answers): a new socket's admission
    (the owner's quota in the ledger, its connection count in Redis) waits on it, and the socket is refused
    1013 within the admission deadline instead of leaving the client waiting for as long as the freeze."""
    import asyncio

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from farm.api.routes_realtime import ADMIT_SECONDS
    from tests.faults import frozen

    # a quota to check: admitting a socket then reads the ledger (the key itself is cached by the first one)
    ff.start(workers=1, api_env={"FARM_REALTIME_FRAME_TIMEOUT": "3", "FARM_DAILY_GPU_SECONDS": "100000"})
    assert ff.api is not None
    api = ff.api
    with _socket(api, key=ff.key) as ws:  # the API's hub is connected to Redis before the freeze
        ws.send(_frame(0))
        assert msgpack.unpackb(ws.recv(timeout=30))["request_id"] == "f0"

    async def refused() -> tuple[int, str]:
        url = f"wss://{api.host}/run/fal-ai/fast-lcm-diffusion/realtime"
        async with asyncio.timeout(ADMIT_SECONDS + 20):  # fails the test instead of waiting on Redis
            async with connect(url, ssl=api.ssl_context, additional_headers={"Authorization": f"Key {ff.key}"},
                               open_timeout=20, close_timeout=5) as sock:
                with pytest.raises(ConnectionClosed) as info:
                    await sock.recv()
        assert info.value.rcvd is not None
        return info.value.rcvd.code, info.value.rcvd.reason

    if server_name == "redis":
        assert ff.servers.redis.proc is not None
        pids = [ff.servers.redis.proc.pid]
    else:  # the postmaster and its backends (the API's pooled connections are served by these)
        postmaster = int((ff.servers.postgres.data / "postmaster.pid").read_text().split()[0])
        pids = [postmaster, *_children(postmaster)]
    with contextlib.ExitStack() as stack:
        for pid in pids:
            stack.enter_context(frozen(pid))
        try:
            code, reason = asyncio.run(refused())
        except TimeoutError:
            pytest.fail(f"no refusal within {ADMIT_SECONDS + 20:g} s while {server_name} is frozen:\n{ff.api_tail()}")
    assert code == 1013 and reason.startswith("realtime is unavailable: "), (code, reason)
    if server_name == "postgres":  # nothing below the admission bounds a frozen ledger: the deadline does
        assert reason.startswith(f"realtime is unavailable: the connection could not be admitted within "
                                 f"{ADMIT_SECONDS:g} s"), reason
