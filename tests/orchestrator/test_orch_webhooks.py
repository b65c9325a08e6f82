"""Webhooks to clients: Standard Webhooks signatures, retries with backoff, giving up, leases."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

import miner_kit
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store, job_row
from dippy_studio.orchestrator.webhooks import WebhookSender
from dippy_studio.protocol.webhooks import WebhookVerificationError, headers_for, sign, verify
from orchestrator.orch_kit import Served

server = miner_kit.server  # fixture: a loopback receiver


def standard_webhooks_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """An independent receiver-side check, written from the Standard Webhooks spec."""
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(sig.split(",", 1)[1] == expected for sig in headers["webhook-signature"].split())


def test_signature_matches_the_specs_test_vector():
    # From the Standard Webhooks reference libraries' tests.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def test_verify_accepts_our_headers_and_refuses_tampering_and_old_timestamps():
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body = b'{"type":"request.succeeded"}'
    headers = headers_for(secret, "msg_req_1", body, now=1_000_000)
    verify(secret, headers, body, now=1_000_010)
    assert standard_webhooks_verify(secret, headers, body)
    with pytest.raises(WebhookVerificationError, match="no webhook signature"):
        verify(secret, headers, body + b" ", now=1_000_010)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, headers, body, now=1_000_000 + 3600)
    with pytest.raises(WebhookVerificationError, match="malformed"):
        verify(secret, {}, body)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def setup(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'o.sqlite'}")
    settings = OrchestratorSettings(
        data_dir=tmp_path, allow_loopback_urls=True, webhook_attempts=3, webhook_backoff_s=2.0, webhook_timeout_s=5
    )
    clock = Clock()
    senders: list[WebhookSender] = []

    def make_sender() -> WebhookSender:
        sender = WebhookSender(store, settings, lambda job: {"request_id": job.id, "status": job.status}, clock=clock)
        senders.append(sender)
        return sender

    def finished_job(url: str) -> tuple[str, str]:
        created = store.create_api_key("client")
        key = created.key
        deadline = clock() + timedelta(minutes=5)
        (job,) = store.insert_jobs(
            [job_row(key.id, "inference", {"prompt": "x"}, deadline, 60, webhook_url=url, now=clock())]
        )
        assert store.cancel_job(job.id, key.id, now=clock())
        return job.id, key.webhook_secret

    yield store, clock, make_sender, finished_job
    for sender in senders:
        sender.close()
    store.close()


def test_delivery_is_signed_and_recorded(setup, server):
    store, _clock, make_sender, finished_job = setup
    job_id, secret = finished_job(server.url("/hook"))
    assert make_sender().deliver_due() == 1
    [received] = server.received
    assert received.path == "/hook" and received.headers["webhook-id"] == f"msg_{job_id}"
    assert standard_webhooks_verify(secret, received.headers, received.body)
    event = json.loads(received.body)
    assert event["type"] == "request.canceled" and event["data"] == {"request_id": job_id, "status": "canceled"}
    job = store.load_job(job_id)
    assert (job.webhook_state, job.webhook_attempts, job.webhook_error) == ("delivered", 1, None)
    assert make_sender().deliver_due() == 0  # delivered once, never again


def test_failures_are_retried_with_exponential_backoff_then_delivered(setup, server):
    store, clock, make_sender, finished_job = setup
    server.fail_first = 2
    job_id, _secret = finished_job(server.url("/hook"))
    sender = make_sender()
    for attempt, backoff in ((1, 2.0), (2, 4.0)):
        assert sender.deliver_due() == 1
        job = store.load_job(job_id)
        assert (job.webhook_state, job.webhook_attempts, job.webhook_error) == ("pending", attempt, "HTTP 500")
        assert job.webhook_next_at == clock() + timedelta(seconds=backoff)
        assert sender.deliver_due() == 0  # not due yet
        clock.advance(backoff)
    assert sender.deliver_due() == 1
    assert store.load_job(job_id).webhook_state == "delivered"
    # Every attempt carried the same webhook-id, so the receiver can deduplicate.
    assert server.attempts == 3 and [r.headers["webhook-id"] for r in server.received] == [f"msg_{job_id}"]


def test_gives_up_after_the_last_attempt(setup):
    store, clock, make_sender, finished_job = setup
    job_id, _ = finished_job("http://127.0.0.1:9/unreachable")  # the discard port: connection refused
    sender = make_sender()
    for _ in range(3):
        assert sender.deliver_due() == 1
        clock.advance(60)
    job = store.load_job(job_id)
    assert (job.webhook_state, job.webhook_attempts) == ("failed", 3)
    assert "ConnectError" in job.webhook_error
    assert sender.deliver_due() == 0


def test_410_gone_and_refused_urls_stop_at_once(setup):
    store, _clock, make_sender, finished_job = setup
    app = FastAPI()

    @app.post("/gone")
    def gone() -> Response:
        return Response(status_code=410)

    served = Served(app)
    try:
        gone_id, _ = finished_job(f"{served.url}/gone")
        private_id, _ = finished_job("http://10.1.2.3/hook")  # private address: refused, never sent
        assert make_sender().deliver_due() == 2
    finally:
        served.stop()
    assert (store.load_job(gone_id).webhook_state, store.load_job(gone_id).webhook_attempts) == ("failed", 1)
    refused = store.load_job(private_id)
    assert refused.webhook_state == "failed" and "private address" in refused.webhook_error


def test_a_delivery_in_flight_is_leased_to_one_sender(setup):
    _store, clock, make_sender, finished_job = setup
    finished_job("http://127.0.0.1:9/x")
    first, second = make_sender(), make_sender()
    taken: list[Any] = first._take_due(10)
    assert len(taken) == 1 and second._take_due(10) == []
    clock.advance(60)  # the lease ran out (the first sender died): someone else may retry it
    assert len(second._take_due(10)) == 1


def test_a_receiver_that_answers_with_an_endless_body_holds_neither_memory_nor_the_sender(setup):
    # The receiver is the client's to choose: its answer's body is never read, so a body that
    # never ends (trickled within every read timeout) cannot grow the orchestrator's memory or
    # keep a delivery thread, and the status it answered with is what counts.
    store, _clock, make_sender, finished_job = setup
    stop = threading.Event()
    app = FastAPI()

    @app.post("/hook")
    def endless() -> StreamingResponse:
        def chunks() -> Iterator[bytes]:
            while not stop.is_set():
                yield b"x" * (64 << 10)
                time.sleep(0.05)

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    served = Served(app)
    job_id, _ = finished_job(f"{served.url}/hook")
    sender = make_sender()
    delivery = threading.Thread(target=sender.deliver_due, daemon=True)
    try:
        delivery.start()
        delivery.join(10)
        assert not delivery.is_alive(), "the delivery is still reading the receiver's body"
    finally:
        stop.set()
        delivery.join(10)
        served.stop()
    job = store.load_job(job_id)
    assert (job.webhook_state, job.webhook_attempts, job.webhook_error) == ("delivered", 1, None)
