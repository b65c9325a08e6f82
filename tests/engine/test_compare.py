"""Image comparison for audits across profiles: equal images, honest drift, unrelated images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dippy_studio.engine.compare import ComparisonError, Similarity, compare_images, compare_pngs, decode_png
from dippy_studio.engine.images import encode_png


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """Two unrelated 32x32 images and a 64x64 one, from the tiny profile."""
    from dippy_studio.engine import Engine, EngineOptions, GenerationRequest

    tiny_engine = Engine(EngineOptions(profile="tiny", threads=1))  # one thread: quick on a busy machine

    def generate(seed: int, size: int) -> bytes:
        request = GenerationRequest(prompt="a red fox", seed=seed, width=size, height=size)
        return tiny_engine.generate(request).png

    return {"one": generate(1, 32), "two": generate(2, 32), "large": generate(1, 64)}


def nudge(png: bytes, count: int, seed: int = 0) -> bytes:
    """The kind of drift measured across thread counts and CPU instruction sets: a few values off by 1."""
    pixels = np.asarray(decode_png(png)).copy()
    rng = np.random.default_rng(seed)
    flat = pixels.reshape(-1)
    for index in rng.choice(flat.size, size=count, replace=False):
        flat[index] = flat[index] + 1 if flat[index] < 255 else flat[index] - 1
    return encode_png(Image.fromarray(pixels))


def test_identical_images(images):
    png = images["one"]
    similarity = compare_pngs(png, png)
    assert similarity == Similarity(
        width=32,
        height=32,
        identical=True,
        ssim=1.0,
        phash_distance=0,
        dhash_distance=0,
        max_abs_diff=0,
        mean_abs_diff=0.0,
        differing_values=0.0,
    )


def test_honest_drift_is_nearly_identical(images):
    png = images["large"]
    one = compare_pngs(png, nudge(png, 1))
    ten = compare_pngs(png, nudge(png, 10))
    assert not one.identical and one.max_abs_diff == 1
    assert one.differing_values == pytest.approx(1 / (64 * 64 * 3))
    # Honest drift stays orders of magnitude under the audit threshold (1 - SSIM of 1e-5).
    assert 0 < 1 - one.ssim < 1e-6
    assert 1 - one.ssim < 1 - ten.ssim < 1e-5
    assert one.phash_distance == 0 and ten.phash_distance == 0


def test_unrelated_images_are_far_apart(images):
    similarity = compare_pngs(images["one"], images["two"])
    assert similarity.ssim < 0.2
    assert similarity.phash_distance > 12
    assert similarity.max_abs_diff > 100


def test_comparison_is_deterministic_and_symmetric_in_ssim(images):
    a, b = images["two"], nudge(images["two"], 50)
    assert compare_pngs(a, b) == compare_pngs(a, b)
    assert compare_pngs(a, b).ssim == pytest.approx(compare_pngs(b, a).ssim, abs=1e-12)


def test_other_pixel_modes_are_compared_as_rgb(images):
    png = images["one"]
    rgba = io.BytesIO()
    decode_png(png).convert("RGBA").save(rgba, format="PNG")
    assert compare_pngs(png, rgba.getvalue()).identical


def test_images_that_cannot_be_compared():
    small = encode_png(Image.new("RGB", (32, 32), (10, 20, 30)))
    other = encode_png(Image.new("RGB", (32, 48), (10, 20, 30)))
    with pytest.raises(ComparisonError, match="sizes differ"):
        compare_pngs(small, other)
    with pytest.raises(ComparisonError, match="not a decodable image"):
        compare_pngs(small, b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ComparisonError, match="too small"):
        compare_images(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8)))
