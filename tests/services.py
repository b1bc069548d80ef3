"""Private Redis, PostgreSQL and S3 (moto) servers for the test suite.

Each server listens on 127.0.0.1 on a free port (never the standard ones, which
may be taken by the machine's own services) and keeps its files in its own
temporary directory. ``stop()`` and ``start()`` restart it on the same port, for
fault tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(what: str) -> NoReturn:
    """Skip the tests that need ``what`` locally; fail them when ``CI=true``."""
    message = f"{what} is not installed, so the tests that need it cannot run"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a missing service is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def wait_for(
    check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def make_tmp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if Path("/tmp").is_dir() else None))
    path.chmod(0o755)
    return path


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class ProcessServer:
    """A server that is one child process, with its output in ``<dir>/server.log``."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = make_tmp_dir(f"farm-{self.name}-")
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> Sequence[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                list(self.command()), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
            )
        try:
            wait_for(self.ready, f"{self.name} on port {self.port}", self.proc, timeout)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; log:\n{self.log_tail()}") from None

    def stop(self) -> None:
        _stop_process(self.proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class RedisServer(ProcessServer):
    name = "redis"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        super().__init__()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> Sequence[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--maxmemory-policy", "noeviction",
        ]  # fmt: skip

    def ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")


class S3Server(ProcessServer):
    """moto's standalone S3 server; any access and secret key work."""

    name = "s3"
    access_key = "testing"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        super().__init__()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def command(self) -> Sequence[str]:
        return [self.binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        with urllib.request.urlopen(self.url, timeout=2) as response:
            return bool(response.status < 500)


def find_redis() -> str | None:
    return shutil.which("redis-server")


def find_moto_server() -> str | None:
    candidate = Path(sys.executable).parent / "moto_server"
    return str(candidate) if candidate.exists() else shutil.which("moto_server")


def find_postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin``, else the folder of ``initdb`` on PATH."""
    root = Path("/usr/lib/postgresql")
    versions = [p for p in root.glob("*/bin") if (p / "initdb").exists()] if root.is_dir() else []
    versions.sort(key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")])
    if versions:
        return versions[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A throwaway PostgreSQL cluster: trust auth, fsync off, database ``farm``.

    PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` user,
    in a directory that user owns under /tmp (pytest's own tmp dirs are private).
    """

    name = "postgres"
    user = "postgres"

    def __init__(self, bindir: Path, dbname: str = "farm") -> None:
        self.bindir = bindir
        self.dbname = dbname
        self.port = free_port()
        self.dir = make_tmp_dir("farm-postgres-")
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.socket_dir.mkdir(mode=0o755)
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")  # KeyError: no such user
            for path in (self.dir, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")  # fmt: skip

    def _run(self, program: str, *args: str) -> None:
        cmd = [*self.run_as, str(self.bindir / program), *args]
        done = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            output = f"{done.stdout}\n{done.stderr}\n{self.log_tail()}"
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{output}")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_for(self.dbname)

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def start(self, timeout: float = 60) -> None:
        if self.running:
            return
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.socket_dir} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options,
                  "-w", "-t", str(int(timeout)), "start")  # fmt: skip

    def stop(self) -> None:
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        path = self.dir / "server.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        dsn = f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)

    def create(self) -> None:
        """Start the server and create its database."""
        self.start()
        self.execute(f'CREATE DATABASE "{self.dbname}"')

    def new_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)
