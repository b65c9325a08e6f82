"""The miner service around the jobs: authentication, capacity and readiness, metrics, hotkey
check, settings, and recovery after a crash (a real process killed mid-job)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dippy_studio.miner.settings import MinerSettings
from dippy_studio.protocol.auth import sign_request
from miner_kit import MINER, ORCHESTRATOR, STRANGER, SignedClient, inference_job, miner_settings

# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["btauth", "epistula"])
def test_both_signature_schemes_are_accepted(make_miner, scheme):
    client = make_miner()
    client.scheme = scheme
    response = client.post("/v1/inference", inference_job(f"ok-{scheme}"))
    assert response.status_code == 202, response.text
    assert client.wait_status(f"ok-{scheme}", {"succeeded"})["status"] == "succeeded"


TIMESTAMP = {"btauth": "X-Bittensor-Nonce", "epistula": "Epistula-Timestamp"}


def _signed(method: str, path: str, body: bytes, *, signer=ORCHESTRATOR, receiver=None, scheme="btauth", now=None):
    headers = sign_request(signer, method, path, body, receiver or MINER.ss58_address, scheme, now=now)
    return {**headers, "content-type": "application/json"}


@pytest.mark.parametrize("scheme", ["btauth", "epistula"])
def test_authentication_failures(make_miner, scheme):
    client = make_miner().client
    body = json.dumps(inference_job("auth")).encode()
    path = "/v1/inference"

    def post(headers, content=body):
        return client.post(path, content=content, headers=headers)

    cases = {
        "unsigned": (post({"content-type": "application/json"}), 401),
        "tampered body": (post(_signed("POST", path, body, scheme=scheme), body.replace(b"house", b"House")), 401),
        "wrong receiver": (post(_signed("POST", path, body, receiver=STRANGER.ss58_address, scheme=scheme)), 401),
        "stale": (post(_signed("POST", path, body, scheme=scheme, now=time.time() - 60)), 401),
        "future": (post(_signed("POST", path, body, scheme=scheme, now=time.time() + 60)), 401),
        "unknown sender": (post(_signed("POST", path, body, signer=STRANGER, scheme=scheme)), 403),
        # Digits enough to pass for a number, too many for a float.
        "absurd timestamp": (post({**_signed("POST", path, body, scheme=scheme), TIMESTAMP[scheme]: "9" * 400}), 401),
    }  # fmt: skip
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert response.json()["detail"], name

    headers = _signed("POST", path, body, scheme=scheme)
    assert post(headers).status_code == 202
    replay = post(headers)
    assert replay.status_code == 401 and "already accepted" in replay.json()["detail"]


def test_every_v1_route_needs_a_signature(make_miner):
    client = make_miner().client
    for method, path in [("GET", "/v1/jobs/x"), ("GET", "/v1/jobs/x/result"), ("POST", "/v1/jobs/x/cancel"),
                         ("GET", "/v1/capacity"), ("POST", "/v1/train")]:  # fmt: skip
        assert client.request(method, path).status_code == 401, path


def test_stake_policy_reads_the_chain(tmp_path, make_miner):
    class Chain:
        def stake_of(self, hotkey: str) -> float | None:
            return {ORCHESTRATOR.ss58_address: 5000.0, STRANGER.ss58_address: 1.0}.get(hotkey)

    settings = miner_settings(tmp_path, allow_hotkeys=[], min_stake=1000.0)
    client = make_miner(settings, stake_lookup=Chain())
    assert client.post("/v1/inference", inference_job("staked")).status_code == 202
    refused = client.post("/v1/inference", inference_job("poor"), signer=STRANGER)
    assert refused.status_code == 403 and "stake" in refused.json()["detail"]


# --- capacity, readiness, metrics, hotkey check --------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_capacity_and_readiness_follow_the_workers(make_miner, tiny_engine):
    class WorkerDeath(BaseException):
        pass

    def dies(record, check):
        raise WorkerDeath

    client = make_miner()
    capacity = client.get("/v1/capacity").json()
    assert capacity["hotkey"] == MINER.ss58_address
    assert capacity["fingerprints"] == [tiny_engine.fingerprint]
    assert capacity["inference"]["available"] is True
    assert capacity["inference"]["queue_limit"] == 64
    assert client.client.get("/ready").status_code == 200
    assert client.client.get("/health").json() == {"status": "ok"}

    dead = make_miner(miner_settings(Path(client.client.app.state.miner.settings.data_dir).parent / "dead"),
                      inference_runner=dies)  # fmt: skip
    dead.post("/v1/inference", inference_job("kills-worker"))
    deadline = time.monotonic() + 10
    while dead.get("/v1/capacity").json()["inference"]["available"] and time.monotonic() < deadline:
        time.sleep(0.05)
    lane = dead.get("/v1/capacity").json()["inference"]
    assert lane["available"] is False and lane["workers_alive"] == 0
    ready = dead.client.get("/ready")
    assert ready.status_code == 503 and "inference: 0/1 workers alive" in ready.json()["problems"]
    refused = dead.post("/v1/inference", inference_job("after-death"))
    assert refused.status_code == 503


def test_metrics(make_miner):
    client = make_miner()
    client.post("/v1/inference", inference_job("m1"))
    client.wait_status("m1", {"succeeded"})
    text = client.client.get("/metrics").text
    assert 'dippy_miner_jobs{kind="inference",status="succeeded"} 1.0' in text
    assert 'dippy_miner_queue_depth{kind="inference"} 0.0' in text
    assert 'dippy_miner_job_duration_seconds_count{kind="inference",status="succeeded"} 1.0' in text
    assert "dippy_miner_lora_cache_hits_total" in text


def test_check_hotkey(make_miner):
    client = make_miner().client
    assert client.get(f"/check/{MINER.ss58_address}").status_code == 200
    assert client.get(f"/check/{ORCHESTRATOR.ss58_address}").status_code == 404


def test_openapi_is_served(make_miner):
    spec = make_miner().client.get("/openapi.json").json()
    assert {"/v1/inference", "/v1/train", "/v1/jobs/{job_id}", "/v1/capacity"} <= set(spec["paths"])


# --- settings ------------------------------------------------------------------------------


def test_settings_from_env_and_file(tmp_path, monkeypatch):
    config = tmp_path / "miner.toml"
    config.write_text("port = 9001\ninference_queue_limit = 7\n[engine]\nthreads = 1\n")
    monkeypatch.setenv("DIPPY_MINER_PORT", "9002")
    settings = MinerSettings.load(config, data_dir=tmp_path)
    assert settings.port == 9002  # env beats the file
    assert settings.inference_queue_limit == 7 and settings.engine.threads == 1
    assert MinerSettings.load(config, port=9003).port == 9003  # flags beat env
    with pytest.raises(ValueError, match="does not exist"):
        MinerSettings.load(tmp_path / "missing.toml")


def test_cli_refuses_bad_configuration(tmp_path):
    from helpers import run_cli

    no_key = run_cli("miner", "serve", "--data-dir", str(tmp_path))
    assert no_key.returncode == 2 and "no signing key" in no_key.stderr
    no_policy = run_cli("miner", "serve", "--dev-key", "//Bob", "--data-dir", str(tmp_path))
    assert no_policy.returncode == 2 and "policy" in no_policy.stderr.lower()


# --- crash and restart ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_miner(port: int, data_dir: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "dippy_studio.cli", "miner", "serve", "--dev-key", "//Bob", "--port", str(port),
            "--allow-hotkey", ORCHESTRATOR.ss58_address, "--allow-loopback", "--data-dir", str(data_dir)]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"miner exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("miner did not become ready")


@pytest.mark.slow
def test_killed_mid_job_then_restarted_finishes_every_job(tmp_path, server, tiny_engine):
    from dippy_studio.engine import GenerationRequest

    port = _free_port()
    data_dir = tmp_path / "miner"
    proc = _start_miner(port, data_dir)
    try:
        client = SignedClient(httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30))
        slow = inference_job("slow", server, width=160, height=160, steps=30)
        assert client.post("/v1/inference", slow).status_code == 202
        assert client.post("/v1/inference", inference_job("queued", server)).status_code == 202
        client.wait_status("slow", {"running"})
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = _start_miner(port, data_dir)
        for job_id in ("slow", "queued"):
            assert client.wait_status(job_id, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
        got = server.wait_for(lambda r: {x.path for x in r} >= {"/callback/slow", "/callback/queued"}, timeout=60)
        slow_meta = next(r for r in got if r.path == "/callback/slow").meta()
        expected = tiny_engine.generate(
            GenerationRequest(prompt=slow["prompt"], seed=7, width=160, height=160, steps=30)
        )
        assert slow_meta["result_sha256"] == expected.sha256
    finally:
        proc.kill()
        proc.wait(10)


def test_the_miners_api_pages_work_offline(make_miner):
    from api_docs_kit import assert_docs_load_only_served_assets

    assert_docs_load_only_served_assets(make_miner().client)
