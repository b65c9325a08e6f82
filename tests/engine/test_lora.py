"""LoRAs: formats, scales, the adapter cache, history independence, and refusal of bad files."""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraError, LoraRef
from dippy_studio.engine.synthetic import random_lora_state_dict, write_random_lora
from helpers import stock_png


def request(*loras: LoraRef, seed: int = 7) -> GenerationRequest:
    return GenerationRequest(prompt="a lighthouse at dusk", seed=seed, steps=4, loras=list(loras))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineOptions(profile="tiny", lora_cache_size=3))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, engine) -> Path:
    directory = tmp_path_factory.mktemp("loras")
    for i in range(6):
        write_random_lora(engine.pipe, directory / f"style-{i}.safetensors", seed=100 + i)
    return directory


def lora(lora_dir: Path, i: int, scale: float = 1.0) -> LoraRef:
    return LoraRef(path=lora_dir / f"style-{i}.safetensors", scale=scale)


def base_weights_sha256(engine: Engine) -> str:
    """Hash of the frozen base weights, seen through any PEFT wrappers."""
    digest = hashlib.sha256()
    state = engine.pipe.transformer.state_dict()
    for name in sorted(state):
        if "lora_" in name:
            continue
        digest.update(name.replace("base_layer.", "").encode())
        digest.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_a_lora_changes_the_image_and_scale_matters(engine, lora_dir):
    base = engine.generate(request()).sha256
    full = engine.generate(request(lora(lora_dir, 0))).sha256
    half = engine.generate(request(lora(lora_dir, 0, 0.5))).sha256
    assert len({base, full, half}) == 3
    assert engine.generate(request(lora(lora_dir, 0, 0.0))).sha256 == base


def test_several_loras_on_one_request(engine, lora_dir):
    one = engine.generate(request(lora(lora_dir, 0))).sha256
    two = engine.generate(request(lora(lora_dir, 0), lora(lora_dir, 1, 0.7))).sha256
    assert one != two
    assert engine.generate(request(lora(lora_dir, 0), lora(lora_dir, 1, 0.7))).sha256 == two


def test_result_names_the_loras_by_content_hash(engine, lora_dir):
    result = engine.generate(request(lora(lora_dir, 2, 0.25)))
    expected = hashlib.sha256((lora_dir / "style-2.safetensors").read_bytes()).hexdigest()
    assert result.loras == [{"sha256": expected, "scale": 0.25}]


def test_lora_by_id_from_the_lora_directory(lora_dir):
    engine = Engine(EngineOptions(lora_dir=lora_dir))
    by_id = engine.generate(request(LoraRef(id="style-3"))).sha256
    by_path = engine.generate(request(lora(lora_dir, 3))).sha256
    assert by_id == by_path
    with pytest.raises(LoraError, match="does not exist"):
        engine.generate(request(LoraRef(id="missing")))
    with pytest.raises(ValueError, match="invalid LoRA id"):
        LoraRef(id="../etc/passwd")


def test_cache_switches_without_rereading_files_or_rebuilding(engine, lora_dir):
    pipe = engine.pipe
    for i in range(3):
        engine.generate(request(lora(lora_dir, i)))
    reads = engine.loras.stats.file_reads
    for i in [0, 1, 2, 1, 0, 2]:
        engine.generate(request(lora(lora_dir, i)))
    assert engine.loras.stats.file_reads == reads, "a cached LoRA was read from disk again"
    assert engine.pipe is pipe


def test_cache_evicts_least_recently_used(engine, lora_dir):
    for i in (0, 1, 2):
        engine.generate(request(lora(lora_dir, i)))
    engine.generate(request(lora(lora_dir, 0)))  # 0 is now the most recent; 1 is oldest
    evictions = engine.loras.stats.evictions
    engine.generate(request(lora(lora_dir, 3)))
    assert engine.loras.stats.evictions == evictions + 1
    sha = {i: hashlib.sha256((lora_dir / f"style-{i}.safetensors").read_bytes()).hexdigest() for i in range(4)}
    assert set(engine.loras.loaded) == {sha[0], sha[2], sha[3]}
    assert len(engine.pipe.get_list_adapters()["transformer"]) == 3


