"""The Python client (`dippy_studio.client`), sync and async, against a real local subnet: an
orchestrator and a tiny-profile miner over HTTP (`orch_kit`). What a builder does with it: submit
each image task with inputs from a path, bytes or a URL, wait, stream, download, list page by page,
train a LoRA from a folder, cancel, check a webhook, and read the server's reason when refused;
429s are retried after their Retry-After (a fake server). The README's SDK example is run here."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

import miner_kit
import orchestrator.orch_kit as kit
from dippy_studio.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    Request,
    Status,
    WaitTimeout,
    WebhookVerificationError,
    verify_webhook,
)
from dippy_studio.client import models as client_models
from dippy_studio.engine.synthetic_data import write_dataset
from dippy_studio.orchestrator import schemas
from dippy_studio.orchestrator.states import TERMINAL, RequestStatus
from orchestrator.orch_kit import sha256

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators
server = miner_kit.server  # fixture: a webhook receiver

REPO = Path(__file__).resolve().parents[2]
SMALL = {"width": 64, "height": 64, "steps": 2}
# What the API answers for a request it has just queued (the fake servers' answer).
QUEUED = {"request_id": "req_1", "status": "queued", "status_url": "s", "result_url": "r", "cancel_url": "c"}


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.fixture
def api(subnet: kit.Subnet) -> tuple[kit.OrchHandle, kit.Key]:
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator()
    return orch, subnet.new_key(orch)


# ---- end to end ----------------------------------------------------------------------------------


def test_sync_client_generates_edits_streams_trains_lists_and_checks_webhooks(api, server, tmp_path):
    orch, key = api
    with Client(orch.url, key.secret, page_size=2) as client:
        image = client.submit("a lighthouse at dusk", seed=7, wait=30, webhook_url=server.url("/hook"), **SMALL)
        assert image.status is Status.succeeded and image.result is not None
        png = client.download(image)  # inline in the wait answer
        assert png == image.result.data and sha256(png) == image.result.sha256 and png_size(png) == (64, 64)
        saved = client.download(image.id, tmp_path / "lighthouse.png")  # fetched, to a path
        assert saved == tmp_path / "lighthouse.png" and saved.read_bytes() == png

        # An edit of the file just saved (a multipart upload), and an inpainting whose image is a
        # data: URI (a JSON field) and whose mask is bytes (a file part).
        edit = client.submit("make it night", task="edit", image=saved, seed=3, steps=2, wait=30)
        edited = client.download(edit)
        assert edit.status is Status.succeeded and edit.input["task"] == "edit"
        assert png_size(edited) == (64, 64) and edited != png
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (32, 0, 64, 64))
        mask_png = io.BytesIO()
        mask.save(mask_png, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        mask_bytes = mask_png.getvalue()
        inpaint = client.submit("a red door", task="inpaint", image=uri, mask=mask_bytes, strength=0.9, wait=30)
        assert inpaint.status is Status.succeeded and inpaint.input["task"] == "inpaint"

        # Live events: the request's statuses up to its final one.
        queued = client.submit("a lighthouse at dawn", seed=8, **SMALL)
        events = list(client.stream(queued))
        statuses = [event.request.status for event in events if event.request is not None]
        assert statuses[-1] is Status.succeeded and statuses == sorted(set(statuses), key=statuses.index)

        # A LoRA from a folder of images and captions, then used in a request.
        training = client.train_lora(write_dataset(tmp_path / "photos", count=2, size=32), "sks", steps=2, wait=60)
        assert training.status is Status.succeeded, training.error
        lora_id = training.result.lora_id
        assert client.get_lora(lora_id).trigger_word == "sks"
        assert [lora.id for lora in client.list_loras()] == [lora_id]
        weights = client.download(training, tmp_path / "sks.safetensors")
        assert sha256(weights.read_bytes()) == training.result.sha256
        styled = client.submit("a sks lighthouse", seed=7, loras=[{"id": lora_id}], wait=30, **SMALL)
        assert styled.status is Status.succeeded and client.download(styled) != png

        # Every request, newest first, two to a page (page_size=2: three pages and a bit).
        ids = [image.id, edit.id, inpaint.id, queued.id, training.id, styled.id][::-1]
        assert [request.id for request in client.list_requests()] == ids
        assert [request.id for request in client.list_requests(limit=3)] == ids[:3]
        assert [r.id for r in client.list_requests(status="succeeded", limit=1)] == ids[:1]

    # The finished image's webhook verifies with the key's secret, and a tampered one does not.
    [hook] = server.wait_for(lambda received: received, timeout=10)
    event = verify_webhook(key.webhook_secret, hook.headers, hook.body)
    assert event.type == "request.succeeded" and event.data.id == image.id and event.data.result.sha256 == sha256(png)
    with pytest.raises(WebhookVerificationError, match="no webhook signature matches"):
        verify_webhook(key.webhook_secret, hook.headers, hook.body.replace(b"succeeded", b"failed"))
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify_webhook(key.webhook_secret, hook.headers, hook.body, now=time.time() + 3600)


def test_async_client_does_the_same_with_the_same_results(api, tmp_path):
    orch, key = api

    async def scenario() -> Request:
        async with AsyncClient(orch.url, key.secret, page_size=1) as client:
            [model] = await client.models()
            assert model.id == "tiny" and model.default and "edit" in model.tasks
            image = await client.submit("a lighthouse at dusk", seed=7, wait=30, **SMALL)
            png = await client.download(image.id)
            assert image.status is Status.succeeded and png == image.result.data

            edit = await client.submit("make it night", task="edit", image=png, seed=3, steps=2)
            events = [event async for event in client.stream(edit)]
            assert events[-1].request.status is Status.succeeded
            done = await client.wait(edit, timeout=30)
            assert done.result is not None and png_size(await client.download(done)) == (64, 64)

            zipped = write_dataset(tmp_path / "photos.zip", count=2, size=32).read_bytes()
            training = await client.wait(await client.train_lora(zipped, "sks", steps=2), timeout=60)
            assert training.status is Status.succeeded and training.result.lora_id
            assert [lora.id async for lora in client.list_loras()] == [training.result.lora_id]
            assert [r.id async for r in client.list_requests()] == [training.id, edit.id, image.id]
            return image

    image = asyncio.run(scenario())
    # The same seed and prompt render the same bytes, whichever client sent them.
    with Client(orch.url, key.secret) as client:
        assert client.models() == [model for model in client.models() if model.default]
        again = client.submit("a lighthouse at dusk", seed=7, wait=30, **SMALL)
        assert again.id != image.id and again.result.sha256 == image.result.sha256


def test_cancel_refusals_and_their_reasons(subnet):
    subnet.add_stub_miner("//Bob")  # accepts every job and never calls back
    orch = subnet.start_orchestrator()
    key = subnet.new_key(orch)
    with Client(orch.url, key.secret) as client:
        request = client.submit("a lighthouse", **SMALL)
        with pytest.raises(WaitTimeout) as waited:
            client.wait(request, timeout=0.3)
        assert not waited.value.request.done
        assert client.cancel(request).status is Status.canceled
        with pytest.raises(Conflict) as again:
            client.cancel(request)
        assert again.value.status == 409 and again.value.reason
        with pytest.raises(Conflict):
            client.download(request)
        with pytest.raises(InvalidRequest) as invalid:
            client.submit("a lighthouse", width=65, height=64)
        assert invalid.value.status == 422
        assert invalid.value.reason == "body.width: Value error, 65 is not a multiple of 16"
        assert invalid.value.errors[0]["loc"] == ["body", "width"]
        with pytest.raises(NotFound):
            client.get("req_nope")
        with pytest.raises(TypeError, match="unknown option"):
            client.submit("a lighthouse", widht=64)  # type: ignore[call-arg]

    async def refused() -> None:
        async with AsyncClient(orch.url, key.secret) as client:
            with pytest.raises(InvalidRequest, match="65 is not a multiple of 16"):
                await client.submit("a lighthouse", width=65, height=64)
            request = await client.submit("a lighthouse", **SMALL)
            assert (await client.cancel(request.id)).status is Status.canceled
        async with AsyncClient(orch.url, "dsk_wrong") as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.get(request.id)

    asyncio.run(refused())

    # A spent rate limit whose Retry-After is longer than the client waits is raised at once.
    # The limit counts per clock minute: stay clear of a minute's end, where the two calls could
    # fall in different minutes, or the Retry-After be a second (waited, then admitted).
    if (into_minute := time.time() % 60) > 45:
        time.sleep(60.5 - into_minute)
    slow = subnet.new_key(orch, rate=1)
    with Client(orch.url, slow.secret, max_retry_wait_s=1) as client:
        list(client.list_requests())
        started = time.monotonic()
        with pytest.raises(RateLimited) as limited:
            list(client.list_requests())
        assert limited.value.status == 429 and limited.value.retry_after > 1
        # Well under the Retry-After (ten seconds or more here): not waited out, whatever a
        # loaded machine adds to the request itself.
        assert time.monotonic() - started < 5


# ---- retries (a fake server) ----------------------------------------------------------------------


def flaky(answers: list[httpx.Response]) -> tuple[httpx.MockTransport, list[float]]:
    """A server that gives `answers` in turn, then the status of a queued request; records when."""
    seen: list[float] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(time.monotonic())
        return answers.pop(0) if answers else httpx.Response(200, json=QUEUED)

    return httpx.MockTransport(handle), seen


def busy(status: int = 429, retry_after: str | None = "0.2") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"detail": "rate limit reached"}, headers=headers)


def test_429_and_503_are_retried_after_retry_after_then_given_up():
    transport, seen = flaky([busy(), busy(503, None), busy()])
    with Client("http://fake", "k", transport=transport, retry_backoff_s=0.1) as client:
        assert client.get("req_1").status is Status.queued
    gaps = [later - earlier for earlier, later in itertools.pairwise(seen)]
    assert len(seen) == 4 and gaps[0] >= 0.2 and gaps[1] >= 0.2 and gaps[2] >= 0.2  # 0.1 * 2**1 backoff

    transport, seen = flaky([busy(), busy(), busy()])
    with (
        Client("http://fake", "k", transport=transport, max_retries=2) as client,
        pytest.raises(RateLimited, match="rate limit reached") as spent,
    ):
        client.get("req_1")
    assert len(seen) == 3 and spent.value.retry_after == pytest.approx(0.2)

    async def long_wait() -> None:
        transport, seen = flaky([busy(retry_after="120")])
        async with AsyncClient("http://fake", "k", transport=transport) as client:
            with pytest.raises(RateLimited) as refused:
                await client.get("req_1")
        assert len(seen) == 1 and refused.value.retry_after == 120
        transport, seen = flaky([busy(), busy(503)])
        async with AsyncClient("http://fake", "k", transport=transport) as client:
            assert (await client.get("req_1")).status is Status.queued
        assert len(seen) == 3 and seen[2] - seen[0] >= 0.4

    asyncio.run(long_wait())


def test_wait_polls_when_the_server_answers_before_the_result():
    """A server that does not hold the answer (or caps `Prefer: wait` below what was asked): the
    client polls for the rest of the time asked."""
    prefers: list[str | None] = []
    answers = [httpx.Response(202, json=QUEUED), httpx.Response(200, json=QUEUED)]
    answers.append(httpx.Response(200, json={**QUEUED, "status": "succeeded"}))

    def handle(request: httpx.Request) -> httpx.Response:
        prefers.append(request.headers.get("prefer"))
        return answers.pop(0)

    transport = httpx.MockTransport(handle)
    with Client("http://fake", "k", transport=transport, poll_interval_s=0.05) as client:
        assert client.submit("a lighthouse", wait=5, **SMALL).status is Status.succeeded
    assert prefers == ["wait=5", None, None]


# ---- the README ------------------------------------------------------------------------------------


def readme_sdk_example() -> str:
    """The Python block of the README's "For builders" section that uses `dippy_studio.client`."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## For builders", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    [block] = [block for block in blocks if "dippy_studio.client" in block]
    return block


