"""Profiles on disk: save in diffusers layout, load with stock diffusers and with --model-path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, ProfileError
from dippy_studio.engine.profiles import get_profile, load_pipeline, save_pipeline
from dippy_studio.engine.synthetic import write_random_lora
from dippy_studio.protocol.limits import PROFILE_LIMITS
from helpers import assert_within_one_level, stock_png

REQUEST = GenerationRequest(prompt="a lighthouse at dusk", seed=3, width=64, height=64, steps=4)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    # A fresh engine: the shared one may hold LoRA adapters from other tests, which cannot be saved.
    directory = tmp_path_factory.mktemp("tiny-model")
    save_pipeline(Engine(EngineOptions(profile="tiny")).pipe, "tiny", directory)
    return directory


def test_a_pipeline_with_loras_loaded_is_not_saved(tmp_path):
    from dippy_studio.engine import LoraRef

    engine = Engine(EngineOptions(profile="tiny"))
    lora = write_random_lora(engine.pipe, tmp_path / "a.safetensors", seed=1)
    engine.generate(REQUEST.model_copy(update={"loras": [LoraRef(path=lora)]}))
    with pytest.raises(ProfileError, match="without LoRA adapters loaded"):
        save_pipeline(engine.pipe, "tiny", tmp_path / "saved")


def test_saved_profile_loads_in_stock_diffusers(tiny_dir, tiny_engine):
    pipe = FluxPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    stock = stock_png(pipe, REQUEST, tiny_engine.spec.max_sequence_length)
    ours = tiny_engine.generate(REQUEST).png
    assert_within_one_level(stock, ours)


def test_model_path_gives_the_same_fingerprint_and_bytes(tiny_dir, tiny_engine):
    loaded = Engine(EngineOptions(profile="tiny", model_path=tiny_dir))
    assert loaded.fingerprint_parts == tiny_engine.fingerprint_parts
    assert loaded.generate(REQUEST).png == tiny_engine.generate(REQUEST).png


def test_fingerprint_tracks_what_decides_bits(tiny_engine):
    base = tiny_engine.fingerprint_parts
    assert Engine(EngineOptions()).fingerprint == tiny_engine.fingerprint  # stable across builds
    assert len(tiny_engine.fingerprint) == 16
    threads = Engine(EngineOptions(threads=1))
    assert threads.fingerprint != base.id and threads.fingerprint_parts.threads == 1
    bf16 = Engine(EngineOptions(dtype="bfloat16"))
    assert bf16.fingerprint != base.id
    assert bf16.fingerprint_parts.weights_sha256 != base.weights_sha256
    for part in ("torch", "diffusers", "cpu_capability", "lora_mode", "device"):
        assert getattr(base, part)


def test_bfloat16_generates(tiny_engine):
    result = Engine(EngineOptions(dtype="bfloat16")).generate(REQUEST)
    assert result.png.startswith(b"\x89PNG")


def test_real_profile_loads_from_a_directory(tmp_path_factory):
    """The flux-dev loading path, exercised with a small Flux-architecture model saved to disk."""
    directory = tmp_path_factory.mktemp("flux-dev-like")
    save_pipeline(load_pipeline(EngineOptions(profile="small")), "small", directory)
    engine = Engine(EngineOptions(profile="flux-dev", model_path=directory, dtype="bfloat16"))
    assert engine.pipe.transformer.dtype == torch.bfloat16
    assert engine.spec.max_sequence_length == 512
    request = GenerationRequest(prompt="a lighthouse", seed=1, width=256, height=256, steps=2)
    assert engine.generate(request).png == engine.generate(request).png


def test_flux_profiles_need_a_model_path():
    with pytest.raises(ProfileError, match="--model-path"):
        Engine(EngineOptions(profile="flux-dev"))


def test_bad_model_paths(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        Engine(EngineOptions(profile="flux-dev", model_path=tmp_path / "missing"))
    with pytest.raises(ProfileError, match="no model_index.json"):
        Engine(EngineOptions(profile="flux-dev", model_path=tmp_path))
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ProfileError, match="could not load"):
        Engine(EngineOptions(profile="flux-dev", model_path=tmp_path))


def test_unknown_profile_and_cuda_without_gpu():
    with pytest.raises(ProfileError, match="unknown profile 'dalle-3'"):
        Engine(EngineOptions(profile="dalle-3"))
    if not torch.cuda.is_available():
        with pytest.raises(ProfileError, match="no CUDA device"):
            Engine(EngineOptions(device="cuda"))


def test_profiles_take_their_limits_from_the_protocol_table():
    for name, limits in PROFILE_LIMITS.items():
        spec = get_profile(name)
        assert (spec.min_side, spec.max_side, spec.max_steps, spec.default_steps, spec.default_guidance) == (
            limits.min_side,
            limits.max_side,
            limits.max_steps,
            limits.default_steps,
            limits.default_guidance,
        )
        # A built-in's text encoder is sized for the sequence length the table promises.
        if spec.builtin is not None:
            assert spec.builtin.max_sequence_length == limits.max_sequence_length
    assert get_profile("tiny").builtin is not None and get_profile("flux-dev").builtin is None
    with pytest.raises(ProfileError, match="known profiles: tiny, tiny-kontext, small"):
        get_profile("flux-pro")
