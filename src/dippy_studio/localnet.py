"""`dippy-studio up`: a whole local subnet on one machine, supervised as child processes.

Layout of the data directory (a second `up` on it resumes the same subnet):

    DIR/subnet.json          ports, hotkeys and addresses (read by `validator run --data-dir`)
    DIR/chain.sqlite         the LocalChain
    DIR/wallets/             dev wallets: owner, orchestrator, validator, miner-0..N-1
    DIR/orchestrator.sqlite  jobs, API keys, scores (the orchestrator's database)
    DIR/dashboard-token      the dashboard's operator token (mode 0600), made by the first `up`
    DIR/api-key              the local client API key `up` prints (mode 0600), reused while it is live
    DIR/miners/miner-I/      each miner's jobs, results and caches
    DIR/logs/NAME.log        each process's output (also shown, prefixed, on the terminal)
    DIR/pids.json            each running process's pid, by name (while `up` runs)

A process that dies is started again after a delay that doubles with each crash in a row
(`RestartPolicy`); one that keeps crashing right after it starts stops the whole subnet.

Keys are deterministic dev keys (`//dippy/NAME`): fine on a laptop, never for real value.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeVar

import httpx
from rich.console import Console

from dippy_studio.chain.base import AlreadyRegistered, ChainError, Hyperparameters
from dippy_studio.chain.local import LocalChain
from dippy_studio.protocol.keys import SigningKeyError, WalletExistsError, create_dev_wallet, signer_from_wallet
from dippy_studio.subnet_layout import MinerSpec, SubnetLayout, SubnetLayoutError

COLORS = ["cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta"]
VALIDATOR_STAKE = 1000.0
DASHBOARD_TOKEN_FILE = "dashboard-token"
API_KEY_FILE = "api-key"
# How often the supervisor looks for children that died.
TEND_INTERVAL_S = 0.5

T = TypeVar("T")


def free_port(preferred: int | None = None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


def dev_wallet(root: Path, name: str) -> str:
    """Create (or reuse) the dev wallet `name`; returns its hotkey address."""
    path = root / "wallets"
    try:
        return create_dev_wallet(
            name, "default", path, hotkey_uri=f"//dippy/{name}", coldkey_uri=f"//dippy/{name}/cold"
        ).ss58_address
    except WalletExistsError:
        return signer_from_wallet(name, "default", path).ss58_address


def prepare(
    root: Path, *, port: int, miners: int, cheaters: int, block_time: float, tempo: int, console: Console
) -> SubnetLayout:
    """Create the subnet (wallets, chain, registrations, stake, endpoints) or resume it."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SubnetDirError(f"cannot use {root} as the subnet's directory: {exc.strerror}") from None
    layout = SubnetLayout.load(root)
    if layout is not None and len(layout.miners) != miners:
        console.print(f"resuming {root}: it has {len(layout.miners)} miners (ignoring --miners {miners})")
    if layout is None:
        names = [f"miner-{i}" for i in range(miners)]
        layout = SubnetLayout(
            data_dir=str(root), block_time=block_time, tempo=tempo, orchestrator_port=port,
            orchestrator_url=f"http://127.0.0.1:{port}", orchestrator_hotkey=dev_wallet(root, "orchestrator"),
            validator_hotkey=dev_wallet(root, "validator"), owner_hotkey=dev_wallet(root, "owner"),
            miners=[MinerSpec(name, free_port(), dev_wallet(root, name)) for name in names],
        )  # fmt: skip
    layout.orchestrator_port = port
    layout.orchestrator_url = f"http://127.0.0.1:{port}"
    for i, miner in enumerate(layout.miners):
        miner.cheater = i >= len(layout.miners) - cheaters
        miner.port = free_port(miner.port)
    chain = LocalChain(
        root / "chain.sqlite",
        block_time=layout.block_time,
        hyperparameters=Hyperparameters(tempo=layout.tempo, weights_rate_limit=max(1, layout.tempo // 2)),
    )
    cold = {"owner": "owner", "validator": "validator", "orchestrator": "orchestrator"}
    for name, hotkey in [("owner", layout.owner_hotkey), ("validator", layout.validator_hotkey),
                         *((m.name, m.hotkey) for m in layout.miners)]:  # fmt: skip
        coldkey = signer_from_wallet(cold.get(name, name), "default", root / "wallets").ss58_address
        with contextlib.suppress(AlreadyRegistered):
            chain.register(hotkey, coldkey)
    if (chain.metagraph().stake_of(layout.validator_hotkey) or 0.0) < VALIDATOR_STAKE:
        chain.add_stake(layout.validator_hotkey, VALIDATOR_STAKE)
    for miner in layout.miners:
        chain.commit(miner.hotkey, f"http://127.0.0.1:{miner.port}")
    layout.save()
    return layout


class SubnetDirError(RuntimeError):
    """The data directory cannot hold, or resume, a subnet: what is wrong, and where."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that died is started again: after `first_delay_s`, doubling with each crash in
    a row up to `max_delay_s`. A child that stayed up `stable_s` starts the count again; one that
    crashes `give_up_after` times in a row without staying up that long would only crash again (a
    port in use, a bad setting), so the subnet stops instead."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 30.0
    give_up_after: int = 7

    def delay(self, crashes: int) -> float:
        """Seconds to wait before starting a child again after its `crashes`-th crash in a row."""
        return min(self.first_delay_s * 2 ** (crashes - 1), self.max_delay_s)


class GaveUp(RuntimeError):
    """A child kept crashing right after it started."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    color: str
    proc: subprocess.Popen
    started_at: float  # the supervisor's clock
    crashes: int = 0  # in a row, since it last stayed up `stable_s`
    restarts: int = 0
    restart_at: float | None = None  # set while it is dead and waiting for its restart


def cli(*args: str) -> list[str]:
    """The command line of a `dippy-studio` subcommand run by this Python."""
    return [sys.executable, "-m", "dippy_studio.cli", *args]


def exit_reason(code: int) -> str:
    """`Popen.returncode` as an operator reads it: "code 1", or "code -9 (SIGKILL)"."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"code {code} ({signal.Signals(-code).name})"
    return f"code {code}"


class Supervisor:
    """Starts child processes in their own process groups, prefixes their output, restarts those
    that die (`tend`, by `policy`), and stops them all (TERM, then KILL) on exit, so no orphans are
    left behind. Their pids are kept in DIR/pids.json while they run."""

    def __init__(
        self,
        root: Path,
        console: Console,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.console = console
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.children: dict[str, Child] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    @property
    def pids_path(self) -> Path:
        return self.root / "pids.json"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        color = COLORS[len(self.children) % len(COLORS)]
        proc = self._spawn(name, argv, env or {}, color)
        self.children[name] = Child(name, argv, env or {}, color, proc, self.clock())
        self._write_pids()
        return proc

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], color: str) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "a", buffering=1)  # noqa: SIM115 (closed by the pump)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                self.console.print(f"[{color}]{name:>12}[/] | {line.rstrip()}", highlight=False, markup=True)
            log.close()

        threading.Thread(target=pump, name=f"log-{name}", daemon=True).start()
        self.console.print(f"started {name} (pid {proc.pid})", highlight=False)
        return proc

    def dead(self) -> list[str]:
        return [name for name, child in self.children.items() if child.proc.poll() is not None]

    def tend(self) -> None:
        """Notice children that died and restart those whose delay is over. Raises GaveUp when one
        has crashed `policy.give_up_after` times in a row."""
        now = self.clock()
        for child in self.children.values():
            if child.restart_at is None:
                code = child.proc.poll()
                if code is not None:
                    # What it left behind in its process group (workers) would hold its port.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                    self._schedule_restart(child, code, now)
            elif now >= child.restart_at:
                child.proc = self._spawn(child.name, child.argv, child.env, child.color)
                child.started_at, child.restart_at = now, None
                self._write_pids()

    def _schedule_restart(self, child: Child, code: int, now: float) -> None:
        policy = self.policy
        child.crashes = 1 if now - child.started_at >= policy.stable_s else child.crashes + 1
        if child.crashes >= policy.give_up_after:
            raise GaveUp(
                f"{child.name} crashed {child.crashes} times in a row, never staying up {policy.stable_s:g} s "
                f"(last exit: {exit_reason(code)}); stopping the subnet. See {self.root / 'logs' / child.name}.log"
            )
        delay = policy.delay(child.crashes)
        child.restarts += 1
        child.restart_at = now + delay
        self._write_pids()
        restarting = f"restarting in {delay:g} s (restart {child.restarts})"
        self.console.print(f"[red]{child.name} exited with {exit_reason(code)}; {restarting}[/]", highlight=False)

    def supervise_forever(self) -> NoReturn:
        """Restart children that die, until Ctrl-C, SIGTERM or GaveUp."""
        while True:
            self.tend()
            time.sleep(TEND_INTERVAL_S)

    def supervise_while(self, work: Callable[[], T]) -> T:
        """Run `work` in a thread while this one restarts children that die; its result (or error)."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(work())
            except BaseException as exc:
                done.set_exception(exc)

        # A daemon: if this thread stops the subnet first, `work` fails or is cut off with it.
        threading.Thread(target=run, name="supervised-work", daemon=True).start()
        while not done.done():
            self.tend()
            with contextlib.suppress(TimeoutError):
                done.exception(TEND_INTERVAL_S)
        return done.result()

    def _write_pids(self) -> None:
        pids = {name: child.proc.pid for name, child in self.children.items() if child.restart_at is None}
        partial = self.pids_path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(pids, indent=2) + "\n")
        partial.replace(self.pids_path)

    def stop(self, timeout: float = 10.0) -> None:
        procs = [child.proc for child in self.children.values()]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.pids_path.unlink(missing_ok=True)


def wait_ready(url: str, name: str, supervisor: Supervisor | None, timeout: float = 180.0) -> None:
    """Poll `url` until it answers 200; with a supervisor, give up early if the process `name`
    exits meanwhile (while the subnet starts, a crash is an error: nothing restarts it yet)."""
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        if supervisor is not None and name in supervisor.dead():
            raise RuntimeError(f"{name} exited while starting; see {supervisor.root}/logs/{name}.log")
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.3)
    raise RuntimeError(f"{name} was not ready at {url} within {timeout:.0f}s (last: {last})")


