"""BittensorChain over a fake SDK client: the real SDK types and intents, no network."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bittensor
import pytest
from bittensor import Balance, ChainError, ErrorCode, ExtrinsicResult, Metagraph, MetagraphNeuron, NeuronCommitment

from chain.chain_support import ALICE, BOB, CHARLIE, DAVE
from dippy_studio.chain import (
    U16_MAX,
    AlreadyRegistered,
    BittensorChain,
    Chain,
    ChainUnavailable,
    InvalidCommitment,
    InvalidWeights,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
    VersionKeyTooLow,
)
from dippy_studio.chain import ChainError as OurChainError
from dippy_studio.chain.conformance import conform, within_max_weight_limit
from dippy_studio.protocol.keys import create_dev_wallet

NETUID = 7


def neuron(uid: int, hotkey: str, coldkey: str, stake: float, permit: bool, commitment: str | None = None):
    return MetagraphNeuron(
        uid=uid,
        hotkey=hotkey,
        coldkey=coldkey,
        active=True,
        validator_permit=permit,
        last_update=100 + uid,
        block_at_registration=10 * uid,
        rank=0.0,
        trust=0.0,
        consensus=0.25,
        incentive=0.5 if not permit else 0.0,
        dividends=1.0 if permit else 0.0,
        pruning_score=0.0,
        emission=Balance.from_rao(2_000_000_000, NETUID),
        alpha_stake=Balance.from_rao(int(stake * 1e9), NETUID),
        tao_stake=Balance.from_rao(0),
        total_stake=Balance.from_rao(int(stake * 1e9), NETUID),
        axon=None,
        identity=None,
        commitment=None
        if commitment is None
        else NeuronCommitment(
            hotkey=hotkey,
            netuid=NETUID,
            uid=uid,
            block=90,
            queried_block=120,
            deposit=Balance.from_rao(0),
            data=commitment,
            encrypted=False,
            reveal_round=None,
            revealed=[],
            fields=[],
        ),
    )


def metagraph(neurons: list) -> Metagraph:
    return Metagraph(
        netuid=NETUID,
        mechid=0,
        name="dippy",
        symbol="d",
        block=120,
        tempo=360,
        last_step=0,
        blocks_since_last_step=0,
        owner_hotkey=ALICE,
        owner_coldkey=ALICE,
        network_registered_at=0,
        num_uids=len(neurons),
        max_uids=256,
        price=None,
        moving_price=None,
        identity=None,
        neurons=neurons,
        commitments={n.uid: n.commitment for n in neurons if n.commitment},
        unregistered_commitments={},
        raw={},
    )


class FakeSnapshot:
    def __init__(self, storage: dict) -> None:
        self.storage = storage

    def query(self, item, params=None):
        return self.storage.get((item.name, tuple(params or [])))


class FakeClient:
    """The slice of `bittensor.SyncClient` BittensorChain uses, answering from memory."""

    def __init__(self) -> None:
        self.block = 4321
        self.uids = {ALICE: 0, BOB: 1, CHARLIE: 2}
        self.storage: dict[tuple[str, tuple], Any] = {
            ("Tempo", (NETUID,)): 360,
            ("WeightsSetRateLimit", (NETUID,)): 100,
            ("MaxWeightsLimit", (NETUID,)): 32767,
            ("MinAllowedWeights", (NETUID,)): 1,
            ("WeightsVersionKey", (NETUID,)): 3,
            ("MaxAllowedValidators", (NETUID,)): 64,
            ("ImmunityPeriod", (NETUID,)): 5000,
            ("MaxAllowedUids", (NETUID,)): 256,
            ("CommitRevealWeightsEnabled", (NETUID,)): True,
            ("StakeThreshold", ()): 1_000_000_000_000,
            ("Keys", (NETUID, 2)): CHARLIE,
        }
        self.graph: Metagraph | None = metagraph(
            [
                neuron(0, ALICE, BOB, 1500.0, True),
                neuron(1, BOB, BOB, 0.0, False, commitment="http://1.2.3.4:8000"),
            ]
        )
        self.commitments = {
            CHARLIE: bittensor.Commitment(block=77, deposit=Balance.from_rao(0), data="http://c", fields=[])
        }
        self.rows = {0: {1: 0.25, 2: 0.75}}
        self.executed: list[tuple[Any, Any]] = []
        self.submitted: list[tuple[Any, Any, str]] = []
        self.outcome: ExtrinsicResult | Exception = ExtrinsicResult(success=True)
        self.neurons = SimpleNamespace(uid=lambda hotkey, netuid: self.uids.get(hotkey) if netuid == NETUID else None)
        self.subnets = SimpleNamespace(metagraph=lambda netuid: self.graph)
        self.identity = SimpleNamespace(commitment=lambda netuid, hotkey: self.commitments.get(hotkey))
        self.weights = SimpleNamespace(weights=lambda netuid: self.rows)

    def at(self) -> FakeSnapshot:
        return FakeSnapshot(self.storage)

    def _outcome(self) -> ExtrinsicResult:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def execute(self, intent, wallet):
        self.executed.append((intent, wallet))
        if isinstance(intent, bittensor.BurnedRegister) and self.outcome_is_success():
            self.uids[intent.hotkey_ss58] = len(self.uids)
        return self._outcome()

    def outcome_is_success(self) -> bool:
        return isinstance(self.outcome, ExtrinsicResult) and self.outcome.success

    def submit_call(self, call, wallet, signer="coldkey"):
        self.submitted.append((call, wallet, signer))
        return self._outcome()


@pytest.fixture(scope="module")
def wallet(tmp_path_factory) -> bittensor.Wallet:
    """A wallet on disk whose hotkey is //Alice and coldkey //Bob."""
    path = tmp_path_factory.mktemp("wallets")
    create_dev_wallet("dev", "default", path, hotkey_uri="//Alice", coldkey_uri="//Bob")
    return bittensor.Wallet("dev", "default", str(path))


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def chain(client: FakeClient, wallet) -> BittensorChain:
    return BittensorChain("test", NETUID, wallet, client=client)


