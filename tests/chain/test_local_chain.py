"""LocalChain: blocks, registration, stake, commitments, weight rules and emissions."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from chain.chain_support import ALICE, BOB, CHARLIE, DAVE, EVE, T0, Clock
from dippy_studio.chain import (
    U16_MAX,
    AlreadyRegistered,
    Chain,
    ChainError,
    ChainNotFound,
    Hyperparameters,
    InvalidCommitment,
    InvalidWeights,
    LocalChain,
    NotRegistered,
    NoValidatorPermit,
    RateLimited,
    SubnetFull,
    VersionKeyTooLow,
)
from dippy_studio.chain.local import MINER_SHARE


def test_local_chain_is_a_chain(make_chain) -> None:
    assert isinstance(make_chain(), Chain)


def test_blocks_follow_wall_time(tmp_path: Path, clock: Clock) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", 12.0, clock)
    assert chain.block() == 0
    clock.now += 11.9
    assert chain.block() == 0
    clock.now += 0.1
    assert chain.block() == 1
    clock.now += 120
    assert chain.block() == 11


def test_every_process_sees_the_genesis_and_block_time_of_the_file(tmp_path: Path, clock: Clock) -> None:
    LocalChain(tmp_path / "c.sqlite", 2.0, clock)
    clock.now += 10
    again = LocalChain(tmp_path / "c.sqlite", clock=clock)
    assert again.block_time == 2.0
    assert again.block() == 5
    with pytest.raises(ChainError, match="block time of 2.0 s"):
        LocalChain(tmp_path / "c.sqlite", 12.0, clock)


def test_opening_without_create_needs_an_existing_chain(tmp_path: Path) -> None:
    with pytest.raises(ChainNotFound):
        LocalChain(tmp_path / "missing.sqlite", create=False)


def test_hotkeys_register_and_get_consecutive_uids(make_chain) -> None:
    chain = make_chain()
    assert [chain.register(hk, ALICE) for hk in (ALICE, BOB, CHARLIE)] == [0, 1, 2]
    graph = chain.metagraph()
    assert graph.uids == [0, 1, 2]
    assert graph.hotkeys == [ALICE, BOB, CHARLIE]
    assert graph.coldkeys == [ALICE, ALICE, ALICE]
    assert graph.uid_of(BOB) == 1


def test_registering_twice_names_the_existing_uid(make_chain) -> None:
    chain = make_chain()
    chain.register(ALICE, ALICE)
    chain.register(BOB, BOB)
    with pytest.raises(AlreadyRegistered) as caught:
        chain.register(BOB, ALICE)
    assert caught.value.uid == 1


def test_a_full_subnet_refuses_new_hotkeys(make_chain) -> None:
    chain = make_chain(max_allowed_uids=2)
    chain.register(ALICE, ALICE)
    chain.register(BOB, BOB)
    with pytest.raises(SubnetFull):
        chain.register(CHARLIE, CHARLIE)


def test_stake_accumulates_and_decides_validator_permits(make_chain) -> None:
    chain = make_chain(min_validator_stake=10.0, max_validators=2)
    for key in (ALICE, BOB, CHARLIE, DAVE):
        chain.register(key, key)
    chain.add_stake(ALICE, 5.0)
    chain.add_stake(ALICE, 7.5)
    chain.add_stake(BOB, 50.0)
    chain.add_stake(CHARLIE, 20.0)
    chain.add_stake(DAVE, 9.0)
    graph = chain.metagraph()
    assert graph.stakes == [12.5, 50.0, 20.0, 9.0]
    assert graph.stake_of(ALICE) == 12.5
    assert graph.stake_of(EVE) is None
    # The two largest stakes at or above 10 hold permits; Alice has enough but ranks third.
    assert graph.validator_permits == [False, True, True, False]


def test_stake_needs_a_registered_hotkey_and_a_positive_amount(make_chain) -> None:
    chain = make_chain()
    with pytest.raises(NotRegistered):
        chain.add_stake(ALICE, 1.0)
    chain.register(ALICE, ALICE)
    with pytest.raises(ValueError):
        chain.add_stake(ALICE, -1.0)


def test_commitments_are_read_by_uid_or_hotkey(make_chain, clock: Clock) -> None:
    chain = make_chain()
    chain.register(ALICE, ALICE)
    chain.register(BOB, BOB)
    chain.commit(BOB, "http://127.0.0.1:8001")
    commitment = chain.get_commitment(1)
    assert commitment is not None
    assert (commitment.hotkey, commitment.uid, commitment.data, commitment.block) == (
        BOB,
        1,
        "http://127.0.0.1:8001",
        0,
    )
    assert chain.get_commitment(BOB) == commitment
    assert chain.get_commitment(ALICE) is None
    assert chain.get_commitment(7) is None

    clock.advance_blocks(3)
    chain.commit(BOB, "http://127.0.0.1:9001")
    graph = chain.metagraph()
    assert graph.endpoint_of(1) == "http://127.0.0.1:9001"
    assert graph.commitments[1].block == 3


def test_commitments_need_registration_and_a_sane_size(make_chain) -> None:
    chain = make_chain()
    with pytest.raises(NotRegistered):
        chain.commit(ALICE, "http://x")
    chain.register(ALICE, ALICE)
    with pytest.raises(InvalidCommitment, match="at most 128"):
        chain.commit(ALICE, "http://" + "a" * 200)
    with pytest.raises(InvalidCommitment):
        chain.commit(ALICE, "")


@pytest.fixture
def subnet(make_chain):
    """Validators Alice (300 stake) and Bob (100); miners Charlie (uid 2) and Dave (uid 3)."""
    chain = make_chain(tempo=10, weights_rate_limit=5, min_validator_stake=50.0)
    for key in (ALICE, BOB, CHARLIE, DAVE):
        chain.register(key, key)
    chain.add_stake(ALICE, 300.0)
    chain.add_stake(BOB, 100.0)
    return chain


def test_weights_are_stored_as_u16_and_read_back_as_fractions(subnet: LocalChain) -> None:
    stored = subnet.set_weights(ALICE, [2, 3], [3.0, 1.0])
    assert stored == {2: U16_MAX, 3: round(U16_MAX / 3)}
    assert subnet.raw_weights() == {0: stored}
    assert subnet.weights()[0] == pytest.approx({2: 0.75, 3: 0.25}, abs=1e-5)
    assert subnet.metagraph().neuron(0).last_update == 0


def test_setting_weights_applies_the_max_weight_clip(make_chain) -> None:
    chain = make_chain(max_weight_limit=round(0.4 * U16_MAX), min_validator_stake=1.0)
    for key in (ALICE, BOB, CHARLIE, DAVE):
        chain.register(key, key)
    chain.add_stake(ALICE, 10.0)
    chain.set_weights(ALICE, [1, 2, 3], [0.7, 0.2, 0.1])
    row = chain.weights()[0]
    assert max(row.values()) <= 0.4
    assert row == pytest.approx({1: 0.4, 2: 0.4, 3: 0.2}, abs=1e-4)
    with pytest.raises(InvalidWeights, match="at least 3 uids"):
        chain.set_weights(ALICE, [1, 2], [0.5, 0.5])


def test_weights_need_stake_and_a_permit(subnet: LocalChain) -> None:
    with pytest.raises(NoValidatorPermit, match="needs 50"):
        subnet.set_weights(CHARLIE, [3], [1.0])
    with pytest.raises(NotRegistered):
        subnet.set_weights(EVE, [3], [1.0])
    subnet.update_hyperparameters(max_validators=1)
    with pytest.raises(NoValidatorPermit, match="no validator permit"):
        subnet.set_weights(BOB, [2, 3], [1.0, 1.0])
    # A weight on one's own uid alone needs no permit, as on chain.
    assert subnet.set_weights(BOB, [1], [1.0]) == {1: U16_MAX}


def test_weights_are_rate_limited_in_blocks(subnet: LocalChain, clock: Clock) -> None:
    subnet.set_weights(ALICE, [2], [1.0])
    clock.advance_blocks(3)
    with pytest.raises(RateLimited) as caught:
        subnet.set_weights(ALICE, [3], [1.0])
    assert caught.value.blocks_left == 2
    clock.advance_blocks(2)
    subnet.set_weights(ALICE, [3], [1.0])
    assert subnet.weights()[0] == {3: 1.0}


def test_weights_check_version_key_and_uids(subnet: LocalChain) -> None:
    subnet.update_hyperparameters(weights_version=7)
    with pytest.raises(VersionKeyTooLow):
        subnet.set_weights(ALICE, [2], [1.0], version_key=6)
    with pytest.raises(InvalidWeights, match=r"uids \[9\]"):
        subnet.set_weights(ALICE, [2, 9], [1.0, 1.0], version_key=7)
    with pytest.raises(InvalidWeights, match="all weights are zero"):
        subnet.set_weights(ALICE, [2], [0.0], version_key=7)
    # Refused calls leave no trace: the rate limit has not started.
    assert subnet.set_weights(ALICE, [2], [1.0], version_key=7) == {2: U16_MAX}


def test_emissions_follow_stake_weighted_consensus(subnet: LocalChain, clock: Clock) -> None:
    # Alice (3/4 of validator stake) backs Charlie, Bob backs Dave: consensus pays Charlie.
    subnet.set_weights(ALICE, [2], [1.0])
    subnet.set_weights(BOB, [3], [1.0])
    clock.advance_blocks(10)
    graph = subnet.metagraph()
    per_epoch = 10 * 1.0
    assert [n.incentive for n in graph.neurons] == [0.0, 0.0, 1.0, 0.0]
    assert [n.dividends for n in graph.neurons] == [1.0, 0.0, 0.0, 0.0]
    assert graph.neuron(2).emission == pytest.approx(MINER_SHARE * per_epoch)
    assert graph.neuron(0).emission == pytest.approx((1 - MINER_SHARE) * per_epoch)

    # Bob comes round: both miners share, dividends split 3:1 by stake.
    subnet.set_weights(BOB, [2], [1.0])
    clock.advance_blocks(10)
    graph = subnet.metagraph()
    assert graph.neuron(2).incentive == pytest.approx(1.0)
    assert graph.neuron(0).dividends == pytest.approx(0.75)
    assert graph.neuron(1).dividends == pytest.approx(0.25)


def test_idle_epochs_all_pay_and_totals_add_up(subnet: LocalChain, clock: Clock) -> None:
    subnet.set_weights(ALICE, [2, 3], [1.0, 1.0])
    clock.advance_blocks(35)  # epochs at blocks 10, 20 and 30
    totals = subnet.total_emissions()
    assert totals[2] == pytest.approx(3 * MINER_SHARE * 10 / 2, rel=1e-4)
    assert totals[3] == pytest.approx(3 * MINER_SHARE * 10 / 2, rel=1e-4)
    assert totals[0] == pytest.approx(3 * (1 - MINER_SHARE) * 10)
    info = subnet.epoch_info()
    assert (info.epochs, info.last_epoch_block, info.next_epoch_block) == (3, 30, 40)


def test_an_epoch_uses_the_weights_in_force_at_its_block(subnet: LocalChain, clock: Clock) -> None:
    subnet.set_weights(ALICE, [2], [1.0])
    clock.advance_blocks(12)  # the epoch at block 10 has passed, though nothing has run it
    subnet.set_weights(ALICE, [3], [1.0])
    graph = subnet.metagraph()
    assert graph.neuron(2).incentive == 1.0
    assert graph.neuron(3).incentive == 0.0
    clock.advance_blocks(10)
    assert subnet.metagraph().neuron(3).incentive == 1.0


def test_two_processes_share_one_chain_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite"
    LocalChain(path, 0.01)
    # Each worker says it is ready, then waits for the other, so their registrations
    # really interleave instead of one finishing while the other still imports.
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from dippy_studio.chain import LocalChain
        path, name, other = sys.argv[1:]
        chain = LocalChain(path, create=False)
        Path(path + "." + name).touch()
        while not Path(path + "." + other).exists():
            time.sleep(0.001)
        for i in range(50):
            print(chain.register(f"{name}-{i}", name), flush=True)
            time.sleep(0.001)  # let the other process take the lock in between
        """
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(path), name, other], stdout=subprocess.PIPE, text=True)
        for name, other in (("left", "right"), ("right", "left"))
    ]
    outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0]
    uids = [int(line) for output in outputs for line in output.split()]
    assert sorted(uids) == list(range(100))
    graph = LocalChain(path).metagraph()
    assert len(set(graph.hotkeys)) == 100
    assert graph.block > 0


