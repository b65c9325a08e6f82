"""Checking the webhooks the orchestrator sends, per Standard Webhooks
(https://www.standardwebhooks.com): `webhook-signature` is `v1,<base64 HMAC-SHA256>` of
`{webhook-id}.{webhook-timestamp}.{body}`, keyed by the base64 part of your key's `whsec_` secret.

The signature itself is `protocol.webhooks`, the same code the orchestrator signs with."""

from __future__ import annotations

import json
from collections.abc import Mapping

from dippy_studio.client.errors import WebhookVerificationError
from dippy_studio.client.models import WebhookEvent
from dippy_studio.protocol import webhooks
from dippy_studio.protocol.webhooks import DEFAULT_TOLERANCE_S, verify


def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> WebhookEvent:
    """The event a webhook carries, once its signature and timestamp check out; else
    `WebhookVerificationError`. Pass the body exactly as received (bytes, before any JSON parsing).

        from dippy_studio.client import verify_webhook

        @app.post("/hooks/dippy")  # e.g. FastAPI
        async def hook(request: Request):
            event = verify_webhook(WEBHOOK_SECRET, request.headers, await request.body())
            if event.type == "request.succeeded":
                save(event.data.id, event.data.result.url)
    """
    try:
        verify(secret, headers, body, tolerance_s=tolerance_s, now=now)
    except webhooks.WebhookVerificationError as exc:
        raise WebhookVerificationError(str(exc)) from None
    try:
        return WebhookEvent.model_validate(json.loads(body))
    except ValueError as exc:
        raise WebhookVerificationError(f"the signed body is not a webhook event: {exc}") from None
