"""The validator's weight formula, pinned on cases computed by hand.

T = 0.075 throughout, so a win-rate gap of 0.5 is a factor exp(0.5 / 0.075) = exp(6.667)
= 785.8 in weight, and a gap of 1 is exp(13.333) = 617,438.
"""

from __future__ import annotations

import math

import pytest

from dippy_studio.chain import U16_MAX, Hyperparameters
from dippy_studio.chain.conformance import within_max_weight_limit
from dippy_studio.validator.weights import (
    DEFAULT_TEMPERATURE,
    compute_weights,
    drop_reassigned,
    ema,
    next_weights,
    win_rates,
)

T = 0.075
E_HALF = math.exp(0.5 / T)  # 785.77...
E_ONE = math.exp(1 / T)  # 617,438...


def test_temperature_default_is_the_published_one() -> None:
    assert DEFAULT_TEMPERATURE == T


def test_win_rate_is_the_share_of_others_with_a_lower_score() -> None:
    assert win_rates([3.0, 2.0, 1.0]).tolist() == [1.0, 0.5, 0.0]
    # 4 beats 1 and 2 (2 of 3 others); the two 4s do not beat each other.
    assert win_rates([4.0, 1.0, 4.0, 2.0]).tolist() == pytest.approx([2 / 3, 0.0, 2 / 3, 1 / 3])
    assert win_rates([5.0]).tolist() == [0.0]
    assert win_rates([]).tolist() == []


def test_distinct_scores() -> None:
    weights = compute_weights({10: 3.0, 11: 2.0, 12: 1.0})
    # Win rates 1, 0.5, 0 -> weights proportional to exp(13.33), exp(6.67), 1.
    total = E_ONE + E_HALF + 1
    assert weights == pytest.approx({10: E_ONE / total, 11: E_HALF / total, 12: 1 / total})
    # By hand: the best miner keeps 1 / (1 + 1/785.77 + 1/617438) = 0.99873.
    assert weights[10] == pytest.approx(0.99873, abs=1e-5)
    assert sum(weights.values()) == pytest.approx(1.0)


def test_ties_get_equal_weight() -> None:
    weights = compute_weights({0: 2.0, 1: 2.0, 2: 1.0})
    # Win rates 0.5, 0.5, 0: each leader gets 785.77 / (2 * 785.77 + 1) = 0.49968.
    assert weights[0] == weights[1]
    assert weights[0] == pytest.approx(E_HALF / (2 * E_HALF + 1))
    assert weights[0] == pytest.approx(0.49968, abs=1e-5)
    assert weights[2] == pytest.approx(1 / (2 * E_HALF + 1))


def test_all_equal_scores_split_evenly() -> None:
    assert compute_weights({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}) == pytest.approx({u: 0.25 for u in range(4)})


def test_all_zero_pays_nobody_or_burns_everything() -> None:
    assert compute_weights({0: 0.0, 1: 0.0}) == {}
    assert compute_weights({}) == {}
    assert compute_weights({0: 0.0, 1: 0.0}, burn_uid=9, burn_share=0.3) == {9: 1.0}


def test_a_single_miner_takes_everything_but_the_burn() -> None:
    assert compute_weights({4: 0.3}) == {4: 1.0}
    assert compute_weights({4: 0.3, 5: 0.0}, burn_uid=9, burn_share=0.25) == {4: 0.75, 9: 0.25}


def test_zero_score_miners_get_nothing_but_count_as_beaten() -> None:
    weights = compute_weights({0: 3.0, 1: 2.0, 2: 0.0})
    assert 2 not in weights
    # Win rates 1, 0.5 and 0; the zero-score miner's share is not paid, so the two others
    # split in the ratio exp(13.33) : exp(6.67).
    assert weights == pytest.approx({0: E_ONE / (E_ONE + E_HALF), 1: E_HALF / (E_ONE + E_HALF)})
    # By hand: the second miner keeps 1 / (1 + 785.77) = 0.127%, which a u16 row can hold
    # (about 83 of 65535). Ranked among positive scores only, it would get 1.6e-6: zero on chain.
    assert weights[1] == pytest.approx(0.0012710, rel=1e-4)


def test_the_demo_network_pays_both_honest_miners_on_chain() -> None:
    """Two honest miners and a penalized cheater, as in `up --demo --cheater 1`."""
    round_ = next_weights({0: 4.2, 1: 3.9, 2: 0.0}, {}, hyperparameters=Hyperparameters())
    assert round_.chain[0] == U16_MAX
    assert 0 < round_.chain[1] < U16_MAX // 100
    assert round_.chain.get(2, 0) == 0


def test_banned_hotkeys_and_coldkeys_get_nothing() -> None:
    scores = {0: 3.0, 1: 2.0, 2: 1.0, 3: 0.5}
    hotkeys = {0: "hk-cheat", 1: "hk-1", 2: "hk-2", 3: "hk-3"}
    coldkeys = {0: "ck-a", 1: "ck-b", 2: "ck-b", 3: "ck-bad"}
    weights = compute_weights(
        scores, hotkeys=hotkeys, coldkeys=coldkeys, banned_hotkeys={"hk-cheat"}, banned_coldkeys={"ck-bad"}
    )
    assert set(weights) == {1, 2}
    # Uids 1 and 2 compete alone: win rates 1 and 0.
    assert weights[1] == pytest.approx(E_ONE / (E_ONE + 1))
    # A whole coldkey is banned with all its hotkeys.
    only_a = compute_weights(scores, hotkeys=hotkeys, coldkeys=coldkeys, banned_coldkeys={"ck-b"})
    assert set(only_a) == {0, 3}


