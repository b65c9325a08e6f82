"""Orchestrator throughput: jobs per second from submit to scored, against a bare baseline.

    .venv/bin/python bench/bench_throughput.py                      # SQLite (1 process), PostgreSQL (3), 3 rounds
    .venv/bin/python bench/bench_throughput.py --compare-ref        # ... and the code of 36d0ce1, alternately
    .venv/bin/python bench/bench_throughput.py --compare-ref REF    # ... or of any git ref
    .venv/bin/python bench/bench_throughput.py --backend sqlite --jobs 500 --clients 16 --rounds 1
    .venv/bin/python bench/bench_throughput.py --quick              # fewer jobs, 2 rounds
    .venv/bin/python bench/bench_throughput.py --backend postgres --s3   # ... and blobs in S3 (moto), alternately
    .venv/bin/python bench/run.py --only throughput                 # the same, from the runner

Everything is real except the miners' work: the orchestrator runs as its own process
(`dippy-studio orchestrator serve`, audits off, default loop settings) on a fresh database;
8 instant fake miners (`fake_miners.py`, one process) are registered on a temporary LocalChain
with their endpoints committed, verify the orchestrator's signed POSTs, answer 202 and call back
at once with a signed multipart result (a valid, unique PNG). Clients submit over HTTP with an
API key from a pool of concurrent connections.

Variants, run alternately per configuration (A B C, C B A, ...), each on fresh processes:

- `new`: the orchestrator of this checkout.
- `bare`: `bare_orchestrator.py`, the same three signed HTTP exchanges per job between the same
  clients and fake miners (submit with an API key, signed POST to a miner, signed multipart
  callback verified by the same protocol code) through minimal handlers with no database, as
  many processes as the orchestrator has. Absolute jobs/s move with the machine; `new / bare`
  from the same run travels. Goal: at least 0.5.
- `old` (with `--compare-ref REF`): the orchestrator of another commit, from a `git worktree` of
  it in a temporary directory (removed afterwards), run with the same venv. Goal: new / old >= 1.
- `s3` (with `--s3`): the orchestrator of this checkout with its blobs in S3-compatible object
  storage (`DIPPY_ORCH_BLOB_URL`) instead of its data dir: moto's standalone server
  (`python -m moto.server`, a process of its own, so its CPU is counted apart) on a loopback port
  with a fresh bucket. No floor: `s3 / disk` says what the object store costs against local disk.
  moto is a Python server, far slower per request than S3 or MinIO, so this is an upper bound.

Per variant and round, after a warm-up:

1. Throughput: `jobs` requests submitted as fast as `clients` connections allow; the clock runs
   from the first POST until every request is `succeeded` (polled every 20 ms: the database
   for an orchestrator, the processes' memory for bare). jobs/s = jobs / that.
2. Added latency: `latency_jobs` requests at a steady rate: `latency_rate`, by default half the
   throughput just measured (below saturation, so the queue stays short; a fixed rate would
   saturate a busy machine and measure its queue). Per request: (finished_at - created_at) from
   its timestamps, minus the miner's own time (`timings.miner.miner_s`, receipt to callback,
   about 0). p50 and p99.
   The same numbers from phase 1 (`saturated`) mostly measure the time spent in the queue.

Checks: every request was accepted (202) and succeeded, with the bytes the miner sent (and, for
`s3`, every result is an object in the bucket).
The server's CPU time per job (from /proc) is reported too: on a shared machine it is steadier
than wall time. The table shows the median of the rounds; `--json` keeps every round.

The benchmark reads an orchestrator's results from its `jobs` table with SQL of its own and
creates API keys with `dippy-studio orchestrator keys create`, so it works with old and new code
alike as long as that table keeps these columns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import JSON, Column, DateTime, Engine, Integer, MetaData, String, Table, create_engine, func, select
from sqlalchemy.engine import make_url

from common import CURRENT, BenchResult, Code, NoProgress, Progress, code_at, describe, paired_ratio, stop, tail
from common import Column as TableColumn
from dippy_studio.protocol import signer_from_uri
from fake_miners import register, unique_png

BENCH = Path(__file__).resolve().parent
TARGET_JOBS_PER_S = 200.0
TARGET_VS_BARE = 0.5
DEFAULT_REF = "36d0ce1"  # the orchestrator core before its rewrite
ORCHESTRATOR_URI = "//bench/orchestrator"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TERMINAL = ("succeeded", "failed", "canceled")
# How often the harness asks how many requests finished: often enough to time a run of seconds to
# within 1%, rarely enough that its own GROUP BY over the key's jobs does not load the database it
# measures, and load it more for the slower variant (bench/README.md, throughput).
POLL_S = 0.1
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Config:
    backend: str  # "sqlite" or "postgres"
    jobs: int = 2000
    clients: int = 32
    workers: int = 1  # orchestrator processes (`serve --workers`), and bare processes
    miners: int = 8
    side: int = 64
    warmup: int = 100
    latency_jobs: int = 400
    latency_rate: float | None = None  # requests/s in the latency phase; None: half of phase 1's
    pg_url: str = DEFAULT_PG_URL
    rounds: int = 1  # each variant measured this many times, alternating


# SQLite with one process; PostgreSQL with three (`serve --workers 3`: one more than the cores, as
# one process leaves part of a core idle while it waits on its locks and sockets).
FULL = (Config("sqlite", workers=1, rounds=3), Config("postgres", workers=3, rounds=3))
QUICK = tuple(replace(config, jobs=400, warmup=40, latency_jobs=100, rounds=2) for config in FULL)


@dataclass(frozen=True)
class Variant:
    """What serves the clients: an orchestrator of some code, or the bare baseline (`code` None)."""

    name: str
    code: Code | None
    s3: bool = False  # blobs in S3 (moto's server) instead of the orchestrator's data dir


BARE = Variant("bare", None)
S3 = Variant("s3", CURRENT, s3=True)


def columns(compared: bool, s3: bool = False) -> list[TableColumn]:
    shown = [
        TableColumn("config", "config"),
        TableColumn("jobs", "jobs"),
        TableColumn("rounds", "rounds"),
        TableColumn("jobs_per_s", "jobs/s", "{:.1f}"),
        TableColumn("bare_jobs_per_s", "bare jobs/s", "{:.1f}"),
        TableColumn("vs_bare", "new / bare", "{:.2f}"),
        TableColumn("vs_bare_paired", "paired", "{:.2f}"),
        TableColumn("target", f"goal >= {TARGET_VS_BARE}"),
    ]
    if compared:
        shown += [
            TableColumn("old_jobs_per_s", "old jobs/s", "{:.1f}"),
            TableColumn("vs_old", "new / old", "{:.2f}"),
            TableColumn("vs_old_paired", "paired", "{:.2f}"),
        ]
    if s3:
        shown += [
            TableColumn("s3_jobs_per_s", "s3 jobs/s", "{:.1f}"),
            TableColumn("s3_vs_disk", "s3 / disk", "{:.2f}"),
            TableColumn("s3_vs_disk_paired", "paired", "{:.2f}"),
            TableColumn("s3_orch_cpu_ms_per_job", "s3 orch CPU ms/job", "{:.2f}"),
            TableColumn("s3_store_cpu_ms_per_job", "moto CPU ms/job", "{:.2f}"),
            TableColumn("s3_added_p50_ms", "s3 added p50 ms", "{:.1f}"),
        ]
    return [
        *shown,
        TableColumn("orch_cpu_ms_per_job", "orch CPU ms/job", "{:.2f}"),
        TableColumn("bare_cpu_ms_per_job", "bare CPU ms/job", "{:.2f}"),
        TableColumn("database_cpu_ms_per_job", "db server CPU ms/job", "{:.2f}"),
        TableColumn("latency_rate", "paced at /s", "{:.0f}"),
        TableColumn("added_p50_ms", "added p50 ms", "{:.1f}"),
        TableColumn("added_p99_ms", "added p99 ms", "{:.1f}"),
        TableColumn("identical", "all scored"),
        TableColumn("load_average_1m", "load", "{:.1f}"),
    ]


# ---- databases ------------------------------------------------------------------------------

# The columns of the orchestrator's `jobs` table this benchmark reads, declared here rather than
# imported, so that old and new code are read the same way.
JOBS = Table(
    "jobs",
    MetaData(),
    Column("id", String),
    Column("api_key_id", String),
    Column("status", String),
    Column("attempts", Integer),
    Column("created_at", DateTime(timezone=True)),
    Column("dispatched_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("timings", JSON),
    Column("result_sha256", String),
    Column("payload", JSON),
)


@contextlib.contextmanager
def database(config: Config, root: Path) -> Iterator[str]:
    """A fresh, empty database URL for one run: a SQLite file, or a new PostgreSQL database
    (`dippy_bench_<random>`, dropped afterwards) on the server of `config.pg_url`."""
    if config.backend == "sqlite":
        yield f"sqlite:///{root / 'orchestrator.sqlite'}"
        return
    import psycopg

    admin = make_url(config.pg_url).set(drivername="postgresql")
    name = f"dippy_bench_{secrets.token_hex(6)}"
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
        finally:
            # FORCE: the orchestrator may not have closed every pooled connection yet.
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_problem(pg_url: str) -> str | None:
    """Why PostgreSQL cannot be used for a run, or None."""
    try:
        import psycopg

        url = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(url, autocommit=True, connect_timeout=3):
            return None
    except Exception as exc:
        return f"PostgreSQL at {make_url(pg_url).render_as_string()} not usable: {type(exc).__name__}"


# Creates API keys through the CLI of the code under test, in one process for all of them.
_CREATE_KEYS = """
import sys
from dippy_studio.cli import app
for name in sys.argv[2:]:
    args = ["orchestrator", "keys", "create", "--name", name, "--rate-limit", "1000000000", "--json"]
    app([*args, "--db", sys.argv[1]], standalone_mode=False)
