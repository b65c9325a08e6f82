"""The store on SQLite and PostgreSQL: what the API, dispatcher and sweeper rely on."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import make_url

import orchestrator.orch_kit as kit
from dippy_studio.orchestrator.errors import InvalidRequest, RateLimited, Unauthorized
from dippy_studio.orchestrator.models import ApiKey, Base, Job, RateWindow
from dippy_studio.orchestrator.store import (
    IllegalTransition,
    Store,
    Success,
    SweepResult,
    UnknownApiKey,
    _count_request,
    job_row,
)

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
KINDS = ["inference", "training"]


def sec(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def create_job(store: Store, key_id: str, kind: str, payload: dict, deadline: datetime, timeout_s: float, **kw) -> Job:
    return store.insert_jobs([job_row(key_id, kind, payload, deadline, timeout_s, **kw)])[0]


def make_job(store: Store, key_id: str, *, deadline_s: float = 600, timeout_s: float = 30, created_s: float = 0, **kw):
    return create_job(
        store, key_id, "inference", {"prompt": "a cat"}, sec(deadline_s), timeout_s, now=sec(created_s), **kw
    )


def claim(store: Store, limit: int, at: float, **kw) -> list[Job]:
    return store.claim_for_dispatch(limit, now=sec(at), kinds=KINDS, **kw)


def dispatch(store: Store, job_id: str, hotkey: str, uid: int, at: float) -> None:
    claimed = claim(store, 10, at, assign=lambda job, tried: (hotkey, uid))
    assert [j.id for j in claimed] == [job_id]


@pytest.fixture
def key_id(store: Store) -> str:
    return store.create_api_key("client").key.id


# ---- job state machine ------------------------------------------------------------------------


def test_mark_running_moves_only_jobs_still_dispatched(store: Store, key_id: str):
    queued, accepted, finished = (make_job(store, key_id, created_s=n) for n in range(3))
    claimed = claim(store, 2, at=1)
    assert [j.id for j in claimed] == [queued.id, accepted.id]
    # A fast miner's callback came before the batch: that job must not go back to running.
    assert store.transition(queued.id, "dispatched", "succeeded", now=sec(2), result_sha256="ab" * 32)
    assert store.mark_running([queued.id, accepted.id, finished.id], now=sec(3)) == {accepted.id}
    assert store.mark_running([], now=sec(3)) == set()
    statuses = {j: store.load_job(j) for j in (queued.id, accepted.id, finished.id)}
    assert [statuses[j].status for j in (queued.id, accepted.id, finished.id)] == ["succeeded", "running", "queued"]
    assert statuses[accepted.id].started_at == sec(3)


def test_concurrent_writes_share_transactions_and_each_caller_sees_its_own_outcome(store: Store, key_id: str):
    jobs = [make_job(store, key_id, created_s=n / 100) for n in range(64)]
    assert [j.id for j in claim(store, 64, at=1)] == [j.id for j in jobs]
    groups_before = store.writer.groups
    # Every job's callback twice at once: exactly one of each pair may win.
    attempts = [job.id for job in jobs for _ in range(2)]
    with ThreadPoolExecutor(16) as pool:
        won = list(pool.map(lambda job_id: store.transition(job_id, "dispatched", "succeeded", now=sec(2)), attempts))
    assert sum(won) == len(jobs)
    assert {job_id for job_id, w in zip(attempts, won, strict=True) if w} == {j.id for j in jobs}
    assert {store.load_job(j.id).status for j in jobs} == {"succeeded"}
    assert store.writer.groups - groups_before < len(attempts)


def test_a_job_finishes_once_and_illegal_transitions_are_refused(store: Store, key_id: str):
    job = make_job(store, key_id)
    assert store.load_job(job.id).status == "queued"
    with pytest.raises(IllegalTransition):
        store.transition(job.id, "queued", "running")
    dispatch(store, job.id, "hk1", 1, at=1)
    assert store.transition(job.id, "dispatched", "running", now=sec(2))
    assert store.transition(job.id, ["dispatched", "running"], "succeeded", now=sec(5), result_sha256="ab" * 32)
    # The callback arrives twice, or a sweeper races it: the second writer loses, nothing changes.
    assert not store.transition(job.id, ["dispatched", "running"], "succeeded", now=sec(6), result_sha256="cd" * 32)
    assert not store.transition(job.id, ["dispatched", "running"], "failed", now=sec(6), error="late")
    with pytest.raises(IllegalTransition):
        store.transition(job.id, "succeeded", "queued")
    with pytest.raises(TypeError):  # the owner and the request never change
        store.transition(job.id, "running", "failed", kind="training")

    done = store.load_job(job.id)
    assert (done.status, done.result_sha256, done.error) == ("succeeded", "ab" * 32, None)
    assert (done.miner_hotkey, done.miner_uid, done.attempts) == ("hk1", 1, 1)
    assert (done.dispatched_at, done.started_at, done.finished_at) == (sec(1), sec(2), sec(5))
    [attempt] = store.list_attempts(job.id)
    assert (attempt.outcome, attempt.miner_hotkey, attempt.finished_at) == ("succeeded", "hk1", sec(5))
    assert attempt.latency_s == 4.0


def test_times_come_back_timezone_aware_utc(store: Store, key_id: str):
    local = datetime(2030, 1, 1, 14, 0, tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))
    job = create_job(store, key_id, "training", {}, local, 10, now=T0)
    loaded = store.load_job(job.id)
    assert loaded.deadline == local and loaded.deadline.tzinfo == UTC
    assert loaded.created_at == T0
    with pytest.raises(Exception, match="naive datetime"):
        create_job(store, key_id, "training", {}, datetime(2030, 1, 1), 10, now=T0)


def test_cancel_only_own_unfinished_jobs(store: Store, key_id: str):
    other = store.create_api_key("other").key.id
    job = make_job(store, key_id)
    assert not store.cancel_job(job.id, other, now=sec(1))
    assert store.cancel_job(job.id, key_id, now=sec(1))
    assert not store.cancel_job(job.id, key_id, now=sec(2))
    assert store.load_job(job.id).status == "canceled"
    assert claim(store, 10, at=3) == []


# ---- API keys ---------------------------------------------------------------------------------


def test_keys_are_hashed_at_rest_and_revocation_is_immediate(store: Store):
    created = store.create_api_key("acme", rate_limit_per_minute=5)
    secret = created.secret
    assert secret.startswith("dsk_") and created.key.webhook_secret.startswith("whsec_")
    assert store.admit(secret, now=sec(1)).id == created.key.id

    # The plaintext secret is nowhere in the database; only its sha256 is.
    with store.engine.connect() as conn:
        dump = " ".join(
            str(row) for table in Base.metadata.sorted_tables for row in conn.execute(text(f"SELECT * FROM {table}"))
        )
    assert secret not in dump and secret.split("_", 2)[2] not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump

    wrong_secrets = [
        secret[:-1] + ("A" if secret[-1] != "A" else "B"),
        "dsk_0000000000000000_" + "x" * 43,
        "",
        "Bearer nonsense",
        None,
    ]
    for wrong in wrong_secrets:
        with pytest.raises(Unauthorized):
            store.admit(wrong, now=sec(1))

    assert store.revoke_api_key(created.key.id)
    assert not store.revoke_api_key(created.key.id)
    with pytest.raises(Unauthorized):
        store.admit(secret, now=sec(2))
    with pytest.raises(UnknownApiKey):
        store.revoke_api_key("key_doesnotexist")
    assert [k.id for k in store.list_api_keys(include_revoked=False)] == []
    assert [k.id for k in store.list_api_keys()] == [created.key.id]


def test_each_key_sees_only_its_own_requests_and_loras(store: Store):
    alice, bob = store.create_api_key("alice").key.id, store.create_api_key("bob").key.id
    a1, a2 = make_job(store, alice), make_job(store, alice)
    b1 = make_job(store, bob)
    assert store.get_job(a1.id, alice).id == a1.id
    assert store.get_job(a1.id, bob) is None
    assert {j.id for j in store.list_jobs(alice)} == {a1.id, a2.id}
    assert [j.id for j in store.list_jobs(bob)] == [b1.id]
    assert store.list_jobs(bob, status="succeeded") == []

    lora = kit.trained_lora(store, alice, "my-character", "ef" * 32, 16, trigger_word="ohwx")
    assert store.get_lora(lora.id, alice).sha256 == "ef" * 32
    assert store.get_lora(lora.id, bob) is None
    assert [x.id for x in store.list_loras(alice)] == [lora.id] and store.list_loras(bob) == []


def test_rate_limit_is_shared_by_every_process_on_the_database(store: Store, db_url: str):
    limited = store.create_api_key("limited", rate_limit_per_minute=3)
    free = store.create_api_key("other", rate_limit_per_minute=3)
    second = Store(db_url)  # another orchestrator replica
    try:
        base = T0 + timedelta(seconds=10)
        hits = [(store, 0), (second, 1), (store, 2)]
        assert [s.admit(limited.secret, now=base + timedelta(seconds=t)).id for s, t in hits] == [limited.key.id] * 3
        with pytest.raises(RateLimited) as refused:
            second.admit(limited.secret, now=base + timedelta(seconds=20))
        assert refused.value.retry_after == pytest.approx(30.0)  # the next minute
        assert store.admit(free.secret, now=base).id == free.key.id  # limits are per key
        # A new minute, a new window.
        assert store.admit(limited.secret, now=T0 + timedelta(minutes=1)).id == limited.key.id
        # A wrong secret for a real key is refused and counts nothing against that key.
        forged = free.secret[:-1] + ("A" if free.secret[-1] != "A" else "B")
        for replica in (store, second, store):
            with pytest.raises(Unauthorized):
                replica.admit(forged, now=base)
        assert [s.admit(free.secret, now=base).id for s in (second, store)] == [free.key.id] * 2  # its 2nd and 3rd
        with pytest.raises(RateLimited):
            store.admit(free.secret, now=base)
    finally:
        second.close()


def test_admitting_in_a_new_minute_drops_the_keys_older_windows(store: Store):
    """Through `admit` (PostgreSQL reads the key and counts in one statement): a key keeps one
    minute's window, not one row per minute it was ever used."""
    key = store.create_api_key("steady")
    for minute in range(3):
        assert store.admit(key.secret, now=T0 + timedelta(minutes=minute, seconds=5)).id == key.key.id
    with store.engine.connect() as conn:
        windows = conn.execute(select(RateWindow.window_start)).scalars().all()
    assert [w.replace(tzinfo=UTC) for w in windows] == [T0 + timedelta(minutes=2)]


