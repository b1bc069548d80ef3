"""A trickling HTTP server, run as its own process: ``python -m tests.trickle SECONDS``.

It prints ``port <n>`` once listening, then one line ``got <METHOD> <path>`` per request. A GET is
answered at once with ``200`` and a ``Content-Length`` of 1 MiB, then one body byte every SECONDS;
a POST (a webhook) has its body read, then the status line is sent one byte every SECONDS. It
never finishes on its own; the test kills it. An attacker's server, for the abuse tests.
"""

from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

EVERY = float(sys.argv[1]) if len(sys.argv) > 1 else 25.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _say(self) -> None:
        print(f"got {self.command} {self.path}", flush=True)

    def do_GET(self) -> None:  # noqa: N802
        self._say()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(2**20))
        self.end_headers()
        self.wfile.flush()
        for _ in range(2**20):
            self.wfile.write(b"\0")
            self.wfile.flush()
            time.sleep(EVERY)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._say()
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(EVERY)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the farm hangs up at its deadline, on purpose


if __name__ == "__main__":
    server = Server(("127.0.0.1", 0), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()