"""


def create_keys(code: Code, db_url: str, names: list[str], cwd: Path) -> dict[str, tuple[str, str]]:
    """(key id, secret) by name, created with `dippy-studio orchestrator keys create --json`;
    this also brings the fresh database's schema up to date."""
    done = subprocess.run(
        [sys.executable, "-c", _CREATE_KEYS, db_url, *names],
        env=code.env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    created = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(created) != len(names):
        raise RuntimeError(f"{code.name}: creating API keys failed:\n{done.stdout}\n{done.stderr}")
    return {name: (key["id"], key["key"]) for name, key in zip(names, created, strict=True)}


# ---- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_miners(count: int, orchestrator_ss58: str, log: Path) -> tuple[subprocess.Popen, list[dict[str, Any]]]:
    """The fake miners' process and what it announced (uri, hotkey, port per miner)."""
    args = [sys.executable, str(BENCH / "fake_miners.py"), "--count", str(count), "--orchestrator", orchestrator_ss58]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"fake miners did not start:\n{tail(log)}")
    return proc, json.loads(line)["miners"]


def stop_piped(proc: subprocess.Popen) -> None:
    """Stop a helper process (fake miners, a bare orchestrator) that ends when its stdin closes."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()  # EOF is its signal to stop
    stop(proc)


def start_orchestrator(
    root: Path,
    db_url: str,
    chain_dir: Path,
    port: int,
    log: Path,
    workers: int = 1,
    code: Code = CURRENT,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    args = [sys.executable, "-m", "dippy_studio.cli", "orchestrator", "serve", "--data-dir", str(root / "orch"),
            "--db", db_url, "--port", str(port), "--dev-key", ORCHESTRATOR_URI,
            "--chain-data-dir", str(chain_dir), "--allow-loopback", "--workers", str(workers)]  # fmt: skip
    # Audits re-run jobs on a reference engine: a different benchmark. Everything else is default.
    # cwd: not the checkout, whose directories could shadow `code` on sys.path.
    return subprocess.Popen(
        args,
        env=code.env({"DIPPY_ORCH_AUDIT": "false", **(env or {})}),
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_ready(proc: subprocess.Popen, url: str, miners: int, log: Path) -> None:
    """Until the orchestrator answers /ready with every miner healthy."""
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the orchestrator exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if httpx.get(f"{url}/ready", timeout=2).json().get("healthy_miners") == miners:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the orchestrator did not see {miners} healthy miners in time:\n{tail(log)}")


def start_bare(
    port: int, miners: list[dict[str, Any]], keys: dict[str, tuple[str, str]], workers: int, log: Path
) -> list[tuple[subprocess.Popen, int]]:
    """`workers` bare orchestrators on the shared `port`, each with its private port."""
    hashes = {key_id: hashlib.sha256(secret.encode()).hexdigest() for key_id, secret in keys.values()}
    args = [sys.executable, str(BENCH / "bare_orchestrator.py"), "--port", str(port), "--dev-key", ORCHESTRATOR_URI,
            "--miners", json.dumps([{"hotkey": m["hotkey"], "port": m["port"]} for m in miners]),
            "--keys", json.dumps(hashes)]  # fmt: skip
    started: list[tuple[subprocess.Popen, int]] = []
    try:
        for index in range(workers):
            errors = log.with_name(f"{log.stem}-{index}{log.suffix}")
            proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors.open("w"), text=True
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                proc.wait(10)
                raise RuntimeError(f"the bare orchestrator did not start:\n{tail(errors)}")
            started.append((proc, json.loads(line)["private_port"]))
    except BaseException:
        for proc, _ in started:
            stop_piped(proc)
        raise
    return started


S3_BUCKET = "bench-blobs"
# moto accepts any credentials; the orchestrator reads these through boto3's default chain.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class ObjectStore:
    """moto's S3 server as the `s3` variant uses it."""

    pid: int
    client: Any  # boto3's S3 client
    env: dict[str, str]  # what the orchestrator needs to keep its blobs in the bucket

    def names(self) -> set[str]:
        """The blob names (sha256) of every object in the bucket."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET)
        return {item["Key"].rsplit("/", 1)[-1] for page in pages for item in page.get("Contents", [])}


@contextlib.contextmanager
def object_store(log: Path) -> Iterator[ObjectStore]:
    """moto's standalone S3 server in a process of its own (its CPU is counted apart) on a free
    loopback port, with an empty bucket."""
    import boto3
    from botocore.exceptions import BotoCoreError

    port = free_port()
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        end = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto's server exited with {proc.returncode}:\n{tail(log)}")
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except BotoCoreError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.2)
        env = {
            **S3_CREDENTIALS,
            "DIPPY_ORCH_BLOB_URL": f"s3://{S3_BUCKET}/bench",
            "DIPPY_ORCH_S3_ENDPOINT_URL": endpoint,
        }
        yield ObjectStore(proc.pid, client, env)
    finally:
        stop(proc)


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU seconds of a process and all its descendants (the orchestrator's worker processes)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        seconds = cpu_seconds(current)
        if seconds is None and current == pid:
            return None
        total += seconds or 0.0
        todo += children.get(current, [])
    return total


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), all threads included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")" that ends the command name, utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- what the variants hold -----------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    """One request as the server recorded it (its `jobs` row, or a bare process's dict)."""

    id: str
    status: str
    attempts: int
    created_at: datetime
    dispatched_at: datetime | None
    finished_at: datetime | None
    timings: dict[str, Any]
    result_sha256: str | None
    payload: dict[str, Any]


def _aware(value: datetime | float | None) -> datetime | None:
    """A UTC datetime from a database value (SQLite's are naive UTC) or unix seconds."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _row(values: Any) -> JobRow:
    get = values.get if isinstance(values, dict) else values._mapping.get
    created = _aware(get("created_at"))
    assert created is not None
    return JobRow(
        id=get("id"),
        status=get("status"),
        attempts=get("attempts"),
        created_at=created,
        dispatched_at=_aware(get("dispatched_at")),
        finished_at=_aware(get("finished_at")),
        timings=get("timings") or {},
        result_sha256=get("result_sha256"),
        payload=get("payload") or {},
    )


class DatabaseReader:
    """Requests by key, read from an orchestrator's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def counts(self, key_id: str) -> Counter[str]:
        query = select(JOBS.c.status, func.count()).where(JOBS.c.api_key_id == key_id).group_by(JOBS.c.status)
        with self.engine.connect() as conn:
            return Counter({status: n for status, n in conn.execute(query)})

    def rows(self, key_id: str) -> list[JobRow]:
        with self.engine.connect() as conn:
            return [_row(row) for row in conn.execute(select(JOBS).where(JOBS.c.api_key_id == key_id))]


class BareReader:
    """Requests by key, asked of every bare process on its private port."""

    def __init__(self, ports: list[int]) -> None:
        self.urls = [f"http://127.0.0.1:{port}" for port in ports]
        self.http = httpx.Client(timeout=30)

    def counts(self, key_id: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for url in self.urls:
            total.update(self.http.get(f"{url}/bench/counts", params={"key": key_id}).json())
        return total

    def rows(self, key_id: str) -> list[JobRow]:
        return [
            _row(job) for url in self.urls for job in self.http.get(f"{url}/bench/jobs", params={"key": key_id}).json()
        ]


# ---- clients --------------------------------------------------------------------------------


@dataclass
class Submission:
    """What the clients of one phase did: answers by status code, and whether they are done."""

    statuses: Counter[int] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)  # each POST's round trip
    finished: bool = False

    @property
    def accepted(self) -> int:
        return self.statuses[202]


async def submit(
    url: str, secret: str, jobs: int, clients: int, side: int, submission: Submission, rate: float | None = None
) -> None:
    """POST `jobs` image requests from `clients` concurrent connections: as fast as they go, or
    request k at k / rate seconds after the start when `rate` is given. aiohttp, not httpx: the
    clients share the cores with the orchestrator, and aiohttp takes a sixth of the CPU per request."""
    import aiohttp

    headers = {"Authorization": f"Bearer {secret}"}
    next_job = iter(range(jobs))
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def client(http: aiohttp.ClientSession) -> None:
        for k in next_job:
            if rate is not None:
                await asyncio.sleep(max(0.0, started + k / rate - loop.time()))
            body = {"prompt": f"a lighthouse at dusk, variation {k}", "seed": k, "width": side, "height": side}
            sent = time.perf_counter()
            try:
                async with http.post("/v1/images", json=body) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            submission.seconds.append(time.perf_counter() - sent)
            submission.statuses[status] += 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    try:
        async with aiohttp.ClientSession(url, headers=headers, connector=connector, timeout=timeout) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))
    finally:
        submission.finished = True


