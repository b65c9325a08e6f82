"""Image editing through the orchestrator: `POST /v1/images` with `task` edit, img2img or inpaint.

End to end on the tiny profile (real miners over HTTP, the in-process engine as the auditor): each
kind, sent as JSON with a data: URI or as a multipart upload, gets the engine's exact bytes for its
canonical input and passes its audit; an input URL is fetched once and its sha256 checked; every
bad input is refused with a 4xx that says why; miners that ignore the input image or return it
unchanged fail their audits; an edit never goes to a miner that does not list `edit`; and the score
weights per kind follow the settings.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import astuple
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

import miner_kit
import orchestrator.orch_kit as kit
from dippy_studio.engine import GenerationRequest
from dippy_studio.miner.store import JobRecord
from dippy_studio.miner.workers import AbortCheck, Outcome
from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.app import create_app
from dippy_studio.orchestrator.routing import Candidate, eligible
from dippy_studio.orchestrator.scoring import KindWeights, kind_weights
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.protocol.images import canonical_png, read_input_image
from orchestrator.orch_kit import ORCHESTRATOR, noise_png, sha256, wait_status, wait_until

server = miner_kit.server  # fixture: serves the client's input image by URL
subnet = kit.subnet  # fixture: a local chain, miners and orchestrators

IMAGE_TASKS = ("edit", "img2img", "inpaint")
# Not a multiple of 16 on purpose: the output is the input's size rounded down (48x32).
INPUT_SIZE = (48, 40)


def png_bytes(image: Image.Image, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def half_mask(size: tuple[int, int] = INPUT_SIZE) -> bytes:
    """White (repaint) on the right half, black (keep) on the left."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 2, 0, size[0], size[1]))
    return png_bytes(mask)


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def edit_body(task: str, image: str | None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"task": task, "prompt": "make it stormy", "seed": 11, "steps": 2}
    if image is not None:
        body["image"] = image
    if task == "inpaint":
        body["mask"] = data_uri(half_mask())
    if task in ("img2img", "inpaint"):
        body["strength"] = 0.7
    return {**body, **overrides}


def multipart(task: str, upload: bytes, mask: bytes | None = None, **fields: Any) -> dict[str, Any]:
    """httpx/TestClient arguments for the same request as a multipart form with file parts."""
    data = {"task": task, "prompt": "make it stormy", "seed": "12", "steps": "2", **fields}
    files = {"image": ("in.png", upload, "image/png")}
    if task == "inpaint":
        files["mask"] = ("mask.png", mask or half_mask(), "image/png")
    if task in ("img2img", "inpaint"):
        data.setdefault("strength", "0.7")
    return {"data": data, "files": files}


def expected_png(engine: Any, view: dict[str, Any], assets: Any) -> bytes:
    """What the engine renders for the job as the orchestrator stored it."""
    job = view["input"]
    mask = job.get("mask_sha256")
    request = GenerationRequest(
        task=job["task"],
        prompt=job["prompt"],
        seed=job["seed"],
        width=job["width"],
        height=job["height"],
        steps=job["steps"],
        guidance=job["guidance"],
        image=assets.get(job["image_sha256"]),
        mask=assets.get(mask) if mask else None,
        strength=job.get("strength"),
    )
    return engine.generate(request).png


def audit_of(orch: kit.OrchHandle, request_id: str) -> Any:
    wait_until(lambda: orch.store.list_audits(job_id=request_id), 60, f"the audit of {request_id}")
    [audit] = orch.store.list_audits(job_id=request_id)
    return audit


# ---- end to end ----------------------------------------------------------------------------------