def test_replicas_count_a_keys_requests_on_rows_of_their_own_without_waiting(store: Store):
    """Each process counts into its own row of a key's window (no replica waits for another's
    lock on PostgreSQL); the window's count is every row's, once committed."""
    key = store.create_api_key("busy", rate_limit_per_minute=100).key
    at = T0 + timedelta(seconds=5)
    with store.engine.connect() as first, store.engine.connect() as second:
        if store.dialect == "postgresql":
            with first.begin():
                assert _count_request(first, key.id, at, shard=1) == 1
                with second.begin():
                    # Waiting for the first transaction's row would fail here rather than hang.
                    second.execute(text("SET LOCAL lock_timeout = '2s'"))
                    # The first's count is not committed yet: this one sees its own alone.
                    assert _count_request(second, key.id, at, shard=2) == 1
        else:  # one writer at a time: one after the other
            with first.begin():
                assert _count_request(first, key.id, at, shard=1) == 1
            with second.begin():
                assert _count_request(second, key.id, at, shard=2) == 2
        with first.begin():
            assert _count_request(first, key.id, at, shard=1) == 3
        with second.begin():
            assert _count_request(second, key.id, at, shard=2) == 4
            # A new window starts from nothing and prunes the key's old ones, every shard's.
            assert _count_request(second, key.id, at + timedelta(minutes=1), shard=2) == 1
        windows = first.execute(text("SELECT shard, count FROM rate_windows ORDER BY shard")).all()
    assert [tuple(row) for row in windows] == [(2, 1)]


