"""FLUX.2 [dev] (`tiny-flux2-dev`): deterministic, loadable by stock diffusers with the same
pixels, generation and reference editing, the real profile from a local directory only, and
the profile's limits."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2Pipeline
from PIL import Image

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef, RequestError
from dippy_studio.engine.families.flux2_mistral import Flux2TextProcessor
from dippy_studio.engine.images import encode_png
from dippy_studio.engine.lora import lora_fit_problem, read_lora
from dippy_studio.engine.profiles import PROFILES, layer_models, save_pipeline
from dippy_studio.engine.synthetic import write_random_lora
from helpers import assert_within_one_level, framed_png

PROFILE = "tiny-flux2-dev"
REQUEST = GenerationRequest(prompt="a red kite over the sea", seed=7, width=64, height=48, steps=3, guidance=4.0)


def _edit(image: bytes = framed_png((200, 40, 30)), **update) -> GenerationRequest:
    return REQUEST.model_copy(update={"task": "edit", "image": image, "height": 64, **update})


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineOptions(profile=PROFILE, threads=1))


@pytest.fixture(scope="module")
def generated(engine) -> bytes:
    return engine.generate(REQUEST).png


@pytest.fixture(scope="module")
def edited(engine) -> bytes:
    return engine.generate(_edit()).png


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(PROFILE)
    save_pipeline(engine.pipe, PROFILE, directory)
    return directory


_CROSS_PROCESS = """
import sys
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
request = GenerationRequest.model_validate_json(sys.argv[1])
print(Engine(EngineOptions(profile=sys.argv[2], threads=1)).generate(request).sha256)
"""


def test_two_engines_and_another_process_give_the_same_bytes(engine, generated):
    assert type(engine.pipe) is Flux2Pipeline and engine.tasks == ("generate", "edit")
    fresh = Engine(EngineOptions(profile=PROFILE, threads=1))
    assert fresh.fingerprint == engine.fingerprint
    assert fresh.generate(REQUEST).png == generated
    assert Image.open(io.BytesIO(generated)).size == (64, 48)
    proc = subprocess.run(
        [sys.executable, "-c", _CROSS_PROCESS, REQUEST.model_dump_json(), PROFILE],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == hashlib.sha256(generated).hexdigest()


def test_the_output_depends_on_the_prompt_the_guidance_and_the_reference_image(engine, generated, edited):
    """The prompt reaches the transformer through Mistral, the guidance through its embedding
    (one pass), the reference image as extra tokens."""
    assert engine.generate(REQUEST.model_copy(update={"prompt": "a blue kite"})).png != generated
    assert engine.generate(REQUEST.model_copy(update={"guidance": 1.5})).png != generated
    assert edited != generated
    assert engine.generate(_edit(framed_png((30, 60, 200)))).png != edited


def _stock(pipe: Flux2Pipeline, request: GenerationRequest) -> bytes:
    image = None if request.image is None else Image.open(io.BytesIO(request.image)).convert("RGB")
    with torch.inference_mode():
        result = pipe(
            image=image,
            prompt=request.prompt,
            guidance_scale=request.guidance,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            max_sequence_length=PROFILES[PROFILE].max_sequence_length,
        ).images[0]
    return encode_png(result)


def test_a_saved_profile_loads_in_stock_diffusers_with_the_same_pixels(saved, generated, edited):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline"
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    # The stand-in processor, named by its module so diffusers finds it once it is imported.
    assert index["tokenizer"] == [Flux2TextProcessor.__module__, "Flux2TextProcessor"]
    pipe = Flux2Pipeline.from_pretrained(saved, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for request, ours in ((REQUEST, generated), (_edit(), edited)):
        assert_within_one_level(_stock(pipe, request), ours)


def test_a_lora_changes_generation_and_editing_and_matches_stock_loading(engine, saved, generated, edited, tmp_path):
    lora = write_random_lora(engine.pipe, tmp_path / "style.safetensors", seed=3, strength=1.0)
    assert lora_fit_problem(layer_models(PROFILE), read_lora(lora).state_dict) is None
    styled = {
        "generate": engine.generate(REQUEST.model_copy(update={"loras": [LoraRef(path=lora)]})).png,
        "edit": engine.generate(_edit(loras=[LoraRef(path=lora)])).png,
    }
    assert styled["generate"] != generated and styled["edit"] != edited
    # Back to the base model exactly once the LoRA is no longer asked for.
    assert engine.generate(REQUEST).png == generated

    pipe = Flux2Pipeline.from_pretrained(saved, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    for request, ours in ((REQUEST, styled["generate"]), (_edit(), styled["edit"])):
        assert_within_one_level(_stock(pipe, request), ours)


def test_a_saved_directory_gives_the_built_in_fingerprint_and_bytes(engine, saved, generated):
    loaded = Engine(EngineOptions(profile=PROFILE, model_path=saved, threads=1))
    assert loaded.fingerprint_parts == engine.fingerprint_parts
    assert loaded.generate(REQUEST).png == generated


def test_the_real_profile_loads_a_local_directory_and_only_that(engine, saved):
    # float32 asked for: a real profile runs in bfloat16 by default, which would change the weights.
    real = Engine(EngineOptions(profile="flux2-dev", model_path=saved, threads=1, dtype="float32"))
    assert type(real.pipe) is Flux2Pipeline and real.tasks == ("generate", "edit")
    assert real.fingerprint_parts.weights_sha256 == engine.fingerprint_parts.weights_sha256
    assert PROFILES["flux2-dev"].default_dtype == "bfloat16"
    with pytest.raises(ValueError, match="--model-path"):
        Engine(EngineOptions(profile="flux2-dev"))


def test_limits_are_enforced(engine):
    spec = PROFILES[PROFILE]
    refused = [
        ({"width": spec.max_side + 16}, f"width {spec.max_side + 16} is outside {spec.min_side}..{spec.max_side}"),
        ({"steps": spec.max_steps + 1}, f"steps {spec.max_steps + 1} is over {spec.max_steps}"),
        (
            {"task": "img2img", "image": framed_png((0, 0, 0)), "strength": 0.5},
            f"profile {PROFILE} does not serve task img2img",
        ),
    ]
    for update, message in refused:
        with pytest.raises(RequestError, match=message):
            engine.generate(REQUEST.model_copy(update=update))
    with pytest.raises(RequestError, match="task edit takes no strength"):
        engine.generate(_edit(strength=0.5))
    # FLUX.2's image processor refuses a reference under 64 px: refused as the request's fault,
    # where a text-to-image request of that size is served.
    with pytest.raises(
        RequestError, match="task edit on profile tiny-flux2-dev needs a width and height of at least 64"
    ):
        engine.generate(_edit(width=64, height=48))
    assert Image.open(io.BytesIO(engine.generate(REQUEST).png)).size == (REQUEST.width, REQUEST.height)
    widest = REQUEST.model_copy(update={"width": spec.max_side, "height": spec.min_side, "steps": 1})
    assert Image.open(io.BytesIO(engine.generate(widest).png)).size == (spec.max_side, spec.min_side)


def test_the_stand_in_processor_formats_prompts_and_images_as_pixtral(engine):
    """Mistral's chat markup around the system message and the prompt, padded to the profile's
    length; an image becomes rows of patch tokens, each row ended by a break, the last by the end."""
    processor = engine.pipe.tokenizer
    messages = [
        [
            {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "a kite"}]},
        ]
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", max_length=64
    )
    text = processor.tokenizer.decode(inputs["input_ids"][0][: int(inputs["attention_mask"][0].sum())])
    assert text == "<s>[SYSTEM_PROMPT]be brief[/SYSTEM_PROMPT][INST]a kite[/INST]"
    assert inputs["input_ids"].shape == (1, 64)
    out = processor(text=["[IMG]a kite"], images=[Image.new("RGB", (32, 16))], return_tensors="pt")
    decoded = processor.tokenizer.decode(out["input_ids"][0])
    assert decoded == "[IMG]" * 4 + "[IMG_BREAK]" + "[IMG]" * 4 + "[IMG_END]a kite"
