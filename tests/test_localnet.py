"""`dippy-studio up`: the whole local subnet in real processes, as a user runs it."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rich.console import Console

from dippy_studio.chain.local import LocalChain
from dippy_studio.localnet import API_KEY_FILE, GaveUp, RestartPolicy, Supervisor, create_api_key, local_api_key
from dippy_studio.orchestrator.db import default_url
from dippy_studio.orchestrator.store import Store
from localnet_kit import (
    answers,
    children_alive,
    dashboard_urls,
    free_port,
    layout,
    open_dashboard,
    pids,
    signal_and_collect_survivors,
    stop,
    wait_healthy,
    wait_until,
)


@pytest.mark.slow
def test_up_demo_exit_after_end_to_end(tmp_path):
    root = tmp_path / "subnet"
    proc = subprocess.run(
        [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(free_port()),
         "--miners", "3", "--demo", "--cheater", "1", "--exit-after", "--profile", "tiny"],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "per-miner summary" in proc.stdout and "(EMA)" in proc.stdout  # the weight column says it lags
    assert "curl" in proc.stdout and "Authorization: Bearer dsk_" in proc.stdout

    layout = json.loads((root / "subnet.json").read_text())
    honest = [m for m in layout["miners"] if not m["cheater"]]
    cheater = next(m for m in layout["miners"] if m["cheater"])
    # The demo's own summary table (jobs, audits, score, weight per miner) explains any failure below.
    shown = proc.stdout[-4000:]

    store = Store.open(default_url(root), migrate=False)
    audits = store.list_audits()
    store.close()
    verdicts = {(a.miner_hotkey, a.verdict) for a in audits}
    assert (cheater["hotkey"], "fail") in verdicts, "the cheater's wrong seeds are caught by audits\n" + shown
    honest_failures = [
        (a.job_id, a.evidence.get("verdict")) for a in audits
        if a.verdict == "fail" and a.miner_hotkey in {m["hotkey"] for m in honest}
    ]  # fmt: skip
    assert not honest_failures, f"{honest_failures}\n{shown}"

    chain = LocalChain(root / "chain.sqlite", create=False)
    graph = chain.metagraph()
    row = chain.weights()[graph.uid_of(layout["validator_hotkey"])]
    assert row.get(graph.uid_of(cheater["hotkey"]), 0.0) == 0.0, "the cheater must end with zero weight\n" + shown
    assert sum(row.get(graph.uid_of(m["hotkey"]), 0.0) for m in honest) == pytest.approx(1.0, abs=1e-3)
    # The penalized cheater counts as beaten, so the lower honest miner keeps a share a u16 row
    # can hold (about 0.13% by the formula, more while the EMA remembers a round it led).
    assert all(row.get(graph.uid_of(m["hotkey"]), 0.0) > 0 for m in honest), f"{row}\n{shown}"
    assert children_alive(root) == [], "no orphan processes after --exit-after"


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_a_second_up_resumes(tmp_path):
    root = tmp_path / "subnet"
    port = free_port()
    args = [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(port)]
    args += ["--miners", "2", "--profile", "tiny"]
    log_path = tmp_path / "up.log"
    log = open(log_path, "w")  # noqa: SIM115 (a pipe nobody reads would fill and block `up`)
    up = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port)
        first = json.loads((root / "subnet.json").read_text())
        # The URL `up` prints opens the dashboard; without its token, the dashboard answers 401.
        [url] = wait_until(lambda: dashboard_urls(log_path), 120, "up to print the dashboard URL")
        assert url.startswith(f"http://127.0.0.1:{port}/dashboard?token=")
        hotkeys = {m["hotkey"] for m in first["miners"]}
        wait_until(lambda: {m["hotkey"] for m in open_dashboard(url)["miners"]} == hotkeys, 60, "both miners shown")
        assert httpx.get(f"http://127.0.0.1:{port}/dashboard/api/state").status_code == 401
        deadline = time.monotonic() + 60  # the validator starts once the orchestrator answers
        while len(children_alive(root)) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(children_alive(root)) >= 5  # up, orchestrator, 2 miners, validator
        survivors = signal_and_collect_survivors(up, root, signal.SIGINT)
    finally:
        stop(up, root)
    assert survivors == [], "Ctrl-C must leave no orphan processes"
    assert (root / "chain.sqlite").is_file() and (root / "orchestrator.sqlite").is_file(), "data is kept"

    again = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port)
        second = json.loads((root / "subnet.json").read_text())
        assert [m["hotkey"] for m in second["miners"]] == [m["hotkey"] for m in first["miners"]]
        # The same token: a bookmarked URL (or an open tab's cookie) keeps working.
        urls = wait_until(lambda: found if len(found := dashboard_urls(log_path)) == 2 else None, 120, "the URL")
        assert urls == [url, url]
        # The same API key and webhook signing secret: scripts and webhook receivers keep working.
        printed = log_path.read_text()
        keys = re.findall(r"API key \(kept in .*\): (dsk_\S+)", printed)
        webhook_secrets = re.findall(r"Webhook signing secret: (whsec_\S+)", printed)
        assert len(keys) == len(webhook_secrets) == 2, printed[-3000:]
        assert keys[0] == keys[1] and webhook_secrets[0] == webhook_secrets[1]
        assert (root / API_KEY_FILE).stat().st_mode & 0o777 == 0o600
        open_dashboard(url)
        assert len(LocalChain(root / "chain.sqlite", create=False).metagraph()) == len(first["miners"]) + 2
        survivors = signal_and_collect_survivors(again, root, signal.SIGTERM)  # `kill` is as clean as Ctrl-C
    finally:
        stop(again, root)
        log.close()
    assert survivors == [], "SIGTERM must leave no orphan processes"


def test_up_with_its_port_in_use_stops_at_once_and_says_why(tmp_path):
    root = tmp_path / "subnet"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        took = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"port {port} is already in use" in proc.stdout and "--port" in proc.stdout
    assert took < 15, f"took {took:.1f}s: the port is checked before anything starts"
    assert not (root / "subnet.json").exists() and not (root / "logs").exists(), "nothing was started"


def test_the_local_api_key_is_kept_while_it_is_live(tmp_path):
    key, webhook_secret = local_api_key(tmp_path)
    assert key.startswith("dsk_") and webhook_secret.startswith("whsec_")
    assert (tmp_path / API_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert local_api_key(tmp_path) == (key, webhook_secret)
    store = Store.open(default_url(tmp_path), migrate=False)
    try:
        [listed] = store.list_api_keys()
        store.revoke_api_key(listed.id)
    finally:
        store.close()
    # Revoked (say by `orchestrator keys revoke`): the next `up` makes and keeps a new one.
    renewed = local_api_key(tmp_path)
    assert renewed[0] != key and local_api_key(tmp_path) == renewed


TERMINAL = {"succeeded", "failed", "canceled"}


@pytest.mark.slow
def test_a_killed_miner_is_restarted_and_serves_again_while_up_keeps_running(tmp_path):
    root, port = tmp_path / "subnet", free_port()
    log_path = tmp_path / "up.log"
    log = open(log_path, "w")  # noqa: SIM115 (a pipe nobody reads would fill and block `up`)
    up = subprocess.Popen(
        [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(port),
         "--miners", "1", "--profile", "tiny"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_healthy(port)
        # The validator starts last, once the rest answers: from then on `up` supervises.
        wait_until(lambda: "validator" in pids(root), 120, "the validator to start")
        first = pids(root)["miner-0"]
        # One miner: the job after the kill can only be served by the restarted one.
        health = f"http://127.0.0.1:{layout(root)['miners'][0]['port']}/health"
        assert f"started miner-0 (pid {first})" in log_path.read_text(), "up prints each child's pid"
        os.kill(first, signal.SIGKILL)

        def restarted() -> int | None:
            pid = pids(root).get("miner-0")
            return pid if pid not in (None, first) else None

        second = wait_until(restarted, 60, "miner-0 to run under a new pid")
        assert "miner-0 exited with code -9 (SIGKILL); restarting in 1 s (restart 1)" in log_path.read_text()
        wait_until(lambda: answers(health), 120, "the restarted miner's /health")
        assert up.poll() is None, "up must keep running when a child dies"

        secret, _ = create_api_key(root, "heal-test")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"}) as client:
            body = {"prompt": "a lighthouse, after the crash", "seed": 3, "width": 64, "height": 64, "steps": 2}
            reply = client.post("/v1/images", json=body, headers={"Prefer": "wait=30"}, timeout=60)
            assert reply.status_code in (200, 202), reply.text
            request_id = reply.json()["request_id"]

            def finished() -> dict | None:
                view = client.get(f"/v1/requests/{request_id}").json()
                return view if view["status"] in TERMINAL else None

            view = wait_until(finished, 90, "the job to finish")
        assert view["status"] == "succeeded", view
        assert pids(root)["miner-0"] == second and up.poll() is None
    finally:
        stop(up, root)
        log.close()
        print(log_path.read_text()[-6000:])  # pytest shows it when the test fails
    assert not (root / "pids.json").exists(), "pids.json names running processes only"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _crashing_supervisor(tmp_path: Path, policy: RestartPolicy) -> tuple[Supervisor, FakeClock, io.StringIO]:
    """A supervisor on a fake clock with one child that exits with code 3 as soon as it starts."""
    clock, out = FakeClock(), io.StringIO()
    supervisor = Supervisor(tmp_path, Console(file=out, width=200), policy, clock)
    supervisor.start("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
    return supervisor, clock, out


def _crash(supervisor: Supervisor, clock: FakeClock, ran_for: float) -> None:
    """Let the child's exit be seen `ran_for` seconds after it started."""
    supervisor.children["flaky"].proc.wait(30)
    clock.now += ran_for
    supervisor.tend()


