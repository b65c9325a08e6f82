"""A Python client for a Dippy Studio orchestrator's API, sync (`Client`) and asyncio (`AsyncClient`).

    from dippy_studio.client import Client

    with Client("http://127.0.0.1:8090", "dsk_...") as client:
        request = client.submit("a lighthouse at dusk", width=256, height=256, wait=60)
        client.download(request, "lighthouse.png")

Submit text-to-image, edit, img2img and inpaint requests (input images from a path, bytes or a
URL), wait for them or stream their live events, download results, cancel, list with paging,
train LoRAs from a folder or zip, and check webhooks (`verify_webhook`). Refusals raise
`ApiError` subclasses with the server's reason; 429 and 503 are retried after Retry-After.
Only httpx and pydantic: nothing of the services is imported.
"""

from dippy_studio.client._wire import ImageOptions, TrainingOptions
from dippy_studio.client.aio import AsyncClient
from dippy_studio.client.errors import (
    ApiError,
    AuthenticationError,
    Conflict,
    DippyError,
    IntegrityError,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RateLimited,
    WaitTimeout,
    WebhookVerificationError,
)
from dippy_studio.client.models import Event, Lora, Model, Progress, Request, Result, Status, WebhookEvent
from dippy_studio.client.settings import ClientSettings
from dippy_studio.client.sync import Client
from dippy_studio.client.webhooks import verify_webhook

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "ClientSettings",
    "Conflict",
    "DippyError",
    "Event",
    "ImageOptions",
    "IntegrityError",
    "InvalidRequest",
    "Lora",
    "Model",
    "NotFound",
    "Progress",
    "QuotaExceeded",
    "RateLimited",
    "Request",
    "Result",
    "Status",
    "TrainingOptions",
    "WaitTimeout",
    "WebhookEvent",
    "WebhookVerificationError",
    "verify_webhook",
]
