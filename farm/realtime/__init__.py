"""Realtime frames: fal's websocket protocol (``wss://{run host}/{app}/realtime``), import-light.

A frame travels API → Redis list of the model's realtime lane → a worker of the pool (which takes
frames ahead of its batches) → the API process's reply channel → the client. No job row, no upload:
the images ride inline in the reply. ``wire`` holds the wire format, ``lane`` the Redis names
and envelopes, ``tokens`` the short-lived tokens of ``POST /tokens/``.
"""