def test_a_crashing_child_is_restarted_after_doubling_delays_then_the_supervisor_gives_up(tmp_path):
    policy = RestartPolicy(first_delay_s=1, max_delay_s=4, stable_s=30, give_up_after=5)
    supervisor, clock, out = _crashing_supervisor(tmp_path, policy)
    try:
        for restart, delay in enumerate([1, 2, 4, 4], start=1):
            before = supervisor.children["flaky"].proc.pid
            _crash(supervisor, clock, ran_for=0.1)
            assert f"flaky exited with code 3; restarting in {delay} s (restart {restart})" in out.getvalue()
            assert json.loads((tmp_path / "pids.json").read_text()) == {}, "a dead child has no pid"
            clock.now += delay - 0.05
            supervisor.tend()
            assert supervisor.children["flaky"].proc.pid == before, "restarted before its delay was over"
            clock.now += 0.1
            supervisor.tend()
            after = supervisor.children["flaky"].proc.pid
            assert after != before and json.loads((tmp_path / "pids.json").read_text()) == {"flaky": after}
        with pytest.raises(
            GaveUp, match=r"flaky crashed 5 times in a row, never staying up 30 s \(last exit: code 3\)"
        ):
            _crash(supervisor, clock, ran_for=0.1)
    finally:
        supervisor.stop()
    assert not (tmp_path / "pids.json").exists()


