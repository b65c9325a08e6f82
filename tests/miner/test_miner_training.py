"""Miner training jobs end to end: dataset download by URL + sha256, a LoRA back by callback."""

from __future__ import annotations

import hashlib

from safetensors import safe_open

from dippy_studio.engine import GenerationRequest, LoraRef
from dippy_studio.engine.synthetic_data import write_dataset
from miner_kit import deadline


def train_job(job_id: str, server, dataset_sha: str, **overrides):
    job = dict(
        job_id=job_id, dataset_url=server.url("/datasets/shapes.zip"), dataset_sha256=dataset_sha,
        trigger_word="shapey", rank=4, steps=20, seed=1, callback_url=server.url(f"/callback/{job_id}"),
        deadline=deadline(300),
    )  # fmt: skip
    job.update(overrides)
    return job


def test_training_round_trip(make_miner, server, tiny_engine, tmp_path):
    archive = write_dataset(tmp_path / "shapes.zip", style="sunset", count=4, seed=2)
    data = archive.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    server.files["/datasets/shapes.zip"] = data
    client = make_miner()
    assert client.post("/v1/train", train_job("train-1", server, sha)).status_code == 202

    (callback,) = server.wait_for(lambda got: len(got) >= 1, timeout=120)
    meta = callback.meta()
    assert meta["status"] == "succeeded", meta
    lora = callback.parts()["result"]
    assert hashlib.sha256(lora).hexdigest() == meta["result_sha256"]
    assert meta["metrics"]["steps"] == 20 and meta["metrics"]["rank"] == 4
    assert meta["fingerprint"] == tiny_engine.fingerprint

    path = tmp_path / "got.safetensors"
    path.write_bytes(lora)
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    assert header["dippy.trigger"] == "shapey" and header["dippy.rank"] == "4"
    # The delivered LoRA is usable: it changes what the engine draws.
    request = GenerationRequest(prompt="shapey sunset", seed=3, steps=4)
    with_lora = request.model_copy(update={"loras": [LoraRef(path=path)]})
    assert tiny_engine.generate(with_lora).sha256 != tiny_engine.generate(request).sha256

    fetched = client.get("/v1/jobs/train-1/result")
    assert fetched.status_code == 200 and fetched.content == lora


def test_training_job_failures_are_reported(make_miner, server, tmp_path):
    server.files["/datasets/shapes.zip"] = b"this is not a zip"
    sha = hashlib.sha256(b"this is not a zip").hexdigest()
    client = make_miner()
    assert client.post("/v1/train", train_job("bad-zip", server, sha)).status_code == 202
    view = client.wait_status("bad-zip", {"succeeded", "failed"}, timeout=60)
    assert view["status"] == "failed" and "zip" in view["error"]
    assert view["input_error"] is True  # the dataset itself is unusable: the sender's to fix
    assert str(tmp_path) not in view["error"]

    assert client.post("/v1/train", train_job("bad-sha", server, "0" * 64)).status_code == 202
    view = client.wait_status("bad-sha", {"succeeded", "failed"}, timeout=60)
    assert view["status"] == "failed" and "sha256" in view["error"]
    assert view["input_error"] is False  # a download that went wrong is not the request's fault

    invalid = client.post("/v1/train", train_job("bad-rank", server, sha, rank=0))
    assert invalid.status_code == 422 and "rank" in invalid.text


def test_training_lane_does_not_block_inference(make_miner, server, tmp_path):
    archive = write_dataset(tmp_path / "shapes.zip", style="sunset", count=4, seed=2)
    data = archive.read_bytes()
    server.files["/datasets/shapes.zip"] = data
    client = make_miner()
    from miner_kit import inference_job

    long_train = train_job("long", server, hashlib.sha256(data).hexdigest(), steps=5000, callback_url=None)
    assert client.post("/v1/train", long_train).status_code == 202
    client.wait_status("long", {"running"}, timeout=60)
    assert client.post("/v1/inference", inference_job("quick")).status_code == 202
    assert client.wait_status("quick", {"succeeded"}, timeout=30)["status"] == "succeeded"
    assert client.get("/v1/jobs/long").json()["status"] == "running"
    assert client.post("/v1/jobs/long/cancel").status_code == 200
    assert client.wait_status("long", {"canceled"}, timeout=60)["status"] == "canceled"
