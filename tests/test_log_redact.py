"""Credentials in query strings stay out of the API's log: a realtime token (``?fal_jwt_token=``) sent to
the real ``farm api`` appears in its log lines as ``fal_jwt_token=[redacted]``, never as itself."""

from __future__ import annotations

import logging
import time

from websockets.sync.client import connect

from farm.api.log_redact import REDACTED, RedactCredentials, redact
from tests.api_stack import APP, ApiStack


def test_redact_keeps_the_name_and_drops_the_value() -> None:
    line = "/run/x/realtime?max_buffering=2&fal_jwt_token=eyJabc.def&signature=0f0f&expires=9"
    assert redact(line) == f"/run/x/realtime?max_buffering=2&fal_jwt_token={REDACTED}&signature={REDACTED}&expires=9"
    assert redact("/health") == "/health"
    # a record shaped as uvicorn's websocket line: the arguments are rewritten, the format kept
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/a?api_key=s3cret&x=1"), None)  # fmt: skip
    assert RedactCredentials().filter(record)
    assert record.getMessage() == f'127.0.0.1:5 - "WebSocket /a?api_key={REDACTED}&x=1" [accepted]'


def test_realtime_token_is_redacted_in_the_api_log(api_stack: ApiStack) -> None:
    key = api_stack.make_key("log-redact")
    with api_stack.client(key) as c:
        reply = c.post("/tokens/", json={"allowed_apps": ["fast-lcm-diffusion"], "token_expiration": 60})
    assert reply.status_code == 200, reply.text
    token = reply.json()
    assert isinstance(token, str) and len(token) > 20
    bogus = "not-a-real-token-but-secret-all-the-same"
    for value in (token, bogus):  # accepted and refused sockets alike
        url = f"wss://{api_stack.host}/run/{APP}/realtime?max_buffering=2&fal_jwt_token={value}"
        with connect(url, ssl=api_stack.ssl_context, open_timeout=30, close_timeout=5):
            pass
    want = f"/run/{APP}/realtime?max_buffering=2&fal_jwt_token={REDACTED}"
    deadline = time.monotonic() + 30  # the server writes its line as it accepts; the file may lag a little
    while time.monotonic() < deadline:
        text = api_stack.log_path.read_text(errors="replace")
        if text.count(want) >= 2:
            break
        time.sleep(0.1)
    assert text.count(want) >= 2, api_stack.log_tail()
    assert token not in text and bogus not in text, api_stack.log_tail()
