"""The client API on its own (no miners): keys, isolation, rate limits, inputs, OpenAPI, blobs, scores."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
import zipfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner

import miner_kit
import orchestrator.orch_kit as kit
from dippy_studio.chain.local import LocalChain
from dippy_studio.orchestrator import model_code
from dippy_studio.orchestrator.api import prefer_wait
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.cli import orchestrator_app
from dippy_studio.orchestrator.leader import ROLES
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.protocol import MemoryNonceStore, SenderPolicy, signer_from_uri, verify_request
from dippy_studio.protocol.auth import BadSignature
from orchestrator.orch_kit import ORCHESTRATOR, dataset_zip, image_body

VALIDATOR = signer_from_uri("//Validator")

server = miner_kit.server  # fixture: serves files on 127.0.0.1


class Api:
    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.orch: Orchestrator = client.app.state.orchestrator

    def key(self, rate: int = 10_000, name: str = "client") -> dict[str, str]:
        created = self.orch.store.create_api_key(name, rate_limit_per_minute=rate)
        return {"Authorization": f"Bearer {created.secret}", "id": created.key.id}

    def call(self, method: str, path: str, key: dict[str, str] | None, **kwargs: Any):
        headers = {**kwargs.pop("headers", {}), **({"Authorization": key["Authorization"]} if key else {})}
        return self.client.request(method, path, headers=headers, **kwargs)


@pytest.fixture
def make_api(tmp_path) -> Iterator[Callable[..., Api]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> Api:
        components = {k: overrides.pop(k) for k in ("score_fn",) if k in overrides}
        settings = OrchestratorSettings(data_dir=tmp_path / f"orch{len(clients)}", **overrides)
        client = TestClient(create_app(settings, signer=ORCHESTRATOR, **components))
        client.__enter__()
        clients.append(client)
        return Api(client)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


def lora_file(rank: int = 2, width: int = 32) -> bytes:
    """A LoRA on one attention layer; the tiny profile's layers are 32 wide."""
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(rank, width),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(width, rank),
    }
    return save_safetensors(tensors)


def test_openapi_and_docs_are_served(api: Api):
    spec = api.client.get("/openapi.json").json()
    for path in ("/v1/images", "/v1/loras", "/v1/requests/{request_id}", "/v1/requests/{request_id}/result",
                 "/v1/requests/{request_id}/cancel", "/v1/loras/{lora_id}", "/v1/scores"):  # fmt: skip
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert api.client.get("/docs").status_code == 200


