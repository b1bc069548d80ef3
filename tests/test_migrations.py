"""Alembic migrations of the ledger and ``ensure_schema``."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from db.migrate import (
    MIGRATIONS_DIR,
    alembic_config,
    current,
    downgrade,
    ensure_schema,
    head_revision,
    upgrade,
)
from db.models import Base
from db.session import build_engine, dispose_engines, get_engine
from farm.errors import LedgerSchemaError

TABLES = set(Base.metadata.tables)
HEAD = "i20g_input_digest"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("pg_url"))


def tables(url: str) -> set[str]:
    engine = build_engine(url, pooled=False)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(any_url: str) -> None:
    assert tables(any_url) == set() and current(any_url) is None
    upgrade(any_url)
    assert tables(any_url) == TABLES and current(any_url) == head_revision() == HEAD
    downgrade(any_url, revision="0001")
    assert tables(any_url) == {"jobs", "images", "job_logs"} and current(any_url) == "0001"
    downgrade(any_url, revision="base")
    assert tables(any_url) == set() and current(any_url) is None
    upgrade(any_url)
    assert tables(any_url) == TABLES and current(any_url) == HEAD


def test_migrations_match_the_models(any_url: str) -> None:
    upgrade(any_url)
    with get_engine(any_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_constraint_names_are_deterministic(pg_url: str) -> None:
    upgrade(pg_url)
    insp = inspect(get_engine(pg_url))
    assert insp.get_pk_constraint("jobs")["name"] == "pk_jobs"
    assert {c["name"] for c in insp.get_unique_constraints("images")} == {"uq_images_job_id_index"}
    assert {c["name"] for c in insp.get_foreign_keys("images")} == {"fk_images_job_id_jobs"}
    assert {c["name"] for c in insp.get_check_constraints("jobs")} == {"ck_jobs_status"}


def test_alembic_config_works_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = alembic_config("sqlite:///x.db")
    assert Path(cfg.get_main_option("script_location") or "") == MIGRATIONS_DIR
    assert ScriptDirectory.from_config(cfg).get_heads() == [HEAD]
    assert alembic_config("postgresql+psycopg://u:p%40ss@h/db").get_main_option("sqlalchemy.url") == (
        "postgresql+psycopg://u:p%40ss@h/db"
    )


def test_ensure_schema_creates_the_embedded_ledger(farm_env: Path) -> None:
    ensure_schema()
    url = f"sqlite:///{farm_env / 'ledger.db'}"
    assert (farm_env / "ledger.db").exists()
    assert current() == current(url) == HEAD and tables(url) == TABLES
    ensure_schema()  # idempotent


def test_ensure_schema_refuses_an_unmigrated_server_database(pg_url: str) -> None:
    with pytest.raises(
        LedgerSchemaError, match=rf"ledger at revision none .*code needs {HEAD}: run `farm db upgrade`"
    ):
        ensure_schema(pg_url)
    assert tables(pg_url) == set()
    upgrade(pg_url)
    ensure_schema(pg_url)


def test_ensure_schema_refuses_a_database_newer_than_the_code(pg_url: str) -> None:
    upgrade(pg_url)
    with get_engine(pg_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    dispose_engines()
    with pytest.raises(LedgerSchemaError, match="does not know"):
        ensure_schema(pg_url)
