"""`LocalChain`: one subnet in one SQLite file, shared safely by several local processes.

It stands in for subtensor on a laptop and in tests: the miner, the orchestrator and the
validators each open the same file and see the same blocks, uids, stake, commitments and
weights.

- Blocks follow wall time: `block = floor((now - genesis) / block_time)`, 12 s by default
  and shorter in tests (or with an injected clock). Nothing has to run for blocks to pass.
- Every operation is one short transaction. WAL mode lets readers and the one writer
  proceed together; `busy_timeout` makes a writer wait for the lock instead of failing.
  Writes take the lock up front (`BEGIN IMMEDIATE`), so read-then-write steps such as
  "next free uid" cannot interleave between processes.
- Weight setting applies the real chain's rules: registration, `weights_version`, the
  minimum stake, a validator permit (the `max_validators` largest stakes at or above
  `min_validator_stake`), unique and existing uids, `weights_rate_limit` in blocks, and
  the conformance of `dippy_studio.chain.conformance` (normalise, max-weight clip, u16).
- Every `tempo` blocks an epoch pays `tempo * emission_per_block` (alpha): half to miners by
  incentive, half to validators by dividends, from the simplified Yuma consensus of
  `dippy_studio.chain.consensus`. (The real chain splits 41% / 41% and gives 18% to the
  subnet owner; emission there is also staked to the hotkey, here it is only counted.)
  Epochs are settled lazily at the start of the next transaction, before its change, so
  each epoch sees the state as it was at its block; idle stretches settle in one step.

What it does not do: signatures (it trusts its callers: one operator, one machine),
deregistration (a full subnet refuses new hotkeys), registration cost, commit-reveal,
commitment rate limits, or per-epoch permit elections.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dippy_studio.chain.conformance as conformance
from dippy_studio.chain.base import (
    MAX_COMMITMENT_BYTES,
    AlreadyRegistered,
    ChainError,
    ChainNotFound,
    ChainUnavailable,
    Commitment,
    Hyperparameters,
    InvalidCommitment,
    InvalidWeights,
    Metagraph,
    Neuron,
    NotRegistered,
    NoValidatorPermit,
    SubnetFull,
    VersionKeyTooLow,
)
from dippy_studio.chain.consensus import run_epoch

__all__ = [
    "DEFAULT_BLOCK_TIME",
    "MINER_SHARE",
    "EpochInfo",
    "LocalChain",
]

DEFAULT_BLOCK_TIME = 12.0
DEFAULT_EMISSION_PER_BLOCK = 1.0
# Share of each epoch's emission that goes to miners; the rest goes to validators.
MINER_SHARE = 0.5
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS neurons (
    uid            INTEGER PRIMARY KEY,
    hotkey         TEXT NOT NULL UNIQUE,
    coldkey        TEXT NOT NULL,
    stake          REAL NOT NULL DEFAULT 0 CHECK (stake >= 0),
    registered_at  INTEGER NOT NULL,
    last_update    INTEGER,
    consensus      REAL NOT NULL DEFAULT 0,
    incentive      REAL NOT NULL DEFAULT 0,
    dividends      REAL NOT NULL DEFAULT 0,
    emission       REAL NOT NULL DEFAULT 0,
    total_emission REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS weights (
    validator_uid INTEGER NOT NULL,
    miner_uid     INTEGER NOT NULL,
    value         INTEGER NOT NULL CHECK (value BETWEEN 1 AND 65535),
    PRIMARY KEY (validator_uid, miner_uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commitments (
    hotkey TEXT PRIMARY KEY,
    data   TEXT NOT NULL,
    block  INTEGER NOT NULL
);
"""

_NEURON_COLUMNS = "uid, hotkey, coldkey, stake, registered_at, last_update, consensus, incentive, dividends, emission"


