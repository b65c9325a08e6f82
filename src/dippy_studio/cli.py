"""The `dippy-studio` command line. Thin: parses arguments and calls into the packages."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dippy_studio.cli_support import describe_validation, err, fail
from dippy_studio.engine.errors import EngineError
from dippy_studio.settings import Settings

app = typer.Typer(
    help="Dippy Studio: deterministic Flux generation and LoRA training for a Bittensor subnet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()

ProfileOpt = Annotated[
    str | None,
    typer.Option(
        "--profile",
        help="Model profile: tiny, tiny-kontext, small, toy, flux-dev, flux-schnell, flux-kontext, flux-fill; "
        "tiny-sdxl, sdxl; tiny-zimage, z-image; tiny-qwen-image, qwen-image; tiny-qwen-image-edit, "
        "qwen-image-edit; tiny-flux2, flux2-klein; tiny-flux2-dev, flux2-dev.",
    ),
]
ModelPathOpt = Annotated[Path | None, typer.Option("--model-path", help="Local diffusers-layout model directory.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32 or bfloat16.")]
AttentionOpt = Annotated[
    str | None,
    typer.Option("--attention-backend", help="Attention kernel: native (torch SDPA), _native_math, flash, ..."),
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Torch threads (part of the fingerprint).")]


def engine_options(
    profile: str | None,
    model_path: Path | None,
    device: str | None,
    dtype: str | None,
    threads: int | None,
    attention_backend: str | None = None,
):
    """Merge command-line flags over DIPPY_ENGINE__* settings."""
    from dippy_studio.engine.profiles import EngineOptions, profile_in_directory

    base = Settings().engine
    if model_path is not None and profile is None:
        profile = profile_in_directory(model_path)
        if profile is None:
            fail(f"{model_path} has no {'dippy_profile.json'}: say which profile it is with --profile")
    updates = {
        "profile": profile,
        "model_path": model_path,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "attention_backend": attention_backend,
    }
    try:
        return EngineOptions(**{**base.model_dump(), **{k: v for k, v in updates.items() if v is not None}})
    except ValidationError as exc:
        fail(describe_validation(exc))


def parse_lora(spec: str):
    """`PATH[:SCALE]` -> LoraRef; a suffix that is not a number is part of the path."""
    from dippy_studio.engine.lora import LoraRef

    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and _is_number(tail):
        path, scale = head, float(tail)
    try:
        return LoraRef(path=Path(path), scale=scale)
    except ValidationError as exc:
        fail(f"--lora {spec}: {describe_validation(exc)}")


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    seed: Annotated[int, typer.Option(help="Random seed; 0 is valid.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (profile default if unset).")] = None,
    width: Annotated[
        int | None, typer.Option(help="Width in pixels, a multiple of 16 (64; an image task: the input's).")
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Height in pixels, a multiple of 16 (64; an image task: the input's).")
    ] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (profile default if unset).")] = None,
    lora: Annotated[
        list[str] | None, typer.Option("--lora", help="LoRA .safetensors as PATH[:SCALE]; repeatable.")
    ] = None,
    profile: ProfileOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    attention_backend: AttentionOpt = None,
    threads: ThreadsOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the PNG.")] = Path("out.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    task: Annotated[str, typer.Option("--task", help="generate, edit, img2img or inpaint.")] = "generate",
    image: Annotated[
        Path | None, typer.Option("--image", help="Input image (PNG, JPEG, WebP) for edit, img2img, inpaint.")
    ] = None,
    mask: Annotated[Path | None, typer.Option("--mask", help="Inpainting mask: white repaints, black keeps.")] = None,
    strength: Annotated[
        float | None, typer.Option("--strength", help="img2img/inpaint: how much to change, in (0, 1].")
    ] = None,
) -> None:
    """Generate one image (or edit one: --task edit|img2img|inpaint --image IN.png) and print its
    sha256 and the profile fingerprint."""
    from dippy_studio.engine import Engine, GenerationRequest
    from dippy_studio.engine.profiles import get_profile

    options = engine_options(profile, model_path, device, dtype, threads, attention_backend)
    loras = [parse_lora(s) for s in lora or []]
    image_bytes, mask_bytes = _read_file(image, "--image"), _read_file(mask, "--mask")
    try:
        spec = get_profile(options.profile)
        width, height = _output_size(spec, image_bytes, width, height)
        request = GenerationRequest(
            prompt=prompt,
            seed=seed,
            width=width,
            height=height,
            steps=steps if steps is not None else spec.default_steps,
            guidance=guidance if guidance is not None else spec.default_guidance,
            loras=loras,
            task=task,
            image=image_bytes,
            mask=mask_bytes,
            strength=strength,
        )
        engine = Engine(options)
        engine.check(request)
        with _progress(disabled=as_json) as progress:
            task = progress.add_task("denoising", total=request.steps)
            result = engine.generate(request, on_step=lambda done, _: progress.update(task, completed=done))
    except ValidationError as exc:
        fail(describe_validation(exc))
    except EngineError as exc:
        fail(str(exc))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(result.png)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")
    if as_json:
        payload = {
            "sha256": result.sha256,
            "fingerprint": result.fingerprint,
            "output": str(output),
            "width": result.width,
            "height": result.height,
            "seed": result.seed,
            "task": request.task,
            "timings": result.timings.as_dict(),
            "loras": result.loras,
        }
        print(json.dumps(payload))
    else:
        out.print(f"wrote {output}")
        out.print(f"sha256      {result.sha256}")
        out.print(f"fingerprint {result.fingerprint}")


def _read_file(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"{flag} {path}: cannot read it ({exc.strerror})")


def _output_size(spec, image: bytes | None, width: int | None, height: int | None) -> tuple[int, int]:
    """The size asked for; missing sides: 64 for text-to-image, else the input image's
    (`ProfileLimits.output_size`). Raises EngineError for an unreadable image."""
    if width is not None and height is not None:
        return width, height
    if image is None:
        return width or 64, height or 64
    from dippy_studio.engine.errors import RequestError
    from dippy_studio.protocol.images import InputImageError, read_input_image

    try:
        size = read_input_image(image, spec.max_input_pixels, "input image").size
    except InputImageError as exc:
        raise RequestError(str(exc)) from None
    default_width, default_height = spec.output_size(*size)
    return width or default_width, height or default_height


@app.command()
def profile(
    profile: ProfileOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    attention_backend: AttentionOpt = None,
    threads: ThreadsOpt = None,
    save: Annotated[Path | None, typer.Option("--save", help="Write the pipeline here in diffusers layout.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print a profile's fingerprint and its parts; optionally save its pipeline to a directory."""
    from dippy_studio.engine import Engine
    from dippy_studio.engine.profiles import save_pipeline

    options = engine_options(profile, model_path, device, dtype, threads, attention_backend)
    try:
        engine = Engine(options)
    except EngineError as exc:
        fail(str(exc))
    if save is not None:
        if save.exists() and any(save.iterdir()):
            fail(f"{save} exists and is not empty; choose a new directory")
        try:
            save_pipeline(engine.pipe, engine.spec.name, save)
        except OSError as exc:
            fail(f"cannot write {save}: {exc.strerror}")
    parts = engine.fingerprint_parts.as_dict()
    if as_json:
        print(json.dumps({**parts, "saved_to": str(save) if save else None}))
        return
    table = Table(title=f"profile {engine.spec.name}", show_header=False)
    for key, value in parts.items():
        table.add_row(key, str(value))
    out.print(table)
    if save is not None:
        out.print(f"saved diffusers pipeline to {save}")