def test_a_refused_submission_is_its_callers_answer_and_the_group_written_with_it_commits(store: Store):
    client = store.create_api_key("client", rate_limit_per_minute=3)
    other = store.create_api_key("other")

    def build(key: ApiKey) -> dict:
        return job_row(key.id, "inference", {"prompt": "a cat"}, sec(600), 30, now=sec(1))

    def refuse(key: ApiKey) -> dict:
        raise InvalidRequest("steps 999 is over the profile's 50")

    async def outcome(call: Awaitable[object]) -> tuple[str, object]:
        try:
            return "returned", await call
        except Exception as exc:
            return "raised", exc

    async def main() -> list[tuple[str, object]]:
        started, gate = threading.Event(), threading.Event()
        busy = store.writer.submit(lambda: started.set() or gate.wait(5))
        started.wait(5)  # the writer is busy: the calls below queue up for one group
        calls = [
            store.call(store.submit_job, client.secret, refuse, sec(1)),
            store.call(store.submit_job, client.secret, build, sec(1)),
            store.call(store.submit_job, "dsk_nope", build, sec(1)),
            store.call(store.admit, "dsk_nope", now=sec(1)),
            store.call(store.revoke_api_key, other.key.id, now=sec(1)),
        ]
        tasks = [asyncio.create_task(outcome(call)) for call in calls]
        await asyncio.sleep(0.05)  # every task has handed its call to the writer
        gate.set()
        await busy
        return await asyncio.gather(*tasks)

    groups, calls = store.writer.groups, store.writer.calls
    refused, submitted, unknown, admit, revoked = asyncio.run(main())
    assert refused[0] == "returned" and isinstance(refused[1], InvalidRequest)
    assert submitted[0] == "returned" and isinstance(submitted[1], Job)
    assert unknown[0] == "returned" and isinstance(unknown[1], Unauthorized)
    assert admit[0] == "raised" and isinstance(admit[1], Unauthorized)
    # Nothing was rolled back and written again call by call: one transaction for the five (the
    # busy call wrote nothing, so it opened none).
    assert (store.writer.groups - groups, store.writer.calls - calls) == (1, 6)
    job = store.load_job(submitted[1].id)
    assert (job.status, job.api_key_id, job.payload) == ("queued", client.key.id, {"prompt": "a cat"})
    assert [j.id for j in store.list_jobs(client.key.id)] == [job.id]
    assert revoked == ("returned", True) and store.get_api_key(other.key.id).revoked_at is not None
    # The refused request counted against the key's limit, as the admitted one did: one is left.
    assert store.admit(client.secret, now=sec(2)).id == client.key.id
    with pytest.raises(RateLimited):
        store.admit(client.secret, now=sec(3))


# ---- dispatch and the sweeper -----------------------------------------------------------------


def test_claim_takes_oldest_first_and_caps_the_attempt_by_the_deadline(store: Store, key_id: str):
    early = create_job(store, key_id, "inference", {}, sec(100), 30, now=sec(0))
    tight = create_job(store, key_id, "inference", {}, sec(40), 30, now=sec(1))
    training = create_job(store, key_id, "training", {}, sec(1000), 300, now=sec(2))
    late = create_job(store, key_id, "inference", {}, sec(5), 30, now=sec(3))  # deadline passes first

    assert store.claim_for_dispatch(10, now=sec(20)) == []  # a dispatcher names the kinds it serves
    assert [j.id for j in store.claim_for_dispatch(10, now=sec(20), kinds=["training"])] == [training.id]
    claimed = claim(store, 10, at=20)
    assert [j.id for j in claimed] == [early.id, tight.id]  # `late` is past its deadline
    assert [j.dispatch_deadline for j in claimed] == [sec(50), sec(40)]
    assert all(j.status == "dispatched" and j.attempts == 1 for j in claimed)
    assert claim(store, 10, at=20) == []
    assert store.load_job(late.id).status == "queued"


