"""Getting queued jobs to miners, and taking them back when miners do not deliver.

One dispatch round: claim queued jobs and pick a miner for each (`routing.choose_miner`), in one
transaction (`Store.claim_for_dispatch` with `assign`, safe across replicas), then send each job
as a signed POST. The miner's job id is `<request id>-<attempt>`, so every attempt is a new
job on the miner's side and a late callback from an earlier attempt can be told apart. Results
come back by callback to `{public_url}/v1/miner-callbacks/{request id}`; LoRAs and datasets are
fetched from `{public_url}/v1/blobs/{sha256}`.

A miner that refuses (429, 5xx, any other non-2xx) or cannot be reached gets the job back: it
goes to the queue for another miner (the attempt is recorded as `refused`) and that miner gets
nothing for a cool-down. The sweeper (`sweep_once`) takes back jobs whose miner ran out of time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, Protocol

import httpx

from dippy_studio.orchestrator.batching import Coalescer
from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.registry import Registry, endpoint_url
from dippy_studio.orchestrator.routing import Candidate, choose_miner, eligible
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.states import ACTIVE, RequestStatus
from dippy_studio.orchestrator.store import Store, SweepResult
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.schemas import InferenceJob, JobKind, LoraDownload, TrainJob

log = logging.getLogger("dippy_studio.orchestrator.dispatch")

MINER_PATHS = {JobKind.inference.value: "/v1/inference", JobKind.training.value: "/v1/train"}


class JobEvents(Protocol):
    """What the rest of the orchestrator wants to hear about a job."""

    def requeued(self, job_id: str) -> None:
        """The job is back in the queue: dispatch soon."""

    def finished(self, job_id: str, webhook: bool = True) -> None:
        """The job reached a terminal state: wake waiters and, when it has a webhook (False: it
        has none), the webhook sender."""


def miner_job_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


def blob_url(public_url: str, sha256: str) -> str:
    return f"{public_url}/v1/blobs/{sha256}"


def callback_url(public_url: str, job_id: str) -> str:
    return f"{public_url}/v1/miner-callbacks/{job_id}"


def miner_request(job: Job, public_url: str) -> InferenceJob | TrainJob:
    """The wire request for the current attempt of a dispatched job."""
    payload = job.payload
    common: dict[str, Any] = {
        "job_id": miner_job_id(job.id, job.attempts),
        "callback_url": callback_url(public_url, job.id),
        # The miner stops when our patience ends, not the client's: then we try elsewhere.
        "deadline": job.dispatch_deadline or job.deadline,
    }
    if job.kind == JobKind.inference.value:
        loras = [
            LoraDownload(url=blob_url(public_url, lora["sha256"]), sha256=lora["sha256"], scale=lora["scale"])
            for lora in payload.get("loras", [])
        ]
        fields = {k: payload[k] for k in ("prompt", "seed", "width", "height", "steps", "guidance")}
        return InferenceJob(**common, **fields, loras=loras)
    train_fields = ("trigger_word", "rank", "alpha", "steps", "lr", "seed", "max_seconds")
    fields = {k: payload[k] for k in train_fields if payload.get(k) is not None}
    return TrainJob(
        **common,
        **fields,
        dataset_url=blob_url(public_url, payload["dataset_sha256"]),
        dataset_sha256=payload["dataset_sha256"],
    )


def retry_or_fail(
    store: Store,
    job: Job,
    reason: str,
    *,
    outcome: str,
    events: JobEvents,
    now: datetime,
    min_attempt_s: float,
) -> str | None:
    """Take an active job back from its miner: to the queue when it has attempts and time left,
    else to `failed`. Returns the new status, or None when the job had already moved on."""
    left = (job.deadline - now).total_seconds()
    active = list(ACTIVE)
    if job.attempts < job.max_attempts and left > 0 and left >= min_attempt_s:
        if store.transition(job.id, active, "queued", now=now, attempt_outcome=outcome, attempt_error=reason):
            events.requeued(job.id)
            return RequestStatus.queued.value
        return None
    error = f"attempt {job.attempts} of {job.max_attempts} failed ({reason}); no attempts or time left"
    if store.transition(job.id, active, "failed", now=now, attempt_outcome=outcome, attempt_error=reason, error=error):
        events.finished(job.id, webhook=job.webhook_url is not None)
        return RequestStatus.failed.value
    return None


class Dispatcher:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        signer: Signer,
        settings: OrchestratorSettings,
        events: JobEvents,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.registry = registry
        self.signer = signer
        self.settings = settings
        self.events = events
        self.rng = rng or random.Random()
        self.clock = clock
        self._http = httpx.Client(timeout=settings.dispatch_timeout_s, follow_redirects=False)
        self._pool = ThreadPoolExecutor(settings.dispatch_concurrency, thread_name_prefix="dispatch")
        self._lock = threading.Lock()
        # Signalled whenever a send ends, so a dispatch round waiting for room wakes at once.
        self._room = threading.Condition(self._lock)
        self._in_flight = 0
        self._cooldown: dict[str, float] = {}  # hotkey -> time.monotonic() when it may get work again
        # Accepted sends move their jobs to `running` in batches: one write for many jobs.
        self._running: Coalescer[str] = Coalescer("running", lambda ids: store.mark_running(ids, now=self.clock()))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._running.flush()
        self._http.close()

    # ---- dispatch ---------------------------------------------------------------------------

    def dispatch_once(self) -> int:
        """Claim what can be sent now and start sending it; returns the number of jobs claimed.

        With every send slot busy, it first waits (up to `dispatch_interval_s`) for one to free
        up: returning at once would leave the loop asleep for a whole interval while sends finish
        in milliseconds, which capped a busy orchestrator at about 8 jobs per interval."""
        concurrency = self.settings.dispatch_concurrency
        with self._room:
            self._room.wait_for(lambda: self._in_flight < concurrency, timeout=self.settings.dispatch_interval_s)
            room = concurrency - self._in_flight
        if room <= 0:
            return 0
        candidates = self.registry.candidates()
        cooling = self._cooling()
        profile = self.settings.profile
        kinds = [kind for kind in JobKind if eligible(candidates, kind.value, profile, cooling)]
        if not kinds:
            return 0
        chosen: dict[str, Candidate] = {}

        def assign(job: Job, tried: Counter[str]) -> tuple[str, int | None] | None:
            with self._lock:  # random.Random is not safe to share between threads
                choice = choose_miner(candidates, job.kind, profile, tried=tried, exclude=cooling, rng=self.rng)
            if choice is None:
                return None  # nobody can take it right now: it stays queued, no attempt counted
            chosen[job.id] = choice
            return choice.hotkey, choice.uid

        limit = min(room, self.settings.dispatch_batch)
        jobs = self.store.claim_for_dispatch(limit, now=self.clock(), kinds=kinds, assign=assign)
        for job in jobs:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._send_guarded, job, chosen[job.id])
        return len(jobs)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no send is in flight (tests, shutdown)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._in_flight == 0:
                    return True
            time.sleep(0.01)
        return False

    def _send_guarded(self, job: Job, choice: Candidate) -> None:
        try:
            self._send(job, choice)
        except Exception:
            # A bug must not leave the job stuck in `dispatched`: the sweeper will take it back.
            log.exception("dispatching %s failed", job.id)
        finally:
            with self._room:
                self._in_flight -= 1
                self._room.notify_all()

    def _send(self, job: Job, choice: Candidate) -> None:
        body = miner_request(job, self.settings.public_url).model_dump_json(exclude_none=True).encode()
        url, target = endpoint_url(choice.endpoint, MINER_PATHS[job.kind])
        headers = sign_request(self.signer, "POST", target, body, choice.hotkey)
        headers["content-type"] = "application/json"
        try:
            response = self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            reason = f"miner uid {choice.uid} unreachable: {type(exc).__name__}"
            self.registry.mark_unhealthy(choice.hotkey, reason)
            self._refused(job, choice, reason, self.settings.refusal_cooldown_s)
            return
        if response.status_code in (200, 202):
            # Accepted. A fast miner may already have called back; then this finds nothing to do.
            self._running.add(job.id)
            return
        reason = f"miner uid {choice.uid} refused: HTTP {response.status_code} {_detail(response)}".strip()
        self._refused(job, choice, reason, _retry_after(response, self.settings.refusal_cooldown_s))

    def _refused(self, job: Job, miner: Candidate, reason: str, cooldown_s: float) -> None:
        log.info("%s: %s", job.id, reason)
        with self._lock:
            self._cooldown[miner.hotkey] = time.monotonic() + cooldown_s
        retry_or_fail(
            self.store,
            job,
            reason,
            outcome="refused",
            events=self.events,
            now=self.clock(),
            min_attempt_s=self.settings.min_attempt_s,
        )

    def _cooling(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            for hotkey in [h for h, until in self._cooldown.items() if until <= now]:
                del self._cooldown[hotkey]
            return set(self._cooldown)

    # ---- sweeping and canceling -------------------------------------------------------------

    def sweep_once(self) -> SweepResult:
        """Take back jobs whose miner ran out of time; fail those whose client deadline passed."""
        result = self.store.sweep(now=self.clock(), min_attempt_s=self.settings.min_attempt_s)
        for job_id in result.requeued:
            log.info("%s timed out at its miner; back in the queue", job_id)
            self.events.requeued(job_id)
        for job_id in result.failed:
            self.events.finished(job_id)
        return result

    def cancel_at_miner(self, job: Job) -> None:
        """Ask the miner working on a job the client canceled to stop (best effort, in the background)."""
        if not job.miner_hotkey:
            return
        self._pool.submit(self._cancel_at_miner, job.miner_hotkey, miner_job_id(job.id, job.attempts))

    def _cancel_at_miner(self, hotkey: str, miner_job: str) -> None:
        miner = self.store.get_miner(hotkey)
        if miner is None or not miner.endpoint:
            return
        url, target = endpoint_url(miner.endpoint, f"/v1/jobs/{miner_job}/cancel")
        try:
            self._http.post(url, content=b"", headers=sign_request(self.signer, "POST", target, b"", hotkey))
        except httpx.HTTPError as exc:
            # The miner will stop at the attempt's deadline anyway.
            log.info("could not cancel %s at miner %s: %s", miner_job, hotkey, exc)


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return str(detail)[:200] if detail else ""


def _retry_after(response: httpx.Response, default: float) -> float:
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), 300.0)
    except ValueError:
        return default
