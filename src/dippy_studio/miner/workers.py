"""Worker lanes: threads that take queued jobs from the store and run them.

Inference and training have separate lanes (and threads), so a long training job never
blocks inference. A job is checked against its deadline and cancelation between stages
and at every denoising step; past its deadline it is abandoned and reported expired.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dippy_studio.engine.errors import EngineError
from dippy_studio.miner.store import JobRecord, JobStore
from dippy_studio.protocol.outbound import OutboundError
from dippy_studio.protocol.schemas import JobKind, JobStatus

log = logging.getLogger("dippy_studio.miner.workers")


class JobAbandoned(Exception):
    """Raised inside a running job to stop it: canceled, or past its deadline."""

    def __init__(self, status: JobStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


AbortCheck = Callable[[], None]


@dataclass(frozen=True)
class Outcome:
    result_path: str
    sha256: str
    size: int
    fingerprint: str | None
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


Runner = Callable[[JobRecord, AbortCheck], Outcome]
Listener = Callable[[JobRecord], None]


class WorkerPool:
    def __init__(
        self,
        store: JobStore,
        runners: dict[JobKind, Runner],
        workers: dict[JobKind, int],
        on_finished: Listener,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.runners = runners
        self.workers = workers
        self.on_finished = on_finished
        self.clock = clock
        self._wake = {kind: threading.Event() for kind in JobKind}
        self._cancel: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: dict[JobKind, list[threading.Thread]] = {kind: [] for kind in JobKind}

    def start(self) -> None:
        for kind, count in self.workers.items():
            if kind not in self.runners:
                continue
            for i in range(count):
                thread = threading.Thread(target=self._loop, args=(kind,), name=f"{kind.value}-{i}", daemon=True)
                thread.start()
                self._threads[kind].append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for event in self._wake.values():
            event.set()
        for threads in self._threads.values():
            for thread in threads:
                thread.join(timeout)

    def alive(self, kind: JobKind) -> int:
        return sum(t.is_alive() for t in self._threads[kind])

    def configured(self, kind: JobKind) -> int:
        return self.workers.get(kind, 0) if kind in self.runners else 0

    def notify(self, kind: JobKind) -> None:
        self._wake[kind].set()

    def cancel(self, record: JobRecord) -> JobRecord | None:
        """Cancel a queued job now, or ask a running one to stop at its next check."""
        if record.status == JobStatus.queued:
            ended = self.store.end(record.job_id, JobStatus.canceled, "canceled by the sender")
            if ended is not None:
                self.on_finished(ended)
                return ended
        with self._cancel_lock:
            self._cancel.add(record.job_id)
        return self.store.get(record.job_id)

    def _loop(self, kind: JobKind) -> None:
        runner = self.runners[kind]
        while not self._stop.is_set():
            record, expired = self.store.claim(kind)
            for job in expired:
                self.on_finished(job)
            if record is None:
                self._wake[kind].wait(timeout=1.0)
                self._wake[kind].clear()
                continue
            self._run(record, runner)

    def _run(self, record: JobRecord, runner: Runner) -> None:
        job_id = record.job_id

        def check() -> None:
            with self._cancel_lock:
                canceled = job_id in self._cancel
            if canceled:
                raise JobAbandoned(JobStatus.canceled, "canceled by the sender")
            if self.clock() > record.deadline:
                raise JobAbandoned(JobStatus.expired, "deadline passed while running; abandoned")
            if self._stop.is_set():
                raise _ShuttingDown

        try:
            check()
            outcome = runner(record, check)
            check()
            finished = self.store.succeed(
                job_id,
                result_path=outcome.result_path,
                result_sha256=outcome.sha256,
                result_bytes=outcome.size,
                fingerprint=outcome.fingerprint,
                timings=outcome.timings,
                metrics=outcome.metrics,
            )
        except _ShuttingDown:
            return  # left running; recovered (re-queued) at the next start
        except JobAbandoned as exc:
            finished = self.store.end(job_id, exc.status, exc.reason)
        except (EngineError, OutboundError, ValidationError, ValueError) as exc:
            finished = self.store.end(job_id, JobStatus.failed, str(exc))
        except Exception as exc:  # a bug must fail the job, not kill the worker
            log.exception("job %s crashed", job_id)
            finished = self.store.end(job_id, JobStatus.failed, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            with self._cancel_lock:
                self._cancel.discard(job_id)
        if finished is not None:
            self.on_finished(finished)


class _ShuttingDown(Exception):
    pass
