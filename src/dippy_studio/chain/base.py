"""The chain as every service sees it: one protocol, its value types and its errors.

`LocalChain` (one SQLite file) and `BittensorChain` (the bittensor v11 SDK) both satisfy
`Chain`, so a miner, the orchestrator or a validator never knows which one it talks to.
Amounts (stake, emission) are floats in the subnet's own unit (alpha); weights on chain
are u16 integers, and rows read back are fractions that sum to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "MAX_COMMITMENT_BYTES",
    "U16_MAX",
    "AlreadyRegistered",
    "Chain",
    "ChainError",
    "ChainNotFound",
    "ChainUnavailable",
    "Commitment",
    "Hyperparameters",
    "InvalidCommitment",
    "InvalidWeights",
    "Metagraph",
    "Neuron",
    "NoValidatorPermit",
    "NotRegistered",
    "RateLimited",
    "SubnetFull",
    "VersionKeyTooLow",
]

U16_MAX = 65535
# The chain's Raw commitment field holds at most 128 bytes; `LocalChain` enforces the same
# limit, so an endpoint that works locally also fits on the real chain.
MAX_COMMITMENT_BYTES = 128


class ChainError(Exception):
    """The chain refused an operation or could not be read. The message says why."""


class ChainUnavailable(ChainError):
    """The chain cannot be reached (no node, no network, unreadable file)."""


class ChainNotFound(ChainUnavailable):
    """There is no local chain at the given path (run `dippy-studio chain init`)."""


class NotRegistered(ChainError):
    """The hotkey has no uid on this subnet."""

    def __init__(self, hotkey: str, message: str | None = None):
        super().__init__(message or f"hotkey {hotkey} is not registered on this subnet")
        self.hotkey = hotkey


class AlreadyRegistered(ChainError):
    """The hotkey already holds a uid; `uid` says which."""

    def __init__(self, hotkey: str, uid: int):
        super().__init__(f"hotkey {hotkey} is already registered as uid {uid}")
        self.hotkey = hotkey
        self.uid = uid


class SubnetFull(ChainError):
    """Every uid slot is taken."""


class RateLimited(ChainError):
    """Weights were set too recently; `blocks_left` says how long to wait."""

    def __init__(self, message: str, blocks_left: int):
        super().__init__(message)
        self.blocks_left = blocks_left


class NoValidatorPermit(ChainError):
    """The hotkey may not set weights: no validator permit or too little stake."""


class InvalidWeights(ChainError, ValueError):
    """The weights cannot be set as given (empty, unknown uids, too few, over the max weight)."""


class VersionKeyTooLow(InvalidWeights):
    """The `version_key` is older than the subnet's `weights_version`."""


class InvalidCommitment(ChainError, ValueError):
    """The commitment is empty or larger than the chain accepts."""


