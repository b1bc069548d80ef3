"""A live API on loopback for the HTTP tests: ``farm api`` over TLS (trustme) and one ``farm worker``.

Both are real processes on the private Redis / PostgreSQL / S3 servers; the fixture is
session-scoped (imported by ``tests/conftest.py``) so that the API tests and the
fal_client tests share one stack. Nothing serves ``runwayml/stable-diffusion-v1-5`` here,
so jobs for it stay queued: tests use them for queue positions, limits and cancellation.
"""

from __future__ import annotations

import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.services import free_port
from tests.workers import FARM, WorkerProcess, clean_env, run_farm

APP = "fal-ai/fast-lcm-diffusion"
TINY = "farm/tiny-lcm"
IDLE_MODEL = "runwayml/stable-diffusion-v1-5"  # no worker serves it in these tests


def tiny_input(**extra: Any) -> dict[str, Any]:
    """A request the tiny model renders in milliseconds."""
    return {"model_name": TINY, "prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 2, **extra}  # fmt: skip


def idle_input(**extra: Any) -> dict[str, Any]:
    """A request that stays IN_QUEUE: no worker serves its model."""
    return tiny_input(model_name=IDLE_MODEL, **extra)


@dataclass
class ApiStack:
    env: dict[str, str]
    db_url: str
    bucket: str
    port: int
    ca_path: Path
    log_path: Path
    worker: WorkerProcess
    proc: subprocess.Popen[bytes] | None = None
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_path))
        return self._ssl

    def client(self, key: str | None = None, **headers: str) -> httpx.Client:
        if key is not None:
            headers["Authorization"] = f"Key {key}"
        return httpx.Client(base_url=self.base_url, verify=self.ssl_context, headers=headers, timeout=60)

    def make_key(self, owner: str, *args: str) -> str:
        done = run_farm(["keys", "create", "--owner", owner, *args], self.env)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def farm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_farm(list(args), self.env)

    def sql(self, query: str, **params: Any) -> list[Any]:
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(query), params).all())
        finally:
            engine.dispose()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def start(self, timeout: float = 60) -> None:
        args = [FARM, "api", "--host", "127.0.0.1", "--port", str(self.port),
                "--tls-cert", str(self.ca_path.parent / "server.pem"),
                "--tls-key", str(self.ca_path.parent / "server.key")]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"farm api exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with self.client() as c:
                    if c.get("/health").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"farm api did not come up within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @contextmanager
    def beside(self, log_path: Path, db_url: str | None = None, **env: str) -> Iterator[ApiStack]:
        """Another ``farm api`` on this stack's ledger (or ``db_url``), storage, Redis and worker, with ``env``
        over this one's (other limits), started; stopped on the way out."""
        other = ApiStack(env={**self.env, **env}, db_url=db_url or self.db_url, bucket=self.bucket, port=free_port(),
                         ca_path=self.ca_path, log_path=log_path, worker=self.worker)
        try:
            other.start()
            yield other
        finally:
            other.stop()


def _write_certs(folder: Path) -> Path:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    with open(folder / "server.pem", "wb") as fh:
        for pem in cert.cert_chain_pems:
            fh.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(folder / "server.key"))
    return folder / "ca.pem"


@pytest.fixture(scope="session")
def api_stack(redis_server, postgres_server, s3_server, tmp_path_factory) -> Iterator[ApiStack]:
    """``farm api`` (TLS) and a tiny-model ``farm worker`` on the private servers."""
    root = tmp_path_factory.mktemp("api-stack")
    db_url = postgres_server.new_database(f"api_{uuid.uuid4().hex[:10]}")
    bucket = f"api-{uuid.uuid4().hex[:10]}"
    env = clean_env(
        FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/0",
        FARM_DATABASE_URL=db_url,
        FARM_STORAGE_URL=f"s3://{bucket}/outputs",
        FARM_S3_ENDPOINT=s3_server.endpoint,
        FARM_S3_ACCESS_KEY="testing",
        FARM_S3_SECRET_KEY="testing",
        FARM_DATA_DIR=str(root / "data"),
        FARM_REALTIME_FRAME_TIMEOUT="60",  # a loaded CI machine: a first render of a new shape can be slow
    )
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    ca_path = _write_certs(root)
    stack = ApiStack(env=env, db_url=db_url, bucket=bucket, port=free_port(), ca_path=ca_path,
                     log_path=root / "api.log", worker=WorkerProcess(env))  # fmt: skip
    try:
        stack.worker.start()
        stack.start()
        yield stack
    finally:
        stack.stop()
        stack.worker.stop()
