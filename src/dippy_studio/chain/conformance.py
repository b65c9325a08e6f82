"""Weight conformance: what the real chain requires of a weight vector, as pure functions.

Subtensor accepts `set_weights(uids, u16 values, version_key)` only when, among other
checks, the row respects `max_weight_limit`: with the values normalised to sum 1, none
may exceed `max_weight_limit / 65535`. It then stores the row max-upscaled (the largest
value becomes 65535). A client therefore:

1. normalises its float weights (drops zeros, sums to 1),
2. clips them to the max weight, moving the excess to the others in proportion
   ("water-filling"; what bittensor's `normalize_max_weight` / `clip_to_max_weight` aim for),
3. quantises to u16 by max-upscaling and rounding (bittensor's `normalize`).

Step 2 here is exact instead of bittensor's epsilon-based cutoff, and step 3 is followed
by a repair: rounding alone can push the largest share a few millionths over the limit,
which the chain rejects with `MaxWeightExceeded`. That is common, not a corner case: random
vectors clipped by the SDK's `clip_to_max_weight` then quantised by its `normalize` often fail
the chain's check. `within_max_weight_limit` is the chain's check in exact integers.

A single weight on the caller's own uid ("self-weight") is exempt from the max-weight and
minimum-count rules, as on chain.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from bittensor.intents import normalize as _sdk_quantize

from dippy_studio.chain.base import U16_MAX, InvalidWeights, RateLimited

__all__ = [
    "blocks_until_allowed",
    "check_rate_limit",
    "clip_max_weight",
    "conform",
    "dequantize",
    "normalize",
    "pairs",
    "quantize_u16",
    "within_max_weight_limit",
]


def normalize(weights: Mapping[int, float]) -> dict[int, float]:
    """Weights scaled to sum 1, zeros dropped. All-zero (or empty) input gives `{}`.

    Negative, NaN or infinite weights raise `InvalidWeights`: they are a bug upstream,
    never something to round away.
    """
    for uid, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise InvalidWeights(f"weight of uid {uid} must be finite and >= 0, got {weight}")
        if not 0 <= uid <= U16_MAX:
            raise InvalidWeights(f"uid {uid} is outside 0..{U16_MAX}")
    total = math.fsum(weights.values())
    if total <= 0:
        return {}
    return {uid: weight / total for uid, weight in weights.items() if weight > 0}


def clip_max_weight(weights: Mapping[int, float], limit: float) -> dict[int, float]:
    """Normalise, then cap every share at `limit`, giving the excess to the uncapped ones.

    The cap `c` solves `c = limit * (k * c + rest)`, where `k` weights are capped and
    `rest` is the sum of the others: the capped ones end exactly at `limit` and the rest
    keep their proportions. Raises `InvalidWeights` when no vector over these uids can
    meet the limit (fewer than `1 / limit` non-zero weights).
    """
    shares = normalize(weights)
    if not shares or limit >= 1:
        return shares
    if limit <= 0:
        raise InvalidWeights("max weight limit must be positive")
    n = len(shares)
    if n * limit < 1:
        needed = math.ceil(1 / limit - 1e-12)
        raise InvalidWeights(
            f"{n} non-zero weight(s) cannot satisfy the max weight limit {limit:.6g}: "
            f"at least {needed} uids must get weight"
        )
    ordered = sorted(shares.values(), reverse=True)
    if ordered[0] <= limit:
        return shares
    for k in range(n):
        if limit * k >= 1:
            break
        # ordered[:k] are capped. Summed afresh, not by subtraction: tiny weights next to
        # large ones would lose their precision.
        rest = math.fsum(ordered[k:])
        cap = limit * rest / (1 - limit * k)
        if ordered[k] <= cap and (k == 0 or ordered[k - 1] >= cap):
            clipped = {uid: min(share, cap) for uid, share in shares.items()}
            total = math.fsum(clipped.values())
            return {uid: share / total for uid, share in clipped.items()}
    # Every weight capped: only the uniform vector fits (n * limit >= 1 holds here).
    return {uid: 1.0 / n for uid in shares}


def within_max_weight_limit(values: Mapping[int, int], max_weight_limit: int) -> bool:
    """The chain's check: the largest normalised value is at most `max_weight_limit / 65535`."""
    if max_weight_limit >= U16_MAX or not values:
        return True
    return max(values.values()) * U16_MAX <= max_weight_limit * sum(values.values())


