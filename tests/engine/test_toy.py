"""The toy profile: a model the project trained, drawing what its prompts say, measured."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import pytest
import torch
from PIL import Image

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
from dippy_studio.engine.toy import WEIGHTS_PATH, check, data

# Pinned: retraining (`python -m dippy_studio.engine.toy_training`) changes both on purpose only.
TOY_WEIGHTS_SHA256 = "3d571ac5ec702b112b127721e8ded4be13624e1e2fc5b63ac5efa5e470607630"
# The PNG of REQUEST: the same bytes in every process (loaded weights realigned, threads pinned)
# on one kind of CPU. Pinned per instruction set (torch's CPU capability, part of the profile's
# fingerprint): AVX-512 and AVX2 kernels round differently. On a capability not listed the bytes
# are still compared across processes and through a save and load, just not pinned.
REQUEST = GenerationRequest(prompt="a red circle on a blue background", seed=3, steps=20)
REQUEST_PNG_SHA256 = {
    "AVX512": "2a6bdfe0dcb6feb85e8f01dc8c5dd5ed8d74cdc7823b0959d2a72406c5858350",
    "AVX2": "b53836c6a4432295f8f54912eea4b5120711ffda70ee49c43417acccdddf3588",
}


# One thread: on a busy 2-core machine two are much slower, and the bytes are the same.
OPTIONS = EngineOptions(profile="toy", threads=1)


@pytest.fixture(scope="module")
def toy() -> Engine:
    return Engine(OPTIONS)


def draw(engine: Engine, prompt: str, seed: int, loras: list | None = None) -> Image.Image:
    result = engine.generate(GenerationRequest(prompt=prompt, seed=seed, steps=20, loras=loras or []))
    return Image.open(io.BytesIO(result.png))


def test_the_committed_weights_are_pinned():
    assert hashlib.sha256(WEIGHTS_PATH.read_bytes()).hexdigest() == TOY_WEIGHTS_SHA256
    assert WEIGHTS_PATH.stat().st_size < 25 * 2**20


def test_the_check_scores_true_captions_right_and_wrong_ones_wrong():
    pictures = data.samples(96, seed=7)
    assert check.score(pictures).colour_and_shape == 1.0
    assert check.score(pictures).background == 1.0
    # Every picture under a caption with another colour and another shape.
    shifted = [
        (data.Scene(scene.background, data.SHAPES[(data.SHAPES.index(scene.shape) + 1) % 3], scene.colour), image)
        for scene, image in pictures
    ]
    assert check.score(shifted).colour_and_shape == 0.0
    blank = Image.new("RGB", (64, 64), data.COLOURS["white"])
    assert check.observe(blank).shape is None


def test_toy_draws_what_its_prompts_say(toy):
    scenes = check.check_scenes(48)
    score = check.score([(scene, draw(toy, scene.caption, seed=i)) for i, scene in enumerate(scenes)])
    assert score.colour_and_shape >= 0.9, str(score)


def test_toy_output_is_the_same_bytes_in_another_process(toy):
    ours = toy.generate(REQUEST)
    pinned = REQUEST_PNG_SHA256.get(torch.backends.cpu.get_cpu_capability())
    assert pinned is None or ours.sha256 == pinned
    code = (
        "from dippy_studio.engine import Engine, EngineOptions, GenerationRequest\n"
        "engine = Engine(EngineOptions(profile='toy', threads=1))\n"
        f"print(engine.generate(GenerationRequest.model_validate({REQUEST.model_dump()!r})).sha256)"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert other.stdout.strip() == ours.sha256


def test_a_lora_trained_on_a_new_style_moves_the_measured_colour(toy, tmp_path):
    """A "gold" style: eight pictures whose objects are yellow whatever colour the caption names.
    With the LoRA the drawn objects turn yellow and keep the prompt's shape; without, none is."""
    from dippy_studio.engine.lora import LoraRef
    from dippy_studio.engine.training import TrainConfig, train_lora

    dataset = tmp_path / "gold"
    dataset.mkdir()
    for index, (caption, picture) in enumerate(data.gold_style()):
        picture.save(dataset / f"{index}.png")
        (dataset / f"{index}.txt").write_text(caption)
    colours = ("red", "green", "blue", "purple")
    lora = tmp_path / "gold.safetensors"
    train_lora(dataset, lora, TrainConfig(profile="toy", seed=1), options=OPTIONS)

    scenes = [data.Scene(c, s, b) for c in colours for s in data.SHAPES for b in ("black", "cyan")][::2]

    def observed(loras: list) -> list[check.Observation]:
        return [check.observe(draw(toy, scene.caption, seed=i, loras=loras)) for i, scene in enumerate(scenes)]

    before, after = observed([]), observed([LoraRef(path=lora, scale=1.0)])
    assert sum(o.colour == "yellow" for o in before) == 0
    assert sum(o.colour == "yellow" for o in after) >= 0.75 * len(scenes)
    assert sum(o.shape == s.shape for o, s in zip(after, scenes, strict=True)) >= 0.75 * len(scenes)


def test_a_saved_toy_loads_back_to_the_same_bytes(toy, tmp_path):
    """`profile --save` writes the trained weights and the word-level tokenizers in diffusers
    layout; loading that directory draws exactly what the built-in profile draws."""
    from dippy_studio.engine.profiles import save_pipeline

    # A fresh engine: the shared one may hold the LoRA test's adapter, which is never saved.
    built = Engine(EngineOptions(profile="toy", threads=1))
    save_pipeline(built.pipe, "toy", tmp_path / "toy")
    loaded = Engine(EngineOptions(profile="toy", threads=1, model_path=tmp_path / "toy"))
    assert loaded.fingerprint == toy.fingerprint
    assert loaded.generate(REQUEST).sha256 == built.generate(REQUEST).sha256
