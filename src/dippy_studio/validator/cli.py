"""`dippy-studio validator run`: scores -> weights -> chain, every tempo.

With `--data-dir DIR` it uses the local subnet kept there by `dippy-studio up`: the chain in
DIR/chain.sqlite and DIR/subnet.json for the orchestrator's address and hotkey and this
validator's dev key. Flags override what the file says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

validator_app = typer.Typer(help="Run a validator: set weights from the orchestrator's signed scores.",
                            no_args_is_help=True)  # fmt: skip
SUBNET_FILE = "subnet.json"
console = Console()


def show_report(report) -> None:
    title = f"block {report.block}: {report.action} ({report.reason})"
    if not report.rows:
        console.print(title, highlight=False)
        return
    table = Table(title=title, title_justify="left")
    for column in ("uid", "hotkey", "score", "target", "smoothed", "u16"):
        table.add_column(column, justify="left" if column == "hotkey" else "right")
    for row in report.rows:
        table.add_row(
            str(row["uid"]), str(row["hotkey"])[:12],
            *("-" if row[k] is None else f"{row[k]:.4f}" for k in ("score", "target", "smoothed")),
            str(row["u16"]),
        )  # fmt: skip
    console.print(table)


@validator_app.command()
def run(
    once: Annotated[bool, typer.Option("--once", help="Run one round and exit.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and print weights; set nothing.")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar=["DIPPY_VALIDATOR_DATA_DIR", "DIPPY_DATA_DIR"],  # the service's own variable first
            help="Local subnet dir. Default: .dippy",
            show_default=False,
        ),
    ] = None,
    orchestrator_url: Annotated[str | None, typer.Option(help="Orchestrator base URL.")] = None,
    orchestrator_hotkey: Annotated[str | None, typer.Option(help="SS58 hotkey that must sign scores.")] = None,
    dev_key: Annotated[str | None, typer.Option("--dev-key", help="Validator dev key URI, e.g. //Alice.")] = None,
    wallet: Annotated[str | None, typer.Option("--wallet", help="Bittensor wallet name.")] = None,
    hotkey: Annotated[str | None, typer.Option("--hotkey", help="Hotkey name in the wallet. Default: default")] = None,
    wallet_path: Annotated[Path | None, typer.Option("--wallet-path", help="Wallets directory.")] = None,
    network: Annotated[str | None, typer.Option("--network", help="finney, test, or ws://... (real chain).")] = None,
    netuid: Annotated[int | None, typer.Option("--netuid", help="Subnet uid on the real chain.")] = None,
    alpha: Annotated[float | None, typer.Option(help="EMA weight of the new round (0..1]. Default: 0.1")] = None,
    burn_uid: Annotated[int | None, typer.Option(help="uid that receives the burn share.")] = None,
    burn_share: Annotated[float | None, typer.Option(help="Share of weight burned to --burn-uid. Default: 0")] = None,
    version_key: Annotated[int | None, typer.Option(help="version_key sent with set_weights. Default: 0")] = None,
    max_scores_age: Annotated[
        float | None, typer.Option(help="Reject scores whose window ended longer ago (s). Default: 3600")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
) -> None:
    """Run the validator loop (or one round with --once) and print the weights table each round.
    Settings: flags > DIPPY_VALIDATOR_* env > --config file > DATA_DIR/subnet.json (local subnets)."""
    from pydantic import ValidationError

    from dippy_studio.chain.cli import open_chain
    from dippy_studio.cli_support import describe_validation, fail
    from dippy_studio.protocol.keys import SigningKeyError, load_signer
    from dippy_studio.validator.loop import StateError, Validator
    from dippy_studio.validator.settings import ValidatorSettings

    overrides = {
        "data_dir": data_dir,
        "orchestrator_url": orchestrator_url,
        "orchestrator_hotkey": orchestrator_hotkey,
        "dev_key": dev_key,
        "wallet_name": wallet,
        "wallet_hotkey": hotkey,
        "wallet_path": wallet_path,
        "network": network,
        "netuid": netuid,
        "alpha": alpha,
        "burn_uid": burn_uid,
        "burn_share": burn_share,
        "version_key": version_key,
        "max_scores_age_s": max_scores_age,
    }
    try:
        settings = ValidatorSettings.load(config, **overrides)
    except ValidationError as exc:
        fail(describe_validation(exc))
    except ValueError as exc:
        fail(str(exc))
    local = _subnet_file(settings.data_dir) if settings.network is None else {}
    settings = settings.model_copy(update=_from_subnet_file(settings, local))
    if not settings.orchestrator_url or not settings.orchestrator_hotkey:
        fail("need --orchestrator-url and --orchestrator-hotkey (or a --data-dir made by `dippy-studio up`)")
    try:
        extra = {"wallet_path": settings.wallet_path} if settings.wallet_path else {}
        signer = (
            load_signer(uri=settings.dev_key, wallet_name=settings.wallet_name, hotkey=settings.wallet_hotkey, **extra)
            if (settings.dev_key or settings.wallet_name)
            else None
        )
    except SigningKeyError as exc:
        fail(str(exc))
    if signer is None:
        fail("no signing key: pass --wallet NAME --hotkey NAME, or --dev-key //Alice for local use")
    chain = open_chain(settings.data_dir, settings.network, settings.netuid)
    from dippy_studio.logs import configure_logging

    configure_logging()
    try:
        validator = Validator(settings, chain, signer)
    except StateError as exc:
        fail(str(exc))
    if once or dry_run:
        show_report(validator.run_round(dry_run=dry_run))
        return
    validator.run_forever(local.get("block_time", 12.0), show_report)


def _from_subnet_file(settings, local: dict) -> dict:
    """What a local subnet's subnet.json supplies: only settings no flag, variable or file gave."""
    update = {}
    for key in ("orchestrator_url", "orchestrator_hotkey"):
        if getattr(settings, key) is None and local.get(key):
            update[key] = local[key]
    if not (settings.wallet_name or settings.dev_key) and local.get("validator_wallet"):
        update["wallet_name"] = local["validator_wallet"]
        update["wallet_path"] = settings.wallet_path or settings.data_dir / "wallets"
    return update


def _subnet_file(data_dir: Path) -> dict:
    """What DATA_DIR/subnet.json says, checked: a message and exit 2 for a file that is not JSON
    or whose fields are not what `dippy-studio up` writes."""
    from dippy_studio.cli_support import fail

    path = data_dir / SUBNET_FILE
    if not path.is_file():
        return {}
    try:
        local = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"{path} is not valid JSON ({exc})")
    if not isinstance(local, dict):
        fail(f"{path} is not a JSON object")
    for key in ("orchestrator_url", "orchestrator_hotkey", "validator_wallet"):
        if local.get(key) is not None and not isinstance(local[key], str):
            fail(f"{path}: {key} must be a string")
    block_time = local.get("block_time", 12.0)
    # bool is an int to Python, never a block time.
    if isinstance(block_time, bool) or not isinstance(block_time, int | float) or not 0 < block_time < math.inf:
        fail(f"{path}: block_time must be a positive number of seconds, got {block_time!r}")
    return {**local, "block_time": float(block_time)}
