"""Which miner gets a job: a pure choice among candidates, weighted by stake and recent score.

Only miners that are healthy, serve the job's model (their capacity's `profile`), have a live
lane for the job's kind (listing its image task in `Capacity.tasks`) and room in its queue are
eligible. Room counts what the miner already holds of ours (jobs dispatched or running there,
`held`) against its slots (`Lane.slots`): its workers plus its queue, and no more than its
workers finish within the attempt timeout at the pace it advertises, so a job we send does not
wait out its attempt in the miner's queue. Among them, miners that have not tried this job yet
come first (a job that failed or timed out somewhere goes elsewhere); when every eligible miner
has tried it, the ones that tried it least are used again rather than letting the job starve.

The weight of a miner is

    (STAKE_FLOOR + stake / max_stake) * (SCORE_FLOOR + score / max_score) / (1 + queue_depth)

The floors keep a miner with no stake or no score yet in the draw: scores come only from
work, so a newcomer that got none could never earn one. The score floor is as large as the
top score's share on purpose: a score is a sum over the window, so it grows with the work
routing gave; with a small floor that feedback starves whoever missed the first few jobs (a
local demo saw an honest miner get none of 21). At 1.0 the best miner gets at most twice the
share of one that has no score yet. Dividing by the queue depth spreads load towards idle
miners. The random draw is injectable, so tests and audits can replay it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STAKE_FLOOR = 0.1
SCORE_FLOOR = 1.0


@dataclass(frozen=True)
class Lane:
    available: bool
    queue_depth: int = 0
    queue_limit: int = 0
    workers: int = 1
    # The miner's recent seconds per job on one worker (None: not measured yet).
    seconds_per_job: float | None = None

    @property
    def has_room(self) -> bool:
        return self.available and (self.queue_limit <= 0 or self.queue_depth < self.queue_limit)

    def slots(self, attempt_timeout_s: float) -> int | None:
        """How many jobs the miner can hold at once with each finishing within `attempt_timeout_s`:
        its workers plus its queue limit, and at its advertised pace no more than its workers get
        through in that time (at least one each). None when it advertises no bound at all."""
        bounds = []
        if self.queue_limit > 0:
            bounds.append(max(self.workers, 0) + self.queue_limit)
        if self.seconds_per_job is not None and self.seconds_per_job > 0 and self.workers > 0:
            bounds.append(max(1, math.floor(attempt_timeout_s / self.seconds_per_job)) * self.workers)
        return min(bounds) if bounds else None


@dataclass(frozen=True)
class Candidate:
    """A miner as routing sees it: who, where, how trusted, and what it serves right now."""

    hotkey: str
    uid: int
    endpoint: str
    stake: float = 0.0
    score: float = 0.0
    healthy: bool = True
    profile: str | None = None
    lanes: Mapping[str, Lane] = field(default_factory=dict)
    # The image tasks its inference lane serves; a miner that does not say serves text-to-image only.
    tasks: frozenset[str] = frozenset({"generate"})

    @classmethod
    def from_capacity(
        cls, hotkey: str, uid: int, endpoint: str, stake: float, score: float, healthy: bool, capacity: dict[str, Any]
    ) -> Candidate:
        """From the `Capacity` JSON a miner's probe returned (`protocol.schemas.Capacity`)."""
        lanes = {}
        for kind in ("inference", "training"):
            lane = capacity.get(kind) or {}
            pace = lane.get("seconds_per_job")
            lanes[kind] = Lane(
                available=bool(lane.get("available")),
                queue_depth=int(lane.get("queue_depth") or 0),
                queue_limit=int(lane.get("queue_limit") or 0),
                workers=int(lane.get("workers_alive", lane.get("workers", 1)) or 0),
                seconds_per_job=float(pace) if isinstance(pace, int | float) and pace > 0 else None,
            )
        tasks = capacity.get("tasks")
        served = (
            frozenset(t for t in tasks if isinstance(t, str)) if isinstance(tasks, list) else frozenset({"generate"})
        )
        return cls(hotkey, uid, endpoint, stake, score, healthy, capacity.get("profile"), lanes, served)


def eligible(
    candidates: Iterable[Candidate],
    kind: str,
    profile: str,
    exclude: Iterable[str] = (),
    *,
    held: Mapping[str, int] | None = None,
    attempt_timeout_s: float | None = None,
    task: str | None = None,
) -> list[Candidate]:
    """Candidates that could take a job of this kind (lane) and model (`profile`) now, minus `exclude`
    (hotkeys). With `task`, only miners that list it. With `held` (jobs of this lane each hotkey
    holds of ours) and `attempt_timeout_s`, a miner whose `Lane.slots` are all taken is left out too."""
    skip = set(exclude)
    result = []
    for candidate in candidates:
        lane = candidate.lanes.get(kind)
        if candidate.hotkey in skip or not candidate.healthy or candidate.profile != profile:
            continue
        if lane is None or not lane.has_room or not candidate.endpoint:
            continue
        if task is not None and task not in candidate.tasks:
            continue
        if held is not None and attempt_timeout_s is not None:
            slots = lane.slots(attempt_timeout_s)
            if slots is not None and held.get(candidate.hotkey, 0) >= slots:
                continue
        result.append(candidate)
    return result


def weights(candidates: Sequence[Candidate], kind: str) -> list[float]:
    max_stake = max((max(c.stake, 0.0) for c in candidates), default=0.0)
    max_score = max((max(c.score, 0.0) for c in candidates), default=0.0)
    result = []
    for c in candidates:
        stake = max(c.stake, 0.0) / max_stake if max_stake > 0 else 0.0
        score = max(c.score, 0.0) / max_score if max_score > 0 else 0.0
        lane = c.lanes.get(kind)
        depth = lane.queue_depth if lane is not None else 0
        result.append((STAKE_FLOOR + stake) * (SCORE_FLOOR + score) / (1 + max(depth, 0)))
    return result


def choose_miner(
    candidates: Iterable[Candidate],
    kind: str,
    profile: str,
    *,
    tried: Mapping[str, int] | None = None,
    exclude: Iterable[str] = (),
    held: Mapping[str, int] | None = None,
    attempt_timeout_s: float | None = None,
    rng: random.Random | None = None,
    task: str | None = None,
) -> Candidate | None:
    """Pick a miner for one job, or None when no miner can take it now.

    `tried` counts earlier attempts of this job per hotkey; `exclude` removes miners outright
    (cooling down after a refusal); `held` and `attempt_timeout_s` leave out miners without a
    free slot, and `task` those that do not list it (`eligible`).
    """
    pool = eligible(candidates, kind, profile, exclude, held=held, attempt_timeout_s=attempt_timeout_s, task=task)
    if not pool:
        return None
    tried = tried or {}
    fewest = min(tried.get(c.hotkey, 0) for c in pool)
    pool = [c for c in pool if tried.get(c.hotkey, 0) == fewest]
    # Sorted so that the same candidates and the same random state give the same choice.
    pool.sort(key=lambda c: (c.uid, c.hotkey))
    return (rng or random).choices(pool, weights=weights(pool, kind), k=1)[0]
