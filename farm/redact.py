"""What may be written to a log about a user's URL: never its query string or credentials.

A webhook URL often carries a token (``https://hooks.example/x?token=…``); logs show
``https://hooks.example/x?…`` instead.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def url_for_log(url: str) -> str:
    """``url`` without user info, query and fragment (``?…`` marks a query that was dropped)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    tail = "?…" if parts.query or parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) + tail
