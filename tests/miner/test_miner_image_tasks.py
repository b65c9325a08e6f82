"""Miner image tasks (edit, img2img, inpaint): inputs fetched and verified, bytes as the engine's,
bad inputs failed as the sender's, tasks advertised and refused by profile, and the demo cheats."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
from PIL import Image, ImageDraw

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
from dippy_studio.miner.net import DownloadCache
from dippy_studio.miner.runners import Cheat, InferenceRunner, pick_cheat
from dippy_studio.protocol.images import canonical_png
from dippy_studio.protocol.outbound import UrlPolicy
from miner_kit import inference_job, miner_settings

SIZE = 64


def _picture() -> bytes:
    # Larger than the output and not square, so the engine's resize to the job's size is exercised.
    image = Image.new("RGB", (96, 80), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 10, 70, 60), fill=(240, 200, 40))
    draw.rectangle((0, 60, 96, 80), fill=(40, 160, 60))
    return canonical_png(image)


def _mask() -> bytes:
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    return canonical_png(mask)


PICTURE = _picture()
MASK = _mask()


def _serve(server, name: str, data: bytes) -> dict[str, str]:
    server.files[f"/blobs/{name}"] = data
    return {"url": server.url(f"/blobs/{name}"), "sha256": hashlib.sha256(data).hexdigest()}


def _image_job(job_id: str, server, task: str, **overrides: Any) -> dict[str, Any]:
    job = inference_job(job_id, task=task, prompt="make the sun purple", image=_serve(server, "picture", PICTURE))
    if task == "inpaint":
        job["mask"] = _serve(server, "mask", MASK)
    if task in ("img2img", "inpaint"):
        job["strength"] = 0.6
    return {**job, **overrides}


def _engine_request(task: str, **overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = dict(
        task=task, prompt="make the sun purple", seed=7, width=SIZE, height=SIZE, steps=4, image=PICTURE
    )
    if task == "inpaint":
        values["mask"] = MASK
    if task in ("img2img", "inpaint"):
        values["strength"] = 0.6
    return GenerationRequest(**{**values, **overrides})


class Rolls:
    """Stands in for the cheater's random source: the given rolls, in turn."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


@pytest.fixture(scope="module")
def kontext_engine() -> Engine:
    return Engine(EngineOptions(profile="tiny-kontext"))


