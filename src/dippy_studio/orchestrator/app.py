"""The orchestrator service: an ASGI app built from settings by `create_app`.

`Orchestrator` holds the parts (store, blobs, keys, registry, dispatcher, callback handler,
webhook sender) and the background loops that drive them; the app's lifespan starts and stops
the loops. Besides the client API (`api`), the app serves miners (`/v1/miner-callbacks/{id}`,
`/v1/blobs/{sha256}`), validators (`GET /v1/scores`, signed) and operators (`/health`, `/ready`).

Every part takes the store and a clock, so several orchestrators can share one database (each
claims jobs with SKIP LOCKED) and tests can build one in-process and wire it to real miners.

The request path stays on the event loop: submissions, dispatch (aiohttp sends) and callbacks hand
their database work to the store's writer thread (`batching.GroupCommit`) and await it, so under
load the process spends its time on requests, not on handing them between threads. The slower
loops (sweeper, registry sync and probes, webhooks, scores) and audits have threads of their own.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import random
import re
import threading
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from dippy_studio.chain.base import Chain
from dippy_studio.orchestrator.api import (
    ImageRequest,
    LoraInput,
    Waiters,
    build_router,
    check_sha256,
    deadline_after,
    fetch,
    new_seed,
    request_view,
)
from dippy_studio.orchestrator.audit import HELDOUT_KEY, Auditor, AuditOutcome, AuditSampler, SamplerPolicy
from dippy_studio.orchestrator.batching import Gathered
from dippy_studio.orchestrator.blobs import BlobStore
from dippy_studio.orchestrator.callbacks import CallbackHandler, read_lora_bytes
from dippy_studio.orchestrator.dispatch import Dispatcher
from dippy_studio.orchestrator.models import ApiKey, Job, utcnow
from dippy_studio.orchestrator.registry import Registry
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Admission, Store, job_row
from dippy_studio.orchestrator.webhooks import WebhookSender
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.keys import Signer, load_signer
from dippy_studio.protocol.nonces import NonceStore, SqliteNonceStore
from dippy_studio.protocol.outbound import OutboundError, UrlPolicy, check_url
from dippy_studio.protocol.schemas import JobKind

log = logging.getLogger("dippy_studio.orchestrator")

NONCE_FILE = "orchestrator-nonces.sqlite"
JSON_BODY_LIMIT = 1 << 20
_SS58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{46,48}$")
# What the engine's training accepts as a trigger word (one line, no tabs or brackets).
_TRIGGER = re.compile(r"^[^\t\r\n\[\]]+$")

# (store, window start, window end) -> {hotkey: score}
ScoreFn = Callable[[Store, datetime, datetime], Mapping[str, float]]


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, detail=reason, headers={"WWW-Authenticate": "Bearer"})


def _admitted(admission: Admission) -> ApiKey:
    """The admitted key, or the HTTPException (401 or 429) refusing the request."""
    key = admission.key
    if key is None:
        raise _unauthorized("invalid or revoked API key")
    if admission.retry_after is not None:
        raise HTTPException(
            429,
            detail=f"rate limit of {key.rate_limit_per_minute} requests per minute reached",
            headers={"Retry-After": str(max(1, math.ceil(admission.retry_after)))},
        )
    return key


@dataclass(frozen=True)
class ScoreSnapshot:
    start: datetime
    end: datetime
    scores: dict[str, float]


class Periodic:
    """Runs `fn` in a thread every `interval` seconds, or at once when woken. With `eager`, a
    truthy return value (work was found, so more may be waiting) runs it again without sleeping."""

    def __init__(self, name: str, fn: Callable[[], Any], interval: float, eager: bool = False) -> None:
        self.name = name
        self.fn = fn
        self.interval = interval
        self.eager = eager
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
            more = False
            try:
                more = bool(self.fn()) and self.eager
            except Exception:
                # One bad round (database blip, bug) must not end the loop for good.
                log.exception("%s loop failed; retrying in %.1fs", self.name, self.interval)
            if not more:
                self._wake.wait(self.interval)


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
        from dippy_studio.engine.profiles import get_profile

        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.spec = get_profile(settings.profile)
        self.signer = signer or load_signer(
            uri=settings.dev_key,
            wallet_name=settings.wallet_name,
            hotkey=settings.wallet_hotkey,
            **({"wallet_path": settings.wallet_path} if settings.wallet_path else {}),
        )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._owns_store = store is None
        self.store = store or Store.open(settings.database_url, writers=settings.db_writers)
        # Results (client images) are private; assets (datasets, LoRAs) are served to miners.
        self.results = BlobStore(settings.blob_dir / "results")
        self.assets = BlobStore(settings.blob_dir / "assets")
        # Held-out parts of training datasets: read by audits only, never served to anyone.
        self.heldout = BlobStore(settings.blob_dir / "heldout")
        retention = settings.max_signature_age + settings.allowed_clock_skew + 5.0
        self.nonces = nonces or SqliteNonceStore(settings.data_dir / NONCE_FILE, retention=retention)
        if chain is None and settings.chain_path is not None:
            from dippy_studio.chain.local import LocalChain

            chain = LocalChain(settings.chain_path, create=False)
        self.chain = chain
        self.url_policy = UrlPolicy(settings.allow_loopback_urls, settings.allow_private_urls)
        self.waiters = Waiters()
        self.registry = Registry(self.store, chain, self.signer, settings, clock=clock)
        self.dispatcher = Dispatcher(self.store, self.registry, self.signer, settings, self, rng=self.rng, clock=clock)
        self.callbacks = CallbackHandler(
            self.store,
            self.results,
            self.assets,
            self.signer,
            self.nonces,
            settings,
            self,
            clock=clock,
            on_succeeded=self._succeeded,
        )
        self.webhooks = WebhookSender(
            self.store, settings, lambda job: request_view(job, settings.public_url), clock=clock
        )
        lookback = timedelta(seconds=max(settings.inference_attempt_timeout_s, settings.training_attempt_timeout_s))
        self.score_fn = score_fn or (lambda store, start, end: window_scores(store, start, end, lookback))
        self._scores: ScoreSnapshot | None = None
        self._http = httpx.Client(timeout=settings.download_timeout_s, follow_redirects=False)
        self.audits = (
            AuditQueue(
                self.store,
                self.results,
                self.assets,
                sampler or AuditSampler(sampler_policy(settings)),
                auditor or settings,
                heldout=self.heldout,
                clock=clock,
            )
            if settings.audit or auditor is not None
            else None
        )
        self.tasks = {
            "sweep": Periodic("sweep", self.dispatcher.sweep_once, settings.sweep_interval_s),
            "sync": Periodic("sync", self.registry.sync, settings.sync_interval_s),
            "probe": Periodic("probe", self.registry.probe_all, settings.probe_interval_s),
            "webhooks": Periodic("webhooks", self.webhooks.deliver_due, settings.webhook_interval_s, eager=True),
            "scores": Periodic("scores", self.refresh_scores, settings.score_interval_s),
        }

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background threads. The dispatcher runs on the app's event loop: the
        lifespan starts and stops it (`Dispatcher.start`, `Dispatcher.stop`)."""
        # Miners first, so the first dispatch round has someone to send to.
        try:
            self.registry.refresh()
        except Exception:
            log.exception("first miner refresh failed; the loops will retry")
        for task in self.tasks.values():
            task.start()
        if self.audits is not None:
            self.audits.start()

    def stop(self) -> None:
        for task in self.tasks.values():
            task.stop()
        if self.audits is not None:
            self.audits.stop()
        self.webhooks.close()
        self.registry.close()
        self._http.close()
        if self._owns_store:
            self.store.close()

    # ---- JobEvents ----------------------------------------------------------------------------

    def requeued(self, job_id: str) -> None:
        self.dispatcher.wake()

    def finished(self, job_id: str, webhook: bool = True) -> None:
        self.waiters.notify(job_id)
        if webhook:
            # Most requests have none: waking the sender would only cost it a query.
            self.tasks["webhooks"].wake()

    def _succeeded(self, job: Job) -> None:
        if self.audits is not None:
            self.audits.offer(job)

    # ---- building jobs ------------------------------------------------------------------------

    def admit(self, secret: str | None) -> ApiKey:
        """The caller's live API key, with this request counted against its rate limit (blocking);
        HTTPException 401 or 429 otherwise."""
        if secret is None:
            raise _unauthorized("missing Authorization: Bearer <API key>")
        return _admitted(self.store.admit([secret], now=self.clock())[0])

    async def submit_image_job(self, secret: str | None, body: ImageRequest) -> Job:
        """`admit` the caller and create its image request, from the event loop: on the store's
        writer thread, together with every other submission queued meanwhile (`create_image_jobs`),
        or on a worker thread when the request names URLs (a webhook to resolve, LoRAs to
        download), which is blocking network work."""
        if secret is None:
            raise _unauthorized("missing Authorization: Bearer <API key>")
        created: Job | HTTPException
        if body.webhook_url is not None or any(lora.url is not None for lora in body.loras):
            (created,) = await run_in_threadpool(self.create_image_jobs, [(secret, body)])
        else:
            # Keyed by this orchestrator too: two of them may share a store (tests, an embedding app).
            submission: Gathered[tuple[str, ImageRequest], Job | HTTPException] = Gathered(
                ("images", id(self)), (secret, body), self.create_image_jobs
            )
            created = await self.store.submit(lambda: submission.result, prepare=submission)
        if isinstance(created, HTTPException):
            raise created
        self.requeued(created.id)  # now that it is committed, which another writer thread could miss
        return created

    def create_image_jobs(self, submissions: list[tuple[str, ImageRequest]]) -> list[Job | HTTPException]:
        """Admit and create many image requests (secret, body) at once: one read of their keys, one
        count per key (`Store.admit`), one insert; each gets its job or the HTTPException refusing it.
        The caller tells the dispatcher."""
        now = self.clock()
        admissions = self.store.admit([secret for secret, _ in submissions], now=now)
        outcomes: list[dict[str, Any] | HTTPException] = []
        for (_, body), admission in zip(submissions, admissions, strict=True):
            try:
                outcomes.append(self._image_job_row(_admitted(admission), body, now))
            except HTTPException as exc:
                outcomes.append(exc)
        jobs = iter(self.store.insert_jobs([row for row in outcomes if isinstance(row, dict)]))
        return [outcome if isinstance(outcome, HTTPException) else next(jobs) for outcome in outcomes]

    def _image_job_row(self, key: ApiKey, body: ImageRequest, now: datetime) -> dict[str, Any]:
        spec, settings = self.spec, self.settings
        for name, side in (("width", body.width), ("height", body.height)):
            if not spec.min_side <= side <= spec.max_side:
                raise HTTPException(
                    422, detail=f"{name} {side} is outside {spec.min_side}..{spec.max_side} for profile {spec.name}"
                )
        steps = body.steps if body.steps is not None else spec.default_steps
        if steps > spec.max_steps:
            raise HTTPException(422, detail=f"steps {steps} is over {spec.max_steps} for profile {spec.name}")
        self._check_webhook(body.webhook_url)
        deadline = deadline_after(now, body.deadline_s, settings.inference_deadline_s, settings.max_deadline_s)
        payload = {
            "prompt": body.prompt,
            "seed": body.seed if body.seed is not None else new_seed(),
            "width": body.width,
            "height": body.height,
            "steps": steps,
            "guidance": body.guidance if body.guidance is not None else spec.default_guidance,
            "loras": [self._resolve_lora(key, lora) for lora in body.loras],
        }
        return self._job_row(key, JobKind.inference, payload, now, deadline, body.webhook_url)

    def create_training_job(
        self,
        key: ApiKey,
        trigger_word: str,
        name: str | None,
        dataset: bytes | None,
        dataset_url: str | None,
        options: dict[str, Any],
        webhook_url: str | None,
        deadline_s: float | None,
    ) -> Job:
        # Imported here: the training defaults live beside the trainer (torch, diffusers).
        from dippy_studio.engine.datasets import dataset_zip, load_zip_bytes, split_dataset
        from dippy_studio.engine.errors import DatasetError
        from dippy_studio.engine.training import DEFAULT_TARGETS, PROFILE_DEFAULTS, REAL_MODEL_DEFAULTS

        settings = self.settings
        trigger_word = trigger_word.strip()
        if not _TRIGGER.match(trigger_word):
            raise HTTPException(422, detail="trigger_word must be one line of text without tabs or brackets")
        for url in (dataset_url, webhook_url):
            if url is not None and not url.startswith(("http://", "https://")):
                raise HTTPException(422, detail=f"{url!r} is not an http:// or https:// URL")
        self._check_webhook(webhook_url)
        now = self.clock()
        deadline = deadline_after(now, deadline_s, settings.training_deadline_s, settings.max_deadline_s)
        if dataset is None:
            assert dataset_url is not None
            dataset = fetch(self._http, dataset_url, settings.max_dataset_bytes, self.url_policy, "dataset")
        try:
            uploaded = load_zip_bytes(dataset, source="the dataset")
        except DatasetError as exc:
            raise HTTPException(422, detail=str(exc)) from None
        held: dict[str, Any] = {}
        # Split whenever audits are on, not only for jobs that will be audited: the miner must
        # not learn from its dataset whether its result will be checked.
        split = (
            split_dataset(uploaded, settings.audit_heldout_share, settings.audit_heldout_min_images)
            if self.audits is not None
            else None
        )
        if split is not None:
            dataset = dataset_zip(split.train)
            held = {HELDOUT_KEY: self.heldout.put(dataset_zip(split.heldout)), "heldout_images": len(split.heldout)}
        defaults = PROFILE_DEFAULTS.get(self.spec.name, REAL_MODEL_DEFAULTS)
        payload = {
            # What the miner downloads: the training part when the upload was split.
            "dataset_sha256": self.assets.put(dataset),
            **held,
            "trigger_word": trigger_word,
            "name": (name or "").strip() or trigger_word,
            **{k: v for k, v in options.items() if v is not None},
            # The promise the result is checked against: explicit, so miners cannot differ on defaults.
            "rank": options.get("rank") or defaults["rank"],
            "targets": list(DEFAULT_TARGETS),
        }
        (job,) = self.store.insert_jobs([self._job_row(key, JobKind.training, payload, now, deadline, webhook_url)])
        self.requeued(job.id)
        return job

    def _job_row(
        self,
        key: ApiKey,
        kind: JobKind,
        payload: dict[str, Any],
        now: datetime,
        deadline: datetime,
        webhook: str | None,
    ) -> dict[str, Any]:
        settings = self.settings
        per_attempt = (
            settings.inference_attempt_timeout_s if kind is JobKind.inference else settings.training_attempt_timeout_s
        )
        return job_row(
            key.id,
            kind,
            payload,
            deadline,
            min(per_attempt, (deadline - now).total_seconds()),
            webhook_url=webhook,
            max_attempts=settings.max_attempts,
            now=now,
        )

    def _resolve_lora(self, key: ApiKey, lora: LoraInput) -> dict[str, Any]:
        if lora.id is not None:
            found = self.store.get_lora(lora.id, key.id)
            if found is None:
                raise HTTPException(422, detail=f"no LoRA {lora.id} for this API key")
            return {"id": lora.id, "sha256": found.sha256, "scale": lora.scale}
        assert lora.url is not None
        data = fetch(self._http, lora.url, self.settings.max_lora_bytes, self.url_policy, "LoRA")
        sha256 = check_sha256(data, lora.sha256, f"the LoRA at {lora.url}")
        if not self.assets.exists(sha256):
            tensors, problem = read_lora_bytes(data)
            if tensors is None:
                raise HTTPException(422, detail=f"the LoRA at {lora.url} is not usable: {problem}")
            self.assets.put(data)
        return {"url": lora.url, "sha256": sha256, "scale": lora.scale}

    def _check_webhook(self, url: str | None) -> None:
        if url is None:
            return
        try:
            check_url(url, self.url_policy)
        except OutboundError as exc:
            raise HTTPException(422, detail=f"webhook_url refused: {exc}") from None

    # ---- results and scores -------------------------------------------------------------------

    def result_path(self, job: Job) -> Path:
        assert job.result_blob is not None
        blobs = self.assets if job.kind == JobKind.training.value else self.results
        return blobs.path(job.result_blob)

    def result_bytes(self, job: Job) -> bytes:
        return self.result_path(job).read_bytes()

    def refresh_scores(self) -> ScoreSnapshot:
        """Score the window ending now, keep it for `GET /v1/scores`, and feed routing."""
        end = self.clock()
        start = end - timedelta(seconds=self.settings.score_window_s)
        scores = {hotkey: float(score) for hotkey, score in self.score_fn(self.store, start, end).items()}
        # Miners with no work in the window score 0 for routing, not whatever they had before.
        self.store.set_scores({m.hotkey: 0.0 for m in self.store.list_miners()} | scores, now=end)
        self._scores = ScoreSnapshot(start, end, scores)
        return self._scores

    def scores(self) -> ScoreSnapshot:
        return self._scores or self.refresh_scores()


