"""Per-profile request limits and training defaults: one table that the engine and the
orchestrator both read."""

from __future__ import annotations

import pytest

from dippy_studio.protocol.limits import (
    PROFILE_LIMITS,
    REAL_MODEL_TRAINING,
    UnknownProfile,
    profile_limits,
    training_defaults,
)


def test_every_known_profile_has_limits():
    assert list(PROFILE_LIMITS) == ["tiny", "small", "flux-dev", "flux-schnell"]
    tiny = profile_limits("tiny")
    assert (tiny.min_side, tiny.max_side, tiny.max_steps, tiny.default_steps) == (16, 256, 50, 4)
    schnell = profile_limits("flux-schnell")
    assert (schnell.default_guidance, schnell.max_steps, schnell.max_sequence_length) == (0.0, 16, 256)
    for limits in PROFILE_LIMITS.values():
        assert limits.min_side <= limits.max_side and limits.default_steps <= limits.max_steps


def test_an_unknown_profile_is_a_clear_value_error():
    with pytest.raises(UnknownProfile, match="unknown profile 'flux-pro'; known profiles: tiny, small, flux-dev"):
        profile_limits("flux-pro")
    with pytest.raises(ValueError):
        training_defaults("flux-pro")


def test_training_defaults_per_profile():
    assert training_defaults("tiny") == dict(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32)
    assert training_defaults("flux-dev") == training_defaults("flux-schnell") == REAL_MODEL_TRAINING.as_dict()
    # A fresh dict each time: a caller that fills in options cannot change the table.
    training_defaults("small")["rank"] = 64
    assert training_defaults("small")["rank"] == 8
