"""Bulk dataset generation: manifests in, sharded datasets out (the driver, manifests, writers, options).

May import ``farm`` (not ``farm.api``), ``db`` and the ``bulk`` extra's pyarrow lazily; never ``tasks``.
"""
