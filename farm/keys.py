"""API keys: ``<id>:<secret>``, handed out once; the ledger keeps only the secret's SHA-256.

Import-light. A key belongs to one owner (tenant) and may carry tighter limits than the
farm's defaults (jobs in flight, images per request).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from db.models import ApiKey, utcnow
from db.session import session_scope
from farm.errors import InvalidInputError

OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
# last_used_at is written at most this often per key, so that auth stays a read
TOUCH_EVERY = timedelta(seconds=60)
# compared against when the key id is unknown, so a miss costs the same as a wrong secret
_DUMMY_HASH = hashlib.sha256(b"lcm-farm: no such key").hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    """What the API needs to know about a verified key."""

    id: str
    owner: str
    name: str
    max_in_flight: int | None
    max_images: int | None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.owner, row.name, row.max_in_flight, row.max_images)


def check_owner(owner: str) -> str:
    if not OWNER.match(owner):
        raise InvalidInputError("owner", "must be 1-128 letters, digits, '.', '_' or '-', starting alphanumeric")
    return owner


def create_key(
    owner: str, *, name: str = "", max_in_flight: int | None = None, max_images: int | None = None
) -> tuple[KeyInfo, str]:
    """Create a key for ``owner``; return it and the full ``<id>:<secret>`` (shown once, never stored)."""
    check_owner(owner)
    if len(name) > 128:
        raise InvalidInputError("name", "must be at most 128 characters")
    for field, value in (("max_in_flight", max_in_flight), ("max_images", max_images)):
        if value is not None and value < 1:
            raise InvalidInputError(field, f"must be at least 1 (got {value})")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(
        id=key_id, owner=owner, name=name, secret_hash=hash_secret(secret),
        max_in_flight=max_in_flight, max_images=max_images, created_at=utcnow(),
    )  # fmt: skip
    with session_scope() as s:
        s.add(row)
    return _info(row), f"{key_id}:{secret}"


def verify_key(token: str) -> KeyInfo | None:
    """The key ``token`` (``<id>:<secret>``) if it exists, matches and is not revoked; else None."""
    key_id, sep, secret = token.strip().partition(":")
    if not sep or not KEY_ID.match(key_id) or not secret or len(secret) > 256:
        return None
    digest = hash_secret(secret)
    with session_scope() as s:
        row = s.get(ApiKey, key_id)
        expected = row.secret_hash if row is not None else _DUMMY_HASH
        matches = hmac.compare_digest(digest, expected)
        if row is None or not matches or row.revoked_at is not None:
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > TOUCH_EVERY:
            row.last_used_at = now
        return _info(row)


def list_keys(owner: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.owner, ApiKey.created_at)
    if owner is not None:
        stmt = stmt.where(ApiKey.owner == owner)
    with session_scope() as s:
        return list(s.scalars(stmt))


def revoke_key(key_id: str) -> bool:
    """Revoke a key; False if there is no such key or it was already revoked."""
    with session_scope() as s:
        row = s.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
        return True
