"""Weight conformance: normalisation, max-weight clip, u16 quantisation and the rate limit."""

from __future__ import annotations

import math
import random

import pytest
from bittensor.intents import normalize as sdk_quantize
from bittensor.intents.weights import clip_to_max_weight as sdk_clip

from dippy_studio.chain import U16_MAX, InvalidWeights, RateLimited
from dippy_studio.chain.conformance import (
    blocks_until_allowed,
    check_rate_limit,
    clip_max_weight,
    conform,
    dequantize,
    normalize,
    pairs,
    quantize_u16,
    within_max_weight_limit,
)


def test_normalize_sums_to_one_and_drops_zeros() -> None:
    assert normalize({0: 2.0, 1: 0.0, 2: 6.0}) == {0: 0.25, 2: 0.75}


def test_normalize_of_all_zero_is_empty() -> None:
    assert normalize({0: 0.0, 1: 0.0}) == {}
    assert normalize({}) == {}


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_normalize_rejects_negative_and_non_finite(bad: float) -> None:
    with pytest.raises(InvalidWeights):
        normalize({0: 1.0, 1: bad})


def test_clip_leaves_weights_under_the_limit_alone() -> None:
    assert clip_max_weight({0: 0.5, 1: 0.3, 2: 0.2}, 0.6) == pytest.approx({0: 0.5, 1: 0.3, 2: 0.2})


def test_clip_moves_the_excess_to_the_others_in_proportion() -> None:
    # 0.9 / 0.1 with a cap of 0.6: the top ends on the cap, the other takes the rest.
    assert clip_max_weight({0: 0.9, 1: 0.1}, 0.6) == pytest.approx({0: 0.6, 1: 0.4})
    # 0.7 / 0.2 / 0.1 with a cap of 0.4: the cap c solves c = 0.4 * (c + 0.2 + 0.1)
    # with only uid 0 capped -> c = 0.2, so uids 0 and 1 tie at 0.2 and the row is
    # (0.2, 0.2, 0.1) / 0.5 = (0.4, 0.4, 0.2).
    assert clip_max_weight({0: 0.7, 1: 0.2, 2: 0.1}, 0.4) == pytest.approx({0: 0.4, 1: 0.4, 2: 0.2})


def test_clip_refuses_a_limit_no_vector_can_meet() -> None:
    with pytest.raises(InvalidWeights, match="at least 3 uids"):
        clip_max_weight({0: 1.0, 1: 1.0}, 0.4)


def test_quantize_max_upscales_and_rounds() -> None:
    assert quantize_u16({0: 0.5, 1: 0.25, 2: 0.0}) == {0: U16_MAX, 1: round(U16_MAX / 2)}


def test_u16_round_trip_keeps_proportions() -> None:
    weights = {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}
    back = dequantize(quantize_u16(weights))
    for uid, weight in weights.items():
        # Max-upscaled to 65535, each value is off by at most half a unit.
        assert back[uid] == pytest.approx(weight, abs=1 / U16_MAX)


def test_within_max_weight_limit_is_the_chains_integer_check() -> None:
    # 65535 / (65535 + 65535) = 0.5 exactly; a limit of 32767 / 65535 is just below that.
    assert within_max_weight_limit({0: U16_MAX, 1: U16_MAX}, 32768)
    assert not within_max_weight_limit({0: U16_MAX, 1: U16_MAX}, 32767)
    assert within_max_weight_limit({0: U16_MAX}, U16_MAX)


def test_conform_passes_the_chain_check_where_the_sdk_rounding_does_not() -> None:
    weights, limit = {0: 1.0, 1: 2.0, 2: 3.0}, 32767
    uids, sdk_values = sdk_quantize([0, 1, 2], sdk_clip([1.0, 2.0, 3.0], limit / U16_MAX))
    assert not within_max_weight_limit(dict(zip(uids, sdk_values, strict=True)), limit)

    values = conform(weights, max_weight_limit=limit)
    assert within_max_weight_limit(values, limit)
    # Still the clipped proportions, give or take a rounding unit.
    assert dequantize(values) == pytest.approx(clip_max_weight(weights, limit / U16_MAX), abs=2 / U16_MAX)


def test_conform_always_meets_the_limit_on_random_rows() -> None:
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(2, 40)
        limit = rng.choice([6554, 13107, 21845, 32767, 40000])
        weights = {uid: rng.random() ** 3 for uid in range(n)}
        if n * limit < U16_MAX:
            continue
        values = conform(weights, max_weight_limit=limit)
        assert within_max_weight_limit(values, limit)
        assert max(values.values()) == U16_MAX


def test_conform_keeps_what_the_sdk_would_submit() -> None:
    """Integers that already fit go through the SDK's clip and quantisation unchanged."""
    limit = 21845
    values = conform({uid: 1.0 + uid for uid in range(8)}, max_weight_limit=limit)
    uids = list(values)
    floats = [float(v) for v in values.values()]
    assert sdk_quantize(uids, sdk_clip(floats, limit / U16_MAX)) == (uids, list(values.values()))


def test_conform_rejects_all_zero_and_too_few_weights() -> None:
    with pytest.raises(InvalidWeights, match="all weights are zero"):
        conform({0: 0.0})
    with pytest.raises(InvalidWeights, match="at least 3"):
        conform({0: 1.0, 1: 1.0}, min_allowed_weights=3)


def test_self_weight_is_exempt_from_the_max_weight_and_minimum_count() -> None:
    assert conform({4: 1.0}, max_weight_limit=100, min_allowed_weights=8, self_uid=4) == {4: U16_MAX}
    with pytest.raises(InvalidWeights):
        conform({4: 1.0}, max_weight_limit=100, self_uid=5)


def test_pairs_rejects_duplicates_and_length_mismatch() -> None:
    assert pairs([3, 1], [0.5, 0.5]) == {3: 0.5, 1: 0.5}
    with pytest.raises(InvalidWeights, match="once"):
        pairs([1, 1], [0.5, 0.5])
    with pytest.raises(InvalidWeights, match="2 uids but 1 weights"):
        pairs([1, 2], [0.5])


def test_rate_limit_counts_blocks_since_the_last_update() -> None:
    assert blocks_until_allowed(None, 5, 100) == 0
    assert blocks_until_allowed(10, 50, 100) == 60
    assert blocks_until_allowed(10, 110, 100) == 0
    with pytest.raises(RateLimited) as caught:
        check_rate_limit(10, 50, 100)
    assert caught.value.blocks_left == 60
