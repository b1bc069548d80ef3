"""Deliver due webhooks from the ledger outbox: signed, SSRF-guarded, retried, recorded.

Every state lives in the ledger, so any number of dispatchers (one per API process) may run
and a restart loses nothing. A claim leases the row (``leased_until``, and ``next_attempt_at``
one lease ahead), so a dispatcher that dies mid-delivery only delays that row by the lease.
The body is built from the ledger when the attempt is made (the outbox row holds none).

Abuse bounds: each attempt has a wall-clock deadline for the whole exchange
(``webhook_timeout_seconds``: the name lookup, connect, send, status line, redirects; a receiver
that trickles, or a name server that never answers, is cut at it), at most
``webhook_deliveries_per_owner`` rows of one owner are in flight at once across the farm, and
attempts run in their own threads (``webhook_concurrency`` per process), never waited for by the
poll loop: one slow endpoint holds its owner's slots, nobody else's.

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, func, or_, select, text, update

from db import ledger
from db.models import WebhookAttempt, WebhookDelivery, utcnow
from db.session import session_scope
from farm import netguard
from farm.config import Settings, get_settings
from farm.metrics import count
from farm.webhooks import outbox, signing
from farm.webhooks.outbox import DELIVERED, FAILED, GONE, PENDING

log = logging.getLogger(__name__)

BATCH = 16  # rows claimed at once by deliver_due_once
LOCK_KEY = 0x6661726D686F6F6B  # pg_advisory_xact_lock key of outbox claims ("farmhook")


@dataclass(frozen=True)
class Claimed:
    id: int
    job_id: str
    owner: str
    url: str
    body: dict[str, Any] | None  # None: built now, from the ledger (rows before i10b_webhooks stored theirs)
    attempts: int


def backoff_delay(attempt: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): full jitter.

    Not tenacity: a delivery's retries outlive the process (the ledger holds when the next one is due)."""
    ceiling = min(settings.webhook_backoff_max_seconds, settings.webhook_backoff_seconds * 2 ** (attempt - 1))
    return (rng or random).uniform(0.0, ceiling)


def lease(settings: Settings) -> timedelta:
    """How long a claimed row stays invisible to other dispatchers (the attempt's deadline, and room to
    build the body and record the outcome)."""
    return timedelta(seconds=settings.webhook_timeout_seconds + 60)


def claim_due(settings: Settings, now: datetime, limit: int = BATCH) -> list[Claimed]:
    """Claim up to ``limit`` due pending rows for this dispatcher, at most ``webhook_deliveries_per_owner``
    of one owner in flight at once (rows under an unexpired lease count, whichever process holds them).

    Claims are serialised (PostgreSQL: a transaction-level advisory lock; SQLite: ``BEGIN IMMEDIATE``), so
    the count stays true; each owner's rows are taken oldest first, owners side by side."""
    cap = settings.webhook_deliveries_per_owner
    free = or_(WebhookDelivery.leased_until.is_(None), WebhookDelivery.leased_until <= now)
    with session_scope() as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        rank = func.row_number().over(partition_by=WebhookDelivery.owner,
                                      order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id))
        ranked = (select(WebhookDelivery.id, WebhookDelivery.owner, WebhookDelivery.next_attempt_at,
                         rank.label("rn"))
                  .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now, free)
                  .subquery())
        candidates = s.execute(select(ranked.c.id, ranked.c.owner).where(ranked.c.rn <= cap)
                               .order_by(ranked.c.next_attempt_at, ranked.c.id).limit(limit * 4)).all()
        if not candidates:
            return []
        owners = {owner for _, owner in candidates}
        busy = dict(s.execute(select(WebhookDelivery.owner, func.count())
                              .where(WebhookDelivery.owner.in_(owners), WebhookDelivery.status == PENDING,
                                     WebhookDelivery.leased_until > now)
                              .group_by(WebhookDelivery.owner)).all())
        ids: list[int] = []
        for row_id, owner in candidates:
            if len(ids) >= limit:
                break
            if busy.get(owner, 0) < cap:
                busy[owner] = busy.get(owner, 0) + 1
                ids.append(row_id)
        if not ids:
            return []
        until = now + lease(settings)
        stmt = (
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == PENDING,
                   WebhookDelivery.next_attempt_at <= now)
            .values(next_attempt_at=until, leased_until=until)
            .returning(WebhookDelivery.id, WebhookDelivery.job_id, WebhookDelivery.owner, WebhookDelivery.url,
                       WebhookDelivery.body, WebhookDelivery.attempts)
        )
        rows = s.execute(stmt).all()
    return sorted((Claimed(*row) for row in rows), key=lambda c: ids.index(c.id))


