"""FLUX.1-dev at full size on a GPU: plain against torch.compile, end to end, bit-exact on repeat.

    .venv/bin/python bench/bench_gpu_flux.py              # 1024x1024, 28 steps, 3 timed runs each
    .venv/bin/python bench/bench_gpu_flux.py --reps 5 --json

The architecture is FLUX.1-dev's (the configurations in bench_memory.py: the 12B transformer,
T5-XXL, CLIP-L, the 16-channel VAE) with seeded random weights built directly on the GPU in
bfloat16: nothing is downloaded, and the arithmetic per step is the real model's. Random weights
draw no picture, so the numbers are about time and bytes, not quality.

A run is prompt -> PNG bytes (text encoding, 28 denoising steps, VAE decode, PNG encoding), timed
with the GPU synchronised. The plain pipeline runs first, then the same one with its transformer
compiled (`torch.compile`, after warm-up runs that pay the compilation). Each variant's repeats
must give the same PNG bytes; whether plain and compiled agree with each other is reported, not
required (compiled kernels may fuse and reorder sums). The anchor beside the figures is the
fastest public API's FLUX.1-dev: 3.03 s end to end on an H100.

Exits 2 with a message when torch sees no CUDA device, 1 when a variant's repeats differ.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_memory  # bench/ is a folder of scripts, put on the path above

ANCHOR_S = 3.03  # the fastest public API, FLUX.1-dev 1024x1024 end to end, H100
# FLUX.1-dev's published scheduler (resolution-dependent shift).
FLUX_DEV_SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)
PROMPT = "a lighthouse on a cliff at dusk, waves below, warm light in the windows"


def build_pipeline(seed: int):
    """FLUX.1-dev's pipeline with seeded random bf16 weights, built on the GPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from dippy_studio.engine import tokenizers
    from dippy_studio.engine.attention import apply_attention_backend
    from dippy_studio.engine.determinism import configure_cuda

    configure_cuda()
    modules = {}
    for component in bench_memory.FAMILIES["flux-dev"].components:
        torch.manual_seed(seed)  # per component, so each one's weights do not depend on the others'
        with torch.device("cuda"):
            module = component.build()
        modules[component.role] = module.to(torch.bfloat16).eval().requires_grad_(False)
        torch.cuda.empty_cache()
    apply_attention_backend(modules["transformer"], "native")
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=tokenizers.clip_tokenizer(),
        text_encoder_2=modules["text_encoder_2"],
        tokenizer_2=tokenizers.t5_tokenizer(512),
        transformer=modules["transformer"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, size: int, steps: int, seed: int) -> tuple[float, bytes, bool]:
    """Seconds from prompt to PNG bytes, the bytes, and whether the image had NaNs."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        image = pipe(
            PROMPT,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=3.5,
            max_sequence_length=512,
            generator=torch.Generator("cuda").manual_seed(seed),
            output_type="np",
        ).images[0]
    from PIL import Image

    nan = bool(torch.isnan(torch.from_numpy(image)).any())
    buffer = io.BytesIO()
    Image.fromarray((image.clip(0, 1) * 255).round().astype("uint8")).save(buffer, format="PNG")
    torch.cuda.synchronize()
    return time.perf_counter() - started, buffer.getvalue(), nan


def measure(pipe, label: str, args: argparse.Namespace) -> dict[str, object]:
    for _ in range(args.warmup):
        generate(pipe, args.size, args.steps, args.seed)
    times, digests, nans = [], set(), False
    for _ in range(args.reps):
        seconds, png, nan = generate(pipe, args.size, args.steps, args.seed)
        times.append(seconds)
        digests.add(hashlib.sha256(png).hexdigest())
        nans = nans or nan
    median = statistics.median(times)
    return {
        "variant": label,
        "median_s": median,
        "min_s": min(times),
        "times_s": times,
        "vs_anchor": median / ANCHOR_S,
        "identical_on_repeat": len(digests) == 1,
        "sha256": sorted(digests),
        "nan_in_image": nans,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant (compiled: at least 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="time the plain pipeline only")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_gpu_flux: torch sees no CUDA device; this benchmark needs a GPU with about 40 GiB "
            "(FLUX.1-dev in bfloat16). Nothing was measured.",
            file=sys.stderr,
        )
        return 2

    started = time.perf_counter()
    pipe = build_pipeline(args.seed)
    build_s = time.perf_counter() - started
    rows = [measure(pipe, "plain", args)]
    if not args.no_compile:
        pipe.transformer.compile()
        compiled_args = argparse.Namespace(**{**vars(args), "warmup": max(2, args.warmup)})
        rows.append(measure(pipe, "torch.compile", compiled_args))
    if len(rows) == 2:
        rows[1]["vs_plain"] = rows[1]["median_s"] / rows[0]["median_s"]
        rows[1]["same_bytes_as_plain"] = rows[1]["sha256"] == rows[0]["sha256"]
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "size": args.size,
        "steps": args.steps,
        "build_s": build_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3,
        "anchor_s": ANCHOR_S,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['device']}, torch {report['torch']}, {args.size}x{args.size}, {args.steps} steps, bf16")
        print(f"built in {build_s:.1f} s; peak GPU memory {report['peak_memory_gib']:.1f} GiB")
        print(f"{'variant':<14} {'median s':>9} {'min s':>7} {'/ anchor 3.03 s':>16} {'/ plain':>8}  repeat")
        for row in rows:
            vs_plain = f"{row['vs_plain']:.3f}" if "vs_plain" in row else "-"
            same = "identical" if row["identical_on_repeat"] else "DIFFERENT"
            print(
                f"{row['variant']:<14} {row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['vs_anchor']:>16.3f} "
                f"{vs_plain:>8}  {same}{'  (NaN in image)' if row['nan_in_image'] else ''}"
            )
    return 0 if all(row["identical_on_repeat"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
