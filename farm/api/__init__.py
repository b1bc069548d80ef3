"""The fal-compatible HTTP API (FastAPI): queue, run, stream, uploads, realtime websocket, bulk, usage,
metrics and the playground.

Imported only by ``farm.commands`` (``farm api``); may import the rest of ``farm``, ``db`` and
``models.registry``, never ``tasks``.
"""
