"""Python client of a farm's fal-compatible HTTP API, sync and async.

    from farm.client import SyncClient
    with SyncClient("https://farm.example:8443", key="...") as farm:
        out = farm.subscribe({"model_name": "farm/tiny-lcm", "prompt": "a red fox"},
                             on_queue_update=print)

Import-light: httpx and pydantic, never torch, diffusers or celery.
"""

from farm.client._async import AsyncClient, AsyncRequestHandle
from farm.client._common import DEFAULT_APP, Completed, InProgress, Queued, Status
from farm.client._errors import FarmClientError, FarmTimeoutError, RequestFailedError
from farm.client._realtime import AsyncRealtimeConnection, RealtimeConnection, RealtimeError
from farm.client._sync import SyncClient, SyncRequestHandle
from farm.schemas import GenerateInput, GenerateOutput

__all__ = [
    "DEFAULT_APP",
    "AsyncClient",
    "AsyncRealtimeConnection",
    "AsyncRequestHandle",
    "Completed",
    "FarmClientError",
    "FarmTimeoutError",
    "GenerateInput",
    "GenerateOutput",
    "InProgress",
    "Queued",
    "RealtimeConnection",
    "RealtimeError",
    "RequestFailedError",
    "Status",
    "SyncClient",
    "SyncRequestHandle",
]
