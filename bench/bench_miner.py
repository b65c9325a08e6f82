"""Miner benchmarks: end-to-end overhead of the signed job API, and behaviour under load.

    .venv/bin/python bench/bench_miner.py [--jobs 200] [--clients 32]
    .venv/bin/python bench/run.py --only miner [--quick]

1. Overhead: a real miner process (`dippy-studio miner serve`, tiny profile) and, in this
   process, a callback receiver and the bare engine. Each round times a signed POST until
   the signed callback arrives, and the same request through `Engine.generate` directly,
   alternating which goes first. Reported: p50/p95 of each and of the per-round difference.
   Target: p50 overhead at most 10 ms.
2. Load: 32 concurrent clients keep posting into a small queue (limit 8). Every response
   must be 202 or 429, and every accepted job must finish and call back.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")

import httpx
from rich.console import Console
from rich.progress import Progress as RichProgress

from common import BenchResult, Column, NoProgress, Progress
from dippy_studio.engine import Engine, GenerationRequest
from dippy_studio.protocol import signer_from_uri
from dippy_studio.protocol.auth import sign_request

CLIENT = signer_from_uri("//Alice")
MINER = signer_from_uri("//Bob")


class Callbacks:
    """A loopback HTTP server that records when each job's callback arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                now = time.perf_counter()
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
                with outer.cond:
                    outer.arrived[self.path.rsplit("/", 1)[-1]] = now
                    outer.cond.notify_all()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def wait(self, job_id: str, timeout: float = 60) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: job_id in self.arrived, timeout):
                raise TimeoutError(f"no callback for {job_id}")
            return self.arrived[job_id]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_miner(data_dir: Path, port: int, queue_limit: int) -> subprocess.Popen:
    env = {**os.environ, "DIPPY_MINER_INFERENCE_QUEUE_LIMIT": str(queue_limit)}
    args = [sys.executable, "-m", "dippy_studio.cli", "miner", "serve", "--dev-key", "//Bob", "--port", str(port),
            "--allow-hotkey", CLIENT.ss58_address, "--allow-loopback", "--data-dir", str(data_dir)]  # fmt: skip
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("miner did not start")


def post_job(client: httpx.Client, callbacks: Callbacks, job_id: str, seed: int) -> httpx.Response:
    job = {
        "job_id": job_id, "prompt": "a lighthouse at dusk", "seed": seed, "width": 64, "height": 64, "steps": 4,
        "guidance": 3.5, "loras": [], "callback_url": f"http://127.0.0.1:{callbacks.port}/cb/{job_id}",
        "deadline": (datetime.now(UTC) + timedelta(minutes=10)).isoformat(),
    }  # fmt: skip
    body = json.dumps(job).encode()
    headers = sign_request(CLIENT, "POST", "/v1/inference", body, MINER.ss58_address)
    headers["content-type"] = "application/json"
    return client.post("/v1/inference", content=body, headers=headers)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def overhead(jobs: int, progress: Progress) -> dict[str, Any]:
    engine = Engine()
    callbacks = Callbacks()
    with TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_miner(Path(tmp), port, queue_limit=64)
        e2e: list[float] = []
        bare: list[float] = []
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                task = progress.add_task("miner overhead rounds", total=jobs + 10)
                for i in range(jobs + 10):  # the first 10 warm both paths up
                    seed = i % 50
                    order = [0, 1] if i % 2 == 0 else [1, 0]
                    for which in order:
                        if which == 0:
                            job_id = f"o{i}-{uuid.uuid4().hex[:6]}"
                            started = time.perf_counter()
                            response = post_job(client, callbacks, job_id, seed)
                            assert response.status_code == 202, response.text
                            took = callbacks.wait(job_id) - started
                            if i >= 10:
                                e2e.append(took)
                        else:
                            started = time.perf_counter()
                            engine.generate(GenerationRequest(prompt="a lighthouse at dusk", seed=seed, steps=4))
                            if i >= 10:
                                bare.append(time.perf_counter() - started)
                    progress.advance(task)
                # Correctness: the miner's PNG is the bare engine's, byte for byte.
                path = f"/v1/jobs/{job_id}/result"
                signed = sign_request(CLIENT, "GET", path, b"", MINER.ss58_address)
                served = client.get(path, headers=signed).content
                same = engine.generate(GenerationRequest(prompt="a lighthouse at dusk", seed=seed, steps=4))
                identical = served == same.png
        finally:
            proc.terminate()
            proc.wait(10)
    diffs = [a - b for a, b in zip(e2e, bare, strict=True)]
    return {
        "e2e_p50_ms": pct(e2e, 50) * 1e3, "e2e_p95_ms": pct(e2e, 95) * 1e3,
        "bare_p50_ms": pct(bare, 50) * 1e3, "bare_p95_ms": pct(bare, 95) * 1e3,
        "overhead_p50_ms": (statistics.median(e2e) - statistics.median(bare)) * 1e3,
        "overhead_paired_p50_ms": statistics.median(diffs) * 1e3, "overhead_paired_p95_ms": pct(diffs, 95) * 1e3,
        "identical": identical,
    }  # fmt: skip


