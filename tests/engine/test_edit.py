"""Image tasks in the engine: edit (Kontext), img2img, inpaint (and Fill): determinism, that the
input matters, LoRAs, agreement with stock diffusers, and a clear refusal for every bad input."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxKontextPipeline
from PIL import Image
from pydantic import ValidationError

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, ProfileError, RequestError, builtin
from dippy_studio.engine.images import encode_png
from dippy_studio.engine.inputs import fit_to
from dippy_studio.engine.lora import LoraRef
from dippy_studio.engine.profiles import fill_in_channels, save_pipeline
from dippy_studio.engine.synthetic import write_random_lora
from helpers import assert_within_one_level

SIZE = 32


def png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def noise_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def half_mask(size: tuple[int, int] = (40, 48)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[: size[1] // 2] = 255
    return Image.fromarray(mask)


IMAGE = png(noise_image(1))
OTHER = png(noise_image(2))
MASK = png(half_mask())


def request(task: str, **overrides: object) -> GenerationRequest:
    fields: dict[str, object] = dict(prompt="make the sky red", seed=5, width=SIZE, height=SIZE, steps=2, task=task)
    if task != "generate":
        fields["image"] = IMAGE
    if task == "inpaint":
        fields["mask"] = MASK
    return GenerationRequest(**{**fields, **overrides})


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)


@pytest.fixture(scope="module")
def kontext_engine() -> Engine:
    return Engine(EngineOptions(profile="tiny-kontext"))


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> Path:
    # A fresh engine: a shared one may hold cached LoRA adapters, which would be saved too.
    directory = tmp_path_factory.mktemp("tiny-kontext")
    save_pipeline(Engine(EngineOptions(profile="tiny-kontext")).pipe, "tiny-kontext", directory)
    return directory


def test_profiles_serve_their_tasks(tiny_engine, kontext_engine):
    assert tiny_engine.tasks == ("generate", "edit", "img2img", "inpaint")
    assert set(kontext_engine.tasks) == {"edit", "generate"}
    assert isinstance(kontext_engine.pipe, FluxKontextPipeline)
    # Every task's pipeline runs the very same models.
    for pipe in tiny_engine.pipelines.values():
        assert pipe.transformer is tiny_engine.pipe.transformer and pipe.vae is tiny_engine.pipe.vae


def test_tiny_kontext_is_its_own_fingerprint(tiny_engine, kontext_engine):
    assert kontext_engine.fingerprint != tiny_engine.fingerprint
    assert kontext_engine.fingerprint_parts.weights_sha256 != tiny_engine.fingerprint_parts.weights_sha256
    assert Engine(EngineOptions(profile="tiny-kontext")).fingerprint == kontext_engine.fingerprint


@pytest.mark.parametrize("task", ["edit", "img2img", "inpaint"])
def test_each_task_is_deterministic_at_the_requested_size(tiny_engine, task):
    first = tiny_engine.generate(request(task, width=48, height=32))
    again = tiny_engine.generate(request(task, width=48, height=32))
    assert first.png == again.png
    assert Image.open(io.BytesIO(first.png)).size == (48, 32)
    assert set(first.timings.as_dict()) >= {"load", "text_encode", "denoise", "decode", "encode"}
    assert first.png != tiny_engine.generate(request(task, width=48, height=32, seed=6)).png


@pytest.mark.parametrize(("profile", "task"), [("tiny-kontext", "edit"), ("tiny", "edit"), ("tiny", "inpaint")])
def test_the_output_depends_on_the_input_image(tiny_engine, kontext_engine, profile, task):
    engine = kontext_engine if profile == "tiny-kontext" else tiny_engine
    assert engine.generate(request(task)).png != engine.generate(request(task, image=OTHER)).png


def test_img2img_follows_its_input_less_as_strength_rises(tiny_engine):
    """Strength decides how much of the input survives: at 0.1 another input changes the output
    a lot, at 1.0 (pure noise to start from) not at all. (Pixel distance to the input itself says
    little here: tiny's random VAE does not reconstruct images.)"""

    def input_effect(strength: float) -> float:
        a = tiny_engine.generate(request("img2img", steps=4, strength=strength))
        b = tiny_engine.generate(request("img2img", steps=4, strength=strength, image=OTHER))
        return float(np.abs(pixels(a.png) - pixels(b.png)).mean())

    low, high, full = input_effect(0.1), input_effect(0.5), input_effect(1.0)
    assert low > high > full
    assert full == 0.0 and low > 5


def test_inpaint_depends_on_the_mask(tiny_engine):
    other_mask = png(half_mask().transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    assert tiny_engine.generate(request("inpaint")).png != tiny_engine.generate(request("inpaint", mask=other_mask)).png


def test_a_mask_of_the_output_size_is_taken_as_is(tiny_engine):
    resized = png(fit_to(half_mask(), (SIZE, SIZE)))
    assert tiny_engine.generate(request("inpaint", mask=resized)).png


def test_loras_apply_to_edits(tmp_path, kontext_engine):
    lora = write_random_lora(kontext_engine.pipe, tmp_path / "style.safetensors", seed=9, strength=2.0)
    plain = kontext_engine.generate(request("edit")).png
    styled = kontext_engine.generate(request("edit", loras=[LoraRef(path=lora)])).png
    assert styled != plain
    assert kontext_engine.generate(request("edit")).png == plain


def test_edit_matches_stock_kontext_from_a_saved_profile(kontext_dir, kontext_engine):
    """`profile --save` output loads in stock FluxKontextPipeline and edits alike (the input
    given already at the output size, with Kontext's resizing off, as the engine runs it)."""
    pipe = FluxKontextPipeline.from_pretrained(kontext_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ask = request("edit", width=48, height=32)
    with torch.inference_mode():
        image = pipe(
            image=fit_to(noise_image(1), (48, 32)),
            prompt=ask.prompt,
            height=ask.height,
            width=ask.width,
            max_area=ask.width * ask.height,
            _auto_resize=False,
            num_inference_steps=ask.steps,
            guidance_scale=ask.guidance,
            generator=torch.Generator("cpu").manual_seed(ask.seed),
            max_sequence_length=kontext_engine.spec.max_sequence_length,
        ).images[0]
    stock, ours = encode_png(image), kontext_engine.generate(ask).png
    assert_within_one_level(stock, ours)
    loaded = Engine(EngineOptions(profile="tiny-kontext", model_path=kontext_dir))
    assert loaded.fingerprint == kontext_engine.fingerprint
    assert loaded.generate(ask).png == ours


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_img2img_and_inpaint_match_stock_diffusers(tiny_engine, task):
    cls = FluxImg2ImgPipeline if task == "img2img" else FluxInpaintPipeline
    pipe = cls(**{k: v for k, v in tiny_engine.pipe.components.items()})
    pipe.set_progress_bar_config(disable=True)
    ask = request(task, steps=4, strength=0.6)
    extra = {"mask_image": fit_to(half_mask(), (SIZE, SIZE))} if task == "inpaint" else {}
    with torch.inference_mode():
        image = pipe(
            image=fit_to(noise_image(1), (SIZE, SIZE)),
            prompt=ask.prompt,
            height=ask.height,
            width=ask.width,
            strength=0.6,
            num_inference_steps=ask.steps,
            guidance_scale=ask.guidance,
            generator=torch.Generator("cpu").manual_seed(ask.seed),
            max_sequence_length=tiny_engine.spec.max_sequence_length,
            **extra,
        ).images[0]
    assert encode_png(image) == tiny_engine.generate(ask).png


def animated(format: str) -> bytes:
    frames = [noise_image(i, (16, 16)) for i in range(2)]
    return png(frames[0], format=format, save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": b"not an image"}, "not a PNG, JPEG or WebP"),
        ({"image": animated("WEBP")}, "animated"),
        ({"image": animated("GIF")}, "not a PNG, JPEG or WebP"),
        ({"image": png(Image.new("RGB", (1025, 1024)))}, "over this model's"),
        ({"mask": png(half_mask((32, 16)))}, "must be the image's size"),
        ({"mask": b"\x89PNG broken"}, "mask"),
        ({"image": None}, "needs input image"),
        ({"mask": None}, "needs mask"),
        ({"strength": 1e-300}, "leaves no denoising step"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(tiny_engine, overrides, message):
    with pytest.raises(RequestError, match=message):
        tiny_engine.generate(request("inpaint", **overrides))


@pytest.mark.parametrize(
    ("task", "overrides", "message"),
    [
        ("edit", {"mask": MASK}, "takes no mask"),
        ("edit", {"strength": 0.5}, "takes no strength"),
        ("generate", {"image": IMAGE}, "takes no input image"),
        ("img2img", {}, "does not serve task img2img"),
    ],
)
def test_inputs_that_do_not_fit_the_task_are_refused(kontext_engine, task, overrides, message):
    with pytest.raises(RequestError, match=message):
        kontext_engine.generate(request(task, **overrides))


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, float("nan")])
def test_strength_outside_zero_to_one_is_invalid(strength):
    with pytest.raises(ValidationError, match="strength"):
        request("img2img", strength=strength)


# FLUX.1 Fill at the smallest size the flux-fill profile serves (256): tiny's transformer with a
# 3-level VAE keeps it to 1024 tokens, and the wider input of a Fill transformer.
def _tiny_fill_config() -> builtin.BuiltinConfig:
    vae = {**builtin.TINY.vae, "block_out_channels": (4, 4, 4)}
    vae.update(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    transformer = {**builtin.TINY.transformer, "in_channels": 1 * 4 * 2 + 4**2 * 4, "out_channels": 4}
    return dataclasses.replace(builtin.TINY, vae=vae, transformer=transformer)


def test_flux_fill_inpaints_from_a_fill_directory(tmp_path):
    pipe = builtin.build_pipeline(_tiny_fill_config(), FluxFillPipeline)
    assert pipe.transformer.config.in_channels == fill_in_channels(pipe)
    save_pipeline(pipe, "flux-fill", tmp_path / "fill")
    engine = Engine(EngineOptions(profile="flux-fill", model_path=tmp_path / "fill"))
    assert engine.tasks == ("inpaint",) and isinstance(engine.pipelines["inpaint"], FluxFillPipeline)
    ask = request(
        "inpaint",
        width=256,
        height=256,
        steps=1,
        image=png(noise_image(1, (256, 256))),
        mask=png(half_mask((256, 256))),
    )
    first = engine.generate(ask)
    assert first.png == engine.generate(ask).png
    assert Image.open(io.BytesIO(first.png)).size == (256, 256)
    with pytest.raises(RequestError, match="does not serve task edit"):
        engine.generate(request("edit", width=256, height=256))
    # A text-to-image directory is refused as a Fill model, with the reason.
    save_pipeline(builtin.build_pipeline(builtin.TINY), "tiny", tmp_path / "not-fill")
    with pytest.raises(ProfileError, match="not a FLUX.1 Fill model"):
        Engine(EngineOptions(profile="flux-fill", model_path=tmp_path / "not-fill"))
