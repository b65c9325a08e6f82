"""Nonce stores: first claim wins, entries expire, and worker processes share one file."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
from pathlib import Path

import pytest
from bittensor import http_auth

from dippy_studio.protocol import MemoryNonceStore, NonceStore, Signer, SqliteNonceStore
from dippy_studio.protocol.auth import check_nonce_window
from dippy_studio.protocol.nonces import retention_for

T0 = 1_700_000_000.0
HOTKEY = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
OTHER = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path: Path):
    def make(**kwargs) -> NonceStore:
        if request.param == "memory":
            return MemoryNonceStore(**kwargs)
        return SqliteNonceStore(tmp_path / "nonces.sqlite", **kwargs)

    return make


def test_first_claim_wins(make_store) -> None:
    store = make_store()
    assert store.check_and_store(HOTKEY, 1)
    assert not store.check_and_store(HOTKEY, 1)
    assert store.check_and_store(HOTKEY, 2)
    assert store.check_and_store(OTHER, 1)  # nonces are per hotkey
    assert store.claim(HOTKEY, "epistula:0b7e")
    assert not store.claim(HOTKEY, "epistula:0b7e")
    assert store.claim(HOTKEY, "1")  # a token never collides with btauth nonce 1


def test_entries_expire_after_the_retention(make_store) -> None:
    clock = Clock(T0)
    store = make_store(retention=30, clock=clock)
    assert store.check_and_store(HOTKEY, 1)

    clock.now = T0 + 29
    assert not store.check_and_store(HOTKEY, 1)

    # Expired but not purged yet: claimable again (the verifier's timestamp check is what
    # refuses such an old nonce; the store only has to remember for the window).
    clock.now = T0 + 31
    assert store.check_and_store(HOTKEY, 1)


def test_purge_forgets_old_entries(make_store) -> None:
    clock = Clock(T0)
    store = make_store(retention=30, clock=clock)
    for nonce in range(5):
        store.check_and_store(HOTKEY, nonce)
    clock.now = T0 + 10
    store.check_and_store(HOTKEY, 99)

    clock.now = T0 + 35
    assert store.purge() == 5
    assert store.purge() == 0


def test_claims_purge_as_they_go(tmp_path: Path) -> None:
    clock = Clock(T0)
    path = tmp_path / "nonces.sqlite"
    store = SqliteNonceStore(path, retention=10, clock=clock)
    for nonce in range(100):
        store.check_and_store(HOTKEY, nonce)
    clock.now = T0 + 60
    store.check_and_store(HOTKEY, 1000)
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM seen_nonces").fetchone() == (1,)


def test_sqlite_store_uses_wal_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "nonces.sqlite"
    with SqliteNonceStore(path) as store:
        assert store.check_and_store(HOTKEY, 7)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with SqliteNonceStore(path) as reopened:
        assert not reopened.check_and_store(HOTKEY, 7)


def test_non_positive_retention_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MemoryNonceStore(retention=0)
    with pytest.raises(ValueError):
        SqliteNonceStore(tmp_path / "n.sqlite", retention=-1)


def test_sqlite_store_plugs_into_bittensor_verify(tmp_path: Path, alice: Signer, bob: Signer) -> None:
    store = SqliteNonceStore(tmp_path / "nonces.sqlite")
    headers = http_auth.sign(alice, method="GET", path="/v1/scores", receiver_ss58=bob.ss58_address)

    def verify() -> http_auth.Caller:
        return http_auth.verify(
            headers, b"", method="GET", path="/v1/scores", self_hotkey_ss58=bob.ss58_address, nonce_store=store
        )

    assert verify().hotkey_ss58 == alice.ss58_address
    with pytest.raises(http_auth.ReplayedRequest):
        verify()
    # bittensor reads `retention` and refuses a store that forgets inside its window.
    short = SqliteNonceStore(tmp_path / "short.sqlite", retention=5)
    with pytest.raises(ValueError, match="retention"):
        http_auth.verify(
            headers, b"", method="GET", path="/v1/scores", self_hotkey_ss58=bob.ss58_address, nonce_store=short
        )


@pytest.mark.parametrize(("max_age", "skew"), [(10.0, 2.0), (0.5, 0.0), (300.0, 30.0)])
def test_retention_for_a_window_passes_the_window_check(max_age: float, skew: float) -> None:
    store = MemoryNonceStore(retention=retention_for(max_age, skew))
    check_nonce_window(store, max_age, skew)
    assert store.retention > max_age + skew


def test_threads_sharing_one_store_claim_each_nonce_once(tmp_path: Path) -> None:
    store = SqliteNonceStore(tmp_path / "nonces.sqlite")
    wins: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def work() -> None:
        start.wait()
        mine = [nonce for nonce in range(200) if store.check_and_store(HOTKEY, nonce)]
        with lock:
            wins.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == list(range(200))


# --- several processes ------------------------------------------------------------------

N_NONCES = 300


def _race(path: str, store: SqliteNonceStore | None, start, results) -> None:
    # Each worker opens the file itself, as separate server processes would, unless it
    # inherited a store object through fork.
    store = store or SqliteNonceStore(path)
    start.wait()
    won = [nonce for nonce in range(N_NONCES) if store.check_and_store(HOTKEY, nonce)]
    won_uuids = [i for i in range(N_NONCES) if store.claim(OTHER, f"epistula:{i}")]
    results.put((won, won_uuids))


@pytest.mark.parametrize("inherit", [False, True], ids=["own-store", "inherited-store"])
def test_two_processes_racing_the_same_nonces(tmp_path: Path, inherit: bool) -> None:
    path = str(tmp_path / "nonces.sqlite")
    parent_store = SqliteNonceStore(path) if inherit else None
    if parent_store is not None:
        assert parent_store.check_and_store(HOTKEY, -1)  # the parent has an open connection
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)
    results = context.Queue()
    workers = [context.Process(target=_race, args=(path, parent_store, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0

    (nonces_a, uuids_a), (nonces_b, uuids_b) = outcomes
    # Every nonce was won by exactly one process.
    assert sorted(nonces_a + nonces_b) == list(range(N_NONCES))
    assert sorted(uuids_a + uuids_b) == list(range(N_NONCES))
    if parent_store is not None:
        assert not parent_store.check_and_store(HOTKEY, 0)
