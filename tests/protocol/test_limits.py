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
    assert list(PROFILE_LIMITS) == [
        "tiny",
        "tiny-kontext",
        "small",
        "toy",
        "flux-dev",
        "flux-schnell",
        "flux-kontext",
        "flux-fill",
        "tiny-sdxl",
        "sdxl",
        "tiny-zimage",
        "z-image",
        "tiny-qwen-image",
        "qwen-image",
        "tiny-qwen-image-edit",
        "qwen-image-edit",
        "tiny-flux2",
        "flux2-klein",
        "tiny-flux2-dev",
        "flux2-dev",
    ]
    tiny = profile_limits("tiny")
    assert (tiny.min_side, tiny.max_side, tiny.max_steps, tiny.default_steps) == (16, 256, 50, 4)
    schnell = profile_limits("flux-schnell")
    assert (schnell.default_guidance, schnell.max_steps, schnell.max_sequence_length) == (0.0, 16, 256)
    for limits in PROFILE_LIMITS.values():
        assert limits.min_side <= limits.max_side and limits.min_steps <= limits.default_steps <= limits.max_steps
    # Every profile names its model family; only Flux trains LoRAs.
    assert {limits.family for limits in PROFILE_LIMITS.values()} == {"flux", "sdxl", "zimage", "qwen-image", "flux2"}
    assert profile_limits("tiny").trains_loras and not profile_limits("sdxl").trains_loras
    qwen = profile_limits("tiny-qwen-image")
    assert qwen.image_problem(64, 64, 1) == "steps 1 is under 2 for profile tiny-qwen-image"


def test_an_unknown_profile_is_a_clear_value_error():
    with pytest.raises(UnknownProfile, match="unknown profile 'flux-pro'; known profiles: tiny, tiny-kontext, small"):
        profile_limits("flux-pro")
    with pytest.raises(ValueError):
        training_defaults("flux-pro")


def test_training_defaults_per_profile():
    assert training_defaults("tiny") == dict(rank=4, alpha=4.0, lr=1e-2, steps=200, batch_size=4, resolution=32)
    assert training_defaults("flux-dev") == training_defaults("flux-schnell") == REAL_MODEL_TRAINING.as_dict()
    # A fresh dict each time: a caller that fills in options cannot change the table.
    training_defaults("small")["rank"] = 64
    assert training_defaults("small")["rank"] == 8


def test_each_profile_says_which_tasks_it_serves():
    assert profile_limits("tiny").tasks == ("generate", "edit", "img2img", "inpaint")
    assert profile_limits("flux-kontext").task_problem("edit") is None
    assert "does not serve task img2img" in (profile_limits("flux-kontext").task_problem("img2img") or "")
    assert profile_limits("flux-fill").tasks == ("inpaint",)


def test_an_image_task_without_a_size_takes_the_inputs_scaled_to_fit():
    tiny = profile_limits("tiny")
    assert tiny.output_size(64, 48) == (64, 48)
    assert tiny.output_size(70, 50) == (64, 48)  # rounded down to multiples of 16
    assert tiny.output_size(1024, 512) == (256, 128)  # scaled to fit, aspect kept
    assert tiny.output_size(4, 4) == (16, 16)  # never under the profile's smallest side


def test_an_image_task_under_the_profiles_input_side_is_refused_where_text_to_image_is_not():
    limits = profile_limits("tiny-flux2")
    assert "needs a width and height of at least 64" in (limits.image_problem(64, 48, 4, "edit") or "")
    assert limits.image_problem(64, 48, 4, "generate") is None
    assert limits.image_problem(64, 64, 4, "edit") is None