def wait_scored(
    counts_of: Callable[[], Counter[str]], submission: Submission, progress: Progress, task: Any, timeout: float
) -> tuple[float, Counter[str]]:
    """Poll until every accepted request of this key is finished; returns the
    `time.perf_counter()` when that was seen, and the requests per status."""
    shown = 0
    end = time.perf_counter() + timeout
    while True:
        counts = counts_of()
        now = time.perf_counter()
        finished = sum(counts[s] for s in TERMINAL)
        progress.advance(task, finished - shown)
        shown = finished
        if submission.finished and finished >= submission.accepted:
            return now, counts
        if now > end:
            raise TimeoutError(f"only {finished} of {submission.accepted} requests finished in {timeout:.0f}s")
        time.sleep(POLL_S)


@dataclass
class Phase:
    jobs: int
    seconds: float  # first POST until every request was seen finished
    submission: Submission
    counts: Counter[str]
    cpu_s: dict[str, float | None]  # CPU seconds by process: server, miners, this one (clients), database
    rows: list[JobRow]

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds


@dataclass(frozen=True)
class Rig:
    """A running server (orchestrator or bare) as the phases see it."""

    url: str
    reader: DatabaseReader | BareReader
    pids: tuple[int, ...]  # the server's processes (each counted with its descendants)
    miners_pid: int
    progress: Progress
    store_pid: int | None = None  # the object store's server (the `s3` variant)


