"""Deliver due webhooks from the ledger outbox: signed, SSRF-guarded, retried, recorded.

Every state lives in the ledger, so any number of dispatchers (one per API process) may run
and a restart loses nothing. A claim pushes the row's ``next_attempt_at`` one lease ahead
(PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite serialises writers with ``BEGIN IMMEDIATE``),
so a dispatcher that dies mid-delivery only delays that row by the lease.

Outcome of an attempt (one ``webhook_attempts`` row each): 2xx → ``delivered``; 410 →
``gone`` (never again); a URL the SSRF guard refuses → ``failed`` at once; anything else →
retry after an exponential delay with full jitter (``webhook_backoff_seconds`` doubling,
capped at ``webhook_backoff_max_seconds``), until ``webhook_max_attempts`` → ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, select, update

from db.models import WebhookAttempt, WebhookDelivery, utcnow
from db.session import session_scope
from farm import netguard
from farm.config import Settings, get_settings
from farm.metrics import count
from farm.webhooks import signing
from farm.webhooks.outbox import DELIVERED, FAILED, GONE, PENDING

log = logging.getLogger(__name__)

BATCH = 16
CONCURRENCY = 8


@dataclass(frozen=True)
class Claimed:
    id: int
    job_id: str
    owner: str
    url: str
    body: dict[str, Any]
    attempts: int


def backoff_delay(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): full jitter."""
    ceiling = min(settings.webhook_backoff_max_seconds, settings.webhook_backoff_seconds * 2 ** (attempt - 1))
    return (rng or random).uniform(0.0, ceiling)


def lease(settings: Settings) -> timedelta:
    """How long a claimed row stays invisible to other dispatchers."""
    return timedelta(seconds=settings.webhook_timeout_seconds * (netguard.MAX_REDIRECTS + 1) + 60)


def claim_due(settings: Settings, now: datetime, limit: int = BATCH) -> list[Claimed]:
    """Claim up to ``limit`` due pending rows for this dispatcher."""
    with session_scope() as s:
        due = (
            select(WebhookDelivery.id)
            .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(limit)
        )
        if s.get_bind().dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        ids = list(s.scalars(due))
        if not ids:
            return []
        stmt = (
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == PENDING,
                   WebhookDelivery.next_attempt_at <= now)
            .values(next_attempt_at=now + lease(settings))
            .returning(WebhookDelivery.id, WebhookDelivery.job_id, WebhookDelivery.owner, WebhookDelivery.url,
                       WebhookDelivery.body, WebhookDelivery.attempts)
        )
        rows = s.execute(stmt).all()
    return sorted((Claimed(*row) for row in rows), key=lambda c: ids.index(c.id))


def _post(claimed: Claimed, settings: Settings) -> tuple[int | None, str | None, bool]:
    """One attempt: (status code, error, permanent failure)."""
    body = json.dumps(claimed.body, separators=(",", ":"), ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json",
               **signing.signed_headers(settings, claimed.job_id, claimed.owner, body)}
    try:
        code = netguard.post(claimed.url, settings, content=body, headers=headers,
                             timeout=settings.webhook_timeout_seconds)
    except netguard.UnsafeURLError as exc:
        return None, f"refused by the SSRF guard: {exc}", True
    except (netguard.UnresolvableURLError, httpx.HTTPError, OSError) as exc:
        return None, netguard.describe(exc), False
    return code, None, False


def _record(claimed: Claimed, code: int | None, error: str | None, permanent: bool, duration_ms: float,
            settings: Settings, now: datetime) -> str:
    attempts = claimed.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "last_error": error or (f"HTTP {code}" if code else None)}
    if code is not None and 200 <= code < 300:
        values.update(status=DELIVERED, delivered_at=utcnow(), last_error=None)
    elif code == 410:
        values.update(status=GONE)
    elif permanent or attempts >= settings.webhook_max_attempts:
        values.update(status=FAILED)
    else:
        values.update(next_attempt_at=now + timedelta(seconds=backoff_delay(attempts, settings)))
    with session_scope() as s:
        s.add(WebhookAttempt(delivery_id=claimed.id, attempted_at=utcnow(), status_code=code, error=error,
                             duration_ms=duration_ms))
        stmt = (
            update(WebhookDelivery)
            .where(WebhookDelivery.id == claimed.id, WebhookDelivery.status == PENDING,
                   WebhookDelivery.attempts == claimed.attempts)
            .values(**values)
        )
        if cast(CursorResult[Any], s.execute(stmt)).rowcount != 1:
            log.warning("webhook %s of %s was settled by another dispatcher", claimed.id, claimed.job_id)
    return str(values.get("status", PENDING))


def deliver(claimed: Claimed, settings: Settings, now: datetime) -> str:
    """Make one attempt at a claimed row and record it; the row's new status."""
    started = time.perf_counter()
    try:
        code, error, permanent = _post(claimed, settings)
    except Exception as exc:  # a bug must not leave the row claimed forever: record it as a failed attempt
        log.exception("webhook %s of %s crashed", claimed.id, claimed.job_id)
        code, error, permanent = None, netguard.describe(exc), False
    duration_ms = (time.perf_counter() - started) * 1000
    status = _record(claimed, code, error, permanent, duration_ms, settings, now)
    count.webhook_attempt("retry" if status == PENDING else status)
    log.info("webhook of %s to %s: %s (%s) after %.0f ms", claimed.job_id, claimed.url, status,
             code if code is not None else error, duration_ms)
    return status


def deliver_due_once(settings: Settings | None = None, *, now: datetime | None = None) -> int:
    """Claim the due rows and attempt each once; the number of attempts made."""
    settings = settings or get_settings()
    now = now or utcnow()
    claimed = claim_due(settings, now)
    if len(claimed) <= 1:
        for c in claimed:
            deliver(c, settings, now)
    else:
        with ThreadPoolExecutor(min(CONCURRENCY, len(claimed)), thread_name_prefix="webhook") as pool:
            list(pool.map(lambda c: deliver(c, settings, now), claimed))
    return len(claimed)


async def run_forever(stop: asyncio.Event, settings: Settings | None = None) -> None:
    """Deliver due webhooks until ``stop`` is set, polling every ``webhook_poll_seconds``."""
    settings = settings or get_settings()
    failing = False
    while not stop.is_set():
        made = 0
        try:
            made = await asyncio.to_thread(deliver_due_once, settings)
            failing = False
        except Exception as exc:  # the ledger is down or not migrated yet: keep polling
            if not failing:
                log.warning("webhook dispatcher cannot read the outbox: %s", netguard.describe(exc))
            failing = True
        if made >= BATCH:
            continue  # more may be due
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.webhook_poll_seconds)
