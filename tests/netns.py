"""One farm across hosts, on one machine: network namespaces made by the test.

A "server host" namespace holds Redis, PostgreSQL and an S3 server (SeaweedFS), listening only on its own
address; each "worker host" namespace holds one ``farm worker`` and reaches the server host through a
veth cable plugged into a bridge inside the server host. Cutting a cable (the server side of the veth
set down) is a real partition: packets are dropped both ways, nothing is closed. Only the addresses of
these namespaces are used; every namespace (and so every cable) is deleted afterwards.

The test process itself stays in its own namespace: it reads the ledger through PostgreSQL's Unix
socket (a file, not a network address) and runs the few S3 and CLI steps inside the server host with
``ip netns exec``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from tests.services import (
    WEED_PORTS,
    PostgresServer,
    free_port,
    make_tmp_dir,
    missing,
    remove_weed_sockets,
    weed_command,
    write_s3_identities,
)
from tests.workers import FARM, WorkerProcess

SUBNET = "10.231.0"  # private to these namespaces: the same numbers in two test runs never meet
SERVER_IP = f"{SUBNET}.1"
REDIS_PORT, PG_PORT, S3_PORT = 6379, 5432, 9000
PYTHON = sys.executable


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def require_netns() -> None:
    """Skip (fail under CI=true) unless this process may make network namespaces (root, ``ip netns``)."""
    if shutil.which("ip") is None:
        missing("iproute2 (`ip`)")
    probe = f"farmprobe{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        missing(f"network namespaces (`ip netns add` failed: {done.stderr.strip()}; needs root)")
    ip("netns", "del", probe, check=False)


class Hosts:
    """The namespaces and cables: ``server`` and ``workers[i]``; ``cut(i)`` / ``restore(i)`` a worker's cable."""

    def __init__(self, n_workers: int) -> None:
        tag = uuid.uuid4().hex[:6]
        self.server = f"farm-{tag}-srv"
        self.workers = [f"farm-{tag}-w{i}" for i in range(n_workers)]
        self.cables = [f"fc{tag}{i}" for i in range(n_workers)]  # server-side ends (<= 15 characters)
        self.made: list[str] = []

    def worker_ip(self, i: int) -> str:
        return f"{SUBNET}.{11 + i}"

    def create(self) -> None:
        ip("netns", "add", self.server)
        self.made.append(self.server)
        ip("-n", self.server, "link", "set", "lo", "up")
        ip("-n", self.server, "link", "add", "br0", "type", "bridge")
        ip("-n", self.server, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        ip("-n", self.server, "link", "set", "br0", "up")
        for i, (ns, cable) in enumerate(zip(self.workers, self.cables, strict=True)):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "add", cable, "netns", self.server, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.server, "link", "set", cable, "master", "br0")
            ip("-n", self.server, "link", "set", cable, "up")
            ip("-n", ns, "addr", "add", f"{self.worker_ip(i)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def cut(self, i: int) -> None:
        """Unplug worker host ``i`` at the switch: its packets go nowhere, its connections stay open."""
        ip("-n", self.server, "link", "set", self.cables[i], "down")

    def restore(self, i: int) -> None:
        ip("-n", self.server, "link", "set", self.cables[i], "up")

    def delete(self) -> None:
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)  # takes its end of every cable with it
        self.made.clear()

    def exec(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]


