"""The worker side: the Celery app with its task bodies, and the GPU worker process that serves a pool.

May import ``farm``, ``db`` and ``models``; nothing outside the CLI (``farm.commands``) imports it.
"""
