"""The registry a scrape reads, the text it gets, and the worker's exporter.

``farm worker`` and ``farm api`` call :func:`setup` before anything imports prometheus-client:
it points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder of that process (removed when it exits),
so values written by Celery's prefork pool child, or by uvicorn's worker processes, are summed
by the one exporter (:func:`registry`). Gauges of a worker's pool child are "live": a child that
exits is marked dead (:func:`child_exiting`), and one that was killed is swept out when the next
one starts (:func:`child_started`).

Metrics are closed by default: they name owners and each API scrape queries the ledger, so every
metrics endpoint needs ``Authorization: Bearer <FARM_METRICS_TOKEN>``, and with no token set it answers
401 to everyone, unless an operator opens it on purpose (``FARM_METRICS_OPEN=true``, no token).
"""

from __future__ import annotations

import atexit
import errno
import hmac
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger(__name__)
ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def setup(kind: str) -> Path:
    """Multiprocess mode for this process and the processes it starts (a fresh folder, or the one
    ``PROMETHEUS_MULTIPROC_DIR`` names, which must then be emptied before each start)."""
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        return path
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before metrics were set up: values of other processes "
                    "will not be summed")
    path = Path(tempfile.mkdtemp(prefix=f"farm-{kind}-metrics-"))
    os.environ[ENV] = str(path)
    owner = os.getpid()

    def _remove() -> None:
        if os.getpid() == owner:  # never from a forked child that happens to run exit handlers
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(_remove)
    return path


def multiprocess() -> bool:
    return bool(os.environ.get(ENV))


_registry: Any = None
_registry_lock = threading.Lock()


def registry() -> Any:
    """The registry a scrape reads: every process's values (multiprocess mode), or this process's."""
    global _registry
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    import farm.metrics.defs  # noqa: F401  (every metric is defined, so each shows with its help text)

    with _registry_lock:
        if _registry is None:
            if multiprocess():
                _registry = CollectorRegistry()
                MultiProcessCollector(_registry)
            else:
                _registry = REGISTRY
        return _registry


def render(reg: Any) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(reg), CONTENT_TYPE_LATEST


REFUSED = (b"metrics are closed: send Authorization: Bearer <FARM_METRICS_TOKEN> (set the token, or "
           b"FARM_METRICS_OPEN=true on a private network)\n")


def authorized(header: str | None, token: str | None, open_: bool = False) -> bool:
    """Whether an ``Authorization`` header passes ``FARM_METRICS_TOKEN``. Fails closed: no token set, nobody
    passes unless the operator opened the metrics (``FARM_METRICS_OPEN``); a set token is always required."""
    if not token:
        return open_
    scheme, _, given = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        pass


class _Server(WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


PORTS_TRIED = 32  # the configured port and the next ones, before any free port


def serve(host: str, port: int, token: str | None, open_: bool = False) -> WSGIServer | None:
    """The worker's exporter: ``GET /metrics`` (and ``/``) in a daemon thread, on ``host:port`` or, when
    that port is taken (another worker of this host has it), the first free one of the next
    ``PORTS_TRIED - 1``, else any free port. None (logged) only if the interface cannot be served at
    all: a worker never refuses to serve its GPU for its metrics. ``server.server_port`` says which."""
    from socketserver import ThreadingMixIn

    class Threading(ThreadingMixIn, _Server):  # SO_REUSEADDR: a port another socket listens on is still refused
        pass

    reg = registry()
    if not token and not open_:
        log.warning("metrics closed: no FARM_METRICS_TOKEN, so every scrape gets 401 (set the token, or "
                    "FARM_METRICS_OPEN=true on a private network)")

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: metrics are at /metrics\n"]
        if not authorized(environ.get("HTTP_AUTHORIZATION"), token, open_):
            start("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [REFUSED]
        body, content_type = render(reg)
        start("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    candidates = [p for p in range(port, port + PORTS_TRIED) if p <= 65535] + [0]
    first_error: OSError | None = None
    for candidate in candidates:
        try:
            server = make_server(host, candidate, app, Threading, handler_class=_Quiet)
        except OSError as exc:
            first_error = first_error or exc
            if exc.errno != errno.EADDRINUSE:
                break  # not a taken port (an unknown interface, no permission): no other port helps
            continue
        if candidate != port:
            log.warning("metrics port %d is taken (another worker on this host?): serving metrics on %s:%d instead",
                        port, host, server.server_port)
        threading.Thread(target=server.serve_forever, name="farm-metrics", daemon=True).start()
        return server
    log.error("cannot serve metrics on %s:%d: %s; this worker serves without them (FARM_METRICS_HOST, "
              "FARM_METRICS_PORT)", host, port, getattr(first_error, "strerror", None) or first_error)
    return None


def scrape_url(host: str, port: int) -> str:
    """Where Prometheus reaches an exporter bound to ``host:port`` (the host's name for a wildcard)."""
    import socket

    name = socket.gethostname() if host in ("", "0.0.0.0", "::") else host
    return f"http://{f'[{name}]' if ':' in name else name}:{port}/metrics"


def child_started() -> None:
    """In a new pool child: forget the live gauges of earlier children that are gone (killed)."""
    path = os.environ.get(ENV)
    if not path:
        return
    from prometheus_client.multiprocess import mark_process_dead

    for name in os.listdir(path):
        m = _LIVE_FILE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            mark_process_dead(int(m.group(1)), path)


def child_exiting() -> None:
    if multiprocess():
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(os.getpid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
