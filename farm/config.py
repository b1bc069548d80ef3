"""Settings in one typed object (pydantic-settings, prefix ``FARM_``, optional ``.env``).

With nothing set, everything runs embedded: a SQLite ledger and local outputs under
``data_dir`` and a real Celery worker in-process on an in-memory broker.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "lcm-farm"


SIZE = re.compile(r"^(\d+)x(\d+)$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FARM_", env_file=".env", extra="ignore")

    # Where things live. Empty means embedded.
    broker_url: str | None = Field(None, description="Celery broker (redis://…); empty: in-process broker")
    result_backend: str | None = Field(None, description="Celery result backend; default: the broker URL")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the ledger; default SQLite")
    storage_url: str | None = Field(None, description="file:///path or s3://bucket/prefix")
    s3_endpoint: str | None = Field(None, description="host:port or http(s)://host:port of the S3 server")
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"
    s3_secure: bool | None = Field(None, description="TLS to the S3 server; default from the endpoint scheme")
    s3_public_endpoint: str | None = Field(
        None, description="http(s)://host:port that clients (browsers, SDKs) reach the S3 server at, when it differs "
        "from s3_endpoint (e.g. http://minio:9000 inside Compose): presigned result and upload URLs name it; "
        "default: s3_endpoint"
    )
    data_dir: Path = Field(default_factory=_default_data_dir)
    model_dir: Path | None = Field(None, description="Folder of model weights in diffusers layout")
    files_root: Path | None = Field(None, description="Allowed root for local LoRA/embedding files")
    extra_models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="JSON: extra model names (e.g. LCM-distilled checkpoints)"
    )

    # Request bounds.
    min_image_side: int = 64
    max_image_side: int = 2048
    max_num_images: int = 64
    max_inference_steps: int = 50
    max_guidance_scale: float = 20.0
    max_prompt_chars: int = 4000
    max_loras: int = 4
    max_embeddings: int = 4
    max_input_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Most pixels (width x height) of an input image or mask, read from its "
        "header before any pixel is decoded: a bigger one (a decompression bomb) is refused"
    )

    # Results.
    presign_expiry_seconds: int = 3600
    default_owner: str = "local"

    # Workers.
    batch_size: int = Field(
        0, ge=0, description="Most images per batch; 0: the model's maximum, on CUDA found from free memory"
    )
    lease_seconds: float = Field(
        30.0, gt=0, description="A claimed batch whose worker stops beating for this long goes back to the pool"
    )
    batch_wait_ms: float = Field(
        15.0, ge=0, description="Longest wait for companion requests to share a GPU batch; 0: no cross-request batching"
    )
    batch_retries: int = Field(2, ge=0, description="Retries of a failed batch before its job fails")
    pipeline_depth: int = Field(
        2, ge=0, description="Rendered batches stored at once (one uploader thread each), and as many more that "
        "may wait, while the next one renders; 0: store inline"
    )
    upload_concurrency: int = Field(8, ge=1, description="Images of one batch encoded and uploaded at once")
    pull_seconds: float = Field(
        10.0, ge=0, description="How long a worker keeps pulling queued batches from the ledger (claiming the next "
        "while the current one renders) before it goes back to its messages; 0: one batch per message"
    )
    sweep_seconds: float = Field(
        2.0, gt=0, description="How often each worker and API process sweeps: expired leases back to queued, "
        "queued batches whose message may be lost published again"
    )
    dispatch_timeout: float = Field(
        30.0, gt=0, description="A queued batch unclaimed this long after its last message, on an empty queue, "
        "is published again"
    )
    require_live_worker: bool = Field(
        False, description="Refuse (503, naming the model) a submit for a model that no live worker serves; "
        "default: accept it, log why it waits, and let it wait for a worker to join"
    )
    fault_kill_prompt: str | None = Field(
        None, description="TEST-ONLY fault hook: a worker SIGKILLs itself when it starts rendering this prompt"
    )
    task_time_limit: int = Field(1800, description="Hard time limit of one render task, seconds")
    visibility_timeout: int = Field(3600, description="Redis visibility timeout, seconds")
    publish_timeout: float = Field(5.0, description="Longest a submit waits on the broker, seconds")
    event_fallback_seconds: float = Field(
        0.5, gt=0, description="Waiters re-read the ledger at least this often, even without a job-change event"
    )
    safety_checker_v1: str = "CompVis/stable-diffusion-safety-checker"
    safety_checker_v2: str = "Falconsai/nsfw_image_detection"
    hold_ms: int = Field(
        50, ge=0, description="farm/hold (a scheduling stand-in, not a model): milliseconds held per image"
    )
    dispatch_queue: str = Field("celery", description="Queue of plain farm.generate tasks")
    bulk_queue: str = Field("farm.bulk", description="Queue of farm.bulk tasks (served by `farm bulk worker`)")
    bulk_s3_url: str | None = Field(
        None, description="s3://bucket/prefix under which POST /bulk writes datasets (<prefix>/<owner>/<out>); "
        "unset: under the bulk root"
    )
    bulk_root: Path | None = Field(
        None, description="Where API and Celery bulk jobs may read manifests and write local datasets; "
        "default <data_dir>/bulk"
    )
    ledger_session_timeout: float = Field(
        10.0, ge=0, description="PostgreSQL: a ledger session idle inside a transaction, or whose data goes "
        "unacknowledged (its host cut off), this many seconds is ended by the server, so its row locks never stall "
        "the rest of the pool; the client also gives up on a dead connection after it. 0: the server's defaults"
    )
    log_level: str = "INFO"

    # GPU speed (models.speed; README "Real models on GPUs"). Off by default: a CPU worker does what it always did.
    compile: Literal["none", "unet", "unet+vae"] = Field(
        "none", description="torch.compile the UNet (and the VAE decoder) at worker start, warming each "
        "FARM_WARM_SIZES size; shapes not warmed then run uncompiled, never recompile"
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = Field(
        "default", description="torch.compile mode (inductor): reduce-overhead adds CUDA graphs; max-autotune "
        "searches kernels (minutes of warm-up)"
    )
    compile_backend: str = Field("inductor", description="torch.compile backend (`eager`: trace only, for tests)")
    warm_sizes: list[str] = Field(
        default_factory=list, description="JSON list of WIDTHxHEIGHT sizes compiled and warmed at worker start "
        "(with FARM_COMPILE); empty: the model's default size"
    )
    warm_batches: list[int] = Field(
        default_factory=lambda: [0, 1], description="JSON list of batch sizes warmed per size (0: the worker's "
        "full batch)"
    )
    fuse_qkv: bool = Field(
        False, description="Fuse each UNet attention's Q/K/V projections into one matmul (a request with LoRAs "
        "renders unfused)"
    )
    tiny_decoder: str = Field(
        "", description="OPT-IN, CHANGES IMAGES: decode with a tiny autoencoder (TAESD architecture): `auto` "
        "(madebyollin/taesd, or madebyollin/taesdxl for SDXL) or a repo id/folder; empty: the model's VAE"
    )

    # Flower (`farm flower`).
    flower_user: str = Field("admin", description="Basic-auth user of `farm flower`")
    flower_password: str = Field("", description="Basic-auth password of `farm flower`; empty: refuse to start")

    # HTTP API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    tls_cert: Path | None = Field(None, description="PEM certificate: serve HTTPS")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    public_url: str | None = Field(None, description="Base URL clients reach the API at (for response_url …)")
    auth_enabled: bool = Field(True, description="Require `Authorization: Key …`; off only when set false")
    max_jobs_in_flight: int = Field(100, description="Per owner: queued + running jobs (a key may set less)")
    file_input_max_bytes: int = Field(64 * 2**20, description="Largest LoRA/embedding URL or data URI input")
    input_cache_max_bytes: int = Field(
        2 * 2**30, ge=0, description="Per host and data_dir: bytes the local cache of file inputs (<data_dir>/inputs) "
        "may hold; past it the least recently used files are deleted (the one in use stays)"
    )
    max_upload_bytes: int = Field(64 * 2**20, ge=1, description="Largest file one upload may store")
    upload_quota_bytes: int = Field(
        1 * 2**30, ge=0, description="Per owner: bytes all their uploads may hold together (0: no uploads)"
    )
    upload_url_expiry_seconds: int = Field(
        900, ge=1, le=7 * 86400, description="How long an upload_url from POST /storage/upload/initiate is valid"
    )
    upload_signing_key: str | None = Field(
        None, description="Secret that signs upload URLs (every storage); unset: a random key kept under data_dir "
        "(give every API process the same one)"
    )

    # Realtime (websocket frames, /{app}/realtime).
    realtime_max_buffering: int = Field(
        2, ge=1, le=60, description="Frames a realtime connection keeps waiting when the client sends none of "
        "max_buffering (latest wins: the oldest waiting frame is dropped)"
    )
    realtime_frame_timeout: float = Field(
        10.0, gt=0, description="A realtime frame no worker answered within this many seconds gets an error frame"
    )
    realtime_max_connections: int = Field(
        8, ge=1, description="Per owner: open realtime connections, across API processes (a key's max in flight "
        "caps it further)"
    )
    realtime_max_images: int = Field(4, ge=1, description="num_images of one realtime frame")
    realtime_usage_seconds: float = Field(
        5.0, gt=0, description="How often a realtime connection adds its frames and GPU seconds to the usage ledger"
    )
    realtime_token_secret: str | None = Field(
        None, description="HMAC secret of realtime tokens (POST /tokens/); default: made once under data_dir. "
        "API processes on several hosts must share it"
    )
    realtime_token_max_seconds: int = Field(3600, ge=1, description="Longest token_expiration of POST /tokens/")
    realtime_max_frame_bytes: int = Field(
        2 * 2**20, ge=1024, description="Largest realtime frame (one websocket message): a bigger one closes the "
        "socket with 1009 naming the limit (`farm api` gives it to uvicorn: the frame is never read whole)"
    )
    realtime_buffering_cap: int = Field(8, ge=1, le=60, description="Largest max_buffering a realtime client may ask")
    realtime_owner_max_bytes: int = Field(
        32 * 2**20, ge=1024, description="Per owner and API process: bytes of the realtime frames waiting or at a "
        "worker; past it a connection's oldest waiting frames go first, then new frames get an error frame"
    )
    # File inputs (LoRA / embedding URLs, hub ids, data URIs): fetched before any GPU worker sees them.
    inline_input_max_bytes: int = Field(
        16 * 2**20, ge=0, description="Per request: decoded bytes of all its data: URI inputs together"
    )
    input_fetch_deadline_seconds: float = Field(
        120.0, gt=0, description="Wall-clock deadline of one URL / hub input download, whole download "
        "(not per read); past it the job fails naming the field"
    )
    input_fetches_per_owner: int = Field(2, ge=1, description="Jobs of one owner whose inputs are fetched at once")
    input_fetch_threads: int = Field(4, ge=1, description="Input fetches at once per process (API, worker)")
    sync_inline_max_bytes: int = Field(
        8 * 2**20, ge=0, description="sync_mode: most image bytes of one result or webhook sent inline as "
        "data URIs; beyond it the images are given as URLs"
    )
    # Metrics and usage.
    metrics_port: int = Field(
        9808, ge=0, le=65535, description="Port of a worker's Prometheus exporter (GET /metrics); 0: none. The API "
        "serves GET /metrics on its own port"
    )
    metrics_host: str = Field("0.0.0.0", description="Interface of a worker's Prometheus exporter")
    metrics_token: str | None = Field(
        None, description="Every /metrics endpoint (API and workers) needs `Authorization: Bearer <token>`; unset: "
        "they answer 401 unless FARM_METRICS_OPEN"
    )
    metrics_open: bool = Field(
        False, description="true and no FARM_METRICS_TOKEN: /metrics (API and workers) answer anyone (they name "
        "owners: a private network only)"
    )
    daily_gpu_seconds: float = Field(
        0.0, ge=0, description="Per owner: GPU-seconds a day (UTC) after which new HTTP requests get 429; 0: no quota"
    )
    owner_daily_gpu_seconds: dict[str, float] = Field(
        default_factory=dict, description="JSON {owner: GPU-seconds a day}: quotas per owner, over "
        "FARM_DAILY_GPU_SECONDS (0: none for that owner)"
    )
    max_body_bytes: int = Field(
        2 * 2**20, ge=1024, description="Largest request body of every route but uploads (checked before reading)"
    )
    max_streams_per_owner: int = Field(16, ge=1, description="Per owner: status streams (SSE) open at once")
    max_bulk_running: int = Field(2, ge=1, description="Per owner: bulk jobs running at once over HTTP")
    max_bulk_images: int = Field(
        1_000_000, ge=1, description="Largest image budget of a bulk job started over HTTP (budget_images)"
    )
    bulk_max_manifest_rows: int = Field(1_000_000, ge=1, description="Most rows a bulk manifest may have")
    bulk_max_line_bytes: int = Field(64 * 2**10, ge=1024, description="Longest line of a .txt/.jsonl manifest")
    bulk_max_template_chars: int = Field(
        4096, ge=1, description="Longest prompt template of a manifest row (checked before it is expanded)"
    )
    bulk_max_samples_per_row: int = Field(
        10_000, ge=1, description="Most samples one manifest row may expand to (prompts × images_per_prompt)"
    )
    bulk_max_parquet_row_group_bytes: int = Field(
        64 * 2**20, ge=1, description="Largest row group (uncompressed, from its metadata) of a Parquet manifest"
    )
    bulk_max_attempts: int = Field(
        3, ge=1, description="Runs of a bulk job that may end in an unexpected error before it is FAILED"
    )

    # Webhooks.
    webhook_allowlist: list[str] = Field(
        default_factory=list, description="Hosts or CIDRs a webhook/file URL may reach although internal"
    )
    webhook_max_attempts: int = 10
    webhook_backoff_seconds: float = Field(1.0, description="First retry delay; doubles, with jitter")
    webhook_backoff_max_seconds: float = 600.0
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, description="Wall-clock deadline of one delivery attempt (connect, send, answer, redirects)"
    )
    webhook_deliveries_per_owner: int = Field(2, ge=1, description="Webhooks of one owner in flight at once")
    webhook_concurrency: int = Field(8, ge=1, description="Webhook attempts in flight at once per API process")
    webhook_poll_seconds: float = Field(0.5, description="How often the outbox is polled")
    webhook_key_path: Path | None = Field(None, description="ED25519 signing key (PEM); default under data_dir")
    dns_servers: list[str] = Field(
        default_factory=list, description="JSON list of name servers (`ip` or `ip:port`) for the URLs the farm "
        "reaches (webhooks, file inputs); empty: the system's (/etc/resolv.conf, /etc/hosts)"
    )
    dns_timeout_seconds: float = Field(
        5.0, gt=0, description="Most time one host name lookup may take where its request gives no shorter deadline"
    )

    @field_validator("warm_sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            match = SIZE.match(size.strip().lower())
            if not match or int(match[1]) % 8 or int(match[2]) % 8:
                raise ValueError(f"{size!r}: sizes are WIDTHxHEIGHT, multiples of 8 (e.g. 1024x1024)")
        return sizes

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.task_time_limit >= self.visibility_timeout:
            raise ValueError(
                f"task_time_limit ({self.task_time_limit}s) must be below visibility_timeout "
                f"({self.visibility_timeout}s), or a long task is delivered twice"
            )
        if not 8 <= self.min_image_side <= self.max_image_side:
            raise ValueError("need 8 <= min_image_side <= max_image_side")
        return self

    # Derived values.
    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def effective_broker_url(self) -> str:
        # the in-process broker; "localhost" names it for kombu, which otherwise warns on every
        # connection that "no hostname was supplied" (the memory transport ignores the host)
        return self.broker_url or "memory://localhost"

    @property
    def effective_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        return self.broker_url or "cache+memory://"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'ledger.db'}"

    @property
    def effective_storage_url(self) -> str:
        return self.storage_url or (self.data_dir / "outputs").resolve().as_uri()

    @property
    def effective_files_root(self) -> Path:
        return (self.files_root or self.data_dir / "files").resolve()

    @property
    def effective_bulk_root(self) -> Path:
        return (self.bulk_root or self.data_dir / "bulk").resolve()

    @property
    def warm_size_list(self) -> list[tuple[int, int]]:
        """FARM_WARM_SIZES as (width, height) pairs."""
        pairs = [SIZE.match(size.strip().lower()) for size in self.warm_sizes]
        return [(int(m[1]), int(m[2])) for m in pairs if m]

    @property
    def builtin_model_dir(self) -> Path:
        """Where built-in tiny weights are written (diffusers layout)."""
        return self.data_dir / "builtin"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and CLI options that change the environment)."""
    get_settings.cache_clear()
