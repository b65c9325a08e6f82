"""Per-miner scores over a window of finished job attempts (ARCHITECTURE.md section 4).

Pure: plain records in, `{hotkey: score}` out, no clock, no database. The orchestrator builds
one `AttemptRecord` per dispatch of a job to a miner and one penalty end time per miner
(`penalties_from_failures`), and calls `score_window`.

The formula, all of it:

- An attempt counts only if the miner accepted it, completed it before its timeout with a
  valid result, and, when it was audited, passed the audit. Anything less counts zero.
- Its latency score is `max(0, 1 - latency / timeout)`, and 0 once latency exceeds 90% of
  the timeout: a result that arrives just in time is worth nothing, so miners gain nothing
  by accepting work they cannot finish comfortably.
- It is worth `weight(kind) * latency_score * quality`, with weights from settings
  (`kind_weights`: training 0.7; inference 0.3, of which text-to-image gets 0.2 and each
  editing kind 0.8), and a quality factor in [0, 1]: inference 1.0; training from the LoRA's
  held-out loss improvement as its audit measured it (`training_quality`, `measured_quality`).
  A training job whose quality was not measured gets its miner's mean measured training
  quality in the window (`spread_measured_quality`), or 1.0 while there is none.
- A miner's score is the sum over its counted attempts that finished in [start, end), and 0
  while a failed-audit penalty is running at `end`.
- A failed audit also voids the miner's earlier work in the window: attempts that finished
  no later than its latest caught attempt count zero. Without this, a window longer than
  the cooldown would pay a caught cheater, once the cooldown ends, for the unaudited jobs
  it delivered alongside the caught one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dippy_studio.orchestrator.audit import DEFAULT_PENALTY, PenaltyPolicy, penalty_until
from dippy_studio.orchestrator.states import CLIENTS_DOING, NOT_TAKEN

if TYPE_CHECKING:
    from datetime import timedelta

    from dippy_studio.orchestrator.models import Job, JobAttempt
    from dippy_studio.orchestrator.store import Store
# Past this share of its timeout a result scores nothing.
LATENCY_CUTOFF = 0.9
# Attempt outcomes (`states`) that are not the miner's work: they count as never accepted.
NOT_THE_MINERS = frozenset({"refused"}) | NOT_TAKEN | CLIENTS_DOING
# The held-out loss improvement that earns a training job full quality: set below what an honest
# LoRA trained as the tiny profile intends achieves, and above what a skimped one does
# (bench/measure_training_audit.py, results in bench/README.md). A real Flux profile needs its
# own measurement.
FULL_CREDIT_IMPROVEMENT = 0.5


@dataclass(frozen=True)
class KindWeights:
    """What one job is worth before latency and quality, per group of job kinds."""

    training: float
    generate: float  # text-to-image (`inference`)
    edit: float  # each editing kind: edit, img2img, inpaint


def kind_weights(training_weight: float, inference_weight: float, edit_share: float) -> KindWeights:
    """Split the inference weight between text-to-image (`1 - edit_share` of it) and each
    editing kind (`edit_share` of it); training keeps its own. Defaults 0.7, 0.3 and 0.8 give
    training 0.7, text-to-image 0.06 and every editing kind 0.24."""
    for name, value in (("training_weight", training_weight), ("inference_weight", inference_weight)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, not {value}")
    if not (math.isfinite(edit_share) and 0 <= edit_share <= 1):
        raise ValueError(f"edit_share must be in [0, 1], not {edit_share}")
    return KindWeights(
        training=training_weight,
        generate=inference_weight * (1 - edit_share),
        edit=inference_weight * edit_share,
    )


@dataclass(frozen=True)
class AttemptRecord:
    """One dispatch of one job to one miner, as the scorer needs it.

    `audited` with `audit_passed` None means the verdict is pending or was inconclusive (the
    reference could not re-run it): that is not the miner's fault, so the attempt counts.
    """

    hotkey: str
    kind: str
    finished_at: datetime  # when the result came in, or when the attempt failed or timed out
    accepted: bool
    completed: bool
    valid: bool
    latency_s: float | None  # dispatch to result; None when there was no result
    timeout_s: float
    quality: float = 1.0
    # True when `quality` was measured (a training audit evaluated this job's LoRA).
    quality_measured: bool = False
    audited: bool = False
    audit_passed: bool | None = None

    def __post_init__(self) -> None:
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout_s}")
        if self.latency_s is not None and not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"latency must be a non-negative number of seconds, got {self.latency_s}")
        if not 0.0 <= self.quality <= 1.0:
            raise ValueError(f"quality must be in [0, 1], got {self.quality}")


def latency_score(latency_s: float, timeout_s: float, cutoff: float = LATENCY_CUTOFF) -> float:
    """`max(0, 1 - latency / timeout)`, and 0 when latency exceeds `cutoff` of the timeout."""
    if latency_s > cutoff * timeout_s:
        return 0.0
    return max(0.0, 1.0 - latency_s / timeout_s)


def counts(attempt: AttemptRecord) -> bool:
    """Whether the attempt earns anything at all: accepted, completed in time, valid, not caught."""
    if not (attempt.accepted and attempt.completed and attempt.valid) or attempt.latency_s is None:
        return False
    if attempt.latency_s > attempt.timeout_s:
        return False
    return not (attempt.audited and attempt.audit_passed is False)


def attempt_score(attempt: AttemptRecord, weights: Mapping[str, float]) -> float:
    """What one attempt adds to its miner's score; `weights` by job kind (`kinds.score_weights`)."""
    if attempt.kind not in weights:
        raise ValueError(f"unknown job kind {attempt.kind!r}")
    if not counts(attempt):
        return 0.0
    assert attempt.latency_s is not None  # counts() checked it
    return weights[attempt.kind] * latency_score(attempt.latency_s, attempt.timeout_s) * attempt.quality


