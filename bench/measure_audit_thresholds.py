"""Measure how alike honest and dishonest results are across profiles, to choose audit thresholds.

An audit across profiles cannot demand equal bytes; it compares SSIM and perceptual hashes
(engine/compare.py) against thresholds (orchestrator/audit.py). This script generates the same
requests on a reference engine and on variants of it, and prints the distributions:

- honest variants, which must pass: the same weights on 1 thread instead of 2, and on the
  AVX2 kernels instead of AVX-512 (a subprocess with ATEN_CPU_CAPABILITY=avx2); bfloat16
  instead of float32 is measured too, and reported apart (see below);
- dishonest variants, which must fail: another seed, one step fewer, half the steps, the
  LoRA left out, another LoRA, one word of the prompt changed, and an image made for another
  request (a replay).

The image tasks (edit, img2img, inpaint; `--tasks`) are measured the same way, on synthetic
shape images as inputs (inpaint with a centred mask), with the cheats that apply to them and
three of their own: the input image ignored (text-to-image of the prompt), the input returned
unchanged (resized to the output size, as the engine resizes it), and half the strength asked
for (img2img and inpaint: fewer denoising steps).

It then checks the thresholds in orchestrator/audit.py against what it measured and prints
the margins on both sides, per task. The tiny profile has random weights, so its images are noise-like;
that is the hard case for a perceptual comparison, and both built-in profiles are measured at
the sizes the benchmarks and tests use.

    .venv/bin/python bench/measure_audit_thresholds.py            # about 15 minutes on a busy 2-core machine
    .venv/bin/python bench/measure_audit_thresholds.py --quick    # fewer requests and sizes (about 9)
    .venv/bin/python bench/measure_audit_thresholds.py --json out.json   # keep every pair (see --from-json)
    .venv/bin/python bench/measure_audit_thresholds.py --tasks edit,img2img,inpaint   # image tasks (about 12)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from dippy_studio.orchestrator.audit import Thresholds

HONEST = ("threads1", "avx2")
DRIFT = ("bf16",)  # honest in intent, but a different reference profile (see the report)
DISHONEST = ("wrong_seed", "one_step_fewer", "half_steps", "no_lora", "wrong_lora", "other_prompt", "replayed")
# The cheats of the image tasks only: work not done on the input image.
TASK_DISHONEST = ("ignored_input", "returned_input", "low_strength")
ALL_DISHONEST = (*DISHONEST, *TASK_DISHONEST)
TASKS = ("generate", "edit", "img2img", "inpaint")

# Prompt pairs that differ by one word: the "other prompt" cheat is the subtlest one we try.
PROMPTS = (
    ("a red fox in the snow", "a blue fox in the snow"),
    ("portrait of an old sailor, oil painting", "portrait of an old farmer, oil painting"),
    ("a castle on a hill at sunset", "a castle on a hill at sunrise"),
    ("a bowl of ramen, studio lighting", "a bowl of salad, studio lighting"),
    ("cyberpunk street at night, neon", "cyberpunk street at noon, neon"),
    ("a cat wearing a wizard hat", "a dog wearing a wizard hat"),
)
# Edit instructions, in the same one-word-apart pairs.
EDIT_PROMPTS = (
    ("make the sky red", "make the sky green"),
    ("turn the circle into a star", "turn the circle into a heart"),
    ("add snow on the ground", "add rain on the ground"),
    ("make it look like an oil painting", "make it look like a pencil drawing"),
    ("put a hat on the square", "put a hat on the triangle"),
    ("make the background darker", "make the background brighter"),
)
# Inputs are larger than the output, so the engine (and the cheat returning them) resizes them.
INPUT_SCALE = 1.5


@dataclass(frozen=True)
class Case:
    profile: str
    size: int
    steps: int
    requests: int
    task: str = "generate"


FULL = (
    Case("tiny", 32, 4, 8),
    Case("tiny", 64, 4, 8),
    Case("tiny", 128, 4, 6),
    Case("small", 64, 8, 6),
    Case("small", 128, 8, 6),
    Case("small", 256, 8, 4),
)
QUICK = (Case("tiny", 64, 4, 4), Case("small", 128, 8, 3))
# The image tasks on every built-in profile that serves them (tiny-kontext: edit only).
IMAGE_FULL = (
    Case("tiny", 64, 4, 6, "edit"),
    Case("tiny", 128, 4, 4, "edit"),
    Case("tiny-kontext", 64, 4, 6, "edit"),
    Case("small", 128, 8, 4, "edit"),
    Case("tiny", 64, 4, 6, "img2img"),
    Case("tiny", 128, 4, 4, "img2img"),
    Case("small", 128, 8, 4, "img2img"),
    Case("tiny", 64, 4, 6, "inpaint"),
    Case("tiny", 128, 4, 4, "inpaint"),
    Case("small", 128, 8, 4, "inpaint"),
    Case("small", 256, 8, 2, "edit"),
    Case("small", 256, 8, 2, "img2img"),
    Case("small", 256, 8, 2, "inpaint"),
)
IMAGE_QUICK = (
    Case("tiny", 64, 4, 4, "edit"),
    Case("tiny-kontext", 64, 4, 4, "edit"),
    Case("small", 128, 8, 2, "edit"),
    Case("tiny", 64, 4, 4, "img2img"),
    Case("small", 128, 8, 2, "img2img"),
    Case("tiny", 64, 4, 4, "inpaint"),
    Case("small", 128, 8, 2, "inpaint"),
)


@dataclass(frozen=True)
class Pair:
    """One comparison: the reference image of a request against a variant's image."""

    profile: str
    size: int
    variant: str
    request: int
    ssim: float
    phash: int
    dhash: int
    max_abs_diff: int
    identical: bool
    task: str = "generate"


