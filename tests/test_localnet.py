"""`dippy-studio up`: the whole local subnet in real processes, as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from dippy_studio.chain.local import LocalChain
from dippy_studio.orchestrator.db import default_url
from dippy_studio.orchestrator.store import Store
from localnet_kit import children_alive, free_port, signal_and_collect_survivors, stop, wait_healthy


@pytest.mark.slow
def test_up_demo_exit_after_end_to_end(tmp_path):
    root = tmp_path / "subnet"
    proc = subprocess.run(
        [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(free_port()),
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
    # The penalized cheater counts as beaten, so the lower honest miner keeps a share a u16 row
    # can hold (about 0.13% by the formula, more while the EMA remembers a round it led).
    assert all(row.get(graph.uid_of(m["hotkey"]), 0.0) > 0 for m in honest), row

    store = Store.open(default_url(root), migrate=False)
    verdicts = {(a.miner_hotkey, a.verdict) for a in store.list_audits()}
    store.close()
    assert (cheater["hotkey"], "fail") in verdicts, "the cheater's wrong seeds are caught by audits"
    assert not any(v == "fail" and hk in {m["hotkey"] for m in honest} for hk, v in verdicts)
    assert children_alive(root) == [], "no orphan processes after --exit-after"


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_a_second_up_resumes(tmp_path):
    root = tmp_path / "subnet"
    port = free_port()
    args = [sys.executable, "-m", "dippy_studio.cli", "up", "--data-dir", str(root), "--port", str(port)]
    args += ["--miners", "2"]
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 (a pipe nobody reads would fill and block `up`)
    up = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port)
        first = json.loads((root / "subnet.json").read_text())
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
        assert len(LocalChain(root / "chain.sqlite", create=False).metagraph()) == len(first["miners"]) + 2
        survivors = signal_and_collect_survivors(again, root, signal.SIGTERM)  # `kill` is as clean as Ctrl-C
    finally:
        stop(again, root)
        log.close()
    assert survivors == [], "SIGTERM must leave no orphan processes"
