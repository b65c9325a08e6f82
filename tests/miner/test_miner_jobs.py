"""Miner inference jobs end to end: signed submission, callbacks, results, idempotency, limits."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from datetime import UTC, datetime

import pytest
import torch
from safetensors.torch import save as save_safetensors

from dippy_studio.engine import GenerationRequest, LoraRef
from dippy_studio.engine.synthetic import write_random_lora
from dippy_studio.miner.runners import InferenceRunner
from dippy_studio.miner.store import JobStore
from dippy_studio.miner.workers import JobAbandoned, Outcome, WorkerPool
from dippy_studio.protocol import MemoryNonceStore, SenderPolicy, verify_request
from dippy_studio.protocol.schemas import JobKind, JobStatus
from miner_kit import MINER, ORCHESTRATOR, deadline, inference_job, miner_settings
from outbound_kit import answering_without_end


def test_inference_round_trip(make_miner, server, tiny_engine):
    client = make_miner()
    response = client.post("/v1/inference", inference_job("job-1", server))
    assert response.status_code == 202, response.text
    assert response.json() == {"job_id": "job-1", "status": "queued"}

    (callback,) = server.wait_for(lambda got: len(got) >= 1)
    # The callback is signed by the miner's hotkey, for the orchestrator that sent the job.
    caller = verify_request(
        callback.headers, callback.body, method="POST", path="/callback/job-1",
        receiver_ss58=ORCHESTRATOR.ss58_address, nonce_store=MemoryNonceStore(),
        policy=SenderPolicy.allow_list([MINER.ss58_address]),
    )  # fmt: skip
    assert caller.hotkey_ss58 == MINER.ss58_address
    meta = callback.meta()
    png = callback.parts()["result"]
    expected = tiny_engine.generate(GenerationRequest(prompt="a lighthouse at dusk", seed=7, steps=4))
    assert meta["status"] == "succeeded"
    assert meta["result_sha256"] == hashlib.sha256(png).hexdigest() == expected.sha256
    assert meta["fingerprint"] == tiny_engine.fingerprint
    assert set(meta["timings"]) >= {"load", "text_encode", "denoise", "decode", "encode"}

    view = client.get("/v1/jobs/job-1").json()
    assert view["status"] == "succeeded" and view["started_at"] and view["finished_at"]
    result = client.get("/v1/jobs/job-1/result")
    assert result.status_code == 200 and result.content == png
    assert result.headers["content-type"] == "image/png"
    assert result.headers["x-result-sha256"] == expected.sha256


def test_inference_with_a_downloaded_lora(make_miner, server, tiny_engine, tmp_path):
    path = write_random_lora(tiny_engine.pipe, tmp_path / "style.safetensors", seed=3)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    server.files["/loras/style.safetensors"] = data
    client = make_miner()
    lora = {"url": server.url("/loras/style.safetensors"), "sha256": sha, "scale": 0.7}
    assert client.post("/v1/inference", inference_job("lora-1", loras=[lora])).status_code == 202
    view = client.wait_status("lora-1", {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    direct = tiny_engine.generate(
        GenerationRequest(prompt="a lighthouse at dusk", seed=7, steps=4, loras=[LoraRef(path=path, scale=0.7)])
    )
    assert view["result_sha256"] == direct.sha256

    wrong = {**lora, "sha256": "0" * 64}
    assert client.post("/v1/inference", inference_job("lora-2", loras=[wrong])).status_code == 202
    view = client.wait_status("lora-2", {"succeeded", "failed"})
    assert view["status"] == "failed" and "expected " + "0" * 64 in view["error"]
    assert view["input_error"] is False  # a bad download is not the request's fault


def test_a_lora_that_does_not_fit_is_reported_as_bad_input_without_the_miners_paths(make_miner, server, tmp_path):
    # Reads as a LoRA, but for a model whose layers are 8 wide (the tiny profile's are 32).
    data = save_safetensors(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2),
        }
    )
    sha = hashlib.sha256(data).hexdigest()
    server.files["/loras/other.safetensors"] = data
    client = make_miner()
    lora = {"url": server.url("/loras/other.safetensors"), "sha256": sha, "scale": 1.0}
    assert client.post("/v1/inference", inference_job("misfit", server, loras=[lora])).status_code == 202
    (callback,) = server.wait_for(lambda got: bool(server.callbacks_for("misfit")))
    meta = callback.meta()
    assert (meta["status"], meta["input_error"]) == ("failed", True)
    assert "does not fit this profile" in meta["error"] and sha in meta["error"]
    assert str(tmp_path) not in meta["error"] and "downloads" not in meta["error"]


class PausableClock:
    """The miner's clock (time.time) that can be held still: while held, no time passes for the
    miner however long the test's requests take."""

    def __init__(self) -> None:
        self.held: float | None = None

    def __call__(self) -> float:
        return time.time() if self.held is None else self.held