def run_phase(
    rig: Rig, key: tuple[str, str], jobs: int, config: Config, description: str, rate: float | None = None
) -> Phase:
    key_id, secret = key
    submission = Submission()
    task = rig.progress.add_task(description, total=jobs)
    cpu_before = cpu_snapshot(rig)
    started = time.perf_counter()
    poller: dict[str, Any] = {}
    timeout = 60.0 + jobs / 5 + (jobs / rate if rate else 0.0)

    def poll() -> None:
        try:
            poller["result"] = wait_scored(lambda: rig.reader.counts(key_id), submission, rig.progress, task, timeout)
        except BaseException as exc:
            poller["error"] = exc

    thread = threading.Thread(target=poll, name="poll", daemon=True)
    thread.start()
    asyncio.run(submit(rig.url, secret, jobs, config.clients, config.side, submission, rate))
    thread.join()
    rig.progress.remove_task(task)
    if "error" in poller:
        raise poller["error"]
    done_at, counts = poller["result"]
    cpu_after = cpu_snapshot(rig)
    cpu = {name: _minus(cpu_after[name], cpu_before[name]) for name in cpu_before}
    return Phase(jobs, done_at - started, submission, counts, cpu, rig.reader.rows(key_id))


def cpu_snapshot(rig: Rig) -> dict[str, float | None]:
    servers = [tree_cpu_seconds(pid) for pid in rig.pids]
    return {
        "server": None if None in servers else sum(s or 0.0 for s in servers),
        "miners": cpu_seconds(rig.miners_pid),
        "clients": time.process_time(),
        "database": postgres_cpu_seconds(),
        "object_store": cpu_seconds(rig.store_pid) if rig.store_pid is not None else None,
    }


