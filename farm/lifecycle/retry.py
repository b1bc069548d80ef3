"""Retry: a failed attempt at a batch goes back to the pool after a backoff, or, out of retries, fails its job.

One rule, shared by the workers (a render or store that failed: :func:`give_back`) and the sweeper (a
lease that ran out: farm.lifecycle.sweep): a batch is tried at most ``batch_retries + 1`` times
(:func:`out_of_retries`), and a failed attempt ``n`` waits :func:`backoff` seconds before the batch may
be claimed again. A batch whose jobs all ended (or whose claims were all lost) while it rendered is
closed as cancelled (:func:`abort`). Every write is fenced: a claim that no longer holds changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery.exceptions import SoftTimeLimitExceeded

from db import batches as ledger_batches
from db import ledger
from db.session import session_scope
from farm.config import Settings
from farm.errors import BrokerUnavailableError, FarmError, StorageError
from farm.lifecycle.claim import Claimed, describe
from farm.lifecycle.finish import finish
from farm.status import BatchStatus, JobStatus

log = logging.getLogger(__name__)

STORAGE_FAILED = "the images could not be stored (a storage error; the worker's log has the details)"
RENDER_FAILED = "the batch failed (an internal error; the worker's log has the details)"


def out_of_retries(attempts: int, settings: Settings) -> bool:
    """Whether a batch tried ``attempts`` times has had all its tries (then its job fails, naming its images)."""
    return attempts > settings.batch_retries


def backoff(attempts: int) -> float:
    """Seconds before a batch whose attempt ``attempts`` failed may be claimed again (the sweeper requeues it)."""
    return 2.0 ** (attempts - 1)


def give_back(group: Sequence[Claimed], exc: BaseException, settings: Settings) -> None:
    """A failed attempt: back to the pool after a backoff, or, out of retries (or bad input), fail its job."""
    reason = _reason(exc)
    # what the jobs' logs and errors say: a batch may hold several owners' requests, and an error that
    # is not one of the farm's client-safe ones (a storage error names object keys and the bucket; an
    # OSError or library error may name anything) goes to this worker's log only (below)
    public = _public_reason(exc, reason)
    final = isinstance(exc, FarmError) and 400 <= exc.http_status < 500  # bad input: retrying cannot help
    lost = []
    with session_scope() as s:
        for c in group:
            failed = c.todo or c.indices
            if final or out_of_retries(c.attempts, settings):
                if not ledger_batches.fail(s, c.batch_id, c.token, reason):
                    lost.append(c)
                    continue
                message = f"images {failed} failed: {public}"
                finish(s, c.job_id, JobStatus.FAILED, message=message, error=message,
                       error_type=_error_type(exc), settings=settings)
                continue
            wait = backoff(c.attempts)
            if not ledger_batches.give_back(s, c.batch_id, c.token, reason, wait):
                lost.append(c)
                continue
            ledger.add_log(s, c.job_id, f"images {failed} failed: {public}; retry {c.attempts} of "
                           f"{settings.batch_retries} in {wait:.0f} s", level="WARNING")
    if lost:
        log.warning("batch %s failed (%s) but was taken over meanwhile: dropped", describe(lost), reason)
    if len(lost) < len(group):
        log.warning("batch %s failed: %s", describe([c for c in group if c not in lost]), reason)


def abort(group: Sequence[Claimed]) -> None:
    """The render stopped because every job of the group ended or every claim was lost: close what still holds."""
    with session_scope() as s:
        ledger_batches.finish_held(s, [c.held for c in group], BatchStatus.CANCELLED)
    log.info("batch %s: every job ended or every claim was lost: render stopped", describe(group))


def _public_reason(exc: BaseException, reason: str) -> str:
    """What every owner of the batch may be told: the text of the farm's own errors, which are written
    for users (bad input, an unreadable adapter, a render error), and of the time limit; a fixed
    sentence for a storage or broker error (they name object keys, buckets, hosts) and for anything
    else (an OSError or a library's error may name any path, another owner's objects included)."""
    if isinstance(exc, StorageError):
        return STORAGE_FAILED
    if isinstance(exc, BrokerUnavailableError):
        return RENDER_FAILED
    if isinstance(exc, SoftTimeLimitExceeded | FarmError):
        return reason
    return RENDER_FAILED


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SoftTimeLimitExceeded):
        return "render took longer than the task time limit"
    return str(exc) or type(exc).__name__


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, SoftTimeLimitExceeded):
        return "timeout"
    return exc.error_type if isinstance(exc, FarmError) else "render_error"