def score_window(
    attempts: Iterable[AttemptRecord],
    start: datetime,
    end: datetime,
    penalized_until: Mapping[str, datetime | None] | None = None,
    *,
    weights: Mapping[str, float],
) -> dict[str, float]:
    """`{hotkey: score}` for attempts that finished in [start, end); `weights` by job kind
    (`kinds.score_weights`, from settings through `kind_weights`).

    Every miner with an attempt in the window or a penalty entry gets a key, so a miner that
    earned nothing shows up as 0.0 rather than missing. A miner whose penalty runs past `end`
    (`penalized_until[hotkey] > end`) scores 0. Choose a base cooldown at least as long as the
    window, so that when a cooldown ends no job from before the failure is still counted.
    """
    if end <= start:
        raise ValueError("the window is empty: end must be after start")
    penalized_until = penalized_until or {}
    in_window = spread_measured_quality([a for a in attempts if start <= a.finished_at < end])
    caught: dict[str, datetime] = {}
    for attempt in in_window:
        if attempt.audited and attempt.audit_passed is False:
            caught[attempt.hotkey] = max(attempt.finished_at, caught.get(attempt.hotkey, attempt.finished_at))
    scores: dict[str, float] = {hotkey: 0.0 for hotkey in penalized_until}
    for attempt in in_window:
        voided = attempt.hotkey in caught and attempt.finished_at <= caught[attempt.hotkey]
        earned = 0.0 if voided else attempt_score(attempt, weights)
        scores[attempt.hotkey] = scores.get(attempt.hotkey, 0.0) + earned
    for hotkey, until in penalized_until.items():
        if until is not None and until > end:
            scores[hotkey] = 0.0
    return scores


def penalties_from_failures(
    failures: Mapping[str, Sequence[datetime]], now: datetime, policy: PenaltyPolicy | None = None
) -> dict[str, datetime | None]:
    """Each miner's penalty end (None when none is running), from its failed-audit times."""
    return {hotkey: penalty_until(times, now, policy) for hotkey, times in failures.items()}


def training_quality(improvement: float, full_credit: float = FULL_CREDIT_IMPROVEMENT) -> float:
    """Quality factor of a LoRA from its held-out loss improvement (LoraEvaluation.improvement).

    Linear from 0 (no better than the base model) to 1 at `full_credit` (e.g. 0.5: half the
    base model's held-out loss) and capped there, so a miner gains from training well but
    nothing from overfitting past the point clients notice.
    """
    if full_credit <= 0:
        raise ValueError("full_credit must be positive")
    if not math.isfinite(improvement):
        return 0.0
    return min(1.0, max(0.0, improvement / full_credit))


def measured_quality(evidence: Mapping[str, Any] | None, full_credit: float = FULL_CREDIT_IMPROVEMENT) -> float | None:
    """`training_quality` of the held-out improvement a training audit measured, or None when
    the evidence (`Audit.evidence`) measured none: an inference audit, a dataset too small to hold
    images out, or a LoRA that failed before evaluation (which counts zero anyway)."""
    if not evidence:
        return None
    improvement = (evidence.get("evaluation") or {}).get("improvement")
    if not isinstance(improvement, int | float) or isinstance(improvement, bool):
        return None
    return training_quality(float(improvement), full_credit)