def test_requests_need_a_live_key(api: Api):
    missing = api.call("GET", "/v1/requests", None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["detail"]
    bad = api.client.get("/v1/requests", headers={"Authorization": "Bearer dsk_0123456789abcdef_" + "x" * 40})
    assert bad.status_code == 401 and bad.json()["detail"] == "invalid or revoked API key"
    key = api.key()
    assert api.call("GET", "/v1/requests", key).status_code == 200
    api.orch.store.revoke_api_key(key["id"])
    assert api.call("GET", "/v1/requests", key).status_code == 401


def test_submit_status_cancel(api: Api):
    key = api.key()
    submitted = api.call("POST", "/v1/images", key, json=image_body(seed=None, steps=None))
    assert submitted.status_code == 202, submitted.text
    body = submitted.json()
    request_id = body["request_id"]
    assert body["status"] == "queued"
    assert body["status_url"].endswith(f"/v1/requests/{request_id}")
    assert body["result_url"] == body["status_url"] + "/result" and body["cancel_url"] == body["status_url"] + "/cancel"

    view = api.call("GET", f"/v1/requests/{request_id}", key).json()
    assert (view["status"], view["kind"], view["attempts"], view["miner_uid"]) == ("queued", "inference", 0, None)
    # Left-out seed and steps were filled in (random seed, the profile's default steps).
    assert isinstance(view["input"]["seed"], int) and view["input"]["steps"] == 4
    assert 0 <= view["input"]["seed"] <= 2**53 - 1  # exact in every JSON client
    assert [r["request_id"] for r in api.call("GET", "/v1/requests", key).json()] == [request_id]

    early = api.call("GET", f"/v1/requests/{request_id}/result", key)
    assert early.status_code == 409 and "it is queued" in early.json()["detail"]
    canceled = api.call("POST", f"/v1/requests/{request_id}/cancel", key)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    again = api.call("POST", f"/v1/requests/{request_id}/cancel", key)
    assert again.status_code == 409 and "already canceled" in again.json()["detail"]
    assert api.call("GET", "/v1/requests?status=canceled", key).json()[0]["request_id"] == request_id


def test_each_key_sees_only_its_own_requests_and_loras(api: Api):
    alice, bob = api.key(name="alice"), api.key(name="bob")
    request_id = api.call("POST", "/v1/images", alice, json=image_body()).json()["request_id"]
    for method, path in (("GET", ""), ("GET", "/result"), ("POST", "/cancel")):
        response = api.call(method, f"/v1/requests/{request_id}{path}", bob)
        assert response.status_code == 404 and response.json()["detail"] == f"no request {request_id}"
    assert api.call("GET", "/v1/requests", bob).json() == []

    lora = kit.trained_lora(api.orch.store, alice["id"], "style", "a" * 64, 4, trigger_word="sks")
    assert [x["id"] for x in api.call("GET", "/v1/loras", alice).json()] == [lora.id]
    assert api.call("GET", f"/v1/loras/{lora.id}", alice).json()["trigger_word"] == "sks"
    assert api.call("GET", "/v1/loras", bob).json() == []
    assert api.call("GET", f"/v1/loras/{lora.id}", bob).status_code == 404
    used = api.call("POST", "/v1/images", bob, json=image_body(loras=[{"id": lora.id}]))
    assert used.status_code == 422 and f"no LoRA {lora.id} for this API key" in used.json()["detail"]
    assert api.call("POST", "/v1/images", alice, json=image_body(loras=[{"id": lora.id}])).status_code == 202


def test_each_key_has_its_own_rate_limit(api: Api):
    limited, other = api.key(rate=3), api.key(rate=3)
    assert [api.call("GET", "/v1/requests", limited).status_code for _ in range(3)] == [200] * 3
    refused = api.call("GET", "/v1/requests", limited)
    assert refused.status_code == 429 and "3 requests per minute" in refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert api.call("GET", "/v1/requests", other).status_code == 200


def test_concurrent_submissions_are_each_admitted_or_refused_once(api: Api):
    # Submissions arriving together are admitted and inserted together (one count per key).
    limited, other = api.key(rate=10), api.key()
    bad = {"Authorization": "Bearer dsk_0000000000000000_" + "x" * 43}
    calls = [(limited, image_body())] * 20 + [(other, image_body(width=512))] * 4 + [(bad, image_body())] * 4
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = pool.map(lambda call: api.call("POST", "/v1/images", call[0], json=call[1]), calls)
        statuses = Counter(answer.status_code for answer in answers)
    assert statuses == Counter({202: 10, 429: 10, 422: 4, 401: 4})
    assert len(api.orch.store.list_jobs(limited["id"])) == 10 and api.orch.store.list_jobs(other["id"]) == []


BAD_IMAGE_REQUESTS = [
    ({"prompt": "   "}, "the prompt is empty"),
    ({"width": 65}, "not a multiple of 16"),
    ({"width": 512}, "width 512 is outside 16..256 for profile tiny"),
    ({"steps": 80}, "steps 80 is over 50 for profile tiny"),
    ({"seed": -1}, "greater than or equal to 0"),
    # One more than a JavaScript number holds exactly: a browser would show another seed.
    ({"seed": 2**53}, "less than or equal to 9007199254740991"),
    ({"colour": "red"}, "Extra inputs are not permitted"),
    ({"loras": [{"id": "x", "url": "http://example.com/a"}]}, "exactly one of 'id' or 'url'"),
    ({"loras": [{"id": "x", "scale": 99}]}, "less than or equal to 8"),
    ({"webhook_url": "ftp://example.com/hook"}, "http:// or https://"),
    ({"webhook_url": "http://127.0.0.1:9/hook"}, "loopback address"),
    ({"deadline_s": 10**9}, "over the 86400s maximum"),
]


def test_bad_image_requests_get_422_with_a_reason(api: Api):
    key = api.key()
    for change, reason in BAD_IMAGE_REQUESTS:
        response = api.call("POST", "/v1/images", key, json=image_body(**change))
        assert response.status_code == 422, change
        assert reason in json.dumps(response.json()), (change, response.json())
    assert api.call("GET", "/v1/requests", key).json() == []  # nothing was queued
    # Without a key, the limits that depend on the profile and settings are not disclosed: 401 first.
    for change in ({"width": 512}, {"steps": 80}, {"deadline_s": 10**9}):
        assert api.call("POST", "/v1/images", None, json=image_body(**change)).status_code == 401, change


def test_malformed_and_oversized_bodies(make_api):
    # /v1/images takes an image and a mask as data: URIs: its body limit follows the image limit.
    api = make_api(max_input_image_bytes=256 << 10)
    key = api.key()
    garbled = api.call("POST", "/v1/images", key, content=b"{not json", headers={"content-type": "application/json"})
    assert garbled.status_code == 422 and "JSON decode error" in json.dumps(garbled.json())
    huge = api.call("POST", "/v1/images", key, content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "limit" in huge.json()["detail"]
    assert api.call("GET", "/v1/requests/req_nope", key).status_code == 404


def test_json_nested_deeper_than_the_parser_goes_is_a_422_not_a_crash(api: Api):
    key = api.key()
    deep = "[" * 100_000 + "]" * 100_000
    body = api.call("POST", "/v1/images", key, content=deep.encode(), headers={"content-type": "application/json"})
    assert body.status_code == 422 and "JSON decode error" in json.dumps(body.json()), body.text
    form = {k: str(v) for k, v in image_body(loras=deep).items()}
    part = api.call("POST", "/v1/images", key, files={"image": ("in.png", b"png", "image/png")}, data=form)
    assert part.status_code == 422 and "form part 'loras' is not JSON" in part.json()["detail"], part.text
    # The key's next request is served as ever.
    assert api.call("POST", "/v1/images", key, json=image_body()).status_code == 202


def test_a_large_body_is_read_only_for_a_live_key(api: Api):
    """A JSON body large enough to cost something (data: URIs run to tens of megabytes) is read
    only once its key is admitted: a stranger's upload costs a header check, not a read and a
    parse. A live key's large body still goes in, counted once against its limit."""
    parts_sent = 0

    async def whitespace() -> AsyncIterator[bytes]:  # chunked: no Content-Length to go by
        nonlocal parts_sent
        for _ in range(16):
            parts_sent += 1
            yield b" " * (256 << 10)

    async def post(headers: dict[str, str], content: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=api.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/images", content=content, headers=headers)

    stranger = {"Authorization": f"Bearer dsk_{'0' * 16}_{'x' * 40}", "content-type": "application/json"}
    refused = asyncio.run(post(stranger, whitespace()))
    assert refused.status_code == 401, refused.text
    assert parts_sent <= 2, f"{parts_sent} of 16 parts were read for a key that does not exist"

    key = api.key(rate=2)
    padded = json.dumps({"prompt": "a red cat", "width": 64, "height": 64}).encode() + b" " * (300 << 10)
    headers = {"Authorization": key["Authorization"], "content-type": "application/json"}
    assert asyncio.run(post(headers, padded)).status_code == 202
    assert asyncio.run(post(headers, padded)).status_code == 202
    assert asyncio.run(post(headers, padded)).status_code == 429  # two a minute: each counted once


def test_ids_and_urls_no_database_or_client_can_hold_are_refused_not_crashed(make_api, db_url: str):
    # PostgreSQL takes no NUL in any text, and httpx no control character in a URL: such input
    # gets a 4xx with the reason on every database, and a good request beside it still goes in.
    api = make_api(db_url=db_url, allow_loopback_urls=True)
    key = api.key()
    for method, path in (
        ("GET", "/v1/requests/req_%00x"),
        ("GET", "/v1/requests/req_%00x/result"),
        ("POST", "/v1/requests/req_%00x/cancel"),
        ("GET", "/v1/requests/req_%00x/events"),
        ("GET", "/v1/loras/lora_%00x"),
    ):
        refused = api.call(method, path, key)
        assert refused.status_code == 422 and refused.json()["detail"].startswith("path."), (path, refused.text)
    bad_bodies = [
        (image_body(loras=[{"id": "lora_\x00"}]), "body.loras.0.id"),
        (image_body(webhook_url="http://127.0.0.1:9/hook\x00"), "control characters"),
        (image_body(webhook_url="http://127.0.0.1:9/a\nb"), "control characters"),
        (image_body(loras=[{"url": "http://127.0.0.1:9/a\x7f.safetensors"}]), "control characters"),
        (image_body(loras=[{"url": "http://[::1/a.safetensors"}]), "body.loras.0.url"),
        ({"task": "edit", "prompt": "night", "image": "http://127.0.0.1:9/a\nb.png"}, "control characters"),
        ({"task": "edit", "prompt": "night", "image": "http://[::1/a.png"}, "body.image"),
    ]
    for body, reason in bad_bodies:
        refused = api.call("POST", "/v1/images", key, json=body)
        assert refused.status_code == 422 and reason in refused.json()["detail"], (body, refused.text)
    good = api.call("POST", "/v1/images", key, json=image_body())
    assert good.status_code == 202
    assert [view["request_id"] for view in api.call("GET", "/v1/requests", key).json()] == [good.json()["request_id"]]


def test_a_training_form_that_does_not_validate_gets_422_naming_the_field(make_api, db_url: str):
    api = make_api(db_url=db_url)
    key = api.key()

    def submit(**data: str):
        return api.call("POST", "/v1/loras", key, data={"trigger_word": "sks", **data})

    for data, reason in (
        ({"dataset_url": "http://"}, "body.dataset_url"),
        ({"dataset_url": "http:// x"}, "body.dataset_url"),
        ({"dataset_url": "http://example.com/d\x00.zip"}, "control characters"),
        ({"dataset_url": "http://example.com/d.zip", "webhook_url": "http://example.com/a\nb"}, "control characters"),
        # Both go into the LoRA's row when the training succeeds: refused now, not lost then.
        ({"dataset_url": "http://example.com/d.zip", "name": "sun\x00sets"}, "body.name"),
        ({"dataset_url": "http://example.com/d.zip", "trigger_word": "s\x00ks"}, "body.trigger_word"),
    ):
        refused = submit(**data)
        assert refused.status_code == 422 and reason in refused.json()["detail"], (data, refused.text)


def test_prefer_wait_falls_back_to_202_when_not_done(api: Api):
    assert prefer_wait("respond-async, wait=5", 60) == 5 and prefer_wait("wait=600", 60) == 60
    assert prefer_wait(None, 60) == 0 and prefer_wait("handling=lenient", 60) == 0
    started = time.monotonic()
    response = api.call("POST", "/v1/images", api.key(), json=image_body(), headers={"Prefer": "wait=0.5"})
    assert response.status_code == 202 and 0.4 < time.monotonic() - started < 5


def test_lora_training_submissions_are_checked(api: Api):
    key = api.key()

    def submit(files=None, **data):
        return api.call("POST", "/v1/loras", key, data={"trigger_word": "sks", **data}, files=files)

    both = submit(files={"dataset": ("d.zip", dataset_zip())}, dataset_url="http://example.com/d.zip")
    assert both.status_code == 422 and "exactly one of" in both.json()["detail"]
    assert "exactly one of" in submit().json()["detail"]
    not_zip = submit(files={"dataset": ("d.zip", b"not a zip")})
    assert not_zip.status_code == 422 and "zip" in not_zip.json()["detail"]
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    no_images = submit(files={"dataset": ("d.zip", empty.getvalue())})
    assert no_images.status_code == 422 and "image" in no_images.json()["detail"]
    bracket = submit(files={"dataset": ("d.zip", dataset_zip())}, trigger_word="[sks]")
    assert bracket.status_code == 422 and "without tabs or brackets" in bracket.json()["detail"]

    ok = submit(files={"dataset": ("d.zip", dataset_zip())}, name="sunsets", steps="3")
    assert ok.status_code == 202, ok.text
    view = api.call("GET", f"/v1/requests/{ok.json()['request_id']}", key).json()
    assert view["kind"] == "training"
    # The promised rank is explicit (the tiny profile's default), and the dataset is served to miners.
    assert (view["input"]["rank"], view["input"]["steps"], view["input"]["name"]) == (4, 3, "sunsets")
    blob = api.client.get(f"/v1/blobs/{view['input']['dataset_sha256']}")
    assert blob.status_code == 200 and blob.content == dataset_zip()


def test_blobs_serve_only_assets(api: Api):
    asset = api.orch.assets.put(b"lora bytes")
    private = api.orch.results.put(b"a client's image")
    assert api.client.get(f"/v1/blobs/{asset}").content == b"lora bytes"
    assert api.client.get(f"/v1/blobs/{private}").status_code == 404
    assert api.client.get("/v1/blobs/..%2f..%2fetc").status_code == 404


def test_loras_by_url_are_fetched_checked_and_stored(make_api, server):
    api = make_api(allow_loopback_urls=True)
    key = api.key()
    server.files = {
        "/good.safetensors": lora_file(),
        "/bad.safetensors": b"\x80\x04 pickle",
        # Reads as a LoRA, but for a model whose layers are 8 wide: no miner of this profile could load it.
        "/other-model.safetensors": lora_file(width=8),
        "/no-such-layer.safetensors": save_safetensors(
            {
                "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 2),
            }
        ),
    }
    url = server.url("/good.safetensors")
    ok = api.call("POST", "/v1/images", key, json=image_body(loras=[{"url": url, "scale": 0.5}]))
    assert ok.status_code == 202, ok.text
    [lora] = api.call("GET", f"/v1/requests/{ok.json()['request_id']}", key).json()["input"]["loras"]
    assert (lora["url"], lora["scale"]) == (url, 0.5)
    assert api.client.get(f"/v1/blobs/{lora['sha256']}").content == lora_file()

    wrong = api.call("POST", "/v1/images", key, json=image_body(loras=[{"url": url, "sha256": "0" * 64}]))
    assert wrong.status_code == 422 and "not the 000" in wrong.json()["detail"]
    bad = api.call("POST", "/v1/images", key, json=image_body(loras=[{"url": server.url("/bad.safetensors")}]))
    assert bad.status_code == 422 and "pickle" in bad.json()["detail"]
    missing = api.call("POST", "/v1/images", key, json=image_body(loras=[{"url": server.url("/none")}]))
    assert missing.status_code == 422 and "HTTP 404" in missing.json()["detail"]

    def submit(path: str):
        return api.call("POST", "/v1/images", key, json=image_body(loras=[{"url": server.url(path)}]))

    misfit = submit("/other-model.safetensors")
    assert misfit.status_code == 422, misfit.text
    assert "does not fit this profile" in misfit.json()["detail"] and "needs (2, 32)" in misfit.json()["detail"]
    nowhere = submit("/no-such-layer.safetensors")
    assert nowhere.status_code == 422 and "targets no layer" in nowhere.json()["detail"]
    # Nothing refused was kept for miners to download.
    assert not api.orch.assets.exists(kit.sha256(lora_file(width=8)))


def test_a_client_lora_that_cannot_be_checked_now_is_answered_503_and_not_kept(make_api, server, monkeypatch):
    api = make_api(allow_loopback_urls=True)
    server.files = {"/good.safetensors": lora_file()}

    def gone(fn, args, time_limit):
        raise model_code.ModelCodeUnavailable("the LoRA could not be checked: the process checking it stopped")

    monkeypatch.setattr(model_code, "run", gone)
    body = image_body(loras=[{"url": server.url("/good.safetensors")}])
    refused = api.call("POST", "/v1/images", api.key(), json=body)
    assert refused.status_code == 503 and "could not be checked" in refused.json()["detail"]
    assert not api.orch.assets.exists(kit.sha256(lora_file()))


def test_scores_are_signed_by_the_orchestrator(make_api):
    api = make_api(score_fn=lambda store, start, end: {"5Miner": 0.75})
    response = api.client.get(f"/v1/scores?for={VALIDATOR.ss58_address}")
    assert response.status_code == 200
    body = response.json()
    assert body["scores"] == {"5Miner": 0.75} and body["orchestrator"] == ORCHESTRATOR.ss58_address
    assert body["window"]["start"] < body["window"]["end"]

    def check(content: bytes, path: str = f"/v1/scores?for={VALIDATOR.ss58_address}", headers=response.headers):
        return verify_request(
            headers,
            content,
            method="GET",
            path=path,
            receiver_ss58=VALIDATOR.ss58_address,
            nonce_store=MemoryNonceStore(),
            policy=SenderPolicy.allow_list([ORCHESTRATOR.ss58_address]),
        )

    assert check(response.content).hotkey_ss58 == ORCHESTRATOR.ss58_address
    with pytest.raises(BadSignature):
        check(response.content.replace(b"0.75", b"0.99"))
    # Signed over the target as the validator sent it, as every signed exchange is.
    encoded = f"/v1/%73cores?for={VALIDATOR.ss58_address}"
    sent = api.client.get(encoded)
    assert sent.status_code == 200
    assert check(sent.content, encoded, sent.headers).hotkey_ss58 == ORCHESTRATOR.ss58_address
    assert api.client.get("/v1/scores?for=not-a-hotkey").status_code == 422


def test_serve_command_builds_the_app_from_its_flags(tmp_path, monkeypatch):
    import uvicorn
    from sse_starlette.sse import AppStatus

    started: dict[str, Any] = {}

    def run(server: uvicorn.Server, sockets: Any = None) -> None:
        config = server.config
        started.update(app=config.app, host=config.host, port=config.port, server=server)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.delenv("DIPPY_ORCH_PUBLIC_URL", raising=False)
    monkeypatch.setenv("DIPPY_ORCH_DASHBOARD_TOKEN", "operator-token-of-this-test")  # serves the dashboard
    runner = CliRunner()
    common = ["serve", "--data-dir", str(tmp_path / "orch"), "--port", "8123"]

    no_key = runner.invoke(orchestrator_app, common)
    assert no_key.exit_code == 2 and "no signing key" in no_key.output
    no_chain = runner.invoke(orchestrator_app, [*common, "--dev-key", "//Alice", "--chain-data-dir", str(tmp_path)])
    assert no_chain.exit_code == 2 and "no local chain" in no_chain.output

    LocalChain(tmp_path / "chain" / "chain.sqlite").close()
    args = [*common, "--dev-key", "//Alice", "--chain-data-dir", str(tmp_path / "chain"), "--allow-loopback"]
    result = runner.invoke(orchestrator_app, args)
    assert result.exit_code == 0, result.output
    orch: Orchestrator = started["app"].state.orchestrator
    try:
        assert (started["host"], started["port"]) == ("127.0.0.1", 8123)
        assert orch.settings.public_url == "http://127.0.0.1:8123" and orch.settings.allow_loopback_urls
        assert orch.signer.ss58_address == ORCHESTRATOR.ss58_address and orch.chain is not None
        assert (tmp_path / "orch" / "orchestrator.sqlite").is_file()  # the database `keys` uses too
        # Ctrl-C tells open event streams (sse-starlette's flag) to end before uvicorn waits for them.
        started["server"].handle_exit(signal.SIGINT, None)
        assert AppStatus.should_exit and started["server"].should_exit
    finally:
        orch.stop()


def test_health_and_readiness(api: Api):
    # Alone on its database, it leads every singleton loop (each takes its role at its first run).
    everything = {"status": "ok", "leads": sorted(ROLES)}
    kit.wait_until(lambda: api.client.get("/health").json() == everything, 10, "every loop to be led")
    ready = api.client.get("/ready")
    # Up, with its loops running and its database reachable, but no miner to send work to.
    assert ready.status_code == 503 and ready.json()["problems"] == ["no healthy miner"]
