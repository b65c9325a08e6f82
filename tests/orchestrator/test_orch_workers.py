"""`orchestrator serve --workers N`: N processes on one port and one database, stopped together."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dippy_studio.orchestrator.store import Store
from dippy_studio.sqlite_lock import WriteLock
from localnet_kit import free_port, wait_healthy

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _workers(pid: int) -> list[int]:
    """The spawned worker processes under `pid` (not multiprocessing's resource tracker)."""
    workers = []
    for child in _descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(child)
    return workers


def _serving_sockets(pid: int, port: int) -> int:
    """How many established TCP connections on local `port` this process holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    established = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            established += 1
    return established


def _start(data_dir: Path, port: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "dippy_studio.cli", "orchestrator", "serve", "--data-dir", str(data_dir),
            "--port", str(port), "--dev-key", "//Alice", "--workers", "2"]  # fmt: skip
    # Its own session, so the test can send Ctrl-C's SIGINT to the whole group as a terminal does.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_two_workers_serve_one_port_and_stop_together(tmp_path: Path, how: str) -> None:
    data_dir = tmp_path / "orch"
    secret = None
    port = free_port()
    proc = _start(data_dir, port)
    clients: list[httpx.Client] = []
    try:
        wait_healthy(port, timeout=120)
        # The first process answers only once its worker is up.
        workers = _workers(proc.pid)
        assert len(workers) == 1, f"expected one worker under {proc.pid}, found {workers}"

        store = Store.open(f"sqlite:///{data_dir / 'orchestrator.sqlite'}", migrate=False)
        secret = store.create_api_key("workers").secret
        store.close()
        headers = {"Authorization": f"Bearer {secret}"}
        # Every connection is a fresh one: the kernel spreads them across the two processes.
        ids = []
        for k in range(24):
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10)
            clients.append(client)
            answer = client.post("/v1/images", json={"prompt": f"p{k}", "seed": k, "width": 64, "height": 64})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["request_id"])
        assert _serving_sockets(proc.pid, port) > 0
        assert _serving_sockets(workers[0], port) > 0, "the worker never took a connection"
        # One database: any process answers for any request (no miners, so they wait in the queue).
        for client, request_id in zip(reversed(clients), ids, strict=True):
            assert client.get(f"/v1/requests/{request_id}").json()["status"] == "queued"
    finally:
        for client in clients:
            client.close()
        everyone = [proc.pid, *_descendants(proc.pid)]
        sig = signal.SIGTERM if how == "sigterm" else signal.SIGINT
        if how == "sigterm":
            proc.send_signal(sig)  # to the first process only, as a supervisor does
        else:
            os.killpg(proc.pid, sig)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    # uvicorn stops gracefully, then ends the process with the signal that stopped it.
    assert proc.returncode in (0, -sig, 128 + sig), output
    assert _gone(everyone), "a worker outlived the orchestrator"
    assert "Traceback" not in output, output


def _hold(path: str, held: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    lock = WriteLock(Path(path))
    assert lock.acquire(5)
    held.set()
    release.wait(10)
    lock.release()


def test_the_sqlite_write_lock_excludes_other_processes_with_a_bound(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite-writelock")
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(path, held, release))
    holder.start()
    try:
        assert held.wait(30)
        lock = WriteLock(Path(path))
        started = time.monotonic()
        # Held elsewhere: the file lock is not taken within the bound (the caller then falls back
        # to SQLite's own busy wait), but the thread lock is, so the caller can go on.
        assert lock.acquire(0.2)
        waited = time.monotonic() - started
        assert 0.18 <= waited < 2, waited
        assert not lock._holds_file
        lock.release()
        release.set()
        holder.join(10)
        # Free again: taken at once.
        started = time.monotonic()
        assert lock.acquire(5) and lock._holds_file
        assert time.monotonic() - started < 0.5
        lock.release()
    finally:
        release.set()
        holder.join(10)
        if holder.is_alive():
            holder.kill()


def test_a_worker_that_dies_before_serving_does_not_hold_up_the_start() -> None:
    from dippy_studio.orchestrator.serve import _started

    receiver, sender = multiprocessing.Pipe(duplex=False)
    sender.send(True)
    assert _started(receiver)
    receiver, sender = multiprocessing.Pipe(duplex=False)
    sender.close()  # what a worker's crash leaves behind
    started = time.monotonic()
    assert not _started(receiver)
    assert time.monotonic() - started < 1
