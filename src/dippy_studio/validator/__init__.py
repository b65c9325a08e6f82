"""The validator: turns the orchestrator's signed scores into weights on chain.

`weights` holds the pure weight function (win rates, softmax, burn, EMA, conformance).
"""

from dippy_studio.validator.weights import (
    DEFAULT_EMA_ALPHA,
    DEFAULT_TEMPERATURE,
    WeightRound,
    compute_weights,
    drop_reassigned,
    ema,
    next_weights,
    win_rates,
)

__all__ = [
    "DEFAULT_EMA_ALPHA",
    "DEFAULT_TEMPERATURE",
    "WeightRound",
    "compute_weights",
    "drop_reassigned",
    "ema",
    "next_weights",
    "win_rates",
]
