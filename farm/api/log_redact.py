"""Credentials in a query string never reach the server's log.

uvicorn logs each request line with its query string: the websocket handshake on ``uvicorn.error``
(``"WebSocket /run/…/realtime?fal_jwt_token=…" [accepted]``) and, when an access log is on, every
request on ``uvicorn.access``. A realtime token (``fal_jwt_token``), an upload URL's ``signature``
or any parameter named like a credential (token, key, secret, signature, password, credential,
auth) keeps its name and loses its value: ``fal_jwt_token=[redacted]``. :func:`install` puts the
filter on both loggers, in every server process (``create_app`` calls it).
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
CREDENTIAL = re.compile(r"token|key|secret|signature|password|credential|auth|jwt", re.IGNORECASE)
_PARAM = re.compile(r"([?&;])([^=&;#\s\"']+)=([^&;#\s\"']*)")
LOGGERS = ("uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    """``text`` with the value of every credential-named query parameter replaced by ``[redacted]``."""
    if "?" not in text:
        return text

    def _one(m: re.Match[str]) -> str:
        sep, name, value = m.groups()
        return f"{sep}{name}={REDACTED}" if value and CREDENTIAL.search(name) else m.group(0)

    return _PARAM.sub(_one, text)


class RedactCredentials(logging.Filter):
    """Rewrites a record's message and string arguments with :func:`redact`; drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install() -> None:
    """Put the filter on uvicorn's request loggers (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactCredentials) for f in logger.filters):
            logger.addFilter(RedactCredentials())