@dataclass(frozen=True)
class EpochInfo:
    """Where the local chain stands in its epoch cycle."""

    block: int
    epochs: int
    last_epoch_block: int
    next_epoch_block: int
    emission_per_block: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class LocalChain:
    """An embedded chain in the SQLite file `path`; satisfies `dippy_studio.chain.Chain`.

    `block_time` (seconds) and `hyperparameters` are fixed when the file is created
    (defaults: 12 s and `Hyperparameters()`); opening an existing file with different
    explicit values raises `ChainError`. With `create=False` a missing file raises
    `ChainNotFound` instead of starting a new chain. `clock` returns wall time in
    seconds and exists for tests.
    """

    def __init__(
        self,
        path: str | Path,
        block_time: float | None = None,
        clock: Callable[[], float] = time.time,
        *,
        hyperparameters: Hyperparameters | None = None,
        emission_per_block: float | None = None,
        create: bool = True,
        busy_timeout: float = 10.0,
    ):
        self.path = Path(path)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._pid = os.getpid()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self.check_parameters(block_time, emission_per_block)
        if not self.path.exists():
            if not create:
                raise ChainNotFound(f"no local chain at {self.path}")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ChainUnavailable(f"cannot create {self.path.parent}: {error.strerror}") from None
        self._create_schema(
            block_time=block_time or DEFAULT_BLOCK_TIME,
            hyperparameters=hyperparameters or Hyperparameters(),
            emission_per_block=DEFAULT_EMISSION_PER_BLOCK if emission_per_block is None else emission_per_block,
        )
        meta = self._read_meta()
        self.genesis = self._number(meta, "genesis")
        self.block_time = self._number(meta, "block_time")
        if self.block_time <= 0:
            raise self._corrupt(f"its block_time is {self.block_time}")
        self._netuid = self._parse_hyperparameters(meta.get("hyperparameters")).netuid
        for key in ("emission_per_block", "last_epoch_block", "epochs"):
            self._number(meta, key)  # read by every epoch: a bad one is reported now, by name
        if block_time is not None and block_time != self.block_time:
            raise ChainError(f"{self.path} was created with a block time of {self.block_time} s, not {block_time} s")
        if hyperparameters is not None and hyperparameters != self.hyperparameters():
            raise ChainError(
                f"{self.path} exists with other hyperparameters; change them with update_hyperparameters()"
            )
        if emission_per_block is not None and emission_per_block != float(meta["emission_per_block"]):
            raise ChainError(f"{self.path} exists with emission_per_block {meta['emission_per_block']}")

    @staticmethod
    def check_parameters(block_time: float | None, emission_per_block: float | None) -> None:
        """ValueError unless `block_time` (None: the default) is a positive number of seconds and
        `emission_per_block` (None: the default) is a number >= 0."""
        if block_time is not None and not (math.isfinite(block_time) and block_time > 0):
            raise ValueError(f"block_time must be a positive number of seconds, got {block_time}")
        if emission_per_block is not None and not (math.isfinite(emission_per_block) and emission_per_block >= 0):
            raise ValueError(f"emission_per_block must be a number >= 0, got {emission_per_block}")

    def __repr__(self) -> str:
        return f"LocalChain({str(self.path)!r}, block_time={self.block_time})"

    # Reads ------------------------------------------------------------------------

    @property
    def netuid(self) -> int:
        return self._netuid

    def block(self) -> int:
        return self._block_at(self._clock())

    def hyperparameters(self) -> Hyperparameters:
        with self._read() as (conn, _block):
            return self._hyperparameters(conn)

    def metagraph(self) -> Metagraph:
        with self._transaction() as (conn, block):
            hp = self._hyperparameters(conn)
            neurons = self._neurons(conn, hp)
            uid_of = {n.hotkey: n.uid for n in neurons}
            commitments = {
                uid_of[hotkey]: Commitment(hotkey=hotkey, uid=uid_of[hotkey], data=data, block=at)
                for hotkey, data, at in conn.execute("SELECT hotkey, data, block FROM commitments")
                if hotkey in uid_of
            }
            return Metagraph(netuid=hp.netuid, block=block, neurons=tuple(neurons), commitments=commitments)

    def get_commitment(self, who: int | str) -> Commitment | None:
        with self._read() as (conn, _block):
            if isinstance(who, int):
                row = conn.execute("SELECT hotkey FROM neurons WHERE uid = ?", (who,)).fetchone()
                if row is None:
                    return None
                hotkey = row[0]
            else:
                hotkey = who
            found = conn.execute("SELECT data, block FROM commitments WHERE hotkey = ?", (hotkey,)).fetchone()
            if found is None:
                return None
            return Commitment(hotkey=hotkey, uid=self._uid(conn, hotkey), data=found[0], block=found[1])

    def weights(self) -> dict[int, dict[int, float]]:
        with self._read() as (conn, _block):
            return {v: conformance.dequantize(row) for v, row in self._weight_rows(conn).items()}

    def raw_weights(self) -> dict[int, dict[int, int]]:
        """The stored u16 rows, `{validator_uid: {miner_uid: value}}`."""
        with self._read() as (conn, _block):
            return self._weight_rows(conn)

    def total_emissions(self) -> dict[int, float]:
        """Everything each uid has earned since it registered, by uid."""
        with self._transaction() as (conn, _block):
            return dict(conn.execute("SELECT uid, total_emission FROM neurons ORDER BY uid").fetchall())

    def epoch_info(self) -> EpochInfo:
        with self._transaction() as (conn, block):
            meta = self._meta(conn)
            last = int(meta["last_epoch_block"])
            tempo = self._hyperparameters(conn).tempo
            return EpochInfo(
                block=block,
                epochs=int(meta["epochs"]),
                last_epoch_block=last,
                next_epoch_block=last + tempo if tempo else -1,
                emission_per_block=float(meta["emission_per_block"]),
            )

    # Writes -----------------------------------------------------------------------

    def register(self, hotkey: str, coldkey: str) -> int:
        if not hotkey or not coldkey:
            raise ValueError("hotkey and coldkey must be non-empty")
        with self._transaction() as (conn, block):
            existing = self._uid(conn, hotkey)
            if existing is not None:
                raise AlreadyRegistered(hotkey, existing)
            hp = self._hyperparameters(conn)
            count = conn.execute("SELECT COUNT(*) FROM neurons").fetchone()[0]
            if count >= hp.max_allowed_uids:
                raise SubnetFull(f"all {hp.max_allowed_uids} uids are taken on netuid {hp.netuid}")
            # No deregistration, so uids are dense and the next one is the count.
            conn.execute(
                "INSERT INTO neurons (uid, hotkey, coldkey, registered_at) VALUES (?, ?, ?, ?)",
                (count, hotkey, coldkey, block),
            )
            return count

    def add_stake(self, hotkey: str, amount: float) -> None:
        if not (math.isfinite(amount) and amount > 0):
            raise ValueError(f"stake amount must be a positive number, got {amount}")
        with self._transaction() as (conn, _block):
            self._require_uid(conn, hotkey)
            conn.execute("UPDATE neurons SET stake = stake + ? WHERE hotkey = ?", (amount, hotkey))

    def commit(self, hotkey: str, data: str) -> None:
        size = len(data.encode("utf-8"))
        if size == 0:
            raise InvalidCommitment("commitment is empty")
        if size > MAX_COMMITMENT_BYTES:
            raise InvalidCommitment(f"commitment is {size} bytes; the chain accepts at most {MAX_COMMITMENT_BYTES}")
        with self._transaction() as (conn, block):
            self._require_uid(conn, hotkey)
            conn.execute(
                "INSERT INTO commitments (hotkey, data, block) VALUES (?, ?, ?) "
                "ON CONFLICT (hotkey) DO UPDATE SET data = excluded.data, block = excluded.block",
                (hotkey, data, block),
            )

    def set_weights(
        self, hotkey: str, uids: Sequence[int], weights: Sequence[float], *, version_key: int = 0
    ) -> dict[int, int]:
        """Check and store a validator's row, as subtensor's `set_weights` does.

        Raises `NotRegistered`, `VersionKeyTooLow`, `NoValidatorPermit`, `InvalidWeights`
        or `RateLimited`; returns the stored u16 values by uid.
        """
        requested = conformance.pairs(uids, weights)
        with self._transaction() as (conn, block):
            uid = self._require_uid(conn, hotkey)
            hp = self._hyperparameters(conn)
            if version_key < hp.weights_version:
                raise VersionKeyTooLow(
                    f"version_key {version_key} is older than the subnet's weights_version {hp.weights_version}"
                )
            neurons = {n.uid: n for n in self._neurons(conn, hp)}
            me = neurons[uid]
            if me.stake < hp.min_validator_stake:
                raise NoValidatorPermit(
                    f"uid {uid} holds {me.stake:g} stake; setting weights needs {hp.min_validator_stake:g}"
                )
            unknown = sorted(u for u in requested if u not in neurons)
            if unknown:
                raise InvalidWeights(f"uids {unknown} are not registered on netuid {hp.netuid}")
            self_weight = [u for u, w in requested.items() if w > 0] == [uid]
            if not me.validator_permit and not self_weight:
                raise NoValidatorPermit(
                    f"uid {uid} has no validator permit (the {hp.max_validators} largest stakes "
                    f"of at least {hp.min_validator_stake:g} hold one)"
                )
            values = conformance.conform(
                requested,
                max_weight_limit=hp.max_weight_limit,
                min_allowed_weights=hp.min_allowed_weights,
                self_uid=uid,
            )
            # Last: a malformed vector is reported as such whatever the timing.
            conformance.check_rate_limit(me.last_update, block, hp.weights_rate_limit)
            conn.execute("DELETE FROM weights WHERE validator_uid = ?", (uid,))
            conn.executemany(
                "INSERT INTO weights (validator_uid, miner_uid, value) VALUES (?, ?, ?)",
                [(uid, miner, value) for miner, value in sorted(values.items())],
            )
            conn.execute("UPDATE neurons SET last_update = ? WHERE uid = ?", (block, uid))
            return values

    def update_hyperparameters(self, **changes: Any) -> Hyperparameters:
        """Change subnet parameters (what the subnet owner or sudo does on a real chain)."""
        if "netuid" in changes:
            raise ValueError("netuid is fixed when the chain is created")
        with self._transaction() as (conn, _block):
            updated = dataclasses.replace(self._hyperparameters(conn), **changes)
            self._set_meta(conn, "hyperparameters", json.dumps(updated.to_dict()))
            return updated

    # Internals --------------------------------------------------------------------

    def _block_at(self, now: float) -> int:
        return max(0, math.floor((now - self.genesis) / self.block_time))

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use and kept.

        Kept, not reopened per call: when the last connection to a WAL database closes,
        SQLite checkpoints and syncs the file, which made every write cost a disk flush.
        Connections are per thread (sqlite3 objects must not cross threads) and per
        process (one inherited through fork must never be used).
        """
        if os.getpid() != self._pid:
            # Forked child: forget the parent's connections without closing them, since
            # closing could disturb the parent's locks on the same file.
            self._pid = os.getpid()
            self._local = threading.local()
        conn: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if conn is not None:
            return conn
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
            # check_same_thread=False only so that close() may close every thread's
            # connection; each one is otherwise used by the thread that opened it.
            conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as error:
            raise ChainUnavailable(f"cannot open {self.path}: {error}") from None
        self._local.connection = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close the connections this process opened (call when no thread uses the chain)."""
        with self._connections_lock:
            if os.getpid() == self._pid:
                for conn in self._connections:
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    def _create_schema(self, *, block_time: float, hyperparameters: Hyperparameters, emission_per_block: float):
        conn = self._connect()
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                # Someone else's database: adding our tables to it would be vandalism.
                raise ChainError(f"{self.path} is an SQLite database but not a local chain")
            if "meta" in tables:
                # Checked before anything is written: a file of another version keeps its own shape.
                self._check_version(self._meta(conn))
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT COUNT(*) FROM meta").fetchone()[0]:
                # First writer wins: a second process creating the same chain at the same moment
                # keeps the first one's genesis and parameters. A chain that lost some of them is
                # corrupt, and reported as such when they are read, never given new ones.
                conn.execute("COMMIT")
                return
            defaults = {
                "schema_version": str(SCHEMA_VERSION),
                "genesis": repr(self._clock()),
                "block_time": repr(float(block_time)),
                "hyperparameters": json.dumps(hyperparameters.to_dict()),
                "emission_per_block": repr(float(emission_per_block)),
                "last_epoch_block": "0",
                "epochs": "0",
            }
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", defaults.items())
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise ChainUnavailable(f"{self.path} is not a usable chain file: {error}") from None

    def _read_meta(self) -> dict[str, str]:
        try:
            meta = self._meta(self._connect())
        except sqlite3.DatabaseError as error:
            raise ChainUnavailable(f"{self.path} is not a usable chain file: {error}") from None
        self._check_version(meta)
        return meta

    def _check_version(self, meta: dict[str, str]) -> None:
        if meta and meta.get("schema_version") != str(SCHEMA_VERSION):
            raise ChainError(f"{self.path} has schema version {meta.get('schema_version')}, expected {SCHEMA_VERSION}")

    def _corrupt(self, what: str) -> ChainError:
        return ChainError(
            f"{self.path} is corrupt: {what}; restore it from a copy, or start again with `chain init --reset`"
        )

    def _number(self, meta: dict[str, str], key: str) -> float:
        try:
            value = float(meta[key])
        except KeyError:
            raise self._corrupt(f"its {key} is missing") from None
        except ValueError:
            raise self._corrupt(f"its {key} is {meta[key]!r}, not a number") from None
        if not math.isfinite(value):
            raise self._corrupt(f"its {key} is {value}")
        return value

    def _parse_hyperparameters(self, text: str | None) -> Hyperparameters:
        try:
            return Hyperparameters(**json.loads(text or ""))
        except (ValueError, TypeError) as error:
            raise self._corrupt(f"its hyperparameters cannot be read ({error})") from None

    @contextmanager
    def _transaction(self) -> Iterator[tuple[sqlite3.Connection, int]]:
        """One write transaction at the current block, with due epochs settled first."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            # The block is read after the lock is held, so transactions see blocks in order.
            block = self._block_at(self._clock())
            self._settle_epochs(conn, block)
            yield conn, block
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise ChainUnavailable(f"local chain {self.path}: {error}") from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # Reads that do not depend on emissions skip the write lock.
    @contextmanager
    def _read(self) -> Iterator[tuple[sqlite3.Connection, int]]:
        conn = self._connect()
        try:
            yield conn, self.block()
        except sqlite3.Error as error:
            raise ChainUnavailable(f"local chain {self.path}: {error}") from None

    @staticmethod
    def _meta(conn: sqlite3.Connection) -> dict[str, str]:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))

    def _hyperparameters(self, conn: sqlite3.Connection) -> Hyperparameters:
        row = conn.execute("SELECT value FROM meta WHERE key = 'hyperparameters'").fetchone()
        return self._parse_hyperparameters(None if row is None else row[0])

    @staticmethod
    def _uid(conn: sqlite3.Connection, hotkey: str) -> int | None:
        row = conn.execute("SELECT uid FROM neurons WHERE hotkey = ?", (hotkey,)).fetchone()
        return None if row is None else int(row[0])

    def _require_uid(self, conn: sqlite3.Connection, hotkey: str) -> int:
        uid = self._uid(conn, hotkey)
        if uid is None:
            raise NotRegistered(hotkey)
        return uid

    @staticmethod
    def _permits(stakes: dict[int, float], hp: Hyperparameters) -> set[int]:
        eligible = sorted(
            (uid for uid, stake in stakes.items() if stake >= hp.min_validator_stake),
            key=lambda uid: (-stakes[uid], uid),
        )
        return set(eligible[: hp.max_validators])

    def _neurons(self, conn: sqlite3.Connection, hp: Hyperparameters) -> list[Neuron]:
        rows = conn.execute(f"SELECT {_NEURON_COLUMNS} FROM neurons ORDER BY uid").fetchall()
        permits = self._permits({row[0]: row[3] for row in rows}, hp)
        neurons = []
        for uid, hotkey, coldkey, stake, registered_at, last_update, consensus, incentive, dividends, emission in rows:
            neurons.append(
                Neuron(
                    uid=uid,
                    hotkey=hotkey,
                    coldkey=coldkey,
                    stake=stake,
                    validator_permit=uid in permits,
                    registered_at=registered_at,
                    last_update=last_update,
                    consensus=consensus,
                    incentive=incentive,
                    dividends=dividends,
                    emission=emission,
                )
            )
        return neurons

    @staticmethod
    def _weight_rows(conn: sqlite3.Connection) -> dict[int, dict[int, int]]:
        rows: dict[int, dict[int, int]] = {}
        for validator, miner, value in conn.execute(
            "SELECT validator_uid, miner_uid, value FROM weights ORDER BY validator_uid, miner_uid"
        ):
            rows.setdefault(validator, {})[miner] = value
        return rows

    def _settle_epochs(self, conn: sqlite3.Connection, block: int) -> None:
        """Pay every epoch due by `block`. Nothing changed since the last one (all changes
        settle epochs first), so each due epoch pays the same and they settle together."""
        hp = self._hyperparameters(conn)
        if hp.tempo <= 0:
            return
        meta = self._meta(conn)
        last = int(meta["last_epoch_block"])
        due = (block - last) // hp.tempo
        if due <= 0:
            return
        neurons = self._neurons(conn, hp)
        stakes = {n.uid: n.stake for n in neurons if n.validator_permit}
        rows = {v: conformance.dequantize(row) for v, row in self._weight_rows(conn).items()}
        result = run_epoch(stakes, rows)
        per_epoch = hp.tempo * float(meta["emission_per_block"])
        updates = []
        for n in neurons:
            emission = per_epoch * (
                MINER_SHARE * result.incentive.get(n.uid, 0.0) + (1 - MINER_SHARE) * result.dividends.get(n.uid, 0.0)
            )
            updates.append(
                (
                    result.consensus.get(n.uid, 0.0),
                    result.incentive.get(n.uid, 0.0),
                    result.dividends.get(n.uid, 0.0),
                    emission,
                    emission * due,
                    n.uid,
                )
            )
        conn.executemany(
            "UPDATE neurons SET consensus = ?, incentive = ?, dividends = ?, emission = ?, "
            "total_emission = total_emission + ? WHERE uid = ?",
            updates,
        )
        self._set_meta(conn, "last_epoch_block", str(last + due * hp.tempo))
        self._set_meta(conn, "epochs", str(int(meta["epochs"]) + due))