def _body(claimed: Claimed, settings: Settings) -> bytes:
    """The body to send, built now from the ledger (the outbox row holds no body)."""
    body = claimed.body
    if body is None:
        with session_scope() as s:
            job = ledger.get_job(s, claimed.job_id)
            if job is None:
                raise LookupError(f"job {claimed.job_id} is gone")
            body = outbox.build_body(s, job, settings)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _post(claimed: Claimed, settings: Settings) -> tuple[int | None, str | None, bool]:
    """One attempt, within its deadline (``webhook_timeout_seconds``, the whole exchange): (status code,
    error, permanent failure)."""
    body = _body(claimed, settings)
    headers = {"Content-Type": "application/json",
               **signing.signed_headers(settings, claimed.job_id, claimed.owner, body)}
    seconds = settings.webhook_timeout_seconds
    deadline = time.monotonic() + seconds
    try:
        code = netguard.post(claimed.url, settings, content=body, headers=headers, timeout=seconds,
                             deadline=deadline)
    except netguard.UnsafeURLError as exc:
        return None, f"refused by the SSRF guard: {exc}", True
    except httpx.TimeoutException as exc:
        if time.monotonic() >= deadline:
            return None, f"no answer within the {seconds:g} s deadline (FARM_WEBHOOK_TIMEOUT_SECONDS)", False
        return None, netguard.describe(exc), False
    except (netguard.UnresolvableURLError, httpx.HTTPError, OSError) as exc:
        return None, netguard.describe(exc), False
    return code, None, False


def _record(claimed: Claimed, code: int | None, error: str | None, permanent: bool, duration_ms: float,
            settings: Settings, now: datetime) -> str:
    attempts = claimed.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "last_error": error or (f"HTTP {code}" if code else None),
                              "leased_until": None}
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
    log.info("webhook of %s to %s: %s (%s) after %.0f ms", claimed.job_id, netguard.redact(claimed.url), status,
             code if code is not None else error, duration_ms)
    return status


def deliver_due_once(settings: Settings | None = None, *, now: datetime | None = None) -> int:
    """Claim the due rows and attempt each once, waiting for all; the number of attempts made."""
    settings = settings or get_settings()
    now = now or utcnow()
    claimed = claim_due(settings, now)
    if len(claimed) <= 1:
        for c in claimed:
            deliver(c, settings, now)
    else:
        with ThreadPoolExecutor(min(settings.webhook_concurrency, len(claimed)), thread_name_prefix="webhook") as pool:
            list(pool.map(lambda c: deliver(c, settings, now), claimed))
    return len(claimed)


class Deliveries:
    """Attempts in flight in this process: at most ``webhook_concurrency``, each in its own thread, none
    waited for by the poll loop, so a slow receiver holds one thread (and one of its owner's slots), not
    the loop: the next due rows are claimed and sent while it is still pending."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._in_flight = 0

    @property
    def free(self) -> int:
        with self._lock:
            return self.settings.webhook_concurrency - self._in_flight

    def start_due(self) -> int:
        """Claim as many due rows as there are free threads and start their attempts; how many started."""
        free = self.free
        if free <= 0:
            return 0
        now = utcnow()
        claimed = claim_due(self.settings, now, limit=free)
        for c in claimed:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._deliver, c, now)
        return len(claimed)

    def _deliver(self, claimed: Claimed, now: datetime) -> None:
        try:
            deliver(claimed, self.settings, now)
        finally:
            with self._lock:
                self._in_flight -= 1

    def close(self) -> None:
        """Stop without waiting: an attempt cut short is retried by any dispatcher once its lease is over."""
        self._pool.shutdown(wait=False, cancel_futures=True)


async def run_forever(stop: asyncio.Event, settings: Settings | None = None) -> None:
    """Deliver due webhooks until ``stop`` is set, polling every ``webhook_poll_seconds``."""
    settings = settings or get_settings()
    deliveries = Deliveries(settings)
    failing = False
    try:
        while not stop.is_set():
            started = 0
            try:
                started = await asyncio.to_thread(deliveries.start_due)
                failing = False
            except Exception as exc:  # the ledger is down or not migrated yet: keep polling
                if not failing:
                    log.warning("webhook dispatcher cannot read the outbox: %s", netguard.describe(exc))
                failing = True
            if started and deliveries.free > 0:
                continue  # more may be due
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.webhook_poll_seconds)
    finally:
        deliveries.close()
