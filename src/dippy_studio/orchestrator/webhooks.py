"""Webhooks to clients, signed per Standard Webhooks (https://www.standardwebhooks.com) and
retried with exponential backoff.

Each finished request with a `webhook_url` gets one event: `request.succeeded`,
`request.failed` or `request.canceled`, whose `data` is the request's status (what
`GET /v1/requests/{id}` returns). Headers:

    webhook-id:        msg_<request id>   (the same on every retry: receivers deduplicate on it)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">

keyed by the base64-decoded part of the API key's `whsec_` secret.

Delivery state lives in the jobs table (`webhook_state`, `webhook_attempts`, `webhook_next_at`,
`webhook_error`), so retries survive restarts. Taking a delivery pushes `webhook_next_at` forward
by a lease first (rows locked with SKIP LOCKED on PostgreSQL), so replicas do not send it twice
at once; a replica that dies mid-delivery leaves it to be retried when the lease ends (the
queries are `Store.take_due_webhooks` and `Store.record_webhook`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import httpx

from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store
from dippy_studio.protocol.outbound import OutboundError, check_url, guarded_client
from dippy_studio.protocol.webhooks import headers_for

log = logging.getLogger("dippy_studio.orchestrator.webhooks")

DELIVERY_THREADS = 4
BATCH = 32


class WebhookSender:
    def __init__(
        self,
        store: Store,
        settings: OrchestratorSettings,
        render: Callable[[Job], dict[str, Any]],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.settings = settings
        self.render = render
        self.clock = clock
        self.url_policy = settings.url_policy
        self._http = guarded_client(self.url_policy, timeout=settings.webhook_timeout_s)
        self._pool = ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix="webhook")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def deliver_due(self) -> int:
        """Send every delivery that is due (in parallel, waiting for them); returns how many were tried."""
        jobs = self._take_due(BATCH)
        list(self._pool.map(self._deliver, jobs))
        return len(jobs)

    def _take_due(self, limit: int) -> list[Job]:
        lease = timedelta(seconds=self.settings.webhook_timeout_s * 2 + 5)
        return self.store.take_due_webhooks(limit, lease, now=self.clock())

    def _deliver(self, job: Job) -> None:
        try:
            outcome = self._send(job)
        except Exception as exc:  # a bug must not lose the delivery: record it and retry later
            log.exception("webhook for %s crashed", job.id)
            outcome = (False, f"internal error: {type(exc).__name__}", True)
        delivered, error, retry = outcome
        attempts = job.webhook_attempts + 1
        now = self.clock()
        state, next_at = "pending", None
        if delivered:
            state = "delivered"
        elif not retry or attempts >= self.settings.webhook_attempts:
            log.warning("webhook for %s failed for good after %d attempts: %s", job.id, attempts, error)
            state = "failed"
        else:
            delay = min(self.settings.webhook_backoff_s * 2 ** (attempts - 1), self.settings.webhook_max_backoff_s)
            next_at = now + timedelta(seconds=delay)
            log.info("webhook for %s failed (%s); retrying in %.1fs", job.id, error, delay)
        self.store.record_webhook(job.id, attempts=attempts, state=state, error=error, next_at=next_at)

    def _send(self, job: Job) -> tuple[bool, str | None, bool]:
        """(delivered, error, worth retrying)."""
        if not job.webhook_url:
            return False, "no webhook_url", False
        key = self.store.get_api_key(job.api_key_id)
        if key is None:
            return False, "the API key is gone", False
        try:
            # Checked again at delivery: the name may resolve elsewhere now than at submission.
            check_url(job.webhook_url, self.url_policy)
        except OutboundError as exc:
            return False, str(exc), False
        payload = {"type": f"request.{job.status}", "timestamp": self.clock().isoformat(), "data": self.render(job)}
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = headers_for(key.webhook_secret, f"msg_{job.id}", body)
        try:
            # Streamed and left unread: the status is the answer, and a receiver's body (endless,
            # or trickled within each read timeout) must not hold memory or a delivery thread.
            with self._http.stream("POST", job.webhook_url, content=body, headers=headers) as response:
                status = response.status_code
        except OutboundError as exc:  # the name resolves elsewhere now (DNS rebinding)
            return False, str(exc), False
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}"[:500], True
        if 200 <= status < 300:
            return True, None, False
        # 410 Gone: the receiver says this endpoint will never take it (Standard Webhooks' advice).
        return False, f"HTTP {status}", status != 410