def test_a_changed_file_is_read_again(tmp_path):
    engine = Engine(EngineOptions())
    path = write_random_lora(engine.pipe, tmp_path / "l.safetensors", seed=1)
    first = engine.generate(request(LoraRef(path=path))).sha256
    write_random_lora(engine.pipe, path, seed=2)
    assert engine.generate(request(LoraRef(path=path))).sha256 != first


def test_base_weights_are_bit_identical_after_loras(lora_dir):
    engine = Engine(EngineOptions(lora_cache_size=2))
    before_weights = base_weights_sha256(engine)
    before_image = engine.generate(request()).png
    for i in range(5):  # more LoRAs than the cache holds: load, evict, reload
        engine.generate(request(lora(lora_dir, i), lora(lora_dir, (i + 1) % 5, 0.5)))
    assert base_weights_sha256(engine) == before_weights
    assert engine.generate(request()).png == before_image


def test_history_independence(lora_dir):
    """A random stream of LoRA requests leaves every reference hash unchanged."""
    fresh = Engine(EngineOptions(lora_cache_size=3))
    cases = [
        request(),
        request(lora(lora_dir, 0)),
        request(lora(lora_dir, 4, 0.6), lora(lora_dir, 1)),
        request(lora(lora_dir, 2), seed=3),
    ]
    reference = [fresh.generate(case).sha256 for case in cases]

    engine = Engine(EngineOptions(lora_cache_size=3))
    rng = random.Random(1234)
    for _ in range(12):
        picks = rng.sample(range(6), k=rng.randint(0, 3))
        refs = [lora(lora_dir, i, round(rng.uniform(-1.0, 1.5), 2)) for i in picks]
        engine.generate(request(*refs, seed=rng.randrange(1000)))
    assert [engine.generate(case).sha256 for case in reversed(cases)] == list(reversed(reference))


def test_kohya_format_is_converted(tmp_path, engine):
    """A kohya/sd-scripts LoRA gives the same image as the same weights in diffusers format."""
    generator = torch.Generator().manual_seed(5)
    rank = 4
    kohya: dict[str, torch.Tensor] = {}
    diffusers: dict[str, torch.Tensor] = {}
    for kohya_name, module_name, (out_f, in_f) in [
        ("lora_unet_double_blocks_0_img_attn_proj", "transformer_blocks.0.attn.to_out.0", (32, 32)),
        ("lora_unet_double_blocks_0_img_mlp_0", "transformer_blocks.0.ff.net.0.proj", (128, 32)),
    ]:
        down = torch.randn(rank, in_f, generator=generator) * 0.2
        up = torch.randn(out_f, rank, generator=generator) * 0.2
        kohya[f"{kohya_name}.lora_down.weight"] = down
        kohya[f"{kohya_name}.lora_up.weight"] = up
        kohya[f"{kohya_name}.alpha"] = torch.tensor(float(rank))  # alpha == rank: scale 1
        diffusers[f"transformer.{module_name}.lora_A.weight"] = down.clone()
        diffusers[f"transformer.{module_name}.lora_B.weight"] = up.clone()
    save_file(kohya, tmp_path / "kohya.safetensors")
    save_file(diffusers, tmp_path / "diffusers.safetensors")
    via_kohya = engine.generate(request(LoraRef(path=tmp_path / "kohya.safetensors"))).sha256
    via_diffusers = engine.generate(request(LoraRef(path=tmp_path / "diffusers.safetensors"))).sha256
    assert via_kohya == via_diffusers
    assert via_kohya != engine.generate(request()).sha256


def test_matches_stock_load_lora_weights(lora_dir):
    """Our cached adapters give the same bytes as a stock FluxPipeline loading the file itself."""
    from dippy_studio.engine.builtin import TINY, build_pipeline

    path = lora_dir / "style-5.safetensors"
    req = request(LoraRef(path=path, scale=0.8))
    pipe = build_pipeline(TINY)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="stock")
    pipe.set_adapters(["stock"], adapter_weights=[0.8])
    stock = stock_png(pipe, req, TINY.max_sequence_length)
    assert Engine(EngineOptions()).generate(req).png == stock


