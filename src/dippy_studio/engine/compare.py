"""How alike two images are: the measurements an audit uses when it cannot demand equal bytes.

Two engines with the same profile fingerprint produce the same PNG bytes, and an audit
compares sha256s. Across profiles (another dtype, thread count or CPU instruction set) honest
results differ in the last bits of some pixels, so the audit measures similarity instead:

- SSIM (structural similarity, Wang et al. 2004, with their Gaussian window and constants)
  over the RGB channels: 1.0 for equal images, near 0 for unrelated ones. It sees local
  structure at full resolution, so a different seed, prompt or step count shows up even in
  the noise-like images of randomly initialised models.
- Perceptual hashes (ImageHash's 64-bit pHash and dHash) and their Hamming distances: coarse
  and robust, a second opinion on the global layout that SSIM alone could be fooled about.
- Plain pixel statistics (largest and mean absolute difference, share of differing values),
  kept as evidence: they say how far an honest drift went.

Everything here is pure and deterministic: the same two PNGs always give the same numbers
on the same platform. The thresholds that turn these numbers into a verdict live with the
auditor (orchestrator/audit.py), measured by bench/measure_audit_thresholds.py.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError
from skimage.metrics import structural_similarity

# The SSIM Gaussian window (sigma 1.5) spans 11 pixels; smaller images have no full window.
MIN_SIDE = 11


class ComparisonError(ValueError):
    """The images cannot be compared: undecodable, of different sizes, or too small."""


@dataclass(frozen=True)
class Similarity:
    """How alike two images of the same size are."""

    width: int
    height: int
    identical: bool  # every pixel value equal (the PNG bytes may still differ)
    ssim: float  # mean structural similarity over RGB, in [-1, 1]; 1.0 when identical
    phash_distance: int  # Hamming distance of the 64-bit perceptual hashes, 0..64
    dhash_distance: int  # Hamming distance of the 64-bit difference hashes, 0..64
    max_abs_diff: int  # largest difference of one channel value, 0..255
    mean_abs_diff: float  # mean absolute difference over all channel values, 0..255
    differing_values: float  # share of channel values that differ at all, 0..1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def decode_png(data: bytes) -> Image.Image:
    """Decode image bytes to RGB, or raise ComparisonError."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ComparisonError(f"not a decodable image: {exc}") from None


def compare_images(reference: Image.Image, candidate: Image.Image) -> Similarity:
    """Similarity of two RGB images of the same size."""
    if reference.size != candidate.size:
        raise ComparisonError(f"sizes differ: {reference.size} and {candidate.size}")
    width, height = reference.size
    if min(width, height) < MIN_SIDE:
        raise ComparisonError(f"images of {width}x{height} are too small to compare (min side {MIN_SIDE})")
    a = np.asarray(reference.convert("RGB"), dtype=np.uint8)
    b = np.asarray(candidate.convert("RGB"), dtype=np.uint8)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    identical = not diff.any()
    ssim = 1.0 if identical else _ssim(a, b)
    return Similarity(
        width=width,
        height=height,
        identical=identical,
        ssim=ssim,
        phash_distance=_hamming(imagehash.phash(reference), imagehash.phash(candidate)),
        dhash_distance=_hamming(imagehash.dhash(reference), imagehash.dhash(candidate)),
        max_abs_diff=int(diff.max()),
        mean_abs_diff=float(diff.mean()),
        differing_values=float(np.count_nonzero(diff)) / diff.size,
    )


def compare_pngs(reference: bytes, candidate: bytes) -> Similarity:
    """Similarity of two encoded images of the same size (ComparisonError if they are not)."""
    return compare_images(decode_png(reference), decode_png(candidate))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    # Wang et al.'s settings (Gaussian window, sigma 1.5, population covariance) rather than
    # scikit-image's 7x7 uniform default: the published definition, comparable with others'.
    value = structural_similarity(
        a,
        b,
        channel_axis=2,
        data_range=255,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    return float(value)


def _hamming(a: imagehash.ImageHash, b: imagehash.ImageHash) -> int:
    return int(a - b)
