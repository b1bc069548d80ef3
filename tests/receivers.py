"""A real HTTP(S) server on loopback for the webhook, SSRF and file-input tests.

It records every request (method, path, headers, body, TLS server name) and answers from a
script: a list of ``(status, headers, body)`` used in order, then ``default``.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    server_name: str | None = None


@dataclass
class Receiver:
    host: str = "127.0.0.1"
    port: int = 0
    script: list[Answer] = field(default_factory=list)
    default: Answer = (200, {}, b"ok")
    tls: ssl.SSLContext | None = None
    chunked: bool = False  # send bodies without Content-Length
    requests: list[Recorded] = field(default_factory=list)
    on_request: Callable[[Recorded], Answer | None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sni: dict[int, str | None] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                sni = getattr(self.connection, "farm_sni", None)
                rec = Recorded(self.command, self.path, dict(self.headers.items()), body, sni)
                status, headers, payload = receiver._answer(rec)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if receiver.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(payload), 65536):
                        part = payload[i : i + 65536]
                        self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _handle

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            allow_reuse_address = False

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = super().get_request()
                if receiver.tls is None:
                    return sock, addr
                names: dict[str, str | None] = {}

                def on_sni(conn: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
                    names["sni"] = name

                receiver.tls.sni_callback = on_sni  # type: ignore[assignment]
                wrapped = receiver.tls.wrap_socket(sock, server_side=True)
                wrapped.farm_sni = names.get("sni")  # type: ignore[attr-defined]
                return wrapped, addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that refuse our certificate, on purpose

        self.server = Server((self.host, self.port), Handler)
        self.port = self.server.server_address[1]

    def _answer(self, rec: Recorded) -> Answer:
        with self._lock:
            self.requests.append(rec)
            if self.on_request is not None:
                answer = self.on_request(rec)
                if answer is not None:
                    return answer
            return self.script.pop(0) if self.script else self.default

    def url(self, path: str = "/", host: str | None = None, scheme: str | None = None) -> str:
        shown = host or (f"[{self.host}]" if ":" in self.host else self.host)
        return f"{scheme or ('https' if self.tls else 'http')}://{shown}:{self.port}{path}"

    def __enter__(self) -> Receiver:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