def test_threads_share_one_chain_object(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "threads.sqlite", 0.01)
    uids: list[int] = []

    def work(name: str) -> None:
        uids.extend(chain.register(f"{name}-{i}", name) for i in range(20))

    threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(uids) == list(range(60))
    chain.close()
    # Closing only drops this process's connections; the chain opens them again on use.
    assert len(chain.metagraph()) == 60


def test_update_hyperparameters_persists(make_chain, tmp_path: Path, clock: Clock) -> None:
    chain = make_chain()
    chain.update_hyperparameters(tempo=99, weights_rate_limit=3)
    again = LocalChain(tmp_path / "chain.sqlite", clock=clock)
    assert again.hyperparameters() == Hyperparameters(tempo=99, weights_rate_limit=3)
    with pytest.raises(ValueError):
        chain.update_hyperparameters(netuid=5)
    with pytest.raises(ChainError, match="other hyperparameters"):
        LocalChain(tmp_path / "chain.sqlite", clock=clock, hyperparameters=Hyperparameters())


def test_a_file_that_is_not_a_chain_is_reported(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.sqlite"
    bogus.write_text("not a database")
    with pytest.raises(ChainError):
        LocalChain(bogus)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE jobs (id INTEGER)")
    with pytest.raises(ChainError, match="not a local chain"):
        LocalChain(other)
    with sqlite3.connect(other) as conn:
        assert [row[0] for row in conn.execute("SELECT name FROM sqlite_master")] == ["jobs"]


def test_genesis_comes_from_the_clock(tmp_path: Path) -> None:
    chain = LocalChain(tmp_path / "c.sqlite", 1.0, Clock(T0))
    assert chain.genesis == T0


def test_a_chain_of_another_version_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    LocalChain(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        conn.execute("DROP TABLE commitments")  # as a later version might have reshaped it
    with pytest.raises(ChainError, match="schema version 2, expected 1"):
        LocalChain(path)
    with sqlite3.connect(path) as conn:
        assert "commitments" not in {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}


def test_a_chain_cut_short_before_its_parameters_were_written_is_completed(tmp_path: Path, clock: Clock) -> None:
    # The tables exist but the first transaction never committed: still a new chain.
    path = tmp_path / "chain.sqlite"
    LocalChain(path, clock=clock).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM meta")
    assert LocalChain(path, 2.0, clock).block_time == 2.0
