"""Prometheus metrics (prometheus-client): what the farm counts, and where it is scraped.

* :mod:`farm.metrics.defs`: every metric of the farm, by name (the dashboard queries these).
* :mod:`farm.metrics.exposition`: the multiprocess registry, the text a scrape gets, and the
  worker's exporter (``FARM_METRICS_PORT``).
* :mod:`farm.metrics.ledger_gauges`: gauges read from the ledger when the API is scraped (queue depth
  and age per model and lane, jobs by status, live workers, unserved models, webhook outbox).
* :mod:`farm.metrics.http`: the API's request counter and latency, its ``GET /metrics``, and
  ``GET /metrics/targets`` (each live worker's exporter, for Prometheus service discovery).

Counters and histograms live in prometheus-client's multiprocess mode when
``PROMETHEUS_MULTIPROC_DIR`` is set (``farm worker`` and ``farm api`` set it to a fresh folder of
their own before anything imports prometheus-client): Celery's prefork pool child and uvicorn's
worker processes write their values there, and the one exporter sums them, so a pool child that
is restarted loses no count.
"""