def dashboard_token(root: Path) -> str:
    """The subnet's dashboard operator token: made on the first `up` and kept in
    DIR/dashboard-token (readable by its owner only), so a second `up` and open tabs keep it."""
    path = root / DASHBOARD_TOKEN_FILE
    if path.is_file() and (kept := path.read_text().strip()):
        return kept
    token = secrets.token_urlsafe(32)
    _write_private(path, token)
    return token


def _write_private(path: Path, text: str) -> None:
    """`text` in `path`, readable by its owner only. Written whole, then renamed: an `up` killed
    halfway never leaves an empty file behind."""
    partial = path.with_name(path.name + ".tmp")
    partial.unlink(missing_ok=True)
    with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text + "\n")
    partial.replace(path)


def ports_in_use(ports: list[int], host: str = "127.0.0.1") -> list[int]:
    """Those of `ports` that something already listens on (or holds) at `host`."""
    taken = []
    for port in ports:
        with socket.socket() as sock:
            # As servers bind (uvicorn too): connections of a previous run in TIME_WAIT do not
            # hold the port, a listener does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                taken.append(port)
    return taken


def dashboard_url(layout: SubnetLayout) -> str:
    """The URL that opens the dashboard: its token sets the browser's cookie, then leaves the address bar."""
    return f"{layout.orchestrator_url}/dashboard?token={dashboard_token(layout.root)}"