def test_a_lane_takes_no_more_jobs_than_it_can_finish_by_their_deadline(make_miner, tmp_path):
    gate = threading.Event()
    clock = PausableClock()

    def runner(record, check):  # the first job takes a second; the others wait for the gate
        if record.job_id == "warm":
            time.sleep(1.0)
        else:
            gate.wait(30)
        path = tmp_path / f"{record.job_id}.png"
        path.write_bytes(b"x")
        return Outcome(str(path), hashlib.sha256(b"x").hexdigest(), 1, "fp")

    client = make_miner(inference_runner=runner, clock=clock)
    assert client.get("/v1/capacity").json()["inference"]["seconds_per_job"] is None  # no pace yet
    assert client.post("/v1/inference", inference_job("warm")).status_code == 202
    client.wait_status("warm", {"succeeded"})
    pace = client.get("/v1/capacity").json()["inference"]["seconds_per_job"]
    assert 1.0 <= pace < 5.0
    try:
        # The miner's clock stands still while the jobs go in: the window left is the same at each
        # post, however long the posts take on a loaded machine (with real time, posting three
        # jobs had to take under half a pace, or the third was refused too).
        clock.held = time.time()
        # At that pace one worker finishes three jobs by this deadline: the one it runs and two more.
        window = datetime.fromtimestamp(clock.held + 3.5 * pace, UTC).isoformat()
        for job_id in ("a", "b", "c"):
            assert client.post("/v1/inference", inference_job(job_id, deadline=window)).status_code == 202
        refused = client.post("/v1/inference", inference_job("d", deadline=window))
        assert refused.status_code == 429 and "finishing by this deadline" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) == math.ceil(pace)  # about when a job is done
        assert client.get("/v1/jobs/d").status_code == 404
        # A later deadline leaves time for the jobs ahead: taken.
        assert client.post("/v1/inference", inference_job("e", deadline=deadline(60))).status_code == 202
    finally:
        clock.held = None
        gate.set()
    client.wait_status("e", {"succeeded"})
    # Started again on the same data, it still knows its pace.
    restarted = make_miner(inference_runner=runner)
    assert restarted.get("/v1/capacity").json()["inference"]["seconds_per_job"] > 0


def test_resubmitting_is_idempotent(make_miner, server):
    client = make_miner()
    job = inference_job("same", server)
    assert client.post("/v1/inference", job).status_code == 202
    first = client.wait_status("same", {"succeeded"})
    again = client.post("/v1/inference", job)
    assert again.status_code == 200
    assert again.json()["finished_at"] == first["finished_at"], "a finished job must not be recomputed"
    assert again.json()["result_sha256"] == first["result_sha256"]
    changed = client.post("/v1/inference", {**job, "seed": 8})
    assert changed.status_code == 409 and "different job" in changed.json()["detail"]


def test_active_job_id_conflicts(make_miner, tmp_path, tiny_engine):
    gate = threading.Event()
    real = InferenceRunner(tiny_engine, None, tmp_path / "results", 1 << 20)  # type: ignore[arg-type]

    def blocked(record, check):
        gate.wait(30)
        return real(record, check)

    client = make_miner(inference_runner=blocked)
    assert client.post("/v1/inference", inference_job("busy")).status_code == 202
    response = client.post("/v1/inference", inference_job("busy"))
    assert response.status_code == 409 and "still" in response.json()["detail"]
    gate.set()
    client.wait_status("busy", {"succeeded"})


def test_queue_full_answers_429_with_retry_after(make_miner, tmp_path, tiny_engine):
    gate = threading.Event()
    real = InferenceRunner(tiny_engine, None, tmp_path / "results", 1 << 20)  # type: ignore[arg-type]

    def blocked(record, check):
        gate.wait(30)
        return real(record, check)

    client = make_miner(miner_settings(tmp_path, inference_queue_limit=2), inference_runner=blocked)
    assert client.post("/v1/inference", inference_job("q0")).status_code == 202
    client.wait_status("q0", {"running"})
    assert client.post("/v1/inference", inference_job("q1")).status_code == 202
    assert client.post("/v1/inference", inference_job("q2")).status_code == 202
    full = client.post("/v1/inference", inference_job("q3"))
    assert full.status_code == 429
    assert int(full.headers["retry-after"]) > 0 and "queue is full" in full.json()["detail"]
    gate.set()
    for job_id in ("q0", "q1", "q2"):
        assert client.wait_status(job_id, {"succeeded"})["status"] == "succeeded"
    assert client.get("/v1/jobs/q3").status_code == 404


