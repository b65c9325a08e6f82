"""The `dippy-studio` command line. Thin: parses arguments and calls into the packages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dippy_studio.engine.errors import EngineError
from dippy_studio.settings import Settings

app = typer.Typer(
    help="Dippy Studio: deterministic Flux generation and LoRA training for a Bittensor subnet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

ProfileOpt = Annotated[
    str | None, typer.Option("--profile", help="Model profile: tiny, small, flux-dev, flux-schnell.")
]
ModelPathOpt = Annotated[Path | None, typer.Option("--model-path", help="Local diffusers-layout model directory.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32 or bfloat16.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Torch threads (part of the fingerprint).")]


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "input"
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def engine_options(
    profile: str | None,
    model_path: Path | None,
    device: str | None,
    dtype: str | None,
    threads: int | None,
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
    width: Annotated[int, typer.Option(help="Width in pixels, a multiple of 16.")] = 64,
    height: Annotated[int, typer.Option(help="Height in pixels, a multiple of 16.")] = 64,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (profile default if unset).")] = None,
    lora: Annotated[
        list[str] | None, typer.Option("--lora", help="LoRA .safetensors as PATH[:SCALE]; repeatable.")
    ] = None,
    profile: ProfileOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the PNG.")] = Path("out.png"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Generate one image and print its sha256 and the profile fingerprint."""
    from dippy_studio.engine import Engine, GenerationRequest
    from dippy_studio.engine.profiles import get_profile

    options = engine_options(profile, model_path, device, dtype, threads)
    loras = [parse_lora(s) for s in lora or []]
    try:
        spec = get_profile(options.profile)
        request = GenerationRequest(
            prompt=prompt,
            seed=seed,
            width=width,
            height=height,
            steps=steps if steps is not None else spec.default_steps,
            guidance=guidance if guidance is not None else spec.default_guidance,
            loras=loras,
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
            "timings": result.timings.as_dict(),
            "loras": result.loras,
        }
        print(json.dumps(payload))
    else:
        out.print(f"wrote {output}")
        out.print(f"sha256      {result.sha256}")
        out.print(f"fingerprint {result.fingerprint}")


@app.command()
def profile(
    profile: ProfileOpt = None,
    model_path: ModelPathOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    save: Annotated[Path | None, typer.Option("--save", help="Write the pipeline here in diffusers layout.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print a profile's fingerprint and its parts; optionally save its pipeline to a directory."""
    from dippy_studio.engine import Engine
    from dippy_studio.engine.profiles import save_pipeline

    options = engine_options(profile, model_path, device, dtype, threads)
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


def _register_subcommands() -> None:
    from dippy_studio.chain.cli import chain_app
    from dippy_studio.miner.cli import miner_app

    app.add_typer(miner_app, name="miner")
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
