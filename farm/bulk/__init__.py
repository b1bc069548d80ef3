"""Bulk dataset generation: manifests in, sharded datasets out."""