def start_processes(layout: SubnetLayout, supervisor: Supervisor, profile: str) -> None:
    root = layout.root
    wallets = str(root / "wallets")
    for miner in layout.miners:
        # A demo cheater fakes every job (inference with a wrong seed, training skipped), so its
        # first audit catches it.
        env = {"DIPPY_MINER_CHEAT_RATE": "1.0"} if miner.cheater else {}
        supervisor.start(miner.name, cli(
            "miner", "serve", "--wallet", miner.name, "--hotkey", "default", "--wallet-path", wallets,
            "--port", str(miner.port), "--allow-hotkey", layout.orchestrator_hotkey, "--allow-loopback",
            "--data-dir", str(root / "miners" / miner.name), "--profile", profile,
        ), env)  # fmt: skip
    orch_env = {
        "DIPPY_ORCH_WALLET_NAME": "orchestrator", "DIPPY_ORCH_WALLET_PATH": wallets,
        "DIPPY_ORCH_CHAIN_PATH": str(root / "chain.sqlite"), "DIPPY_ORCH_PUBLIC_URL": layout.orchestrator_url,
        "DIPPY_ORCH_ALLOW_LOOPBACK_URLS": "true", "DIPPY_ORCH_PROFILE": profile,
        "DIPPY_ORCH_DASHBOARD_TOKEN": dashboard_token(root),
        "DIPPY_ORCH_SCORE_INTERVAL_S": "5",
        # A laptop demo audits every job of a miner's probation: cheap on tiny, and a cheater is caught at once.
        "DIPPY_ORCH_AUDIT_PROBATION_RATE": "1.0", "DIPPY_ORCH_SYNC_INTERVAL_S": "5", "DIPPY_ORCH_PROBE_INTERVAL_S": "3",
    }  # fmt: skip
    supervisor.start("orchestrator", cli("orchestrator", "serve", "--data-dir", str(root),
                                         "--port", str(layout.orchestrator_port)), orch_env)  # fmt: skip
    for miner in layout.miners:
        wait_ready(f"http://127.0.0.1:{miner.port}/health", miner.name, supervisor)
    wait_ready(f"{layout.orchestrator_url}/health", "orchestrator", supervisor)
    supervisor.start("validator", cli("validator", "run", "--data-dir", str(root)))


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def create_api_key(root: Path, name: str = "local") -> tuple[str, str]:
    """A fresh client key in the orchestrator's database: (key, webhook secret)."""
    from dippy_studio.orchestrator.db import default_url
    from dippy_studio.orchestrator.store import Store

    store = Store.open(default_url(root))
    try:
        created = store.create_api_key(name, rate_limit_per_minute=6000)
        return created.secret, created.key.webhook_secret
    finally:
        store.close()