def test_deadlines(make_miner, tmp_path, tiny_engine, server):
    gate = threading.Event()
    real = InferenceRunner(tiny_engine, None, tmp_path / "results", 1 << 20)  # type: ignore[arg-type]

    def runner(record, check):
        if record.job_id == "slow":
            while not gate.is_set():  # a long job: checks its deadline as it goes
                check()
                time.sleep(0.02)
        return real(record, check)

    client = make_miner(inference_runner=runner)

    # Both deadlines are fixed before either post, so "late" is due before "slow" is abandoned
    # however long the posts take: the one worker is busy with "slow" until "late" has expired.
    slow_deadline, late_deadline = deadline(3.0), deadline(1.5)
    assert client.post("/v1/inference", inference_job("slow", server, deadline=slow_deadline)).status_code == 202
    assert client.post("/v1/inference", inference_job("late", server, deadline=late_deadline)).status_code == 202
    slow = client.wait_status("slow", {"expired"}, timeout=10)
    assert "abandoned" in slow["error"]
    late = client.wait_status("late", {"expired"}, timeout=10)
    assert late["started_at"] is None, "a job past its deadline must not start"
    gate.set()
    got = server.wait_for(lambda r: len(r) >= 2)
    assert sorted(r.meta()["status"] for r in got) == ["expired", "expired"]
    assert all("result" not in r.parts() for r in got)

    past = client.post("/v1/inference", inference_job("past", deadline=deadline(-5)))
    assert past.status_code == 422 and "deadline" in past.json()["detail"]


def test_cancel(make_miner, tmp_path, tiny_engine):
    started = threading.Event()
    real = InferenceRunner(tiny_engine, None, tmp_path / "results", 1 << 20)  # type: ignore[arg-type]

    def runner(record, check):
        started.set()
        while True:
            check()
            time.sleep(0.02)

    client = make_miner(inference_runner=runner)
    assert client.post("/v1/inference", inference_job("run")).status_code == 202
    assert client.post("/v1/inference", inference_job("wait")).status_code == 202
    started.wait(10)
    assert client.post("/v1/jobs/wait/cancel").json()["status"] == "canceled"
    client.post("/v1/jobs/run/cancel")
    assert client.wait_status("run", {"canceled"})["error"] == "canceled by the sender"
    again = client.post("/v1/jobs/run/cancel")
    assert again.status_code == 409
    del real


def test_a_cancel_that_meets_the_job_starting_stops_it(tmp_path):
    # The sender read the job as queued; by the time its cancel lands, a worker has started it.
    store = JobStore(tmp_path / "jobs.sqlite")
    started, finished = threading.Event(), []
    outcome: list[str] = []

    def runner(record, check):
        started.set()
        try:
            for _ in range(500):
                check()
                time.sleep(0.02)
        except JobAbandoned as exc:
            outcome.append(exc.status.value)
            raise
        outcome.append("ran to the end")
        raise AssertionError("a canceled job ran to the end")

    store.create(job_id="racing", kind=JobKind.inference, sender="s", request={}, callback_url=None,
                 deadline=time.time() + 60, queue_limit=4)  # fmt: skip
    read_while_queued = store.get("racing")
    pool = WorkerPool(store, {JobKind.inference: runner}, {JobKind.inference: 1}, on_finished=finished.append)
    pool.start()
    try:
        assert started.wait(10)
        pool.cancel(read_while_queued)
        end = time.monotonic() + 5
        # `finished` hears of the job once the worker has recorded how it ended.
        while not finished and time.monotonic() < end:
            time.sleep(0.02)
        assert outcome == ["canceled"], "the worker must be told, not left running a canceled job"
        assert [record.status for record in finished] == [JobStatus.canceled]
        assert store.get("racing").status == JobStatus.canceled
    finally:
        pool.stop()


def test_a_download_that_trickles_in_does_not_outlast_a_cancel(make_miner):
    # A LoRA whose bytes come one at a time, each well within the read timeout.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    with answering_without_end(head, b"x", 0.05) as (url, connections):
        lora = {"url": f"{url}/slow.safetensors", "sha256": "a" * 64}
        client = make_miner()
        assert client.post("/v1/inference", inference_job("trickle", loras=[lora])).status_code == 202
        client.wait_status("trickle", {"running"})
        while not connections:
            time.sleep(0.02)
        client.post("/v1/jobs/trickle/cancel")
        assert client.wait_status("trickle", {"canceled"}, timeout=10)["error"] == "canceled by the sender"


def test_callback_is_retried(make_miner, server):
    server.fail_first = 2
    client = make_miner()
    assert client.post("/v1/inference", inference_job("retry", server)).status_code == 202
    (callback,) = server.wait_for(lambda got: len(got) >= 1)
    assert server.attempts == 3
    assert callback.meta()["status"] == "succeeded"


