"""Progress reports to the job's sender: denoising steps and training steps (with loss and ETA)
as signed `POST <callback_url>/progress` requests (`protocol.progress.ProgressReport`).

Best effort and never in the engine's way: `report` only records the job's latest numbers and
wakes a background thread, which posts at most one report per job every `interval_s` (the first
at once), always the newest. A sender that refuses a report for good (4xx other than 408/429:
an orchestrator without the route, a job that moved on) hears nothing more about that job; a
lost report is simply superseded by the next.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from dippy_studio.miner.net import send_for_status
from dippy_studio.miner.store import JobRecord
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.outbound import OutboundError, UrlPolicy, check_url, guarded_client
from dippy_studio.protocol.progress import MAX_ETA_S, PROGRESS_SUFFIX, ProgressReport

log = logging.getLogger("dippy_studio.miner.progress")

# Statuses after which another report would be refused the same way.
_RETRYABLE = frozenset({408, 425, 429})


def progress_url(callback_url: str) -> str:
    """Where a job's progress goes: its callback URL's path plus `/progress` (query kept)."""
    parts = urlsplit(callback_url)
    return parts._replace(path=parts.path.rstrip("/") + PROGRESS_SUFFIX).geturl()


def build_report(url: str, report: ProgressReport, signer: Signer, receiver_ss58: str | None) -> httpx.Request:
    """The signed POST of one report."""
    body = report.model_dump_json(exclude_none=True).encode()
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/json", **sign_request(signer, "POST", target, body, receiver_ss58)}
    return httpx.Request("POST", url, content=body, headers=headers)


class ProgressReporter:
    """Posts the latest progress of each running job, throttled per job, from one thread."""

    def __init__(
        self,
        signer: Signer,
        policy: UrlPolicy,
        *,
        interval_s: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.signer = signer
        self.policy = policy
        self.interval_s = interval_s
        self.clock = clock
        self._client = guarded_client(policy, timeout=timeout)
        # job id -> (record, newest report not yet sent); and when each job's last report went.
        self._pending: dict[str, tuple[JobRecord, ProgressReport]] = {}
        self._last_sent: dict[str, float] = {}
        self._refused: set[str] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        self._client.close()

    def report(
        self, record: JobRecord, step: int, total: int, loss: float | None = None, eta_s: float | None = None
    ) -> None:
        """Record a job's progress (from a worker thread; returns at once)."""
        if record.callback_url is None or self.interval_s <= 0 or total < 1:
            return
        step = max(0, min(step, total))
        # What the report cannot carry is left out (a loss that is no number, a time left past
        # its range): the steps are still reported, and nothing is raised into the job.
        if loss is not None and not math.isfinite(loss):
            loss = None
        eta = max(0.0, eta_s) if eta_s is not None and eta_s <= MAX_ETA_S else None
        report = ProgressReport(job_id=record.job_id, step=step, total=total, loss=loss, eta_s=eta)
        with self._cv:
            if record.job_id in self._refused:
                return
            self._pending[record.job_id] = (record, report)
            self._cv.notify()

    def finished(self, job_id: str) -> None:
        """Forget a job that ended: its result callback says the rest."""
        with self._cv:
            self._pending.pop(job_id, None)
            self._last_sent.pop(job_id, None)
            self._refused.discard(job_id)

    def _due(self) -> tuple[list[tuple[JobRecord, ProgressReport]], float | None]:
        """Reports whose job may send now, and the seconds until the next one may (under the lock)."""
        now = self.clock()
        due, wait = [], None
        for job_id, (record, report) in list(self._pending.items()):
            ready_at = self._last_sent.get(job_id, float("-inf")) + self.interval_s
            if ready_at <= now:
                due.append((record, report))
                del self._pending[job_id]
                self._last_sent[job_id] = now
            else:
                wait = ready_at - now if wait is None else min(wait, ready_at - now)
        return due, wait

    def _run(self) -> None:
        while True:
            with self._cv:
                due, wait = self._due()
                while not self._stop and not due:
                    self._cv.wait(wait)
                    due, wait = self._due()
                if self._stop:
                    return
            for record, report in due:
                self._send(record, report)

    def _send(self, record: JobRecord, report: ProgressReport) -> None:
        assert record.callback_url is not None
        url = progress_url(record.callback_url)
        try:
            check_url(url, self.policy)
            status, _ = send_for_status(self._client, build_report(url, report, self.signer, record.sender))
        except OutboundError as exc:
            log.info("progress for %s not sent: %s", record.job_id, exc)
            self._refuse(record.job_id)
            return
        except (httpx.HTTPError, OSError) as exc:
            log.debug("progress for %s not delivered: %s", record.job_id, exc)
            return
        if 400 <= status < 500 and status not in _RETRYABLE:
            log.info("progress for %s refused (HTTP %d); no more for it", record.job_id, status)
            self._refuse(record.job_id)

    def _refuse(self, job_id: str) -> None:
        with self._cv:
            self._refused.add(job_id)
            self._pending.pop(job_id, None)