def local_api_key(root: Path) -> tuple[str, str]:
    """The subnet's own client key, (key, webhook secret): the one in DIR/api-key while it is a
    live key of this subnet's database, else a new one, kept there (readable by its owner only)
    so that every `up` prints the same key and scripts written against it keep working."""
    from dippy_studio.orchestrator.db import default_url
    from dippy_studio.orchestrator.store import Store

    path = root / API_KEY_FILE
    kept = path.read_text().strip() if path.is_file() else ""
    store = Store.open(default_url(root))
    try:
        key = store.key_for_secret(kept) if kept else None
        if key is not None:
            return kept, key.webhook_secret
        created = store.create_api_key("local", rate_limit_per_minute=6000)
    finally:
        store.close()
    _write_private(path, created.secret)
    return created.secret, created.key.webhook_secret


def wait_for_weights(layout: SubnetLayout, after_block: int, timeout: float) -> bool:
    """Wait until the validator has set weights at a block after `after_block`."""
    chain = LocalChain(layout.root / "chain.sqlite", create=False)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        me = chain.metagraph().by_hotkey(layout.validator_hotkey)
        if me is not None and me.last_update is not None and me.last_update > after_block:
            return True
        time.sleep(1.0)
    return False


def run_up(
    root: Path,
    *,
    port: int,
    miners: int,
    demo: bool,
    cheaters: int,
    exit_after: bool,
    block_time: float,
    tempo: int,
    profile: str,
    console: Console,
) -> int:
    """Bring the subnet up, optionally run the demo, and keep it up, restarting any process that
    dies, until Ctrl-C or SIGTERM (or, with --exit-after, the demo's end)."""
    # Ctrl-C and `kill` both mean "stop cleanly". Installed explicitly: a shell starts background
    # jobs with SIGINT ignored, and Python would keep ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    # Before anything starts: a taken port would otherwise show only once the miners are up.
    taken = ports_in_use([port])
    if taken:
        console.print(
            f"[red]error:[/] port {port} is already in use on 127.0.0.1 (another `up`, or another "
            "service?): stop it, or choose another port with --port",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    try:
        layout = prepare(
            root, port=port, miners=miners, cheaters=cheaters, block_time=block_time, tempo=tempo, console=console
        )
    except (SubnetDirError, SubnetLayoutError, ChainError, SigningKeyError) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    supervisor = Supervisor(root, console)
    try:
        console.print(f"starting a local subnet in {root}: orchestrator, {len(layout.miners)} miners, a validator")
        start_processes(layout, supervisor, profile)
        key, webhook_secret = local_api_key(root)
        url = layout.orchestrator_url
        # Unwrapped: the URL must stay one line to open from a terminal or a log.
        console.print(f"\n[bold]Subnet is up.[/] Dashboard: {dashboard_url(layout)}", highlight=False, soft_wrap=True)
        console.print(f"API key (kept in {root / API_KEY_FILE}): {key}", highlight=False, soft_wrap=True)
        console.print(f"Webhook signing secret: {webhook_secret}", highlight=False, soft_wrap=True)
        console.print(
            f"Try:\n  curl -s -X POST {url}/v1/images -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' -H 'Prefer: wait=30' "
            '-d \'{"prompt": "a red circle on a blue background", "width": 64, "height": 64}\'\n',
            highlight=False,
            soft_wrap=True,
        )
        if demo:
            # In a thread: this one restarts children that die meanwhile.
            supervisor.supervise_while(lambda: _demo(layout, key, console, profile))
        if exit_after:
            return 0
        supervisor.supervise_forever()
    except KeyboardInterrupt:
        console.print("\nstopping the subnet (data kept in " + str(root) + ")")
        return 130
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        supervisor.stop()


def _demo(layout: SubnetLayout, key: str, console: Console, profile: str) -> None:
    from dippy_studio.demo import run_demo, summary_table
    from dippy_studio.orchestrator.db import default_url
    from dippy_studio.orchestrator.store import Store

    # /ready answers 200 once the orchestrator has found a healthy miner to send jobs to.
    wait_ready(f"{layout.orchestrator_url}/ready", "orchestrator", None, timeout=120)
    result = run_demo(layout, key, console, profile)
    chain = LocalChain(layout.root / "chain.sqlite", create=False)
    demo_end = chain.block()
    console.print("waiting for the orchestrator to score and the validator to set weights...")
    wait_for_weights(layout, demo_end, timeout=layout.tempo * layout.block_time * 2 + 60)
    scores = httpx.get(f"{layout.orchestrator_url}/v1/scores", timeout=10).json().get("scores", {})
    store = Store.open(default_url(layout.root), migrate=False)
    audits: dict[str, list[str]] = {}
    for audit in store.list_audits():
        audits.setdefault(audit.miner_hotkey, []).append(audit.verdict)
    store.close()
    table, _weights = summary_table(layout, result, scores, audits)
    console.print(table)