def test_claim_takes_turns_between_keys_so_a_flood_does_not_starve_others(store: Store, key_id: str):
    other = store.create_api_key("other").key.id
    flood = [make_job(store, key_id, created_s=n) for n in range(8)]
    assert [j.id for j in claim(store, 3, at=20)] == [j.id for j in flood[:3]]  # out at miners now
    late = make_job(store, other, created_s=30)  # behind the whole flood by age
    later = make_job(store, other, created_s=31)

    # The key with the least under way goes first: `late` before the flood's older jobs.
    assert [j.id for j in claim(store, 1, at=40)] == [late.id]
    # Then turns: the flood's 4th (3 out + 1) against `later` (1 out + 1).
    assert [j.id for j in claim(store, 1, at=40)] == [later.id]
    assert [j.id for j in claim(store, 10, at=40)] == [j.id for j in flood[3:]]


def test_claim_can_assign_miners_in_the_same_transaction(store: Store, key_id: str):
    again = make_job(store, key_id, created_s=0)
    dispatch(store, again.id, "hk1", 1, at=1)
    assert store.transition(again.id, "dispatched", "queued", now=sec(2), attempt_outcome="refused")
    fresh = make_job(store, key_id, created_s=3)
    nobody = make_job(store, key_id, created_s=4)
    seen: dict[str, dict[str, int]] = {}

    def assign(job, tried):
        seen[job.id] = dict(tried)
        return None if job.id == nobody.id else ("hk2", 2)

    claimed = claim(store, 10, at=5, assign=assign)

    assert [j.id for j in claimed] == [again.id, fresh.id]
    assert seen == {again.id: {"hk1": 1}, fresh.id: {}, nobody.id: {}}
    for job_id, attempts in ((again.id, 2), (fresh.id, 1)):
        job = store.load_job(job_id)
        assert (job.status, job.attempts, job.miner_hotkey, job.miner_uid, job.dispatched_at) == (
            "dispatched",
            attempts,
            "hk2",
            2,
            sec(5),
        )
        assert [(a.attempt, a.miner_hotkey, a.outcome) for a in store.list_attempts(job_id)][-1] == (
            attempts,
            "hk2",
            None,
        )
    # Nobody could take it: left as it was, no attempt counted.
    untouched = store.load_job(nobody.id)
    assert (untouched.status, untouched.attempts, untouched.updated_at) == ("queued", 0, sec(4))
    assert store.list_attempts(nobody.id) == []


def test_sweeper_requeues_for_another_miner_while_the_deadline_allows(store: Store, key_id: str):
    roomy = make_job(store, key_id, deadline_s=600, timeout_s=30)
    dispatch(store, roomy.id, "slow-miner", 7, at=0)
    assert store.sweep(now=sec(29)).requeued == []  # still within its attempt

    swept = store.sweep(now=sec(31))
    assert (swept.requeued, swept.failed) == ([roomy.id], [])
    job = store.load_job(roomy.id)
    assert (job.status, job.attempts, job.miner_hotkey, job.miner_uid, job.dispatch_deadline) == (
        "queued",
        1,
        None,
        None,
        None,
    )
    [first] = store.list_attempts(roomy.id)
    assert (first.miner_hotkey, first.outcome, first.latency_s) == ("slow-miner", "timeout", 31.0)

    dispatch(store, roomy.id, "fast-miner", 8, at=32)
    assert store.load_job(roomy.id).attempts == 2
    assert store.transition(roomy.id, "dispatched", "succeeded", now=sec(35))
    assert [(a.attempt, a.miner_hotkey, a.outcome) for a in store.list_attempts(roomy.id)] == [
        (1, "slow-miner", "timeout"),
        (2, "fast-miner", "succeeded"),
    ]
    assert store.sweep(now=sec(1000)) == SweepResult()  # finished jobs are never touched


def test_sweeper_fails_jobs_when_the_client_deadline_leaves_no_room(store: Store, key_id: str):
    tight = make_job(store, key_id, deadline_s=33, timeout_s=30)  # 3 s left after one attempt
    dispatch(store, tight.id, "hk", 1, at=0)
    assert store.transition(tight.id, "dispatched", "running", now=sec(1))
    never_taken = make_job(store, key_id, deadline_s=20)
    capped = make_job(store, key_id, deadline_s=10_000, timeout_s=10, max_attempts=1, created_s=1)

    assert [j.id for j in claim(store, 1, at=2)] == [never_taken.id]
    assert store.transition(never_taken.id, "dispatched", "queued", now=sec(3))  # no miner free: hand back
    assert [j.id for j in claim(store, 5, at=4)] == [never_taken.id, capped.id]
    assert store.transition(never_taken.id, "dispatched", "queued", now=sec(5))

    swept = store.sweep(now=sec(31))
    assert set(swept.failed) == {tight.id, never_taken.id, capped.id} and swept.requeued == []
    for job_id in swept.failed:
        job = store.load_job(job_id)
        assert job.status == "failed" and job.finished_at == sec(31) and job.error
    assert store.list_attempts(tight.id)[0].outcome == "timeout"


