"""Getting queued jobs to miners, and taking them back when miners do not deliver.

One dispatch round, on the app's event loop: claim queued jobs and pick a miner for each
(`routing.choose_miner`), in one transaction on the store's writer thread
(`Store.claim_for_dispatch` with `assign`, safe across replicas), then send each job as a signed
POST (aiohttp, up to `dispatch_concurrency` in flight). The miner's job id is
`<request id>-<attempt>`, so every attempt is a new job on the miner's side and a late callback
from an earlier attempt can be told apart. Results come back by callback to
`{public_url}/v1/miner-callbacks/{request id}`; LoRAs and datasets are fetched from
`{public_url}/v1/blobs/{sha256}`.

Back-pressure: a miner is sent no more jobs of a kind than it has slots for (`routing.Lane.slots`:
its workers and queue, and no more than it finishes within the attempt timeout at the pace it
advertises), counting every job it holds of ours (`Store.active_counts`). A miner that still
pushes back (429, or 503 with Retry-After), does not answer within `dispatch_timeout_s`, or cannot
be reached gives the job back without using up one of the job's attempts (recorded as `busy` or
`unreachable`); the job waits in the queue for a free miner until its deadline, and that miner
gets nothing for its Retry-After (or `refusal_cooldown_s`). Any other refusal (another non-2xx)
is recorded as `refused` and uses up an attempt. The sweeper (`Orchestrator.sweep_once`) takes
back jobs whose miner ran out of time.
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
from typing import Any

import aiohttp
from pydantic import BaseModel

from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.callbacks import JobEvents, miner_job_id, scrub_paths, take_back
from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.registry import Registry, endpoint_url
from dippy_studio.orchestrator.routing import Candidate, choose_miner, eligible
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.outbound import guarded_socket_factory

log = logging.getLogger("dippy_studio.orchestrator.dispatch")

# Times the dispatcher tries again to mark accepted sends `running` that another transaction held.
RUNNING_RETRIES = 2


def blob_url(public_url: str, sha256: str) -> str:
    return f"{public_url}/v1/blobs/{sha256}"


def miner_request(job: Job, public_url: str) -> BaseModel:
    """The wire request for the current attempt of a dispatched job (its kind builds the rest)."""
    common: dict[str, Any] = {
        "job_id": miner_job_id(job.id, job.attempts),
        "callback_url": f"{public_url}/v1/miner-callbacks/{job.id}",
        # The miner stops when our patience ends, not the client's: then we try elsewhere.
        "deadline": job.dispatch_deadline or job.deadline,
    }
    return kinds.get(job.kind).miner_request(job, common, functools.partial(blob_url, public_url))


class Dispatcher:
    """Sends claimed jobs to miners from the event loop: claims run on the store's writer thread
    (`Store.call`) and sends are aiohttp requests, so a busy dispatcher needs no thread of its own per send.
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
        self._wake_pending = False  # a wake-up from another thread is on its way to the loop
        self._short_of_slots = False  # the last round left jobs queued: no miner had a free slot
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
        policy = self.settings.url_policy
        connector = aiohttp.TCPConnector(limit=0, socket_factory=guarded_socket_factory(policy))
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
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
        elif not self._wake_pending:
            # One hand-over to the loop however many wake-ups arrive before it runs (a replica's
            # listener hears every job that any replica queues).
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._woken)

    def slot_freed(self) -> None:
        """A job at a miner ended (from any thread): dispatch now if the last round left jobs
        queued for want of a free miner, rather than at the next interval."""
        if self._short_of_slots:
            self.wake()

    def _woken(self) -> None:
        self._wake_pending = False
        if self._wake is not None:
            self._wake.set()

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
            candidates = await store.call(self.registry.candidates)
        # A job goes only to miners serving its model (`Job.model`, their capacity's `profile`).
        models = self.settings.served_models
        specs = {spec.name: spec for spec in kinds.all_kinds()}
        if not any(
            eligible(candidates, spec.lane, model, self._cooling(), task=spec.task)
            for spec in specs.values()
            for model in models
        ):
            return 0
        # What each miner already holds of ours, per lane: its free slots are what is left.
        held: dict[str, Counter[str]] = {spec.lane: Counter() for spec in specs.values()}
        for (hotkey, kind), count in (await asyncio.to_thread(store.active_counts)).items():
            if kind in specs:
                held[specs[kind].lane][hotkey] += count
        timeouts = {name: spec.attempt_timeout_s(self.settings) for name, spec in specs.items()}
        # The (kind, model) pairs some miner has a free slot for now.
        ready = {
            (name, model)
            for name, spec in specs.items()
            for model in models
            if eligible(
                candidates,
                spec.lane,
                model,
                self._cooling(),
                held=held[spec.lane],
                attempt_timeout_s=timeouts[name],
                task=spec.task,
            )
        }
        wanted = sorted({name for name, _ in ready})
        wanted_models = sorted({model for _, model in ready})
        if not wanted:
            self._short_of_slots = True
            return 0
        chosen: dict[str, Candidate] = {}
        self._short_of_slots = False

        def assign(job: Job, tried: Counter[str]) -> tuple[str, int | None] | None:
            lane = specs[job.kind].lane
            # Read now, on the writer thread, not at the round's start: a refusal that came in
            # meanwhile has set its cool-down before its job went back to the queue.
            cooling = self._cooling()
            with self._lock:  # random.Random is not safe to share between threads
                choice = choose_miner(
                    candidates,
                    lane,
                    job.model,
                    tried=tried,
                    exclude=cooling,
                    held=held[lane],
                    attempt_timeout_s=timeouts[job.kind],
                    rng=self.rng,
                    task=specs[job.kind].task,
                )
            if choice is None:
                self._short_of_slots = True
                return None  # nobody can take it right now: it stays queued, no attempt counted
            held[lane][choice.hotkey] += 1
            chosen[job.id] = choice
            return choice.hotkey, choice.uid

        limit = min(room, self.settings.dispatch_batch)
        jobs = await store.call(
            store.claim_for_dispatch, limit, now=self.clock(), kinds=wanted, assign=assign, models=wanted_models
        )
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
        url, target = endpoint_url(choice.endpoint, kinds.get(job.kind).miner_path)
        headers = sign_request(self.signer, "POST", target, body, choice.hotkey)
        headers["content-type"] = "application/json"
        try:
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                if response.status in (200, 202):
                    # Accepted. A fast miner may already have called back; then this finds nothing to do.
                    self._note_running(job.id)
                    return
                detail = await _detail(response)
                given = response.headers.get("retry-after")
                status = response.status
        except aiohttp.ClientConnectorError as exc:
            # Nothing was delivered: the miner is down (or its address is), not busy.
            reason = f"miner uid {choice.uid} unreachable: {type(exc).__name__}"
            await self.store.call(self.registry.mark_unhealthy, choice.hotkey, reason)
            await self._refused(job, choice, reason, "unreachable", self.settings.refusal_cooldown_s)
            return
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Sent, but no answer in time: an overloaded miner. It may have queued the job; if so, its
            # late callback is ignored (the job has moved on) and costs only its own work.
            reason = f"miner uid {choice.uid} did not answer: {type(exc).__name__}"
            await self._refused(job, choice, reason, "busy", self.settings.refusal_cooldown_s)
            return
        reason = f"miner uid {choice.uid} refused: HTTP {status} {detail}".strip()
        pushed_back = status == 429 or (status == 503 and given is not None)
        cooldown = _retry_after(given, self.settings.refusal_cooldown_s)
        await self._refused(job, choice, reason, "busy" if pushed_back else "refused", cooldown)

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
        written = asyncio.ensure_future(self.store.call(self.store.mark_running, ids, now=at))
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

    async def _refused(self, job: Job, miner: Candidate, reason: str, outcome: str, cooldown_s: float) -> None:
        log.info("%s: %s", job.id, reason)
        with self._lock:
            self._cooldown[miner.hotkey] = time.monotonic() + cooldown_s
        await take_back(
            self.store, self.events, job, reason, outcome, now=self.clock(), min_attempt_s=self.settings.min_attempt_s
        )

    def _cooling(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            for hotkey in [h for h, until in self._cooldown.items() if until <= now]:
                del self._cooldown[hotkey]
            return set(self._cooldown)

    # ---- canceling ------------------------------------------------------------------------

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
        miner = await self.store.call(self.store.get_miner, hotkey)
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
    # Clients may read it (a job's error): a miner's file paths are none of theirs.
    return scrub_paths(str(detail))[:200] if detail else ""


def _retry_after(value: str | None, default: float) -> float:
    try:
        return min(max(float(value or ""), 0.0), 300.0)
    except ValueError:
        return default
