"""Runs in a separate OS process (spawned by test_orch_concurrency): claims until the queue is
empty, sending every job to a miner named after this process, as a dispatcher would."""

from __future__ import annotations

import os
import time
from typing import Any

from dippy_studio.orchestrator.store import Store


def claim_until_empty(url: str, start: Any, results: Any, batch: int) -> None:
    store = Store(url)
    try:
        store.list_api_keys()  # connect before the start line, so both processes race from the same point
        start.wait(timeout=60)
        claimed: list[str] = []
        miner = (f"hk-{os.getpid()}", os.getpid())
        while jobs := store.claim_for_dispatch(batch, kinds=["inference"], assign=lambda job, tried: miner):
            claimed += [job.id for job in jobs]
            time.sleep(0.002)  # let the other process in between batches, as a real dispatcher would
        results.put(claimed)
    finally:
        store.close()
