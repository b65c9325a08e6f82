"""`dippy-studio orchestrator ...`: run the server, and administration that needs no running server.

`serve` runs the orchestrator API; `audits` judges its audits in a process of its own.
`keys create|list|revoke|quota|usage` work on the same database as the server (`--data-dir` or
`--db`), and bring its schema up to date first, so they also work before the server has ever
started.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from dippy_studio.orchestrator.models import ApiKey
    from dippy_studio.orchestrator.store import Store

orchestrator_app = typer.Typer(help="The orchestrator: the subnet's front door for clients.", no_args_is_help=True)
keys_app = typer.Typer(help="Client API keys: create, list, revoke, quotas, usage.", no_args_is_help=True)
orchestrator_app.add_typer(keys_app, name="keys")

T = TypeVar("T")
err = Console(stderr=True)
out = Console()

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        # The service's own variable first: the generic one is shared by every service on a host.
        envvar=["DIPPY_ORCH_DATA_DIR", "DIPPY_DATA_DIR"],
        help="Data directory; the database is DIR/orchestrator.sqlite. Default: .dippy",
        show_default=False,
    ),
]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="Database URL (sqlite:///path or postgresql://...); overrides --data-dir."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _unknown_key(key_id: str) -> NoReturn:
    _fail(f"no API key with id {key_id!r} (see `keys list`)")


def _open_store(data_dir: Path | None, db: str | None) -> Store:
    # Imported here so `dippy-studio --help` does not pay for SQLAlchemy and Alembic.
    from sqlalchemy.exc import SQLAlchemyError

    from dippy_studio.orchestrator.db import DatabaseUrlError, default_url, error_reason, safe_url
    from dippy_studio.orchestrator.settings import IN_MEMORY_REFUSAL, in_memory_database
    from dippy_studio.orchestrator.store import Store

    url = db or default_url(data_dir or Path(".dippy"))
    if in_memory_database(url):
        _fail(IN_MEMORY_REFUSAL.format(url=safe_url(url)), 2)
    try:
        return Store.open(url)
    except DatabaseUrlError as exc:
        _fail(str(exc), 2)
    except SQLAlchemyError as exc:
        _fail(f"cannot open database {safe_url(url)}: {error_reason(exc)}", 2)
    except OSError as exc:
        _fail(f"cannot open database {safe_url(url)}: {exc}", 2)


def _public(key: ApiKey) -> dict[str, Any]:
    """What may be shown about a key at any time: never its hash or webhook secret."""
    return {
        "id": key.id,
        "name": key.name,
        "rate_limit_per_minute": key.rate_limit_per_minute,
        "quota": key.quota or None,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for.")],
    rate_limit: Annotated[int, typer.Option("--rate-limit", min=1, help="Requests per minute.")] = 60,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
) -> None:
    """Create a key. Its secret and webhook signing secret are printed once and never again."""
    with closing(_open_store(data_dir, db)) as store:
        try:
            created = store.create_api_key(name, rate_limit_per_minute=rate_limit)
        except ValueError as exc:
            _fail(f"--name: {exc}", 2)
    key = created.key
    if as_json:
        print(json.dumps({**_public(key), "key": created.secret, "webhook_secret": key.webhook_secret}))
        return
    # Plain output for the secrets: a terminal-width wrap would break copy and paste.
    typer.echo(f"Created API key {key.id} ({key.name}, {key.rate_limit_per_minute}/min)")
    typer.echo(f"  key:            {created.secret}")
    typer.echo(f"  webhook secret: {key.webhook_secret}")
    out.print("Store both now: they are not shown again.", style="yellow")


@keys_app.command("list")
def list_keys(as_json: JsonOpt = False, data_dir: DataDirOpt = None, db: DbOpt = None) -> None:
    """List keys (never their secrets)."""
    with closing(_open_store(data_dir, db)) as store:
        keys = store.list_api_keys()
    if as_json:
        print(json.dumps([_public(k) for k in keys]))
        return
    if not keys:
        out.print("No API keys yet: dippy-studio orchestrator keys create --name NAME")
        return
    table = Table("id", "name", "rate/min", "created", "status")
    for key in keys:
        status = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        created = f"{key.created_at:%Y-%m-%d %H:%M}"
        table.add_row(key.id, escape(key.name), str(key.rate_limit_per_minute), created, status)
    out.print(table)


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...), as `keys list` shows it.")],
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
) -> None:
    """Revoke a key: requests with it fail from now on. Its jobs and LoRAs are kept."""
    from dippy_studio.orchestrator.store import UnknownApiKey

    with closing(_open_store(data_dir, db)) as store:
        try:
            revoked = store.revoke_api_key(key_id)
        except UnknownApiKey:
            _unknown_key(key_id)
    typer.echo(f"Revoked {key_id}." if revoked else f"{key_id} was already revoked.")


_LIMIT_HELP = "UNIT=N: images, megapixel_steps or training_steps = a number, or none (unlimited). Repeatable."


@keys_app.command("quota")
def set_quota(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...), as `keys list` shows it.")],
    day: Annotated[list[str] | None, typer.Option("--day", metavar="UNIT=N", help=_LIMIT_HELP)] = None,
    month: Annotated[list[str] | None, typer.Option("--month", metavar="UNIT=N", help=_LIMIT_HELP)] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every limit first.")] = False,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
) -> None:
    """Show or change a key's quota: limits per UTC day and per UTC month. The limits given
    replace those of the same unit; the rest stay. A submission the quota has no room for is
    refused with 402, on every replica, from the key's next submission."""
    from pydantic import ValidationError

    from dippy_studio.orchestrator.store import UnknownApiKey
    from dippy_studio.orchestrator.usage import Quota, quota_of

    with closing(_open_store(data_dir, db)) as store:
        key = store.get_api_key(key_id)
        if key is None:
            _unknown_key(key_id)
        if day or month or clear:
            current = Quota() if clear else (quota_of(key.quota) or Quota())
            wanted = current.model_dump()
            for period, given in (("day", day or []), ("month", month or [])):
                wanted[period].update(_parse_limits(given, f"--{period}"))
            try:
                quota = Quota.model_validate(wanted)
            except ValidationError as exc:
                _fail(f"invalid quota: {exc.errors()[0]['msg']}", 2)
            try:
                key = store.set_api_key_quota(key_id, quota)
            except UnknownApiKey:
                _unknown_key(key_id)
    quota = quota_of(key.quota)
    if as_json:
        print(json.dumps({"id": key.id, "quota": None if quota is None else quota.model_dump(mode="json")}))
        return
    if quota is None:
        typer.echo(f"{key.id} has no quota (unlimited).")
        return
    typer.echo(f"{key.id} quota:")
    for period in ("day", "month"):
        limits = getattr(quota, period).limited()
        if limits:
            listed = ", ".join(f"{value:g} {unit}" for unit, value in limits.items())
            typer.echo(f"  per {period} (UTC): {listed}")