def test_the_readme_sdk_example_runs(api, tmp_path, monkeypatch):
    orch, key = api
    monkeypatch.setenv("DIPPY_API_URL", orch.url)
    monkeypatch.setenv("DIPPY_API_KEY", key.secret)
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "photos", count=2, size=32)
    exec(compile(readme_sdk_example(), "README.md", "exec"), {})
    for name in ("lighthouse.png", "night.png", "styled.png"):
        assert png_size((tmp_path / name).read_bytes()) == (64, 64)


def test_the_client_imports_none_of_the_services():
    """A builder's program (or its webhook receiver) loads the client alone: no orchestrator,
    database, web framework, chain SDK or model stack comes with it."""
    code = "import sys, dippy_studio.client; print(' '.join(sorted(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(run.stdout.split())
    ours = {name for name in loaded if name.startswith("dippy_studio.") and not name.startswith("dippy_studio.client")}
    # Only the webhook signature, which the orchestrator signs with (standard library only).
    assert ours == {"dippy_studio.protocol", "dippy_studio.protocol.webhooks"}
    assert "bittensor" not in loaded
    assert loaded.isdisjoint({"fastapi", "starlette", "sqlalchemy", "torch", "numpy", "PIL"})


# ---- the two clients cannot drift -----------------------------------------------------------------


