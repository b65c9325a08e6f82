"""`dippy-studio up`: a whole local subnet on one machine, supervised as child processes.

Layout of the data directory (a second `up` on it resumes the same subnet):

    DIR/subnet.json          ports, hotkeys and addresses (read by `validator run --data-dir`)
    DIR/chain.sqlite         the LocalChain
    DIR/wallets/             dev wallets: owner, orchestrator, validator, miner-0..N-1
    DIR/orchestrator.sqlite  jobs, API keys, scores (the orchestrator's database)
    DIR/miners/miner-I/      each miner's jobs, results and caches
    DIR/logs/NAME.log        each process's output (also shown, prefixed, on the terminal)

Keys are deterministic dev keys (`//dippy/NAME`): fine on a laptop, never for real value.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console

from dippy_studio.chain.base import AlreadyRegistered, Hyperparameters
from dippy_studio.chain.local import LocalChain
from dippy_studio.protocol.keys import WalletExistsError, create_dev_wallet, signer_from_wallet
from dippy_studio.subnet_layout import MinerSpec, SubnetLayout

COLORS = ["cyan", "magenta", "green", "yellow", "blue", "bright_red", "bright_cyan", "bright_magenta"]
VALIDATOR_STAKE = 1000.0


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
    root.mkdir(parents=True, exist_ok=True)
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


class Supervisor:
    """Starts child processes in their own process groups, prefixes their output, and stops
    them all (TERM, then KILL) on exit, so no orphans are left behind."""

    def __init__(self, root: Path, console: Console) -> None:
        self.root = root
        self.console = console
        self.procs: dict[str, subprocess.Popen] = {}
        (root / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        color = COLORS[len(self.procs) % len(COLORS)]
        log = open(self.root / "logs" / f"{name}.log", "a", buffering=1)  # noqa: SIM115 (closed by the pump)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dippy_studio.cli", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                self.console.print(f"[{color}]{name:>12}[/] | {line.rstrip()}", highlight=False, markup=True)
            log.close()

        threading.Thread(target=pump, name=f"log-{name}", daemon=True).start()
        self.procs[name] = proc
        return proc

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def wait_ready(url: str, name: str, supervisor: Supervisor, timeout: float = 180.0) -> None:
    """Poll `url` until it answers 200; give up early if the process `name` exits meanwhile."""
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        if name in supervisor.dead():
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


def start_processes(layout: SubnetLayout, supervisor: Supervisor, profile: str) -> None:
    root = layout.root
    wallets = str(root / "wallets")
    for miner in layout.miners:
        # A demo cheater fakes every job (inference with a wrong seed, training skipped), so its
        # first audit catches it.
        env = {"DIPPY_MINER_CHEAT_RATE": "1.0"} if miner.cheater else {}
        supervisor.start(miner.name, [
            "miner", "serve", "--wallet", miner.name, "--hotkey", "default", "--wallet-path", wallets,
            "--port", str(miner.port), "--allow-hotkey", layout.orchestrator_hotkey, "--allow-loopback",
            "--data-dir", str(root / "miners" / miner.name), "--profile", profile,
        ], env)  # fmt: skip
    orch_env = {
        "DIPPY_ORCH_WALLET_NAME": "orchestrator", "DIPPY_ORCH_WALLET_PATH": wallets,
        "DIPPY_ORCH_CHAIN_PATH": str(root / "chain.sqlite"), "DIPPY_ORCH_PUBLIC_URL": layout.orchestrator_url,
        "DIPPY_ORCH_ALLOW_LOOPBACK_URLS": "true", "DIPPY_ORCH_PROFILE": profile,
        "DIPPY_ORCH_SCORE_INTERVAL_S": "5",
        # A laptop demo audits every job of a miner's probation: cheap on tiny, and a cheater is caught at once.
        "DIPPY_ORCH_AUDIT_PROBATION_RATE": "1.0", "DIPPY_ORCH_SYNC_INTERVAL_S": "5", "DIPPY_ORCH_PROBE_INTERVAL_S": "3",
    }  # fmt: skip
    supervisor.start("orchestrator", ["orchestrator", "serve", "--data-dir", str(root),
                                      "--port", str(layout.orchestrator_port)], orch_env)  # fmt: skip
    for miner in layout.miners:
        wait_ready(f"http://127.0.0.1:{miner.port}/health", miner.name, supervisor)
    wait_ready(f"{layout.orchestrator_url}/health", "orchestrator", supervisor)
    supervisor.start("validator", ["validator", "run", "--data-dir", str(root)])


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
    """Bring the subnet up, optionally run the demo, and supervise until Ctrl-C (or the demo ends)."""
    # Ctrl-C and `kill` both mean "stop cleanly". Installed explicitly: a shell starts background
    # jobs with SIGINT ignored, and Python would keep ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    layout = prepare(
        root, port=port, miners=miners, cheaters=cheaters, block_time=block_time, tempo=tempo, console=console
    )
    supervisor = Supervisor(root, console)
    try:
        console.print(f"starting a local subnet in {root}: orchestrator, {len(layout.miners)} miners, a validator")
        start_processes(layout, supervisor, profile)
        key, _secret = create_api_key(root)
        url = layout.orchestrator_url
        console.print(f"\n[bold]Subnet is up.[/] Dashboard: {url}/dashboard")
        console.print(f"API key (shown once): {key}")
        console.print(
            f"Try:\n  curl -s -X POST {url}/v1/images -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' -H 'Prefer: wait=30' "
            '-d \'{"prompt": "a lighthouse at dusk", "width": 64, "height": 64}\'\n',
            highlight=False,
            soft_wrap=True,
        )
        if demo:
            return _demo(layout, key, supervisor, console, exit_after)
        if exit_after:
            return 0
        while not supervisor.dead():
            time.sleep(1.0)
        console.print(f"[red]{', '.join(supervisor.dead())} exited; stopping the subnet[/]")
        return 1
    except KeyboardInterrupt:
        console.print("\nstopping the subnet (data kept in " + str(root) + ")")
        return 130
    except RuntimeError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        supervisor.stop()


def _demo(layout: SubnetLayout, key: str, supervisor: Supervisor, console: Console, exit_after: bool) -> int:
    from dippy_studio.demo import run_demo, summary_table
    from dippy_studio.orchestrator.db import default_url
    from dippy_studio.orchestrator.store import Store

    # /ready answers 200 once the orchestrator has found a healthy miner to send jobs to.
    wait_ready(f"{layout.orchestrator_url}/ready", "orchestrator", supervisor, timeout=120)
    result = run_demo(layout, key, console)
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
    if exit_after:
        return 0
    while not supervisor.dead():
        time.sleep(1.0)
    return 1