def test_a_receivers_answer_is_not_read_past_its_status(make_miner, tmp_path):
    # A receiver that accepts the callback, then sends a body without end.
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n"
    with answering_without_end(head, b"x" * (1 << 16), 0) as (url, connections):
        client = make_miner(miner_settings(tmp_path, callback_timeout=2.0))
        miner = client.client.app.state.miner
        assert (
            client.post("/v1/inference", inference_job("endless", callback_url=f"{url}/callback/endless")).status_code
            == 202
        )
        client.wait_status("endless", {"succeeded"})
        end = time.monotonic() + 10
        while miner.store.get("endless").callback_state == "pending" and time.monotonic() < end:
            time.sleep(0.05)
        assert miner.store.get("endless").callback_state == "delivered"
        assert len(connections) == 1, "a 200 is delivered; nothing to retry"


def test_a_callback_that_cannot_be_built_does_not_stop_the_others(make_miner, server, monkeypatch, tmp_path):
    from dippy_studio.miner import callbacks

    real = callbacks.build_callback

    def build(record, signer, receiver):
        if record.job_id == "broken":
            raise RuntimeError("a bug in building this one callback")
        return real(record, signer, receiver)

    def runner(record, check):
        path = tmp_path / f"{record.job_id}.png"
        path.write_bytes(b"x")
        return Outcome(str(path), hashlib.sha256(b"x").hexdigest(), 1, "fp")

    monkeypatch.setattr(callbacks, "build_callback", build)
    client = make_miner(inference_runner=runner)
    assert client.post("/v1/inference", inference_job("broken", server)).status_code == 202
    client.wait_status("broken", {"succeeded"})
    assert client.post("/v1/inference", inference_job("after", server)).status_code == 202
    client.wait_status("after", {"succeeded"})
    (callback,) = server.wait_for(lambda got: bool(server.callbacks_for("after")), timeout=10)
    assert callback.meta()["status"] == "succeeded"
    assert client.client.get("/ready").status_code == 200


def test_jobs_are_private_to_their_sender(make_miner, tmp_path):
    from miner_kit import STRANGER

    client = make_miner(miner_settings(tmp_path, allow_hotkeys=[ORCHESTRATOR.ss58_address, STRANGER.ss58_address]))
    assert client.post("/v1/inference", inference_job("mine")).status_code == 202
    other = client.get("/v1/jobs/mine", signer=STRANGER)
    assert other.status_code == 404
    assert client.post("/v1/jobs/mine/cancel", signer=STRANGER).status_code == 404


@pytest.mark.parametrize(
    ("overrides", "status", "message"),
    [
        ({"job_id": "../etc/passwd"}, 422, "job_id"),
        ({"job_id": ""}, 422, "job_id"),
        ({"width": 63}, 422, "multiple of 16"),
        ({"width": 512}, 422, "outside 16..256"),
        ({"steps": 0}, 422, "steps"),
        ({"prompt": ""}, 422, "prompt"),
        ({"seed": -1}, 422, "seed"),
        ({"callback_url": "ftp://example.com/x"}, 422, "http"),
        ({"callback_url": "http://10.1.2.3/cb"}, 422, "private address"),
        ({"callback_url": "http://169.254.169.254/latest"}, 422, "169.254.169.254 is a cloud metadata address"),
        ({"loras": [{"url": "http://127.0.0.1/x", "sha256": "abc", "scale": 1}]}, 422, "sha256"),
        ({"deadline": "tomorrow"}, 422, "deadline"),
        # Year 10000 in UTC: no datetime can show it again.
        ({"deadline": "9999-12-31T23:59:59-14:00"}, 422, "deadline: Value error, must be before 9999-01-01"),
        ({"surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_input_gets_4xx_with_a_reason(make_miner, overrides, status, message):
    client = make_miner()
    response = client.post("/v1/inference", {**inference_job("bad"), **overrides})
    assert response.status_code == status
    assert message in response.text


def test_bad_job_id_in_path(make_miner):
    client = make_miner()
    assert client.get("/v1/jobs/bad%20id").status_code == 422
    assert client.get("/v1/jobs/unknown").status_code == 404


def test_oversized_body_is_refused(make_miner, tmp_path):
    client = make_miner(miner_settings(tmp_path, max_body_bytes=2048))
    response = client.post("/v1/inference", inference_job("big", prompt="x" * 1900, negative="y" * 1000))
    assert response.status_code == 413


def test_loopback_is_refused_unless_allowed(make_miner, tmp_path, server):
    client = make_miner(miner_settings(tmp_path, allow_loopback_urls=False))
    response = client.post("/v1/inference", inference_job("loop", server))
    assert response.status_code == 422 and "loopback" in response.json()["detail"]
