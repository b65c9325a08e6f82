"""Dispatch and callbacks: refusals, invalid results, callback authentication and idempotency,
the miner registry, and two orchestrators sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from PIL import Image

import orchestrator.orch_kit as kit
from dippy_studio.engine.errors import BadLoraError
from dippy_studio.engine.images import encode_png
from dippy_studio.orchestrator import kinds, model_code
from dippy_studio.orchestrator.callbacks import failure_outcome
from dippy_studio.orchestrator.dispatch import Dispatcher
from dippy_studio.orchestrator.models import Job
from dippy_studio.orchestrator.registry import parse_endpoint
from dippy_studio.orchestrator.scoring import attempt_record
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store, job_row
from dippy_studio.protocol import signer_from_uri
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.schemas import JobView
from orchestrator.orch_kit import ORCHESTRATOR, bad_runner, image_body, noise_png, sha256, wait_status, wait_until

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators


def test_a_refusing_miner_gets_the_job_taken_back_and_sent_elsewhere(subnet):
    busy = subnet.add_stub_miner("//Dave", accept=False)  # answers 503 with Retry-After: 30
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(steps=1)).json()["request_id"]
    wait_until(lambda: busy.received, 10, "the busy miner to be asked")
    # Taken back, and the miner cools down for its Retry-After: nobody else is there, so it waits.
    assert wait_status(client, request_id, {"queued"})["attempts"] == 1

    bob = subnet.add_miner("//Bob")
    view = wait_status(client, request_id, {"succeeded", "failed"})
    assert (view["status"], view["miner_hotkey"], view["attempts"]) == ("succeeded", bob.hotkey, 2)
    refused, done = orch.store.list_attempts(request_id)
    assert (refused.miner_hotkey, refused.outcome, done.outcome) == (busy.hotkey, "busy", "succeeded")
    assert "HTTP 503" in refused.error and "busy" in refused.error
    assert len(busy.received) == 1


def test_a_refusal_that_comes_in_while_a_round_is_claiming_still_cools_its_miner(subnet, monkeypatch):
    busy = subnet.add_stub_miner("//Dave", accept=False)  # answers 503 with Retry-After: 30
    orch = subnet.start_orchestrator()
    store, claim = orch.store, orch.store.call

    async def slow_claims(method, *args, **kwargs):
        if getattr(method, "__name__", "") == "claim_for_dispatch":
            await asyncio.sleep(0.3)  # a busy round: the refusal and its take-back land meanwhile
        return await claim(method, *args, **kwargs)

    monkeypatch.setattr(store, "call", slow_claims)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    wait_until(lambda: busy.received, 10, "the busy miner to be asked")
    time.sleep(1.5)  # rounds that began before the refusal have claimed by now
    assert len(busy.received) == 1
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "queued"


def test_a_miner_that_pushes_back_uses_up_no_attempt_and_gets_the_job_once_it_has_room(subnet):
    pushy = subnet.add_stub_miner("//Dave", refusals=[(429, "0.2")] * 3)  # then accepts
    orch = subnet.start_orchestrator(max_attempts=1)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(deadline_s=60)).json()["request_id"]
    view = wait_status(client, request_id, {"running", "failed"}, timeout=20)
    # Three refusals, yet the one attempt it may have is still there: the fourth send is taken.
    assert (view["status"], view["attempts"]) == ("running", 4)
    outcomes = [(a.attempt, a.outcome) for a in orch.store.list_attempts(request_id)]
    assert outcomes == [(1, "busy"), (2, "busy"), (3, "busy"), (4, None)]
    assert [body["job_id"] for body in pushy.received] == [f"{request_id}-{n}" for n in (1, 2, 3, 4)]

    png = noise_png()
    done = CallbackSender(orch.url).send(request_id, signer_from_uri("//Dave"), view_meta(f"{request_id}-4", png), png)
    assert done.json()["status"] == "succeeded"
    assert wait_status(client, request_id, {"succeeded"})["result"]["sha256"] == sha256(png)


def test_a_job_refused_until_its_deadline_ends_as_expired_not_as_failed_attempts(subnet):
    # Four quick refusals (more sends than max_attempts), then one that asks for a minute: the
    # deadline passes while the job waits in the queue, never while a send is out (then the sweeper
    # could end the attempt as cut short by the deadline, before the refusal came back).
    subnet.add_stub_miner("//Dave", refusals=[(429, "0.2")] * 4 + [(429, "60")] * 1000)
    orch = subnet.start_orchestrator(max_attempts=3)
    client = subnet.client(orch, subnet.new_key(orch))
    # Time for the five refusals (each a send, a 429 and a cool-down) before the deadline, even when
    # every round trip is slow on a loaded machine.
    request_id = client.post("/v1/images", json=image_body(deadline_s=6)).json()["request_id"]
    view = wait_status(client, request_id, {"succeeded", "failed"}, timeout=30)
    # Ended by its deadline (by the sweeper, or at the last refusal if too little time was left), not by attempts.
    assert view["status"] == "failed" and view["error"].startswith("deadline passed before a miner could")
    assert "attempt" not in view["error"]
    attempts = orch.store.list_attempts(request_id)
    # More sends than max_attempts: refusals used none of them up.
    assert len(attempts) > 3 and {a.outcome for a in attempts} == {"busy"}


@pytest.mark.parametrize(
    ("lane", "slots"),
    [
        ({"workers_alive": 1, "queue_limit": 2}, 3),  # its worker and its queue
        # 20 s a job: one worker finishes 3 within the 60 s attempt timeout, whatever its queue takes.
        ({"workers_alive": 1, "queue_limit": 64, "seconds_per_job": 20.0}, 3),
        ({"workers_alive": 2, "queue_limit": 64, "seconds_per_job": 30.0}, 4),
    ],
    ids=["queue-limit", "pace", "pace-two-workers"],
)
def test_a_miner_is_sent_no_more_jobs_than_it_can_hold_and_finish_in_time(subnet, lane: dict[str, Any], slots: int):
    holder = subnet.add_stub_miner("//Dave", lane=lane)  # accepts every job, finishes none
    orch = subnet.start_orchestrator(inference_attempt_timeout_s=60)
    client = subnet.client(orch, subnet.new_key(orch))
    ids = [client.post("/v1/images", json=image_body(seed=n)).json()["request_id"] for n in range(slots + 3)]
    wait_until(lambda: len(holder.received) >= slots, 10, "the miner's slots to fill")
    time.sleep(1.0)  # several dispatch rounds: none may send more
    assert len(holder.received) == slots
    assert orch.store.active_counts() == {(holder.hotkey, "inference"): slots}
    assert sum(client.get(f"/v1/requests/{i}").json()["status"] == "queued" for i in ids) == 3

    # One finishes: one slot frees, and exactly one more job goes out.
    first = holder.received[0]["job_id"]
    png = noise_png()
    request_id = first.rsplit("-", 1)[0]
    CallbackSender(orch.url).send(request_id, signer_from_uri("//Dave"), view_meta(first, png), png)
    wait_until(lambda: len(holder.received) == slots + 1, 10, "the freed slot to be used")
    time.sleep(0.5)
    assert len(holder.received) == slots + 1


@pytest.mark.parametrize(
    ("bad", "reason", "max_attempts"),
    [
        (lambda job: encode_png(Image.new("RGB", (job["width"], job["height"]), (90, 90, 90))), "blank", 2),
        (lambda job: noise_png(job["width"] * 2, job["height"]), "image is 128x64, the request was 64x64", 1),
        (lambda job: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "PNG does not decode", 1),
    ],
    ids=["blank", "wrong-size", "corrupt"],
)
def test_invalid_results_are_refused_recorded_and_retried_until_attempts_run_out(
    subnet, tmp_path, bad, reason: str, max_attempts: int
):
    cheat = subnet.add_miner("//Eve", inference_runner=bad_runner(tmp_path, bad))
    orch = subnet.start_orchestrator(max_attempts=max_attempts)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    view = wait_status(client, request_id, {"succeeded", "failed"})
    assert view["status"] == "failed" and reason in view["error"] and view["result"] is None
    attempts = orch.store.list_attempts(request_id)
    assert [(a.miner_hotkey, a.outcome) for a in attempts] == [(cheat.hotkey, "invalid")] * max_attempts
    assert all(reason in a.error for a in attempts)
    assert client.get(f"/v1/requests/{request_id}/result").status_code == 409
    assert not orch.orch.results.root.exists()  # nothing invalid was ever stored


class CallbackSender:
    """Plays the miner's side of a callback by hand, to test what the orchestrator accepts."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url
        self.http = httpx.Client(timeout=timeout)

    def send(self, job_id: str, signer, meta: dict[str, Any] | None, result: bytes | None, *, tamper: bool = False):
        files = {}
        if meta is not None:
            files["meta"] = ("meta.json", json.dumps(meta).encode(), "application/json")
        if result is not None:
            files["result"] = ("result.png", result, "image/png")
        request = httpx.Request("POST", self.url, files=files)
        body, headers = request.read(), self.signed(job_id, signer, request.read(), request.headers["content-type"])
        if tamper:
            body = body.replace(b"result.png", b"tamper.png")
        return self.post(job_id, body, headers)

    def signed(self, job_id: str, signer, body: bytes, content_type: str) -> dict[str, str]:
        path = f"/v1/miner-callbacks/{job_id}"
        return {"content-type": content_type, **sign_request(signer, "POST", path, body, ORCHESTRATOR.ss58_address)}

    def post(self, job_id: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.http.post(f"{self.url}/v1/miner-callbacks/{job_id}", content=body, headers=headers)


def view_meta(miner_job_id: str, result: bytes | None, status: str = "succeeded", **overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    meta = {
        "job_id": miner_job_id,
        "kind": "inference",
        "status": status,
        "created_at": now.isoformat(),
        "deadline": (now + timedelta(minutes=1)).isoformat(),
        "result_sha256": sha256(result) if result else None,
        "result_bytes": len(result) if result else None,
        "fingerprint": "fp",
        "timings": {"total": 0.5},
    }
    return {**meta, **overrides}


def test_a_lora_results_check_never_stalls_the_orchestrator(subnet, monkeypatch):
    """A LoRA's check waits on the model-code process, seconds on a loaded machine: it runs on a
    worker thread however small the LoRA, so clients' requests are answered while it runs."""
    checking = threading.Event()

    def slow_check(data: bytes, rank: int, targets: list[str], *, time_limit: float) -> None:
        checking.set()
        time.sleep(3)

    monkeypatch.setattr(kinds, "check_lora", slow_check)
    subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    files = {"dataset": ("d.zip", kit.dataset_zip())}
    request_id = client.post("/v1/loras", data={"trigger_word": "sks", "steps": 1}, files=files).json()["request_id"]
    wait_status(client, request_id, {"running"})
    lora = b"a small LoRA"  # any bytes: the check is the stand-in above
    meta = view_meta(f"{request_id}-1", lora, kind="training")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(CallbackSender(orch.url).send, request_id, signer_from_uri("//Dave"), meta, lora)
        assert checking.wait(10)
        started = time.monotonic()
        assert client.get(f"/v1/requests/{request_id}").json()["status"] == "running"
        assert time.monotonic() - started < 1.5, "a client's request waited for the LoRA's check"
        assert answer.result().status_code == 200
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "succeeded"


def test_callbacks_must_come_from_the_assigned_miner_and_are_idempotent(subnet):
    silent = subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    assert wait_status(client, request_id, {"running"})["miner_hotkey"] == silent.hotkey
    miner_job = f"{request_id}-1"
    assert silent.received[0]["job_id"] == miner_job
    assert silent.received[0]["callback_url"] == f"{orch.url}/v1/miner-callbacks/{request_id}"
    png = noise_png()
    miner, stranger = signer_from_uri("//Dave"), signer_from_uri("//Charlie")
    callbacks = CallbackSender(orch.url)

    wrong = callbacks.send(request_id, stranger, view_meta(miner_job, png), png)
    assert wrong.status_code == 403 and "not assigned to this hotkey" in wrong.json()["detail"]
    forged = callbacks.send(request_id, miner, view_meta(miner_job, png), png, tamper=True)
    assert forged.status_code == 401
    stale = callbacks.send(request_id, miner, view_meta(f"{request_id}-0", png), png)
    assert stale.status_code == 410
    lying = callbacks.send(request_id, miner, view_meta(miner_job, png, result_sha256="0" * 64), png)
    assert lying.status_code == 422 and "the miner claimed" in lying.json()["detail"]
    assert orch.store.list_attempts(request_id)[0].outcome == "invalid"  # taken back for a retry
    unknown = callbacks.send("req_nope", miner, view_meta("req_nope-1", png), png)
    assert unknown.status_code == 404

    # Back at the same miner (the only one) as attempt 2: now a good result.
    wait_until(lambda: len(silent.received) == 2, 10, "the retry")
    ok = callbacks.send(request_id, miner, view_meta(f"{request_id}-2", png), png)
    assert ok.status_code == 200 and ok.json() == {"status": "succeeded", "sha256": sha256(png)}
    done = client.get(f"/v1/requests/{request_id}").json()
    assert done["status"] == "succeeded" and client.get(done["result_url"]).content == png

    again = callbacks.send(request_id, miner, view_meta(f"{request_id}-2", png), png)
    assert again.status_code == 200 and again.json() == {"status": "duplicate"}
    other = noise_png(seed=1)
    late = callbacks.send(request_id, miner, view_meta(f"{request_id}-2", other), other)
    assert late.status_code == 200 and late.json()["status"] == "ignored"
    assert client.get(f"/v1/requests/{request_id}").json() == done  # nothing changed
    outcomes = [(a.attempt, a.outcome) for a in orch.store.list_attempts(request_id)]
    assert outcomes == [(1, "invalid"), (2, "succeeded")]


def test_callback_bodies_are_read_only_after_the_signature_and_never_replayed(subnet):
    silent = subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    wait_status(client, request_id, {"running"})
    miner, callbacks = signer_from_uri("//Dave"), CallbackSender(orch.url)
    form = "multipart/form-data; boundary=x"

    garbled = b"--x\r\nno headers end here"
    assert callbacks.post(request_id, garbled, callbacks.signed(request_id, miner, garbled, form)).status_code == 400
    unsigned = callbacks.post(request_id, garbled, {"content-type": form})
    assert unsigned.status_code == 401  # the signature is checked before the body is read
    no_meta = callbacks.send(request_id, miner, None, noise_png())
    assert no_meta.status_code == 422 and "no 'meta' part" in no_meta.json()["detail"]

    report = json.dumps(view_meta(f"{request_id}-1", None, status="running")).encode()
    body = b'--x\r\nContent-Disposition: form-data; name="meta"\r\n\r\n' + report + b"\r\n--x--\r\n"
    headers = callbacks.signed(request_id, miner, body, form)
    assert callbacks.post(request_id, body, headers).json() == {"status": "running"}
    replayed = callbacks.post(request_id, body, headers)
    assert replayed.status_code == 401 and "already accepted" in replayed.json()["detail"]
    assert len(silent.received) == 1 and client.get(f"/v1/requests/{request_id}").json()["status"] == "running"


def test_a_result_this_replica_cannot_check_is_answered_503_and_judged_when_sent_again(subnet, monkeypatch):
    """When the LoRA checker gives no answer (it died or overran its time limit), that is the
    orchestrator's fault: the miner is told to send again (5xx, which it retries), and nothing is
    recorded against it until a check has run."""
    subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    files = {"dataset": ("d.zip", kit.dataset_zip(), "application/zip")}
    request_id = client.post("/v1/loras", data={"trigger_word": "sks"}, files=files).json()["request_id"]
    wait_status(client, request_id, {"running"})
    # The first real check starts the model-code child (torch's import): slow on a loaded machine.
    miner, callbacks = signer_from_uri("//Dave"), CallbackSender(orch.url, timeout=120)
    lora = b"not a safetensors file"
    meta = view_meta(f"{request_id}-1", lora, kind="training")

    def gone(fn, args, time_limit):
        raise model_code.ModelCodeUnavailable("the LoRA could not be checked: the check took longer than 1 s")

    with monkeypatch.context() as patched:
        patched.setattr(model_code, "run", gone)
        unchecked = callbacks.send(request_id, miner, meta, lora)
    assert unchecked.status_code == 503 and "could not be checked" in unchecked.json()["detail"]
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "running"
    assert [a.outcome for a in orch.store.list_attempts(request_id)] == [None]  # nothing judged

    judged = callbacks.send(request_id, miner, meta, lora)  # the miner's retry, now checked
    assert judged.status_code == 422 and "invalid result" in judged.json()["detail"]
    assert orch.store.list_attempts(request_id)[0].outcome == "invalid"  # (then sent out again)


def test_a_failure_reported_by_the_miner_sends_the_job_elsewhere(subnet):
    subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator(max_attempts=1)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    wait_status(client, request_id, {"running"})
    error = "CUDA out of memory in /home/dave/.cache/dippy/kernels/flux_attn.so"
    meta = view_meta(f"{request_id}-1", None, status="failed", error=error)
    reply = CallbackSender(orch.url).send(request_id, signer_from_uri("//Dave"), meta, None)
    assert reply.status_code == 200 and reply.json() == {"status": "failed"}  # no attempts left
    view = client.get(f"/v1/requests/{request_id}").json()
    assert view["status"] == "failed" and "miner reported failed: CUDA out of memory in" in view["error"]
    # The miner's files are named, never where it keeps them.
    assert "flux_attn.so" in view["error"] and "/home/dave" not in view["error"]
    assert orch.store.list_attempts(request_id)[0].outcome == "failed"


def test_a_miner_reported_input_error_fails_the_job_as_the_clients_without_charging_the_miner(subnet):
    bad = "ab" * 32
    data_dir = subnet.tmp_path / "miner__Bob"  # where add_miner keeps Bob's files

    def unfit(record, check):  # what the engine says of a LoRA whose shapes do not fit
        raise BadLoraError(f"{data_dir / 'downloads' / bad}: does not fit this profile: 'x.lora_A.weight' has shape")

    subnet.add_miner("//Bob", inference_runner=unfit)
    orch = subnet.start_orchestrator(max_attempts=3)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    view = wait_status(client, request_id, {"succeeded", "failed"})
    # Failed at once, for a reason the client can act on: no other miner could do better.
    assert (view["status"], view["attempts"]) == ("failed", 1)
    assert view["error"].startswith("the request's input cannot be used: miner reported failed: " + bad)
    assert str(subnet.tmp_path) not in view["error"] and "downloads" not in view["error"]
    [attempt] = orch.store.list_attempts(request_id)
    assert attempt.outcome == "bad_input"
    # Scored as work the miner never took on, not as a failure of its own.
    job = orch.store.load_job(request_id)
    assert attempt_record(attempt, job, None, None).accepted is False


def test_a_deadline_shorter_than_the_attempt_is_the_clients_expiry_not_a_miner_timeout(subnet):
    silent = subnet.add_stub_miner("//Dave")  # accepts, never calls back
    orch = subnet.start_orchestrator(inference_attempt_timeout_s=60)
    client = subnet.client(orch, subnet.new_key(orch))
    # Far shorter than the 60 s attempt, yet long enough that the job is surely sent before less
    # than `min_attempt_s` (0.5 s) is left, however slow the first dispatch on a loaded machine.
    short = client.post("/v1/images", json=image_body(deadline_s=4)).json()["request_id"]
    view = wait_status(client, short, {"succeeded", "failed"}, timeout=15)
    assert view["status"] == "failed" and view["error"].startswith("deadline passed before the job could finish")
    [attempt] = orch.store.list_attempts(short)
    assert (attempt.miner_hotkey, attempt.outcome) == (silent.hotkey, "expired")
    assert attempt_record(attempt, orch.store.load_job(short), None, None).accepted is False


@pytest.mark.parametrize(
    ("deadline_s", "reported_at_s", "outcome"),
    [
        (10.0, 10.5, "expired"),  # the client's deadline ended the attempt, and it has passed
        (10.0, 3.0, "timeout"),  # the miner gave up long before that deadline: its own doing
        (600.0, 61.0, "timeout"),  # it had its whole attempt time (60 s)
    ],
)
def test_a_miner_reporting_expiry_is_charged_only_when_it_had_its_whole_attempt_time(
    deadline_s: float, reported_at_s: float, outcome: str
):
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    job = Job(**job_row("key", "inference", {}, t0 + timedelta(seconds=deadline_s), 60, now=t0))
    job.dispatched_at = t0
    meta = JobView.model_validate(view_meta("req-1", None, status="expired"))
    assert failure_outcome(job, meta, t0 + timedelta(seconds=reported_at_s), skew_s=2.0) == outcome
    failed = JobView.model_validate(view_meta("req-1", None, status="failed", input_error=True))
    assert failure_outcome(job, failed, t0, skew_s=2.0) == "bad_input"


def test_registry_follows_the_chain_and_probes(subnet):
    bob = subnet.add_miner("//Bob", stake=5.0)
    impostor = signer_from_uri("//Ferdie").ss58_address
    subnet.chain.register(impostor, signer_from_uri("//Ferdie//cold").ss58_address)
    subnet.chain.commit(impostor, bob.url)  # points at Bob's miner, which answers as Bob
    junk = signer_from_uri("//Eve").ss58_address
    subnet.chain.register(junk, signer_from_uri("//Eve//cold").ss58_address)
    subnet.chain.commit(junk, "not a url")
    orch = subnet.start_orchestrator(sync_interval_s=60, probe_interval_s=60)
    store = orch.store
    registry = orch.orch.registry

    miners = {m.hotkey: m for m in store.list_miners()}
    assert ORCHESTRATOR.ss58_address not in miners  # our own hotkey is never a miner
    assert (miners[bob.hotkey].healthy, miners[bob.hotkey].stake, miners[bob.hotkey].endpoint) == (True, 5.0, bob.url)
    assert miners[bob.hotkey].capacity["profile"] == "tiny" and miners[bob.hotkey].fingerprints
    assert miners[impostor].healthy is False and miners[junk].endpoint is None and miners[junk].healthy is False
    assert [c.hotkey for c in registry.candidates()] == [bob.hotkey]

    bob.served.stop()  # the miner goes away: the next probe takes it out of routing
    registry.probe_all()
    assert registry.candidates() == []
    store.upsert_miner("5Gone", 99, endpoint="http://127.0.0.1:9")  # no longer on the metagraph
    registry.sync()
    assert store.get_miner("5Gone").endpoint is None


@pytest.mark.parametrize(
    ("commitment", "endpoint"),
    [
        ("http://1.2.3.4:8091", "http://1.2.3.4:8091"),
        (" https://miner.example/base/ ", "https://miner.example/base"),
        ("1.2.3.4:8091", None),
        ("ftp://x", None),
        ("http://host:99999", None),
        ("http://host/?q=1", None),
        ("", None),
    ],
)
def test_endpoints_are_parsed_from_commitments(commitment: str, endpoint: str | None):
    assert parse_endpoint(commitment) == endpoint


JOBS = 24


@pytest.mark.timeout(120)
def test_two_orchestrators_on_one_postgres_dispatch_each_job_once(subnet, pg_databases):
    url = pg_databases()
    counting = subnet.add_stub_miner("//Dave")
    first = subnet.start_orchestrator(db_url=url, dispatch_batch=2)
    second = subnet.start_orchestrator(db_url=url, dispatch_batch=2)
    key = subnet.new_key(first)
    store = Store(url)
    try:
        deadline = datetime.now(UTC) + timedelta(minutes=5)
        payload = {"prompt": "x", "seed": 1, "width": 64, "height": 64, "steps": 1, "guidance": 3.5, "loras": []}
        rows = [job_row(key.id, "inference", payload, deadline, 60) for _ in range(JOBS)]
        created = {job.id for job in store.insert_jobs(rows)}
        for handle in (first, second):
            handle.orch.dispatcher.wake()
        wait_until(lambda: len(counting.received) >= JOBS, 60, "every job to reach the miner")
        wait_until(lambda: all(store.load_job(j).status == "running" for j in created), 30, "every job to run")
    finally:
        store.close()
    sent = Counter(body["job_id"] for body in counting.received)
    assert set(sent) == {f"{job_id}-1" for job_id in created}  # each job sent once, as its first attempt
    assert max(sent.values()) == 1


class _NoMiners:
    """A registry with nobody to send to: the dispatcher's own rounds claim nothing."""

    def cached_candidates(self) -> list:
        return []


def test_a_send_accepted_while_a_replica_holds_its_row_still_shows_running(pg_databases):
    # A replica's claim that looked at the row holds it for a moment; `mark_running` skips rows
    # held by others rather than wait (waiting could deadlock replicas), so it must try again.
    import psycopg

    url = pg_databases()
    store = Store.open(url)
    key = store.create_api_key("client").key.id
    (job,) = store.insert_jobs(
        [job_row(key, "inference", {"prompt": "x"}, datetime.now(UTC) + timedelta(minutes=5), 60)]
    )
    assert [j.id for j in store.claim_for_dispatch(1, kinds=["inference"])] == [job.id]
    holder = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
    holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
    settings = OrchestratorSettings(dispatch_interval_s=0.3)
    dispatcher = Dispatcher(store, _NoMiners(), ORCHESTRATOR, settings, events=None)  # type: ignore[arg-type]

    async def accept_while_held() -> list[str]:
        await dispatcher.start()
        try:
            dispatcher._note_running(job.id)  # what an accepted send does
            await asyncio.sleep(0.2)
            seen = [store.load_job(job.id).status]
            holder.rollback()  # the replica's transaction ends
            # The retry comes a dispatch interval (0.3 s) after the first try's write: wait for it
            # (up to 10 s on a loaded machine) rather than for a fixed time.
            for _ in range(100):
                await asyncio.sleep(0.1)
                if (status := store.load_job(job.id).status) != "dispatched":
                    break
            return [*seen, status]
        finally:
            await dispatcher.stop()

    try:
        assert asyncio.run(accept_while_held()) == ["dispatched", "running"]
    finally:
        holder.close()
        store.close()
