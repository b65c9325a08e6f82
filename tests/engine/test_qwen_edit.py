"""Qwen-Image-Edit (`tiny-qwen-image-edit`): deterministic, loadable by stock diffusers with the
same pixels, an edit that depends on its input image, and the profile's limits."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageEditPipeline
from PIL import Image

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef, RequestError
from dippy_studio.engine.families.qwen_image import EDIT_SYSTEM_PROMPT, QwenImageProcessor
from dippy_studio.engine.images import encode_png
from dippy_studio.engine.lora import lora_fit_problem, read_lora
from dippy_studio.engine.profiles import PROFILES, layer_models, save_pipeline
from dippy_studio.engine.synthetic import write_random_lora
from helpers import assert_within_one_level, framed_png

PROFILE = "tiny-qwen-image-edit"
# Two steps (the fewest Qwen-Image's schedule allows) with true CFG: the second pass runs too.
REQUEST = GenerationRequest(prompt="make the kite blue", seed=11, width=64, height=64, steps=2, guidance=4.0)


def _edit(image: bytes = framed_png((200, 40, 30)), **update) -> GenerationRequest:
    return REQUEST.model_copy(update={"task": "edit", "image": image, **update})


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineOptions(profile=PROFILE, threads=1))


@pytest.fixture(scope="module")
def edited(engine) -> bytes:
    return engine.generate(_edit()).png


@pytest.fixture(scope="module")
def saved(engine, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(PROFILE)
    save_pipeline(engine.pipe, PROFILE, directory)
    return directory


# The request as JSON, its input image as base64 (bytes do not go into JSON).
_CROSS_PROCESS = """
import base64, sys
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
request = GenerationRequest.model_validate_json(sys.argv[1])
request = request.model_copy(update={"task": "edit", "image": base64.b64decode(sys.argv[2])})
print(Engine(EngineOptions(profile=sys.argv[3], threads=1)).generate(request).sha256)
"""


def test_two_engines_and_another_process_give_the_same_bytes(engine, edited):
    fresh = Engine(EngineOptions(profile=PROFILE, threads=1))
    assert fresh.fingerprint == engine.fingerprint
    assert fresh.generate(_edit()).png == edited
    assert edited.startswith(b"\x89PNG") and Image.open(io.BytesIO(edited)).size == (64, 64)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CROSS_PROCESS,
            REQUEST.model_dump_json(),
            base64.b64encode(framed_png((200, 40, 30))),
            PROFILE,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == hashlib.sha256(edited).hexdigest()


def test_the_edit_depends_on_the_input_image_and_the_prompt(engine, edited):
    """The input reaches the denoiser (as latents) and the text encoder (through the vision tower)."""
    assert engine.generate(_edit(framed_png((30, 60, 200)))).png != edited
    assert engine.generate(_edit(prompt="make the kite green")).png != edited


def test_a_saved_profile_loads_in_stock_diffusers_with_the_same_pixels(saved, edited):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    # The stand-in processor, named by its module so diffusers finds it once it is imported.
    assert index["processor"] == [QwenImageProcessor.__module__, "QwenImageProcessor"]
    assert_within_one_level(_stock(_stock_pipeline(saved), _edit()), edited)


def _stock_pipeline(saved: Path) -> QwenImageEditPipeline:
    pipe = QwenImageEditPipeline.from_pretrained(saved, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock(pipe: QwenImageEditPipeline, request: GenerationRequest) -> bytes:
    with torch.inference_mode():
        image = pipe(
            image=Image.open(io.BytesIO(request.image)).convert("RGB"),
            prompt=request.prompt,
            negative_prompt=" ",
            true_cfg_scale=request.guidance,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            generator=torch.Generator("cpu").manual_seed(request.seed),
            max_sequence_length=PROFILES[PROFILE].max_sequence_length,
        ).images[0]
    return encode_png(image)


def test_a_lora_changes_the_edit_and_matches_stock_loading(engine, saved, edited, tmp_path):
    lora = write_random_lora(engine.pipe, tmp_path / "style.safetensors", seed=3, strength=1.0)
    assert lora_fit_problem(layer_models(PROFILE), read_lora(lora).state_dict) is None
    styled = engine.generate(_edit(loras=[LoraRef(path=lora)])).png
    assert styled != edited
    # Back to the base model exactly once the LoRA is no longer asked for.
    assert engine.generate(_edit()).png == edited

    pipe = _stock_pipeline(saved)
    pipe.load_lora_weights(str(lora))
    assert_within_one_level(_stock(pipe, _edit()), styled)


def test_a_saved_directory_gives_the_built_in_fingerprint_and_bytes(engine, saved, edited):
    loaded = Engine(EngineOptions(profile=PROFILE, model_path=saved, threads=1))
    assert loaded.fingerprint_parts == engine.fingerprint_parts
    assert loaded.generate(_edit()).png == edited


def test_the_real_profile_loads_a_local_directory_and_only_that(engine, saved):
    # float32 asked for: a real profile runs in bfloat16 by default, which would change the weights.
    real = Engine(EngineOptions(profile="qwen-image-edit", model_path=saved, threads=1, dtype="float32"))
    assert type(real.pipe) is QwenImageEditPipeline and real.tasks == ("edit",)
    assert real.fingerprint_parts.weights_sha256 == engine.fingerprint_parts.weights_sha256
    with pytest.raises(ValueError, match="--model-path"):
        Engine(EngineOptions(profile="qwen-image-edit"))


def test_limits_are_enforced(engine):
    spec = PROFILES[PROFILE]
    refused = [
        ({"task": "generate", "image": None}, f"profile {PROFILE} does not serve task generate"),
        ({"width": spec.max_side + 16}, f"width {spec.max_side + 16} is outside {spec.min_side}..{spec.max_side}"),
        ({"steps": spec.min_steps - 1}, f"steps {spec.min_steps - 1} is under {spec.min_steps}"),
        ({"steps": spec.max_steps + 1}, f"steps {spec.max_steps + 1} is over {spec.max_steps}"),
        ({"strength": 0.5}, "task edit takes no strength"),
    ]
    for update, message in refused:
        with pytest.raises(RequestError, match=message):
            engine.generate(_edit(**update))
    widest = _edit(width=spec.max_side, height=spec.min_side)
    assert Image.open(io.BytesIO(engine.generate(widest).png)).size == (spec.max_side, spec.min_side)


def test_the_stand_in_tokenizer_counts_the_edit_system_prompt_as_the_real_one(engine):
    """QwenImageEditPipeline drops its system prompt by count (64 tokens in the real vocabulary);
    with the stand-in exactly that goes, and the image's tokens and the instruction stay."""
    pipe = engine.pipe
    assert pipe.prompt_template_encode.startswith(EDIT_SYSTEM_PROMPT)
    assert len(pipe.tokenizer(EDIT_SYSTEM_PROMPT).input_ids) == pipe.prompt_template_encode_start_idx == 64
    text = pipe.prompt_template_encode.format("make it blue")
    ids = pipe.processor(text=[text], images=Image.new("RGB", (1024, 1024)), return_tensors="pt").input_ids[0]
    kept = pipe.tokenizer.decode(ids[pipe.prompt_template_encode_start_idx :])
    assert kept.startswith("<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>make it blue<|im_end|>")
