"""Short-lived realtime tokens (``POST /tokens/``), as fal's REST API hands them out.

A token names its owner, the key that asked for it (revoking the key voids its tokens) and the
apps it may open, and expires after ``token_expiration`` seconds. It is signed with HMAC-SHA256 by
itsdangerous (whose default is SHA-1: :data:`SIGNER` names SHA-256, and a token signed with another
digest is refused) over ``FARM_REALTIME_TOKEN_SECRET`` (default: a random secret made once under
the data dir, mode 0600; API processes on several hosts must share it). It only opens a realtime
connection (``?fal_jwt_token=…``); it is never accepted as an API key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeSerializer

from farm.config import Settings

SALT = "lcm-farm realtime token v1"
SIGNER = {"digest_method": hashlib.sha256}  # the key derivation and the HMAC
_lock = threading.Lock()
_serializers: dict[str, URLSafeSerializer] = {}


class TokenError(Exception):
    """Raised when a realtime token is malformed, forged, expired or not for this app."""


@dataclass(frozen=True)
class TokenClaims:
    owner: str
    key_id: str | None
    apps: tuple[str, ...]
    expires: float


def _secret(settings: Settings) -> str:
    if settings.realtime_token_secret:
        return settings.realtime_token_secret
    path = settings.data_dir / "realtime_token.secret"
    if not path.exists():
        _write_once(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def _write_once(path: Path, secret: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    try:
        os.link(tmp, path)  # atomic, and never replaces a secret another process made first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _serializer(settings: Settings) -> URLSafeSerializer:
    secret = _secret(settings)
    with _lock:
        ser = _serializers.get(secret)
        if ser is None:
            ser = _serializers[secret] = URLSafeSerializer(secret, salt=SALT, signer_kwargs=SIGNER)
        return ser


def issue(settings: Settings, owner: str, key_id: str | None, apps: list[str], seconds: int) -> str:
    """A token for ``owner`` (through key ``key_id``) that opens ``apps`` for ``seconds``."""
    payload = {"o": owner, "k": key_id, "a": list(apps), "e": round(time.time() + seconds, 3)}
    token: str = _serializer(settings).dumps(payload)
    return token


def verify(settings: Settings, token: str, app: str) -> TokenClaims:
    """The claims of ``token`` if its signature holds, it has not expired and it opens ``app``."""
    try:
        payload = _serializer(settings).loads(token)
    except BadSignature:
        raise TokenError("invalid realtime token (bad signature)") from None
    try:
        claims = TokenClaims(str(payload["o"]), payload["k"], tuple(payload["a"]), float(payload["e"]))
    except (KeyError, TypeError, ValueError):
        raise TokenError("invalid realtime token (malformed)") from None
    if claims.expires <= time.time():
        raise TokenError("realtime token expired: get a new one from POST /tokens/")
    if app not in claims.apps:
        raise TokenError(f"realtime token does not allow {app} (it allows {', '.join(claims.apps) or 'nothing'})")
    return claims
