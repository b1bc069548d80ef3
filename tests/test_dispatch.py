"""The broker epoch key (farm.dispatch.broker_epoch_reset) on a real Redis: when a sweeper republishes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis

from farm import dispatch
from farm.config import Settings


@pytest.fixture
def broker(redis_server):
    url = f"redis://127.0.0.1:{redis_server.port}/7"  # a database of its own
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url, client
    finally:
        client.flushdb()
        client.close()


def test_a_fresh_broker_republishes_only_what_came_before_it_started(broker):
    url, client = broker
    settings = Settings(broker_url=url)
    started = dispatch.broker_epoch_reset(settings)  # no key yet: the broker's start time
    assert started is not None and started <= datetime.now(UTC)
    assert client.exists(dispatch.EPOCH_KEY)
    assert dispatch.broker_epoch_reset(settings) is None  # the key is set: nothing to republish


def test_an_old_redis_new_to_the_farm_is_not_taken_for_a_flushed_one(broker, monkeypatch):
    url, client = broker
    settings = Settings(broker_url=url)
    # this Redis has been up "longer" than the threshold (it cannot be made to age in a test: the
    # threshold is lowered instead)
    monkeypatch.setattr(dispatch, "FLUSH_UPTIME", -1)
    client.rpush("render.tiny.queue", b"{}")  # the new farm's first message is queued already
    assert dispatch.broker_epoch_reset(settings) is None  # a flush would have emptied that queue
    assert client.exists(dispatch.EPOCH_KEY)

    client.flushdb()  # flushed: the key and every message are gone
    reset = dispatch.broker_epoch_reset(settings)
    assert reset is not None and reset > datetime.now(UTC) - timedelta(seconds=5)  # everything queued again
