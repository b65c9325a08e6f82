"""GPU-path options on CPU: the attention backend is a named, validated, fingerprinted profile
option, applied to the denoiser and never switched behind the fingerprint's back."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from PIL import Image
from pydantic import ValidationError
from typer.testing import CliRunner

from dippy_studio.cli import app
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, ProfileError, builtin
from dippy_studio.engine.attention import apply_attention_backend
from dippy_studio.engine.fingerprint import FingerprintParts
from dippy_studio.engine.options import ATTENTION_BACKENDS
from dippy_studio.engine.profiles import save_pipeline
from dippy_studio.miner.settings import MinerSettings
from helpers import assert_within_one_level

REQUEST = GenerationRequest(prompt="a lighthouse at dusk", seed=3, width=64, height=64, steps=4)

# Parts of a GPU profile, and the id the fingerprint code gave them before the attention backend
# option existed (computed with that code): a "native" engine must keep it.
GPU_PARTS = FingerprintParts(
    profile="flux-dev",
    weights_sha256="a" * 64,
    config_sha256="b" * 64,
    dtype="bfloat16",
    device="cuda:NVIDIA H100 80GB HBM3:sm90:cuda12.8",
    threads=2,
    lora_mode="peft-unfused",
    compile=True,
    cpu_capability="AVX512",
    torch="2.13.0",
    diffusers="0.42.1",
    transformers="5.24.0",
    pillow="13.0.0",
    zlib="1.3.1",
)
ID_BEFORE_THE_OPTION = "1b807930ca5eb3ef"


def backends_of(engine: Engine) -> set[object]:
    return {
        m.processor._attention_backend
        for m in engine.pipe.transformer.modules()
        if hasattr(getattr(m, "processor", None), "_attention_backend")
    }


def test_unknown_backend_is_refused_with_the_valid_ones():
    with pytest.raises(ValidationError) as caught:
        EngineOptions(attention_backend="flash_hub")
    message = str(caught.value)
    assert "unknown attention backend 'flash_hub'" in message
    for name in ("native", "_native_math", "flash", "sage"):
        assert name in message


def test_backend_must_fit_device_and_dtype():
    with pytest.raises(ValidationError, match="runs on CUDA only"):
        EngineOptions(attention_backend="flash")
    with pytest.raises(ValidationError, match="needs dtype bfloat16"):
        EngineOptions(device="cuda", attention_backend="_native_flash")
    gpu = EngineOptions(profile="flux-dev", device="cuda", dtype="bfloat16", attention_backend="flash", compile=True)
    assert (gpu.dtype, gpu.attention_backend, gpu.compile) == ("bfloat16", "flash", True)
    assert EngineOptions().attention_backend == "native"


def test_every_listed_backend_is_a_diffusers_backend():
    assert set(ATTENTION_BACKENDS) <= {b.value for b in AttentionBackendName}
    assert not [name for name in ATTENTION_BACKENDS if name.endswith("_hub")]  # they download kernels


def test_native_keeps_the_fingerprints_from_before_the_option():
    assert GPU_PARTS.attention_backend == "native"
    assert GPU_PARTS.id == ID_BEFORE_THE_OPTION
    flash = dataclasses.replace(GPU_PARTS, attention_backend="flash")
    assert flash.id != ID_BEFORE_THE_OPTION
    assert flash.as_dict()["attention_backend"] == "flash"


def test_math_backend_is_applied_and_fingerprinted(tiny_engine):
    math = Engine(EngineOptions(attention_backend="_native_math"))
    assert backends_of(math) == {AttentionBackendName._NATIVE_MATH}
    assert backends_of(tiny_engine) == {AttentionBackendName.NATIVE}
    assert math.fingerprint_parts.attention_backend == "_native_math"
    assert math.fingerprint != tiny_engine.fingerprint
    assert dataclasses.replace(math.fingerprint_parts, attention_backend="native") == tiny_engine.fingerprint_parts
    # On the tiny model the math kernel draws the same image as torch's default CPU kernel: the
    # same bytes on some CPUs, a few channels a level apart on others, whose vector widths order
    # the sums differently. Its own fingerprint keeps them apart.
    assert_within_one_level(math.generate(REQUEST).png, tiny_engine.generate(REQUEST).png)
    # Building it changed no other model: the process-wide default is still native.
    assert _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE


def test_math_backend_on_small_stays_within_one_level():
    """On a larger model the kernels sum in other orders: the bytes may differ (which is why the
    backend is in the fingerprint), by at most 1/255 in a pixel."""
    request = REQUEST.model_copy(update={"width": 128, "height": 128})
    native = Engine(EngineOptions(profile="small")).generate(request).png
    math = Engine(EngineOptions(profile="small", attention_backend="_native_math")).generate(request).png
    a, b = (np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16) for png in (native, math))
    assert np.abs(a - b).max() <= 1


def test_a_process_wide_default_cannot_switch_a_native_engine(tiny_engine, monkeypatch):
    """DIFFUSERS_ATTN_BACKEND (or another library) moves diffusers' process-wide default; an
    engine pins its own backend, so its bytes and fingerprint stay true."""
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", AttentionBackendName._NATIVE_MATH)
    engine = Engine(EngineOptions())
    assert backends_of(engine) == {AttentionBackendName.NATIVE}
    assert engine.fingerprint == tiny_engine.fingerprint
    assert _AttentionBackendRegistry._active_backend == AttentionBackendName._NATIVE_MATH  # left as found


def test_a_model_without_dispatching_attention_refuses_other_backends():
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8,
    )
    apply_attention_backend(unet, "native")  # what it runs anyway
    with pytest.raises(ProfileError, match="only 'native' applies"):
        apply_attention_backend(unet, "_native_math")


def test_cli_and_miner_settings_take_the_backend(monkeypatch):
    runner = CliRunner()
    bad = runner.invoke(app, ["profile", "--attention-backend", "fast"])
    assert bad.exit_code != 0
    assert "unknown attention backend 'fast'" in bad.output and "_native_math" in bad.output
    good = runner.invoke(app, ["profile", "--attention-backend", "_native_math", "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.output)["attention_backend"] == "_native_math"
    monkeypatch.setenv("DIPPY_MINER_ENGINE__ATTENTION_BACKEND", "_native_math")
    assert MinerSettings.load().engine.attention_backend == "_native_math"


def test_real_models_default_to_bfloat16_and_built_ins_to_float32(tmp_path):
    assert EngineOptions(profile="flux-dev").run_dtype == "bfloat16"
    assert EngineOptions(profile="sdxl").run_dtype == "bfloat16"
    assert EngineOptions(profile="tiny").run_dtype == "float32"
    assert EngineOptions(profile="flux-dev", dtype="float32").run_dtype == "float32"
    # A half-precision-only backend fits a real profile's default dtype without saying it.
    assert EngineOptions(profile="flux-dev", device="cuda", attention_backend="flash").run_dtype == "bfloat16"
    # The directory loading path: a tiny Flux saved to disk, served as flux-dev, runs (and is
    # fingerprinted) in bfloat16; from the command line too, where settings merge under flags.
    save_pipeline(builtin.build_pipeline(builtin.TINY), "tiny", tmp_path / "flux")
    engine = Engine(EngineOptions(profile="flux-dev", model_path=tmp_path / "flux"))
    assert engine.fingerprint_parts.dtype == "bfloat16" and engine.pipe.transformer.dtype == torch.bfloat16
    shown = CliRunner().invoke(
        app, ["profile", "--profile", "flux-dev", "--model-path", str(tmp_path / "flux"), "--json"]
    )
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["dtype"] == "bfloat16"
