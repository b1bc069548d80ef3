"""Abuse resistance of the HTTP API's submit path (issue 20, findings 1, 7, 8): each attack made for real
against a live ``farm api`` on loopback (``tests.test_abuse``'s ``guarded`` stack, small limits)."""

from __future__ import annotations

import json
import threading
from typing import Any

from tests import test_abuse
from tests.api_stack import APP, ApiStack, idle_input

guarded = test_abuse.guarded  # module fixture: a second farm api with small limits (one for this module)

MAX_LIST_ITEMS = 64  # farm.schemas.MAX_LIST_ITEMS, as a client sees it
MAX_FIELD_ERRORS = 20


def _compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def test_a_long_lora_list_is_refused_at_its_length_while_another_tenant_reads(guarded: ApiStack) -> None:
    """139,000 LoRA items (1.8 MB, under FARM_MAX_BODY_BYTES) are refused by the list's length before any
    item is validated: a small 422 naming the field and the limit (it used to validate every item on
    the event loop, then answer 'at most 4 LoRAs' after seconds; 600,000 empty items made a 47 MB 422).
    Another tenant's status reads, running all along, are answered while the long requests are."""
    attacker, reader = guarded.make_key("abuse-list"), guarded.make_key("abuse-list-reader")
    with guarded.client(reader) as c:
        rid = c.post(f"/{APP}", json=idle_input()).json()["request_id"]
    bodies = [_compact(idle_input(loras=[{"path": "a"}] * 139_000)), _compact(idle_input(loras=[{}] * 600_000))]
    assert all(len(b) < 2 * 2**20 for b in bodies)
    events: list[str] = []  # in the order they happened (no clock)
    lock = threading.Lock()
    done = threading.Event()
    failures: list[int] = []

    def read() -> None:
        with guarded.client(reader) as c:
            for _ in range(5000):  # bounded; ends when the attack does
                if done.is_set():
                    return
                status = c.get(f"/{APP}/requests/{rid}/status").status_code
                with lock:
                    events.append("read")
                if status != 200:
                    failures.append(status)

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    answers = []
    try:
        with guarded.client(attacker, **{"Content-Type": "application/json"}) as c:
            for i in range(6):
                with lock:
                    events.append(f"sent {i}")
                answers.append(c.post(f"/{APP}", content=bodies[i % 2]))
                with lock:
                    events.append(f"answered {i}")
    finally:
        done.set()
        reading.join(60)
    for r in answers:
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) < 1000, len(r.content)  # a few hundred bytes, not megabytes
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "loras"] and f"at most {MAX_LIST_ITEMS} items" in err["msg"], err
    assert failures == [] and not reading.is_alive()
    during = [events[events.index(f"sent {i}"):events.index(f"answered {i}")].count("read") for i in range(6)]
    assert sum(during) >= 1, during  # the other tenant was answered while a long request was in the API
    assert guarded.sql("SELECT count(*) FROM jobs WHERE owner = 'abuse-list'") == [(0,)]
    with guarded.client(reader) as c:
        c.put(f"/{APP}/requests/{rid}/cancel")


def test_error_bodies_name_a_few_dozen_fields_at_most(guarded: ApiStack) -> None:
    """64 bad LoRAs (the most a list may hold) and 50,000 unknown fields: each answer lists at most
    MAX_FIELD_ERRORS fields, then how many more there were."""
    key = guarded.make_key("abuse-errors")
    with guarded.client(key, **{"Content-Type": "application/json"}) as c:
        bad_items = c.post(f"/{APP}", content=_compact(idle_input(loras=[{"scale": 99}] * MAX_LIST_ITEMS)))
        unknown = c.post(f"/{APP}", content=_compact({**idle_input(), **{f"x{i}": 1 for i in range(50_000)}}))
    assert bad_items.status_code == 422, bad_items.text[:300]
    detail = bad_items.json()["detail"]
    assert len(detail) == MAX_FIELD_ERRORS + 1, len(detail)
    assert detail[0]["loc"][:3] == ["body", "loras", 0]
    assert detail[-1]["type"] == "too_many_errors" and "108 more" in detail[-1]["msg"], detail[-1]
    assert unknown.status_code == 422, unknown.text[:300]
    (err,) = unknown.json()["detail"]
    assert err["loc"] == ["body"] and "50000 unknown fields" in err["msg"], err
    assert len(unknown.content) < 1000