@app.command()
def demo(
    out_dir: Annotated[
        Path | None, typer.Option("--out-dir", help="Where to write images (default DATA_DIR/demo).")
    ] = None,
) -> None:
    """Generate a few images on the tiny profile, with and without LoRAs, and show their hashes."""
    from dippy_studio.engine import Engine, GenerationRequest, LoraRef
    from dippy_studio.engine.synthetic import write_random_lora

    target = out_dir or Settings().data_dir / "demo"
    engine = Engine(Settings().engine)
    loras = [write_random_lora(engine.pipe, target / f"style-{i}.safetensors", seed=i) for i in (1, 2)]
    jobs = [
        ("base", []),
        ("style-1", [LoraRef(path=loras[0])]),
        ("style-2", [LoraRef(path=loras[1], scale=0.8)]),
        ("both", [LoraRef(path=loras[0], scale=0.5), LoraRef(path=loras[1], scale=0.5)]),
    ]
    table = Table(title=f"demo on profile {engine.spec.name} (fingerprint {engine.fingerprint})")
    for column in ("image", "sha256", "total s"):
        table.add_column(column)
    with _progress(disabled=False) as progress:
        task = progress.add_task("generating", total=len(jobs))
        for name, refs in jobs:
            request = GenerationRequest(prompt="a lighthouse at dusk", seed=7, loras=refs)
            result = engine.generate(request)
            path = target / f"{name}.png"
            path.write_bytes(result.png)
            table.add_row(str(path), result.sha256[:16], f"{result.timings.total:.3f}")
            progress.advance(task)
    out.print(table)


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Where the subnet lives; reused if present.")] = Path(
        ".dippy"
    ),
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="The orchestrator's port (public API and dashboard).")
    ] = 8090,
    miners: Annotated[int, typer.Option("--miners", min=1, max=16, help="How many miners to start.")] = 3,
    demo: Annotated[bool, typer.Option("--demo", help="Submit a mixed workload and print a summary.")] = False,
    cheater: Annotated[int, typer.Option("--cheater", min=0, help="Make this many miners dishonest.")] = 0,
    exit_after: Annotated[bool, typer.Option("--exit-after", help="Stop once the demo summary is printed.")] = False,
    block_time: Annotated[float, typer.Option("--block-time", help="Seconds per block of the local chain.")] = 1.0,
    tempo: Annotated[int, typer.Option("--tempo", help="Blocks between weight settings.")] = 20,
    profile: Annotated[
        str, typer.Option("--profile", help="Model profile every miner serves (toy: the one that draws shapes).")
    ] = "toy",
) -> None:
    """Bring up a whole local subnet: local chain, orchestrator, miners and a validator."""
    from dippy_studio.localnet import run_up

    if cheater > miners:
        fail(f"--cheater {cheater} is more than --miners {miners}")
    if not (math.isfinite(block_time) and block_time > 0) or tempo < 2:
        fail("--block-time must be positive and --tempo at least 2")
    # Logs and the summary table are read in files and CI too: don't squeeze them into 80 columns.
    console = out if out.is_terminal else Console(width=160)
    code = run_up(
        data_dir, port=port, miners=miners, demo=demo, cheaters=cheater, exit_after=exit_after,
        block_time=block_time, tempo=tempo, profile=profile, console=console,
    )  # fmt: skip
    raise typer.Exit(code)