def spread_measured_quality(attempts: Sequence[AttemptRecord]) -> list[AttemptRecord]:
    """Give each miner's unmeasured attempts the mean quality its audited ones of the same kind
    measured (training: the held-out loss improvement; kinds without a measure keep 1.0).

    Only a sample of training jobs is audited; scoring the rest at 1.0 would make an audit cost
    an honest miner (its measured quality is usually under 1) and spare a miner whose LoRAs are
    weak everywhere. The sample's mean is the best estimate of the unaudited jobs' quality. A
    miner with no measurement keeps 1.0 until one comes in.
    """
    measured: dict[tuple[str, str], list[float]] = {}
    for a in attempts:
        if a.quality_measured:
            measured.setdefault((a.hotkey, a.kind), []).append(a.quality)
    means = {key: sum(values) / len(values) for key, values in measured.items()}
    return [
        replace(a, quality=means[(a.hotkey, a.kind)]) if not a.quality_measured and (a.hotkey, a.kind) in means else a
        for a in attempts
    ]


# ---- the window's records, read from the store ----------------------------------------------


def window_scores(
    store: Store, start: datetime, end: datetime, lookback: timedelta, weights: Mapping[str, float]
) -> dict[str, float]:
    """Per-miner scores for [start, end) from the attempts, jobs and audits in the store: the one
    function here that reads (`score_window` does the arithmetic). `lookback` reaches back for
    attempts that were dispatched before the window and finished in it: the longest attempt timeout."""

    verdicts: dict[tuple[str, str], str] = {}
    qualities: dict[tuple[str, str], float | None] = {}
    for audit in store.list_audits(since=start):
        verdicts[(audit.job_id, audit.miner_hotkey)] = audit.verdict  # the latest one wins
        qualities[(audit.job_id, audit.miner_hotkey)] = measured_quality(audit.evidence)
    # Failures further back still escalate the penalty of a new one.
    history = end - DEFAULT_PENALTY.horizon - DEFAULT_PENALTY.max_cooldown
    failures: dict[str, list[datetime]] = {}
    judged: set[str] = set()
    for audit in store.list_audits(since=history, verdict="fail"):
        # One caught job is one failure, even if two orchestrators both judged it.
        if audit.job_id not in judged:
            judged.add(audit.job_id)
            failures.setdefault(audit.miner_hotkey, []).append(audit.created_at)

    # Still running: it counts once it ends.
    attempts = [a for a in store.list_attempts(since=start - lookback) if a.outcome and a.finished_at]
    jobs = store.load_jobs({attempt.job_id for attempt in attempts})
    records = []
    for attempt in attempts:
        job = jobs.get(attempt.job_id)
        if job is None:
            continue
        key = (job.id, attempt.miner_hotkey)
        records.append(attempt_record(attempt, job, verdicts.get(key), qualities.get(key)))
    return score_window(records, start, end, penalties_from_failures(failures, end), weights=weights)


def attempt_record(attempt: JobAttempt, job: Job, verdict: str | None, quality: float | None) -> AttemptRecord:
    """The scorer's record of one finished attempt of `job`, with its audit's verdict and measured
    quality when it has them."""
    assert attempt.outcome is not None and attempt.finished_at is not None
    succeeded = attempt.outcome == "succeeded"
    return AttemptRecord(
        hotkey=attempt.miner_hotkey,
        kind=job.kind,
        finished_at=attempt.finished_at,
        # The miner never took the job (refused, busy, unreachable), or the client's own request
        # ended it (bad_input, expired): it earns nothing, and is no failure.
        accepted=attempt.outcome not in NOT_THE_MINERS,
        completed=succeeded,
        # Invalid results are recorded as "invalid", so a success is a validated one.
        valid=succeeded,
        latency_s=attempt.latency_s if succeeded else None,
        timeout_s=job.attempt_timeout_s,
        # Measured by a training audit (held-out loss improvement); where none measured it,
        # `score_window` uses the miner's mean measured quality (1.0 without any).
        quality=1.0 if quality is None else quality,
        quality_measured=quality is not None,
        audited=job.audit or verdict is not None,
        audit_passed={"pass": True, "fail": False}.get(verdict or ""),
    )
