"""Sender policy: allow-lists and stake thresholds, read through a fake chain."""

from __future__ import annotations

import pytest

from dippy_studio.protocol import (
    InsufficientStake,
    MemoryNonceStore,
    SenderNotAllowed,
    SenderPolicy,
    SenderRefused,
    Signer,
    UnregisteredSender,
    sign_request,
    verify_request,
)

T0 = 1_700_000_000.0


class FakeStakes:
    """A StakeLookup over a dict; records which hotkeys were looked up."""

    def __init__(self, stakes: dict[str, float]) -> None:
        self.stakes = stakes
        self.lookups: list[str] = []

    def stake_of(self, hotkey_ss58: str) -> float | None:
        self.lookups.append(hotkey_ss58)
        return self.stakes.get(hotkey_ss58)


class ChainDown:
    def stake_of(self, hotkey_ss58: str) -> float | None:
        raise ConnectionError("subtensor unreachable")


def test_allow_list_admits_listed_hotkeys_only(alice: Signer, bob: Signer) -> None:
    policy = SenderPolicy.allow_list([alice.ss58_address])
    policy.check(alice.ss58_address)
    with pytest.raises(SenderNotAllowed) as caught:
        policy.check(bob.ss58_address)
    assert caught.value.status_code == 403


def test_stake_threshold(alice: Signer, bob: Signer, charlie: Signer) -> None:
    stakes = FakeStakes({alice.ss58_address: 1500.0, bob.ss58_address: 999.9})
    policy = SenderPolicy(stake_lookup=stakes, min_stake=1000)

    policy.check(alice.ss58_address)
    with pytest.raises(InsufficientStake):
        policy.check(bob.ss58_address)
    with pytest.raises(UnregisteredSender):
        policy.check(charlie.ss58_address)


def test_zero_min_stake_admits_every_registered_hotkey(alice: Signer, bob: Signer) -> None:
    policy = SenderPolicy(stake_lookup=FakeStakes({alice.ss58_address: 0.0}), min_stake=0.0)
    policy.check(alice.ss58_address)
    with pytest.raises(UnregisteredSender):
        policy.check(bob.ss58_address)


def test_allow_list_and_stake_combine(alice: Signer, bob: Signer, charlie: Signer) -> None:
    stakes = FakeStakes({bob.ss58_address: 5000.0, charlie.ss58_address: 1.0})
    policy = SenderPolicy(allowed_hotkeys=[alice.ss58_address], min_stake=1000, stake_lookup=stakes)

    policy.check(alice.ss58_address)  # unregistered, but listed
    policy.check(bob.ss58_address)  # not listed, but staked
    with pytest.raises(InsufficientStake):
        policy.check(charlie.ss58_address)
    assert alice.ss58_address not in stakes.lookups  # listed hotkeys skip the chain


def test_open_policy_admits_anyone(charlie: Signer) -> None:
    SenderPolicy.open().check(charlie.ss58_address)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # says nothing: refuse to build rather than refuse (or admit) everyone
        {"min_stake": 10.0},  # a threshold without a way to read stake
        {"stake_lookup": FakeStakes({})},  # a lookup without a threshold
        {"min_stake": -1.0, "stake_lookup": FakeStakes({})},
        {"allow_any": True, "allowed_hotkeys": ["5Grw"]},
    ],
)
def test_ambiguous_policies_fail_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SenderPolicy(**kwargs)


def test_chain_errors_propagate_rather_than_refuse(alice: Signer) -> None:
    # An outage is the server's problem (5xx), not the caller's (403).
    with pytest.raises(ConnectionError):
        SenderPolicy(stake_lookup=ChainDown(), min_stake=0.0).check(alice.ss58_address)


@pytest.mark.parametrize("scheme", ["btauth", "epistula"])
def test_verify_request_applies_the_policy(scheme, alice: Signer, bob: Signer, charlie: Signer) -> None:
    stakes = FakeStakes({alice.ss58_address: 2000.0, charlie.ss58_address: 10.0})
    policy = SenderPolicy(stake_lookup=stakes, min_stake=1000)
    store = MemoryNonceStore()
    body = b"{}"

    def request(sender: Signer) -> dict[str, str]:
        return sign_request(sender, "POST", "/inference", body, bob.ss58_address, scheme, now=T0)

    def verify(headers: dict[str, str]):
        return verify_request(
            headers,
            body,
            method="POST",
            path="/inference",
            receiver_ss58=bob.ss58_address,
            nonce_store=store,
            policy=policy,
            now=T0,
        )

    assert verify(request(alice)).hotkey_ss58 == alice.ss58_address
    with pytest.raises(InsufficientStake) as caught:
        verify(request(charlie))
    assert isinstance(caught.value, SenderRefused)
    assert caught.value.status_code == 403
    with pytest.raises(UnregisteredSender):
        verify(request(bob))
