"""The scoring formula of ARCHITECTURE.md section 4, pinned on cases computed by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dippy_studio.orchestrator.scoring import (
    AttemptRecord,
    attempt_score,
    counts,
    latency_score,
    measured_quality,
    penalties_from_failures,
    score_window,
    spread_measured_quality,
    training_quality,
)

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
END = START + timedelta(hours=1)
MID = START + timedelta(minutes=30)
# Weights are an input of the formula: round ones here (inference 0.3, training 0.7) keep the
# arithmetic below readable; what the settings give is pinned in test_orch_edit.py.
WEIGHTS = {"inference": 0.3, "training": 0.7}


def attempt(hotkey: str = "A", kind: str = "inference", latency: float | None = 2.0, timeout: float = 10.0, **kw):
    fields = dict(
        hotkey=hotkey,
        kind=kind,
        finished_at=MID,
        accepted=True,
        completed=True,
        valid=True,
        latency_s=latency,
        timeout_s=timeout,
    )
    return AttemptRecord(**{**fields, **kw})


def window(attempts, start=START, end=END, penalties=None):
    return score_window(attempts, start, end, penalties, weights=WEIGHTS)


def test_latency_score_is_linear_and_cut_off_at_90_percent():
    assert latency_score(0.0, 10.0) == 1.0
    assert latency_score(2.0, 10.0) == pytest.approx(0.8)  # 1 - 2/10
    assert latency_score(9.0, 10.0) == pytest.approx(0.1)  # exactly 90%: still 1 - 0.9
    assert latency_score(9.01, 10.0) == 0.0  # past 90%
    assert latency_score(12.0, 10.0) == 0.0


def test_hand_computed_window():
    attempts = [
        # A: inference, 2 s of 10 s: 0.3 * (1 - 2/10) * 1.0 = 0.3 * 0.8 = 0.24
        attempt("A", "inference", 2.0, 10.0),
        # A: training, 30 s of 100 s, quality 0.5: 0.7 * (1 - 0.3) * 0.5 = 0.7 * 0.7 * 0.5 = 0.245
        attempt("A", "training", 30.0, 100.0, quality=0.5),
        # B: inference, 5 s of 20 s: 0.3 * 0.75 = 0.225
        attempt("B", "inference", 5.0, 20.0),
        # B: inference at exactly 90%: 0.3 * 0.1 = 0.03
        attempt("B", "inference", 9.0, 10.0),
        # B: training at 95% of its timeout: 0
        attempt("B", "training", 95.0, 100.0),
        # C: training, 10 s of 100 s, quality 1: 0.7 * 0.9 = 0.63, but it failed its audit: 0
        attempt("C", "training", 10.0, 100.0, audited=True, audit_passed=False),
        # C: inference 1 s of 10 s, audited and passed, after the failed one: 0.3 * 0.9 = 0.27
        attempt("C", "inference", 1.0, 10.0, audited=True, audit_passed=True, finished_at=MID + timedelta(minutes=1)),
    ]
    scores = window(attempts)
    assert scores == {
        "A": pytest.approx(0.485),  # 0.24 + 0.245
        "B": pytest.approx(0.255),  # 0.225 + 0.03 + 0
        "C": pytest.approx(0.27),  # 0 + 0.27
    }


@pytest.mark.parametrize(
    "change",
    [
        {"accepted": False},
        {"completed": False},
        {"valid": False},
        {"latency_s": None},
        {"latency_s": 11.0},  # after the timeout
        {"audited": True, "audit_passed": False},
    ],
)
def test_partial_or_caught_work_counts_zero(change):
    record = attempt(**change)
    assert not counts(record)
    assert attempt_score(record, WEIGHTS) == 0.0


def test_a_caught_cheat_voids_the_earlier_work_in_the_window():
    caught_at = MID
    attempts = [
        attempt("A", finished_at=caught_at - timedelta(minutes=5)),  # before the caught job: void
        attempt("A", finished_at=caught_at, audited=True, audit_passed=False),  # caught: 0
        attempt("A", finished_at=caught_at + timedelta(minutes=5)),  # after: 0.3 * 0.8 = 0.24
        attempt("B", finished_at=caught_at - timedelta(minutes=5)),  # another miner: 0.24
    ]
    assert window(attempts) == {"A": pytest.approx(0.24), "B": pytest.approx(0.24)}


def test_pending_or_inconclusive_audits_do_not_cost_the_miner():
    # 0.3 * (1 - 2/10) = 0.24, as if it had not been audited
    assert attempt_score(attempt(audited=True, audit_passed=None), WEIGHTS) == pytest.approx(0.24)


def test_window_bounds_are_start_inclusive_end_exclusive():
    attempts = [
        attempt(finished_at=START),  # in: 0.24
        attempt(finished_at=END - timedelta(microseconds=1)),  # in: 0.24
        attempt(finished_at=END),  # out
        attempt(finished_at=START - timedelta(seconds=1)),  # out
    ]
    assert window(attempts) == {"A": pytest.approx(0.48)}  # 2 * 0.24
    assert window(attempts[2:3]) == {}
    with pytest.raises(ValueError, match="empty"):
        window(attempts, END, START)


def test_a_miner_in_a_penalty_cooldown_scores_zero():
    attempts = [attempt("A"), attempt("B")]
    penalties = {
        "A": END + timedelta(hours=5),  # still running at the end of the window: 0
        "B": START + timedelta(minutes=10),  # over before the window ends: counts
        "C": None,  # no penalty, no jobs: listed at 0
    }
    assert window(attempts, penalties=penalties) == {"A": 0.0, "B": pytest.approx(0.24), "C": 0.0}


def test_penalties_from_audit_failures():
    failed = END - timedelta(hours=1)
    penalties = penalties_from_failures({"A": [failed], "B": [END - timedelta(days=2)], "C": []}, END)
    assert penalties == {"A": failed + timedelta(hours=6), "B": None, "C": None}
    assert window([attempt("A"), attempt("B")], penalties=penalties) == {
        "A": 0.0,
        "B": pytest.approx(0.24),
        "C": 0.0,
    }


def test_training_quality_from_held_out_improvement():
    assert training_quality(0.25) == pytest.approx(0.5)  # 0.25 / 0.5
    assert training_quality(0.5) == 1.0
    assert training_quality(0.9) == 1.0  # capped
    assert training_quality(-0.2) == 0.0  # worse than the base model
    assert training_quality(float("nan")) == 0.0
    assert training_quality(0.1, full_credit=0.2) == pytest.approx(0.5)
    # A training job at 20 s of 100 s with 30% improvement: 0.7 * 0.8 * (0.3 / 0.5) = 0.336
    record = attempt(kind="training", latency=20.0, timeout=100.0, quality=training_quality(0.3))
    assert attempt_score(record, WEIGHTS) == pytest.approx(0.336)


def test_measured_quality_is_the_measured_improvement_of_training_audits_only():
    def training(improvement=None, verdict="pass"):
        evaluation = {} if improvement is None else {"evaluation": {"improvement": improvement}}
        return {"kind": "training", "verdict": {"label": verdict}, **evaluation}

    assert measured_quality(training(0.25)) == pytest.approx(0.5)  # training_quality(0.25)
    assert measured_quality(training(0.7)) == 1.0
    assert measured_quality(training(0.0, verdict="fail")) == 0.0  # counts zero anyway, as a failed audit
    assert measured_quality(training(0.1), full_credit=0.2) == pytest.approx(0.5)
    # Nothing measured (no held-out images, or the LoRA failed before evaluation): no evidence of
    # poor work, so the job is scored as unmeasured (its miner's mean, or 1.0).
    assert measured_quality(training(None, verdict="inconclusive")) is None
    assert measured_quality({"kind": "inference", "verdict": {"label": "pass"}}) is None
    assert measured_quality(None) is None and measured_quality({}) is None
    assert measured_quality(training(True)) is None  # not a number


def test_unaudited_training_jobs_get_their_miners_measured_quality():
    # A: two training jobs audited at quality 0.4 and 0.8, one not audited -> it gets their mean 0.6.
    # B: no measurement at all -> 1.0. Inference never takes a training quality.
    # Each training job: 0.7 * (1 - 10/100) = 0.63 before quality; inference: 0.3 * (1 - 2/10) = 0.24.
    measured = dict(kind="training", latency=10.0, timeout=100.0, quality_measured=True)
    records = [
        attempt("A", quality=0.4, **measured),
        attempt("A", quality=0.8, **measured),
        attempt("A", kind="training", latency=10.0, timeout=100.0),
        attempt("A"),
        attempt("B", kind="training", latency=10.0, timeout=100.0),
    ]
    scores = window(records)
    assert scores["A"] == pytest.approx(0.63 * (0.4 + 0.8 + 0.6) + 0.24)
    assert scores["B"] == pytest.approx(0.63)


def test_a_measured_quality_is_spread_only_over_its_own_miner_and_kind():
    measured = dict(latency=10.0, timeout=100.0, quality_measured=True)
    records = [
        attempt("A", kind="training", quality=0.5, **measured),
        attempt("A", kind="upscale", quality=0.2, **measured),  # a kind of its own: its own mean
        attempt("A", kind="training", latency=10.0, timeout=100.0),
        attempt("A", kind="upscale", latency=10.0, timeout=100.0),
        attempt("A"),  # inference, never measured: 1.0
        attempt("B", kind="training", latency=10.0, timeout=100.0),  # another miner: 1.0
    ]
    assert [r.quality for r in spread_measured_quality(records)] == [0.5, 0.2, 0.5, 0.2, 1.0, 1.0]


def test_records_are_checked():
    with pytest.raises(ValueError, match="kind"):
        attempt_score(attempt(kind="upscale"), WEIGHTS)  # no such kind is registered
    with pytest.raises(ValueError, match="kind"):
        window([attempt(kind="upscale")])
    with pytest.raises(ValueError, match="timeout"):
        attempt(timeout=0.0)
    with pytest.raises(ValueError, match="latency"):
        attempt(latency=-1.0)
    with pytest.raises(ValueError, match="quality"):
        attempt(quality=1.5)
