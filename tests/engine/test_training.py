"""LoRA training on the tiny profile: determinism, resume, time budget, NaN guard, file format."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef
from dippy_studio.engine.datasets import load_dataset
from dippy_studio.engine.errors import TrainingError
from dippy_studio.engine.lora import read_lora
from dippy_studio.engine.profiles import load_pipeline
from dippy_studio.engine.synthetic_data import write_dataset
from dippy_studio.engine.training import TrainConfig, read_metadata, train_lora

STEPS = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(write_dataset(tmp_path_factory.mktemp("data") / "shapes", "sunset", count=6, size=32))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One short run shared by the read-only tests."""
    out = tmp_path_factory.mktemp("lora") / "shapes.safetensors"
    return train_lora(dataset, out, TrainConfig(trigger="sks", steps=STEPS, seed=7))


def test_training_lowers_the_loss_and_reports_progress(dataset, tmp_path):
    seen = []
    result = train_lora(dataset, tmp_path / "l.safetensors", TrainConfig(steps=60), on_progress=seen.append)
    assert [p.step for p in seen] == list(range(1, 61))
    assert all(p.total == 60 and p.eta is not None and p.eta >= 0 for p in seen)
    assert len(result.losses) == 60 and result.steps == 60 and not result.stopped_early
    assert sum(result.losses[-10:]) / 10 < 0.8 * sum(result.losses[:10]) / 10
    assert result.steps_per_second > 0


def test_same_inputs_give_the_same_bytes(dataset, trained, tmp_path):
    again = train_lora(dataset, tmp_path / "again.safetensors", TrainConfig(trigger="sks", steps=STEPS, seed=7))
    assert again.path.read_bytes() == trained.path.read_bytes()
    assert again.sha256 == trained.sha256
    other_seed = train_lora(dataset, tmp_path / "seed.safetensors", TrainConfig(trigger="sks", steps=STEPS, seed=8))
    assert other_seed.sha256 != trained.sha256


def test_caching_latents_and_text_does_not_change_the_result(dataset, trained, tmp_path):
    uncached = train_lora(
        dataset, tmp_path / "uncached.safetensors", TrainConfig(trigger="sks", steps=STEPS, seed=7), cache=False
    )
    assert uncached.sha256 == trained.sha256


def test_metadata_records_provenance(dataset, trained, tiny_engine):
    meta = read_metadata(trained.path)
    assert meta["dippy.fingerprint"] == tiny_engine.fingerprint
    assert meta["dippy.profile"] == "tiny"
    assert meta["dippy.rank"] == "4" and float(meta["dippy.alpha"]) == 4.0
    assert json.loads(meta["dippy.targets"]) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert meta["dippy.steps"] == str(STEPS)
    assert meta["dippy.seed"] == "7"
    assert meta["dippy.dataset_sha256"] == dataset.sha256
    assert meta["dippy.trigger"] == "sks"
    assert json.loads(meta["lora_adapter_metadata"])["transformer.r"] == 4
    assert meta == trained.metadata | {"format": "pt", "lora_adapter_metadata": meta["lora_adapter_metadata"]}


def test_output_is_a_diffusers_lora_that_stock_flux_loads(trained, tiny_engine):
    lora = read_lora(trained.path)
    keys = sorted(lora.state_dict)
    assert keys[0].startswith("transformer.") and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_k.") for k in keys)

    pipe = load_pipeline(EngineOptions())
    pipe.load_lora_weights(str(trained.path.parent), weight_name=trained.path.name, adapter_name="trained")
    assert "trained" in pipe.get_list_adapters()["transformer"]


def test_engine_and_stock_loading_agree_when_alpha_differs_from_rank(dataset, tmp_path):
    result = train_lora(dataset, tmp_path / "alpha.safetensors", TrainConfig(steps=8, rank=2, alpha=8.0))
    request = GenerationRequest(prompt="a red circle", seed=3, width=32, height=32)

    ours = Engine(EngineOptions())
    with_ours = ours.generate(request.model_copy(update={"loras": [LoraRef(path=result.path)]}))

    stock = Engine(EngineOptions())  # a plain diffusers load from the file, metadata and all
    stock.pipe.load_lora_weights(str(result.path.parent), weight_name=result.path.name, adapter_name="stock")
    with_stock = stock.generate(request)

    base = Engine(EngineOptions()).generate(request)
    assert with_ours.sha256 == with_stock.sha256
    assert with_ours.sha256 != base.sha256