def test_a_third_party_lora_is_served_at_the_alpha_its_header_records(tmp_path):
    """Diffusers/PEFT trainers record alpha in the header (`lora_adapter_metadata`) instead of
    baking it into the weights: alpha 4 x rank must give stock diffusers' bytes, not alpha = rank."""
    from diffusers import FluxPipeline

    from dippy_studio.engine.builtin import TINY, build_pipeline
    from dippy_studio.engine.synthetic import random_lora_state_dict
    from dippy_studio.engine.training import DEFAULT_TARGETS

    pipe = build_pipeline(TINY)
    pipe.set_progress_bar_config(disable=True)
    layers = random_lora_state_dict(pipe.transformer, seed=21, rank=4, strength=0.25)
    config = {"r": 4, "lora_alpha": 16, "target_modules": list(DEFAULT_TARGETS)}
    FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=config,
        weight_name="alpha.safetensors",
    )
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers, weight_name="plain.safetensors")
    req = request(LoraRef(path=tmp_path / "alpha.safetensors"))

    pipe.load_lora_weights(str(tmp_path / "alpha.safetensors"), adapter_name="stock")
    stock = stock_png(pipe, req, TINY.max_sequence_length)
    engine = Engine(EngineOptions())
    assert engine.generate(req).png == stock
    assert engine.generate(request(LoraRef(path=tmp_path / "plain.safetensors"))).png != stock


def test_a_garbled_adapter_config_is_refused(engine, tmp_path):
    from dippy_studio.engine.lora import read_lora

    path = tmp_path / "garbled.safetensors"
    save_file(_good_state(engine), str(path), metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(LoraError, match="not valid JSON"):
        read_lora(path)


# --- bad LoRA files -------------------------------------------------------------------------


def _good_state(engine: Engine) -> dict[str, torch.Tensor]:
    layers = random_lora_state_dict(engine.pipe.transformer, seed=9)
    return {f"transformer.{k}": v for k, v in layers.items()}


def test_missing_file(engine, tmp_path):
    with pytest.raises(LoraError, match="does not exist"):
        engine.generate(request(LoraRef(path=tmp_path / "nope.safetensors")))


def test_directory_instead_of_file(engine, tmp_path):
    with pytest.raises(LoraError, match="not a file"):
        engine.generate(request(LoraRef(path=tmp_path)))


def test_garbage_bytes(engine, tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"this is not a tensor file at all")
    with pytest.raises(LoraError, match="not a safetensors file"):
        engine.generate(request(LoraRef(path=path)))


def test_truncated_safetensors(engine, tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(_good_state(engine), good)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(LoraError, match="not a valid safetensors file"):
        engine.generate(request(LoraRef(path=path)))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickle_suffixes_are_refused(engine, tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save(_good_state(engine), path)
    with pytest.raises(LoraError, match="pickle"):
        engine.generate(request(LoraRef(path=path)))


def test_pickle_content_under_a_safetensors_name_is_refused(engine, tmp_path):
    path = tmp_path / "sneaky.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(LoraError, match="pickle"):
        engine.generate(request(LoraRef(path=path)))
    torch.save(_good_state(engine), path)  # torch.save writes a zip of pickles
    with pytest.raises(LoraError, match="pickle"):
        engine.generate(request(LoraRef(path=path)))


def test_wrong_keys(engine, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"transformer.no_such_block.to_q.lora_A.weight": torch.zeros(4, 32)}, path)
    with pytest.raises(LoraError, match="targets no layer"):
        engine.generate(request(LoraRef(path=path)))
    save_file({"model.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(LoraError, match="no LoRA weights|not a Flux LoRA|unexpected key"):
        engine.generate(request(LoraRef(path=path)))


def test_wrong_shapes(engine, tmp_path):
    state = _good_state(engine)
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(4, 48)  # the layer takes 32 inputs
    path = tmp_path / "shapes.safetensors"
    save_file(state, path)
    with pytest.raises(LoraError, match="does not fit this profile"):
        engine.generate(request(LoraRef(path=path)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(engine, tmp_path, bad):
    state = _good_state(engine)
    key = next(iter(state))
    state[key] = state[key].clone()
    state[key][0, 0] = bad
    path = tmp_path / "nan.safetensors"
    save_file(state, path)
    with pytest.raises(LoraError, match="NaN or Inf"):
        engine.generate(request(LoraRef(path=path)))


def test_bad_lora_leaves_the_engine_working(engine, tmp_path, lora_dir):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"junk" * 10)
    before = engine.generate(request(lora(lora_dir, 0))).sha256
    with pytest.raises(LoraError):
        engine.generate(request(lora(lora_dir, 1), LoraRef(path=path)))
    assert engine.generate(request(lora(lora_dir, 0))).sha256 == before
