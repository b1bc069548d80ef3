"""The GPU worker as one object (tasks.worker_process): its states and the methods Celery's signals call.

The real processes (ready line, shutdown notices, one try after a failed load) are tested in
test_worker_process; these check the transitions without a broker or a model."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.exceptions import WorkerShutdown

from farm.config import Settings
from models.registry import get_model
from tasks import worker_process
from tasks.worker_process import WorkerProcess, WorkerState


@pytest.fixture
def process(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerProcess]:
    monkeypatch.setattr(worker_process, "held_batches", lambda name: "batch 0 of job J")
    settings = Settings()
    p = WorkerProcess(Celery("test"), get_model("farm/hold", settings), "cpu", "hold@cpu.%h", settings)
    yield p
    p._failure.unlink(missing_ok=True)
    for fd in (p._joined_r, p._joined_w, p._leaving_r, p._leaving_w):
        os.close(fd)


def test_it_starts_loading_and_joins_when_the_pool_process_says_so(process: WorkerProcess,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="farm.worker")
    assert process.state is WorkerState.LOADING and process.name.startswith("hold@cpu.")
    os.write(process._joined_w, b"8 1\n")  # what join() writes in the pool process
    process._announce()
    assert process.state is WorkerState.JOINED
    assert f"farm worker ready: {process.name} model=farm/hold device=cpu max_batch=8 loads=1" in caplog.text


def test_a_warm_shutdown_drains_once_and_tells_the_pool_process(process: WorkerProcess) -> None:
    process.shutting_down(how="Warm")
    process.shutting_down(how="Warm")  # said once
    assert process.state is WorkerState.DRAINING
    assert os.read(process._leaving_r, 8) == b"x"


def test_after_a_failed_load_no_second_pool_process_starts(process: WorkerProcess) -> None:
    process.before_pool_process()  # nothing failed yet
    process._failure.write_text("cannot load farm/hold on cpu: broken")
    with pytest.raises(WorkerShutdown):
        process.before_pool_process()
    process.shutting_down(how="Warm")  # a worker that gave up says nothing more
    assert process.state is WorkerState.LOADING


def test_leaving_without_having_joined_does_nothing(process: WorkerProcess) -> None:
    process.leave()
    assert process.state is WorkerState.LOADING and process.services is None