@dataclass(frozen=True)
class Hyperparameters:
    """The subnet parameters that decide weight setting and emissions.

    `max_weight_limit` is the raw u16 value the chain stores: after normalisation no
    single weight may exceed `max_weight_limit / 65535` of the row (65535 means no cap).
    `min_validator_stake` is the stake a hotkey needs to set weights (the chain's
    `StakeThreshold`); `max_validators` holders of the most stake get validator permits.
    """

    netuid: int = 1
    tempo: int = 360
    weights_rate_limit: int = 100
    max_weight_limit: int = U16_MAX
    min_allowed_weights: int = 1
    weights_version: int = 0
    max_validators: int = 64
    min_validator_stake: float = 1.0
    immunity_period: int = 5000
    max_allowed_uids: int = 256
    commit_reveal_enabled: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.max_weight_limit <= U16_MAX:
            raise ValueError(f"max_weight_limit must be in 1..{U16_MAX}, got {self.max_weight_limit}")
        for name in ("tempo", "weights_rate_limit", "min_allowed_weights", "weights_version", "max_validators"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_allowed_uids < 1:
            raise ValueError("max_allowed_uids must be >= 1")
        if self.min_validator_stake < 0:
            raise ValueError("min_validator_stake must be >= 0")

    @property
    def max_weight_fraction(self) -> float:
        """The largest share of a row one uid may hold, as a fraction."""
        return self.max_weight_limit / U16_MAX

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Commitment:
    """A hotkey's published data on the subnet (for miners: their endpoint URL)."""

    hotkey: str
    uid: int | None
    data: str
    block: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Neuron:
    """One uid's row of the metagraph.

    `consensus`, `incentive` and `dividends` are the last epoch's shares (0..1);
    `emission` is the uid's emission as the chain reports it (on the local chain: what
    it earned in the last epoch). `last_update` is the block of its last weight setting
    (None if it never set weights).
    """

    uid: int
    hotkey: str
    coldkey: str
    stake: float
    validator_permit: bool
    registered_at: int = 0
    last_update: int | None = None
    consensus: float = 0.0
    incentive: float = 0.0
    dividends: float = 0.0
    emission: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Metagraph:
    """The subnet at one block: neurons ordered by uid, and their commitments."""

    netuid: int
    block: int
    neurons: tuple[Neuron, ...]
    commitments: dict[int, Commitment] = field(default_factory=dict)

    @property
    def uids(self) -> list[int]:
        return [n.uid for n in self.neurons]

    @property
    def hotkeys(self) -> list[str]:
        return [n.hotkey for n in self.neurons]

    @property
    def coldkeys(self) -> list[str]:
        return [n.coldkey for n in self.neurons]

    @property
    def stakes(self) -> list[float]:
        return [n.stake for n in self.neurons]

    @property
    def validator_permits(self) -> list[bool]:
        return [n.validator_permit for n in self.neurons]

    def neuron(self, uid: int) -> Neuron:
        for n in self.neurons:
            if n.uid == uid:
                return n
        raise KeyError(f"no uid {uid} on netuid {self.netuid}")

    def by_hotkey(self, hotkey: str) -> Neuron | None:
        for n in self.neurons:
            if n.hotkey == hotkey:
                return n
        return None

    def uid_of(self, hotkey: str) -> int | None:
        neuron = self.by_hotkey(hotkey)
        return None if neuron is None else neuron.uid

    def stake_of(self, hotkey: str) -> float | None:
        """The hotkey's stake, or None if it is not registered.

        This makes a metagraph a `dippy_studio.protocol.auth.StakeLookup`.
        """
        neuron = self.by_hotkey(hotkey)
        return None if neuron is None else neuron.stake

    def endpoint_of(self, uid: int) -> str | None:
        commitment = self.commitments.get(uid)
        return None if commitment is None else commitment.data

    def __len__(self) -> int:
        return len(self.neurons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "netuid": self.netuid,
            "block": self.block,
            "neurons": [{**n.to_dict(), "commitment": self.endpoint_of(n.uid)} for n in self.neurons],
        }


@runtime_checkable
class Chain(Protocol):
    """What the services need from a chain, local or real.

    Writes name the hotkey that acts. `LocalChain` trusts its caller (a dev chain on
    one machine); `BittensorChain` signs with its wallet and refuses other hotkeys.
    """

    @property
    def netuid(self) -> int: ...

    def block(self) -> int:
        """The current block number."""
        ...

    def hyperparameters(self) -> Hyperparameters: ...

    def metagraph(self) -> Metagraph: ...

    def register(self, hotkey: str, coldkey: str) -> int:
        """Give `hotkey` (owned by `coldkey`) a uid and return it."""
        ...

    def add_stake(self, hotkey: str, amount: float) -> None: ...

    def commit(self, hotkey: str, data: str) -> None:
        """Publish `data` (a miner's endpoint URL) for a registered hotkey."""
        ...

    def get_commitment(self, who: int | str) -> Commitment | None:
        """The commitment of a uid or hotkey, or None."""
        ...

    def set_weights(
        self, hotkey: str, uids: Sequence[int], weights: Sequence[float], *, version_key: int = 0
    ) -> dict[int, int]:
        """Conform and set a validator's weights; returns the u16 values set, by uid."""
        ...

    def weights(self) -> dict[int, dict[int, float]]:
        """Every validator's row as `{validator_uid: {miner_uid: fraction}}`."""
        ...
