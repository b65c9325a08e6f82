"""From miner scores to the weights a validator sets on chain. Pure functions only.

One round, for the miners' scores `s` (from the orchestrator's signed scores):

1. Competitors: every miner the orchestrator scored, zero scores included, except banned
   hotkeys and coldkeys and the burn uid. Banned miners get weight 0 and do not take part
   in the ranking.
2. Win rate of competitor i: the share of the other competitors with a strictly lower
   score, `wr_i = #{j != i : s_j < s_i} / (n - 1)` (0 for a lone miner). Equal scores beat
   neither way, so ties get equal win rates. A miner that scored zero is one the others
   beat: that is the published design's "share of other miners with a lower score", and
   while some miner scored zero (an idle or penalized one) it keeps the lowest honest miner
   paid. Ranked among positive scores only, the last of them would always get
   `exp(-1 / T)` = 1.6e-6 of the top miner's weight, which is 0 in a u16 row; with no zero
   score in the round that is still so, by design (winner takes most).
3. `p = softmax(wr / T)` over the competitors with a score above zero, `T = 0.075`:
   `p_i = exp(wr_i / T) / sum_j exp(wr_j / T)`; zero-score miners get nothing. A win rate
   one step (1 / (n - 1)) higher multiplies weight by `exp(1 / ((n - 1) T))`.
4. Burn: with a burn uid configured, miners get `(1 - burn_share) * p` and the burn uid
   `burn_share`. With no score above zero everything goes to the burn uid, or, with no
   burn uid, the round is empty (`{}`): nothing to set.
5. EMA across rounds, `w_t = alpha * target_t + (1 - alpha) * w_(t-1)`, over the union of
   uids: a miner absent this round decays by `(1 - alpha)` rather than dropping to 0, and
   the previous round's weights are kept, never reset. The first round (no history)
   starts at the target. Two exceptions are removed from the smoothed weights at once:
   banned keys, and miners the orchestrator scored zero in a round where others scored
   (a penalty must bite now, not fade over ten rounds). A round where every score is zero
   carries no information and only decays.
6. The chain's conformance (`dippy_studio.chain.conformance.conform`): normalise,
   max-weight clip, u16 quantisation.

The EMA state is keyed by uid. A uid that changes hands (deregistered, then taken by a
new hotkey) must not inherit its predecessor's weight: pass the state through
`drop_reassigned` with the previous and current hotkeys before the next round.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dippy_studio.chain.base import Hyperparameters
from dippy_studio.chain.conformance import conform

__all__ = [
    "DEFAULT_EMA_ALPHA",
    "DEFAULT_TEMPERATURE",
    "EMA_FLOOR",
    "WeightRound",
    "compute_weights",
    "drop_reassigned",
    "ema",
    "next_weights",
    "softmax",
    "win_rates",
]

DEFAULT_TEMPERATURE = 0.075
# About ten rounds of memory; with one round per tempo (360 blocks) that is half a day.
DEFAULT_EMA_ALPHA = 0.1
# Smoothed weights below this are forgotten: a u16 row cannot express them anyway
# (its resolution is 1/65535 of the largest weight).
EMA_FLOOR = 1e-6


def win_rates(scores: Sequence[float]) -> np.ndarray:
    """Each entry's share of the other entries with a strictly lower score."""
    values = np.asarray(scores, dtype=float)
    n = len(values)
    if n <= 1:
        return np.zeros(n)
    lower = (values[None, :] < values[:, None]).sum(axis=1)
    return lower / (n - 1)


