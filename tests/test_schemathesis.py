"""schemathesis against the app's own OpenAPI schema: no answer is a 5xx, and answers match the schema.

The app runs in-process (ASGI) on an embedded farm (SQLite ledger, in-memory broker, no
worker) with authentication off. Submitted jobs stay queued, so the synchronous run routes
are fuzzed with invalid input only (valid input would wait for a worker that never comes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from db.session import dispose_engines
from farm.admission import parse_input
from farm.config import reset_settings
from tests.api_stack import APP

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def api_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from farm.api.app import create_app

    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("FARM_"):
                mp.delenv(name)
        mp.setenv("FARM_DATA_DIR", str(tmp_path_factory.mktemp("fuzz-data")))
        mp.setenv("FARM_AUTH_ENABLED", "false")
        reset_settings()
        try:
            yield create_app()
        finally:
            shutdown_lifespans()
            dispose_engines()
            reset_settings()


def _operations(app: Any) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    results: list[Any] = list(schema.get_all_operations())
    return [result.ok() for result in results]  # Err (an unusable schema) raises here


def _would_wait(case: Any) -> bool:
    """A run with valid input: it would wait for a worker (none here) until its time limit."""
    if not case.operation.path.startswith("/run/"):
        return False
    try:
        parse_input(case.body)
    except Exception:
        return False
    return True


def _fuzz(operation: Any, mode: GenerationMode) -> None:
    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode).filter(lambda case: not _would_wait(case)))
    def check(case: Any) -> None:
        case.call_and_validate(checks=CHECKS)

    check()


def test_valid_requests_get_no_server_error(api_app: Any) -> None:
    # a valid synchronous run would wait for a worker that never comes: run routes get invalid input only
    operations = [op for op in _operations(api_app) if not op.path.startswith("/run/")]
    assert len(operations) >= 12
    for operation in operations:
        _fuzz(operation, GenerationMode.POSITIVE)


def test_invalid_requests_get_no_server_error(api_app: Any) -> None:
    fuzzed = []
    for operation in _operations(api_app):
        try:
            _fuzz(operation, GenerationMode.NEGATIVE)
        except Unsatisfiable:  # nothing to get wrong (no parameters, no body): /health, /openapi…
            continue
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    assert f"POST /run/{APP}" in fuzzed and f"POST /{APP}" in fuzzed


def test_auth_off_is_logged_at_startup(api_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from farm.api.app import create_app

    with caplog.at_level(logging.WARNING, logger="farm.api"), TestClient(create_app()) as client:
        assert client.get("/health").json() == {"status": "ok"}
    assert any("authentication is OFF" in r.getMessage() for r in caplog.records)
