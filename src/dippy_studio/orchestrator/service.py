"""The orchestrator as a service object: its parts, its background loops, and the operations the
API calls. No HTTP here: refusals are `errors` exceptions, which `api` maps to status codes.

`Orchestrator` holds the store, the blob stores, the miner registry, the dispatcher, the callback
handler, the webhook sender, the audit queue and the score snapshot, and is the `JobEvents` they
report to once their writes have committed. Every part takes the store and a clock, so several
orchestrators can share one database and tests can build one in-process. `AuditsProcess` is the
audit queue alone, for `dippy-studio orchestrator audits`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from dippy_studio.chain.base import Chain
from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.admission import Refusals
from dippy_studio.orchestrator.audit import Auditor, AuditSampler, SamplerPolicy
from dippy_studio.orchestrator.auditing import AuditQueue
from dippy_studio.orchestrator.blobs import SHARE_ONE_STORE, BlobStore, MissingBlob, open_stores
from dippy_studio.orchestrator.callbacks import CallbackHandler, announce
from dippy_studio.orchestrator.dispatch import Dispatcher
from dippy_studio.orchestrator.errors import Conflict, InvalidRequest, NotFound, OrchestratorError, Unavailable
from dippy_studio.orchestrator.leader import Leadership, for_store
from dippy_studio.orchestrator.models import ApiKey, Job, utcnow
from dippy_studio.orchestrator.registry import Registry
from dippy_studio.orchestrator.scoring import window_scores
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.orchestrator.store import PROGRESS_EVENT, Listener, Store, job_row
from dippy_studio.orchestrator.views import request_view
from dippy_studio.orchestrator.webhooks import WebhookSender
from dippy_studio.protocol.keys import Signer, load_signer
from dippy_studio.protocol.limits import profile_limits
from dippy_studio.protocol.nonces import NonceStore, SqliteNonceStore, retention_for
from dippy_studio.protocol.outbound import OutboundError, check_url, guarded_client

log = logging.getLogger("dippy_studio.orchestrator")

NONCE_FILE = "orchestrator-nonces.sqlite"
_POLL_S = 1.0

# (store, window start, window end) -> {hotkey: score}
ScoreFn = Callable[[Store, datetime, datetime], Mapping[str, float]]


@dataclass(frozen=True)
class ScoreSnapshot:
    start: datetime
    end: datetime
    scores: dict[str, float]


class Orchestrator:
    """Everything a running orchestrator holds. Also the `JobEvents` its parts report to."""

    def __init__(
        self,
        settings: OrchestratorSettings,
        *,
        store: Store | None = None,
        chain: Chain | None = None,
        signer: Signer | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        nonces: NonceStore | None = None,
        score_fn: ScoreFn | None = None,
        auditor: Auditor | None = None,
        sampler: AuditSampler | None = None,
    ) -> None:
        # An unknown model fails here, at startup, not at the first request.
        for model in settings.served_models:
            profile_limits(model)
        self.settings = settings
        self.clock = clock
        self.signer = signer or signer_for(settings)
        # First: a bucket that cannot be used stops startup before anything else is opened.
        self.results, self.assets, self.heldout = blob_stores(settings)
        self._owns_store = store is None
        self.store = store or Store.open(settings.database_url, default_model=settings.profile)
        # Which singleton loops (sweep, sync, probe, scores, audits) this replica runs now.
        self.leadership = for_store(self.store, settings.leader_takeover_s)
        retention = retention_for(settings.max_signature_age, settings.allowed_clock_skew)
        nonces = nonces or SqliteNonceStore(settings.data_dir / NONCE_FILE, retention=retention)
        if chain is None and settings.chain_path is not None:
            from dippy_studio.chain.local import LocalChain

            chain = LocalChain(settings.chain_path, create=False)
        self.chain = chain
        self.url_policy = settings.url_policy
        self.waiters = Waiters()
        self.refusals = Refusals()
        self.registry = Registry(self.store, chain, self.signer, settings, clock=clock)
        self.dispatcher = Dispatcher(self.store, self.registry, self.signer, settings, self, rng=rng, clock=clock)
        self.callbacks = CallbackHandler(self.store, self.blobs_for, self.signer, nonces, settings, self, clock=clock)
        self.webhooks = WebhookSender(
            self.store, settings, lambda job: request_view(job, settings.public_url), clock=clock
        )
        lookback = timedelta(seconds=max(settings.inference_attempt_timeout_s, settings.training_attempt_timeout_s))
        self.score_fn = score_fn or (
            lambda store, start, end: window_scores(store, start, end, lookback, kinds.score_weights(settings))
        )
        self._scores: ScoreSnapshot | None = None
        self.listener: Listener | None = None
        self._http = guarded_client(self.url_policy, timeout=settings.download_timeout_s)
        self.audits = (
            audit_queue(
                settings,
                self.store,
                (self.results, self.assets, self.heldout),
                self.signer,
                self.leadership,
                clock=clock,
                sampler=sampler,
                auditor=auditor,
            )
            if settings.audit or auditor is not None
            else None
        )
        # Webhooks run on every replica (deliveries are leased per job); the rest only on the
        # leader of their role, named after the loop.
        leader = self.leadership
        self.tasks = {
            "sweep": Periodic("sweep", self.sweep_once, settings.sweep_interval_s, leadership=leader),
            "sync": Periodic("sync", self.registry.sync, settings.sync_interval_s, leadership=leader),
            "probe": Periodic("probe", self.registry.probe_all, settings.probe_interval_s, leadership=leader),
            "webhooks": Periodic("webhooks", self.webhooks.deliver_due, settings.webhook_interval_s, eager=True),
            "scores": Periodic("scores", self.refresh_scores, settings.score_interval_s, leadership=leader),
        }

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background threads. The dispatcher runs on the app's event loop: the
        lifespan starts and stops it (`Dispatcher.start`, `Dispatcher.stop`)."""
        # Miners first, so the first dispatch round has someone to send to (the leaders of sync
        # and probe fill the table; a replica that leads neither finds it filled already).
        try:
            if self.leadership.lead("sync"):
                self.registry.sync()
            if self.leadership.lead("probe"):
                self.registry.probe_all()
        except Exception:
            log.exception("first miner refresh failed; the loops will retry")
        for task in self.tasks.values():
            task.start()
        if self.audits is not None:
            self.audits.start()
        # Other replicas' writes (PostgreSQL): wake for jobs they queue and results they receive.
        self.listener = self.store.listen(self._job_event)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        for task in self.tasks.values():
            task.stop()
        if self.audits is not None:
            self.audits.stop()
        # Once the loops are stopped, so a successor never overlaps their last runs.
        self.leadership.close()
        self.webhooks.close()
        self.registry.close()
        self._http.close()
        if self._owns_store:
            self.store.close()

    # ---- JobEvents: after a change has committed ------------------------------------------------

    def requeued(self, job_id: str) -> None:
        self.dispatcher.wake()

    def finished(self, job: Job) -> None:
        self.waiters.notify(job.id)
        if job.miner_hotkey is not None:
            self.dispatcher.slot_freed()
        if job.webhook_url is not None:
            # Most requests have none: waking the sender would only cost it a query.
            self.tasks["webhooks"].wake()

    def succeeded(self, job: Job) -> None:
        if self.audits is not None:
            self.audits.offer(job)

    def _job_event(self, status: str, job_id: str) -> None:
        """A job event from the database (`Store.listen`), this replica's own writes included."""
        if status == PROGRESS_EVENT:
            # Only event streams care: no slot was freed.
            self.waiters.notify(job_id)
        elif status == RequestStatus.queued.value:
            self.dispatcher.wake()
        else:
            self.waiters.notify(job_id)
            self.dispatcher.slot_freed()

    # ---- client operations --------------------------------------------------------------------

    async def submit(
        self,
        secret: str | None,
        kind: str,
        body: Any,
        *,
        webhook_url: str | None = None,
        deadline_s: float | None = None,
        key: ApiKey | None = None,
    ) -> Job:
        """Create a request of `kind` from the client's `body` (the kind's `request_model`), as the
        key whose secret this is (or as `key`, admitted already). One write when the kind's payload
        needs no network or disk: admission and insert together; otherwise admission first, then
        the payload on a worker thread, then the insert. Refusals raise `errors.OrchestratorError`."""
        spec = kinds.get(kind)
        try:
            body = spec.request_model.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequest(f"not a {spec.name} request: {exc.errors()[0].get('msg', 'invalid')}") from None
        now = self.clock()
        settings = self.settings
        # The model the job is for, set on the body for the kind's payload builder: the one the
        # request names (a model served here), else the default.
        model = settings.profile
        if "model" in type(body).model_fields:
            try:
                model = body.model = settings.model_for(body.model)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None

        def row(key: ApiKey, payload: dict[str, Any], deadline: datetime) -> dict[str, Any]:
            per_attempt = min(spec.attempt_timeout_s(settings), (deadline - now).total_seconds())
            return job_row(
                key.id,
                spec.name,
                payload,
                deadline,
                per_attempt,
                model=model,
                webhook_url=webhook_url,
                max_attempts=settings.max_attempts,
                now=now,
            )

        # Checked once the caller is admitted: a stranger learns nothing about a request's limits.
        def deadline() -> datetime:
            return kinds.deadline_after(now, deadline_s, spec.default_deadline_s(settings), settings.max_deadline_s)

        if key is None and webhook_url is None and not spec.blocking(body):

            def build(key: ApiKey) -> dict[str, Any]:
                until = deadline()
                return row(key, spec.build_payload(self, key, body, now), until)

            self.refusals.check(secret)
            created = await self.store.call(self.store.submit_job, secret, build, now)
            if not isinstance(created, Job):
                self.refusals.remember(secret, created)
                raise created
        else:
            if key is None:
                key = await self.admitted(secret)
            until = deadline()
            payload = await asyncio.to_thread(self._blocking_payload, spec, key, body, now, webhook_url)
            (created,) = await self.store.call(self.store.insert_jobs, [row(key, payload, until)])
        self.requeued(created.id)
        return created

    def _blocking_payload(
        self, spec: kinds.JobKindSpec, key: ApiKey, body: Any, now: datetime, webhook_url: str | None
    ) -> dict[str, Any]:
        if webhook_url is not None:
            try:
                check_url(webhook_url, self.url_policy)  # resolves the name: blocking
            except OutboundError as exc:
                raise InvalidRequest(f"webhook_url refused: {exc}") from None
        return spec.build_payload(self, key, body, now)

    def admit(self, secret: str | None) -> ApiKey:
        """The caller's live API key, with this request counted against its rate limit (blocking;
        a remembered refusal is answered without the database)."""
        self.refusals.check(secret)
        try:
            return self.store.admit(secret, now=self.clock())
        except OrchestratorError as refused:
            self.refusals.remember(secret, refused)
            raise

    async def admitted(self, secret: str | None) -> ApiKey:
        """`admit` from the event loop: a remembered refusal is answered on the loop, without a
        turn of the writer thread."""
        self.refusals.check(secret)
        return await self.store.call(self.admit, secret)

    def own_job(self, key: ApiKey, job_id: str) -> Job:
        job = self.store.get_job(job_id, key.id)
        if job is None:
            raise NotFound(f"no request {job_id}")
        return job

    def cancel(self, key: ApiKey, job_id: str) -> Job:
        """Cancel a request that has not finished, and ask its miner to stop."""
        job = self.own_job(key, job_id)
        if RequestStatus(job.status).terminal or not self.store.cancel_job(job.id, key.id, now=self.clock()):
            raise Conflict(f"request {job_id} already {self.own_job(key, job_id).status}")
        self.dispatcher.cancel_at_miner(job)
        canceled = self.own_job(key, job_id)
        self.finished(canceled)
        return canceled

    async def wait_finished(self, job_id: str, timeout: float) -> Job | None:
        """The job once it is in a final state, or None after `timeout` seconds."""

        def done() -> bool:
            current = self.store.load_job(job_id)
            return current is not None and RequestStatus(current.status).terminal

        if not await self.waiters.wait(job_id, timeout, done):
            return None
        return await asyncio.to_thread(self.store.load_job, job_id)

    def fetch(self, url: str, max_bytes: int, what: str) -> bytes:
        """Download a client-given URL (SSRF-checked, size-capped, done within `download_timeout_s`);
        `InvalidRequest` on failure."""
        limit_s = self.settings.download_timeout_s
        # A whole download, not only each read: a server that trickles its bytes in within every
        # read's timeout must not hold a thread (and the client's submission) for hours.
        deadline = time.monotonic() + limit_s
        try:
            check_url(url, self.url_policy)
            with self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"{what} download from {url} failed: HTTP {response.status_code}")
                chunks, size = [], 0
                for chunk in response.iter_bytes():  # as each read arrives
                    if time.monotonic() > deadline:
                        raise InvalidRequest(f"{what} download from {url} took longer than {limit_s:g} s")
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidRequest(f"{what} at {url} is over the {max_bytes}-byte limit")
                    chunks.append(chunk)
        except OutboundError as exc:
            raise InvalidRequest(f"{what} URL refused: {exc}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise InvalidRequest(f"{what} download from {url} failed: {type(exc).__name__}") from None
        return b"".join(chunks)

    @property
    def audits_on(self) -> bool:
        return self.audits is not None

    # ---- results and scores -------------------------------------------------------------------

    def blobs_for(self, spec: kinds.JobKindSpec) -> BlobStore:
        """Where results of this kind are kept: assets (served to miners) or private results."""
        return self.assets if spec.shared_result else self.results

    def result_path(self, job: Job) -> Path:
        if job.status != RequestStatus.succeeded.value or not job.result_blob:
            raise Conflict(f"request {job.id} has no result: it is {job.status}")
        try:
            return self.blobs_for(kinds.get(job.kind)).local_path(job.result_blob)
        except MissingBlob:
            # Replicas on several machines with a data dir each: the one that took the callback
            # has the file. They need one store they all read.
            log.error(
                "request %s succeeded but its result %s is not in this replica's blob store", job.id, job.result_blob
            )
            raise Unavailable(
                f"request {job.id} succeeded, but its result is not in this orchestrator's blob store: "
                f"{SHARE_ONE_STORE}"
            ) from None

    def result_bytes(self, job: Job) -> bytes:
        return self.result_path(job).read_bytes()

    def sweep_once(self) -> None:
        """Take back jobs whose miner ran out of time; fail those whose client deadline passed."""
        result = self.store.sweep(now=self.clock(), min_attempt_s=self.settings.min_attempt_s)
        for job_id in result.requeued:
            log.info("%s timed out at its miner; back in the queue", job_id)
            self.requeued(job_id)
        for job in self.store.load_jobs(result.failed).values():
            announce(self, job, job.status)

    def refresh_scores(self) -> ScoreSnapshot:
        """Score the window ending now, keep it for `GET /v1/scores`, and feed routing (the
        scores leader's loop)."""
        snapshot = self._score_window()
        # Miners with no work in the window score 0 for routing, not whatever they had before.
        self.store.set_scores({m.hotkey: 0.0 for m in self.store.list_miners()} | snapshot.scores, now=snapshot.end)
        return snapshot

    def scores(self) -> ScoreSnapshot:
        """The latest scores, at most `score_interval_s` old, on every replica. A replica that
        does not lead scoring computes them itself rather than read back what the leader stored:
        scores are a pure function of the database and the window, so both agree, and the stored
        column has neither the window nor a way to tell absent miners from idle ones."""
        snapshot = self._scores
        if snapshot is None or (self.clock() - snapshot.end).total_seconds() >= self.settings.score_interval_s:
            snapshot = self._score_window()
        return snapshot

    def _score_window(self) -> ScoreSnapshot:
        end = self.clock()
        start = end - timedelta(seconds=self.settings.score_window_s)
        scores = {hotkey: float(score) for hotkey, score in self.score_fn(self.store, start, end).items()}
        self._scores = ScoreSnapshot(start, end, scores)
        return self._scores


class AuditsProcess:
    """`dippy-studio orchestrator audits`: the audit queue's loop and nothing else, on the API
    replicas' database and blob store. The replicas, run with `judge_audits` off, pick the jobs
    they receive and flag them; this process leads the "audits" role and judges them, so the
    reference models load here, on a machine chosen for them, never in a replica that serves
    the API. Several such processes on one database take turns as any replicas do:
    one judges, the others wait to take over."""

    def __init__(self, settings: OrchestratorSettings) -> None:
        if not settings.audit:
            raise ValueError("audits are off (audit = false): there is nothing for this process to judge")
        settings = settings.model_copy(update={"judge_audits": True})
        signer = signer_for(settings)  # signs the re-runs sent to reference workers
        stores = blob_stores(settings)
        self.store = Store.open(settings.database_url, default_model=settings.profile)
        self.leadership = for_store(self.store, settings.leader_takeover_s)
        self.queue = audit_queue(settings, self.store, stores, signer, self.leadership)

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()
        self.leadership.close()
        self.store.close()


def signer_for(settings: OrchestratorSettings) -> Signer:
    """The orchestrator's signing key, from a dev URI or a bittensor wallet."""
    return load_signer(
        uri=settings.dev_key,
        wallet_name=settings.wallet_name,
        hotkey=settings.wallet_hotkey,
        **({"wallet_path": settings.wallet_path} if settings.wallet_path else {}),
    )


def blob_stores(settings: OrchestratorSettings) -> tuple[BlobStore, BlobStore, BlobStore]:
    """The results, assets and held-out blob stores. Results (client images) are private; assets
    (datasets, LoRAs) are served to miners; held-out parts of training datasets are read by
    audits only, never served to anyone."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    results, assets, heldout = open_stores(
        ("results", "assets", "heldout"),
        settings.data_dir,
        settings.blob_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        cache_max_bytes=settings.blob_cache_max_bytes,
    )
    return results, assets, heldout


def audit_queue(
    settings: OrchestratorSettings,
    store: Store,
    stores: tuple[BlobStore, BlobStore, BlobStore],
    signer: Signer,
    leadership: Leadership,
    *,
    clock: Callable[[], datetime] = utcnow,
    sampler: AuditSampler | None = None,
    auditor: Auditor | None = None,
) -> AuditQueue:
    """The audit queue of an API replica or of the audits process, from the settings (tests may
    pass their own sampler or auditor)."""
    results, assets, heldout = stores
    policy = SamplerPolicy(
        base_rate=settings.audit_base_rate,
        probation_jobs=settings.audit_probation_jobs,
        probation_rate=settings.audit_probation_rate,
        max_gap=settings.audit_max_gap,
    )
    return AuditQueue(
        store,
        results,
        assets,
        sampler or AuditSampler(policy),
        auditor or settings,
        heldout=heldout,
        signer=signer,
        clock=clock,
        leadership=leadership,
        poll_s=settings.audit_poll_s,
        judges=settings.judge_audits,
    )


class Periodic:
    """Runs `fn` in a thread every `interval` seconds, or at once when woken. With `eager`, a
    truthy return value (work was found, so more may be waiting) runs it again without sleeping.
    With `leadership`, a singleton loop: each run first checks that this replica leads the role
    named `name` (`leader.Leadership.lead`), and a follower asks again every `retry_s`."""

    def __init__(
        self,
        name: str,
        fn: Callable[[], Any],
        interval: float,
        eager: bool = False,
        leadership: Leadership | None = None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.interval = interval
        self.eager = eager
        self.leadership = leadership
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"orch-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the run, so a wake-up that arrives during it starts the next one at once.
            self._wake.clear()
            if self.leadership is not None and not self.leadership.lead(self.name):
                self._wake.wait(min(self.interval, self.leadership.retry_s))
                continue
            more = False
            try:
                more = bool(self.fn()) and self.eager
            except Exception:
                # One bad round (database blip, bug) must not end the loop for good.
                log.exception("%s loop failed; retrying in %.1fs", self.name, self.interval)
            if not more:
                self._wake.wait(self.interval)


class Waiters:
    """Lets an async request handler wait for a job that another thread finishes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, job_id: str) -> None:
        with self._lock:
            waiting = list(self._waiting.get(job_id, ()))
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits there any more
                loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, timeout: float, is_done: Callable[[], bool]) -> bool:
        """True once `is_done()` holds, False after `timeout` seconds. `is_done` (a blocking read)
        runs first, then on every notification and at least every second, so results that arrive
        at another replica are seen too."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._waiting.setdefault(job_id, []).append(entry)
        try:
            end = loop.time() + timeout
            while True:
                # Checked after registering, so a notification cannot slip in between unseen.
                if await asyncio.to_thread(is_done):
                    return True
                left = end - loop.time()
                if left <= 0:
                    return False
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, _POLL_S))
        finally:
            with self._lock:
                entries = self._waiting.get(job_id, [])
                if entry in entries:
                    entries.remove(entry)
                if not entries:
                    self._waiting.pop(job_id, None)
