"""`dippy-studio chain ...`: run and inspect the local chain, or read and write a real one.

Every command works on the local chain kept in `--data-dir` (file `DIR/chain.sqlite`),
or on a real chain with `--network NAME --netuid N` (writes also need `--wallet`).
Keys on the local chain are dev URIs (`//Alice`) or ss58 addresses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlparse

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from dippy_studio.chain.base import U16_MAX, AlreadyRegistered, Chain, ChainError, ChainNotFound, Hyperparameters
from dippy_studio.chain.bittensor_chain import BittensorChain
from dippy_studio.chain.local import LocalChain

__all__ = ["CHAIN_FILE", "chain_app", "chain_path", "resolve_address"]

CHAIN_FILE = "chain.sqlite"

chain_app = typer.Typer(
    help="The chain: an embedded local chain in --data-dir, or a real one with --network.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def say(message: str) -> None:
    # soft_wrap: addresses and URLs stay on one line, whatever the terminal width.
    out.print(message, highlight=False, soft_wrap=True)


DataDirOpt = Annotated[
    Path,
    typer.Option("--data-dir", envvar="DIPPY_DATA_DIR", help="Directory of the local chain (DIR/chain.sqlite)."),
]
NetworkOpt = Annotated[
    str | None,
    typer.Option("--network", help="Use a real chain instead: finney, test, local or a ws:// endpoint."),
]
NetuidOpt = Annotated[int | None, typer.Option("--netuid", help="Subnet on the real chain (with --network).")]
WalletOpt = Annotated[str | None, typer.Option("--wallet", help="Wallet name that signs writes on a real chain.")]
WalletHotkeyOpt = Annotated[str, typer.Option("--wallet-hotkey", help="Hotkey name inside the wallet.")]
WalletPathOpt = Annotated[Path | None, typer.Option("--wallet-path", help="Wallets directory (~/.bittensor/wallets).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]

DEFAULT_DATA_DIR = Path(".dippy")


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def chain_path(data_dir: Path) -> Path:
    return data_dir / CHAIN_FILE


def resolve_address(key: str) -> str:
    """An ss58 address from a dev URI (`//Alice`), a mnemonic or seed, or an ss58 address."""
    from bittensor.keyfiles import Keypair

    key = key.strip()
    if not key:
        raise ValueError("empty key")
    if key.startswith(("//", "0x")) or " " in key:
        try:
            return str(Keypair.create_from_uri(key).ss58_address)
        except ValueError:
            # Never echo the key: a URI with a mnemonic is a secret.
            raise ValueError("cannot derive a key from the given URI") from None
    try:
        return str(Keypair(ss58_address=key).ss58_address)
    except ValueError:
        raise ValueError(f"{key!r} is neither an ss58 address nor a key URI such as //Alice") from None


def open_chain(
    data_dir: Path,
    network: str | None,
    netuid: int | None,
    wallet: str | None = None,
    wallet_hotkey: str = "default",
    wallet_path: Path | None = None,
) -> Chain:
    if network is None:
        path = chain_path(data_dir)
        try:
            return LocalChain(path, create=False)
        except ChainNotFound:
            fail(f"no local chain in {data_dir}; create one with `dippy-studio chain init --data-dir {data_dir}`")
        except ChainError as error:
            fail(str(error))
    if netuid is None:
        fail("--network needs --netuid", code=2)
    signer = None
    if wallet is not None:
        import bittensor

        if wallet_path is None:
            signer = bittensor.Wallet(wallet, wallet_hotkey)
        else:
            signer = bittensor.Wallet(wallet, wallet_hotkey, str(wallet_path.expanduser()))
    return BittensorChain(network, netuid, signer)


def _address(key: str, what: str) -> str:
    try:
        return resolve_address(key)
    except ValueError as error:
        fail(f"{what}: {error}", code=2)


def _wallet_key(chain: Chain, role: str, given: str | None, what: str) -> str:
    """The key a real-chain write acts for: the given one, else the wallet's own."""
    if given is not None:
        return _address(given, what)
    if isinstance(chain, BittensorChain) and chain.wallet is not None:
        import bittensor

        return str(bittensor.public_view(chain.wallet, role).ss58_address)
    hint = " or use --wallet" if isinstance(chain, BittensorChain) else ""
    fail(f"say which {what}: pass it as an argument{hint}", code=2)


