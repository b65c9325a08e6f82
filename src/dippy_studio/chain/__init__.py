"""The chain: one protocol (`Chain`), an embedded `LocalChain`, and `BittensorChain` over the SDK.

`chain.cli` (the `dippy-studio chain` commands) is imported separately so that services
using the chain do not load typer and rich.
"""

from dippy_studio.chain.base import (
    U16_MAX,
    AlreadyRegistered,
    Chain,
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
    RateLimited,
    SubnetFull,
    VersionKeyTooLow,
)
from dippy_studio.chain.bittensor_chain import BittensorChain
from dippy_studio.chain.local import EpochInfo, LocalChain

__all__ = [
    "U16_MAX",
    "AlreadyRegistered",
    "BittensorChain",
    "Chain",
    "ChainError",
    "ChainNotFound",
    "ChainUnavailable",
    "Commitment",
    "EpochInfo",
    "Hyperparameters",
    "InvalidCommitment",
    "InvalidWeights",
    "LocalChain",
    "Metagraph",
    "Neuron",
    "NoValidatorPermit",
    "NotRegistered",
    "RateLimited",
    "SubnetFull",
    "VersionKeyTooLow",
]
