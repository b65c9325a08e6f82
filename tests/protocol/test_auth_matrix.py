"""Fault matrix for signed requests, both schemes, at both services that take them: the miner's job
API (the orchestrator signs) and the orchestrator's callback route (the miner signs).

Every attack aims at an action, a cancel on the miner and a failure report on the orchestrator, and
each must be refused with a reason and leave the job as it was. Each test then sends the genuine
request, to show the action was possible all along.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from bittensor.keyfiles import Keypair

import miner_kit
import orchestrator.orch_kit as kit
from dippy_studio.miner.app import create_app
from dippy_studio.protocol import Signer, signer_from_uri
from dippy_studio.protocol.auth import Scheme, sign_request
from miner_kit import MINER, ORCHESTRATOR, STRANGER, inference_job, miner_settings
from orchestrator.orch_kit import image_body, wait_status

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators
make_miner = miner_kit.make_miner  # fixture: a miner app and a client that signs like the orchestrator

SCHEMES: list[Scheme] = ["btauth", "epistula"]
SENDER_HEADER = {"btauth": "X-Bittensor-Hotkey", "epistula": "Epistula-Signed-By"}


def reference_epistula(uri: str, body: bytes, receiver: str) -> dict[str, str]:
    """Standard Epistula v2, as other subnets' services sign it: no method or path."""
    keypair = Keypair.create_from_uri(uri)
    timestamp, request_uuid = str(time.time_ns() // 1_000_000), str(uuid.uuid4())
    message = f"{hashlib.sha256(body).hexdigest()}.{request_uuid}.{timestamp}.{receiver}"
    return {
        "Epistula-Version": "2",
        "Epistula-Timestamp": timestamp,
        "Epistula-Uuid": request_uuid,
        "Epistula-Signed-By": keypair.ss58_address,
        "Epistula-Signed-For": receiver,
        "Epistula-Request-Signature": "0x" + bytes(keypair.sign(message.encode())).hex(),
    }


def forged(signer: Signer, claimed: Signer, scheme: Scheme, method: str, path: str, body: bytes, receiver: str):
    """Signed by `signer`, claiming to be `claimed`."""
    headers = sign_request(signer, method, path, body, receiver, scheme)
    return {**headers, SENDER_HEADER[scheme]: claimed.ss58_address}


# --- the miner ---------------------------------------------------------------------------------


class Registered:
    """The chain as the miner sees it: only the orchestrator is registered."""

    def stake_of(self, hotkey: str) -> float | None:
        return 100.0 if hotkey == ORCHESTRATOR.ss58_address else None


@pytest.fixture
def miner_with_a_live_job(make_miner, tmp_path):
    """A miner whose one worker holds job `busy`, so that job `live` waits in the queue."""
    gate = threading.Event()

    def runner(record, check):
        while not gate.wait(0.02):
            check()  # raises once the job is cancelled
        raise RuntimeError("released")

    settings = miner_settings(tmp_path, allow_hotkeys=[], min_stake=0.0)
    client = make_miner(settings, inference_runner=runner, stake_lookup=Registered())
    for job_id in ("busy", "live", "decoy"):
        assert client.post("/v1/inference", inference_job(job_id)).status_code == 202
    client.wait_status("busy", {"running"})
    yield client
    gate.set()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_miner_acts_only_on_genuine_requests(miner_with_a_live_job, scheme: Scheme):
    client = miner_with_a_live_job
    http = client.client
    cancel = "/v1/jobs/live/cancel"
    me, now = MINER.ss58_address, time.time()

    def signed(method: str, path: str, body: bytes = b"", **kwargs: Any) -> dict[str, str]:
        return sign_request(kwargs.pop("signer", ORCHESTRATOR), method, path, body, kwargs.pop("receiver", me),
                            scheme, **kwargs)  # fmt: skip

    def send(headers: dict[str, str], *, method: str = "POST", path: str = cancel, body: bytes = b""):
        return http.request(method, path, content=body, headers={**headers, "content-type": "application/json"})

    decoy = signed("POST", "/v1/jobs/decoy/cancel")
    assert send(decoy, path="/v1/jobs/decoy/cancel").status_code == 200  # genuine: the decoy is cancelled
    read = signed("GET", "/v1/jobs/live")
    attacks: dict[str, tuple[httpx.Response, int, str]] = {
        "forged signature": (send(forged(STRANGER, ORCHESTRATOR, scheme, "POST", cancel, b"", me)), 401,
                             "does not verify"),
        "tampered body": (send(signed("POST", cancel), body=b'{"job_id": "live"}'), 401, "does not verify"),
        "replayed nonce": (send(decoy, path="/v1/jobs/decoy/cancel"), 401, "already accepted"),
        "stale timestamp": (send(signed("POST", cancel, now=now - 60)), 401, "older than"),
        "future timestamp": (send(signed("POST", cancel, now=now + 60)), 401, "in the future"),
        "wrong receiver": (send(signed("POST", cancel, receiver=STRANGER.ss58_address)), 401, "different receiving"),
        "unregistered hotkey": (send(signed("POST", cancel, signer=STRANGER)), 403, "not registered"),
        # Captured from a read, aimed at the cancel.
        "cross-endpoint reuse": (send(read), 401, "signature does not verify" if scheme == "btauth" else "signed for"),
    }  # fmt: skip
    if scheme == "epistula":
        standard = reference_epistula("//Alice", b"", me)
        assert send(standard, method="GET", path="/v1/jobs/live").status_code == 200  # reads stay open to it
        attacks["standard Epistula, cross-endpoint"] = (send(standard), 401, "without a body")
    for name, (response, status, reason) in attacks.items():
        assert (response.status_code, name) == (status, name), response.text
        assert reason in response.json()["detail"], (name, response.json())

    assert client.get("/v1/jobs/live").json()["status"] == "queued"  # never cancelled
    assert send(signed("POST", cancel)).json()["status"] == "canceled"  # the genuine request acts


def test_the_miner_refuses_an_unsigned_job_without_reading_its_body(tmp_path, tiny_engine):
    app = create_app(miner_settings(tmp_path), engine=tiny_engine)
    body = json.dumps(inference_job("unread")).encode()
    read: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        read.append(len(body))
        yield body

    async def post(headers: dict[str, str], content: Callable[[], AsyncIterator[bytes]]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://miner") as http:
            return await http.post("/v1/inference", content=content(), headers=headers)

    stale = sign_request(ORCHESTRATOR, "POST", "/v1/inference", body, MINER.ss58_address, now=time.time() - 60)
    for headers, status in [({}, 401), (stale, 401)]:
        response = asyncio.run(post({**headers, "content-length": str(len(body))}, chunks))
        assert response.status_code == status and response.json()["detail"]
    assert read == []


# --- the orchestrator's callback route ---------------------------------------------------------


FORM = "multipart/form-data; boundary=x"


def report(request_id: str, status: str = "failed") -> bytes:
    """A miner's callback body saying how attempt 1 of `request_id` went (no result part)."""
    meta = {
        "job_id": f"{request_id}-1",
        "kind": "inference",
        "status": status,
        "error": "out of memory" if status == "failed" else None,
        "created_at": "2030-01-01T00:00:00Z",
        "deadline": "2030-01-01T00:01:00Z",
    }
    part = b'Content-Disposition: form-data; name="meta"\r\n\r\n' + json.dumps(meta).encode()
    return b"--x\r\n" + part + b"\r\n--x--\r\n"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_orchestrator_acts_only_on_genuine_callbacks(subnet, scheme: Scheme):
    subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator(max_attempts=1)
    client = subnet.client(orch, subnet.new_key(orch))
    live, other = (client.post("/v1/images", json=image_body()).json()["request_id"] for _ in range(2))
    for request_id in (live, other):
        wait_status(client, request_id, {"running"})
    miner, us, now = signer_from_uri("//Dave"), ORCHESTRATOR.ss58_address, time.time()
    path = f"/v1/miner-callbacks/{live}"
    body = report(live)
    http = httpx.Client(base_url=orch.url, timeout=30)

    def signed(body: bytes = body, *, to: str = path, **kwargs: Any) -> dict[str, str]:
        signer, receiver = kwargs.pop("signer", miner), kwargs.pop("receiver", us)
        return {**sign_request(signer, "POST", to, body, receiver, scheme, **kwargs), "content-type": FORM}

    def send(headers: dict[str, str], content: bytes = body, to: str = path) -> httpx.Response:
        return http.post(to, content=content, headers=headers)

    # A genuine report that changes nothing (the job is already running), to replay.
    running = report(live, "running")
    first = signed(running)
    assert send(first, running).json() == {"status": "running"}
    other_body = report(other)
    attacks: dict[str, tuple[httpx.Response, int, str]] = {
        "forged signature": (send({**forged(signer_from_uri("//Eve"), miner, scheme, "POST", path, body, us),
                                   "content-type": FORM}), 401, "does not verify"),
        "tampered body": (send(signed(), body.replace(b"out of memory", b"out of memorx")), 401, "does not verify"),
        "replayed nonce": (send(first, running), 401, "already accepted"),
        "stale timestamp": (send(signed(now=now - 60)), 401, "older than"),
        "future timestamp": (send(signed(now=now + 60)), 401, "in the future"),
        "wrong receiver": (send(signed(receiver=miner.ss58_address)), 401, "different receiving"),
        "unregistered hotkey": (send(signed(signer=signer_from_uri("//Ferdie"))), 403, "not assigned"),
        # Headers and body of the other job's callback, aimed at this one.
        "cross-endpoint reuse": (send(signed(other_body, to=f"/v1/miner-callbacks/{other}"), other_body), 401,
                                 "signature does not verify" if scheme == "btauth" else "signed for"),
    }  # fmt: skip
    if scheme == "epistula":
        # Standard Epistula does not cover the path; the signed body names its own attempt.
        standard = {**reference_epistula("//Dave", other_body, us), "content-type": FORM}
        attacks["standard Epistula, cross-endpoint"] = (send(standard, other_body), 410, "not the current attempt")
    for name, (response, status, reason) in attacks.items():
        assert (response.status_code, name) == (status, name), response.text
        assert reason in response.json()["detail"], (name, response.json())

    assert client.get(f"/v1/requests/{live}").json()["status"] == "running"  # never acted on
    assert orch.store.list_attempts(live)[0].outcome is None
    assert send(signed()).json() == {"status": "failed"}  # the genuine report acts
    http.close()