def _register_subcommands() -> None:
    from dippy_studio.chain.cli import chain_app
    from dippy_studio.miner.cli import miner_app
    from dippy_studio.orchestrator.cli import orchestrator_app
    from dippy_studio.validator.cli import validator_app

    app.add_typer(miner_app, name="miner")
    app.add_typer(orchestrator_app, name="orchestrator")
    app.add_typer(validator_app, name="validator")
    app.add_typer(chain_app, name="chain")


_register_subcommands()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _progress(disabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        disable=disabled,
        transient=True,
    )


@app.command()
def train(
    dataset: Annotated[
        Path, typer.Argument(help="Folder or .zip of images (png/jpg/webp) with same-name .txt captions.")
    ],
    trigger: Annotated[
        str | None, typer.Option("--trigger", help="Trigger word: replaces [trigger] in captions, else is prepended.")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="LoRA rank (profile default: 16 for Flux, 4 for tiny).")] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: the rank).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (profile default: 1000 for Flux).")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate (profile default: 1e-4 for Flux).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per step.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Square training resolution, a multiple of 16.")] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target", help="Transformer layer name to adapt; repeatable (default: to_q to_k to_v to_out.0)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Training seed: same data, config, seed and profile give the same file.")
    ] = 0,
    max_seconds: Annotated[
        float | None, typer.Option("--max-seconds", help="Time budget; stops early and still writes the LoRA.")
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option("--checkpoint-every", help="Save a checkpoint every N steps, as OUTPUT_NAME.ckpt.safetensors."),
    ] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue from this checkpoint.")] = None,
    profile: ProfileOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    attention_backend: AttentionOpt = None,
    threads: ThreadsOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the LoRA (.safetensors).")] = Path(
        "lora.safetensors"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Train a Flux LoRA on a captioned image dataset and write it as diffusers-format .safetensors."""
    from dippy_studio.engine.datasets import load_dataset
    from dippy_studio.engine.training import TrainConfig, train_lora

    options = engine_options(profile, model_path, device, dtype, threads, attention_backend)
    try:
        config = TrainConfig(
            profile=options.profile,
            trigger=trigger,
            rank=rank,
            alpha=alpha,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            resolution=resolution,
            targets=tuple(target) if target else None,
            seed=seed,
        )
    except ValidationError as exc:
        fail(describe_validation(exc))
    try:
        data = load_dataset(dataset)
    except EngineError as exc:
        fail(str(exc))
    with _train_progress(disabled=as_json) as progress:
        task = progress.add_task("loading model and encoding the dataset", total=config.steps, loss="", eta="")

        def report(update) -> None:
            progress.update(
                task,
                description="training",
                completed=update.step,
                loss=f"loss {update.loss:.4f}",
                eta=f"eta {update.eta:.0f}s" if update.eta is not None else "",
            )

        try:
            result = train_lora(
                data,
                output,
                config,
                options=options,
                resume=resume,
                checkpoint_every=checkpoint_every,
                max_seconds=max_seconds,
                on_progress=report,
            )
        except EngineError as exc:
            progress.stop()
            fail(str(exc))
    summary = {
        "output": str(result.path),
        "sha256": result.sha256,
        "steps": result.steps,
        "planned_steps": result.planned_steps,
        "stopped_early": result.stopped_early,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 3),
        "steps_per_second": round(result.steps_per_second, 3),
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "metadata": result.metadata,
    }
    if as_json:
        print(json.dumps(summary))
        return
    out.print(f"wrote {result.path}", soft_wrap=True)
    out.print(f"sha256      {result.sha256}")
    note = " (stopped by --max-seconds)" if result.stopped_early else ""
    out.print(f"steps       {result.steps}/{result.planned_steps}{note}")
    if result.final_loss is not None:
        out.print(f"final loss  {result.final_loss:.4f}")
    out.print(f"speed       {result.steps_per_second:.1f} steps/s")
    if result.checkpoint:
        out.print(f"checkpoint  {result.checkpoint}", soft_wrap=True)


@app.command("eval-lora")
def eval_lora(
    lora: Annotated[Path, typer.Argument(help="The LoRA (.safetensors) to judge.")],
    heldout_dataset: Annotated[Path, typer.Argument(help="Held-out images: a folder or .zip with .txt captions.")],
    seed: Annotated[
        list[int] | None, typer.Option("--seed", help="Evaluation seed; repeatable (default: 0 1 2).")
    ] = None,
    trigger: Annotated[
        str | None, typer.Option("--trigger", help="Trigger word for the captions (default: the LoRA's own).")
    ] = None,
    resolution: Annotated[
        int | None, typer.Option(help="Evaluation resolution (default: the LoRA's training resolution).")
    ] = None,
    profile: ProfileOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    attention_backend: AttentionOpt = None,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Held-out flow-matching loss of the base model and with the LoRA, and the relative improvement."""
    from dippy_studio.engine.evaluation import DEFAULT_SEEDS, evaluate_lora
    from dippy_studio.engine.training import META, read_metadata

    if profile is None and model_path is None:
        try:  # the LoRA names the profile it was trained on; a bad file is reported by evaluate_lora
            profile = read_metadata(lora).get(f"{META}profile")
        except EngineError:
            profile = None
    options = engine_options(profile, model_path, device, dtype, threads, attention_backend)
    try:
        result = evaluate_lora(
            options,
            lora,
            heldout_dataset,
            tuple(seed) if seed else DEFAULT_SEEDS,
            trigger=trigger,
            resolution=resolution,
        )
    except EngineError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    table = Table(title=f"{lora.name} on {heldout_dataset.name} ({result.images} images, profile {options.profile})")
    for column in ("noise level", "base loss", "LoRA loss", "improvement"):
        table.add_column(column, justify="right")
    for sigma, base, with_lora in result.by_sigma:
        table.add_row(f"{sigma:g}", f"{base:.4f}", f"{with_lora:.4f}", f"{(base - with_lora) / base:+.1%}")
    table.add_row(
        "all", f"{result.base_loss:.4f}", f"{result.lora_loss:.4f}", f"{result.improvement:+.1%}", style="bold"
    )
    out.print(table)
    out.print(f"base loss   {result.base_loss:.6f}")
    out.print(f"LoRA loss   {result.lora_loss:.6f}")
    out.print(f"improvement {result.improvement:+.2%}")


def _train_progress(disabled: bool) -> Progress:
    # The ETA column is the trainer's own estimate: it also knows about --max-seconds.
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"),
        console=err,
        disable=disabled,
        transient=False,
    )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