def softmax(values: np.ndarray, temperature: float) -> np.ndarray:
    """`exp(v / T) / sum(exp(v / T))`, shifted by the maximum so it cannot overflow."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(values) == 0:
        return np.zeros(0)
    z = np.asarray(values, dtype=float) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def _banned(
    uid: int,
    hotkeys: Mapping[int, str],
    coldkeys: Mapping[int, str],
    banned_hotkeys: Collection[str],
    banned_coldkeys: Collection[str],
) -> bool:
    return hotkeys.get(uid) in banned_hotkeys or coldkeys.get(uid) in banned_coldkeys


def compute_weights(
    scores: Mapping[int, float],
    *,
    hotkeys: Mapping[int, str] | None = None,
    coldkeys: Mapping[int, str] | None = None,
    banned_hotkeys: Collection[str] = (),
    banned_coldkeys: Collection[str] = (),
    temperature: float = DEFAULT_TEMPERATURE,
    burn_uid: int | None = None,
    burn_share: float = 0.0,
) -> dict[int, float]:
    """This round's target weights by uid (steps 1-4 of the module docstring).

    The result sums to 1, or is empty when no miner scored above zero and no burn uid is set.
    Uids whose hotkey or coldkey is unknown (missing from `hotkeys` / `coldkeys`) cannot
    match a ban. Scores must be finite and >= 0.
    """
    for uid, score in scores.items():
        if not math.isfinite(score) or score < 0:
            raise ValueError(f"score of uid {uid} must be finite and >= 0, got {score}")
    if not 0 <= burn_share <= 1:
        raise ValueError(f"burn_share must be in [0, 1], got {burn_share}")
    if burn_share > 0 and burn_uid is None:
        raise ValueError("burn_share needs a burn_uid")
    hotkeys = hotkeys or {}
    coldkeys = coldkeys or {}
    competitors = sorted(
        uid
        for uid in scores
        if uid != burn_uid and not _banned(uid, hotkeys, coldkeys, banned_hotkeys, banned_coldkeys)
    )
    rates = dict(zip(competitors, win_rates([scores[uid] for uid in competitors]), strict=True))
    paid = [uid for uid in competitors if scores[uid] > 0]
    shares = softmax(np.array([rates[uid] for uid in paid]), temperature)
    miners = {uid: float(share) for uid, share in zip(paid, shares, strict=True)}
    if burn_uid is None:
        return miners
    if not miners:
        return {burn_uid: 1.0}
    weights = {uid: (1 - burn_share) * share for uid, share in miners.items() if share > 0}
    if burn_share > 0:
        weights[burn_uid] = burn_share
    return weights


def ema(previous: Mapping[int, float], current: Mapping[int, float], alpha: float) -> dict[int, float]:
    """`alpha * current + (1 - alpha) * previous` over the union of uids.

    Uids missing from `current` decay; with no history the result is `current` itself.
    Values below `EMA_FLOOR` are dropped so the state does not grow without bound.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if not previous:
        return {uid: w for uid, w in current.items() if w >= EMA_FLOOR}
    blended = {
        uid: alpha * current.get(uid, 0.0) + (1 - alpha) * previous.get(uid, 0.0)
        for uid in sorted(set(previous) | set(current))
    }
    return {uid: w for uid, w in blended.items() if w >= EMA_FLOOR}


def drop_reassigned(
    previous: Mapping[int, float], previous_hotkeys: Mapping[int, str], hotkeys: Mapping[int, str]
) -> dict[int, float]:
    """The smoothed weights of uids still held by the same hotkey (others start afresh)."""
    return {uid: w for uid, w in previous.items() if uid in hotkeys and previous_hotkeys.get(uid) == hotkeys[uid]}


@dataclass(frozen=True)
class WeightRound:
    """One round's outcome.

    `target`: this round's weights from the scores. `smoothed`: the EMA state to keep
    and pass back next round. `chain`: the u16 row to set (empty: nothing to set).
    """

    target: dict[int, float]
    smoothed: dict[int, float]
    chain: dict[int, int]


def next_weights(
    scores: Mapping[int, float],
    previous: Mapping[int, float],
    *,
    hyperparameters: Hyperparameters,
    alpha: float = DEFAULT_EMA_ALPHA,
    hotkeys: Mapping[int, str] | None = None,
    coldkeys: Mapping[int, str] | None = None,
    banned_hotkeys: Collection[str] = (),
    banned_coldkeys: Collection[str] = (),
    temperature: float = DEFAULT_TEMPERATURE,
    burn_uid: int | None = None,
    burn_share: float = 0.0,
    self_uid: int | None = None,
) -> WeightRound:
    """The whole round: target weights, EMA with the previous state, chain conformance.

    A round whose target is empty (no miner scored above zero, no burn uid) only decays the
    previous state, so the validator keeps setting the last known proportions (conformance
    renormalises) until every value has decayed under `EMA_FLOOR` (about 130 such rounds
    at alpha 0.1); `chain` is empty only when there is no state left.
    Raises `dippy_studio.chain.InvalidWeights` when the subnet's rules cannot be met
    (for example fewer miners with weight than `max_weight_limit` allows).
    """
    hotkeys = hotkeys or {}
    coldkeys = coldkeys or {}
    target = compute_weights(
        scores,
        hotkeys=hotkeys,
        coldkeys=coldkeys,
        banned_hotkeys=banned_hotkeys,
        banned_coldkeys=banned_coldkeys,
        temperature=temperature,
        burn_uid=burn_uid,
        burn_share=burn_share,
    )
    # In a round where some miner earned a score, a miner scored zero (idle, invalid work, or
    # an audit penalty) gets nothing at once rather than decaying: "zero-score miners get
    # nothing". A round where nobody scored carries no information and only decays.
    informative = any(score > 0 for score in scores.values())
    smoothed = {
        uid: w
        for uid, w in ema(previous, target, alpha).items()
        if not _banned(uid, hotkeys, coldkeys, banned_hotkeys, banned_coldkeys)
        and not (informative and uid in scores and scores[uid] <= 0)
    }
    chain = (
        conform(
            smoothed,
            max_weight_limit=hyperparameters.max_weight_limit,
            min_allowed_weights=hyperparameters.min_allowed_weights,
            self_uid=self_uid,
        )
        if smoothed
        else {}
    )
    return WeightRound(target=target, smoothed=smoothed, chain=chain)
