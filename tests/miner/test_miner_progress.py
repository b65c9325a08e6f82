"""Miners report progress to the job's sender: signed, throttled per job, the newest numbers."""

from __future__ import annotations

import json
import time

from dippy_studio.miner.progress import ProgressReporter, progress_url
from dippy_studio.miner.store import JobRecord
from dippy_studio.protocol import MemoryNonceStore, SenderPolicy, verify_request
from dippy_studio.protocol.outbound import UrlPolicy
from miner_kit import MINER, ORCHESTRATOR, inference_job, miner_settings


def _progress(received, job_id: str) -> list[dict]:
    return [json.loads(r.body) for r in received if r.path == f"/callback/{job_id}/progress"]


def test_denoising_steps_are_reported_signed_by_the_miner(make_miner, server, tmp_path):
    client = make_miner(miner_settings(tmp_path, progress_interval_s=0.02))
    assert client.post("/v1/inference", inference_job("job-1", server, steps=20)).status_code == 202
    # Reports go from their own thread, the result's callback from another: on a loaded machine the
    # reports may land after the callback, so wait for both.
    received = server.wait_for(lambda got: any(r.path == "/callback/job-1" for r in got) and _progress(got, "job-1"))
    reports = _progress(received, "job-1")
    assert reports, [r.path for r in received]
    assert all(r["job_id"] == "job-1" and r["total"] == 20 and 1 <= r["step"] <= 20 for r in reports)
    assert [r["step"] for r in reports] == sorted(r["step"] for r in reports)
    assert all(r["eta_s"] >= 0 for r in reports)
    first = next(r for r in received if r.path == "/callback/job-1/progress")
    caller = verify_request(
        first.headers,
        first.body,
        method="POST",
        path="/callback/job-1/progress",
        receiver_ss58=ORCHESTRATOR.ss58_address,
        nonce_store=MemoryNonceStore(retention=7200),
        policy=SenderPolicy.open(),
        max_age=3600,  # checked after the job: only who signed matters here
    )
    assert caller.hotkey_ss58 == MINER.ss58_address


def _record(server, job_id: str) -> JobRecord:
    class Record:
        pass

    record = Record()
    record.job_id, record.callback_url, record.sender = (
        job_id,
        server.url(f"/callback/{job_id}"),
        ORCHESTRATOR.ss58_address,
    )
    return record  # type: ignore[return-value]


def test_reports_are_throttled_per_job_and_the_newest_wins(server):
    reporter = ProgressReporter(MINER, UrlPolicy(allow_loopback=True), interval_s=0.3, timeout=5)
    reporter.start()
    try:
        record = _record(server, "job-2")
        started = time.monotonic()
        for step in range(1, 501):
            reporter.report(record, step, 500, loss=0.5)
        elapsed = time.monotonic() - started
        received = server.wait_for(lambda got: any(json.loads(r.body)["step"] == 500 for r in got), timeout=10)
        steps = [r["step"] for r in _progress(received, "job-2")]
        # The first goes at once, then at most one per interval, each the newest: a burst of 500
        # reports makes two posts, not 500.
        assert steps[-1] == 500 and len(steps) <= 2 + elapsed / 0.3, steps
        assert all(r["loss"] == 0.5 for r in _progress(received, "job-2"))
        reporter.finished("job-2")
        reporter.report(_record(server, "job-3"), 1, 2)
        server.wait_for(lambda got: bool(_progress(got, "job-3")), timeout=10)
    finally:
        reporter.stop()


def test_numbers_a_report_cannot_carry_are_left_out_not_raised_into_the_job(server):
    # A long training run's first steps can promise more than the report's 30 days; a diverging
    # loss is not a number. The job goes on; the report says what it can.
    reporter = ProgressReporter(MINER, UrlPolicy(allow_loopback=True), interval_s=0.01, timeout=5)
    reporter.start()
    try:
        reporter.report(_record(server, "long"), 1, 100_000, loss=float("inf"), eta_s=40 * 24 * 3600.0)
        received = server.wait_for(lambda got: bool(_progress(got, "long")), timeout=10)
        assert _progress(received, "long") == [{"job_id": "long", "step": 1, "total": 100_000}]
    finally:
        reporter.stop()


def test_progress_goes_beside_the_callback():
    assert progress_url("http://o/v1/miner-callbacks/req_1") == "http://o/v1/miner-callbacks/req_1/progress"
    assert progress_url("http://o/cb/req_1/?t=1") == "http://o/cb/req_1/progress?t=1"