def load(clients: int, per_client: int) -> dict[str, float]:
    callbacks = Callbacks()
    accepted: list[str] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    with TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_miner(Path(tmp), port, queue_limit=8)
        try:

            def worker(n: int) -> None:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                    for k in range(per_client):
                        job_id = f"l{n}-{k}"
                        response = post_job(client, callbacks, job_id, seed=k)
                        with lock:
                            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                            if response.status_code == 202:
                                accepted.append(job_id)

            started = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            lost = [job_id for job_id in accepted if not _arrives(callbacks, job_id)]
            elapsed = time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(10)
    unexpected = {code: n for code, n in statuses.items() if code not in (202, 429)}
    return {
        "requests": sum(statuses.values()), "accepted": statuses.get(202, 0), "rejected_429": statuses.get(429, 0),
        "unexpected": sum(unexpected.values()), "lost": len(lost), "seconds": elapsed,
    }  # fmt: skip


def _arrives(callbacks: Callbacks, job_id: str) -> bool:
    try:
        callbacks.wait(job_id, timeout=120)
        return True
    except TimeoutError:
        return False


@dataclass(frozen=True)
class Config:
    jobs: int  # timed overhead rounds (after 10 warm-up rounds)
    clients: int  # concurrent clients in the load part
    per_client: int  # posts per client

    @property
    def name(self) -> str:
        return f"tiny 64x64 4 steps, {self.jobs} jobs"


FULL = (Config(200, 32, 4),)
QUICK = (Config(30, 8, 2),)
TARGET_MS = 10.0

COLUMNS = [
    Column("config", "config"),
    Column("e2e_p50_ms", "POST->callback p50 ms", "{:.1f}"),
    Column("bare_p50_ms", "bare engine p50 ms", "{:.1f}"),
    Column("overhead_paired_p50_ms", "overhead p50 ms", "{:.1f}"),
    Column("overhead_paired_p95_ms", "overhead p95 ms", "{:.1f}"),
    Column("target", "p50 <= 10 ms"),
    Column("load", "load: accepted / 429 / other / lost"),
    Column("identical", "miner PNG = engine PNG"),
]


def run(configs: tuple[Config, ...] = FULL, progress: Progress | None = None) -> BenchResult:
    progress = progress or NoProgress()
    result = BenchResult(
        name="miner",
        title="miner: signed POST -> signed callback vs the bare engine call (tiny profile)",
        columns=COLUMNS,
        notes=[
            "overhead: median over rounds of (end-to-end - bare), the two run alternately in each round",
            "load: concurrent clients posting into an inference queue of 8; every answer must be 202 or 429 "
            "and every accepted job must call back",
        ],
    )
    for config in configs:
        row: dict[str, Any] = {"config": config.name, **overhead(config.jobs, progress)}
        row["target"] = "met" if row["overhead_paired_p50_ms"] <= TARGET_MS else "missed"
        loaded = load(config.clients, config.per_client)
        row["load"] = f"{loaded['accepted']} / {loaded['rejected_429']} / {loaded['unexpected']} / {loaded['lost']}"
        row["checks"] = {
            "load: only 202 or 429": loaded["unexpected"] == 0,
            "load: no accepted job lost": loaded["lost"] == 0,
        }
        row["load_detail"] = loaded
        result.rows.append(row)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=4)
    args = parser.parse_args()
    from run import table  # bench/run.py: the same table every benchmark prints

    console = Console()
    with RichProgress(console=console, transient=True) as progress:
        result = run((Config(args.jobs, args.clients, args.per_client),), progress)
    console.print(table(result))
    return 0 if not result.failed_checks else 1


if __name__ == "__main__":
    sys.exit(main())
