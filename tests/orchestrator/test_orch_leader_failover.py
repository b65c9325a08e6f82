"""Kill -9 of the leader under load: two `orchestrator serve` processes on one PostgreSQL database
and one data dir, fake miners (bench/fake_miners.py), audits on for a good share of the jobs.
The first replica leads every singleton loop; it is killed once it has audited a job, while the
client keeps submitting to both. The other replica then leads every loop within the takeover
bound, every accepted request still succeeds, every picked job is audited exactly once (the
survivor finishes what the dead leader left), and scores are refreshed again.

The fake miners' images are not what the reference engine renders, so most verdicts are
failures; the counts are what is checked here, not the verdicts.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from dippy_studio.orchestrator.leader import ROLES
from dippy_studio.orchestrator.models import Audit, Job
from dippy_studio.orchestrator.store import Store
from localnet_kit import wait_until
from orchestrator.process_kit import FakeMiners, OrchestratorProcess, register, tail

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ORCHESTRATOR_URI = "//failover/orchestrator"
TAKEOVER_S = 3.0
RATE = 3.0  # requests per second, alternating between the replicas
ENV = {
    "DIPPY_ORCH_LEADER_TAKEOVER_S": str(TAKEOVER_S),
    "DIPPY_ORCH_AUDIT_POLL_S": "0.5",
    "DIPPY_ORCH_AUDIT_BASE_RATE": "0.2",
    "DIPPY_ORCH_AUDIT_PROBATION_JOBS": "0",
    "DIPPY_ORCH_AUDIT_MAX_GAP": "1000",
    # Longer than the test: the survivor's scores get a new window only if its loop runs them.
    "DIPPY_ORCH_SCORE_INTERVAL_S": "600",
    # Jobs out at the killed replica's miners call back to it in vain: they time out and the
    # survivor's sweeper sends them again.
    "DIPPY_ORCH_INFERENCE_ATTEMPT_TIMEOUT_S": "3",
    "DIPPY_ORCH_MAX_ATTEMPTS": "6",
    "DIPPY_ORCH_MIN_ATTEMPT_S": "0.5",
    "DIPPY_ORCH_SWEEP_INTERVAL_S": "0.2",
    "DIPPY_ORCH_PROBE_INTERVAL_S": "0.5",
    "DIPPY_ORCH_SYNC_INTERVAL_S": "1",
    "DIPPY_ORCH_REFUSAL_COOLDOWN_S": "1",
}


class Client:
    """Submits small image requests at RATE, to the replicas in turn; a request a replica does not
    answer (it is dead) goes to the next one."""

    def __init__(self, urls: list[str], secret: str) -> None:
        self.urls, self.secret = urls, secret
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="failover-client", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.secret}"}
        with httpx.Client(headers=headers, timeout=10) as http:
            k = 0
            while not self._stop.wait(1 / RATE):
                body = {"prompt": f"a lighthouse, take {k}", "seed": k, "width": 64, "height": 64, "steps": 2}
                for attempt in range(len(self.urls)):
                    url = self.urls[(k + attempt) % len(self.urls)]
                    try:
                        reply = http.post(f"{url}/v1/images", json=body)
                    except httpx.TransportError:
                        continue
                    if reply.status_code == 202:
                        self.accepted.append(reply.json()["request_id"])
                    else:
                        self.refused.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
                    break
                k += 1


def leads(replica: OrchestratorProcess) -> list[str] | None:
    try:
        return httpx.get(f"{replica.url}/health", timeout=2).json()["leads"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def window_end(replica: OrchestratorProcess) -> datetime:
    # The body is signed for validators; only the window matters here.
    scores = httpx.get(f"{replica.url}/v1/scores", timeout=10)
    assert scores.status_code == 200, scores.text
    return datetime.fromisoformat(scores.json()["window"]["end"])


def audits_per_job(store: Store) -> Counter[str]:
    with store.engine.connect() as conn:
        return Counter(dict(conn.execute(select(Audit.job_id, func.count()).group_by(Audit.job_id)).all()))


def flagged(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        return set(conn.scalars(select(Job.id).where(Job.audit.is_(True))))


def test_kill_9_of_the_leader_hands_every_loop_to_the_other_replica(tmp_path: Path, pg_databases) -> None:
    url = pg_databases()
    (tmp_path / "logs").mkdir()
    (tmp_path / "chain").mkdir()
    shared = tmp_path / "orch"  # one data dir: the audits leader reads results either replica stored
    first = OrchestratorProcess(tmp_path, url, ORCHESTRATOR_URI, ENV, name="first", data_dir=shared)
    second = OrchestratorProcess(tmp_path, url, ORCHESTRATOR_URI, ENV, name="second", data_dir=shared)
    with contextlib.ExitStack() as cleanup:
        store = Store.open(url)
        cleanup.callback(store.close)
        key = store.create_api_key("failover", rate_limit_per_minute=1_000_000)
        for replica in (first, second):
            cleanup.callback(lambda replica=replica: print(replica.log.name, tail(replica.log, 60)))
        miners = FakeMiners(
            "//failover/miner", 2, tmp_path / "logs" / "miners.log", ORCHESTRATOR_URI, "--delay-s", "0.3"
        )
        cleanup.callback(miners.stop)
        register(tmp_path / "chain", miners.listening())

        first.start()
        cleanup.callback(first.kill)
        wait_until(lambda: leads(first) == sorted(ROLES), 60, "the first replica to lead every loop")
        wait_until(lambda: first.healthy_miners() == 2, 30, "the miners to be healthy")
        # Requests go to the first alone until the second answers.
        client = Client([first.url, second.url], key.secret)
        client.start()
        cleanup.callback(client.stop)
        second.start()
        cleanup.callback(second.kill)
        wait_until(lambda: leads(second) == [], 60, "the second replica to serve, leading nothing")
        assert leads(first) == sorted(ROLES)
        scores_before = window_end(second)
        # The leader has judged a job: its audits are under way when it dies.
        wait_until(lambda: audits_per_job(store), 90, "the leader's first audit")
        killed_at = datetime.now(UTC)
        first.kill()
        started = time.monotonic()
        wait_until(lambda: leads(second) == sorted(ROLES), 2 * TAKEOVER_S, "the second replica to lead every loop")
        took_over_s = time.monotonic() - started
        # Load on the survivor alone until it has judged a job of its own (audits are sampled, so a
        # fixed stretch of load could pick none).
        wait_until(
            lambda: any(audit.created_at > killed_at for audit in store.list_audits()), 60, "the survivor's first audit"
        )
        client.stop()

        wait_until(lambda: all(j.status in ("succeeded", "failed", "canceled") for j in all_jobs(store, key)), 60,
                   "every request to end")  # fmt: skip
        wait_until(lambda: not store.flagged_without_verdict(), 90, "the survivor to audit every picked job")
        jobs = all_jobs(store, key)
        counts = audits_per_job(store)
        picked = flagged(store)
        audits = store.list_audits()
        survivor_end = window_end(second)

    assert took_over_s <= TAKEOVER_S, f"took {took_over_s:.1f}s to take over"
    assert client.refused == []
    assert set(client.accepted) == {job.id for job in jobs} and len(jobs) >= 10
    assert {job.id: job.status for job in jobs if job.status != "succeeded"} == {}
    # Each picked job judged once: the dead leader's verdicts stand, the survivor did the rest.
    assert set(counts) == picked and max(counts.values()) == 1
    assert any(audit.created_at < killed_at for audit in audits)
    assert any(audit.created_at > killed_at for audit in audits), "the survivor audited nothing"
    assert scores_before < killed_at < survivor_end


def all_jobs(store: Store, key) -> list[Job]:
    return store.list_jobs(key.key.id, limit=10_000)
