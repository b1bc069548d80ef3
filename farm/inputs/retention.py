"""Stored inputs go when the last live job that refers to them ends.

The farm's copies of a job's inputs (``<owner>/inputs/<sha256>.<ext>``: data URIs, fetched URLs and hub
files, bulk source images) count against the owner's ``upload_quota_bytes``; left for good, they would
lock an owner out of its quota. :func:`release` runs after the transaction that ended the jobs commits
(``farm.lifecycle.finish``): for each ``farm-stored:`` key of theirs under ``<owner>/inputs/`` that no
queued or running job of the owner names any more, it deletes the blob and stops counting it.

It works under the owner's storage lock, the lock :func:`farm.inputs.staging.held` stores a submit's
blobs under and holds until the submit's jobs are recorded: a concurrent submit of the same bytes either
committed its job first (its input names the key: the blob stays), or takes the lock after and finds the
blob gone and stores it again. A fetch (``farm.lifecycle.fetch``) checks its blobs under the same lock
when it records them. Never the owner's own uploads (``<owner>/uploads/``): those go by ``DELETE``.

Best effort: a failure is logged once and the blob stays (counted, and used again by the same bytes).
One query by primary key for the ended jobs, then one bounded look per key at the owner's live jobs;
no LIST of storage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from farm.config import Settings
from farm.inputs.quota import delete_held, listed
from farm.inputs.refs import STORED

log = logging.getLogger(__name__)


def stored_keys(value: Any) -> Iterator[str]:
    """The ``farm-stored:`` keys anywhere in a job's input JSON."""
    if isinstance(value, str):
        if value.startswith(STORED):
            yield value.removeprefix(STORED)
    elif isinstance(value, dict):
        for item in value.values():
            yield from stored_keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from stored_keys(item)


def release(job_ids: Sequence[str], settings: Settings) -> None:
    """Delete the stored inputs of the ended ``job_ids`` that no live job of their owner names."""
    from sqlalchemy import Text, cast, select

    from db.models import Job
    from db.session import session_scope

    if not job_ids:
        return
    with session_scope() as s:
        rows = s.execute(select(Job.owner, Job.input).where(
            Job.id.in_(list(job_ids)), cast(Job.input, Text).contains(STORED, autoescape=True))).all()
    held: dict[str, set[str]] = {}
    for owner, inp in rows:
        held.setdefault(owner, set()).update(k for k in stored_keys(inp) if k.startswith(f"{owner}/inputs/"))
    for owner, keys in held.items():
        try:
            deleted = _release_owner(owner, sorted(keys), settings)
        except Exception as exc:  # the blobs stay, counted; the next job of these bytes that ends tries again
            log.warning("stored inputs of %s not released: %s", owner, exc)
        else:
            log.debug("released %d stored input(s) of %s", deleted, owner)


def _release_owner(owner: str, keys: list[str], settings: Settings) -> int:
    from sqlalchemy import Text, cast, select

    from db import storage_usage
    from db.models import Job
    from db.session import session_scope
    from farm.status import ACTIVE
    from farm.storage import get_storage

    storage = get_storage(settings)
    deleted = 0
    with session_scope() as s:
        storage_usage.hold(s, owner, lambda: listed(storage, owner))  # until the deletes are counted
        for key in keys:
            live = s.scalar(select(Job.id).where(
                Job.owner == owner, Job.status.in_(ACTIVE),
                cast(Job.input, Text).contains(f'"{STORED}{key}"', autoescape=True)).limit(1))
            if live is None:
                delete_held(s, storage, owner, key)
                deleted += 1
    return deleted
