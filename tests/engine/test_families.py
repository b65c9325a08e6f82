"""Model families: every family's tiny profile is deterministic, loads in stock diffusers with the
same pixels, keeps its limits, and applies LoRAs where the family takes them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraError, LoraRef, RequestError
from dippy_studio.engine.families import FAMILIES, get_family
from dippy_studio.engine.images import encode_png
from dippy_studio.engine.lora import lora_fit_problem, read_lora
from dippy_studio.engine.profiles import PROFILES, layer_models, save_pipeline
from dippy_studio.engine.synthetic import write_random_lora
from dippy_studio.protocol.limits import PROFILE_LIMITS, TRAINING_FAMILIES
from helpers import assert_within_one_level

# The built-in tiny profile of each family: what the per-family tests below run.
TINY = {
    "flux": "tiny",
    "sdxl": "tiny-sdxl",
    "zimage": "tiny-zimage",
    "qwen-image": "tiny-qwen-image",
    "flux2": "tiny-flux2",
}
# One thread: the bytes are pinned per thread count either way, and on a shared 2-core machine
# two threads can be many times slower.
THREADS = 1
REQUEST = GenerationRequest(prompt="a red kite over the sea", seed=11, width=64, height=64, steps=3, guidance=4.0)


def _png(color: tuple[int, int, int] | int, mode: str = "RGB") -> bytes:
    image = Image.new(mode, (64, 64), color)
    if mode == "L":
        image.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engines() -> dict[str, Engine]:
    return {family: _engine(profile) for family, profile in TINY.items()}


def _engine(profile: str, **options) -> Engine:
    return Engine(EngineOptions(profile=profile, threads=THREADS, **options))


def test_the_registry_lists_every_family_and_each_has_a_tiny_profile():
    used = {limits.family for limits in PROFILE_LIMITS.values()}
    assert used == set(FAMILIES) == set(TINY)
    for name, family in FAMILIES.items():
        assert get_family(name) is family and family.name == name
        # The torch-free copy the orchestrator reads agrees with the engine's families.
        assert family.trains_loras == (name in TRAINING_FAMILIES)
        assert PROFILES[TINY[name]].builtin is not None
    for spec in PROFILES.values():
        family = spec.model_family
        assert set(spec.tasks) <= set(family.task_classes), spec.name
        assert spec.trains_loras == family.trains_loras
    with pytest.raises(ValueError, match="known families: flux, sdxl, zimage, qwen-image, flux2"):
        get_family("dalle")


@pytest.mark.parametrize("family", sorted(TINY))
def test_two_engines_give_the_same_bytes_for_every_task(engines, family):
    fresh = _engine(TINY[family])
    assert fresh.fingerprint == engines[family].fingerprint
    for task in fresh.tasks:
        if task == "edit" and family == "flux":
            continue  # Kontext: covered by test_edit
        inputs = {"image": _png((200, 40, 30))} if task != "generate" else {}
        if task == "inpaint":
            inputs["mask"] = _png(0, "L")
        request = REQUEST.model_copy(update={"task": task, **inputs})
        first = engines[family].generate(request)
        assert fresh.generate(request).png == first.png, task
        assert first.png.startswith(b"\x89PNG") and Image.open(io.BytesIO(first.png)).size == (64, 64)


_CROSS_PROCESS = """
import json, sys
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
request = GenerationRequest.model_validate_json(sys.argv[1])
print(json.dumps({p: Engine(EngineOptions(profile=p, threads=1)).generate(request).sha256 for p in sys.argv[2:]}))
"""


def test_another_process_gives_the_same_bytes(engines):
    """Weights are seeded per tensor, not drawn from torch's global RNG: a fresh interpreter
    builds the same models and draws the same pixels."""
    profiles = [TINY[family] for family in sorted(TINY)]
    proc = subprocess.run(
        [sys.executable, "-c", _CROSS_PROCESS, REQUEST.model_dump_json(), *profiles],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert theirs == {TINY[family]: engines[family].generate(REQUEST).sha256 for family in sorted(TINY)}


@pytest.mark.parametrize("family", sorted(TINY))
def test_seed_and_prompt_change_the_image(engines, family):
    """The prompt reaches the denoiser (a stand-in tokenizer that lost it would not show in a
    determinism test), and the seed decides the noise."""
    engine = engines[family]
    base = engine.generate(REQUEST).png
    assert engine.generate(REQUEST.model_copy(update={"seed": 12})).png != base
    assert engine.generate(REQUEST.model_copy(update={"prompt": "a blue kite"})).png != base


# The families besides Flux (whose own tests are test_profiles and test_lora), with the stock
# pipelines a user would load their saved directory as.
OTHERS = ("sdxl", "zimage", "qwen-image", "flux2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny profile saved by `save_pipeline` (what `profile --save` writes)."""
    directories = {}
    for family in OTHERS:
        directory = tmp_path_factory.mktemp(TINY[family])
        save_pipeline(_engine(TINY[family]).pipe, TINY[family], directory)
        directories[family] = directory
    return directories


