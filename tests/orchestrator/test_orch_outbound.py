"""The SSRF guard through the orchestrator: client-given URLs (webhook, LoRA, dataset) on
non-public addresses get a 422 with the reason, and a webhook whose name is rebound to
127.0.0.1 after it was checked never reaches a listener there (default policy: no loopback)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

import outbound_kit
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.errors import InvalidRequest
from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store, job_row
from dippy_studio.orchestrator.webhooks import WebhookSender
from orchestrator.orch_kit import ORCHESTRATOR, image_body
from outbound_kit import REBINDING_HOST, Listener, answering_without_end, rebinding

listener = outbound_kit.listener  # fixture: a loopback listener that counts connections


@pytest.fixture
def app(tmp_path) -> Iterator[TestClient]:
    """An orchestrator with the default URL policy (no loopback, no private networks)."""
    settings = OrchestratorSettings(data_dir=tmp_path / "orch", webhook_interval_s=0.05, webhook_timeout_s=2)
    with TestClient(create_app(settings, signer=ORCHESTRATOR)) as client:
        yield client


def auth(client: TestClient) -> dict[str, str]:
    orch: Orchestrator = client.app.state.orchestrator
    return {"Authorization": f"Bearer {orch.store.create_api_key('client').secret}"}


def test_urls_on_refused_addresses_get_422_with_the_reason(app: TestClient, listener: Listener):
    headers = auth(app)
    webhooks = [
        (listener.url("/hook"), "127.0.0.1 is a loopback address"),
        (listener.url("/hook", host="localhost"), "is a loopback address"),
        ("http://100.64.0.1/hook", "100.64.0.1 is a shared (carrier-grade NAT) address"),
        ("http://100.100.100.200/latest/meta-data/", "100.100.100.200 is a cloud metadata address"),
        ("http://[2002:a9fe:a9fe::1]/hook", "169.254.169.254 (in 2002:a9fe:a9fe::1) is a cloud metadata address"),
        ("http://[fec0::1]/hook", "fec0::1 is a non-global address"),
    ]
    for url, reason in webhooks:
        response = app.post("/v1/images", headers=headers, json=image_body(webhook_url=url))
        assert response.status_code == 422, (url, response.text)
        assert "webhook_url refused" in response.text and reason in response.text, (url, response.text)

    lora = app.post("/v1/images", headers=headers, json=image_body(loras=[{"url": listener.url("/a.safetensors")}]))
    assert lora.status_code == 422 and "127.0.0.1 is a loopback address" in lora.json()["detail"], lora.text
    dataset = app.post(
        "/v1/loras",
        headers=headers,
        data={"trigger_word": "sks", "dataset_url": "http://169.254.169.254/latest/meta-data/d.zip"},
    )
    assert dataset.status_code == 422, dataset.text
    assert "169.254.169.254 is a cloud metadata address" in dataset.json()["detail"]

    assert listener.connections == 0
    assert app.get("/v1/requests", headers=headers).json() == []  # nothing was queued


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.02)
    return value


def test_a_webhook_name_rebound_after_submission_reaches_nothing(monkeypatch, app: TestClient, listener: Listener):
    dns = rebinding(monkeypatch, public_answers=1)  # public when submitted, 127.0.0.1 from then on
    headers = auth(app)
    url = listener.url("/hook", host=REBINDING_HOST)
    submitted = app.post("/v1/images", headers=headers, json=image_body(webhook_url=url))
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    assert app.post(f"/v1/requests/{request_id}/cancel", headers=headers).status_code == 200  # the event is due

    store: Store = app.app.state.orchestrator.store
    job = wait_for(lambda: (j := store.load_job(request_id)) and j.webhook_state == "failed" and j)
    assert "127.0.0.1 is a loopback address" in job.webhook_error and job.webhook_attempts == 1
    assert dns.lookups >= 2 and listener.connections == 0


def test_a_webhook_connects_to_the_address_its_check_passed(monkeypatch, tmp_path, listener: Listener):
    # The name is public when the sender checks it and 127.0.0.1 when the HTTP client looks it
    # up to connect: the sender's own client refuses it.
    settings = OrchestratorSettings(data_dir=tmp_path, webhook_timeout_s=2)
    store = Store.open(f"sqlite:///{tmp_path / 'o.sqlite'}")
    sender = WebhookSender(store, settings, lambda job: {"request_id": job.id})
    try:
        key = store.create_api_key("client").key
        now = utcnow()
        url = listener.url("/hook", host=REBINDING_HOST)
        (job,) = store.insert_jobs(
            [job_row(key.id, "inference", {"prompt": "x"}, now + timedelta(minutes=5), 60, webhook_url=url, now=now)]
        )
        assert store.cancel_job(job.id, key.id, now=now)
        dns = rebinding(monkeypatch, public_answers=1)
        assert sender.deliver_due() == 1
        failed: Job = store.load_job(job.id)
    finally:
        sender.close()
        store.close()
    assert dns.lookups == 2 and listener.connections == 0
    assert (failed.webhook_state, failed.webhook_attempts) == ("failed", 1)
    assert failed.webhook_error == f"refused a connection to {REBINDING_HOST}: 127.0.0.1 is a loopback address"


def test_a_download_that_trickles_in_is_cut_off_at_its_time_limit(tmp_path):
    """Each byte comes well within the read timeout; the whole download still has its limit."""
    settings = OrchestratorSettings(data_dir=tmp_path / "orch", allow_loopback_urls=True, download_timeout_s=1.0)
    with TestClient(create_app(settings, signer=ORCHESTRATOR)) as client:
        orch: Orchestrator = client.app.state.orchestrator
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"  # 5 s at a byte per 50 ms
        with answering_without_end(head, b"x", 0.05) as (url, _):
            started = time.monotonic()
            with pytest.raises(InvalidRequest, match="took longer than 1 s"):
                orch.fetch(f"{url}/slow.safetensors", 1 << 20, "LoRA")
        assert time.monotonic() - started < 5
        with pytest.raises(InvalidRequest, match="InvalidURL"):
            orch.fetch("http://127.0.0.1:1/a\x00b", 1 << 20, "LoRA")
