"""Generation: deterministic bytes, stock-diffusers agreement, and clear errors for bad requests."""

from __future__ import annotations

import hashlib
import io
import time

import pytest
from PIL import Image
from pydantic import ValidationError

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, RequestError
from helpers import stock_png


def request(**overrides) -> GenerationRequest:
    fields = dict(prompt="a lighthouse at dusk", seed=7, width=64, height=64, steps=4, guidance=3.5)
    return GenerationRequest(**{**fields, **overrides})


def test_same_request_same_bytes(tiny_engine):
    first = tiny_engine.generate(request())
    second = tiny_engine.generate(request())
    assert first.png == second.png
    assert first.sha256 == hashlib.sha256(first.png).hexdigest()
    assert first.fingerprint == tiny_engine.fingerprint


def test_result_is_a_png_of_the_requested_size(tiny_engine):
    result = tiny_engine.generate(request(width=96, height=48))
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (96, 48)
    assert len(set(image.getdata())) > 10, "the image should not be blank"


def test_seed_prompt_and_settings_change_the_image(tiny_engine):
    base = tiny_engine.generate(request()).sha256
    assert tiny_engine.generate(request(seed=0)).sha256 != base  # 0 is a valid seed
    assert tiny_engine.generate(request(prompt="a forest")).sha256 != base
    assert tiny_engine.generate(request(guidance=1.0)).sha256 != base
    assert tiny_engine.generate(request(steps=3)).sha256 != base


def test_timings_cover_every_stage(tiny_engine):
    timings = tiny_engine.generate(request()).timings
    stages = timings.as_dict()
    assert set(stages) == {"load", "text_encode", "denoise", "decode", "encode", "total"}
    assert all(value >= 0 for value in stages.values())
    assert timings.denoise > 0 and timings.total >= timings.denoise


def test_a_new_engines_first_image_reports_only_its_own_time():
    """The model loads before any request: the first image's stages add up to no more than the
    call took (a client compares them with the latency it sees)."""
    engine = Engine(EngineOptions(profile="tiny"))
    started = time.perf_counter()
    timings = engine.generate(request()).timings
    took = time.perf_counter() - started
    assert engine.load_seconds > 0 and timings.total <= took


def test_a_fresh_engine_gives_the_same_bytes(tiny_engine):
    assert Engine(EngineOptions()).generate(request()).png == tiny_engine.generate(request()).png


def test_matches_stock_diffusers_exactly(tiny_engine):
    """Our staged generation is the stock FluxPipeline call, bit for bit."""
    pipe = tiny_engine.pipe
    req = request(seed=11, width=80, height=48)
    stock = stock_png(pipe, req, tiny_engine.spec.max_sequence_length)
    assert tiny_engine.generate(req).png == stock


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 63}, "multiple of 16"),
        ({"height": 8}, "greater than or equal to 16"),
        ({"width": 8192}, "less than or equal to 2048"),
        ({"steps": 0}, "greater than or equal to 1"),
        ({"steps": 1000}, "less than or equal to 100"),
        ({"prompt": ""}, "at least 1 character"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 2001}, "at most 2000 characters"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"guidance": float("nan")}, "finite number"),
    ],
)
def test_invalid_requests_are_refused_with_a_reason(overrides, message):
    with pytest.raises(ValidationError, match=message):
        request(**overrides)


def test_profile_limits_are_checked(tiny_engine):
    with pytest.raises(RequestError, match="width 512 is outside 16..256"):
        tiny_engine.generate(request(width=512))
    with pytest.raises(RequestError, match="steps 60 is over 50"):
        tiny_engine.generate(request(steps=60))