def test_it_is_a_chain_and_connects_lazily(tmp_path: Path) -> None:
    chain = BittensorChain("test", NETUID)
    assert isinstance(chain, Chain)
    # The default client is the SDK's blocking client, built cold: no socket yet.
    assert isinstance(chain.client, bittensor.SyncClient)
    assert chain.client.network == "test"


def test_block_and_hyperparameters_come_from_storage(chain: BittensorChain) -> None:
    assert chain.block() == 4321
    hp = chain.hyperparameters()
    assert (hp.netuid, hp.tempo, hp.weights_rate_limit, hp.max_weight_limit) == (NETUID, 360, 100, 32767)
    assert (hp.min_allowed_weights, hp.weights_version, hp.max_validators) == (1, 3, 64)
    assert hp.min_validator_stake == 1000.0  # StakeThreshold is in rao
    assert hp.commit_reveal_enabled is True


def test_a_missing_subnet_is_reported(chain: BittensorChain, client: FakeClient) -> None:
    del client.storage[("Tempo", (NETUID,))]
    with pytest.raises(OurChainError, match="does not exist"):
        chain.hyperparameters()
    client.graph = None
    with pytest.raises(OurChainError, match="does not exist"):
        chain.metagraph()


def test_metagraph_maps_neurons_and_commitments(chain: BittensorChain) -> None:
    graph = chain.metagraph()
    assert graph.block == 120
    assert graph.uids == [0, 1]
    assert graph.hotkeys == [ALICE, BOB]
    assert graph.coldkeys == [BOB, BOB]
    assert graph.stakes == [1500.0, 0.0]
    assert graph.validator_permits == [True, False]
    alice = graph.neuron(0)
    assert (alice.dividends, alice.emission, alice.last_update, alice.registered_at) == (1.0, 2.0, 100, 0)
    assert graph.endpoint_of(1) == "http://1.2.3.4:8000"
    assert graph.commitments[1].block == 90
    assert graph.endpoint_of(0) is None
    assert graph.stake_of(ALICE) == 1500.0


def test_register_burns_with_the_wallet_coldkey(chain: BittensorChain, client: FakeClient, wallet) -> None:
    assert chain.register(DAVE, BOB) == 3
    ((intent, signer),) = client.executed
    assert isinstance(intent, bittensor.BurnedRegister)
    assert (intent.netuid, intent.hotkey_ss58) == (NETUID, DAVE)
    assert signer is wallet


def test_register_refuses_duplicates_and_foreign_coldkeys(chain: BittensorChain, client: FakeClient) -> None:
    with pytest.raises(AlreadyRegistered) as caught:
        chain.register(BOB, BOB)
    assert caught.value.uid == 1
    with pytest.raises(OurChainError, match="cannot sign for"):
        chain.register(DAVE, CHARLIE)
    assert client.executed == []


def test_add_stake_stakes_tao_from_the_coldkey(chain: BittensorChain, client: FakeClient) -> None:
    chain.add_stake(ALICE, 1.5)
    ((intent, _),) = client.executed
    assert isinstance(intent, bittensor.AddStake)
    assert (intent.hotkey_ss58, intent.netuid, intent.amount_tao) == (ALICE, NETUID, bittensor.tao(1.5))


