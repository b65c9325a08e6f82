"""The OpenAI-compatible image endpoints, driven through the official `openai` client against a
live orchestrator and a real tiny miner; and the offline API pages (/docs, /redoc).

One subnet for the module (a miner, an orchestrator): generations inline (b64_json) and by URL
(the same PNG), n images with different seeds, edits with and without an OpenAI-style mask (its
transparent part becomes the native mask's white), the refusals as the client's typed errors,
and the README's openai example run as written (its address and key filled in).
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import orchestrator.orch_kit as kit
from api_docs_kit import assert_docs_load_only_served_assets
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.openai_compat import (
    Refused,
    option_problem,
    parse_size,
    repaint_mask,
    signed_url,
    url_problem,
)
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.protocol.limits import profile_limits
from orchestrator.orch_kit import ORCHESTRATOR, noise_png

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = profile_limits("tiny")
FAST = {"steps": 2}  # extensions, through the client's extra_body
subnet = kit.subnet  # fixture: a subnet of its own, for a test that needs other miners


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, tiny_engine: Any) -> Iterator[tuple[kit.Subnet, kit.OrchHandle]]:
    subnet = kit.Subnet(tmp_path_factory.mktemp("openai"), tiny_engine)
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator()
    yield subnet, orch
    subnet.close()


def openai_client(orch: kit.OrchHandle, secret: str) -> openai.OpenAI:
    # No retries: each call is one request, so a refusal is seen as sent.
    return openai.OpenAI(base_url=f"{orch.url}/v1", api_key=secret, max_retries=0, timeout=120)


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def status(orch: kit.OrchHandle, secret: str, request_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{orch.url}/v1/requests/{request_id}", headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


# ---- end to end ----------------------------------------------------------------------------------


def test_generations_inline_and_by_url_give_the_same_png_and_n_gives_different_images(net):
    subnet, orch = net
    key = subnet.new_key(orch)
    client = openai_client(orch, key.secret)

    two = client.images.generate(prompt="a lighthouse at dusk", size="64x64", n=2, extra_body={"seed": 5, **FAST})
    assert len(two.data) == 2 and two.created > 0
    images = [base64.b64decode(item.b64_json) for item in two.data]
    assert all(png(data).size == (64, 64) for data in images)
    assert images[0] != images[1]
    assert [item.model_extra["seed"] for item in two.data] == [5, 6]
    for item in two.data:
        view = status(orch, key.secret, item.model_extra["request_id"])
        assert (view["kind"], view["status"], view["input"]["steps"]) == ("inference", "succeeded", 2)

    by_url = client.images.generate(
        prompt="a lighthouse at dusk", size="64x64", response_format="url", extra_body={"seed": 5, **FAST}
    )
    [item] = by_url.data
    assert item.b64_json is None
    # As OpenAI's: the link itself opens the image, no key needed.
    downloaded = httpx.get(item.url)
    assert downloaded.status_code == 200 and downloaded.content == images[0]
    assert downloaded.headers["content-type"] == "image/png"
    other = item.url.replace(item.model_extra["request_id"], two.data[1].model_extra["request_id"])
    forged = httpx.get(other)
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "invalid_link"


def test_edits_with_an_image_and_with_an_openai_mask(net):
    subnet, orch = net
    key = subnet.new_key(orch)
    client = openai_client(orch, key.secret)
    picture = noise_png(32, 32, seed=3)

    edited = client.images.edit(
        image=("in.png", picture, "image/png"), prompt="make it stormy", extra_body={"seed": 3, **FAST}
    )
    [item] = edited.data
    assert png(base64.b64decode(item.b64_json)).size == (32, 32)  # the input's size
    view = status(orch, key.secret, item.model_extra["request_id"])
    assert (view["kind"], view["input"]["seed"], view["input"]["steps"]) == ("edit", 3, 2)  # extra_body arrived

    # OpenAI's convention: fully transparent pixels (the right half) are edited.
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 0, 32, 32))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    inpainted = client.images.edit(
        image=("in.png", picture, "image/png"),
        mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt="a red door",
        size="32x32",
        extra_body={"seed": 4, **FAST},
    )
    [item] = inpainted.data
    view = status(orch, key.secret, item.model_extra["request_id"])
    assert (view["kind"], view["status"]) == ("inpaint", "succeeded")
    native = Image.open(io.BytesIO(orch.orch.assets.get(view["input"]["mask_sha256"])))
    assert native.mode == "L"
    assert (native.getpixel((0, 0)), native.getpixel((31, 31))) == (0, 255)  # white repaints


def test_refusals_are_the_clients_typed_errors_with_the_reason(net):
    subnet, orch = net
    key = subnet.new_key(orch)
    client = openai_client(orch, key.secret)

    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt="a lighthouse", size="1024x1024")
    assert bad_size.value.status_code == 400 and bad_size.value.param == "size"
    assert "size 1024x1024 is not served by model tiny: width 1024 is outside 16..256" in bad_size.value.message

    with pytest.raises(openai.BadRequestError) as bad_model:
        client.images.generate(prompt="a lighthouse", model="dall-e-3", size="64x64")
    assert bad_model.value.code == "model_not_found" and "serves 'tiny'" in bad_model.value.message

    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.generate(prompt="a lighthouse", size="64x64", n=9)
    assert too_many.value.param == "n"

    with pytest.raises(openai.BadRequestError) as styled:
        client.images.generate(prompt="a lighthouse", size="64x64", style="vivid")
    assert styled.value.param == "style" and "not offered" in styled.value.message

    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(image=("in.png", b"not an image", "image/png"), prompt="x", extra_body=FAST)
    assert "not a PNG, JPEG or WebP image" in not_an_image.value.message

    with pytest.raises(openai.AuthenticationError) as bad_key:
        openai_client(orch, "dsk_not-a-key").images.generate(prompt="a lighthouse", size="64x64")
    assert bad_key.value.code == "invalid_api_key"

    limited = subnet.new_key(orch, rate=1)
    with pytest.raises(openai.BadRequestError):  # counted: every authenticated call is
        openai_client(orch, limited.secret).images.generate(prompt="a lighthouse", size="1x1")
    with pytest.raises(openai.RateLimitError) as spent:
        openai_client(orch, limited.secret).images.generate(prompt="a lighthouse", size="64x64")
    assert int(spent.value.response.headers["retry-after"]) >= 1

    # A spent quota is 402, not a rate limit: the SDK must not retry it.
    from dippy_studio.orchestrator.usage import Limits, Quota

    capped = subnet.new_key(orch)
    orch.store.set_api_key_quota(capped.id, Quota(day=Limits(images=0)))
    with pytest.raises(openai.APIStatusError) as over:
        openai_client(orch, capped.secret).images.generate(prompt="a lighthouse", size="64x64")
    assert over.value.status_code == 402 and over.value.code == "insufficient_quota"
    assert "daily quota of 0 images reached" in over.value.message


def test_the_readme_openai_example_runs_as_written(net, tmp_path, monkeypatch):
    subnet, orch = net
    key = subnet.new_key(orch)
    [code] = re.findall(r"<!-- openai-example -->\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert 'base_url="http://127.0.0.1:8090/v1"' in code and 'api_key="dsk_..."' in code
    code = code.replace("http://127.0.0.1:8090", orch.url).replace("dsk_...", key.secret)
    monkeypatch.chdir(tmp_path)
    # What the example's reader has at hand: a mask, transparent where the sky is repainted.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 24))
    mask.save(tmp_path / "sky-mask.png")

    exec(compile(code, "README.md", "exec"), {})

    assert png((tmp_path / "lighthouse.png").read_bytes()).size == (64, 64)
    assert png((tmp_path / "starry.png").read_bytes()).size == (64, 64)


# ---- without miners --------------------------------------------------------------------------------


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    """An orchestrator with no miners, and a key for it."""
    app = create_app(OrchestratorSettings(data_dir=tmp_path / "orch", profile="tiny"), signer=ORCHESTRATOR)
    with TestClient(app) as client:
        secret = app.state.orchestrator.store.create_api_key("t", rate_limit_per_minute=1000).secret
        yield client, secret


def test_with_no_healthy_miner_a_call_is_refused_at_once_not_held(bare):
    client, secret = bare
    answer = client.post(
        "/v1/images/generations",
        json={"prompt": "a lighthouse", "size": "64x64"},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert answer.status_code == 503 and answer.headers["retry-after"]
    error = answer.json()["error"]
    assert error["type"] == "server_error" and "no healthy miner" in error["message"]
    [request_id] = re.findall(r"req_\w+", error["message"])
    listed = client.get(f"/v1/requests/{request_id}", headers={"Authorization": f"Bearer {secret}"}).json()
    assert listed["status"] == "canceled"


def test_an_edit_whose_loras_nest_past_the_parser_is_a_400_not_a_crash(bare):
    client, secret = bare
    answer = client.post(
        "/v1/images/edits",
        data={"prompt": "make it night", "loras": "[" * 100_000 + "]" * 100_000},
        files={"image": ("in.png", noise_png(), "image/png")},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "loras" and "not a JSON array" in answer.json()["error"]["message"]


def test_docs_and_redoc_load_only_assets_the_orchestrator_serves(bare):
    client, _ = bare
    assert_docs_load_only_served_assets(client)


# ---- pure pieces ---------------------------------------------------------------------------------


def test_an_image_link_opens_until_it_expires_and_only_with_its_own_signature():
    url = signed_url(ORCHESTRATOR, "http://h/", "req_1", 1000)
    expires, signature = re.search(r"/v1/images/files/req_1\?expires=(\d+)&signature=(\w+)$", url).groups()
    assert url_problem(ORCHESTRATOR, "req_1", int(expires), signature, now=999.0) is None
    assert "expired" in url_problem(ORCHESTRATOR, "req_1", int(expires), signature, now=1000.0)
    assert "does not match" in url_problem(ORCHESTRATOR, "req_1", 2000, signature, now=999.0)
    assert "does not match" in url_problem(ORCHESTRATOR, "req_2", 1000, signature, now=999.0)
    assert "does not match" in url_problem(ORCHESTRATOR, "req_1", 1000, "zz", now=999.0)


def test_sizes_are_checked_against_the_profile_with_the_reason():
    assert parse_size("64x128", TINY, None) == (64, 128)
    assert parse_size("auto", TINY, None) is None and parse_size(None, TINY, None) is None
    for size, reason in (
        ("big", "is not WIDTHxHEIGHT"),
        ("100x100", "width 100: 100 is not a multiple of 16"),
        ("512x64", "width 512 is outside 16..256 for profile tiny"),
    ):
        with pytest.raises(Refused, match=reason) as refused:
            parse_size(size, TINY, None)
        assert (refused.value.status, refused.value.param) == (400, "size")


def test_options_that_would_change_the_image_are_refused_and_harmless_ones_ignored():
    assert option_problem({"quality": "standard", "user": "u1", "moderation": "low", "background": "auto"}) is None
    assert option_problem({"quality": "hd"}).param == "quality"
    assert option_problem({"output_format": "jpeg"}).code == "unsupported_value"
    assert option_problem({"frame_count": 3}).code == "unknown_parameter"
    assert option_problem({"stream": True}).message == "stream True is not offered by this API (served: false)"
    assert option_problem({"style": ["vivid"]}).param == "style"  # unhashable, still a reason


def test_an_openai_mask_becomes_white_where_it_is_transparent():
    mask = Image.new("LA", (4, 2), (0, 255))
    mask.putpixel((3, 1), (0, 0))
    mask.putpixel((0, 0), (0, 10))  # only fully transparent pixels are edited, as OpenAI's
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    native = Image.open(io.BytesIO(repaint_mask(buffer.getvalue(), 1 << 20)))
    assert list(native.getdata()) == [0, 0, 0, 0, 0, 0, 0, 255]

    opaque = io.BytesIO()
    Image.new("L", (4, 2), 255).save(opaque, format="PNG")
    with pytest.raises(Refused, match="no alpha channel"):
        repaint_mask(opaque.getvalue(), 1 << 20)
    with pytest.raises(Refused, match="over this model's 4 pixels"):
        repaint_mask(buffer.getvalue(), 4)


def test_images_not_done_in_time_answer_504_naming_their_requests_and_are_not_retried(subnet):
    stub = subnet.add_stub_miner("//Bob")  # takes jobs, never calls back
    orch = subnet.start_orchestrator(max_wait_s=1.0)
    key = subnet.new_key(orch)
    # The client's default retries: a 504 must not make it queue the same work again.
    client = openai.OpenAI(base_url=f"{orch.url}/v1", api_key=key.secret, timeout=30)

    with pytest.raises(openai.InternalServerError) as late:
        client.images.generate(prompt="a lighthouse", size="64x64")
    assert late.value.status_code == 504 and late.value.code == "timeout"
    [request_id] = re.findall(r"req_\w+", late.value.message)
    assert status(orch, key.secret, request_id)["status"] in ("dispatched", "running", "queued")
    # Sent to the miner once. (On a loaded machine the first send may come after the 504.)
    kit.wait_until(lambda: [job for job in stub.received if "job_id" in job], 10, "the job to reach the miner")
    assert len([job for job in stub.received if "job_id" in job]) == 1
