"""`dippy-studio up`: the whole local subnet in real processes, as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dippy_studio.chain.local import LocalChain
from dippy_studio.orchestrator.db import default_url
from dippy_studio.orchestrator.store import Store


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children_alive(root: Path) -> list[int]:
    """PIDs of dippy-studio processes still running on this data dir (`up` itself included)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(root) in cmdline and "dippy_studio.cli" in cmdline:
                alive.append(int(entry.name))
    return alive


def _stop(up: subprocess.Popen, root: Path) -> None:
    """Stop `up` with SIGTERM; whatever survives a failed test is killed so no test leaks processes."""
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
    deadline = time.monotonic() + 20
    while _children_alive(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _children_alive(root):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_up_demo_exit_after_end_to_end(tmp_path):
    root = tmp_path / "subnet"
    proc = subprocess.run(
        [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(_free_port()),
         "--miners", "3", "--demo", "--cheater", "1", "--exit-after"],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "per-miner summary" in proc.stdout
    assert "curl" in proc.stdout and "Authorization: Bearer dsk_" in proc.stdout

    layout = json.loads((root / "subnet.json").read_text())
    chain = LocalChain(root / "chain.sqlite", create=False)
    graph = chain.metagraph()
    row = chain.weights()[graph.uid_of(layout["validator_hotkey"])]
    honest = [m for m in layout["miners"] if not m["cheater"]]
    cheater = next(m for m in layout["miners"] if m["cheater"])
    assert row.get(graph.uid_of(cheater["hotkey"]), 0.0) == 0.0, "the cheater must end with zero weight"
    assert sum(row.get(graph.uid_of(m["hotkey"]), 0.0) for m in honest) == pytest.approx(1.0, abs=1e-3)

    store = Store.open(default_url(root), migrate=False)
    verdicts = {(a.miner_hotkey, a.verdict) for a in store.list_audits()}
    store.close()
    assert (cheater["hotkey"], "fail") in verdicts, "the cheater's wrong seeds are caught by audits"
    assert not any(v == "fail" and hk in {m["hotkey"] for m in honest} for hk, v in verdicts)
    assert _children_alive(root) == [], "no orphan processes after --exit-after"


def _wait_healthy(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("the orchestrator never answered")


def _signal_and_collect_survivors(up: subprocess.Popen, root: Path, sig: int) -> list[int]:
    up.send_signal(sig)
    up.wait(60)
    deadline = time.monotonic() + 20
    while _children_alive(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _children_alive(root)


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_a_second_up_resumes(tmp_path):
    root = tmp_path / "subnet"
    port = _free_port()
    args = [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(port)]
    args += ["--miners", "2"]
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 (a pipe nobody reads would fill and block `up`)
    up = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port)
        first = json.loads((root / "subnet.json").read_text())
        deadline = time.monotonic() + 60  # the validator starts once the orchestrator answers
        while len(_children_alive(root)) < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_children_alive(root)) >= 5  # up, orchestrator, 2 miners, validator
        survivors = _signal_and_collect_survivors(up, root, signal.SIGINT)
    finally:
        _stop(up, root)
    assert survivors == [], "Ctrl-C must leave no orphan processes"
    assert (root / "chain.sqlite").is_file() and (root / "orchestrator.sqlite").is_file(), "data is kept"

    again = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port)
        second = json.loads((root / "subnet.json").read_text())
        assert [m["hotkey"] for m in second["miners"]] == [m["hotkey"] for m in first["miners"]]
        assert len(LocalChain(root / "chain.sqlite", create=False).metagraph()) == len(first["miners"]) + 2
        survivors = _signal_and_collect_survivors(again, root, signal.SIGTERM)  # `kill` is as clean as Ctrl-C
    finally:
        _stop(again, root)
        log.close()
    assert survivors == [], "SIGTERM must leave no orphan processes"
