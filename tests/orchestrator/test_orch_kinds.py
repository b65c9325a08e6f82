"""Job kinds are data: a kind defined here, in the test, flows through the whole orchestrator
(submit -> dispatch -> signed callback -> checked result -> score) without any change to its core."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, Field

import orchestrator.orch_kit as kit
from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.errors import InvalidRequest
from dippy_studio.orchestrator.models import ApiKey, Job
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.protocol import signer_from_uri
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.schemas import JobStatus, JobView
from orchestrator.orch_kit import ORCHESTRATOR, Served, wait_until

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators


class EchoRequest(BaseModel):
    text: str = Field(min_length=1, max_length=100)


class EchoJob(BaseModel):
    job_id: str
    callback_url: str
    deadline: AwareDatetime
    text: str


def _echo_payload(_ctx: Any, _key: ApiKey, body: EchoRequest, _now: datetime) -> dict[str, Any]:
    if body.text == "forbidden":
        raise InvalidRequest("this echo is not allowed")
    return {"text": body.text}


def _echo_request(job: Job, common: Mapping[str, Any], _blob_url: Any) -> EchoJob:
    return EchoJob(**common, text=job.payload["text"])


def _echo_check(job: Job, data: bytes, settings: OrchestratorSettings) -> str | None:
    expected = job.payload["text"][::-1].encode()
    return None if data == expected else f"expected {expected!r}, got {data[:40]!r}"


ECHO = kinds.JobKindSpec(
    name="echo",
    lane="inference",
    miner_path="/v1/echo",
    score_weight=lambda settings: 0.5,
    default_deadline_s=lambda settings: 60.0,
    attempt_timeout_s=lambda settings: 30.0,
    request_model=EchoRequest,
    build_payload=_echo_payload,
    miner_request=_echo_request,
    check_result=_echo_check,
    media_type="text/plain",
    filename="echo.txt",
)


@pytest.fixture
def echo_kind() -> Iterator[kinds.JobKindSpec]:
    kinds.register(ECHO)
    yield ECHO
    kinds.unregister(ECHO.name)


def echo_miner(uri: str, *, honest: bool = True) -> FastAPI:
    """A miner that serves only the echo kind: it reverses the text and calls back, signed."""
    signer = signer_from_uri(uri)
    app = FastAPI()
    lane = {"available": True, "workers_alive": 1, "workers": 1, "queue_depth": 0, "queue_limit": 64}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/capacity")
    def capacity() -> dict[str, Any]:
        idle = {**lane, "available": False}
        return {"hotkey": signer.ss58_address, "profile": "tiny", "fingerprints": ["echo"], "inference": lane,
                "training": idle}  # fmt: skip

    def call_back(job: EchoJob) -> None:
        result = (job.text[::-1] if honest else job.text).encode()
        now = datetime.now(job.deadline.tzinfo)
        view = JobView(
            job_id=job.job_id,
            kind="echo",
            status=JobStatus.succeeded,
            created_at=now,
            finished_at=now,
            deadline=job.deadline,
            result_sha256=hashlib.sha256(result).hexdigest(),
            result_bytes=len(result),
        )
        files = {"meta": ("meta.json", view.model_dump_json().encode(), "application/json"),
                 "result": ("echo.txt", result, "text/plain")}  # fmt: skip
        request = httpx.Request("POST", job.callback_url, files=files)
        body = request.read()
        request.headers.update(
            sign_request(signer, "POST", urlsplit(job.callback_url).path, body, ORCHESTRATOR.ss58_address)
        )
        with httpx.Client() as client:
            client.send(request)

    @app.post("/v1/echo")
    async def echo(request: Request, background: BackgroundTasks) -> JSONResponse:
        job = EchoJob.model_validate(await request.json())
        background.add_task(call_back, job)
        return JSONResponse({"job_id": job.job_id, "status": "queued"}, status_code=202)

    return app


def _register(net: kit.Subnet, uri: str, honest: bool = True) -> str:
    served = Served(echo_miner(uri, honest=honest))
    net.extra_served = [*getattr(net, "extra_served", []), served]  # type: ignore[attr-defined]
    hotkey, _uid = net._register(uri, served.url, 10.0)
    return hotkey


@pytest.mark.timeout(120)
def test_a_kind_defined_outside_the_core_flows_from_submit_to_score(subnet, echo_kind):
    honest = _register(subnet, "//Bob")
    orch_handle = subnet.start_orchestrator()
    orch = orch_handle.orch
    key = subnet.new_key(orch_handle)
    try:

        async def submit(text: str) -> Job:
            # A plain dict, validated by the kind's own request model.
            return await orch.submit(key.secret, "echo", {"text": text})

        job = asyncio.run(submit("hello kinds"))
        assert (job.kind, job.payload) == ("echo", {"text": "hello kinds"})
        done = wait_until(
            lambda: (j := orch.store.load_job(job.id)) is not None and j.status == "succeeded" and j,
            what="the echo job to succeed",
        )
        assert done.miner_hotkey == honest
        assert orch.result_bytes(done) == b"sdnik olleh"
        # The kind's refusal reaches the client as the service's error, with nothing stored.
        with pytest.raises(InvalidRequest, match="not allowed"):
            asyncio.run(submit("forbidden"))
        with pytest.raises(InvalidRequest, match="not a echo request"):
            asyncio.run(submit(""))  # under the model's min_length
        # Scored with the kind's own weight: one fast, valid attempt is worth nearly 0.5.
        snapshot = orch.refresh_scores()
        assert 0.4 < snapshot.scores[honest] <= 0.5
    finally:
        for served in getattr(subnet, "extra_served", []):
            served.stop()


@pytest.mark.timeout(120)
def test_a_result_that_fails_the_kinds_check_is_refused_and_retried(subnet, echo_kind):
    lazy = _register(subnet, "//Charlie", honest=False)
    orch_handle = subnet.start_orchestrator(max_attempts=1)
    orch = orch_handle.orch
    key = subnet.new_key(orch_handle)
    try:
        job = asyncio.run(orch.submit(key.secret, "echo", EchoRequest(text="abc")))
        failed = wait_until(
            lambda: (j := orch.store.load_job(job.id)) is not None and RequestStatus(j.status).terminal and j,
            what="the echo job to end",
        )
        assert failed.status == "failed" and "invalid result" in (failed.error or "")
        (attempt,) = orch.store.list_attempts(job.id)
        assert (attempt.miner_hotkey, attempt.outcome) == (lazy, "invalid")
        start = orch.clock() - timedelta(minutes=5)
        assert orch.score_fn(orch.store, start, orch.clock()).get(lazy, 0.0) == 0.0
    finally:
        for served in getattr(subnet, "extra_served", []):
            served.stop()


def test_random_seeds_stay_within_what_a_javascript_number_holds():
    from dippy_studio.orchestrator.kinds import new_seed

    seeds = [new_seed() for _ in range(2000)]
    assert max(seeds) <= 2**53 - 1
    assert max(seeds) > 2**50  # drawn from the whole range, not a small corner of it