def quantize_u16(weights: Mapping[int, float], max_weight_limit: int = U16_MAX) -> dict[int, int]:
    """Max-upscale to u16 and round (the largest weight becomes 65535; zeros are dropped).

    With a `max_weight_limit` below 65535, values that rounding left too small are raised
    by one at a time (those rounded down the most first) until the row passes the chain's
    check. The input should already be clipped, so this moves a few units at most.
    """
    items = sorted(weights.items())
    uids, values = _sdk_quantize([uid for uid, _ in items], [w for _, w in items])
    quantized = dict(zip(uids, values, strict=True))
    if within_max_weight_limit(quantized, max_weight_limit):
        return quantized
    top = max(w for _, w in items)
    exact = {uid: w / top * U16_MAX for uid, w in items if w > 0}
    # Raising a value below the top lowers the top's share; the top stays at 65535.
    candidates = sorted(
        (uid for uid in exact if quantized.get(uid, 0) < U16_MAX),
        key=lambda uid: (quantized.get(uid, 0) - exact[uid], uid),
    )
    if not candidates:
        raise InvalidWeights(f"weights cannot satisfy max_weight_limit {max_weight_limit}")
    needed = math.ceil(U16_MAX * U16_MAX / max_weight_limit) - sum(quantized.values())
    while needed > 0:
        raised = False
        for uid in candidates:
            if needed > 0 and quantized.get(uid, 0) < U16_MAX:
                quantized[uid] = quantized.get(uid, 0) + 1
                needed -= 1
                raised = True
        if not raised:
            raise InvalidWeights(f"weights cannot satisfy max_weight_limit {max_weight_limit}")
    return quantized


def conform(
    weights: Mapping[int, float],
    *,
    max_weight_limit: int = U16_MAX,
    min_allowed_weights: int = 0,
    self_uid: int | None = None,
) -> dict[int, int]:
    """The u16 row the chain will accept for these weights: normalise, clip, quantise.

    Raises `InvalidWeights` for an all-zero vector, a limit that cannot be met, or fewer
    than `min_allowed_weights` non-zero values after quantisation.
    """
    shares = normalize(weights)
    if not shares:
        raise InvalidWeights("all weights are zero; nothing to set")
    if self_uid is not None and list(shares) == [self_uid]:
        return {self_uid: U16_MAX}
    shares = clip_max_weight(shares, max_weight_limit / U16_MAX)
    values = quantize_u16(shares, max_weight_limit)
    if len(values) < min_allowed_weights:
        raise InvalidWeights(
            f"the subnet requires at least {min_allowed_weights} non-zero weights; "
            f"{len(values)} remain after quantisation"
        )
    return values


def dequantize(values: Mapping[int, int]) -> dict[int, float]:
    """A stored u16 row as fractions that sum to 1 (what consensus uses)."""
    total = sum(values.values())
    if total <= 0:
        return {}
    return {uid: value / total for uid, value in values.items() if value > 0}


def blocks_until_allowed(last_update: int | None, current_block: int, rate_limit: int) -> int:
    """Blocks to wait before a hotkey may set weights again (0: allowed now).

    A hotkey that never set weights may set them at once.
    """
    if last_update is None:
        return 0
    return max(0, last_update + rate_limit - current_block)


def check_rate_limit(last_update: int | None, current_block: int, rate_limit: int) -> None:
    """Raise `RateLimited` unless `rate_limit` blocks have passed since `last_update`."""
    wait = blocks_until_allowed(last_update, current_block, rate_limit)
    if wait:
        raise RateLimited(
            f"weights were set at block {last_update}; the rate limit is {rate_limit} blocks, wait {wait} more",
            blocks_left=wait,
        )


def pairs(uids: Iterable[int], weights: Iterable[float]) -> dict[int, float]:
    """Parallel uid and weight lists as a mapping; duplicate uids raise `InvalidWeights`."""
    uid_list = [int(uid) for uid in uids]
    weight_list = [float(weight) for weight in weights]
    if len(uid_list) != len(weight_list):
        raise InvalidWeights(f"{len(uid_list)} uids but {len(weight_list)} weights")
    if len(set(uid_list)) != len(uid_list):
        raise InvalidWeights("each uid may appear once")
    return dict(zip(uid_list, weight_list, strict=True))