def test_alpha_is_applied_at_the_trained_strength(dataset, tmp_path):
    """The saved file reproduces the trained PEFT model's output, alpha/rank scale included."""
    from dippy_studio.engine import training

    config = TrainConfig(rank=2, alpha=8.0, steps=1)
    run = training._start(config, EngineOptions(), dataset)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in run.params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    pixels = training.pixel_tensor(dataset, 32)[:2]
    encoded = training.encode_dataset(run.pipe, pixels, ["a", "b"], 32)
    noise = torch.randn(tuple(encoded.latents.shape), generator=generator)
    args = (encoded.latents, noise, torch.tensor([0.3, 0.7]), encoded.prompt_embeds, encoded.pooled)
    ids = (encoded.text_ids, encoded.img_ids, 1.0)
    with torch.no_grad():
        trained_loss = training.flow_matching_loss(run.pipe, *args, *ids)
    path = tmp_path / "scaled.safetensors"
    training.write_lora(run, path, training.lora_metadata(run))

    fresh = load_pipeline(EngineOptions())
    fresh.load_lora_weights(str(tmp_path), weight_name=path.name)
    with torch.no_grad():
        loaded_loss = training.flow_matching_loss(fresh, *args, *ids)
        fresh.disable_lora()
        base_loss = training.flow_matching_loss(fresh, *args, *ids)
    torch.testing.assert_close(loaded_loss, trained_loss, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base_loss, trained_loss, rtol=1e-3)


def test_resume_gives_the_same_bytes_as_an_uninterrupted_run(dataset, tmp_path):
    config = TrainConfig(steps=20, seed=1)
    whole = train_lora(dataset, tmp_path / "whole.safetensors", config)

    class Crash(Exception):
        pass

    def crash_at_13(progress):
        if progress.step == 13:
            raise Crash

    out = tmp_path / "part.safetensors"
    with pytest.raises(Crash):
        train_lora(dataset, out, config, checkpoint_every=5, on_progress=crash_at_13)
    checkpoint = tmp_path / "part.ckpt.safetensors"
    assert read_metadata(checkpoint)["dippy.step"] == "10"
    assert not out.exists()

    resumed = train_lora(dataset, out, config, resume=checkpoint)
    assert resumed.steps == 20 and resumed.steps_this_run == 10
    assert out.read_bytes() == whole.path.read_bytes()
    assert resumed.losses == whole.losses


def test_a_finished_run_can_be_extended(dataset, tmp_path):
    longer = train_lora(dataset, tmp_path / "longer.safetensors", TrainConfig(steps=10))
    short = train_lora(dataset, tmp_path / "short.safetensors", TrainConfig(steps=6), checkpoint_every=4)
    assert short.checkpoint is not None and read_metadata(short.checkpoint)["dippy.step"] == "6"
    extended = train_lora(dataset, tmp_path / "extended.safetensors", TrainConfig(steps=10), resume=short.checkpoint)
    assert extended.sha256 == longer.sha256


def test_resume_refuses_a_checkpoint_from_another_run(dataset, tmp_path):
    first = train_lora(dataset, tmp_path / "a.safetensors", TrainConfig(steps=4), checkpoint_every=2)
    with pytest.raises(TrainingError, match=r"different training run.*lr 0\.01 \(now 0\.02\)"):
        train_lora(dataset, tmp_path / "b.safetensors", TrainConfig(steps=4, lr=0.02), resume=first.checkpoint)
    with pytest.raises(TrainingError, match="does not exist"):
        train_lora(dataset, tmp_path / "c.safetensors", TrainConfig(steps=4), resume=tmp_path / "missing.safetensors")
    with pytest.raises(TrainingError, match="not a dippy-studio training checkpoint"):
        train_lora(dataset, tmp_path / "d.safetensors", TrainConfig(steps=4), resume=first.path)