def postgres_cpu_seconds() -> float:
    """CPU seconds so far of every PostgreSQL server process on this machine (0 without one).
    The benchmark's server is local and otherwise idle, so the difference over a phase is the
    database's share of the work; connections opened during a phase are counted from zero."""
    total = 0.0
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "postgres":
                total += cpu_seconds(int(comm.parent.name)) or 0.0
    return total


def _minus(after: float | None, before: float | None) -> float | None:
    return after - before if after is not None and before is not None else None


# ---- results --------------------------------------------------------------------------------


def miner_s(row: JobRow) -> float:
    """The fake miner's own time for a request, receipt to callback, as it reported it."""
    return float((row.timings.get("miner") or {}).get("miner_s", 0.0))


def added_latency_s(row: JobRow) -> float | None:
    """What the server added to one request: its whole time minus the miner's own."""
    if row.status != "succeeded" or row.finished_at is None:
        return None
    return (row.finished_at - row.created_at).total_seconds() - miner_s(row)


def results_match(rows: list[JobRow]) -> bool:
    """Whether every stored result is the exact PNG the fake miner made for that attempt."""
    for row in rows:
        expected = unique_png(row.payload["width"], row.payload["height"], f"{row.id}-{row.attempts}")
        if row.result_sha256 != hashlib.sha256(expected).hexdigest():
            return False
    return True


def per_job_ms(seconds: float | None, jobs: int) -> float:
    return seconds / jobs * 1e3 if seconds is not None else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def latencies_ms(rows: list[JobRow]) -> list[float]:
    return [s * 1e3 for s in (added_latency_s(row) for row in rows) if s is not None]


def queue_ms(rows: list[JobRow]) -> list[float]:
    """Created until a miner was assigned: the time a request waited for the dispatcher."""
    return [(r.dispatched_at - r.created_at).total_seconds() * 1e3 for r in rows if r.dispatched_at is not None]


# ---- the benchmark --------------------------------------------------------------------------

PHASES = ("warmup", "throughput", "latency")


