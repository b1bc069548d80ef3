"""API keys: ``<id>:<secret>``, handed out once; the ledger keeps only the secret's SHA-256.

Import-light. A key belongs to one owner (tenant) and may carry tighter limits than the
farm's defaults (jobs in flight, images per request).

A verified key is remembered in-process for :data:`CACHE_SECONDS` (keyed by its id and the
secret's SHA-256), so that an authenticated request costs no ledger read. Revocation still holds
at once: :func:`revoke_key` sends a ``farm_keys`` notification (PostgreSQL ``NOTIFY``, delivered on
commit) that makes every API process forget every remembered key (``farm.events``' listener), and
nothing is remembered while that listener is not connected (SQLite, a ledger outage) nor from a
read that a revocation overtook. The TTL only bounds a notification that was missed (a connection
that died unnoticed): a revoked key is refused at most :data:`CACHE_SECONDS` after the revocation.
A remembered key does not touch ``last_used_at``: it is written at most every :data:`TOUCH_EVERY`
on a ledger read, so it lags by at most ``TOUCH_EVERY + CACHE_SECONDS`` under steady use.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from db.models import ApiKey, utcnow
from db.session import after_commit, session_scope
from farm import events
from farm.errors import InvalidInputError

OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KEY_ID = re.compile(r"^[0-9a-f]{16}$")
# last_used_at is written at most this often per key, so that auth stays a read
TOUCH_EVERY = timedelta(seconds=60)
# compared against when the key id is unknown, so a miss costs the same as a wrong secret
_DUMMY_HASH = hashlib.sha256(b"lcm-farm: no such key").hexdigest()
# a verified key is remembered this long (seconds): the most a missed revocation notification can cost
CACHE_SECONDS = 5.0
CACHE_MAX = 10_000  # remembered keys per process (the cache starts over when full)


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


class _Cache:
    """Verified keys by ``(id, secret hash)``; a generation bumped by every forget() voids what is in it
    and what a read that started before it would add."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[tuple[str, str], tuple[KeyInfo, float, int]] = {}
        self.generation = 0

    def get(self, key_id: str, digest: str) -> KeyInfo | None:
        entry = self.entries.get((key_id, digest))
        if entry is None:
            return None
        info, until, generation = entry
        if generation != self.generation or time.monotonic() >= until or not events.listening():
            return None
        return info

    def put(self, key_id: str, digest: str, info: KeyInfo, generation: int) -> None:
        with self.lock:
            if generation != self.generation or not events.listening():
                return  # a revocation (or a listener outage) came after the read: do not keep it
            if len(self.entries) >= CACHE_MAX:
                self.entries.clear()
            self.entries[(key_id, digest)] = (info, time.monotonic() + CACHE_SECONDS, generation)

    def forget(self, _key_id: str | None = None) -> None:
        with self.lock:
            self.generation += 1
            self.entries.clear()


_cache = _Cache()
events.on_key_change(_cache.forget)


def _parse(token: str) -> tuple[str, str] | None:
    key_id, sep, secret = token.strip().partition(":")
    if not sep or not KEY_ID.match(key_id) or not secret or len(secret) > 256:
        return None
    return key_id, secret


def cached_key(token: str) -> KeyInfo | None:
    """The key ``token`` if it was verified less than CACHE_SECONDS ago and no key was revoked since;
    None otherwise (then :func:`verify_key` decides). No I/O: callable from an event loop."""
    parsed = _parse(token)
    return _cache.get(parsed[0], hash_secret(parsed[1])) if parsed is not None else None


def verify_key(token: str) -> KeyInfo | None:
    """The key ``token`` (``<id>:<secret>``) if it exists, matches and is not revoked; else None."""
    parsed = _parse(token)
    if parsed is None:
        return None
    key_id, secret = parsed
    digest = hash_secret(secret)
    info = _cache.get(key_id, digest)
    if info is not None:
        return info
    generation = _cache.generation  # before the read: a revocation committed meanwhile voids it
    with session_scope() as s:
        row = s.get(ApiKey, key_id)
        expected = row.secret_hash if row is not None else _DUMMY_HASH
        matches = hmac.compare_digest(digest, expected)
        if row is None or not matches or row.revoked_at is not None:
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > TOUCH_EVERY:
            row.last_used_at = now
        info = _info(row)
    _cache.put(key_id, digest, info, generation)
    return info


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
        events.notify_key(s, key_id)  # every API process forgets the keys it remembers, on commit
        after_commit(s, _cache.forget)  # and this one at once (SQLite has no NOTIFY)
        return True


def active_key(key_id: str) -> KeyInfo | None:
    """Key ``key_id`` if it exists and is not revoked (a realtime token names the key it came from)."""
    if not KEY_ID.match(key_id):
        return None
    with session_scope() as s:
        row = s.get(ApiKey, key_id)
        return _info(row) if row is not None and row.revoked_at is None else None