def test_each_image_kind_by_json_and_upload_gets_the_engines_bytes_and_passes_its_audit(subnet):
    bob = subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(audit_all=True)
    client = subnet.client(orch, subnet.new_key(orch))
    image = noise_png(*INPUT_SIZE, seed=3)
    canonical = canonical_png(read_input_image(image, 1 << 20))

    submitted = []
    for task in IMAGE_TASKS:
        by_json = client.post("/v1/images", json=edit_body(task, data_uri(image)))
        by_upload = client.post("/v1/images", **multipart(task, image))
        for response in (by_json, by_upload):
            assert response.status_code == 202, response.text
            submitted.append((task, response.json()["request_id"]))

    for task, request_id in submitted:
        view = wait_status(client, request_id, {"succeeded", "failed"})
        assert (view["status"], view["kind"], view["miner_hotkey"]) == ("succeeded", task, bob.hotkey), view
        job = view["input"]
        # Stored once, canonical: what the miner and the auditor both read.
        assert job["image_sha256"] == sha256(canonical)
        assert (job["width"], job["height"]) == (48, 32)  # the input's size, in multiples of 16
        assert ("strength" in job) == (task != "edit") and ("mask_sha256" in job) == (task == "inpaint")
        result = client.get(f"/v1/requests/{request_id}/result").content
        assert result == expected_png(subnet.engine, view, orch.orch.assets)
        assert Image.open(io.BytesIO(result)).size == (48, 32)
        audit = audit_of(orch, request_id)
        assert audit.verdict == "pass", audit.evidence["verdict"]
        assert audit.evidence["verdict"]["metrics"]["comparison"] == "exact"
        assert audit.evidence["request"]["image_sha256"] == job["image_sha256"]