def _short(address: str) -> str:
    # Tables show enough of an ss58 address to tell keys apart; --json has them in full.
    return address if len(address) <= 12 else f"{address[:6]}…{address[-4:]}"


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")


def show(table: Table) -> None:
    # Never squeeze numbers into ellipses on a narrow (or non-)terminal: a wide line
    # that the terminal wraps still shows every digit.
    Console(width=max(out.width, 120)).print(table)


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=None, sort_keys=False))


def _remove_sqlite(path: Path, *, keep_main: bool = False) -> None:
    """Delete an SQLite database's files (or only its -wal and -shm with `keep_main`)."""
    suffixes = ("-wal", "-shm") if keep_main else ("", "-wal", "-shm")
    for suffix in suffixes:
        path.with_name(path.name + suffix).unlink(missing_ok=True)


@chain_app.command()
def init(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    block_time: Annotated[float, typer.Option(help="Seconds per block.")] = 12.0,
    netuid: Annotated[int, typer.Option(help="The subnet's netuid.")] = 1,
    tempo: Annotated[int, typer.Option(help="Blocks per epoch.")] = 360,
    weights_rate_limit: Annotated[int, typer.Option(help="Blocks between two weight settings.")] = 100,
    max_weight_limit: Annotated[
        float, typer.Option(help="Largest share one uid may hold in a weight row (0..1].")
    ] = 1.0,
    min_allowed_weights: Annotated[int, typer.Option(help="Fewest non-zero weights per row.")] = 1,
    min_validator_stake: Annotated[float, typer.Option(help="Stake needed to set weights.")] = 1.0,
    max_validators: Annotated[int, typer.Option(help="How many of the largest stakes get permits.")] = 64,
    max_allowed_uids: Annotated[int, typer.Option(help="Uid slots.")] = 256,
    weights_version: Annotated[int, typer.Option(help="Lowest version_key accepted.")] = 0,
    emission_per_block: Annotated[float, typer.Option(help="Alpha emitted per block.")] = 1.0,
    reset: Annotated[bool, typer.Option("--reset", help="Delete an existing local chain first.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a local chain in --data-dir."""
    path = chain_path(data_dir)
    replacing = path.exists()
    if replacing and not reset:
        fail(f"{path} exists; pass --reset to replace it with a new chain")
    if not (math.isfinite(max_weight_limit) and 0 < max_weight_limit <= 1):
        fail("--max-weight-limit must be in (0, 1]", code=2)
    # A reset builds the new chain beside the old one, which goes only once the new one exists:
    # a bad flag or a failed write leaves the old chain as it was.
    target = path.with_name(path.name + ".new") if replacing else path
    _remove_sqlite(target)  # what an interrupted reset left
    try:
        hp = Hyperparameters(
            netuid=netuid,
            tempo=tempo,
            weights_rate_limit=weights_rate_limit,
            max_weight_limit=max(1, round(max_weight_limit * U16_MAX)),
            min_allowed_weights=min_allowed_weights,
            weights_version=weights_version,
            max_validators=max_validators,
            min_validator_stake=min_validator_stake,
            max_allowed_uids=max_allowed_uids,
        )
        chain = LocalChain(target, block_time, hyperparameters=hp, emission_per_block=emission_per_block)
    except (ValueError, ChainError) as error:
        if replacing:
            _remove_sqlite(target)
        fail(str(error), code=1 if isinstance(error, ChainError) else 2)
    if replacing:
        chain.close()  # the last connection checkpoints the new chain into its one file
        # The old file's WAL must not outlive it: applied to the new file it would corrupt it.
        _remove_sqlite(path, keep_main=True)
        target.replace(path)
    if as_json:
        _print_json({"path": str(path), "block_time": chain.block_time, "hyperparameters": hp.to_dict()})
        return
    say(f"created local chain {path}")
    say(
        f"netuid {hp.netuid} · block time {chain.block_time:g} s · tempo {hp.tempo} · "
        f"weights rate limit {hp.weights_rate_limit} · max weight {hp.max_weight_fraction:.4f}"
    )


@chain_app.command()
def register(
    hotkey: Annotated[str | None, typer.Argument(help="Hotkey: //Alice or an ss58 address.")] = None,
    coldkey: Annotated[
        str | None, typer.Option("--coldkey", help="Owner coldkey (local default: the hotkey itself).")
    ] = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    network: NetworkOpt = None,
    netuid: NetuidOpt = None,
    wallet: WalletOpt = None,
    wallet_hotkey: WalletHotkeyOpt = "default",
    wallet_path: WalletPathOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a hotkey on the subnet and print its uid."""
    chain = open_chain(data_dir, network, netuid, wallet, wallet_hotkey, wallet_path)
    hot = _wallet_key(chain, "hotkey", hotkey, "hotkey")
    if isinstance(chain, LocalChain):
        cold = _address(coldkey, "coldkey") if coldkey is not None else hot
    else:
        cold = _wallet_key(chain, "coldkey", coldkey, "coldkey")
    already = False
    try:
        uid = chain.register(hot, cold)
    except AlreadyRegistered as error:
        # Idempotent on purpose: setup scripts run `register` without checking first.
        uid, already = error.uid, True
    except ChainError as error:
        fail(str(error))
    if as_json:
        _print_json({"hotkey": hot, "coldkey": cold, "uid": uid, "already_registered": already})
    elif already:
        say(f"{hot} is already registered as uid {uid}")
    else:
        say(f"registered {hot} as uid {uid}")


@chain_app.command()
def stake(
    hotkey: Annotated[str, typer.Argument(help="Hotkey to stake on: //Alice or an ss58 address.")],
    amount: Annotated[float, typer.Argument(help="Amount to add (alpha locally; TAO on a real chain).")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    network: NetworkOpt = None,
    netuid: NetuidOpt = None,
    wallet: WalletOpt = None,
    wallet_hotkey: WalletHotkeyOpt = "default",
    wallet_path: WalletPathOpt = None,
) -> None:
    """Add stake to a registered hotkey."""
    if not (math.isfinite(amount) and amount > 0):
        fail("amount must be a positive number", code=2)
    hot = _address(hotkey, "hotkey")
    chain = open_chain(data_dir, network, netuid, wallet, wallet_hotkey, wallet_path)
    try:
        chain.add_stake(hot, amount)
        total = chain.metagraph().stake_of(hot)
    except ChainError as error:
        fail(str(error))
    say(f"staked {amount:g} on {hot}" + ("" if total is None else f"; it now holds {total:g}"))


@chain_app.command("commit-endpoint")
def commit_endpoint(
    hotkey: Annotated[str, typer.Argument(help="Miner hotkey: //Alice or an ss58 address.")],
    url: Annotated[str, typer.Argument(help="The miner's public base URL, e.g. http://1.2.3.4:8000.")],
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    network: NetworkOpt = None,
    netuid: NetuidOpt = None,
    wallet: WalletOpt = None,
    wallet_hotkey: WalletHotkeyOpt = "default",
    wallet_path: WalletPathOpt = None,
) -> None:
    """Publish a miner's endpoint URL as its commitment."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        fail(f"{url!r} is not an http(s) URL with a host", code=2)
    hot = _address(hotkey, "hotkey")
    chain = open_chain(data_dir, network, netuid, wallet, wallet_hotkey, wallet_path)
    try:
        chain.commit(hot, url)
    except ChainError as error:
        fail(str(error))
    say(f"committed {url} for {hot}")


@chain_app.command()
def metagraph(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    network: NetworkOpt = None,
    netuid: NetuidOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show every uid: keys, stake, validator permit, shares of the last epoch, endpoint."""
    chain = open_chain(data_dir, network, netuid)
    try:
        graph = chain.metagraph()
    except ChainError as error:
        fail(str(error))
    if as_json:
        _print_json(graph.to_dict())
        return
    table = _table(f"metagraph · netuid {graph.netuid} · block {graph.block}")
    for column in ("uid", "hotkey", "coldkey", "stake", "permit", "incentive", "dividends", "emission"):
        table.add_column(column, justify="left" if column in ("hotkey", "coldkey", "permit") else "right")
    table.add_column("endpoint")
    for n in graph.neurons:
        table.add_row(
            str(n.uid),
            _short(n.hotkey),
            _short(n.coldkey),
            f"{n.stake:,.2f}",
            "yes" if n.validator_permit else "",
            f"{n.incentive:.3f}",
            f"{n.dividends:.3f}",
            f"{n.emission:,.3f}",
            graph.endpoint_of(n.uid) or "",
        )
    show(table)


@chain_app.command()
def weights(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    network: NetworkOpt = None,
    netuid: NetuidOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the weights each validator has set (fractions of its row)."""
    chain = open_chain(data_dir, network, netuid)
    try:
        rows = chain.weights()
        block = chain.block()
    except ChainError as error:
        fail(str(error))
    if as_json:
        _print_json(
            {
                "netuid": chain.netuid,
                "block": block,
                "weights": {str(v): {str(m): w for m, w in row.items()} for v, row in sorted(rows.items())},
            }
        )
        return
    if not rows:
        say(f"no weights set on netuid {chain.netuid} (block {block})")
        return
    table = _table(f"weights · netuid {chain.netuid} · block {block}")
    table.add_column("validator", justify="right")
    table.add_column("miner", justify="right")
    table.add_column("weight", justify="right")
    for validator, row in sorted(rows.items()):
        for miner, weight in sorted(row.items()):
            table.add_row(str(validator), str(miner), f"{weight:.4f}")
    show(table)


@chain_app.command()
def emissions(
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    network: NetworkOpt = None,
    netuid: NetuidOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show who earns what: consensus, incentive and dividends of the last epoch, and totals."""
    chain = open_chain(data_dir, network, netuid)
    try:
        graph = chain.metagraph()
        totals = chain.total_emissions() if isinstance(chain, LocalChain) else None
        info = chain.epoch_info() if isinstance(chain, LocalChain) else None
    except ChainError as error:
        fail(str(error))
    rows = [
        {
            "uid": n.uid,
            "hotkey": n.hotkey,
            "validator_permit": n.validator_permit,
            "consensus": n.consensus,
            "incentive": n.incentive,
            "dividends": n.dividends,
            "emission": n.emission,
            "total_emission": None if totals is None else totals.get(n.uid, 0.0),
        }
        for n in graph.neurons
    ]
    if as_json:
        _print_json(
            {
                "netuid": graph.netuid,
                "block": graph.block,
                "epoch": None if info is None else info.to_dict(),
                "neurons": rows,
            }
        )
        return
    title = f"emissions · netuid {graph.netuid} · block {graph.block}"
    if info is not None:
        title += f" · {info.epochs} epochs · next at block {info.next_epoch_block}"
    table = _table(title)
    for column in ("uid", "hotkey", "role", "consensus", "incentive", "dividends", "last epoch"):
        table.add_column(column, justify="left" if column in ("hotkey", "role") else "right")
    if totals is not None:
        table.add_column("total", justify="right")
    for row in rows:
        cells = [
            str(row["uid"]),
            _short(row["hotkey"]),
            "validator" if row["validator_permit"] else "miner",
            f"{row['consensus']:.3f}",
            f"{row['incentive']:.3f}",
            f"{row['dividends']:.3f}",
            f"{row['emission']:,.3f}",
        ]
        if totals is not None:
            cells.append(f"{row['total_emission']:,.3f}")
        table.add_row(*cells)
    show(table)
