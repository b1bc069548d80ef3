"""Realtime under a real fault: Redis (the realtime lane) SIGKILLed and started again empty.

A ``farm/hold`` worker and ``farm api`` on the module's private servers (``tests/faults.py``). The open
connection survives the outage: frames sent meanwhile get error frames (``unavailable`` or
``timeout``), never a closed socket, and once Redis is back the API's reply subscription and the
worker's lane wait reconnect by themselves and frames are answered again on the same connection.
"""

from __future__ import annotations

import json
import signal
import time

import msgpack
import pytest

from tests.faults import FaultFarm, fault_farm_fixture, fault_servers_fixture  # noqa: F401
from tests.test_realtime import _socket

pytestmark = pytest.mark.slow


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