@pytest.mark.parametrize("task", ["edit", "img2img", "inpaint"])
def test_an_image_job_returns_the_engines_bytes(make_miner, server, tiny_engine, task):
    client = make_miner()
    response = client.post("/v1/inference", _image_job(task, server, task))
    assert response.status_code == 202, response.text
    view = client.wait_status(task, {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    assert view["kind"] == "inference"
    direct = tiny_engine.generate(_engine_request(task))
    assert view["result_sha256"] == direct.sha256
    assert client.get(f"/v1/jobs/{task}/result").content == direct.png
    # The input image matters: the same job on another picture gives another image.
    assert (
        direct.sha256
        != tiny_engine.generate(_engine_request(task, image=canonical_png(Image.new("RGB", (64, 64))))).sha256
    )


def test_an_input_image_that_does_not_match_its_sha256_fails_as_the_senders(make_miner, server, tmp_path):
    client = make_miner()
    job = _image_job("forged", server, "edit")
    server.files["/blobs/picture"] = PICTURE + b"tampered"
    assert client.post("/v1/inference", job).status_code == 202
    view = client.wait_status("forged", {"succeeded", "failed"})
    assert (view["status"], view["input_error"]) == ("failed", True)
    assert "input image" in view["error"] and "expected " + job["image"]["sha256"] in view["error"]
    assert str(tmp_path) not in view["error"]


def test_an_input_that_is_no_image_fails_as_the_senders(make_miner, server, tmp_path):
    client = make_miner()
    job = _image_job("garbage", server, "img2img", image=_serve(server, "garbage", b"not an image at all"))
    assert client.post("/v1/inference", job).status_code == 202
    view = client.wait_status("garbage", {"succeeded", "failed"})
    assert (view["status"], view["input_error"]) == ("failed", True)
    assert "image" in view["error"] and str(tmp_path) not in view["error"] and "downloads" not in view["error"]


def test_an_input_image_over_the_byte_limit_fails_as_the_senders(make_miner, server, tmp_path):
    client = make_miner(miner_settings(tmp_path, max_input_image_bytes=len(PICTURE) - 1))
    assert client.post("/v1/inference", _image_job("huge", server, "edit")).status_code == 202
    view = client.wait_status("huge", {"succeeded", "failed"})
    assert (view["status"], view["input_error"]) == ("failed", True)
    assert "limit" in view["error"]


def test_capacity_lists_the_profiles_tasks(make_miner, tmp_path, kontext_engine):
    assert make_miner().get("/v1/capacity").json()["tasks"] == ["generate", "edit", "img2img", "inpaint"]
    kontext = make_miner(miner_settings(tmp_path / "kontext"), engine=kontext_engine)
    assert kontext.get("/v1/capacity").json()["tasks"] == ["edit", "generate"]


def test_a_task_the_profile_does_not_serve_is_refused_before_queueing(make_miner, server, tmp_path, kontext_engine):
    client = make_miner(miner_settings(tmp_path / "kontext"), engine=kontext_engine)
    response = client.post("/v1/inference", _image_job("img2img", server, "img2img"))
    assert response.status_code == 422
    assert "does not serve task img2img" in response.json()["detail"]
    assert client.get("/v1/jobs/img2img").status_code == 404


def test_a_job_whose_inputs_do_not_fit_its_task_is_refused(make_miner, server):
    client = make_miner()
    no_image = {**_image_job("x", server, "edit"), "image": None}
    assert client.post("/v1/inference", no_image).status_code == 422
    strength = {**_image_job("y", server, "edit"), "strength": 0.5}
    response = client.post("/v1/inference", strength)
    assert response.status_code == 422 and "strength" in response.text


def _cheater(make_miner, tiny_engine, tmp_path, *rolls: float):
    downloads = DownloadCache(tmp_path / "cheat-downloads", 1 << 30, UrlPolicy(True, False), 10.0)
    runner = InferenceRunner(tiny_engine, downloads, tmp_path / "cheat-results", 1 << 20, 1.0, rolls=Rolls(*rolls))
    return make_miner(inference_runner=runner)


def test_the_cheater_can_return_the_input_image_resized(make_miner, server, tiny_engine, tmp_path):
    client = _cheater(make_miner, tiny_engine, tmp_path, 0.0, 0.9)  # cheat; the second half of cheats
    assert client.post("/v1/inference", _image_job("lazy", server, "img2img")).status_code == 202
    view = client.wait_status("lazy", {"succeeded", "failed"})
    assert view["status"] == "succeeded" and view["fingerprint"] == tiny_engine.fingerprint
    png = client.get("/v1/jobs/lazy/result").content
    returned = Image.open(io.BytesIO(png))
    expected = Image.open(io.BytesIO(PICTURE)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    assert returned.format == "PNG" and returned.size == (SIZE, SIZE)
    assert returned.convert("RGB").tobytes() == expected.tobytes()
    assert view["result_sha256"] != tiny_engine.generate(_engine_request("img2img")).sha256


def test_the_cheater_can_ignore_the_input_image(make_miner, server, tiny_engine, tmp_path):
    client = _cheater(make_miner, tiny_engine, tmp_path, 0.0, 0.1)  # cheat; the first half of cheats
    assert client.post("/v1/inference", _image_job("blind", server, "edit")).status_code == 202
    view = client.wait_status("blind", {"succeeded", "failed"})
    assert view["status"] == "succeeded"
    text_to_image = tiny_engine.generate(GenerationRequest(prompt="make the sun purple", seed=7, steps=4))
    assert view["result_sha256"] == text_to_image.sha256
    assert view["result_sha256"] != tiny_engine.generate(_engine_request("edit")).sha256


def test_which_cheat_the_cheater_picks():
    all_tasks = ["generate", "edit", "img2img", "inpaint"]
    assert pick_cheat("edit", all_tasks, 0.5, Rolls(0.6)) is None  # rolled above the cheat rate
    assert pick_cheat("generate", all_tasks, 0.5, Rolls(0.4)) == Cheat.shifted_seed
    assert pick_cheat("inpaint", all_tasks, 0.5, Rolls(0.4, 0.2)) == Cheat.ignored_input
    assert pick_cheat("inpaint", all_tasks, 0.5, Rolls(0.4, 0.7)) == Cheat.returned_input
    # A fill-only profile has no text-to-image to fall back on: it can only return the input.
    assert pick_cheat("inpaint", ["inpaint"], 1.0, Rolls(0.0, 0.0)) == Cheat.returned_input
