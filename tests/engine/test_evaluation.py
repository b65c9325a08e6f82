"""LoRA evaluation: held-out flow-matching loss with and without the LoRA, on synthetic styles.

The tiny profile's base model has random weights, so any training first teaches it generic
denoising that helps every dataset a little; what a style LoRA adds on top is specific to
its style. The thresholds below leave wide margins, and every number is deterministic for a
given platform.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dippy_studio.engine import GenerationRequest
from dippy_studio.engine.datasets import load_dataset
from dippy_studio.engine.errors import LoraError, RequestError
from dippy_studio.engine.evaluation import evaluate_lora
from dippy_studio.engine.synthetic_data import write_dataset
from dippy_studio.engine.training import TrainConfig, train_lora


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("styles")
    return {
        "train": load_dataset(write_dataset(root / "train", "sunset", count=16, seed=0, size=32)),
        "same": load_dataset(write_dataset(root / "same", "sunset", count=8, seed=1, size=32)),
        "unrelated": load_dataset(write_dataset(root / "unrelated", "meadow", count=8, seed=1, size=32)),
        "unrelated_zip": write_dataset(root / "unrelated.zip", "meadow", count=8, seed=1, size=32),
    }


@pytest.fixture(scope="module")
def sunset_lora(data, tmp_path_factory) -> Path:
    # Rank 8 and 300 steps (about 5 s): enough capacity to learn the style, not just denoising.
    out = tmp_path_factory.mktemp("lora") / "sunset.safetensors"
    return train_lora(data["train"], out, TrainConfig(trigger="sks", rank=8, steps=300, seed=0)).path


def test_lora_improves_its_own_style_and_not_an_unrelated_one(data, sunset_lora):
    same = evaluate_lora("tiny", sunset_lora, data["same"])
    unrelated = evaluate_lora("tiny", sunset_lora, data["unrelated"])
    # The LoRA lowers its own style's loss by about 70% and an unrelated one's by about a third:
    # the bounds sit well inside both, so the test proves specificity, not a lucky draw.
    assert same.lora_loss < same.base_loss
    assert same.improvement > 0.5
    assert unrelated.improvement < same.improvement - 0.2
    assert unrelated.lora_loss > 1.5 * same.lora_loss
    assert len(same.by_sigma) == 5 and all(lora < base for _, base, lora in same.by_sigma)


def test_evaluation_is_deterministic_and_reads_the_lora_metadata(data, sunset_lora):
    first = evaluate_lora("tiny", sunset_lora, data["same"], seeds=[5, 6])
    second = evaluate_lora("tiny", sunset_lora, data["same"], seeds=[5, 6])
    assert first == second
    assert first.trigger == "sks" and first.resolution == 32 and first.guidance == 1.0
    assert first.images == 8 and first.seeds == (5, 6)
    assert first.lora_fingerprint == first.fingerprint
    assert first.dataset_sha256 == data["same"].sha256
    other_seeds = evaluate_lora("tiny", sunset_lora, data["same"], seeds=[7])
    assert other_seeds.lora_loss != first.lora_loss


def test_a_loaded_engine_evaluates_like_a_fresh_one(data, sunset_lora):
    from dippy_studio.engine import Engine, EngineOptions

    engine = Engine(EngineOptions())
    on_loaded = evaluate_lora(engine, sunset_lora, data["same"], seeds=[3])
    assert on_loaded == evaluate_lora("tiny", sunset_lora, data["same"], seeds=[3])
    assert engine.loras.loaded != [] and engine.generate(GenerationRequest(prompt="x", seed=1, steps=2)).loras == []


def test_base_loss_does_not_depend_on_the_lora_or_batching(data, sunset_lora, tmp_path):
    other = train_lora(data["train"], tmp_path / "other.safetensors", TrainConfig(steps=3)).path
    with_sunset = evaluate_lora("tiny", sunset_lora, data["unrelated_zip"], seeds=[0])
    with_other = evaluate_lora("tiny", other, data["unrelated_zip"], seeds=[0], trigger="sks")
    assert with_sunset.base_loss == with_other.base_loss
    rebatched = evaluate_lora("tiny", sunset_lora, data["unrelated_zip"], seeds=[0], batch_size=3)
    assert rebatched.base_loss == pytest.approx(with_sunset.base_loss, rel=1e-5)


def test_bad_inputs(data, sunset_lora, tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        evaluate_lora("tiny", tmp_path / "missing.safetensors", data["same"])
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"\x80\x04junk")
    with pytest.raises(LoraError, match="pickle"):
        evaluate_lora("tiny", pickle, data["same"])
    with pytest.raises(RequestError, match="at least one seed"):
        evaluate_lora("tiny", sunset_lora, data["same"], seeds=[])
    with pytest.raises(RequestError, match="noise levels"):
        evaluate_lora("tiny", sunset_lora, data["same"], sigmas=[0.0])
