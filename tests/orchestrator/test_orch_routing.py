"""Routing: who may get a job, who is preferred, and how stake and score weigh the draw."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dippy_studio.orchestrator.routing import Candidate, Lane, choose_miner, eligible, weights

LANES = {"inference": Lane(True, 0, 8), "training": Lane(True, 0, 2)}


def miner(uid: int, *, stake: float = 1.0, score: float = 0.0, **overrides) -> Candidate:
    values = dict(
        hotkey=f"hk{uid}", uid=uid, endpoint=f"http://m{uid}", stake=stake, score=score, profile="tiny", lanes=LANES
    )
    return Candidate(**{**values, **overrides})


def draws(candidates, n: int = 4000, seed: int = 1, **kwargs) -> Counter:
    rng = random.Random(seed)
    return Counter(choose_miner(candidates, "inference", "tiny", rng=rng, **kwargs).uid for _ in range(n))


def test_only_healthy_miners_of_the_profile_with_a_free_lane_are_eligible():
    candidates = [
        miner(0),
        miner(1, healthy=False),
        miner(2, profile="flux-dev"),
        miner(3, lanes={"inference": Lane(False), "training": Lane(True)}),
        miner(4, lanes={"inference": Lane(True, queue_depth=8, queue_limit=8)}),  # queue full
        miner(5, endpoint=""),
        miner(6, lanes={"training": Lane(True)}),  # no inference lane at all
    ]
    assert [c.uid for c in eligible(candidates, "inference", "tiny")] == [0]
    assert [c.uid for c in eligible(candidates, "training", "tiny")] == [0, 3, 6]
    assert eligible(candidates, "inference", "tiny", exclude={"hk0"}) == []
    assert choose_miner(candidates[1:], "inference", "tiny") is None


@pytest.mark.parametrize(
    ("lane", "slots"),
    [
        (Lane(True, queue_limit=8, workers=2), 10),  # its workers and its queue
        (Lane(True, queue_limit=8, workers=2, seconds_per_job=20.0), 6),  # 3 each within 60 s
        (Lane(True, queue_limit=2, workers=1, seconds_per_job=1.0), 3),  # fast, but its queue is short
        (Lane(True, queue_limit=8, workers=1, seconds_per_job=90.0), 1),  # slower than the timeout: one at a time
        (Lane(True), None),  # nothing advertised: no bound
    ],
)
def test_a_miner_gets_no_more_jobs_than_its_slots(lane: Lane, slots: int | None):
    assert lane.slots(60.0) == slots
    candidates = [miner(0, lanes={"inference": lane}), miner(1)]
    full = {"hk0": slots or 10**6}
    assert [c.uid for c in eligible(candidates, "inference", "tiny", held=full, attempt_timeout_s=60.0)] == (
        [1] if slots else [0, 1]
    )
    one_free = {"hk0": (slots or 10**6) - 1}
    assert choose_miner(candidates[:1], "inference", "tiny", held=one_free, attempt_timeout_s=60.0) == candidates[0]


def test_miners_that_tried_the_job_come_last():
    candidates = [miner(0), miner(1), miner(2)]
    assert set(draws(candidates, 300, tried={"hk0": 1, "hk1": 1})) == {2}
    # Everyone tried: the least-tried miners get it again rather than the job starving.
    assert set(draws(candidates, 300, tried={"hk0": 2, "hk1": 1, "hk2": 1})) == {1, 2}


def test_stake_and_score_weigh_the_draw():
    # Weight = (0.1 + stake share of max) * (1 + score share of max) / (1 + queue depth).
    candidates = [miner(0, stake=100, score=1.0), miner(1, stake=100, score=0.0), miner(2, stake=0, score=0.0)]
    assert weights(candidates, "inference") == pytest.approx([1.1 * 2.0, 1.1 * 1.0, 0.1 * 1.0])
    counts = draws(candidates, 6000)
    total = 1.1 * 2.0 + 1.1 * 1.0 + 0.1 * 1.0
    assert counts[0] / 6000 == pytest.approx(1.1 * 2.0 / total, abs=0.03)
    assert counts[1] / 6000 == pytest.approx(1.1 * 1.0 / total, abs=0.03)
    # The best-scored miner gets at most twice the share of an equal-stake one with no score yet.
    assert counts[0] < 2.3 * counts[1]
    # A newcomer with no stake and no score still gets some work, or it could never earn a score.
    assert counts[2] > 0


def test_busy_miners_get_less():
    busy = {"inference": Lane(True, queue_depth=3, queue_limit=8)}
    assert weights([miner(0), miner(1, lanes=busy)], "inference") == pytest.approx([1.1, 1.1 / 4])


def test_the_same_seed_gives_the_same_choices_whatever_the_input_order():
    candidates = [miner(uid, stake=uid + 1, score=uid % 3) for uid in range(6)]
    first = [choose_miner(candidates, "inference", "tiny", rng=random.Random(s)).uid for s in range(50)]
    shuffled = list(reversed(candidates))
    again = [choose_miner(shuffled, "inference", "tiny", rng=random.Random(s)).uid for s in range(50)]
    assert first == again