def test_time_budget_stops_early_and_still_writes_a_valid_lora(dataset, tmp_path):
    # The budget covers the whole call (model load and encoding included): give it room for
    # a few steps past the setup this machine needs right now, however busy it is.
    setup = train_lora(dataset, tmp_path / "setup.safetensors", TrainConfig(steps=1)).seconds
    budget = 2 * setup + 0.5
    result = train_lora(
        dataset,
        tmp_path / "budget.safetensors",
        TrainConfig(steps=1_000_000),
        max_seconds=budget,
        checkpoint_every=10**6,
    )
    assert result.stopped_early
    assert 0 < result.steps < 1_000_000
    assert result.seconds < budget + 5.0  # the last step and the file write run past the budget
    meta = read_metadata(result.path)
    assert meta["dippy.steps"] == str(result.steps) and meta["dippy.planned_steps"] == "1000000"
    assert read_metadata(result.checkpoint)["dippy.step"] == str(result.steps)  # can be resumed later
    engine = Engine(EngineOptions())
    image = engine.generate(GenerationRequest(prompt="x", seed=0, loras=[LoraRef(path=result.path)]))
    assert image.sha256 != engine.generate(GenerationRequest(prompt="x", seed=0)).sha256


def test_nan_loss_stops_training_without_writing_a_lora(dataset, tmp_path):
    out = tmp_path / "nan.safetensors"
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step \d+: training diverged"):
        train_lora(dataset, out, TrainConfig(steps=20, lr=1e20))
    assert not out.exists()


def test_targets_are_configurable(dataset, tmp_path):
    result = train_lora(dataset, tmp_path / "t.safetensors", TrainConfig(steps=2, targets=("proj_out", "add_q_proj")))
    with safe_open(result.path, framework="pt") as handle:
        layers = {key.rsplit(".lora_", 1)[0] for key in handle.keys()}  # noqa: SIM118
    assert layers == {
        "transformer.proj_out",
        "transformer.single_transformer_blocks.0.proj_out",
        "transformer.transformer_blocks.0.attn.add_q_proj",
    }
    with pytest.raises(TrainingError, match="do not fit the transformer"):
        train_lora(dataset, tmp_path / "bad.safetensors", TrainConfig(steps=2, targets=("no_such_layer",)))


def test_config_defaults_follow_the_profile():
    tiny = TrainConfig()
    assert (tiny.rank, tiny.alpha, tiny.resolution) == (4, 4.0, 32) and tiny.steps <= 500
    flux = TrainConfig(profile="flux-dev")
    assert (flux.rank, flux.alpha, flux.lr, flux.steps) == (16, 16.0, 1e-4, 1000)
    assert flux.targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert TrainConfig(rank=8).alpha == 8.0  # alpha follows an explicit rank
    assert TrainConfig(rank=8, alpha=2.0).alpha == 2.0
    for bad in ({"resolution": 40}, {"lr": -1.0}, {"profile": "nope"}, {"trigger": "a\nb"}, {"targets": ("a b",)}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_bad_arguments(dataset, tmp_path):
    with pytest.raises(TrainingError, match=r"\.safetensors"):
        train_lora(dataset, tmp_path / "lora.bin", TrainConfig(steps=1))
    with pytest.raises(TrainingError, match="resolution 512 is outside"):
        train_lora(dataset, tmp_path / "l.safetensors", TrainConfig(steps=1, resolution=512))
    with pytest.raises(TrainingError, match="profile"):
        train_lora(dataset, tmp_path / "l.safetensors", TrainConfig(steps=1), options=EngineOptions(profile="small"))


def test_training_from_a_zip_path(tmp_path):
    archive = write_dataset(tmp_path / "shapes.zip", "meadow", count=2, size=32)
    result = train_lora(archive, tmp_path / "z.safetensors", TrainConfig(steps=2))
    assert result.metadata["dippy.dataset_sha256"] == load_dataset(archive).sha256


def test_training_leaves_serving_engines_alone(dataset, tmp_path, tiny_engine):
    request = GenerationRequest(prompt="a lighthouse", seed=1)
    before = tiny_engine.generate(request).sha256
    train_lora(dataset, tmp_path / "x.safetensors", TrainConfig(steps=3))
    assert tiny_engine.generate(request).sha256 == before
    assert torch.get_num_threads() == tiny_engine.options.threads


def test_stock_pipeline_reads_the_file_by_path(trained):
    state = FluxPipeline.lora_state_dict(str(trained.path))
    assert set(state) == set(read_lora(trained.path).state_dict)


def test_lora_files_are_readable_whatever_their_header_length(trained, tmp_path):
    """A header length whose low byte is 0x80 (a pickle's first byte) is still a safetensors file."""
    from dippy_studio.engine.training import write_safetensors

    with safe_open(trained.path, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    path = tmp_path / "odd.safetensors"
    for filler in range(0, 2048, 8):
        write_safetensors(path, tensors, {**trained.metadata, "filler": "x" * filler})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_lora(path).state_dict.keys() == read_lora(trained.path).state_dict.keys()
