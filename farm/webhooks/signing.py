"""Webhook signatures, the way fal.ai signs its webhooks.

Headers ``X-Fal-Webhook-Request-Id``, ``X-Fal-Webhook-User-Id``, ``X-Fal-Webhook-Timestamp``
(Unix seconds) and ``X-Fal-Webhook-Signature``: the hex ED25519 signature of the UTF-8 bytes
``request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" + sha256_hex(body)``. The public
keys are served as a JWKS (``{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": base64url}]}``)
at ``/.well-known/jwks.json``; receivers accept a timestamp within ±5 minutes.

The private key is made once and kept as PKCS#8 PEM at ``settings.webhook_key_path`` (default
``<data_dir>/webhook_ed25519.pem``), mode 0600; two processes that start together agree on
one key (it is published with an atomic hard link, never overwritten).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from farm.config import Settings

log = logging.getLogger(__name__)

REQUEST_ID = "X-Fal-Webhook-Request-Id"
USER_ID = "X-Fal-Webhook-User-Id"
TIMESTAMP = "X-Fal-Webhook-Timestamp"
SIGNATURE = "X-Fal-Webhook-Signature"
LEEWAY_SECONDS = 300

_lock = threading.Lock()
_keys: dict[Path, Ed25519PrivateKey] = {}


def key_path(settings: Settings) -> Path:
    return settings.webhook_key_path or settings.data_dir / "webhook_ed25519.pem"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _create(path: Path) -> None:
    """Write a new key to ``path`` unless one is there already (race-safe)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-webhook-key-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if another process got there first
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create instead
            with contextlib.suppress(FileExistsError):
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(out, "wb") as fh:
                    fh.write(pem)
    finally:
        Path(tmp).unlink(missing_ok=True)


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    """The webhook signing key, made on first use."""
    path = key_path(settings).expanduser().resolve()
    key = _keys.get(path)
    if key is not None:
        return key
    with _lock:
        if path not in _keys:
            if not path.exists():
                _create(path)
                log.info("created the webhook signing key %s", path)
            elif readable_by_others(path):
                log.warning("webhook signing key %s is readable by others; chmod 600 it", path)
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an ED25519 private key")
            _keys[path] = loaded
        return _keys[path]


def readable_by_others(path: Path) -> bool:
    """Whether users other than this process's may read or change ``path``: any "other" bit, or a group bit of a
    group this process is not in. A Kubernetes Secret mounted with ``defaultMode: 0400`` and the pod's
    ``fsGroup`` is group-readable (kubelet adds g+r for that group, the process's own): not a warning."""
    st = path.stat()
    if st.st_mode & 0o007:
        return True
    return bool(st.st_mode & 0o070) and st.st_gid not in {os.getgid(), os.getegid(), *os.getgroups()}


def forget_keys() -> None:
    """Drop cached keys (tests; a process that rotated the key file)."""
    with _lock:
        _keys.clear()


def public_jwk(public: Ed25519PublicKey) -> dict[str, str]:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    core = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    # RFC 7638 thumbprint as the key id
    thumb = hashlib.sha256(json.dumps(core, separators=(",", ":"), sort_keys=True).encode()).digest()
    return {**core, "kid": _b64url(thumb), "use": "sig", "alg": "EdDSA"}


def jwks(settings: Settings) -> dict[str, Any]:
    """The JSON Web Key Set of the webhook keys."""
    return {"keys": [public_jwk(signing_key(settings).public_key())]}


def message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


def signed_headers(
    settings: Settings, request_id: str, user_id: str, body: bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The four ``X-Fal-Webhook-*`` headers for ``body``."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = signing_key(settings).sign(message(request_id, user_id, ts, body))
    return {REQUEST_ID: request_id, USER_ID: user_id, TIMESTAMP: ts, SIGNATURE: signature.hex()}


def verify(
    keys: Mapping[str, Any], headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> bool:
    """True if ``headers`` carry a fresh, valid signature of ``body`` by one of the JWKS ``keys``."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        rid, uid, ts, sig = (lowered[h.lower()] for h in (REQUEST_ID, USER_ID, TIMESTAMP, SIGNATURE))
        if abs((time.time() if now is None else now) - int(ts)) > LEEWAY_SECONDS:
            return False
        signature = bytes.fromhex(sig)
    except (KeyError, ValueError):
        return False
    msg = message(rid, uid, ts, body)
    for jwk in keys.get("keys", []):
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        try:
            raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, msg)
            return True
        except (InvalidSignature, ValueError, KeyError):
            continue
    return False