def test_burn_share_scales_the_miners() -> None:
    plain = compute_weights({0: 3.0, 1: 2.0, 2: 1.0})
    burned = compute_weights({0: 3.0, 1: 2.0, 2: 1.0}, burn_uid=7, burn_share=0.1)
    assert burned[7] == 0.1
    for uid, weight in plain.items():
        assert burned[uid] == pytest.approx(0.9 * weight)
    assert sum(burned.values()) == pytest.approx(1.0)


def test_the_burn_uid_does_not_compete_as_a_miner() -> None:
    weights = compute_weights({0: 1.0, 7: 50.0}, burn_uid=7, burn_share=0.2)
    assert weights == pytest.approx({0: 0.8, 7: 0.2})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scores": {0: -1.0}},
        {"scores": {0: math.nan}},
        {"scores": {0: 1.0}, "burn_share": 0.5},
        {"scores": {0: 1.0}, "burn_uid": 1, "burn_share": 1.5},
        {"scores": {0: 1.0, 1: 2.0}, "temperature": 0.0},
    ],
)
def test_invalid_inputs_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        compute_weights(**kwargs)


def test_ema_starts_at_the_first_target() -> None:
    assert ema({}, {1: 0.6, 2: 0.4}, 0.25) == {1: 0.6, 2: 0.4}


def test_ema_blends_and_decays_absent_miners() -> None:
    assert ema({0: 1.0}, {1: 1.0}, 0.25) == pytest.approx({0: 0.75, 1: 0.25})
    assert ema({0: 0.5, 1: 0.5}, {0: 1.0}, 0.5) == pytest.approx({0: 0.75, 1: 0.25})


def test_ema_moves_toward_new_weights_across_rounds() -> None:
    state = {0: 1.0}
    for rounds in range(1, 8):
        state = ema(state, {1: 1.0}, 0.25)
        # The old miner keeps 0.75 ** t of its weight, the new one takes the rest.
        assert state[0] == pytest.approx(0.75**rounds)
        assert state[1] == pytest.approx(1 - 0.75**rounds)


def test_ema_forgets_negligible_weights_and_checks_alpha() -> None:
    assert ema({0: 1e-7}, {1: 1.0}, 0.5) == {1: 0.5}
    with pytest.raises(ValueError):
        ema({}, {0: 1.0}, 0.0)


def test_drop_reassigned_forgets_uids_that_changed_hands() -> None:
    previous = {0: 0.5, 1: 0.3, 2: 0.2}
    before = {0: "a", 1: "b", 2: "c"}
    now = {0: "a", 1: "new-owner"}
    assert drop_reassigned(previous, before, now) == {0: 0.5}


HP = Hyperparameters(max_weight_limit=U16_MAX, min_allowed_weights=1)


def test_rounds_keep_state_and_move_toward_the_new_leader() -> None:
    first = next_weights({0: 2.0, 1: 1.0}, {}, hyperparameters=HP, alpha=0.5)
    lead = E_ONE / (E_ONE + 1)
    assert first.smoothed == pytest.approx({0: lead, 1: 1 - lead})
    assert first.chain[0] == U16_MAX

    second = next_weights({0: 1.0, 1: 2.0}, first.smoothed, hyperparameters=HP, alpha=0.5)
    # Half old, half new: the leaders swap places in the target, so both end at 0.5.
    assert second.smoothed == pytest.approx({0: 0.5, 1: 0.5})
    assert second.chain == {0: U16_MAX, 1: U16_MAX}

    third = next_weights({0: 1.0, 1: 2.0}, second.smoothed, hyperparameters=HP, alpha=0.5)
    assert third.smoothed[1] == pytest.approx(0.5 * lead + 0.25)
    assert third.smoothed[1] > second.smoothed[1]


def test_a_round_with_no_scores_keeps_the_previous_weights_decaying() -> None:
    result = next_weights({0: 0.0, 1: 0.0}, {0: 0.8, 1: 0.2}, hyperparameters=HP, alpha=0.25)
    assert result.target == {}
    assert result.smoothed == pytest.approx({0: 0.6, 1: 0.15})
    assert result.chain == {0: U16_MAX, 1: round(U16_MAX / 4)}
    assert next_weights({}, {}, hyperparameters=HP).chain == {}


def test_a_zero_score_takes_effect_at_once_when_others_scored() -> None:
    # uid 0 was the leader; this round it scores zero (say, a failed audit) while 1 and 2 work.
    result = next_weights({0: 0.0, 1: 2.0, 2: 1.0}, {0: 0.9, 1: 0.1}, hyperparameters=HP, alpha=0.1)
    assert 0 not in result.smoothed and 0 not in result.chain
    # The others still smooth, and uid 0 now counts as beaten (win rates 1 and 0.5):
    # uid 1 = 0.1 * e^(1/T) / (e^(1/T) + e^(0.5/T)) + 0.9 * 0.1.
    assert result.smoothed[1] == pytest.approx(0.1 * E_ONE / (E_ONE + E_HALF) + 0.09)


def test_a_ban_takes_effect_at_once_not_through_the_ema() -> None:
    result = next_weights(
        {0: 2.0, 1: 1.0},
        {0: 0.9, 1: 0.1},
        hyperparameters=HP,
        alpha=0.1,
        hotkeys={0: "cheat", 1: "honest"},
        banned_hotkeys={"cheat"},
    )
    assert set(result.smoothed) == {1}
    assert set(result.chain) == {1}


def test_the_chain_row_respects_the_max_weight_limit() -> None:
    limit = round(0.4 * U16_MAX)
    hp = Hyperparameters(max_weight_limit=limit)
    result = next_weights({0: 5.0, 1: 4.0, 2: 3.0, 3: 2.0}, {}, hyperparameters=hp, burn_uid=9, burn_share=0.1)
    assert within_max_weight_limit(result.chain, limit)
    assert set(result.chain) == {0, 1, 2, 3, 9}