def test_a_late_report_about_an_earlier_attempt_never_lands_on_the_next(store: Store, key_id: str):
    """A callback is read, checked (a LoRA check takes seconds), then written. If meanwhile the
    job was taken back and sent to another miner, the first miner's result or failure must not
    finish the second miner's attempt: the result, its score and any audit would name the wrong
    miner."""
    job = make_job(store, key_id, deadline_s=600, max_attempts=3)
    dispatch(store, job.id, "hk1", 1, at=0)
    first = store.load_job(job.id)  # what hk1's callback read
    assert store.take_back(first, "timed out", outcome="timeout", now=sec(1), min_attempt_s=5) == "queued"
    dispatch(store, job.id, "hk2", 2, at=2)
    late = Success("ab" * 32, 10, "fp-hk1", {})
    assert not store.succeed(job.id, late, now=sec(3), attempt=first.attempts)
    assert store.take_back(first, "crashed", outcome="failed", now=sec(3), min_attempt_s=5) is None
    current = store.load_job(job.id)
    assert (current.status, current.miner_hotkey, current.attempts, current.result_sha256) == (
        "dispatched", "hk2", 2, None
    )  # fmt: skip
    assert store.succeed(job.id, Success("cd" * 32, 10, "fp-hk2", {}), now=sec(4), attempt=current.attempts)
    done = store.load_job(job.id)
    assert (done.status, done.miner_hotkey, done.result_sha256) == ("succeeded", "hk2", "cd" * 32)
    assert [(a.miner_hotkey, a.outcome) for a in store.list_attempts(job.id)] == [
        ("hk1", "timeout"), ("hk2", "succeeded")
    ]  # fmt: skip


def test_a_job_taken_back_from_its_miner_is_retried_while_attempts_and_time_allow(store: Store, key_id: str):
    job = make_job(store, key_id, deadline_s=600, max_attempts=2)
    dispatch(store, job.id, "hk1", 1, at=0)
    taken = store.load_job(job.id)
    assert store.take_back(taken, "busy", outcome="refused", now=sec(1), min_attempt_s=5) == "queued"
    # A second report about the same attempt finds the job moved on.
    assert store.take_back(taken, "busy", outcome="refused", now=sec(1), min_attempt_s=5) is None
    dispatch(store, job.id, "hk2", 2, at=2)
    assert store.take_back(store.load_job(job.id), "crashed", outcome="failed", now=sec(3), min_attempt_s=5) == "failed"
    failed = store.load_job(job.id)
    assert (failed.status, failed.finished_at) == ("failed", sec(3)) and "attempt 2 of 2" in failed.error
    assert [(a.miner_hotkey, a.outcome, a.error) for a in store.list_attempts(job.id)] == [
        ("hk1", "refused", "busy"),
        ("hk2", "failed", "crashed"),
    ]

    tight = make_job(store, key_id, deadline_s=10, created_s=1)
    dispatch(store, tight.id, "hk1", 1, at=2)
    assert store.take_back(store.load_job(tight.id), "busy", outcome="refused", now=sec(7), min_attempt_s=5) == "failed"


def test_a_miner_that_did_not_take_the_job_uses_up_none_of_its_attempts(store: Store, key_id: str):
    job = make_job(store, key_id, deadline_s=600, max_attempts=1)
    for n, outcome in enumerate(["busy", "busy", "unreachable"]):
        dispatch(store, job.id, "hk1", 1, at=n)
        assert store.take_back(store.load_job(job.id), "HTTP 429", outcome=outcome, now=sec(n), min_attempt_s=5) == (
            "queued"
        )
    dispatch(store, job.id, "hk2", 2, at=5)
    # Its one attempt is the first miner that took it and failed.
    assert store.take_back(store.load_job(job.id), "crashed", outcome="failed", now=sec(6), min_attempt_s=5) == "failed"
    failed = store.load_job(job.id)
    assert failed.attempts == 4 and "attempt 1 of 1 failed (crashed)" in failed.error

    # Refused with too little time left: the deadline, not the refusals, ends it.
    late = make_job(store, key_id, deadline_s=10, created_s=7)
    dispatch(store, late.id, "hk1", 1, at=7)
    assert store.take_back(store.load_job(late.id), "HTTP 429", outcome="busy", now=sec(7), min_attempt_s=5) == "failed"
    assert store.load_job(late.id).error == "deadline passed before a miner could take the job (the last: HTTP 429)"


def test_a_request_whose_own_input_or_deadline_ended_the_attempt_fails_at_once(store: Store, key_id: str):
    job = make_job(store, key_id, deadline_s=600, max_attempts=3)
    dispatch(store, job.id, "hk1", 1, at=0)
    reason = "miner reported failed: the LoRA does not fit this profile"
    assert store.take_back(store.load_job(job.id), reason, outcome="bad_input", now=sec(1), min_attempt_s=5) == "failed"
    assert store.load_job(job.id).error == f"the request's input cannot be used: {reason}"
    assert [a.outcome for a in store.list_attempts(job.id)] == ["bad_input"]

    # 10 s to its deadline when a 60 s attempt starts: the sweeper finds the client's time up, not the miner's.
    short = make_job(store, key_id, deadline_s=11, timeout_s=60, created_s=1)
    dispatch(store, short.id, "hk1", 1, at=1)
    assert store.sweep(now=sec(11.5)).failed == [short.id]
    expired = store.load_job(short.id)
    assert expired.error.startswith("deadline passed before the job could finish")
    assert [a.outcome for a in store.list_attempts(short.id)] == ["expired"]