def test_a_child_that_stayed_up_starts_its_backoff_again_and_is_never_given_up(tmp_path):
    policy = RestartPolicy(first_delay_s=1, max_delay_s=30, stable_s=10, give_up_after=3)
    supervisor, clock, out = _crashing_supervisor(tmp_path, policy)
    try:
        for restart, (ran_for, delay) in enumerate([(0.1, 1), (0.1, 2), (10, 1), (0.1, 2), (60, 1)], start=1):
            _crash(supervisor, clock, ran_for)
            assert f"restarting in {delay} s (restart {restart})" in out.getvalue()
            clock.now += delay
            supervisor.tend()
    finally:
        supervisor.stop()


def _garbage_chain(root: Path) -> None:
    root.mkdir()
    (root / "chain.sqlite").write_text("not a database")


def _cut_short_layout(root: Path) -> None:
    root.mkdir()
    (root / "subnet.json").write_text('{"data_dir": "x", "block_time"')


def _layout_of_another_shape(root: Path) -> None:
    root.mkdir()
    (root / "subnet.json").write_text("[]")


def _layout_with_a_bad_block_time(root: Path) -> None:
    root.mkdir()
    (root / "subnet.json").write_text(json.dumps({
        "data_dir": str(root), "block_time": "fast", "tempo": 20, "orchestrator_port": 8090,
        "orchestrator_url": "http://127.0.0.1:8090", "orchestrator_hotkey": "5O", "validator_hotkey": "5V",
        "owner_hotkey": "5W", "miners": [{"name": "miner-0", "port": 9001, "hotkey": "5M"}],
    }))  # fmt: skip


def _a_file(root: Path) -> None:
    root.write_text("")


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (_garbage_chain, "file is not a database"),
        (_cut_short_layout, "subnet.json is not a subnet layout"),
        (_layout_of_another_shape, "subnet.json is not a subnet layout"),
        (_layout_with_a_bad_block_time, "block_time: Input should be a valid number"),
        (_a_file, "cannot use"),
    ],
    ids=["garbage-chain", "cut-short-layout", "list-layout", "bad-block-time", "data-dir-is-a-file"],
)
def test_up_on_a_broken_data_dir_says_what_is_wrong_and_starts_nothing(tmp_path, make, said):
    root = tmp_path / "subnet"
    make(root)
    before = {p: p.read_bytes() for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file()}
    proc = subprocess.run(
        [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and said in output and "Traceback" not in output, output
    assert "started" not in output
    # The operator's files are as they were: nothing repaired or replaced behind their back.
    assert all(path.read_bytes() == data for path, data in before.items())


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--block-time", "nan"], "--block-time must be positive"),
        (["--block-time", "inf"], "--block-time must be positive"),
    ],
)
def test_up_refuses_impossible_flags_before_it_touches_anything(tmp_path, args, said):
    from typer.testing import CliRunner

    from dippy_studio.cli import app

    result = CliRunner().invoke(app, ["up", "--data-dir", str(tmp_path / "subnet"), *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert said in result.output
    assert not (tmp_path / "subnet").exists()
