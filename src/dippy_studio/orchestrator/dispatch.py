"""Getting queued jobs to miners, and taking them back when miners do not deliver.

One dispatch round, on the app's event loop: claim queued jobs and pick a miner for each
(`routing.choose_miner`), in one transaction on the store's writer thread
(`Store.claim_for_dispatch` with `assign`, safe across replicas), then send each job as a signed
POST (aiohttp, up to `dispatch_concurrency` in flight). The miner's job id is
`<request id>-<attempt>`, so every attempt is a new job on the miner's side and a late callback
from an earlier attempt can be told apart. Results come back by callback to
`{public_url}/v1/miner-callbacks/{request id}`; LoRAs and datasets are fetched from
`{public_url}/v1/blobs/{sha256}`.

A miner that refuses (429, 5xx, any other non-2xx) or cannot be reached gets the job back: it
goes to the queue for another miner (the attempt is recorded as `refused`) and that miner gets
nothing for a cool-down. The sweeper (`sweep_once`) takes back jobs whose miner ran out of time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import aiohttp

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

# Times the dispatcher tries again to mark accepted sends `running` that another transaction held.
RUNNING_RETRIES = 2
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
    """Sends claimed jobs to miners from the event loop: claims run on the store's writer thread
    and sends are aiohttp requests, so a busy dispatcher needs no thread of its own per send.
    `start` and `stop` run on the loop (the app's lifespan); `wake` may be called from any thread."""

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
        self._lock = threading.Lock()  # the rng and cool-downs, used on the writer thread too
        self._cooldown: dict[str, float] = {}  # hotkey -> time.monotonic() when it may get work again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._room: asyncio.Event | None = None  # set whenever a send ends
        self._sends: set[asyncio.Task[None]] = set()
        # Accepted sends move their jobs to `running` together: one write for all that were
        # accepted in one turn of the loop.
        self._accepted: list[str] = []

    # ---- lifecycle (on the event loop) ------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake, self._room = asyncio.Event(), asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=self.settings.dispatch_timeout_s)
        # No connection cap of aiohttp's own: `dispatch_concurrency` bounds the sends.
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self._task = asyncio.create_task(self._run(), name="orch-dispatch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sends:
            # A send cut short leaves its job dispatched: the sweeper takes it back.
            await asyncio.wait(set(self._sends), timeout=self.settings.dispatch_timeout_s)
        self._flush_running()
        if self._session is not None:
            await self._session.close()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def wake(self) -> None:
        """Dispatch now rather than at the next interval (from any thread)."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or loop.is_closed():
            return
        if _on_loop(loop):
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            # Cleared before the round, so a wake-up that arrives during it starts the next at once.
            self._wake.clear()
            try:
                claimed = await self.dispatch_once()
            except Exception:
                # One bad round (database blip, bug) must not end the loop for good.
                log.exception("dispatch round failed; retrying in %.1fs", self.settings.dispatch_interval_s)
                claimed = 0
            if not claimed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.dispatch_interval_s)

    # ---- dispatch ---------------------------------------------------------------------------

    async def dispatch_once(self) -> int:
        """Claim what can be sent now and start sending it; returns the number of jobs claimed.

        With every send slot busy, it first waits (up to `dispatch_interval_s`) for one to free
        up: returning at once would leave the loop asleep for a whole interval while sends finish
        in milliseconds."""
        assert self._room is not None
        concurrency = self.settings.dispatch_concurrency
        if len(self._sends) >= concurrency:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), self.settings.dispatch_interval_s)
        room = concurrency - len(self._sends)
        if room <= 0:
            return 0
        store = self.store
        candidates = self.registry.cached_candidates()
        if candidates is None:
            candidates = await store.submit(self.registry.candidates)
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
        jobs = await store.submit(lambda: store.claim_for_dispatch(limit, now=self.clock(), kinds=kinds, assign=assign))
        for job in jobs:
            task = asyncio.create_task(self._send_guarded(job, chosen[job.id]))
            self._sends.add(task)
            task.add_done_callback(self._sent)
        return len(jobs)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        if self._room is not None:
            self._room.set()

    async def _send_guarded(self, job: Job, choice: Candidate) -> None:
        try:
            await self._send(job, choice)
        except Exception:
            # A bug must not leave the job stuck in `dispatched`: the sweeper will take it back.
            log.exception("dispatching %s failed", job.id)

    async def _send(self, job: Job, choice: Candidate) -> None:
        assert self._session is not None
        body = miner_request(job, self.settings.public_url).model_dump_json(exclude_none=True).encode()
        url, target = endpoint_url(choice.endpoint, MINER_PATHS[job.kind])
        headers = sign_request(self.signer, "POST", target, body, choice.hotkey)
        headers["content-type"] = "application/json"
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                if response.status in (200, 202):
                    # Accepted. A fast miner may already have called back; then this finds nothing to do.
                    self._note_running(job.id)
                    return
                detail = await _detail(response)
                retry_after = _retry_after(response.headers.get("retry-after"), self.settings.refusal_cooldown_s)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"miner uid {choice.uid} unreachable: {type(exc).__name__}"
            await self.store.submit(lambda: self.registry.mark_unhealthy(choice.hotkey, reason))
            await self._refused(job, choice, reason, self.settings.refusal_cooldown_s)
            return
        reason = f"miner uid {choice.uid} refused: HTTP {status} {detail}".strip()
        await self._refused(job, choice, reason, retry_after)

    def _note_running(self, job_id: str) -> None:
        if not self._accepted:
            assert self._loop is not None
            self._loop.call_soon(self._flush_running)
        self._accepted.append(job_id)

    def _flush_running(self, ids: list[str] | None = None, now: datetime | None = None, tries: int = 0) -> None:
        if ids is None:
            ids, self._accepted = self._accepted, []
        if not ids:
            return
        at = now or self.clock()
        # Nobody waits on this write: a failure is only logged (the callback moves the job on anyway).
        written = self.store.submit(lambda: self.store.mark_running(ids, now=at))
        written.add_done_callback(functools.partial(self._running_written, ids, at, tries))

    def _running_written(self, ids: list[str], at: datetime, tries: int, written: asyncio.Future[set[str]]) -> None:
        if written.cancelled():
            return
        if (error := written.exception()) is not None:
            log.error("marking sends as running failed: %s", error, exc_info=error)
            return
        left = [job_id for job_id in ids if job_id not in written.result()]
        if left and tries < RUNNING_RETRIES and self._loop is not None and self.alive:
            # Finished meanwhile (then this finds nothing to do), or held for a moment by another
            # transaction, such as a replica's claim that looked at the row: try those again.
            self._loop.call_later(self.settings.dispatch_interval_s, self._flush_running, left, at, tries + 1)

    async def _refused(self, job: Job, miner: Candidate, reason: str, cooldown_s: float) -> None:
        log.info("%s: %s", job.id, reason)
        with self._lock:
            self._cooldown[miner.hotkey] = time.monotonic() + cooldown_s
        await self.store.submit(
            lambda: retry_or_fail(
                self.store,
                job,
                reason,
                outcome="refused",
                events=self.events,
                now=self.clock(),
                min_attempt_s=self.settings.min_attempt_s,
            ),
            lock_key=job.id,
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
        """Ask the miner working on a job the client canceled to stop (best effort, in the
        background; from any thread)."""
        loop = self._loop
        if not job.miner_hotkey or loop is None or loop.is_closed() or self._session is None:
            return
        cancel = self._cancel_at_miner(job.miner_hotkey, miner_job_id(job.id, job.attempts))
        if _on_loop(loop):
            task = loop.create_task(cancel)
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        else:
            asyncio.run_coroutine_threadsafe(cancel, loop)

    async def _cancel_at_miner(self, hotkey: str, miner_job: str) -> None:
        assert self._session is not None
        miner = await self.store.submit(lambda: self.store.get_miner(hotkey))
        if miner is None or not miner.endpoint:
            return
        url, target = endpoint_url(miner.endpoint, f"/v1/jobs/{miner_job}/cancel")
        headers = sign_request(self.signer, "POST", target, b"", hotkey)
        try:
            async with self._session.post(url, data=b"", headers=headers, allow_redirects=False) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The miner will stop at the attempt's deadline anyway.
            log.info("could not cancel %s at miner %s: %s", miner_job, hotkey, exc)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def _detail(response: aiohttp.ClientResponse) -> str:
    try:
        detail = (await response.json(content_type=None)).get("detail")
    except (ValueError, AttributeError, aiohttp.ClientError):
        return ""
    return str(detail)[:200] if detail else ""


def _retry_after(value: str | None, default: float) -> float:
    try:
        return min(max(float(value or ""), 0.0), 300.0)
    except ValueError:
        return default