def _parse_limits(given: list[str], option: str) -> dict[str, float | None]:
    from dippy_studio.orchestrator.usage import UNITS

    limits: dict[str, float | None] = {}
    for item in given:
        unit, sep, value = item.partition("=")
        unit = unit.strip().replace("-", "_")
        if not sep or unit not in UNITS:
            _fail(f"{option} {item!r}: expected UNIT=N with UNIT one of {', '.join(UNITS)}", 2)
        value = value.strip().lower()
        if value in ("none", "null", "unlimited", ""):
            limits[unit] = None
            continue
        try:
            number = float(value)
        except ValueError:
            _fail(f"{option} {item!r}: {value!r} is not a number (or none)", 2)
        limits[unit] = int(number) if number.is_integer() and unit != "megapixel_steps" else number
    return limits


@keys_app.command("usage")
def key_usage(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...), as `keys list` shows it.")],
    days: Annotated[int, typer.Option("--days", min=1, max=366, help="How many UTC days, today last.")] = 7,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
) -> None:
    """A key's metered units per UTC day (succeeded requests), as GET /v1/usage answers it."""
    with closing(_open_store(data_dir, db)) as store:
        key = store.get_api_key(key_id)
        if key is None:
            _unknown_key(key_id)
        report = store.key_usage(key, days)
    if as_json:
        print(json.dumps(report))
        return
    table = Table("date (UTC)", "images", "megapixel-steps", "training steps")
    for row in report["days"]:
        table.add_row(row["date"], str(row["images"]), f"{row['megapixel_steps']:g}", str(row["training_steps"]))
    out.print(table)


DevKeyOpt = Annotated[str | None, typer.Option("--dev-key", help="Dev key URI such as //Alice (local use).")]
WalletOpt = Annotated[str | None, typer.Option("--wallet", help="Bittensor wallet name.")]
HotkeyOpt = Annotated[str | None, typer.Option("--hotkey", help="Hotkey name in the wallet.")]
WalletPathOpt = Annotated[Path | None, typer.Option("--wallet-path", help="Wallets directory.")]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", help="Default model (a profile) for requests naming none. Default: tiny")
]
ModelsOpt = Annotated[
    str | None, typer.Option("--models", help="Further models served, comma-separated (e.g. tiny-kontext).")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]