def test_active_counts_are_what_each_miner_holds(store: Store, key_id: str):
    jobs = [make_job(store, key_id, created_s=n) for n in range(4)]
    claim(store, 3, at=5, assign=lambda job, tried: ("hk1", 1) if job.id != jobs[1].id else ("hk2", 2))
    assert store.transition(jobs[0].id, "dispatched", "succeeded", now=sec(6))
    assert store.active_counts() == {("hk1", "inference"): 1, ("hk2", "inference"): 1}


def test_a_success_stores_the_result_and_registers_its_lora_once(store: Store, key_id: str):
    job = create_job(store, key_id, "training", {"rank": 4}, sec(600), 300, now=T0)
    dispatch(store, job.id, "hk1", 1, at=0)
    lora = {
        "id": "lora_of_job",
        "api_key_id": key_id,
        "name": "style",
        "sha256": "ef" * 32,
        "rank": 4,
        "trigger_word": "sks",
        "source_job_id": job.id,
    }
    success = Success("ef" * 32, 123, "fp", {"train_s": 2.5}, lora=lora)
    assert store.succeed(job.id, success, now=sec(4), attempt=1)
    assert not store.succeed(job.id, success, now=sec(5), attempt=1)  # the callback again: nothing changes
    done = store.load_job(job.id)
    assert (done.status, done.result_sha256, done.result_bytes, done.fingerprint) == ("succeeded", "ef" * 32, 123, "fp")
    assert (done.timings, done.finished_at) == ({"train_s": 2.5}, sec(4))
    [attempt] = store.list_attempts(job.id)
    assert (attempt.outcome, attempt.latency_s) == ("succeeded", 4.0)
    assert [(x.id, x.source_job_id, x.created_at) for x in store.list_loras(key_id)] == [
        ("lora_of_job", job.id, sec(4))
    ]


# ---- miners and audits ------------------------------------------------------------------------


def test_miners_upsert_and_list_healthy(store: Store):
    store.upsert_miner("hk-a", 1, coldkey="ck", endpoint="http://10.0.0.1:8091", stake=12.5, now=T0)
    store.upsert_miner("hk-b", 2, endpoint="http://10.0.0.2:8091", now=T0)
    assert store.list_miners(healthy_only=True) == []
    assert store.record_probe(
        "hk-a", True, capacity={"inference": {"available": True}}, fingerprints=["fp"], now=sec(1)
    )
    assert not store.record_probe("hk-unknown", True, now=sec(1))
    store.set_scores({"hk-a": 0.75})
    # A later metagraph sync moves the endpoint but keeps health and score.
    store.upsert_miner("hk-a", 1, coldkey="ck", endpoint="http://10.0.0.9:8091", stake=13.0, now=sec(2))
    [miner] = store.list_miners(healthy_only=True)
    assert (miner.hotkey, miner.endpoint, miner.stake, miner.score) == ("hk-a", "http://10.0.0.9:8091", 13.0, 0.75)
    assert (miner.fingerprints, miner.last_probe_at, miner.created_at) == (["fp"], sec(1), T0)
    assert [m.hotkey for m in store.list_miners()] == ["hk-a", "hk-b"]


def test_audits_are_recorded_with_evidence(store: Store, key_id: str):
    job, later = make_job(store, key_id), make_job(store, key_id)
    store.add_audit(job.id, "hk-a", "fail", {"ssim": 0.41, "expected": "ab" * 32}, now=sec(1))
    store.add_audit(later.id, "hk-a", "pass", now=sec(2))
    assert [(a.verdict, a.evidence) for a in store.list_audits(miner_hotkey="hk-a", since=sec(2))] == [("pass", {})]
    assert store.list_audits(job_id=job.id)[0].evidence["ssim"] == 0.41
    # One verdict per job: a second one (a replica that lost the audit lead meanwhile) is not stored.
    assert store.add_audit(job.id, "hk-a", "pass", now=sec(3)) is None
    assert [a.verdict for a in store.list_audits(job_id=job.id)] == ["fail"]
    with pytest.raises(ValueError):
        store.add_audit(job.id, "hk-a", "maybe")


def test_the_dashboard_and_restart_queries(store: Store, key_id: str):
    other_key = store.create_api_key("another client").key.id
    old = make_job(store, key_id, created_s=0)
    mine = make_job(store, key_id, created_s=10)
    theirs = make_job(store, other_key, created_s=20)
    # Every key's jobs since a time, newest first (the dashboard's view, not a client's).
    assert [j.id for j in store.list_recent_jobs(since=sec(5))] == [theirs.id, mine.id]
    assert [j.id for j in store.list_recent_jobs(since=sec(0), limit=1)] == [theirs.id]

    audit = store.add_audit(old.id, "hk-a", "fail", {"reference_blob": "ab" * 32}, now=sec(30))
    assert store.get_audit(audit.id).evidence == {"reference_blob": "ab" * 32}
    assert store.get_audit(audit.id + 1000) is None
    store.add_audit(theirs.id, "hk-b", "pass", now=sec(31))
    assert [a.job_id for a in store.list_audits(verdict="fail")] == [old.id]
    assert set(store.load_jobs([old.id, theirs.id, "req_missing"])) == {old.id, theirs.id}
    assert store.load_jobs([old.id, theirs.id], chunk=1)[theirs.id].api_key_id == other_key

    # Picked for an audit, not judged yet: what a restarted orchestrator must still audit.
    for job in (mine, old):
        store.flag_for_audit(job.id)
    assert store.flagged_without_verdict() == [mine.id]  # `old` has its verdict already


