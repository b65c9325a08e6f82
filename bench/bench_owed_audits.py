"""The audits leader's look for owed audits, on a long history: the partial index against a scan.

    .venv/bin/python bench/bench_owed_audits.py                     # 300,000 jobs, 10 looks each
    .venv/bin/python bench/bench_owed_audits.py --jobs 20000 --looks 3

At every turn of its loop (every 2 s by default) the audits leader asks for the jobs picked for
an audit that have no verdict yet. A database migrated as the orchestrator's is filled with a
history: `--jobs` finished jobs, one in `--pick-every` picked for an audit, all of those judged
but the last `--owed`. Two variants answer the same question, alternating (`common.interleave`):

- **index**: `Store.flagged_without_verdict`, which reads the partial index of owed jobs
  (`jobs.audit_owed`, migration 0008);
- **scan**: the query it replaced, `jobs.audit` and no row in `audits`, which visits every job
  ever picked.

Reported: milliseconds per look (the median of `--looks`, after one untimed look each) and
scan / index. Check: both variants return the same job ids, the owed ones. The database is a
temporary SQLite file, as a single-machine orchestrator keeps it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import exists, insert, select

from common import NoProgress, Progress, interleave, median_ms
from dippy_studio.orchestrator.models import Audit, Job, utcnow
from dippy_studio.orchestrator.store import Store, job_row

CHUNK = 5000
SCAN = (
    select(Job.id)
    .where(Job.audit.is_(True), ~exists().where(Audit.job_id == Job.id))
    .order_by(Job.updated_at, Job.id)
    .limit(10_000)
)


def fill(store: Store, jobs: int, pick_every: int, owed: int, progress: Progress) -> list[str]:
    """The history; returns the owed jobs' ids, oldest first."""
    task = progress.add_task("history", total=jobs)
    key = store.create_api_key("history").key.id
    now = utcnow()
    picked = range(0, jobs, pick_every)
    owed_at = set(picked[len(picked) - owed :]) if owed else set()
    owed_ids: list[str] = []
    with store.engine.begin() as conn:
        for first in range(0, jobs, CHUNK):
            rows, verdicts = [], []
            for i in range(first, min(first + CHUNK, jobs)):
                row = job_row(key, "inference", {"prompt": "x"}, now + timedelta(hours=1), 60.0, now=now)
                row["created_at"] = row["updated_at"] = now + timedelta(microseconds=i)
                if i % pick_every == 0:
                    row["audit"] = True
                    if i in owed_at:
                        row["audit_owed"] = True
                        owed_ids.append(row["id"])
                    else:
                        verdicts.append({"job_id": row["id"], "miner_hotkey": "5Miner", "verdict": "pass",
                                         "evidence": {}, "created_at": now})  # fmt: skip
                rows.append(row)
            conn.execute(insert(Job.__table__), rows)
            if verdicts:
                conn.execute(insert(Audit.__table__), verdicts)
            progress.advance(task, len(rows))
    progress.remove_task(task)
    return owed_ids


def run(jobs: int, pick_every: int, owed: int, looks: int, progress: Progress | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-owed-") as tmp:
        store = Store.open(f"sqlite:///{Path(tmp) / 'jobs.db'}")
        progress = progress or NoProgress()
        try:
            expected = fill(store, jobs, pick_every, owed, progress)

            def scan() -> list[str]:
                with store.engine.connect() as conn:
                    return list(conn.scalars(SCAN))

            answers: list[bool] = []

            def check(found: dict[str, list[str]]) -> None:
                answers.append(all(ids == expected for ids in found.values()))

            seconds = interleave(
                {"index": store.flagged_without_verdict, "scan": scan},
                reps=looks,
                warmup=1,
                progress=progress,
                description="looks",
                on_round=check,
            )
        finally:
            store.close()
    index, scan_ms = median_ms(seconds["index"]), median_ms(seconds["scan"])
    return {
        "index_ms": index,
        "scan_ms": scan_ms,
        "ratio": scan_ms / index,
        "same_jobs": all(answers),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=300_000, help="jobs in the history (default 300000)")
    parser.add_argument("--pick-every", type=int, default=10, help="one job in N picked for an audit (default 10)")
    parser.add_argument("--owed", type=int, default=5, help="picked jobs without a verdict (default 5)")
    parser.add_argument("--looks", type=int, default=10, help="looks per variant, alternating (default 10)")
    args = parser.parse_args(argv)
    if min(args.jobs, args.pick_every, args.looks) < 1 or args.owed < 0:
        parser.error("--jobs, --pick-every and --looks must be at least 1, --owed at least 0")
    if args.owed > (args.jobs + args.pick_every - 1) // args.pick_every:
        parser.error("--owed cannot exceed the number of picked jobs")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as progress:
        result = run(args.jobs, args.pick_every, args.owed, args.looks, progress)
    print(
        f"owed audits among {args.jobs} jobs: index {result['index_ms']:.2f} ms, scan {result['scan_ms']:.2f} ms, "
        f"scan / index {result['ratio']:.1f}; same jobs: {'yes' if result['same_jobs'] else 'NO'}"
    )
    return 0 if result["same_jobs"] else 1


if __name__ == "__main__":
    sys.exit(main())