def requests_for(case: Case, loras: dict[str, str]) -> list[dict]:
    """The case's requests as plain dicts (they cross a process boundary). Odd ones use LoRA A."""
    out = []
    for index in range(case.requests):
        prompt = _prompts(case.task)[index % len(PROMPTS)][0]
        request = dict(prompt=prompt, seed=1000 + index, width=case.size, height=case.size, steps=case.steps)
        request["loras"] = [{"path": loras["a"], "scale": 1.0}] if index % 2 and loras else []
        if case.task != "generate":
            request.update(task_inputs(case, index))
        out.append(request)
    return out


def _prompts(task: str) -> tuple[tuple[str, str], ...]:
    return EDIT_PROMPTS if task == "edit" else PROMPTS


def task_inputs(case: Case, index: int) -> dict:
    """An image task's inputs for request `index`: a seeded shape image, a centred mask for
    inpainting, and the strength made explicit (as the orchestrator sends it)."""
    from PIL import Image, ImageDraw

    from dippy_studio.engine.images import encode_png
    from dippy_studio.engine.synthetic_data import shape_images
    from dippy_studio.protocol.limits import profile_limits

    side = int(case.size * INPUT_SCALE)
    [(_, image, _)] = shape_images(("sunset", "meadow")[index % 2], 1, seed=index, size=side)
    inputs: dict = {"task": case.task, "image": encode_png(image)}
    if case.task == "inpaint":
        mask = Image.new("L", (side, side), 0)
        ImageDraw.Draw(mask).rectangle((side // 4, side // 4, 3 * side // 4 - 1, 3 * side // 4 - 1), fill=255)
        inputs["mask"] = encode_png(mask)
    if case.task in ("img2img", "inpaint"):
        inputs["strength"] = profile_limits(case.profile).default_strength
    return inputs


def dishonest(variant: str, index: int, request: dict, loras: dict[str, str]) -> dict | None:
    """What a cheating miner runs instead of `request`, or None when the cheat does not apply."""
    changed = dict(request)
    if variant in ("no_lora", "wrong_lora") and not loras:
        return None  # a profile measured without LoRAs
    if variant == "wrong_seed":
        changed["seed"] = request["seed"] + 1
    elif variant == "one_step_fewer":
        changed["steps"] = request["steps"] - 1
    elif variant == "half_steps":
        changed["steps"] = max(1, request["steps"] // 2)
    elif variant == "no_lora":
        if not request["loras"]:
            return None
        changed["loras"] = []
    elif variant == "wrong_lora":
        # A LoRA request gets another LoRA; a plain one gets a LoRA nobody asked for.
        changed["loras"] = [{"path": loras["b"], "scale": 1.0}]
    elif variant == "other_prompt":
        changed["prompt"] = _prompts(request.get("task", "generate"))[index % len(PROMPTS)][1]
    elif variant == "ignored_input":
        # Text-to-image of the same prompt, seed and steps: the input image never looked at.
        for key in ("image", "mask", "strength"):
            changed.pop(key, None)
        changed["task"] = "generate"
    elif variant == "low_strength":
        if request.get("strength") is None:
            return None
        changed["strength"] = request["strength"] / 2
    else:
        raise ValueError(variant)
    return changed


def returned_input(request: dict) -> bytes:
    """The 'returned the input unchanged' cheat: the input image at the output size, resized the
    way the engine resizes it."""
    from dippy_studio.engine.images import encode_png
    from dippy_studio.engine.inputs import fit_to
    from dippy_studio.protocol.images import read_input_image

    image = read_input_image(request["image"], max_pixels=1 << 30)
    return encode_png(fit_to(image, (request["width"], request["height"])))


def applies(variant: str, task: str) -> bool:
    return variant not in TASK_DISHONEST or task != "generate"


def _to_wire(request: dict) -> dict:
    """Image bytes as base64, so a request crosses to the worker process as JSON."""
    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in request.items()}


def _from_wire(request: dict) -> dict:
    return {k: base64.b64decode(request[k]) if k in ("image", "mask") and request[k] else v for k, v in request.items()}


# One engine per profile and options, kept for every case and variant that uses them: building
# one costs more than its few small generations (each `generate` sets its own thread count).
_ENGINES: dict[tuple[str, tuple[tuple[str, object], ...]], Any] = {}


def generate_all(profile: str, requests: Sequence[dict], **options: object) -> list[bytes]:
    from dippy_studio.engine import Engine, EngineOptions, GenerationRequest

    key = (profile, tuple(sorted(options.items())))
    if key not in _ENGINES:
        _ENGINES[key] = Engine(EngineOptions(profile=profile, **options))
    engine = _ENGINES[key]
    return [engine.generate(GenerationRequest.model_validate(request)).png for request in requests]


def generate_in_subprocess(profile: str, requests: Sequence[dict], env: dict[str, str]) -> tuple[list[bytes], str]:
    """Generate in a fresh interpreter, so environment switches read at import time apply."""
    payload = json.dumps({"profile": profile, "requests": [_to_wire(request) for request in requests]})
    done = subprocess.run(
        [sys.executable, __file__, "--worker"],
        input=payload,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker failed: {done.stderr[-2000:]}")
    reply = json.loads(done.stdout)
    return [base64.b64decode(png) for png in reply["pngs"]], reply["cpu_capability"]


def worker() -> None:
    import torch

    job = json.loads(sys.stdin.read())
    pngs = generate_all(job["profile"], [_from_wire(request) for request in job["requests"]])
    reply = {"pngs": [base64.b64encode(png).decode() for png in pngs]}
    reply["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    json.dump(reply, sys.stdout)


def train_loras(profile: str, directory: Path) -> dict[str, str]:
    """Two LoRAs of different styles, trained long enough to change images visibly."""
    from dippy_studio.engine.synthetic_data import write_dataset
    from dippy_studio.engine.training import TrainConfig, train_lora

    # The built-ins' defaults learn in hundreds of steps; a higher rate gets a visible style in dozens.
    tiny, small = dict(resolution=32, steps=60), dict(resolution=64, steps=30, lr=1e-2)
    settings = {"tiny": tiny, "tiny-kontext": tiny, "small": small}[profile]
    out = {}
    for name, style in (("a", "sunset"), ("b", "meadow")):
        data = write_dataset(directory / f"{profile}-{style}", style, count=8, seed=0, size=settings["resolution"])
        path = directory / f"{profile}-{style}.safetensors"
        train_lora(data, path, TrainConfig(profile=profile, seed=0, **settings))
        out[name] = str(path)
    return out


def measure_case(case: Case, loras: dict[str, str], avx2: bool = True) -> list[Pair]:
    from dippy_studio.engine.compare import compare_pngs

    requests = requests_for(case, loras)
    reference = generate_all(case.profile, requests)
    variants: dict[str, list[tuple[int, bytes]]] = {}
    variants["threads1"] = list(enumerate(generate_all(case.profile, requests, threads=1)))
    if avx2:
        pngs, capability = generate_in_subprocess(case.profile, requests, {"ATEN_CPU_CAPABILITY": "avx2"})
        if capability != "AVX2":
            raise RuntimeError(f"the AVX2 worker ran with {capability}")
        variants["avx2"] = list(enumerate(pngs))
    variants["bf16"] = list(enumerate(generate_all(case.profile, requests, dtype="bfloat16")))
    for variant in (v for v in ALL_DISHONEST if applies(v, case.task)):
        if variant == "replayed":
            variants[variant] = [(i, reference[(i + 1) % len(reference)]) for i in range(len(requests))]
            continue
        if variant == "returned_input":
            variants[variant] = [(i, returned_input(request)) for i, request in enumerate(requests)]
            continue
        changed = [(i, dishonest(variant, i, request, loras)) for i, request in enumerate(requests)]
        changed = [(i, request) for i, request in changed if request is not None]
        pngs = generate_all(case.profile, [request for _, request in changed])
        variants[variant] = [(i, png) for (i, _), png in zip(changed, pngs, strict=True)]

    pairs = []
    for variant, images in variants.items():
        for index, png in images:
            similarity = compare_pngs(reference[index], png)
            pairs.append(
                Pair(
                    profile=case.profile,
                    size=case.size,
                    variant=variant,
                    request=index,
                    ssim=similarity.ssim,
                    phash=similarity.phash_distance,
                    dhash=similarity.dhash_distance,
                    max_abs_diff=similarity.max_abs_diff,
                    identical=similarity.identical,
                    task=case.task,
                )
            )
    return pairs


def train_loras_if_possible(profile: str, directory: Path, console: Console | None) -> dict[str, str]:
    """The profile's two LoRAs, or none (and the LoRA cheats left out) where it cannot train."""
    try:
        return train_loras(profile, directory)
    except Exception as exc:  # any failure: measure without LoRAs, and say so
        if console is not None:
            console.log(f"{profile}: no LoRAs ({type(exc).__name__}: {exc}); LoRA cheats left out")
        return {}


def measure(cases: Iterable[Case], avx2: bool = True, console: Console | None = None) -> list[Pair]:
    pairs: list[Pair] = []
    loras: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="audit-thresholds-") as tmp:
        for case in cases:
            if case.profile not in loras:
                loras[case.profile] = train_loras_if_possible(case.profile, Path(tmp), console)
            if console is not None:
                console.log(f"measuring {case.task} on {case.profile} {case.size}x{case.size}, {case.steps} steps")
            pairs.extend(measure_case(case, loras[case.profile], avx2=avx2))
    return pairs


@dataclass(frozen=True)
class Check:
    honest_min_ssim: float
    honest_max_phash: int
    dishonest_max_ssim: float
    dishonest_min_phash: int
    false_negatives: int  # dishonest pairs that would pass
    false_positives: int  # honest pairs that would fail


def check(pairs: Sequence[Pair], min_ssim: float, max_phash: int) -> Check:
    honest = [p for p in pairs if p.variant in HONEST]
    cheats = [p for p in pairs if p.variant in ALL_DISHONEST]
    passes = [_passes(p, min_ssim, max_phash) for p in cheats]
    fails = [not _passes(p, min_ssim, max_phash) for p in honest]
    return Check(
        honest_min_ssim=min(p.ssim for p in honest),
        honest_max_phash=max(p.phash for p in honest),
        dishonest_max_ssim=max(p.ssim for p in cheats),
        dishonest_min_phash=min(p.phash for p in cheats),
        false_negatives=sum(passes),
        false_positives=sum(fails),
    )


def report(pairs: Sequence[Pair], console: Console) -> Check:
    from dippy_studio.orchestrator.audit import DEFAULT_THRESHOLDS

    # 1 - SSIM on a log scale: honest drifts and the closest cheats both round to SSIM 1.000.
    table = Table(title="Each variant against the reference image of the same request (pHash/dHash: bits of 64)")
    for column in ("task", "profile", "size", "variant", "n", "equal px"):
        table.add_column(column, justify="left" if column in ("task", "profile", "variant") else "right")
    for column in ("1-SSIM min", "1-SSIM median", "1-SSIM max", "pHash", "dHash", "max |diff|"):
        table.add_column(column, justify="right")
    keys = sorted({(p.task, p.profile, p.size) for p in pairs}, key=lambda k: (TASKS.index(k[0]), k[1], k[2]))
    for task, profile, size in keys:
        shown = [v for v in (*HONEST, *DRIFT, *ALL_DISHONEST) if applies(v, task)]
        for variant in shown:
            group = [p for p in pairs if (p.task, p.profile, p.size, p.variant) == (task, profile, size, variant)]
            if not group:
                continue
            gaps = [1.0 - p.ssim for p in group]
            table.add_row(
                task,
                profile,
                str(size),
                variant,
                str(len(group)),
                str(sum(p.identical for p in group)),
                f"{min(gaps):.1e}",
                f"{statistics.median(gaps):.1e}",
                f"{max(gaps):.1e}",
                _span(p.phash for p in group),
                _span(p.dhash for p in group),
                _span(p.max_abs_diff for p in group),
                end_section=variant == shown[-1],
            )
    console.print(table)

    tasks = [task for task in TASKS if any(p.task == task for p in pairs)]
    closest = Table(title="Closest cheat of each kind, over all profiles and sizes")
    for column in ("task", "variant", "n", "1-SSIM min", "pHash min", "max |diff| min", "passing"):
        closest.add_column(column, justify="left" if column in ("task", "variant") else "right")
    thresholds = DEFAULT_THRESHOLDS
    for task, variant in ((t, v) for t in tasks for v in (*DRIFT, *ALL_DISHONEST)):
        group = [p for p in pairs if p.task == task and p.variant == variant]
        if group:
            passing = sum(_passes(p, thresholds.min_ssim, thresholds.max_phash_distance) for p in group)
            closest.add_row(
                task,
                variant,
                str(len(group)),
                f"{min(1.0 - p.ssim for p in group):.1e}",
                str(min(p.phash for p in group)),
                str(min(p.max_abs_diff for p in group)),
                f"{passing}/{len(group)}",
                end_section=variant == [v for v in ALL_DISHONEST if applies(v, task)][-1],
            )
    console.print(closest)

    summary = Table(title="Chosen thresholds (orchestrator/audit.py DEFAULT_THRESHOLDS) against the measurements")
    for column in ("task", "measure", "honest worst", "threshold", "closest cheat", "honest margin", "cheat margin"):
        summary.add_column(column, justify="left" if column in ("task", "measure") else "right")
    for task in tasks:
        _summary_rows(
            summary,
            task,
            check([p for p in pairs if p.task == task], thresholds.min_ssim, thresholds.max_phash_distance),
            thresholds,
        )
    console.print(summary)
    bf16 = [p for p in pairs if p.variant == "bf16"]
    if bf16:
        console.print(
            f"bfloat16 vs float32: 1-SSIM {min(1 - p.ssim for p in bf16):.1e}..{max(1 - p.ssim for p in bf16):.1e}, "
            f"max |diff| up to {max(p.max_abs_diff for p in bf16)}: as far from the reference as the closest cheats, "
            "so no threshold passes it without passing them. A dtype is a different reference profile."
        )
    for task in tasks:
        mine = [p for p in pairs if p.task == task]
        result = check(mine, thresholds.min_ssim, thresholds.max_phash_distance)
        console.print(
            f"{task}: honest pairs failing: {result.false_positives} of {sum(p.variant in HONEST for p in mine)}; "
            f"dishonest pairs passing: {result.false_negatives} of {sum(p.variant in ALL_DISHONEST for p in mine)}"
        )
    return check(pairs, thresholds.min_ssim, thresholds.max_phash_distance)


def _summary_rows(summary: Table, task: str, result: Check, thresholds: Thresholds) -> None:
    honest_gap, cheat_gap, limit = (
        1.0 - result.honest_min_ssim,
        1.0 - result.dishonest_max_ssim,
        1 - thresholds.min_ssim,
    )
    summary.add_row(
        task,
        "1 - SSIM (pass if <=)",
        f"{honest_gap:.1e}",
        f"{limit:.0e}",
        f"{cheat_gap:.1e}",
        f"x{limit / honest_gap:.0f}" if honest_gap > 0 else "inf",
        f"x{cheat_gap / limit:.0f}" if cheat_gap > 0 else "none: a cheat is identical",
    )
    summary.add_row(
        "",
        "pHash distance (pass if <=)",
        str(result.honest_max_phash),
        str(thresholds.max_phash_distance),
        str(result.dishonest_min_phash),
        f"{thresholds.max_phash_distance - result.honest_max_phash:+d} bits",
        f"{result.dishonest_min_phash - thresholds.max_phash_distance:+d} bits",
        end_section=True,
    )


def _passes(pair: Pair, min_ssim: float, max_phash: int) -> bool:
    return pair.ssim >= min_ssim and pair.phash <= max_phash


def _span(values: Iterable[int]) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and sizes")
    parser.add_argument(
        "--tasks",
        default="generate",
        help=f"comma-separated, of {', '.join(TASKS)} (default: generate, the text-to-image measurement)",
    )
    parser.add_argument("--no-avx2", action="store_true", help="skip the AVX2 subprocess")
    parser.add_argument("--json", type=Path, help="write every measured pair to this file")
    parser.add_argument("--from-json", type=Path, help="report pairs measured earlier (--json) instead of measuring")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    console = Console(width=150)
    if args.from_json:
        pairs = [Pair(**row) for row in json.loads(args.from_json.read_text())]
    else:
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        if unknown := sorted(set(tasks) - set(TASKS)):
            parser.error(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
        cases = [*(QUICK if args.quick else FULL), *(IMAGE_QUICK if args.quick else IMAGE_FULL)]
        pairs = measure([case for case in cases if case.task in tasks], avx2=not args.no_avx2, console=console)
    result = report(pairs, console)
    if args.json:
        args.json.write_text(json.dumps([asdict(p) for p in pairs], indent=1) + "\n")
    return 1 if result.false_positives or result.false_negatives else 0


if __name__ == "__main__":
    sys.exit(main())
