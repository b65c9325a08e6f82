"""`dippy-studio validator run`: scores -> weights -> chain, every tempo.

With `--data-dir DIR` it uses the local subnet kept there by `dippy-studio up`: the chain in
DIR/chain.sqlite and DIR/subnet.json for the orchestrator's address and hotkey and this
validator's dev key. Flags override what the file says.
"""

from __future__ import annotations

import json
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
    data_dir: Annotated[Path, typer.Option("--data-dir", envvar="DIPPY_DATA_DIR", help="Local subnet dir.")] = Path(
        ".dippy"
    ),
    orchestrator_url: Annotated[str | None, typer.Option(help="Orchestrator base URL.")] = None,
    orchestrator_hotkey: Annotated[str | None, typer.Option(help="SS58 hotkey that must sign scores.")] = None,
    dev_key: Annotated[str | None, typer.Option("--dev-key", help="Validator dev key URI, e.g. //Alice.")] = None,
    wallet: Annotated[str | None, typer.Option("--wallet", help="Bittensor wallet name.")] = None,
    hotkey: Annotated[str, typer.Option("--hotkey", help="Hotkey name in the wallet.")] = "default",
    wallet_path: Annotated[Path | None, typer.Option("--wallet-path", help="Wallets directory.")] = None,
    network: Annotated[str | None, typer.Option("--network", help="finney, test, or ws://... (real chain).")] = None,
    netuid: Annotated[int | None, typer.Option("--netuid", help="Subnet uid on the real chain.")] = None,
    alpha: Annotated[float, typer.Option(help="EMA weight of the new round (0..1].")] = 0.1,
    burn_uid: Annotated[int | None, typer.Option(help="uid that receives the burn share.")] = None,
    burn_share: Annotated[float, typer.Option(help="Share of weight burned to --burn-uid.")] = 0.0,
    version_key: Annotated[int, typer.Option(help="version_key sent with set_weights.")] = 0,
    max_scores_age: Annotated[float, typer.Option(help="Reject scores whose window ended longer ago (s).")] = 3600,
) -> None:
    """Run the validator loop (or one round with --once) and print the weights table each round."""
    from dippy_studio.chain.cli import open_chain
    from dippy_studio.cli import fail
    from dippy_studio.protocol.keys import SigningKeyError, load_signer
    from dippy_studio.validator.loop import Validator, ValidatorConfig

    local = _subnet_file(data_dir) if network is None else {}
    orchestrator_url = orchestrator_url or local.get("orchestrator_url")
    orchestrator_hotkey = orchestrator_hotkey or local.get("orchestrator_hotkey")
    if not (wallet or dev_key) and local.get("validator_wallet"):
        wallet, wallet_path = local["validator_wallet"], wallet_path or data_dir / "wallets"
    if not orchestrator_url or not orchestrator_hotkey:
        fail("need --orchestrator-url and --orchestrator-hotkey (or a --data-dir made by `dippy-studio up`)")
    if not (0 < alpha <= 1) or not (0 <= burn_share <= 1):
        fail("--alpha must be in (0, 1] and --burn-share in [0, 1]")
    try:
        extra = {"wallet_path": wallet_path} if wallet_path else {}
        signer = load_signer(uri=dev_key, wallet_name=wallet, hotkey=hotkey, **extra) if (dev_key or wallet) else None
    except SigningKeyError as exc:
        fail(str(exc))
    if signer is None:
        fail("no signing key: pass --wallet NAME --hotkey NAME, or --dev-key //Alice for local use")
    chain = open_chain(data_dir, network, netuid)
    config = ValidatorConfig(
        orchestrator_url=orchestrator_url, orchestrator_hotkey=orchestrator_hotkey,
        state_path=data_dir / "validator" / f"state-{signer.ss58_address[:10]}.json", alpha=alpha,
        burn_uid=burn_uid, burn_share=burn_share, version_key=version_key, max_scores_age_s=max_scores_age,
    )  # fmt: skip
    from dippy_studio.logs import configure_logging

    configure_logging()
    validator = Validator(config, chain, signer)
    if once or dry_run:
        show_report(validator.run_round(dry_run=dry_run))
        return
    block_time = float(local.get("block_time", 12.0))
    validator.run_forever(block_time, show_report)


def _subnet_file(data_dir: Path) -> dict:
    path = data_dir / SUBNET_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        from dippy_studio.cli import fail

        fail(f"{path} is not valid JSON")
