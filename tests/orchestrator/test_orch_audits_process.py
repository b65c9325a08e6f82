"""Audits in a process of their own (`dippy-studio orchestrator audits`): API replicas run with
`judge_audits` off pick and flag jobs but never judge them (nor load a model for them); the
audits process, on the same database and blobs, judges what they flagged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
from dippy_studio.orchestrator.audit import AuditSampler, SamplerPolicy
from dippy_studio.orchestrator.cli import orchestrator_app
from dippy_studio.orchestrator.leader import for_store
from dippy_studio.orchestrator.service import audit_queue, blob_stores
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store, Success, job_row
from dippy_studio.protocol import signer_from_uri
from localnet_kit import wait_until

PAYLOAD = {"prompt": "a red fox in the snow", "seed": 7, "width": 32, "height": 32, "steps": 4, "guidance": 3.5}


def finished_job(store: Store, key: str, hotkey: str, png: bytes, fingerprint: str, results) -> str:
    """A succeeded inference job of `PAYLOAD`, whose miner `hotkey` sent `png`."""
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    (job,) = store.insert_jobs([job_row(key, "inference", {**PAYLOAD, "loras": []}, deadline, 60)])
    assert store.claim_for_dispatch(1, kinds=["inference"], assign=lambda job, tried: (hotkey, 1))
    sha256 = results.put(png)
    success = Success(result_sha256=sha256, result_bytes=len(png), fingerprint=fingerprint, timings={})
    assert store.succeed(job.id, success, attempt=1)
    return job.id


@pytest.mark.timeout(300)
def test_replicas_that_do_not_judge_flag_their_picks_and_the_audits_process_judges_them(db_url, tmp_path: Path):
    data_dir = tmp_path / "orchestrator"
    replica = OrchestratorSettings(
        data_dir=data_dir, db_url=db_url, dev_key="//Alice", judge_audits=False, audit_poll_s=0.1
    )
    store = Store(db_url)
    leadership = for_store(store, replica.leader_takeover_s)
    stores = blob_stores(replica)
    every_job = AuditSampler(SamplerPolicy(base_rate=1.0, probation_rate=1.0, probation_jobs=2, max_gap=1000))
    queue = audit_queue(replica, store, stores, signer_from_uri("//Alice"), leadership, sampler=every_job)
    # What an honest miner and one that cut its steps short sent back, on the tiny profile the
    # audits process re-runs them on.
    engine = Engine(EngineOptions(profile="tiny", threads=1))
    request = GenerationRequest(**PAYLOAD)
    honest = engine.generate(request)
    cheat = engine.generate(request.model_copy(update={"steps": 3}))
    key = store.create_api_key("client").key.id
    honest_id = finished_job(store, key, "5Honest", honest.png, honest.fingerprint, stores[0])
    cheat_id = finished_job(store, key, "5Cheat", cheat.png, honest.fingerprint, stores[0])
    process = None
    try:
        queue.start()
        for job_id in (honest_id, cheat_id):
            assert queue.offer(store.load_job(job_id))
        wait_until(lambda: store.flagged_without_verdict() == [honest_id, cheat_id], 20, "the picks to be flagged")
        time.sleep(10 * replica.audit_poll_s)  # ten more turns of the replica's loop: still no verdict
        assert store.list_audits() == [] and "audits" not in leadership.leads()

        env = {**os.environ, "DIPPY_ORCH_AUDIT_POLL_S": "0.2"}
        process = subprocess.Popen(
            [sys.executable, "-m", "dippy_studio.cli", "orchestrator", "audits", "--data-dir", str(data_dir),
             "--db", db_url, "--dev-key", "//Alice"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        verdicts = wait_until(
            lambda: {a.job_id: a.verdict for a in store.list_audits()} if len(store.list_audits()) == 2 else None,
            240,
            "the audits process's verdicts",
        )
        assert verdicts == {honest_id: "pass", cheat_id: "fail"}
        assert store.flagged_without_verdict() == []
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "audits for" in output and f"audit of {honest_id}" in output and "failed the audit" in output, output
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        queue.stop()
        leadership.close()
        store.close()


def test_the_audits_process_refuses_to_start_with_audits_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DIPPY_ORCH_AUDIT", "false")
    result = CliRunner().invoke(orchestrator_app, ["audits", "--data-dir", str(tmp_path), "--dev-key", "//Alice"])
    assert result.exit_code == 2, result.output
    assert "audits are off" in result.output and "Traceback" not in result.output


def test_the_audits_process_needs_a_signing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("DIPPY_ORCH_DEV_KEY", "DIPPY_ORCH_WALLET_NAME"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(orchestrator_app, ["audits", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no signing key" in result.output, result.output