def test_commit_sends_a_raw_commitment_signed_by_the_hotkey(chain: BittensorChain, client: FakeClient) -> None:
    chain.commit(ALICE, "http://1.2.3.4:8000")
    ((call, _, signer),) = client.submitted
    assert (call.module, call.function, signer) == ("Commitments", "set_commitment", "hotkey")
    assert call.params == {"netuid": NETUID, "info": {"fields": [{"Raw19": b"http://1.2.3.4:8000"}]}}


def test_commit_checks_size_and_signer(chain: BittensorChain, client: FakeClient) -> None:
    with pytest.raises(InvalidCommitment):
        chain.commit(ALICE, "x" * 129)
    with pytest.raises(OurChainError, match="cannot sign for"):
        chain.commit(BOB, "http://b")
    assert client.submitted == []


def test_get_commitment_by_uid_or_hotkey(chain: BittensorChain) -> None:
    by_uid = chain.get_commitment(2)
    assert by_uid is not None
    assert (by_uid.hotkey, by_uid.uid, by_uid.data, by_uid.block) == (CHARLIE, 2, "http://c", 77)
    assert chain.get_commitment(CHARLIE) == by_uid
    assert chain.get_commitment(ALICE) is None
    assert chain.get_commitment(9) is None


def test_set_weights_submits_the_conformed_row(chain: BittensorChain, client: FakeClient) -> None:
    values = chain.set_weights(ALICE, [1, 2, 3], [1.0, 2.0, 3.0], version_key=3)
    assert values == conform({1: 1.0, 2: 2.0, 3: 3.0}, max_weight_limit=32767)
    assert within_max_weight_limit(values, 32767)
    ((intent, _),) = client.executed
    assert isinstance(intent, bittensor.SetWeights)
    assert (intent.netuid, intent.version_key) == (NETUID, 3)
    assert intent.uids == list(values)
    assert intent.weights == [float(v) for v in values.values()]
    assert max(values.values()) == U16_MAX


def test_set_weights_refuses_before_sending(chain: BittensorChain, client: FakeClient) -> None:
    with pytest.raises(VersionKeyTooLow):
        chain.set_weights(ALICE, [1], [1.0], version_key=2)
    with pytest.raises(OurChainError, match="cannot sign for"):
        chain.set_weights(BOB, [1], [1.0], version_key=3)
    with pytest.raises(InvalidWeights):
        chain.set_weights(ALICE, [1, 2], [0.0, 0.0], version_key=3)
    del client.uids[ALICE]
    with pytest.raises(NotRegistered):
        chain.set_weights(ALICE, [1], [1.0], version_key=3)
    assert client.executed == []


def test_sdk_refusals_become_precise_errors(chain: BittensorChain, client: FakeClient) -> None:
    client.outcome = ChainError(
        "Weights on netuid 7 were last set 5 blocks ago; the rate limit is 100 blocks. Retry in ~95 blocks (~1140s).",
        code=ErrorCode.RATE_LIMITED,
    )
    with pytest.raises(RateLimited) as caught:
        chain.set_weights(ALICE, [1, 2, 3], [1.0, 1.0, 1.0], version_key=3)
    assert caught.value.blocks_left == 95

    refused = ChainError("The neuron has no validator permit", name="NeuronNoValidatorPermit")
    client.outcome = ExtrinsicResult(success=False, message="failed", error=refused)
    with pytest.raises(NoValidatorPermit):
        chain.set_weights(ALICE, [1, 2, 3], [1.0, 1.0, 1.0], version_key=3)

    client.outcome = ChainError("Hotkey is not registered", code=ErrorCode.NOT_REGISTERED)
    with pytest.raises(NotRegistered):
        chain.set_weights(ALICE, [1, 2, 3], [1.0, 1.0, 1.0], version_key=3)


def test_an_unreachable_node_is_chain_unavailable(chain: BittensorChain, client: FakeClient) -> None:
    def down(netuid):
        raise bittensor.RpcConnectionError("connection refused")

    client.subnets = SimpleNamespace(metagraph=down)
    with pytest.raises(ChainUnavailable, match="connection refused"):
        chain.metagraph()


def test_weights_rows_are_read_with_int_keys(chain: BittensorChain, client: FakeClient) -> None:
    client.rows = {"0": {"1": 0.25, "2": 0.75}}
    assert chain.weights() == {0: {1: 0.25, 2: 0.75}}


def test_writes_need_a_wallet(client: FakeClient) -> None:
    chain = BittensorChain("test", NETUID, client=client)
    with pytest.raises(OurChainError, match="needs a wallet"):
        chain.commit(ALICE, "http://a")
