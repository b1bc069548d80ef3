"""``farm api``: the fal-compatible HTTP API (uvicorn), over TLS when given a certificate."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from farm.config import get_settings
from farm.errors import FarmError

log = logging.getLogger("farm.api")


@click.command()
@click.option("--host", default=None, help="Interface to listen on (default: FARM_API_HOST, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: FARM_API_PORT, 8000).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PEM certificate (chain): serve HTTPS (default: FARM_TLS_CERT).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="PEM private key of --tls-cert (default: FARM_TLS_KEY).")
@click.option("--workers", type=int, default=1, show_default=True, help="Server processes.")
@click.option("--log-level", "log_level", default=None, help="Server log level (default: FARM_LOG_LEVEL).")
def api(
    host: str | None, port: int | None, tls_cert: Path | None, tls_key: Path | None, workers: int,
    log_level: str | None,
) -> None:  # fmt: skip
    """Serve fal's queue and run APIs for fal-ai/fast-lcm-diffusion (see the README)."""
    import uvicorn

    settings = get_settings()
    if settings.embedded:
        raise FarmError(
            "farm api needs FARM_BROKER_URL (redis://…) so that `farm worker` processes can take its jobs; "
            "with no broker configured, use `farm generate`"
        )
    cert = tls_cert or settings.tls_cert
    key = tls_key or settings.tls_key
    if (cert is None) != (key is None):
        raise click.UsageError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
    from farm.metrics import exposition

    exposition.setup("api")  # every server process writes there; GET /metrics on any of them sums them
    host = host or settings.api_host
    port = port or settings.api_port
    scheme = "https" if cert else "http"
    click.echo(f"farm api on {scheme}://{host}:{port} (queue at / and /queue, run at /run)", err=True)
    if not cert:
        click.echo("warning: no TLS certificate: fal_client only speaks https", err=True)
    uvicorn.run(
        "farm.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        ssl_certfile=str(cert) if cert else None,
        ssl_keyfile=str(key) if key else None,
        log_level=(log_level or settings.log_level).lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        ws_max_size=settings.realtime_max_frame_bytes,  # a bigger frame closes 1009 before it is read whole
    )