class NetnsPostgres(PostgresServer):
    """A PostgreSQL cluster whose server runs in the server host, on its address; the test reads it by socket."""

    def __init__(self, bindir: Path, hosts: Hosts) -> None:
        super().__init__(bindir, dbname="farm")
        self.port = PG_PORT
        self.hosts = hosts
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        self.start_as = [*hosts.exec(hosts.server), *self.run_as]

    @property
    def url(self) -> str:  # from a worker host
        return f"postgresql+psycopg://{self.user}@{SERVER_IP}:{self.port}/{self.dbname}"

    @property
    def socket_url(self) -> str:  # from the test process (no network)
        return f"postgresql+psycopg://{self.user}@/{self.dbname}?host={self.socket_dir}&port={self.port}"

    def start(self, timeout: float = 60) -> None:
        if self.running:
            return
        options = (f"-p {self.port} -h {SERVER_IP} -k {self.socket_dir} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=100")
        cmd = [*self.start_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
               "-o", options, "-w", "-t", str(int(timeout)), "start"]
        done = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout + 30)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start in {self.hosts.server} failed: {done.stderr}\n{self.log_tail()}")

    def execute(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(f"host={self.socket_dir} port={self.port} user={self.user} dbname={database}",
                             autocommit=True) as conn:
            conn.execute(sql)


class NetnsProcess:
    """A server (Redis, SeaweedFS) started in a namespace; its output in ``<dir>/server.log``."""

    def __init__(self, name: str, cmd: list[str], directory: Path | None = None) -> None:
        self.name = name
        self.dir = directory or make_tmp_dir(f"farm-{name}-")
        with open(self.dir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)

    def log_tail(self, lines: int = 10) -> str:
        path = self.dir / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class NetnsWeed(NetnsProcess):
    """SeaweedFS in the server host: S3 on ``SERVER_IP:S3_PORT``, its other listeners on that address too."""

    def __init__(self, hosts: Hosts, binary: str) -> None:
        directory = make_tmp_dir("farm-s3-")
        write_s3_identities(directory / "s3.json")
        # free on this host, so that the gRPC socket files weed makes in the shared /tmp meet no other weed's
        self.ports = {name: free_port() for name in WEED_PORTS}
        command = weed_command(binary, directory, SERVER_IP, S3_PORT, self.ports)
        super().__init__("s3", hosts.exec(hosts.server, *command), directory)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # on SIGTERM weed drains for ~16 s
            self.proc.wait(10)
        remove_weed_sockets(self.ports)
        super().close()


class NetnsWorker(WorkerProcess):
    """``farm worker`` on a worker host (``ip netns exec`` execs it: the pid is the worker's)."""

    def __init__(self, env: dict[str, str], ns: str, name: str) -> None:
        super().__init__(env, model="farm/hold", name=name)
        self.ns = ns

    def launch(self) -> NetnsWorker:
        import threading

        args = ["ip", "netns", "exec", self.ns, FARM, "worker", "--model", self.model, "--device", "cpu",
                "--name", str(self.name)]
        self.proc = subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the test is over: no need to drain
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


S3_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from minio import Minio
    client = Minio(sys.argv[1], access_key="testing", secret_key="testing", secure=False)
    deadline = time.monotonic() + 30
    while True:  # bounded: SeaweedFS may still be starting
        try:
            found = client.bucket_exists(sys.argv[2])
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    if sys.argv[3] == "make":
        if not found:
            client.make_bucket(sys.argv[2])
        print("[]")
    else:
        print(json.dumps(sorted(o.object_name for o in client.list_objects(sys.argv[2], prefix=sys.argv[3],
                                                                           recursive=True))))
""")


def s3_in(hosts: Hosts, bucket: str, what: str) -> list[str]:
    """In the server host: make the bucket (``what="make"``), or list the object keys under prefix ``what``."""
    done = subprocess.run(hosts.exec(hosts.server, PYTHON, "-c", S3_SCRIPT, f"{SERVER_IP}:{S3_PORT}", bucket, what),
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"S3 step {what!r} in the server host failed:\n{done.stderr[-2000:]}", pytrace=False)
    keys: Any = json.loads(done.stdout.strip().splitlines()[-1])
    return list(keys)


def wait_listening(hosts: Hosts, port: int, what: str, timeout: float = 30) -> None:
    """Wait (bounded) until something accepts TCP connections on the server host's ``port``, seen from there."""
    script = ("import socket, sys, time\n"
              "deadline = time.monotonic() + float(sys.argv[3])\n"
              "while True:\n"
              "    try:\n"
              "        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close(); break\n"
              "    except OSError:\n"
              "        if time.monotonic() > deadline: sys.exit(f'nothing listens on {sys.argv[1]}:{sys.argv[2]}')\n"
              "        time.sleep(0.05)\n")
    done = subprocess.run(hosts.exec(hosts.server, PYTHON, "-c", script, SERVER_IP, str(port), str(timeout)),
                          capture_output=True, text=True, timeout=timeout + 30)
    if done.returncode != 0:
        raise RuntimeError(f"{what} did not come up in {hosts.server}: {done.stderr.strip()}")
