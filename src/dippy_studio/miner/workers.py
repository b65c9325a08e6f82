"""Worker lanes: threads that take queued jobs from the store and run them.

Inference and training have separate lanes (and threads), so a long training job never
blocks inference. A job is checked against its deadline and cancelation between stages
and at every denoising step; past its deadline it is abandoned and reported expired.

How much a lane takes on: each lane keeps its recent pace (`WorkerPool.seconds_per_job`, a
running mean of the seconds its succeeded jobs held a worker). A new job is accepted only while
the jobs already queued or running leave it time to finish by its deadline at that pace
(`max_ahead`), and never beyond the lane's configured queue limit; otherwise the sender gets 429
with a Retry-After of about one job's time. The pace is also advertised in `/v1/capacity`, so a
sender can keep no more jobs here than the workers finish within its attempt timeout. Until a
job has finished there is no pace, and only the queue limit applies; after a restart the pace is
taken up again from the jobs on record.

A job that fails because of its input (`INPUT_ERRORS`: a LoRA that is malformed or does not fit
the profile, a dataset that does not load, an input image or mask that does not match its sha256
or cannot be read) is marked as such, so the sender knows the
request, not this miner, is at fault. Error messages never carry this miner's own paths: they are
shortened to the file's name (`scrub_paths`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dippy_studio.engine.errors import BadLoraError, DatasetError, EngineError
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


class BadInput(ValueError):
    """The job's input image or mask is unusable: not the promised file, or not an image the
    profile can take. The message is for the sender."""


Runner = Callable[[JobRecord, AbortCheck], Outcome]
Listener = Callable[[JobRecord], None]

# Failures caused by what the job asked for, not by this miner: any engine of the profile would
# refuse the same LoRA, dataset or input image. (A LoRA this miner cannot read or hold is its own failure.)
INPUT_ERRORS = (BadLoraError, DatasetError, BadInput)
# Weight of the latest job in a lane's running mean of seconds per job.
PACE_SMOOTHING = 0.2


def max_ahead(seconds_left: float, workers: int, seconds_per_job: float | None) -> int | None:
    """How many jobs may be queued or running in a lane ahead of a new one for the new one to
    finish within `seconds_left`, at `seconds_per_job` on each of `workers`; None without a pace.

    Each worker gets through floor(seconds_left / seconds_per_job) jobs in that time, the new one
    among them. An idle lane always takes a job (0): the pace is an estimate, and a try costs
    nothing that waiting would not."""
    if seconds_per_job is None or seconds_per_job <= 0 or workers <= 0:
        return None
    return max(math.floor(seconds_left / seconds_per_job) * workers - 1, 0)


def scrub_paths(message: str, directories: Iterable[Path]) -> str:
    """`message` with every path under `directories` shortened to its file name: where this
    miner keeps its files is nobody else's business."""
    for directory in directories:
        for form in {str(directory), str(directory.resolve())}:
            pattern = re.escape(form.rstrip("/")) + r"(?![^/\s:'\"])(?:/[^\s:'\"]*)?"
            message = re.sub(pattern, lambda m: Path(m.group(0)).name or "<file>", message)
    return message


class WorkerPool:
    def __init__(
        self,
        store: JobStore,
        runners: dict[JobKind, Runner],
        workers: dict[JobKind, int],
        on_finished: Listener,
        clock: Callable[[], float] = time.time,
        private_dirs: Iterable[Path] = (),
    ) -> None:
        self.store = store
        self.runners = runners
        self.workers = workers
        self.on_finished = on_finished
        self.clock = clock
        self.private_dirs = tuple(private_dirs)  # scrubbed from error messages
        self._pace: dict[JobKind, float] = {}
        self._pace_lock = threading.Lock()
        self._wake = {kind: threading.Event() for kind in JobKind}
        self._cancel: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: dict[JobKind, list[threading.Thread]] = {kind: [] for kind in JobKind}

    def start(self) -> None:
        # The pace survives a restart: a miner that comes back to a burst knows what it can take.
        for kind in self.runners:
            for seconds in self.store.recent_run_seconds(kind):
                self._observe(kind, seconds)
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

    def seconds_per_job(self, kind: JobKind) -> float | None:
        """The lane's recent seconds per succeeded job on one worker; None before the first."""
        with self._pace_lock:
            return self._pace.get(kind)

    def _observe(self, kind: JobKind, seconds: float) -> None:
        with self._pace_lock:
            previous = self._pace.get(kind)
            self._pace[kind] = seconds if previous is None else previous + PACE_SMOOTHING * (seconds - previous)

    def cancel(self, record: JobRecord) -> JobRecord | None:
        """Cancel a queued job now, or ask a running one to stop at its next check."""
        if record.status == JobStatus.queued:
            # Only while still queued: a worker may have taken it since `record` was read, and
            # then it must be told to stop, not have its job ended under it.
            ended = self.store.cancel_queued(record.job_id, "canceled by the sender")
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
            error = scrub_paths(str(exc), self.private_dirs)
            finished = self.store.end(job_id, JobStatus.failed, error, input_error=isinstance(exc, INPUT_ERRORS))
        except Exception as exc:  # a bug must fail the job, not kill the worker
            log.exception("job %s crashed", job_id)
            error = scrub_paths(f"internal error: {type(exc).__name__}: {exc}", self.private_dirs)
            finished = self.store.end(job_id, JobStatus.failed, error)
        finally:
            with self._cancel_lock:
                self._cancel.discard(job_id)
        if finished is None:
            return
        if finished.status == JobStatus.succeeded and finished.started_at is not None:
            self._observe(record.kind, max(0.0, (finished.finished_at or self.clock()) - finished.started_at))
        self.on_finished(finished)


class _ShuttingDown(Exception):
    pass
