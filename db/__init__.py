"""The PostgreSQL ledger (SQLAlchemy 2; SQLite for a single host): tables, sessions, migrations,
and every guarded status change of jobs, batches, workers and bulk jobs.

May import ``farm.config``, ``farm.status``, ``farm.errors`` and ``farm.events`` (change notices) only:
the ledger knows no HTTP, Celery or models.
"""