def _stock_pipeline(family: str, directory: Path, task: str = "generate"):
    cls = get_family(family).task_classes[task]
    pipe = cls.from_pretrained(directory, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock(family: str, pipe, request: GenerationRequest, **task_inputs) -> bytes:
    """What a plain diffusers user gets: the stock pipeline call with the request's settings
    (and the profile's sequence length where the pipeline takes one)."""
    if family != "sdxl":
        task_inputs["max_sequence_length"] = PROFILES[TINY[family]].max_sequence_length
    if request.task != "img2img" or family != "sdxl":  # SDXL img2img takes the input's size
        task_inputs.update(height=request.height, width=request.width)
    guidance: float | None = request.guidance
    if family == "qwen-image":  # true classifier-free guidance against a " " negative prompt
        task_inputs.update(true_cfg_scale=guidance, negative_prompt=" " if guidance > 1 else None)
        guidance = None
    with torch.inference_mode():
        image = pipe(
            prompt=request.prompt,  # by name: Flux2KleinPipeline's first parameter is the image
            num_inference_steps=request.steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            **task_inputs,
        ).images[0]
    return encode_png(image)


@pytest.mark.parametrize("family", OTHERS)
def test_a_saved_profile_loads_in_stock_diffusers_with_the_same_pixels(saved, engines, family):
    default_class = get_family(family).default_class.__name__
    assert json.loads((saved[family] / "model_index.json").read_text())["_class_name"] == default_class
    stock = _stock(family, _stock_pipeline(family, saved[family]), REQUEST)
    assert_within_one_level(stock, engines[family].generate(REQUEST).png)

    # An image task: img2img where the family has it, else editing (FLUX.2 [klein]).
    image = _png((30, 160, 90))
    task = "img2img" if "img2img" in engines[family].tasks else "edit"
    strength = {"strength": 0.7} if task == "img2img" else {}
    request = REQUEST.model_copy(update={"task": task, "image": image, **strength})
    pipe = _stock_pipeline(family, saved[family], task)
    stock = _stock(family, pipe, request, image=Image.open(io.BytesIO(image)).convert("RGB"), **strength)
    assert_within_one_level(stock, engines[family].generate(request).png)


@pytest.mark.parametrize("family", OTHERS)
def test_a_saved_directory_gives_the_built_in_fingerprint_and_bytes(saved, engines, family):
    loaded = _engine(TINY[family], model_path=saved[family])
    assert loaded.fingerprint_parts == engines[family].fingerprint_parts
    assert loaded.generate(REQUEST).png == engines[family].generate(REQUEST).png


@pytest.mark.parametrize(
    ("family", "real"),
    [("sdxl", "sdxl"), ("zimage", "z-image"), ("qwen-image", "qwen-image"), ("flux2", "flux2-klein")],
)
def test_the_real_profile_loads_a_local_directory_and_only_that(saved, family, real):
    engine = _engine(real, model_path=saved[family])
    assert type(engine.pipe) is get_family(family).default_class
    assert engine.fingerprint_parts.profile == real and engine.tasks == PROFILES[real].tasks
    with pytest.raises(ValueError, match="--model-path"):
        _engine(real)


@pytest.mark.parametrize("family", sorted(TINY))
def test_limits_are_enforced(engines, family):
    """What the engine refuses is what `protocol.limits` publishes (the orchestrator's 422s)."""
    spec = PROFILES[TINY[family]]
    refused = [
        ({"width": spec.max_side + 16}, f"width {spec.max_side + 16} is outside {spec.min_side}..{spec.max_side}"),
        ({"height": spec.min_side - 16}, f"height {spec.min_side - 16} is outside"),
        ({"steps": spec.max_steps + 1}, f"steps {spec.max_steps + 1} is over {spec.max_steps}"),
    ]
    if spec.min_steps > 1:  # Qwen-Image: one step of its schedule would draw NaN
        refused.append(({"steps": spec.min_steps - 1}, f"steps {spec.min_steps - 1} is under {spec.min_steps}"))
    if get_family(family).denoising_steps(REQUEST.steps, 0.1) < 1:  # SDXL rounds the steps down
        refused.append(({"task": "img2img", "image": _png((1, 2, 3)), "strength": 0.1}, "leaves no denoising step"))
    if "edit" not in spec.tasks:
        refused.append(({"task": "edit", "image": _png((1, 2, 3))}, f"profile {spec.name} does not serve task edit"))
    for update, message in refused:
        with pytest.raises(RequestError, match=message):
            engines[family].generate(REQUEST.model_copy(update=update))
    largest = REQUEST.model_copy(update={"width": spec.max_side, "height": spec.min_side, "steps": spec.min_steps})
    assert Image.open(io.BytesIO(engines[family].generate(largest).png)).size == (spec.max_side, spec.min_side)


@pytest.mark.parametrize("family", OTHERS)
def test_a_lora_changes_the_image_and_matches_stock_loading(engines, saved, tmp_path, family):
    engine = engines[family]
    assert get_family(family).supports_loras
    lora = write_random_lora(engine.pipe, tmp_path / "style.safetensors", seed=3, strength=1.0)
    assert lora_fit_problem(layer_models(TINY[family]), read_lora(lora).state_dict) is None
    base = engine.generate(REQUEST).png
    styled = engine.generate(REQUEST.model_copy(update={"loras": [LoraRef(path=lora)]})).png
    assert styled != base
    # Back to the base model exactly once the LoRA is no longer asked for.
    assert engine.generate(REQUEST).png == base

    pipe = _stock_pipeline(family, saved[family])
    pipe.load_lora_weights(str(lora))
    assert_within_one_level(_stock(family, pipe, REQUEST), styled)


def test_a_lora_of_another_family_is_refused_with_a_reason(engines, tmp_path):
    flux_lora = write_random_lora(engines["flux"].pipe, tmp_path / "flux.safetensors", seed=1)
    state = read_lora(flux_lora).state_dict
    assert "does not fit" in lora_fit_problem(layer_models("tiny-sdxl"), state)
    with pytest.raises(LoraError, match="does not fit"):
        engines["sdxl"].generate(REQUEST.model_copy(update={"loras": [LoraRef(path=flux_lora)]}))
    sdxl_lora = write_random_lora(engines["sdxl"].pipe, tmp_path / "sdxl.safetensors", seed=4)
    assert "does not fit" in lora_fit_problem(layer_models("tiny"), read_lora(sdxl_lora).state_dict)
    assert "does not fit" in lora_fit_problem(layer_models("tiny-zimage"), read_lora(sdxl_lora).state_dict)


@pytest.mark.parametrize("family", OTHERS)
def test_only_flux_trains_loras(engines, tmp_path, family):
    from pydantic import ValidationError

    from dippy_studio.engine.evaluation import evaluate_lora
    from dippy_studio.engine.training import TrainConfig

    assert not get_family(family).trains_loras and not PROFILE_LIMITS[TINY[family]].trains_loras
    with pytest.raises(ValidationError, match="LoRA training runs on Flux profiles only"):
        TrainConfig(profile=TINY[family])
    # The held-out loss that judges a trained LoRA is Flux's objective too.
    lora = write_random_lora(engines[family].pipe, tmp_path / "lora.safetensors", seed=5)
    with pytest.raises(RequestError, match="LoRA evaluation runs on Flux profiles only"):
        evaluate_lora(TINY[family], lora, tmp_path / "no-dataset")


def test_qwen_image_stand_in_tokenizer_counts_the_system_prompt_as_the_real_one(engines):
    """QwenImagePipeline drops its system prompt by token count after encoding; with the
    stand-in tokenizer exactly the system prompt goes, and the user's words stay."""
    from dippy_studio.engine.families.qwen_image import SYSTEM_PROMPT

    pipe = engines["qwen-image"].pipe
    prefix, _, _ = pipe.prompt_template_encode.partition("{}")
    assert prefix == SYSTEM_PROMPT
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    ids = pipe.tokenizer(pipe.prompt_template_encode.format("a red kite")).input_ids
    kept = pipe.tokenizer.decode(ids[pipe.prompt_template_encode_start_idx :])
    assert kept.startswith("a red kite<|im_end|>")
