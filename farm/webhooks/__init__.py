"""Signed webhooks (Ed25519, fal's headers) delivered from a ledger outbox by the API's dispatcher.

May import ``farm`` (not ``farm.api``) and ``db``.
"""
