"""`dippy-studio miner ...`: run the miner service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

miner_app = typer.Typer(help="Run a miner: signed HTTP API for inference and LoRA training.", no_args_is_help=True)


@miner_app.command()
def serve(
    wallet: Annotated[str | None, typer.Option("--wallet", help="Bittensor wallet name.")] = None,
    hotkey: Annotated[str | None, typer.Option("--hotkey", help="Hotkey name in the wallet.")] = None,
    wallet_path: Annotated[Path | None, typer.Option("--wallet-path", help="Wallets directory.")] = None,
    dev_key: Annotated[str | None, typer.Option("--dev-key", help="Dev key URI such as //Alice (local use).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    profile: Annotated[str | None, typer.Option("--profile", help="Model profile.")] = None,
    model_path: Annotated[Path | None, typer.Option("--model-path", help="Local model directory.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda.")] = None,
    allow_hotkey: Annotated[
        list[str] | None, typer.Option("--allow-hotkey", help="SS58 hotkey allowed to send jobs; repeatable.")
    ] = None,
    allow_loopback: Annotated[
        bool | None, typer.Option("--allow-loopback/--no-allow-loopback", help="Allow loopback URLs.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Where jobs, results and caches live.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
) -> None:
    """Serve the miner API until interrupted. Settings: flags > DIPPY_MINER_* env > --config file."""
    import uvicorn

    from dippy_studio.cli_support import describe_validation, fail
    from dippy_studio.engine.errors import EngineError
    from dippy_studio.miner.app import create_app
    from dippy_studio.miner.settings import MinerSettings
    from dippy_studio.protocol.keys import SigningKeyError

    engine_overrides = {k: v for k, v in {"profile": profile, "model_path": model_path, "device": device}.items() if v}
    overrides = {
        "engine": engine_overrides or None,
        "wallet_name": wallet,
        "wallet_hotkey": hotkey,
        "wallet_path": wallet_path,
        "dev_key": dev_key,
        "host": host,
        "port": port,
        "allow_hotkeys": allow_hotkey or None,
        "allow_loopback_urls": allow_loopback,
        "data_dir": data_dir,
    }
    try:
        settings = MinerSettings.load(config, **overrides)
        if not (settings.dev_key or settings.wallet_name):
            fail("no signing key: pass --wallet NAME --hotkey NAME, or --dev-key //Alice for local use")
        app = create_app(settings)
    except ValidationError as exc:
        fail(describe_validation(exc))
    except (ValueError, EngineError, SigningKeyError) as exc:
        fail(str(exc))
    from dippy_studio.logs import configure_logging

    configure_logging()
    miner = app.state.miner
    typer.echo(
        f"miner {miner.signer.ss58_address} on http://{settings.host}:{settings.port} "
        f"profile {miner.engine.spec.name} fingerprint {miner.engine.fingerprint} "
        f"(model loaded in {miner.engine.load_seconds:.1f} s)",
        err=True,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
