"""The local chain's simplified Yuma consensus, on cases worked out by hand."""

from __future__ import annotations

import pytest

from dippy_studio.chain.consensus import run_epoch, stake_weighted_median


def test_weighted_median_is_the_largest_value_half_the_stake_supports() -> None:
    assert stake_weighted_median([(1.0, 0.75), (0.0, 0.25)]) == 1.0
    assert stake_weighted_median([(1.0, 0.25), (0.0, 0.75)]) == 0.0
    assert stake_weighted_median([(0.2, 0.5), (0.6, 0.5)]) == 0.6
    assert stake_weighted_median([(0.2, 0.4), (0.6, 0.3), (0.9, 0.3)]) == 0.6


def test_validators_in_agreement_split_dividends_by_stake() -> None:
    result = run_epoch({0: 3.0, 1: 1.0}, {0: {5: 1.0, 6: 1.0}, 1: {5: 2.0, 6: 2.0}})
    assert result.consensus == pytest.approx({5: 0.5, 6: 0.5})
    assert result.incentive == pytest.approx({5: 0.5, 6: 0.5})
    assert result.dividends == pytest.approx({0: 0.75, 1: 0.25})


def test_a_minority_validator_cannot_pay_its_own_miner() -> None:
    # Stake 3 votes all for miner 5, stake 1 all for miner 6. Consensus for 6 is 0
    # (only a quarter of the stake supports any weight on it), so 6 earns nothing and
    # neither does the validator that backed it.
    result = run_epoch({0: 3.0, 1: 1.0}, {0: {5: 1.0}, 1: {6: 1.0}})
    assert result.consensus == {5: 1.0, 6: 0.0}
    assert result.incentive == {5: 1.0}
    assert result.dividends == {0: 1.0}


def test_weights_above_consensus_are_clipped() -> None:
    # Shares 0.75 / 0.25. Miner 2: consensus 0.7 (the big validator's weight). Miner 3:
    # votes 1.0 (0.25) and 0.3 (0.75) -> consensus 0.3, so the small validator's 1.0 is
    # clipped to 0.3. Ranks: R2 = 0.75 * 0.7 = 0.525, R3 = 0.75 * 0.3 + 0.25 * 0.3 = 0.3.
    result = run_epoch({0: 300.0, 1: 100.0}, {0: {2: 0.7, 3: 0.3}, 1: {3: 1.0}})
    i2, i3 = 0.525 / 0.825, 0.3 / 0.825
    assert result.incentive == pytest.approx({2: i2, 3: i3})
    # Dividends: each validator's share of each miner's rank, times that miner's incentive.
    d0 = (0.75 * 0.7 / 0.525) * i2 + (0.75 * 0.3 / 0.3) * i3
    d1 = (0.25 * 0.3 / 0.3) * i3
    assert result.dividends == pytest.approx({0: d0, 1: d1})
    assert sum(result.dividends.values()) == pytest.approx(1.0)


def test_no_validator_weights_means_no_shares() -> None:
    assert run_epoch({}, {}).incentive == {}
    # A row from a uid without stake does not count.
    assert run_epoch({0: 0.0}, {0: {1: 1.0}}).incentive == {}