def measure(config: Config, variant: Variant, progress: Progress) -> dict[str, Any]:
    """One round of one variant, on fresh processes and a fresh database."""
    orchestrator = signer_from_uri(ORCHESTRATOR_URI)
    with tempfile.TemporaryDirectory(prefix="dippy-bench-throughput-") as tmp:
        root = Path(tmp)
        miners_proc, miners = start_miners(config.miners, orchestrator.ss58_address, root / "miners.log")
        try:
            if variant.code is None:
                return measure_bare(config, root, miners, miners_proc.pid, progress)
            chain_dir = root / "chain"
            register(chain_dir, miners)
            s3_context = object_store(root / "moto.log") if variant.s3 else contextlib.nullcontext()
            with database(config, root) as db_url, s3_context as s3:
                keys = create_keys(variant.code, db_url, [f"bench-{name}" for name in PHASES], root)
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                orch_log = root / "orchestrator.log"
                orch_proc = start_orchestrator(root, db_url, chain_dir, port, orch_log, config.workers, variant.code,
                                               env=s3.env if s3 else None)  # fmt: skip
                try:
                    wait_ready(orch_proc, url, config.miners, orch_log)
                    engine = create_engine(db_url)
                    try:
                        reader = DatabaseReader(engine)
                        rig = Rig(url, reader, (orch_proc.pid,), miners_proc.pid, progress, s3.pid if s3 else None)
                        summary = run_phases(config, variant, rig, dict(zip(PHASES, keys.values(), strict=True)))
                        if s3 is not None:
                            stored = s3.names()
                            results = {row.result_sha256 for key_id, _ in keys.values() for row in reader.rows(key_id)}
                            summary["checks"]["all_in_bucket"] = results <= stored
                            summary["identical"] = summary["identical"] and results <= stored
                        return summary
                    finally:
                        engine.dispose()
                finally:
                    stop(orch_proc)
        finally:
            stop_piped(miners_proc)


def measure_bare(
    config: Config, root: Path, miners: list[dict[str, Any]], miners_pid: int, progress: Progress
) -> dict[str, Any]:
    keys = {name: (f"key_{secrets.token_hex(8)}", f"dsk_{secrets.token_hex(32)}") for name in PHASES}
    port = free_port()
    servers = start_bare(port, miners, keys, config.workers, root / "bare.log")
    try:
        reader = BareReader([private for _, private in servers])
        rig = Rig(f"http://127.0.0.1:{port}", reader, tuple(p.pid for p, _ in servers), miners_pid, progress)
        return run_phases(config, BARE, rig, keys)
    finally:
        for proc, _ in servers:
            stop_piped(proc)


def run_phases(config: Config, variant: Variant, rig: Rig, keys: dict[str, tuple[str, str]]) -> dict[str, Any]:
    name = f"{variant.name} {config.backend}/{config.workers}"
    if config.warmup:
        run_phase(rig, keys["warmup"], config.warmup, config, f"{name}: warm-up")
    burst = run_phase(rig, keys["throughput"], config.jobs, config, f"{name}: {config.jobs} jobs")
    rate = config.latency_rate or max(1.0, round(burst.jobs_per_s / 2))
    paced = run_phase(rig, keys["latency"], config.latency_jobs, config, f"{name}: latency at {rate:g}/s", rate=rate)
    return summarize(config, burst, paced, rate)


def summarize(config: Config, burst: Phase, paced: Phase, rate: float) -> dict[str, Any]:
    checks = {
        "all_accepted": all(p.submission.statuses == Counter({202: p.jobs}) for p in (burst, paced)),
        "all_succeeded": all(p.counts == Counter({"succeeded": p.jobs}) for p in (burst, paced)),
    }
    identical = checks["all_accepted"] and checks["all_succeeded"] and results_match(burst.rows + paced.rows)
    added, saturated = latencies_ms(paced.rows), latencies_ms(burst.rows)
    jobs_per_s = burst.jobs_per_s
    return {
        "config": config_name(config),
        "workers": config.workers,
        "backend": config.backend,
        "jobs": config.jobs,
        "clients": config.clients,
        "seconds": burst.seconds,
        "jobs_per_s": jobs_per_s,
        "target_ratio": jobs_per_s / TARGET_JOBS_PER_S,
        "orch_cpu_ms_per_job": per_job_ms(burst.cpu_s["server"], burst.jobs),
        # The rest of the machine's work per job, for the budget: 2 cores at 200 jobs/s is 10 ms.
        "miners_cpu_ms_per_job": per_job_ms(burst.cpu_s["miners"], burst.jobs),
        "clients_cpu_ms_per_job": per_job_ms(burst.cpu_s["clients"], burst.jobs),
        "database_cpu_ms_per_job": per_job_ms(burst.cpu_s["database"], burst.jobs),
        "object_store_cpu_ms_per_job": per_job_ms(burst.cpu_s["object_store"], burst.jobs),
        "latency_rate": rate,
        "latency_jobs": config.latency_jobs,
        "latency_seconds": paced.seconds,
        "added_p50_ms": percentile(added, 50),
        "added_p99_ms": percentile(added, 99),
        "added_max_ms": max(added, default=float("nan")),
        "miner_p50_ms": percentile([miner_s(row) * 1e3 for row in paced.rows], 50),
        "miner_p99_ms": percentile([miner_s(row) * 1e3 for row in paced.rows], 99),
        "queue_p50_ms": percentile(queue_ms(paced.rows), 50),
        "queue_p99_ms": percentile(queue_ms(paced.rows), 99),
        "saturated_p50_ms": percentile(saturated, 50),
        "saturated_p99_ms": percentile(saturated, 99),
        "submit_p50_ms": percentile([s * 1e3 for s in burst.submission.seconds], 50),
        "submit_p99_ms": percentile([s * 1e3 for s in burst.submission.seconds], 99),
        "statuses": {"throughput": dict(burst.counts), "latency": dict(paced.counts)},
        "http": {"throughput": dict(burst.submission.statuses), "latency": dict(paced.submission.statuses)},
        "identical": identical,
        "checks": checks,
        "load_average_1m": os.getloadavg()[0],  # other jobs on the machine while this ran
    }


