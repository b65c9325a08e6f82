"""Emissions for the local chain: a simplified Yuma consensus, as one pure function.

What it keeps from Yuma (subtensor's epoch):

- Only validators (permit holders with stake) count, each in proportion to its stake.
- Each validator's row is normalised to sum 1.
- Consensus per miner `C[j]`: the largest weight that validators holding at least
  `kappa` (one half) of the stake give miner `j` or more: a stake-weighted median, so
  a minority cannot lift a miner above what the majority gives it.
- Weights above consensus are clipped to it: `W'[v, j] = min(W[v, j], C[j])`.
- Rank `R[j] = sum_v S[v] * W'[v, j]`; incentive `I = R / sum(R)`.
- Dividends: each validator's share of the clipped stake-weight it put on each miner
  (its "bond"), times that miner's incentive, `D[v] = sum_j S[v] W'[v, j] / R[j] * I[j]`.

What it leaves out: bonds are instant (no `bonds_moving_avg` EMA, no liquid alpha, no
bond penalty), kappa is fixed at 0.5, there is no activity cutoff or pruning score, and
permits are not recomputed per epoch (the caller passes whom it considers a validator).
On the real chain a validator that agrees with consensus early earns more over time
through its bonds; here only the current epoch counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["KAPPA", "EpochResult", "run_epoch", "stake_weighted_median"]

KAPPA = 0.5


@dataclass(frozen=True)
class EpochResult:
    """One epoch's shares. `incentive` (by miner) and `dividends` (by validator) each
    sum to 1, or are empty when no validator weight reached consensus."""

    consensus: dict[int, float]
    incentive: dict[int, float]
    dividends: dict[int, float]


def stake_weighted_median(votes: list[tuple[float, float]], kappa: float = KAPPA) -> float:
    """The largest value `c` such that voters with at least `kappa` of the stake vote `>= c`.

    `votes` are `(value, stake share)` pairs whose shares sum to 1.
    """
    supporting = 0.0
    for value, stake in sorted(votes, key=lambda vote: vote[0], reverse=True):
        supporting += stake
        # A little slack so that shares summing to 0.4999999999 count as a half.
        if supporting >= kappa - 1e-12:
            return value
    return 0.0


def run_epoch(
    stakes: Mapping[int, float], weights: Mapping[int, Mapping[int, float]], kappa: float = KAPPA
) -> EpochResult:
    """Consensus, incentive and dividends from validator stakes and weight rows.

    `stakes` holds the validators (uid -> stake); `weights` their rows (uid -> {miner: w}).
    Rows of uids absent from `stakes`, with no stake, or all zero are ignored.
    """
    rows: dict[int, dict[int, float]] = {}
    for validator, row in weights.items():
        total = math.fsum(w for w in row.values() if w > 0)
        if stakes.get(validator, 0.0) > 0 and total > 0:
            rows[validator] = {miner: w / total for miner, w in row.items() if w > 0}
    if not rows:
        return EpochResult({}, {}, {})
    stake_total = math.fsum(stakes[v] for v in rows)
    share = {v: stakes[v] / stake_total for v in rows}
    miners = sorted({miner for row in rows.values() for miner in row})

    consensus = {
        miner: stake_weighted_median([(row.get(miner, 0.0), share[v]) for v, row in rows.items()], kappa)
        for miner in miners
    }
    clipped = {v: {m: min(w, consensus[m]) for m, w in row.items()} for v, row in rows.items()}
    rank = {m: math.fsum(share[v] * clipped[v].get(m, 0.0) for v in rows) for m in miners}
    rank_total = math.fsum(rank.values())
    if rank_total <= 0:
        return EpochResult(consensus, {}, {})
    incentive = {m: r / rank_total for m, r in rank.items() if r > 0}
    dividends = {
        v: math.fsum(share[v] * clipped[v].get(m, 0.0) / rank[m] * incentive[m] for m in incentive) for v in rows
    }
    return EpochResult(consensus, incentive, {v: d for v, d in dividends.items() if d > 0})