class AuditQueue:
    """Audits of finished jobs, in one background thread (reference engines run one job at a time).

    Every succeeded job is offered; the sampler (`audit.AuditSampler`) picks which to audit, per
    miner and job kind, after the result is in, so a miner cannot tell audited work from the
    rest. A picked job is flagged (`jobs.audit`), checked by the `audit.Auditor`, and its verdict
    and evidence stored as an `Audit` row. Inference jobs are re-run (the reference image goes to
    the results blob store). Training jobs have their LoRA loaded and measured on the held-out
    part of the client's dataset that was kept from the miner at submission
    (`Orchestrator.create_training_job`); a job whose dataset was too small to split gets an
    inconclusive verdict once the LoRA's shape is checked. A failed audit puts the miner back on
    audit probation; scoring turns failures into penalties, and a training audit's measured
    improvement into the job's quality factor.

    Picked jobs that have no verdict when the queue starts (the orchestrator stopped before
    auditing them) are queued again, so a restart never lets a picked job go unjudged.
    """

    def __init__(
        self,
        store: Store,
        results: BlobStore,
        assets: BlobStore,
        sampler: AuditSampler,
        auditor: Auditor | OrchestratorSettings,
        *,
        heldout: BlobStore | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.results = results
        self.assets = assets
        self.heldout = heldout
        self.sampler = sampler
        # Settings instead of an Auditor: build the reference engine at the first audit, so a
        # server (or a test) that never audits never loads a model for it.
        self._auditor = auditor if isinstance(auditor, Auditor) else None
        self._settings = auditor if isinstance(auditor, OrchestratorSettings) else None
        self.clock = clock
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="orch-audits", daemon=True)

    def start(self) -> None:
        # Audits picked before a restart are still owed: the pick is stored (`jobs.audit`), the
        # queue was only in memory.
        for job_id in self.store.flagged_without_verdict():
            self._queue.put(job_id)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def offer(self, job: Job) -> bool:
        """Decide whether to audit this succeeded job, and queue it if so. Does not block: the
        callback's event loop calls it; the audit thread records the pick before the audit."""
        if not job.miner_hotkey or not job.result_blob:
            return False
        with self._lock:  # the sampler keeps per-miner counts
            decision = self.sampler.decide(job.miner_hotkey, job.kind)
        if not decision.audit:
            return False
        self._queue.put(job.id)
        return True

    def _run(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                # Stored first, so an audit cut short by a restart is still owed (`start`).
                self.store.flag_for_audit(job_id)
                self._audit(job_id)
            except Exception:
                log.exception("audit of %s crashed", job_id)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _audit(self, job_id: str) -> None:
        job = self.store.load_job(job_id)
        if job is None or job.miner_hotkey is None or job.result_blob is None:
            return
        if self.store.list_audits(job_id=job_id):
            return  # judged already (by another orchestrator on the same database, say)
        training = job.kind == JobKind.training.value
        outcome = self._audit_training(job) if training else self._audit_inference(job)
        evidence = dict(outcome.evidence)
        if outcome.reference_png is not None:
            evidence["reference_blob"] = self.results.put(outcome.reference_png)
        self.store.add_audit(job.id, job.miner_hotkey, outcome.verdict.label, evidence, now=self.clock())
        if outcome.verdict.label == "fail":
            log.warning("miner %s failed the audit of %s: %s", job.miner_hotkey, job.id, outcome.verdict.reason)
            with self._lock:
                self.sampler.record_failure(job.miner_hotkey)

    def _audit_inference(self, job: Job) -> AuditOutcome:
        from dippy_studio.engine import GenerationRequest, LoraRef

        assert job.result_blob is not None
        payload = job.payload
        request = GenerationRequest(
            prompt=payload["prompt"],
            seed=payload["seed"],
            width=payload["width"],
            height=payload["height"],
            steps=payload["steps"],
            guidance=payload["guidance"],
            loras=[LoraRef(path=self.assets.path(lora["sha256"]), scale=lora["scale"]) for lora in payload["loras"]],
        )
        png = self.results.get(job.result_blob)
        return self.auditor().audit_inference(request, png, job.result_sha256, job.fingerprint)

    def _audit_training(self, job: Job) -> AuditOutcome:
        assert job.result_blob is not None
        payload = job.payload
        # No held-out part: the dataset was too small to split (or audits were off at submission).
        heldout_sha = payload.get(HELDOUT_KEY)
        heldout = self.heldout.path(heldout_sha) if heldout_sha and self.heldout is not None else None
        return self.auditor().audit_training(
            self.assets.path(job.result_blob),
            heldout,
            payload["rank"],
            payload["targets"],
            # The client's trigger word, not the one the miner wrote into the LoRA's metadata.
            trigger=payload["trigger_word"],
            job=payload,
        )

    def auditor(self) -> Auditor:
        if self._auditor is None:
            from dippy_studio.engine import Engine, EngineOptions

            assert self._settings is not None
            options = EngineOptions(profile=self._settings.profile, model_path=self._settings.audit_model_path)
            self._auditor = Auditor([Engine(options)])
        return self._auditor


def window_scores(store: Store, start: datetime, end: datetime, lookback: timedelta) -> dict[str, float]:
    """Per-miner scores for [start, end) from the attempts, jobs and audits in the store
    (`scoring.score_window` does the arithmetic). `lookback` reaches back for attempts that were
    dispatched before the window and finished in it: the longest attempt timeout."""
    from dippy_studio.orchestrator.audit import DEFAULT_PENALTY
    from dippy_studio.orchestrator.scoring import AttemptRecord, measured_quality, penalties_from_failures, score_window

    verdicts: dict[tuple[str, str], str] = {}
    qualities: dict[tuple[str, str], float | None] = {}
    for audit in store.list_audits(since=start):
        verdicts[(audit.job_id, audit.miner_hotkey)] = audit.verdict  # the latest one wins
        qualities[(audit.job_id, audit.miner_hotkey)] = measured_quality(audit.evidence)
    # Failures further back still escalate the penalty of a new one.
    history = end - DEFAULT_PENALTY.horizon - DEFAULT_PENALTY.max_cooldown
    failures: dict[str, list[datetime]] = {}
    judged: set[str] = set()
    for audit in store.list_audits(since=history, verdict="fail"):
        # One caught job is one failure, even if two orchestrators both judged it.
        if audit.job_id not in judged:
            judged.add(audit.job_id)
            failures.setdefault(audit.miner_hotkey, []).append(audit.created_at)

    # Still running: it counts once it ends.
    attempts = [a for a in store.list_attempts(since=start - lookback) if a.outcome and a.finished_at]
    jobs = store.load_jobs({attempt.job_id for attempt in attempts})
    records = []
    for attempt in attempts:
        job = jobs.get(attempt.job_id)
        if job is None:
            continue
        succeeded = attempt.outcome == "succeeded"
        verdict = verdicts.get((job.id, attempt.miner_hotkey))
        quality = qualities.get((job.id, attempt.miner_hotkey))
        records.append(
            AttemptRecord(
                hotkey=attempt.miner_hotkey,
                kind=job.kind,  # type: ignore[arg-type]
                finished_at=attempt.finished_at,
                # "refused": the miner never took the job, which earns nothing but is no failure.
                accepted=attempt.outcome != "refused",
                completed=succeeded,
                # Invalid results are recorded as "invalid", so a success is a validated one.
                valid=succeeded,
                latency_s=attempt.latency_s if succeeded else None,
                timeout_s=job.attempt_timeout_s,
                # Measured by a training audit (held-out loss improvement); where none measured it,
                # `score_window` uses the miner's mean measured quality (1.0 without any).
                quality=1.0 if quality is None else quality,
                quality_measured=quality is not None,
                audited=job.audit or verdict is not None,
                audit_passed={"pass": True, "fail": False}.get(verdict or ""),
            )
        )
    return score_window(records, start, end, penalties_from_failures(failures, end))


class BodyLimit:
    """Pure ASGI middleware: refuse request bodies over the limit for their path with 413, before
    they are buffered or parsed (Content-Length when given, and a running count otherwise)."""

    def __init__(self, app: Any, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        seen = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Any, limit: int) -> None:
    body = json.dumps({"detail": f"request body over the {limit}-byte limit"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def sampler_policy(settings: OrchestratorSettings) -> SamplerPolicy:
    return SamplerPolicy(
        base_rate=settings.audit_base_rate,
        probation_jobs=settings.audit_probation_jobs,
        probation_rate=settings.audit_probation_rate,
        max_gap=settings.audit_max_gap,
    )


def create_app(settings: OrchestratorSettings, **components: Any) -> FastAPI:
    """Build the orchestrator app. `components` (store, chain, signer, clock, rng, nonces, score_fn,
    auditor, sampler) replace what settings would build, for tests and the local subnet."""
    orch = Orchestrator(settings, **components)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        orch.start()
        await orch.dispatcher.start()
        try:
            yield
        finally:
            await orch.dispatcher.stop()
            orch.stop()

    app = FastAPI(
        title="Dippy Studio orchestrator",
        version="1",
        description="Generate images with Flux and train LoRAs on a Bittensor subnet. "
        "Authenticate with `Authorization: Bearer <API key>`.",
        lifespan=lifespan,
    )
    app.state.orchestrator = orch

    def limit_for(path: str) -> int:
        if path.startswith("/v1/miner-callbacks/"):
            return settings.max_result_bytes + JSON_BODY_LIMIT
        if path == "/v1/loras":
            return settings.max_dataset_bytes + JSON_BODY_LIMIT
        return JSON_BODY_LIMIT

    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.include_router(build_router(orch))
    if settings.dashboard:
        from dippy_studio.orchestrator import dashboard

        dashboard.mount(app, orch)

    @app.post(
        "/v1/miner-callbacks/{job_id}",
        tags=["miners"],
        responses={401: {"description": "bad signature"}, 403: {"description": "not this job's miner"}},
    )
    async def miner_callback(job_id: str, request: Request) -> JSONResponse:
        """Where miners deliver results: a signed multipart POST (`meta` JobView, `result` file)."""
        body = await request.body()
        target = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        if request.scope.get("query_string"):
            target += "?" + request.scope["query_string"].decode("latin-1")
        reply = await orch.callbacks.handle(job_id, request.headers, body, target)
        return JSONResponse(reply.body, status_code=reply.status_code)

    @app.get("/v1/scores", tags=["validators"], responses={200: {"description": "signed with btauth headers"}})
    async def scores(request: Request) -> Response:
        """`{scores: {hotkey: score}, window: {start, end}, orchestrator, netuid}`, signed by the
        orchestrator's hotkey over the exact body (btauth/1 headers, method GET and this path).
        Pass `?for=<your hotkey>` to have it signed for you as receiver (else for our own hotkey);
        verify with `protocol.auth.verify_request`."""
        receiver = request.query_params.get("for") or orch.signer.ss58_address
        if not _SS58.match(receiver):
            raise HTTPException(422, detail="'for' must be an SS58 hotkey address")
        snapshot = await run_in_threadpool(orch.scores)
        payload = {
            "scores": dict(sorted(snapshot.scores.items())),
            "window": {"start": snapshot.start.isoformat(), "end": snapshot.end.isoformat()},
            "orchestrator": orch.signer.ss58_address,
            "netuid": orch.chain.netuid if orch.chain is not None else None,
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = sign_request(orch.signer, "GET", target, body, receiver)
        return Response(body, media_type="application/json", headers=headers)

    @app.get("/health", tags=["operators"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["operators"])
    def ready() -> JSONResponse:
        loops = {"dispatch": orch.dispatcher, **orch.tasks}
        problems = [f"{name} loop is not running" for name, task in loops.items() if not task.alive]
        try:
            with orch.store.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            problems.append(f"database: {type(exc).__name__}")
        miners = len(orch.store.list_miners(healthy_only=True)) if not problems else 0
        if not problems and miners == 0:
            problems.append("no healthy miner")
        body = {"ready": not problems, "problems": problems, "healthy_miners": miners}
        return JSONResponse(body, status_code=503 if problems else 200)

    return app