def test_the_async_client_has_the_sync_clients_methods_and_arguments():
    public = lambda cls: {n: f for n, f in vars(cls).items() if callable(f) and not n.startswith("_")}  # noqa: E731
    sync, aio = public(Client), public(AsyncClient)
    assert set(sync) - {"close"} == set(aio) - {"aclose"}
    for name in set(sync) - {"close"}:
        assert inspect.signature(sync[name]).parameters == inspect.signature(aio[name]).parameters, name


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (Request, schemas.RequestView),
        (client_models.Result, schemas.ResultInfo),
        (client_models.Progress, schemas.Progress),
        (client_models.Lora, schemas.LoraView),
        (client_models.Model, schemas.ModelInfo),
    ],
)
def test_the_models_read_only_fields_the_api_sends(ours, theirs):
    """A typo here would leave a field None forever instead of failing."""
    assert {field.alias or name for name, field in ours.model_fields.items()} <= set(theirs.model_fields)


def test_the_statuses_are_the_apis():
    assert [status.value for status in Status] == [status.value for status in RequestStatus]
    assert {status.value for status in Status if status.done} == {status.value for status in TERMINAL}


def test_stream_events_are_parsed_from_the_wire(monkeypatch):
    body = (
        ": ping\r\n\r\n"
        'event: queue\r\ndata: {"position": 2}\r\n\r\n'
        'event: progress\r\ndata: {"step": 1,\r\ndata:  "total": 4, "loss": 0.5}\r\n\r\n'
        + "event: status\r\ndata: "
        + json.dumps({**QUEUED, "status": "succeeded"})
        + "\r\n\r\nevent: status\r\ndata: {}\r\n\r\n"  # after the final status: never read
    )
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
    with Client("http://fake", "k", transport=transport) as client:
        events = list(client.stream("req_1"))
    assert [event.event for event in events] == ["queue", "progress", "status"]
    assert events[0].queue_position == 2 and events[1].progress.total == 4 and events[1].progress.loss == 0.5
    assert events[2].request.done