def config_name(config: Config) -> str:
    workers = f"{config.workers} worker{'s' * (config.workers > 1)}"
    return f"{config.backend}, {workers}, {config.miners} instant miners, {config.side}px"


def measure_rounds(
    config: Config, variants: list[Variant], progress: Progress, echo: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every variant `config.rounds` times, in alternating order: A B C, C B A, A B C, ..."""
    measured = []
    for index in range(config.rounds):
        for variant in variants if index % 2 == 0 else variants[::-1]:
            row = {"variant": variant.name, "round": index + 1, **measure(config, variant, progress)}
            measured.append(row)
            echo(
                f"{config.backend}/{config.workers} round {index + 1}/{config.rounds} {variant.name:>4}: "
                f"{row['jobs_per_s']:7.1f} jobs/s, server CPU {row['orch_cpu_ms_per_job']:.2f} ms/job, "
                f"added p50 {row['added_p50_ms']:.1f} ms at {row['latency_rate']:.0f}/s, "
                f"{'all scored' if row['identical'] else 'CHECK FAILED'}, load {row['load_average_1m']:.1f}"
            )
    return measured


def combine(
    config: Config, measured: list[dict[str, Any]], new: Variant, old: Variant | None, s3: Variant | None = None
) -> dict[str, Any]:
    """One table row: the medians of the new code's rounds, with the bare baseline's, the old
    code's and the s3 variant's jobs/s beside them and the ratios (of medians, and the median of
    per-round ratios)."""
    by_variant = {name: [m for m in measured if m["variant"] == name] for name in {m["variant"] for m in measured}}
    row = median_row(by_variant[new.name])
    jobs_per_s = {name: [m["jobs_per_s"] for m in rows] for name, rows in by_variant.items()}
    row.update(
        config=config_name(config),
        rounds=config.rounds,
        bare_jobs_per_s=statistics.median(jobs_per_s[BARE.name]),
        bare_cpu_ms_per_job=statistics.median(m["orch_cpu_ms_per_job"] for m in by_variant[BARE.name]),
    )
    # Throughput ratios: a higher jobs/s is a shorter time, so the paired ratio is bare's time over ours.
    row["vs_bare"] = row["jobs_per_s"] / row["bare_jobs_per_s"]
    row["vs_bare_paired"] = paired_ratio(jobs_per_s[new.name], jobs_per_s[BARE.name])
    row["target"] = "met" if row["vs_bare"] >= TARGET_VS_BARE else "missed"
    if old is not None:
        row["old_jobs_per_s"] = statistics.median(jobs_per_s[old.name])
        row["old_orch_cpu_ms_per_job"] = statistics.median(m["orch_cpu_ms_per_job"] for m in by_variant[old.name])
        row["vs_old"] = row["jobs_per_s"] / row["old_jobs_per_s"]
        row["vs_old_paired"] = paired_ratio(jobs_per_s[new.name], jobs_per_s[old.name])
        row["old_commit"] = old.code.commit if old.code else None
    if s3 is not None:
        s3_rows = by_variant[s3.name]
        row["s3_jobs_per_s"] = statistics.median(jobs_per_s[s3.name])
        row["s3_vs_disk"] = row["s3_jobs_per_s"] / row["jobs_per_s"]
        row["s3_vs_disk_paired"] = paired_ratio(jobs_per_s[s3.name], jobs_per_s[new.name])
        for key in ("orch_cpu_ms_per_job", "added_p50_ms", "added_p99_ms"):
            row[f"s3_{key}"] = statistics.median(m[key] for m in s3_rows)
        row["s3_store_cpu_ms_per_job"] = statistics.median(m["object_store_cpu_ms_per_job"] for m in s3_rows)
    row["identical"] = all(m["identical"] for m in measured)
    row["checks"] = {f"{m['variant']} round {m['round']}: {k}": ok for m in measured for k, ok in m["checks"].items()}
    row["load_average_1m"] = os.getloadavg()[0]
    row["measured"] = measured
    return row


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The first row with every number that differs between rows replaced by its median."""
    combined = dict(rows[0])
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if isinstance(value, int | float) and not isinstance(value, bool) and len(set(values)) > 1:
            combined[key] = statistics.median(values)
    return combined


def run(
    configs: tuple[Config, ...] = FULL,
    progress: Progress | None = None,
    compare_ref: str | None = None,
    s3: bool = False,
) -> BenchResult:
    """Measure each configuration: the new code and the bare baseline, with `compare_ref` the
    orchestrator of that git ref too, and with `s3` the new code with its blobs in S3, alternately."""
    progress = progress or NoProgress()
    console = getattr(progress, "console", None)  # rich's Progress has one; print each round there

    def echo(line: str) -> None:
        if console is not None:
            console.print(line, markup=False, highlight=False)

    with contextlib.ExitStack() as stack:
        new = Variant("new", CURRENT)
        old = Variant("old", stack.enter_context(code_at(compare_ref))) if compare_ref else None
        with_s3 = S3 if s3 else None
        variants = [v for v in (old, new, with_s3, BARE) if v is not None]
        result = BenchResult(
            name="throughput",
            title=f"Orchestrator throughput, submit to scored, against a bare baseline "
            f"(goal: new / bare at least {TARGET_VS_BARE}{', new / old at least 1' if old else ''})",
            columns=columns(old is not None, s3),
        )
        for config in configs:
            if config.backend == "postgres" and (problem := postgres_problem(config.pg_url)):
                result.notes.append(f"postgres skipped: {problem}")
                echo(f"postgres skipped: {problem}")
                continue
            measured = measure_rounds(config, variants, progress, echo)
            result.rows.append(combine(config, measured, new, old, with_s3))
    result.notes += [
        "jobs/s: N requests from the first POST until all succeeded, median of the rounds; paired: the median "
        "of per-round ratios",
        "bare: the same three signed HTTP exchanges per job through minimal handlers, no database "
        "(bench/bare_orchestrator.py)",
        "CPU ms/job: the server's processes' CPU time per job; added: finished - created - the miner's own time, "
        "at a steady rate below saturation",
    ]
    if s3:
        result.notes.append(
            "s3: the new code with its blobs in moto's S3 server (its own process, `moto CPU`) instead of its data "
            "dir; s3 / disk: its jobs/s over new's (no floor). moto is far slower per request than S3 or MinIO"
        )
    if old is not None and old.code is not None:
        result.notes.append(
            f"old: the orchestrator of {describe(compare_ref, old.code)} (a git worktree), same venv and settings"
        )
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, help="requests in the throughput phase (default 2000, quick 400)")
    parser.add_argument("--clients", type=int, help="concurrent client connections (default 32)")
    parser.add_argument(
        "--workers", type=int, help="orchestrator processes, `serve --workers` (default: 1 on SQLite, 3 on PostgreSQL)"
    )
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--rounds", type=int, help="measurements of each variant, alternating (default 3, quick 2)")
    parser.add_argument(
        "--compare-ref",
        nargs="?",
        const=DEFAULT_REF,
        metavar="GIT_REF",
        help=f"also run the orchestrator of this git ref (default {DEFAULT_REF}), alternately",
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument(
        "--s3", action="store_true", help="also run the new code with its blobs in S3 (moto's server), alternately"
    )
    parser.add_argument("--latency-jobs", type=int, help="requests in the latency phase (default 400, quick 100)")
    parser.add_argument("--latency-rate", type=float, help="requests/s in the latency phase (default: half of jobs/s)")
    parser.add_argument("--warmup", type=int, help="untimed requests first (default 100, quick 40)")
    parser.add_argument("--pg-url", default=os.environ.get("DIPPY_BENCH_POSTGRES", DEFAULT_PG_URL),
                        help="a PostgreSQL server to create a scratch database on")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def configs_from(args: argparse.Namespace) -> tuple[Config, ...]:
    overrides = {
        "jobs": args.jobs,
        "clients": args.clients,
        "workers": args.workers,
        "rounds": args.rounds,
        "latency_jobs": args.latency_jobs,
        "latency_rate": args.latency_rate,
        "warmup": args.warmup,
        "pg_url": args.pg_url,
    }
    chosen = {k: v for k, v in overrides.items() if v is not None}
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    configs = [replace(c, **chosen) for c in (QUICK if args.quick else FULL) if c.backend in backends]
    return tuple(dict.fromkeys(configs))


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from run import table

    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console.width = 200  # logs and pipes: keep each table row on one line
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)  # fmt: skip
    with progress:
        result = run(configs_from(args), progress, args.compare_ref, s3=args.s3)
    console.print(table(result))
    for check in result.failed_checks:
        console.print(f"[red]check failed[/] {check}")
    if args.json:
        report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "result": result.as_dict()}
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if result.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
