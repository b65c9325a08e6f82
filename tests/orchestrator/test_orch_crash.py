"""Crashes under load: kill -9 a miner, and kill -9 the orchestrator and start it again on the same
database, while a client submits a few hundred requests. Every accepted request still ends, and
ends once: one success per request, with the bytes of its last attempt, scored once.

Real processes throughout: `dippy-studio orchestrator serve` on the `db_url` database (SQLite or
PostgreSQL), and fake miners (bench/fake_miners.py: signed protocol, no engine) that take a
moment per job, so jobs are in flight at a miner, and callbacks on their way, when something dies.
The client resends a request that got no answer, as a client of a crashed server does.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from dippy_studio.orchestrator.models import Job, JobAttempt
from dippy_studio.orchestrator.scoring import latency_score, window_scores
from dippy_studio.orchestrator.store import Store
from localnet_kit import wait_until
from orchestrator.process_kit import FakeMiners, OrchestratorProcess, fake_miners, register, tail

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ORCHESTRATOR_URI = "//crash/orchestrator"
JOBS = 300
RATE = 30.0  # requests per second the client sends
MINER_DELAY_S = 0.5  # each job's time at a fake miner: about RATE / 2 jobs are at the miners at once
ATTEMPT_TIMEOUT_S = 3.0
# Short loops, so a crashed miner's jobs come back within seconds; attempts enough for a job that
# meets both crashes (and a dead miner the restarted orchestrator has not probed yet) to succeed.
ORCHESTRATOR_ENV = {
    "DIPPY_ORCH_AUDIT": "false",
    "DIPPY_ORCH_INFERENCE_ATTEMPT_TIMEOUT_S": str(ATTEMPT_TIMEOUT_S),
    "DIPPY_ORCH_MAX_ATTEMPTS": "6",
    "DIPPY_ORCH_MIN_ATTEMPT_S": "0.5",
    "DIPPY_ORCH_SWEEP_INTERVAL_S": "0.2",
    "DIPPY_ORCH_PROBE_INTERVAL_S": "0.5",
    "DIPPY_ORCH_SYNC_INTERVAL_S": "1",
    "DIPPY_ORCH_REFUSAL_COOLDOWN_S": "1",
}
MINER_ARGS = ("--delay-s", str(MINER_DELAY_S))
ACTIVE = ("dispatched", "running")
TERMINAL = ("succeeded", "failed", "canceled")


class Client:
    """Submits JOBS image requests at RATE per second from one thread. A request that gets no
    answer (the orchestrator is down, or died while answering) is sent again until one is accepted."""

    def __init__(self, url: str, secret: str) -> None:
        self.url, self.secret = url, secret
        self.accepted: list[str] = []
        self.resent = 0
        self.refused: list[str] = []  # answers that were neither 202 nor worth resending
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="crash-client", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.secret}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as http:
            started = time.monotonic()
            for k in range(JOBS):
                if self._stop.wait(max(0.0, started + k / RATE - time.monotonic())):
                    return
                body = {"prompt": f"a lighthouse, take {k}", "seed": k, "width": 64, "height": 64}
                while not self._send(http, body):
                    self.resent += 1
                    if self._stop.wait(0.05):
                        return

    def _send(self, http: httpx.Client, body: dict[str, Any]) -> bool:
        """True once the request is settled: accepted, or refused for good."""
        try:
            reply = http.post("/v1/images", json=body)
        except httpx.TransportError:
            return False
        if reply.status_code == 202:
            self.accepted.append(reply.json()["request_id"])
            return True
        if reply.status_code in (429, 503) or reply.status_code >= 500:
            return False
        self.refused.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
        return True


def count_jobs(store: Store, statuses: tuple[str, ...], miners: list[str] | None = None) -> int:
    """Jobs in these states (at these miners)."""
    query = select(func.count()).select_from(Job).where(Job.status.in_(statuses))
    if miners is not None:
        query = query.where(Job.miner_hotkey.in_(miners))
    with store.engine.connect() as conn:
        return int(conn.scalar(query) or 0)


def all_jobs(store: Store, api_key_id: str) -> dict[str, Job]:
    return {job.id: job for job in store.list_jobs(api_key_id, limit=10 * JOBS)}


def test_every_request_ends_exactly_once_through_kill_9_of_a_miner_and_of_the_orchestrator(
    tmp_path: Path, db_url: str
) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "chain").mkdir()
    orchestrator = OrchestratorProcess(tmp_path, db_url, ORCHESTRATOR_URI, ORCHESTRATOR_ENV)
    started = datetime.now(UTC)
    with contextlib.ExitStack() as cleanup:
        store = Store.open(db_url, migrate=False)
        cleanup.callback(store.close)
        key = store.create_api_key("crash", rate_limit_per_minute=1_000_000)
        client = Client(orchestrator.url, key.secret)
        cleanup.callback(lambda: print(tail(orchestrator.log, 80)))  # pytest shows it when the test fails
        steady = FakeMiners("//crash/steady", 2, tmp_path / "logs" / "steady.log", ORCHESTRATOR_URI, *MINER_ARGS)
        cleanup.callback(steady.stop)
        victim = FakeMiners("//crash/victim", 1, tmp_path / "logs" / "victim.log", ORCHESTRATOR_URI, *MINER_ARGS)
        cleanup.callback(victim.stop)
        steady_miners, (victim_miner,) = steady.listening(), victim.listening()
        steady_hotkeys, victim_hotkey = [m["hotkey"] for m in steady_miners], victim_miner["hotkey"]
        register(tmp_path / "chain", [*steady_miners, victim_miner])
        orchestrator.start()
        cleanup.callback(orchestrator.kill)
        wait_until(lambda: orchestrator.healthy_miners() == 3, 120, "the orchestrator to see 3 healthy miners")
        client.start()
        cleanup.callback(client.stop)

        # Kill the miner while it holds jobs it accepted: they never call back.
        wait_until(
            lambda: len(client.accepted) >= JOBS // 4 and count_jobs(store, ACTIVE, [victim_hotkey]) >= 2,
            60,
            "the victim miner to hold jobs",
        )
        victim.kill()

        # Kill the orchestrator while jobs are out at miners, and start it again on the same
        # database and port: their callbacks retry meanwhile, or their attempts time out.
        wait_until(
            lambda: len(client.accepted) >= JOBS // 2 and count_jobs(store, ACTIVE, steady_hotkeys) >= 5,
            60,
            "jobs in flight for the orchestrator's crash",
        )
        orchestrator.kill()
        in_flight_at_crash = count_jobs(store, ACTIVE)
        orchestrator.start()

        client.thread.join(120)
        assert not client.thread.is_alive(), f"the client did not finish: {len(client.accepted)} accepted"
        wait_until(lambda: count_jobs(store, ("queued", *ACTIVE)) == 0, 60, "every request to reach a terminal state")

        jobs = all_jobs(store, key.key.id)
        attempts: defaultdict[str, list[JobAttempt]] = defaultdict(list)
        for attempt in store.list_attempts(since=started - timedelta(minutes=1)):
            attempts[attempt.job_id].append(attempt)
        scores = window_scores(
            store, started - timedelta(minutes=1), datetime.now(UTC) + timedelta(seconds=1), timedelta(minutes=5),
            weights={"inference": 1.0, "training": 1.0},
        )  # fmt: skip

    assert client.refused == []
    assert len(client.accepted) == JOBS and len(set(client.accepted)) == JOBS
    assert set(client.accepted) <= set(jobs), "an accepted request is missing from the database"
    # A request resent because its answer was lost with the orchestrator is a second request: it
    # must end like any other.
    assert len(jobs) - JOBS <= client.resent
    failed = {job.id: job.error for job in jobs.values() if job.status != "succeeded"}
    assert failed == {}, f"{len(failed)} requests did not succeed ({in_flight_at_crash} were out at the crash)"

    wins: dict[str, JobAttempt] = {}
    for job in jobs.values():
        won = [a for a in attempts[job.id] if a.outcome == "succeeded"]
        assert len(won) == 1, f"{job.id}: {len(won)} successful attempts"
        assert [a for a in attempts[job.id] if a.outcome is None] == [], f"{job.id}: an attempt left open"
        wins[job.id] = won[0]
        assert (won[0].attempt, won[0].miner_hotkey) == (job.attempts, job.miner_hotkey), job.id
        # The bytes kept are those the miner sent for the attempt that won (every attempt's differ).
        expected = fake_miners.unique_png(64, 64, f"{job.id}-{job.attempts}")
        assert job.result_sha256 == hashlib.sha256(expected).hexdigest(), job.id
    lost_at_victim = [a for tries in attempts.values() for a in tries if a.miner_hotkey == victim_hotkey]
    assert "timeout" in {a.outcome for a in lost_at_victim}, "no job was lost at the killed miner: nothing tested"

    # Scores count each request once: a miner's score is the sum over the attempts that won.
    expected_scores: Counter[str] = Counter()
    for job_id, win in wins.items():
        expected_scores[win.miner_hotkey] += latency_score(win.latency_s, jobs[job_id].attempt_timeout_s)
    assert {hotkey: score for hotkey, score in scores.items() if score} == pytest.approx(dict(expected_scores))