def test_an_input_url_is_fetched_once_and_checked_against_its_sha256(subnet, server):
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    # A JPEG: decoded once at the door, passed on as the canonical PNG of its pixels.
    photo = png_bytes(Image.open(io.BytesIO(noise_png(*INPUT_SIZE, seed=5))).convert("RGB"), format="JPEG")
    server.files["/photo.jpg"] = photo
    url = server.url("/photo.jpg")

    wrong = client.post("/v1/images", json=edit_body("edit", url, image_sha256="0" * 64))
    assert wrong.status_code == 422 and f"has sha256 {sha256(photo)}, not the {'0' * 64} given" in wrong.text

    submitted = client.post("/v1/images", json=edit_body("edit", url, image_sha256=sha256(photo)))
    assert submitted.status_code == 202, submitted.text
    del server.files["/photo.jpg"]  # the miner downloads the orchestrator's copy, never the client's URL
    view = wait_status(client, submitted.json()["request_id"], {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    assert view["input"]["image_sha256"] == sha256(canonical_png(read_input_image(photo, 1 << 20)))

    gone = client.post("/v1/images", json=edit_body("edit", url))
    assert gone.status_code == 422 and "HTTP 404" in gone.json()["detail"]


# ---- refusals ------------------------------------------------------------------------------------


@pytest.fixture
def make_api(tmp_path) -> Iterator[Callable[..., TestClient]]:
    """An orchestrator app with no miners, and a client with a key: submissions are only checked."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        settings = OrchestratorSettings(data_dir=tmp_path / f"orch{len(clients)}", audit=False, **overrides)
        client = TestClient(create_app(settings, signer=ORCHESTRATOR))
        client.__enter__()
        secret = client.app.state.orchestrator.store.create_api_key("client").secret
        client.headers["Authorization"] = f"Bearer {secret}"
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def claimed_size_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG that claim `width` x `height`: a decompression bomb's header,
    with one row of pixel data (decoding it all would take width * height * 3 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def animated_png() -> bytes:
    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 0, 255))]
    return png_bytes(frames[0], save_all=True, append_images=frames[1:], duration=100)


IMAGE = noise_png(*INPUT_SIZE, seed=1)
BAD_INPUTS: list[tuple[dict[str, Any], int, str]] = [
    (edit_body("edit", data_uri(b"not an image at all")), 422, "is not a PNG, JPEG or WebP image we can read"),
    (edit_body("edit", data_uri(png_bytes(Image.new("RGB", (1040, 1024))))), 422, "over this model's 1048576"),
    (edit_body("edit", data_uri(claimed_size_png(20_000, 20_000))), 422, "too many pixels (a decompression bomb?)"),
    (edit_body("edit", data_uri(animated_png())), 422, "is animated (2 frames)"),
    (
        edit_body("inpaint", data_uri(IMAGE), mask=data_uri(half_mask((32, 32)))),
        422,
        "the mask is 32x32; it must be the image's size, 48x40",
    ),
    (edit_body("img2img", data_uri(IMAGE), strength=0), 422, "body.strength: Input should be greater than 0"),
    (edit_body("img2img", data_uri(IMAGE), strength=1.5), 422, "body.strength: Input should be less than or equal"),
    (edit_body("edit", data_uri(IMAGE), strength=0.5), 422, "task edit takes no strength"),
    ({"prompt": "a cat", "width": 64, "height": 64, "image": data_uri(IMAGE)}, 422, "task generate takes no input"),
    ({"prompt": "a cat"}, 422, "task generate needs width and height"),
    ({"prompt": "a cat", "width": 64, "height": 64, "image_sha256": "0" * 64}, 422, "so no image_sha256"),
    (edit_body("edit", None), 422, "task edit needs input image"),
    (edit_body("img2img", None, mask=data_uri(half_mask())), 422, "task img2img needs input image"),
    (edit_body("inpaint", data_uri(IMAGE), mask=None), 422, "task inpaint needs mask"),
    (edit_body("edit", data_uri(IMAGE), mask=data_uri(half_mask())), 422, "task edit takes no mask"),
    (edit_body("edit", data_uri(IMAGE), width=64), 422, "give both width and height, or neither"),
    (edit_body("edit", data_uri(IMAGE), width=512, height=512), 422, "width 512 is outside 16..256"),
    (edit_body("edit", "data:image/png;base64,@@@@"), 422, "data: URI is not valid base64"),
    (edit_body("edit", "data:image/png,rawbytes"), 422, "is not a base64 data: URI"),
    (edit_body("edit", "ftp://example.com/a.png"), 422, "must be an http(s):// URL, a data: URI"),
    (edit_body("edit", data_uri(IMAGE), image_sha256="0" * 64), 422, f"has sha256 {sha256(IMAGE)}, not the"),
    (edit_body("upscale", data_uri(IMAGE)), 422, "body.task: Input should be 'generate', 'edit'"),
]


@pytest.mark.parametrize(("body", "status", "reason"), BAD_INPUTS, ids=[reason[:40] for _, _, reason in BAD_INPUTS])
def test_every_bad_json_input_is_refused_with_its_reason(make_api, body, status, reason):
    client = make_api()
    response = client.post("/v1/images", json=body)
    assert response.status_code == status and reason in response.json()["detail"], response.text


def test_bad_uploads_and_limits_are_refused_with_their_reasons(make_api):
    client = make_api(max_input_image_bytes=64 << 10)
    cases = [
        (multipart("edit", b"\x00garbage"), 422, "is not a PNG, JPEG or WebP image we can read"),
        (multipart("img2img", animated_png()), 422, "is animated"),
        (multipart("img2img", IMAGE, strength="2"), 422, "strength"),
        (
            multipart("inpaint", IMAGE, half_mask((32, 32))),
            422,
            "the mask is 32x32; it must be the image's size, 48x40",
        ),
        (multipart("edit", IMAGE, image=data_uri(IMAGE)), 422, "given 2 times"),
        (multipart("edit", IMAGE, loras="not json"), 422, "form part 'loras' is not JSON"),
        (multipart("generate", IMAGE, width="64", height="64"), 422, "task generate takes no input image"),
        (multipart("edit", noise_png(160, 160)), 413, "image over the 65536-byte limit"),
    ]
    for arguments, status, reason in cases:
        response = client.post("/v1/images", **arguments)
        assert response.status_code == status and reason in response.json()["detail"], (reason, response.text)
    too_big = client.post("/v1/images", json=edit_body("edit", data_uri(noise_png(160, 160))))
    assert too_big.status_code == 413 and "the image is over the 65536-byte limit" in too_big.json()["detail"]
    stranger = client.post("/v1/images", headers={"Authorization": "Bearer dsk_nope"}, **multipart("edit", IMAGE))
    assert stranger.status_code == 401


def test_a_large_input_is_taken_and_the_output_fits_the_model(make_api):
    client = make_api()
    large = noise_png(320, 288, seed=2)  # about 280 KB, 370 KB as a data: URI; tiny serves up to 256
    submitted = client.post("/v1/images", json=edit_body("img2img", data_uri(large)))
    assert submitted.status_code == 202, submitted.text
    job = client.get(f"/v1/requests/{submitted.json()['request_id']}").json()["input"]
    assert (job["width"], job["height"]) == (256, 224)  # scaled to fit 256, aspect kept, multiples of 16


def test_a_task_the_profile_does_not_serve_is_refused(make_api):
    kontext = make_api(profile="tiny-kontext")  # edits and text-to-image only
    refused = kontext.post("/v1/images", json=edit_body("img2img", data_uri(IMAGE)))
    assert refused.status_code == 422
    assert refused.json()["detail"] == "profile tiny-kontext does not serve task img2img (it serves: edit, generate)"
    assert kontext.post("/v1/images", json=edit_body("edit", data_uri(IMAGE))).status_code == 202


def test_the_schema_documents_the_image_tasks(make_api):
    spec = make_api().get("/openapi.json").json()
    body = spec["paths"]["/v1/images"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    fields = spec["components"]["schemas"]["ImageRequest"]["properties"]
    assert {"task", "image", "image_sha256", "mask", "mask_sha256", "strength"} <= set(fields)
    assert fields["task"]["enum"] == ["generate", "edit", "img2img", "inpaint"]
    assert fields["image"]["examples"] and fields["mask"]["examples"] and fields["strength"]["examples"]
    tasks = {example.get("task", "generate") for example in spec["components"]["schemas"]["ImageRequest"]["examples"]}
    assert tasks == {"generate", "edit", "img2img", "inpaint"}
    form = spec["components"]["schemas"]["ImageForm"]["properties"]
    assert form["image"]["format"] == form["mask"]["format"] == "binary"


# ---- audits catch miners that skip the input -----------------------------------------------------


def cheating_runner(tmp_path: Any, engine: Any, cheat: str) -> Callable[[JobRecord, AbortCheck], Outcome]:
    """A miner lane that claims the honest engine's fingerprint but ignores the input image
    (renders the prompt as text-to-image) or returns the input image unchanged (at the output size)."""

    def run(record: JobRecord, check: AbortCheck) -> Outcome:
        job = record.request
        if cheat == "ignored_input":
            fields = {k: job[k] for k in ("prompt", "seed", "width", "height", "steps", "guidance")}
            png = engine.generate(GenerationRequest(**fields)).png
        else:
            image = httpx.get(job["image"]["url"]).content
            png = canonical_png(read_input_image(image, 1 << 20).resize((job["width"], job["height"])))
        path = tmp_path / f"{record.job_id}.png"
        path.write_bytes(png)
        return Outcome(str(path), sha256(png), len(png), engine.fingerprint)

    return run


@pytest.mark.parametrize("cheat", ["ignored_input", "returned_input"])
def test_a_miner_that_skips_the_input_image_fails_its_audit(subnet, tmp_path, cheat):
    eve = subnet.add_miner("//Eve", inference_runner=cheating_runner(tmp_path, subnet.engine, cheat))
    orch = subnet.start_orchestrator(audit_all=True)
    client = subnet.client(orch, subnet.new_key(orch))
    ids = [
        client.post("/v1/images", json=edit_body(task, data_uri(noise_png(*INPUT_SIZE, seed=9)))).json()["request_id"]
        for task in IMAGE_TASKS
    ]
    for request_id in ids:
        assert wait_status(client, request_id, {"succeeded", "failed"})["status"] == "succeeded"  # looks valid
        audit = audit_of(orch, request_id)
        assert (audit.miner_hotkey, audit.verdict) == (eve.hotkey, "fail"), audit.evidence["verdict"]
        assert "same profile fingerprint" in audit.evidence["verdict"]["reason"]
    assert orch.orch.refresh_scores().scores == {eve.hotkey: 0.0}


# ---- routing by task -----------------------------------------------------------------------------


def candidate(hotkey: str, tasks: list[str] | None) -> Candidate:
    lane = {"available": True, "workers_alive": 1, "queue_depth": 0, "queue_limit": 8}
    capacity: dict[str, Any] = {"profile": "tiny", "inference": lane, "training": lane}
    if tasks is not None:
        capacity["tasks"] = tasks
    return Candidate.from_capacity(hotkey, 1, "http://127.0.0.1:1", 1.0, 0.0, True, capacity)


def test_routing_leaves_out_miners_that_do_not_list_the_task():
    unsaid, generate_only, editor = candidate("a", None), candidate("b", ["generate"]), candidate("c", ["edit"])
    pool = [unsaid, generate_only, editor]
    assert eligible(pool, "inference", "tiny", task="edit") == [editor]
    assert eligible(pool, "inference", "tiny", task="generate") == [unsaid, generate_only]
    assert eligible(pool, "training", "tiny") == pool  # training needs no task


def test_an_edit_never_goes_to_a_miner_without_edit(subnet):
    # A stub miner's capacity names no tasks: text-to-image only.
    stub = subnet.add_stub_miner("//Charlie")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    edit = client.post("/v1/images", json=edit_body("edit", data_uri(IMAGE))).json()["request_id"]
    text = client.post("/v1/images", json=kit.image_body()).json()["request_id"]

    def sent(request_id: str) -> bool:  # wire job ids are the request's id and the attempt
        return any(str(body.get("job_id", "")).startswith(request_id) for body in stub.received)

    wait_until(lambda: sent(text), 15, "the text-to-image dispatch")
    assert not sent(edit)
    assert client.get(f"/v1/requests/{edit}").json()["status"] == "queued"

    # A miner that serves edits, once it shows up, gets it.
    bob = subnet.add_miner("//Bob")
    view = wait_status(client, edit, {"succeeded", "failed"})
    assert (view["status"], view["miner_hotkey"]) == ("succeeded", bob.hotkey)
    assert not sent(edit)


# ---- score weights -------------------------------------------------------------------------------


def test_kind_weights_split_inference_between_text_to_image_and_the_editing_kinds():
    defaults = OrchestratorSettings()
    assert astuple(kind_weights(0.7, 0.3, 0.8)) == pytest.approx((0.7, 0.06, 0.24))  # training, generate, edit
    assert kinds.score_weights(defaults) == pytest.approx(
        {"inference": 0.06, "edit": 0.24, "img2img": 0.24, "inpaint": 0.24, "training": 0.7}
    )
    assert kind_weights(0.5, 0.5, 0.0) == KindWeights(training=0.5, generate=0.5, edit=0.0)
    assert kind_weights(0.0, 1.0, 1.0) == KindWeights(training=0.0, generate=0.0, edit=1.0)
    changed = OrchestratorSettings(training_weight=0.5, inference_weight=0.5, edit_share=0.5)
    assert kinds.score_weights(changed)["edit"] == kinds.score_weights(changed)["inference"] == 0.25
    for bad in ({"training_weight": -0.1}, {"inference_weight": float("nan")}, {"edit_share": 1.5}):
        with pytest.raises(ValidationError):
            OrchestratorSettings(**bad)
    with pytest.raises(ValueError, match="edit_share must be in"):
        kind_weights(0.7, 0.3, -0.1)


def test_the_demo_cheater_is_caught_on_every_image_task(subnet):
    # The miner's own cheat (`cheat_rate`): each image job ignores its input or returns it unchanged.
    eve = subnet.add_miner("//Eve", settings={"cheat_rate": 1.0})
    orch = subnet.start_orchestrator(audit_all=True)
    client = subnet.client(orch, subnet.new_key(orch))
    image = data_uri(noise_png(*INPUT_SIZE, seed=10))
    ids = [client.post("/v1/images", json=edit_body(task, image)).json()["request_id"] for task in IMAGE_TASKS]
    for request_id in ids:
        assert wait_status(client, request_id, {"succeeded", "failed"})["status"] == "succeeded"
        audit = audit_of(orch, request_id)
        assert (audit.miner_hotkey, audit.verdict) == (eve.hotkey, "fail"), audit.evidence["verdict"]
