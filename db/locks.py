"""Ledger locks: an owner's lock, held until the transaction ends (PostgreSQL advisory locks)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session


def lock_owner(s: Session, owner: str) -> None:
    """Hold the owner's lock until the transaction ends, so that in-flight counts and the rows they
    admit are one step: concurrent submits of one owner are admitted one at a time. PostgreSQL: a
    transaction-scoped advisory lock on the owner's name (a hash collision only serialises two
    owners); SQLite already serialises writing transactions (the job insert holds its write lock)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(hashtext('farm.owner:' || :owner))"), {"owner": owner})
