"""Every metric the farm exports. Labels: ``model`` is the model's queue key (``tiny-lcm``, ``sd15``,
``sdxl``: as in the queue names), ``owner`` the tenant, ``lane`` realtime|sync|queue|bulk.

Import this module only after :func:`farm.metrics.exposition.setup` (or where multiprocess mode is
not wanted): prometheus-client picks its value store when first imported.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# API (farm.metrics.http)
HTTP_REQUESTS = Counter("farm_http_requests_total", "HTTP requests answered, by route template and status",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("farm_http_request_duration_seconds",
                         "Time from request to response headers, by route template", ["method", "route"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
REALTIME_WAITING = Gauge("farm_realtime_frames_waiting", "Realtime frames the API waits a worker's reply for "
                         "(farm.api.realtime_hub)", multiprocess_mode="livesum")

# workers (farm.lifecycle.store, tasks.render_batch, tasks.loaded_model)
IMAGES = Counter("farm_images_total", "Images stored, by model and owner", ["model", "owner"])
GPU_SECONDS = Counter("farm_gpu_seconds_total",
                      "Render seconds of stored images, by model and owner (a shared GPU batch split by image)",
                      ["model", "owner"])
RENDER_SECONDS = Histogram("farm_render_seconds", "Render time of one GPU batch", ["model"],
                           buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128))
BATCH_SIZE = Histogram("farm_batch_size", "Images in one GPU batch", ["model"],
                       buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128))
MODEL_LOADS = Counter("farm_model_loads_total", "Model pipelines loaded by worker processes", ["model", "device"])
MODEL_LOAD_SECONDS = Histogram("farm_model_load_seconds", "Time to load and warm a model", ["model"],
                               buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320))
CLAIMS_LOST = Counter("farm_claims_lost_total",
                      "Batches a worker rendered or held but could not store: taken over or closed meanwhile",
                      ["model"])
GPU_MEMORY = Gauge("farm_gpu_memory_bytes", "GPU memory of a worker's device (kind: allocated, reserved, total)",
                   ["model", "device", "kind"], multiprocess_mode="livemostrecent")
WORKER_INFO = Gauge("farm_worker_info", "1 per live worker process: its name, model and device",
                    ["name", "model", "device"], multiprocess_mode="livemostrecent")

# any process that ends jobs, sweeps or delivers webhooks
JOBS_FINISHED = Counter("farm_jobs_finished_total", "Jobs that ended, by final status", ["status"])
LEASE_TAKEOVERS = Counter("farm_lease_takeovers_total",
                          "Claimed batches whose lease ran out, taken back by a sweeper (for another worker)",
                          ["model"])
WEBHOOK_ATTEMPTS = Counter("farm_webhook_attempts_total",
                           "Webhook delivery attempts by outcome: delivered, retry (failed, tried again later), "
                           "failed (gave up), gone (410)", ["outcome"])

# read from the ledger at scrape time (farm.metrics.ledger_gauges); listed here so that the names are in one place
LEDGER_GAUGES = {
    "farm_queue_depth": "Queued batches, by model and lane",
    "farm_queue_oldest_age_seconds": "Age of the oldest queued batch, by model and lane",
    "farm_batches_running": "Claimed (rendering or storing) batches, by model",
    "farm_jobs": "Jobs not yet ended, by status (IN_QUEUE, IN_PROGRESS)",
    "farm_live_workers": "Workers that beat within the lease, by model",
    "farm_model_unserved": "1 for a model with queued work and no live worker, 0 for one with queued work "
                           "or live workers",
    "farm_webhook_outbox_depth": "Webhook deliveries waiting (pending)",
    "farm_webhook_outbox_oldest_age_seconds": "Age of the oldest pending webhook delivery",
    "farm_ledger_up": "1 if the last ledger read for these gauges succeeded",
}

# only a worker on a CUDA device sets these (a CPU worker has no GPU memory to report)
GPU_ONLY = {"farm_gpu_memory_bytes"}
