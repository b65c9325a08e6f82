"""Whole lifecycles against real miner services over HTTP: submit, dispatch, callback, webhook,
result and score; cancel; a miner that never answers; LoRA training and its use."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image

import miner_kit
import orchestrator.orch_kit as kit
from dippy_studio.protocol import MemoryNonceStore, SenderPolicy, verify_request
from dippy_studio.protocol.webhooks import verify
from orchestrator.orch_kit import (
    ORCHESTRATOR,
    bad_runner,
    dataset_zip,
    image_body,
    noise_png,
    sha256,
    wait_status,
    wait_until,
)

server = miner_kit.server  # fixture: the client's webhook receiver
subnet = kit.subnet  # fixture: a local chain, miners and orchestrators


def test_inference_from_submit_to_webhook_result_audit_and_score(subnet, server, db_url):
    bob = subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(audit_all=True, db_url=db_url)
    key = subnet.new_key(orch)
    client = subnet.client(orch, key)

    submitted = client.post("/v1/images", json=image_body(webhook_url=server.url("/hooks/dippy")))
    assert submitted.status_code == 202
    request_id = submitted.json()["request_id"]
    view = wait_status(client, request_id, {"succeeded", "failed"})
    assert view["status"] == "succeeded", view
    assert (view["miner_uid"], view["miner_hotkey"], view["attempts"]) == (bob.uid, bob.hotkey, 1)
    assert view["timings"]["latency_s"] > 0 and view["timings"]["miner"]["denoise"] > 0
    assert view["created_at"] <= view["dispatched_at"] <= view["started_at"] <= view["finished_at"]

    png = client.get(f"/v1/requests/{request_id}/result")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert sha256(png.content) == view["result"]["sha256"] == png.headers["x-result-sha256"]
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)

    # The webhook: Standard Webhooks signature with the key's secret, the status as its data.
    [hook] = server.wait_for(lambda received: len(received) >= 1, timeout=10)
    verify(key.webhook_secret, hook.headers, hook.body)
    event = json.loads(hook.body)
    assert event["type"] == "request.succeeded"
    assert event["data"]["request_id"] == request_id and event["data"]["result"]["sha256"] == view["result"]["sha256"]
    # Recorded once the receiver's answer is in, just after the receiver has the event.
    webhook = wait_until(
        lambda: (w := client.get(f"/v1/requests/{request_id}").json()["webhook"])["state"] != "pending" and w,
        10,
        "the delivery to be recorded",
    )
    assert webhook == {"state": "delivered", "attempts": 1}

    # Prefer: wait answers with the image itself; the engine is deterministic, so it is the same PNG.
    waited = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"})
    assert waited.status_code == 200 and waited.headers["preference-applied"] == "wait=30"
    assert base64.b64decode(waited.json()["result"]["data_base64"]) == png.content

    # Audited by re-running it on the reference engine: same profile, so the same bytes.
    wait_until(lambda: len(orch.store.list_audits(miner_hotkey=bob.hotkey)) == 2, 30, "the audits")
    audit = orch.store.list_audits(job_id=request_id)[0]
    assert audit.verdict == "pass" and audit.evidence["reference"]["sha256"] == view["result"]["sha256"]
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "succeeded"

    # The miner's work shows in its score, signed for validators.
    orch.orch.refresh_scores()
    scores = client.get("/v1/scores")
    caller = verify_request(
        scores.headers,
        scores.content,
        method="GET",
        path="/v1/scores",
        receiver_ss58=ORCHESTRATOR.ss58_address,
        nonce_store=MemoryNonceStore(),
        policy=SenderPolicy.allow_list([ORCHESTRATOR.ss58_address]),
    )
    assert caller.hotkey_ss58 == ORCHESTRATOR.ss58_address
    assert scores.json()["scores"][bob.hotkey] > 0


def test_cancel_a_running_request(subnet, server, db_url):
    stub = subnet.add_stub_miner("//Dave")  # accepts and never calls back
    orch = subnet.start_orchestrator(db_url=db_url)
    key = subnet.new_key(orch)
    client = subnet.client(orch, key)
    request_id = client.post("/v1/images", json=image_body(webhook_url=server.url("/hook"))).json()["request_id"]
    assert wait_status(client, request_id, {"running"})["miner_hotkey"] == stub.hotkey

    canceled = client.post(f"/v1/requests/{request_id}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert client.get(f"/v1/requests/{request_id}/result").status_code == 409
    # The miner is told to stop (best effort), and the client's webhook says canceled.
    wait_until(lambda: any(r.get("cancel") for r in stub.received), 10, "the miner to get the cancel")
    [hook] = server.wait_for(lambda received: len(received) >= 1, timeout=10)
    assert json.loads(hook.body)["type"] == "request.canceled"
    [attempt] = orch.store.list_attempts(request_id)
    assert attempt.outcome == "canceled"


def test_a_miner_that_never_answers_is_timed_out_and_the_job_goes_elsewhere(subnet):
    silent = subnet.add_stub_miner("//Dave")
    # Long enough for a real miner on a busy test machine, short enough to keep the test quick.
    orch = subnet.start_orchestrator(inference_attempt_timeout_s=4)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(steps=1, deadline_s=60)).json()["request_id"]
    assert wait_status(client, request_id, {"running"})["miner_hotkey"] == silent.hotkey

    bob = subnet.add_miner("//Bob")  # a working miner joins; the registry picks it up from the chain
    view = wait_status(client, request_id, {"succeeded", "failed"})
    attempts = orch.store.list_attempts(request_id)
    assert view["status"] == "succeeded", [(a.miner_hotkey, a.outcome, a.error) for a in attempts]
    assert view["miner_hotkey"] == bob.hotkey and view["attempts"] == 2
    assert view["finished_at"] < view["deadline"]
    first, second = attempts
    assert (first.miner_hotkey, first.outcome, second.miner_hotkey, second.outcome) == (
        silent.hotkey,
        "timeout",
        bob.hotkey,
        "succeeded",
    )
    assert "no result within 4s" in first.error


def test_train_a_lora_then_generate_with_it(subnet, server, db_url):
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(db_url=db_url)
    key = subnet.new_key(orch)
    client = subnet.client(orch, key)
    submitted = client.post(
        "/v1/loras",
        data={"trigger_word": "sks", "name": "sunsets", "steps": "2", "rank": "2"},
        files={"dataset": ("sunsets.zip", dataset_zip(2))},
    )
    assert submitted.status_code == 202, submitted.text
    view = wait_status(client, submitted.json()["request_id"], {"succeeded", "failed"}, timeout=60)
    assert view["status"] == "succeeded", view
    lora_id = view["result"]["lora_id"]
    lora = client.get(f"/v1/loras/{lora_id}").json()
    assert (lora["name"], lora["trigger_word"], lora["rank"]) == ("sunsets", "sks", 2)
    assert lora["source_request_id"] == view["request_id"] and lora["sha256"] == view["result"]["sha256"]
    assert [x["id"] for x in client.get("/v1/loras").json()] == [lora_id]
    weights = client.get(f"/v1/requests/{view['request_id']}/result")
    assert sha256(weights.content) == lora["sha256"]

    styled = client.post(
        "/v1/images", json=image_body(prompt="sks sunset", loras=[{"id": lora_id}]), headers={"Prefer": "wait=30"}
    )
    assert styled.status_code == 200 and styled.json()["status"] == "succeeded", styled.json()


def test_a_miner_caught_by_an_audit_scores_nothing(subnet, tmp_path):
    # Plausible images (right size, not blank) that are not what the model renders for the request.
    cheat = subnet.add_miner("//Eve", inference_runner=bad_runner(tmp_path, lambda job: noise_png(seed=job["seed"])))
    orch = subnet.start_orchestrator(audit_all=True)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"}).json()["request_id"]
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "succeeded"  # valid, so delivered

    wait_until(lambda: orch.store.list_audits(job_id=request_id), 30, "the audit")
    [audit] = orch.store.list_audits(job_id=request_id)
    assert (audit.miner_hotkey, audit.verdict) == (cheat.hotkey, "fail")
    assert "SSIM" in audit.evidence["verdict"]["reason"]
    assert orch.orch.refresh_scores().scores == {cheat.hotkey: 0.0}
    assert orch.store.get_miner(cheat.hotkey).score == 0.0


def test_an_audit_picked_before_a_restart_is_done_after_it(subnet):
    subnet.add_miner("//Bob")
    first = subnet.start_orchestrator()  # audits nothing
    client = subnet.client(first, subnet.new_key(first))
    request_id = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"}).json()["request_id"]
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "succeeded"
    # As if the job had been picked for an audit and the orchestrator stopped before running it.
    first.store.flag_for_audit(request_id)
    first.served.stop()
    assert first.store.flagged_without_verdict() == [request_id]

    again = subnet.start_orchestrator(data_dir=first.orch.settings.data_dir)
    [audit] = wait_until(lambda: again.store.list_audits(job_id=request_id), 60, "the owed audit")
    assert audit.verdict == "pass"
    assert again.store.flagged_without_verdict() == []