def test_a_new_process_reads_rows_before_any_other_database_work(tmp_path):
    """What `up` does first on a kept data dir: read its API key. Rows are built without the
    models' constructors, so nothing else may be needed first for their attributes to read."""
    url = f"sqlite:///{tmp_path / 'o.sqlite'}"
    store = Store.open(url)
    key = store.create_api_key("kept").key.id
    store.close()
    program = (
        "import sys; from dippy_studio.orchestrator.store import Store; "
        "key = Store(sys.argv[1]).get_api_key(sys.argv[2]); print(key.name, key.revoked_at)"
    )
    done = subprocess.run([sys.executable, "-c", program, url, key], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "kept None"), done.stderr


def test_a_claim_reads_a_few_jobs_per_key_however_long_the_queue_and_stale_the_statistics(pg_store: Store):
    """A burst of submissions leaves PostgreSQL's statistics of `jobs` far behind the queue. A
    window over the whole queue, planned for the few rows the statistics expect, can run again
    for every queued job, on the writer thread that every submit and callback of the replica
    waits for. The turns must come from each key's first few queued jobs, whatever the
    statistics say. (PostgreSQL: SQLite keeps no statistics unless asked to; its claim has a
    test of its own.)"""
    store = pg_store
    keys = [store.create_api_key(f"client {n}").key.id for n in range(3)]
    queued = 1500
    rows = [
        job_row(keys[n % 3], "inference", {"prompt": "a cat"}, sec(600), 30, now=sec(n / 1000)) for n in range(queued)
    ]
    store.insert_jobs(rows)  # no ANALYZE since: the planner still believes `jobs` nearly empty
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        claimed = claim(store, 32, 1)
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    # Fair turns: the first 32 alternate between the keys, oldest first within each.
    assert sorted(Counter(job.api_key_id for job in claimed).values()) == [10, 11, 11]
    assert [job.created_at for job in claimed] == sorted(job.created_at for job in claimed)
    [(candidates, parameters)] = [(sql, params) for sql, params in sent if "LATERAL" in sql]
    [(lock, lock_parameters)] = [(sql, params) for sql, params in sent if "SKIP LOCKED" in sql]

    def nodes(plan: dict) -> Iterator[dict]:
        yield plan
        for child in plan.get("Plans", ()):
            yield from nodes(child)

    def jobs_read(statement: str, parameters: object, seqscan: bool = True) -> tuple[int, object]:
        # Rolled back: EXPLAIN ANALYZE of the lock statement takes its row locks.
        with store.engine.connect() as conn, conn.begin() as transaction:
            conn.exec_driver_sql(f"SET LOCAL enable_seqscan = {'on' if seqscan else 'off'}")
            [[explained]] = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", parameters).all()
            transaction.rollback()
        scans = [node for node in nodes(explained[0]["Plan"]) if node.get("Relation Name") == "jobs"]
        assert scans, explained
        read = [(node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"] for node in scans]
        return sum(read), explained

    # Per key at most the candidates (4 x 32) and one more, and the jobs under way (the 32 just
    # claimed, counted for the turns): not the 1,500 queued.
    read, explained = jobs_read(candidates, parameters)
    assert read <= len(keys) * (4 * 32 + 1) + len(claimed), explained
    # The lock then reads the candidates it was given, by primary key, not the queue. (Without
    # sequential scans: a table this small is cheapest read whole, and PostgreSQL rightly does;
    # what must not be on offer is a path through the queue, whose length the statistics miss.)
    read, explained = jobs_read(lock, lock_parameters, seqscan=False)
    assert read <= len(lock_parameters["b_ids"]), explained


def test_a_sqlite_claim_costs_the_same_however_long_the_queue(tmp_path):
    """SQLite's claim takes each key's first few queued jobs through the key's index, as
    PostgreSQL's does: a window over the whole queue would make every claim, on the writer that
    every submit and callback waits for, grow with the backlog. Measured in SQLite's virtual
    machine steps (its progress handler), which do not depend on the machine's speed."""
    store = Store.open(f"sqlite:///{tmp_path / 'queue.db'}")
    keys = [store.create_api_key(f"client {n}").key.id for n in range(3)]
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append((statement, parameters))

    inserted = 0

    def steps_of_a_claim_read(queued: int) -> int:
        nonlocal inserted
        rows = [
            job_row(keys[n % 3], "inference", {"prompt": "a cat"}, sec(600), 30, now=sec(n / 1000))
            for n in range(inserted, queued)
        ]
        store.insert_jobs(rows)
        inserted = queued
        sent.clear()
        event.listen(store.engine, "before_cursor_execute", capture)
        try:  # a claim that gives no job a miner: it reads the queue and leaves it as it was
            store.claim_for_dispatch(32, now=sec(1), kinds=["inference"], assign=lambda job, tried: None)
        finally:
            event.remove(store.engine, "before_cursor_execute", capture)
        [(statement, parameters)] = [(sql, params) for sql, params in sent if "row_number()" in sql]
        with store.engine.connect() as conn:
            raw = conn.connection.driver_connection
            counted = [0]

            def count() -> int:
                counted[0] += 1
                return 0

            raw.set_progress_handler(count, 100)
            try:
                rows_read = len(raw.execute(statement, parameters).fetchall())
            finally:
                raw.set_progress_handler(None, 100)
        assert rows_read == 32
        return counted[0]

    small, large = steps_of_a_claim_read(200), steps_of_a_claim_read(4000)
    # The turns still need the jobs under way and the candidates (4 x 32 per key): not 20x the work.
    assert large < 2 * small, (small, large)
    store.close()


def test_a_candidate_another_replica_took_after_the_pick_is_not_claimed_again(pg_store: Store):
    """Between reading its candidates and locking them, a replica can lose some to another
    replica that claims and commits in that moment. Those come back locked but no longer queued:
    they must be left out, not sent to a second miner with a second attempt, and the batch
    filled from the candidates still queued: a claim that comes back short while jobs wait
    leaves the replica idle until its next round. (PostgreSQL only: SQLite claims in one
    statement under its write lock.)"""
    store = pg_store
    key = store.create_api_key("client").key.id
    jobs = [make_job(store, key, created_s=n / 100) for n in range(6)]
    other = Store(store.engine.url)
    taken_by_other: list[Job] = []

    def other_replica_claims_first(conn, cursor, statement, parameters, context, executemany) -> None:
        if "SKIP LOCKED" in statement and not taken_by_other:
            taken_by_other.extend(claim(other, 2, 1, assign=lambda job, tried: ("hk-b", 2)))

    event.listen(store.engine, "before_cursor_execute", other_replica_claims_first)
    try:
        mine = claim(store, 3, 1, assign=lambda job, tried: ("hk-a", 1))
    finally:
        event.remove(store.engine, "before_cursor_execute", other_replica_claims_first)
        other.close()
    assert [job.id for job in taken_by_other] == [job.id for job in jobs[:2]]
    assert [job.id for job in mine] == [job.id for job in jobs[2:5]]
    for job in jobs[:5]:
        [attempt] = store.list_attempts(job.id)
        assert attempt.miner_hotkey == ("hk-b" if job in jobs[:2] else "hk-a")
    assert store.load_job(jobs[5].id).status == "queued" and store.list_attempts(jobs[5].id) == []
    assert {job.miner_hotkey for job in store.load_jobs([job.id for job in jobs[:2]]).values()} == {"hk-b"}


def test_an_audit_is_owed_from_its_pick_to_its_verdict_and_found_through_its_index(store: Store, key_id: str):
    picked, judged, late = (make_job(store, key_id, created_s=n) for n in range(3))
    store.flag_for_audit(picked.id)
    store.flag_for_audit(judged.id)
    assert store.flagged_without_verdict() == [picked.id, judged.id]
    store.add_audit(judged.id, "hk-a", "pass", now=sec(5))
    assert store.flagged_without_verdict() == [picked.id]
    # A verdict that stood before the pick reached the database: nothing is owed for it.
    store.add_audit(late.id, "hk-a", "fail", now=sec(6))
    store.flag_for_audit(late.id)
    assert store.flagged_without_verdict() == [picked.id]
    assert {job.id: job.audit for job in store.load_jobs([picked.id, judged.id, late.id]).values()} == {
        picked.id: True, judged.id: True, late.id: True
    }  # fmt: skip

    # The audits leader runs this at every turn: it must read the partial index of owed jobs,
    # not scan every job the subnet ever ran. Planned as the store sends it.
    sent: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        store.flagged_without_verdict()
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    [(statement, parameters)] = [(sql, params) for sql, params in sent if "FROM jobs" in sql]
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " ".join(str(row[-1]) for row in rows)
            # The partial index, in its order (no sort); a scan of the table would name no index.
            assert "USING INDEX ix_jobs_audit_owed" in plan and "TEMP B-TREE" not in plan, plan
        else:
            # Three rows make a sequential scan cheapest; the point is that the index can serve it.
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
            assert "ix_jobs_audit_owed" in plan, plan


def test_a_postgres_connection_dropped_while_idle_is_replaced_before_use(pg_session_url: str, monkeypatch):
    # What pool_pre_ping did on every checkout, done only for connections that sat idle.
    import psycopg

    from dippy_studio.orchestrator import db

    monkeypatch.setattr(db, "PG_IDLE_PING_S", 0.05)
    store = Store(pg_session_url)
    try:
        key = store.create_api_key("idle")
        assert store.get_api_key(key.key.id) is not None
        admin = make_url(pg_session_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(admin, autocommit=True) as conn:
            # The server (or a proxy) drops every connection the pool holds.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        time.sleep(0.1)
        assert store.get_api_key(key.key.id) is not None
        assert store.admit(key.secret).id == key.key.id
    finally:
        store.close()