@orchestrator_app.command("serve")
def serve(
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="Interface to listen on. Default: 127.0.0.1")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on. Default: 8090")] = None,
    dev_key: DevKeyOpt = None,
    wallet: WalletOpt = None,
    hotkey: HotkeyOpt = None,
    wallet_path: WalletPathOpt = None,
    public_url: Annotated[
        str | None,
        typer.Option("--public-url", help="URL miners use to reach this server. Default: http://HOST:PORT"),
    ] = None,
    chain_data_dir: Annotated[
        Path | None,
        typer.Option("--chain-data-dir", help="Local chain (DIR/chain.sqlite) to sync miners from."),
    ] = None,
    profile: ProfileOpt = None,
    models: ModelsOpt = None,
    allow_loopback: Annotated[
        bool | None,
        typer.Option("--allow-loopback/--no-allow-loopback", help="Allow loopback URLs (local subnets)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Processes serving the port, each a whole orchestrator. Default: 1"),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the orchestrator API until interrupted. Settings: flags > DIPPY_ORCH_* env > --config file."""
    chain_path = None
    if chain_data_dir is not None:
        chain_path = chain_data_dir / "chain.sqlite"
        if not chain_path.is_file():
            _fail(f"no local chain in {chain_data_dir}; create one with `dippy-studio chain init --data-dir DIR`", 2)
    settings = _settings(
        config,
        data_dir=data_dir,
        db_url=db,
        host=host,
        port=port,
        dev_key=dev_key,
        wallet_name=wallet,
        wallet_hotkey=hotkey,
        wallet_path=wallet_path,
        public_url=public_url,
        chain_path=chain_path,
        profile=profile,
        models=models,
        allow_loopback_urls=allow_loopback,
        workers=workers,
    )
    from dippy_studio.logs import configure_logging
    from dippy_studio.orchestrator.app import create_app

    app = _opened(create_app, settings)

    configure_logging()
    orch = app.state.orchestrator
    plural = f", {settings.workers} workers" if settings.workers > 1 else ""
    typer.echo(
        f"orchestrator {orch.signer.ss58_address} on http://{settings.host}:{settings.port} "
        f"(public {settings.public_url}, models {', '.join(settings.served_models)}{plural})",
        err=True,
    )
    from dippy_studio.orchestrator.serve import ListenError
    from dippy_studio.orchestrator.serve import serve as serve_app

    try:
        serve_app(settings, app)
    except ListenError as exc:
        _fail(str(exc), 1)


@orchestrator_app.command("audits")
def audits(
    data_dir: DataDirOpt = None,
    db: DbOpt = None,
    dev_key: DevKeyOpt = None,
    wallet: WalletOpt = None,
    hotkey: HotkeyOpt = None,
    wallet_path: WalletPathOpt = None,
    public_url: Annotated[
        str | None,
        typer.Option("--public-url", help="The API replicas' URL, which reference workers fetch LoRAs from."),
    ] = None,
    profile: ProfileOpt = None,
    models: ModelsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Judge the audits of the API replicas on this database until interrupted: the replicas, run
    with DIPPY_ORCH_JUDGE_AUDITS=false, pick and flag the jobs; this process re-runs or measures
    them, and loads the reference models, on a machine of its own. Settings as for `serve`."""
    import signal
    import threading

    settings = _settings(
        config,
        data_dir=data_dir,
        db_url=db,
        dev_key=dev_key,
        wallet_name=wallet,
        wallet_hotkey=hotkey,
        wallet_path=wallet_path,
        public_url=public_url,
        profile=profile,
        models=models,
    )
    from dippy_studio.logs import configure_logging
    from dippy_studio.orchestrator.db import safe_url
    from dippy_studio.orchestrator.service import AuditsProcess

    process = _opened(AuditsProcess, settings)
    configure_logging()
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    typer.echo(
        f"audits for {safe_url(settings.database_url)} (models {', '.join(settings.served_models)}); "
        "each verdict is logged; Ctrl-C stops",
        err=True,
    )
    process.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        process.stop()


def _settings(config: Path | None, **overrides: Any) -> Any:
    """The orchestrator's settings: flags (`overrides`, None where not given) > DIPPY_ORCH_* env >
    the --config file > defaults; a message and exit 2 when they are wrong or name no signing key."""
    from pydantic import ValidationError

    from dippy_studio.orchestrator.settings import OrchestratorSettings

    try:
        settings = OrchestratorSettings.load(config, **overrides)
    except ValidationError as exc:
        from dippy_studio.cli_support import describe_validation

        _fail(describe_validation(exc), 2)
    except ValueError as exc:
        _fail(str(exc), 2)
    if "public_url" not in settings.model_fields_set:
        settings = settings.model_copy(update={"public_url": f"http://{settings.host}:{settings.port}"})
    if not (settings.dev_key or settings.wallet_name):
        _fail("no signing key: pass --wallet NAME --hotkey NAME, or --dev-key //Alice for local use", 2)
    return settings


def _opened(open_service: Callable[[Any], T], settings: Any) -> T:
    """`open_service(settings)` (the app, the audits process), or a message and exit 2 when what
    the settings name cannot be opened: the database, the bucket, the signing key."""
    from sqlalchemy.exc import SQLAlchemyError

    from dippy_studio.orchestrator.db import error_reason, safe_url
    from dippy_studio.protocol.keys import SigningKeyError

    try:
        return open_service(settings)
    except SQLAlchemyError as exc:
        _fail(f"cannot open database {safe_url(settings.database_url)}: {error_reason(exc)}", 2)
    except (ValueError, SigningKeyError) as exc:  # a bad database URL or bucket, audits off, no such wallet
        _fail(str(exc), 2)
