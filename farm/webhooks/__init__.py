"""Signed webhooks delivered from a ledger outbox."""
