"""The fal-compatible HTTP API (FastAPI)."""
