"""What SQLAlchemy Core costs on the orchestrator's commonest write: a job row.

    .venv/bin/python bench/bench_sql_overhead.py              # 3000 rows, 5 rounds
    .venv/bin/python bench/bench_sql_overhead.py --rows 500 --rounds 2

Two variants insert rows built alike (`store.job_row`, as a submission builds them) into one
fresh SQLite database migrated as the orchestrator's, one transaction per round:

- **core**: the store's own statement (`store._INSERT_JOB`) on a SQLAlchemy connection, one
  execute per row, as `Store.submit_job` runs it;
- **sqlite3**: the same columns through the sqlite3 module directly (foreign keys on, as the
  store's connections have them), the values converted by hand (JSON as text, times as
  SQLAlchemy writes them on SQLite).

Rounds alternate (core first, then sqlite3 first, ...). Reported: microseconds per row, the
median over rounds, and core / sqlite3. Check: every row of both variants, read back through
the store, is the job that was built. It answers one question for the throughput benchmark: how much of the
orchestrator's CPU per job leaving SQLAlchemy off the hot path could save.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from dippy_studio.orchestrator.models import utcnow
from dippy_studio.orchestrator.store import _INSERT_JOB, Store, job_row

PAYLOAD = {"prompt": "a red circle on a blue background", "seed": 1, "width": 64, "height": 64, "steps": 4,
           "guidance": 3.5, "loras": [], "task": "generate"}  # fmt: skip


def rows(api_key_id: str, count: int) -> list[dict[str, Any]]:
    now = utcnow()
    return [job_row(api_key_id, "inference", PAYLOAD, now + timedelta(minutes=1), 30.0, model="tiny", now=now)
            for _ in range(count)]  # fmt: skip


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def insert_core(store: Store, batch: list[dict[str, Any]]) -> float:
    with store.engine.begin() as conn:
        started = time.perf_counter()
        for row in batch:
            conn.execute(_INSERT_JOB, [row])
        return time.perf_counter() - started


def insert_sqlite3(path: Path, batch: list[dict[str, Any]]) -> float:
    names = [column.key for column in _INSERT_JOB.table.columns]
    sql = f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN")
        started = time.perf_counter()
        for row in batch:
            conn.execute(sql, [_sqlite_value(row[name]) for name in names])
        elapsed = time.perf_counter() - started
        conn.execute("COMMIT")
        return elapsed
    finally:
        conn.close()


def stored_as_built(store: Store, batch: list[dict[str, Any]]) -> bool:
    """Whether every row of `batch` reads back through the store as the job it was built as."""
    loaded = store.load_jobs([row["id"] for row in batch])
    return len(loaded) == len(batch) and all(
        getattr(loaded[row["id"]], name) == value for row in batch for name, value in row.items()
    )


def run(rows_per_round: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-sql-") as tmp:
        path = Path(tmp) / "jobs.db"
        store = Store.open(f"sqlite:///{path}")
        try:
            key = store.create_api_key("bench").key
            per_row: dict[str, list[float]] = {"core": [], "sqlite3": []}
            same = True
            for i in range(rounds):
                order = ("core", "sqlite3") if i % 2 == 0 else ("sqlite3", "core")
                for variant in order:
                    batch = rows(key.id, rows_per_round)
                    elapsed = insert_core(store, batch) if variant == "core" else insert_sqlite3(path, batch)
                    per_row[variant].append(elapsed / rows_per_round * 1e6)
                    same = same and stored_as_built(store, batch)
                    print(f"round {i + 1}/{rounds} {variant:>7}: {per_row[variant][-1]:.1f} us/row", flush=True)
        finally:
            store.close()
    core, raw = statistics.median(per_row["core"]), statistics.median(per_row["sqlite3"])
    return {"core_us": core, "sqlite3_us": raw, "ratio": core / raw, "same_rows": same, "rounds": per_row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3000, help="rows per round (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per variant, alternating (default 5)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1:
        parser.error("--rows and --rounds must be at least 1")
    result = run(args.rows, args.rounds)
    print(
        f"job row insert: core {result['core_us']:.1f} us, sqlite3 {result['sqlite3_us']:.1f} us, "
        f"core / sqlite3 {result['ratio']:.2f}; same rows: {'yes' if result['same_rows'] else 'NO'}"
    )
    return 0 if result["same_rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
