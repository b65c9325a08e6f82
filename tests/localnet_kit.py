"""Running `dippy-studio up` as a user does, in real processes, and never leaking them."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children_alive(root: Path) -> list[int]:
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


def stop(up: subprocess.Popen, root: Path) -> None:
    """Stop `up` with SIGTERM; whatever survives a failed test is killed so no test leaks processes."""
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
    deadline = time.monotonic() + 20
    while children_alive(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in children_alive(root):
        os.kill(pid, signal.SIGKILL)


def wait_healthy(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("the orchestrator never answered")


def signal_and_collect_survivors(up: subprocess.Popen, root: Path, sig: int) -> list[int]:
    up.send_signal(sig)
    up.wait(60)
    deadline = time.monotonic() + 20
    while children_alive(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    return children_alive(root)


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def pids(root: Path) -> dict[str, int]:
    """The pids `up` runs, by process name (DIR/pids.json); empty while it has none."""
    try:
        return json.loads((root / "pids.json").read_text())
    except (OSError, ValueError):
        return {}


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def layout(root: Path) -> dict[str, Any]:
    return json.loads((root / "subnet.json").read_text())


def dashboard_urls(log: Path) -> list[str]:
    """Every dashboard URL `up` printed into its log (one per `up`, once the subnet is up)."""
    return re.findall(r"Dashboard: (http://\S+)", log.read_text())


def open_dashboard(url: str) -> dict[str, Any]:
    """Open the printed URL as a browser does (its token sets a cookie, the redirect drops it from
    the address) and read the state the page fetches; fails unless both are served."""
    with httpx.Client(timeout=30, follow_redirects=True) as browser:
        page = browser.get(url)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"], page.text[:300]
        assert "token=" not in str(page.url), "the token leaves the address bar"
        state = browser.get(str(page.url.join("/dashboard/api/state")))
        assert state.status_code == 200, state.text[:300]
        return state.json()
