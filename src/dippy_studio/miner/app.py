"""The miner's HTTP service: an ASGI app built from settings by `create_app`.

Every /v1 route is signed (btauth/1 or Epistula v2) by a hotkey the sender policy admits;
jobs are visible only to the hotkey that submitted them. What the signature headers alone can
refuse (missing, malformed, stale, for another receiver, a sender not admitted) is refused before
the body is read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.datastructures import Headers

from dippy_studio.engine import Engine
from dippy_studio.miner.callbacks import CallbackSender
from dippy_studio.miner.metrics import MinerMetrics
from dippy_studio.miner.net import DownloadCache
from dippy_studio.miner.progress import ProgressReporter
from dippy_studio.miner.runners import InferenceRunner, TrainingRunner
from dippy_studio.miner.settings import MinerSettings
from dippy_studio.miner.store import JobRecord, JobStore
from dippy_studio.miner.workers import Runner, WorkerPool, max_ahead
from dippy_studio.protocol import api_docs, http_errors
from dippy_studio.protocol.asgi import BodyLimit, RefuseBeforeBody, Scope, request_target
from dippy_studio.protocol.auth import AuthError, Caller, SenderPolicy, StakeLookup, check_headers, verify_request
from dippy_studio.protocol.http_errors import error_responses
from dippy_studio.protocol.keys import Signer, load_signer
from dippy_studio.protocol.nonces import SqliteNonceStore, retention_for
from dippy_studio.protocol.outbound import OutboundError, UrlPolicy, check_url
from dippy_studio.protocol.schemas import (
    JOB_ID_PATTERN,
    Accepted,
    Capacity,
    InferenceJob,
    JobKind,
    JobStatus,
    JobView,
    LaneCapacity,
    TrainJob,
)

log = logging.getLogger("dippy_studio.miner")

RESULT_MEDIA_TYPES = {JobKind.inference: "image/png", JobKind.training: "application/octet-stream"}
# Why the job API answers each refusal status; every one of them carries an `ErrorBody`.
_REASONS = {
    400: "the body could not be read as sent",
    401: "bad or missing signature",
    403: "sender not admitted",
    404: "no such job from this sender",
    409: "the job_id is taken by another job, or the job is not in a state that allows this",
    413: "the body is over the size limit",
    422: "the job is invalid, or cannot be served as asked (the reason says which)",
    429: "the lane's queue is full; see Retry-After",
    503: "this miner does not serve this kind of job right now",
}

JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="Letters, digits, '_' and '-'; at most 128.")]


class Readiness(BaseModel):
    ready: bool
    problems: list[str]
    fingerprint: str


class Miner:
    """Everything a running miner holds: keys, stores, engine, lanes, callbacks."""

    def __init__(
        self,
        settings: MinerSettings,
        *,
        engine: Engine | None = None,
        signer: Signer | None = None,
        stake_lookup: StakeLookup | None = None,
        inference_runner: Runner | None = None,
        training_runner: Runner | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.signer = signer or load_signer(
            uri=settings.dev_key,
            wallet_name=settings.wallet_name,
            hotkey=settings.wallet_hotkey,
            **({"wallet_path": settings.wallet_path} if settings.wallet_path else {}),
        )
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(data / "jobs.sqlite", clock=clock)
        retention = retention_for(settings.max_signature_age, settings.allowed_clock_skew)
        self.nonces = SqliteNonceStore(data / "nonces.sqlite", retention=retention)
        self.policy = SenderPolicy(
            allowed_hotkeys=settings.allow_hotkeys,
            min_stake=settings.min_stake,
            stake_lookup=stake_lookup,
            allow_any=settings.allow_any_sender,
        )
        self.url_policy = UrlPolicy(settings.allow_loopback_urls, settings.allow_private_urls)
        self.downloads = DownloadCache(
            data / "downloads", settings.download_cache_bytes, self.url_policy, settings.download_timeout
        )
        self.engine = engine or Engine(settings.engine)
        self.progress = ProgressReporter(
            self.signer, self.url_policy, interval_s=settings.progress_interval_s, timeout=settings.progress_timeout
        )
        runners: dict[JobKind, Runner] = {}
        if settings.serve_inference:
            runners[JobKind.inference] = inference_runner or InferenceRunner(
                self.engine,
                self.downloads,
                data / "results",
                settings.max_lora_bytes,
                settings.cheat_rate,
                max_input_image_bytes=settings.max_input_image_bytes,
                progress=self.progress,
            )
        if settings.serve_training:
            runners[JobKind.training] = training_runner or TrainingRunner(
                settings.engine,
                self.downloads,
                data / "results",
                settings.max_dataset_bytes,
                settings.cheat_rate,
                progress=self.progress,
            )
        self.callbacks = CallbackSender(
            self.store,
            self.signer,
            self.url_policy,
            attempts=settings.callback_attempts,
            backoff=settings.callback_backoff,
            timeout=settings.callback_timeout,
        )
        self.pool = WorkerPool(
            self.store,
            runners,
            {JobKind.inference: settings.inference_workers, JobKind.training: settings.training_workers},
            on_finished=self._finished,
            clock=clock,
            private_dirs=[data],
        )
        self.metrics = MinerMetrics(self.store, self._cache_stats, self.pool.alive)

    def start(self) -> None:
        pending = self.store.recover()
        self.callbacks.start()
        self.progress.start()
        for record in pending:
            self.callbacks.submit(record.job_id)
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()
        self.progress.stop()
        self.callbacks.stop()

    def _finished(self, record: JobRecord) -> None:
        self.metrics.observe(record)
        self.progress.finished(record.job_id)
        if record.callback_url:
            self.callbacks.submit(record.job_id)

    def _cache_stats(self) -> dict[str, int]:
        stats = self.engine.loras.stats
        return {
            "lora_cache_hits": stats.hits,
            "lora_cache_misses": stats.misses,
            "download_cache_hits": self.downloads.hits,
            "download_cache_misses": self.downloads.misses,
        }

    def lane(self, kind: JobKind) -> LaneCapacity:
        configured = self.pool.configured(kind)
        alive = self.pool.alive(kind)
        limit = self.settings.inference_queue_limit if kind == JobKind.inference else self.settings.training_queue_limit
        return LaneCapacity(
            available=configured > 0 and alive > 0,
            workers_alive=alive,
            workers=configured,
            queue_depth=self.store.depth(kind),
            queue_limit=limit,
            seconds_per_job=self.pool.seconds_per_job(kind),
        )

    def capacity(self) -> Capacity:
        return Capacity(
            hotkey=self.signer.ss58_address,
            profile=self.engine.spec.name,
            fingerprints=[self.engine.fingerprint],
            tasks=list(self.engine.tasks),
            inference=self.lane(JobKind.inference),
            training=self.lane(JobKind.training),
        )


def _work(request: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide a job's result; a resend may carry a new deadline or callback."""
    return {k: v for k, v in request.items() if k not in ("deadline", "callback_url")}


def create_app(settings: MinerSettings, **components: Any) -> FastAPI:
    """Build the miner app. `components` (engine, signer, stake_lookup, inference_runner,
    training_runner, clock)
    replace what settings would build, for tests and the local subnet."""
    miner = Miner(settings, **components)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        miner.start()
        try:
            yield
        finally:
            miner.stop()

    app = FastAPI(
        title="Dippy Studio miner",
        version="1",
        description=(
            "Signed job API: Flux image jobs (text-to-image, instruction editing, image-to-image and"
            " inpainting, as the profile serves them: see /v1/capacity `tasks`) and LoRA training."
        ),
        lifespan=lifespan,
        # Served from the package by `api_docs.install`: FastAPI's pages load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    api_docs.install(app)
    app.state.miner = miner
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    http_errors.install(app)

    def refuse_unsigned(scope: Scope) -> tuple[int, str] | None:
        """What the headers alone decide, before FastAPI reads and parses a body: a signature that
        is missing, malformed, stale or for another receiver, or a sender the policy turns away."""
        if not scope["path"].startswith("/v1/"):
            return None
        try:
            signed = check_headers(
                Headers(scope=scope),
                method=scope["method"],
                path=request_target(scope),
                receiver_ss58=miner.signer.ss58_address,
                max_age=settings.max_signature_age,
                allowed_skew=settings.allowed_clock_skew,
            )
            miner.policy.check(signed.sender)
        except AuthError as exc:
            return exc.status_code, exc.reason
        return None

    app.add_middleware(RefuseBeforeBody, refuse=refuse_unsigned)

    async def authenticated(request: Request) -> Caller:
        body = await request.body()
        try:
            return verify_request(
                request.headers,
                body,
                method=request.method,
                path=request_target(request.scope),
                receiver_ss58=miner.signer.ss58_address,
                nonce_store=miner.nonces,
                policy=miner.policy,
                max_age=settings.max_signature_age,
                allowed_skew=settings.allowed_clock_skew,
            )
        except AuthError as exc:
            raise HTTPException(exc.status_code, detail=exc.reason) from None

    def own_job(job_id: str, caller: Caller) -> JobRecord:
        record = miner.store.get(job_id)
        if record is None or record.sender != caller.hotkey_ss58:
            raise HTTPException(404, detail=f"no job {job_id}")
        return record

    def submit(kind: JobKind, job: InferenceJob | TrainJob, caller: Caller) -> JSONResponse:
        lane = miner.lane(kind)
        if not lane.available:
            raise HTTPException(503, detail=f"this miner is not serving {kind.value} jobs right now")
        deadline = job.deadline.timestamp()
        if deadline <= miner.clock():
            raise HTTPException(422, detail="deadline has already passed")
        urls = [job.callback_url] if job.callback_url else []
        if isinstance(job, InferenceJob):
            urls += [lora.url for lora in job.loras]
            urls += [download.url for download in (job.image, job.mask) if download is not None]
        else:
            urls.append(job.dataset_url)
        for url in urls:
            try:
                check_url(url, miner.url_policy)
            except OutboundError as exc:
                raise HTTPException(422, detail=str(exc)) from None
        request = job.model_dump(mode="json")
        pace, workers = lane.seconds_per_job, lane.workers_alive
        # Only as many jobs as can still finish by this one's deadline (workers.max_ahead).
        ahead = max_ahead(deadline - miner.clock(), workers, pace)
        created = miner.store.create(
            job_id=job.job_id,
            kind=kind,
            sender=caller.hotkey_ss58,
            request=request,
            callback_url=job.callback_url,
            deadline=deadline,
            queue_limit=lane.queue_limit,
            max_ahead=ahead,
        )
        if created is None:
            detail = f"{kind.value} queue is full ({lane.queue_limit} jobs"
            if pace is not None and ahead is not None:
                detail += f", or {ahead + 1} finishing by this deadline at {pace:.2f}s a job"
            # Come back when about one job has finished.
            retry = settings.retry_after_seconds if pace is None else max(1, math.ceil(pace / max(workers, 1)))
            return JSONResponse({"detail": detail + ")"}, status_code=429, headers={"Retry-After": str(retry)})
        record, is_new = created
        if not is_new:
            if record.sender != caller.hotkey_ss58 or record.kind != kind or _work(record.request) != _work(request):
                raise HTTPException(409, detail=f"job_id {job.job_id} is already used by a different job")
            if not record.status.terminal:
                raise HTTPException(409, detail=f"job {job.job_id} is still {record.status.value}")
            # Finished already: report its state, never recompute.
            return JSONResponse(record.view().model_dump(mode="json"), status_code=200)
        miner.pool.notify(kind)
        return JSONResponse(Accepted(job_id=record.job_id, status=record.status).model_dump(), status_code=202)

    def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
        return error_responses({status: _REASONS[status] for status in statuses})

    submits = {
        **refusals(400, 401, 403, 409, 413, 422, 429, 503),
        200: {"model": JobView, "description": "this job was sent before and has finished: its state"},
    }

    @app.post("/v1/inference", status_code=202, response_model=Accepted, responses=submits)
    def post_inference(job: InferenceJob, caller: Caller = Depends(authenticated)) -> JSONResponse:
        # What the profile decides before anything is fetched; the input image itself is read
        # when the job runs (a bad one fails the job as input_error).
        spec = miner.engine.spec
        problem = spec.task_problem(job.task) or spec.image_problem(job.width, job.height, job.steps, job.task)
        if problem is not None:
            raise HTTPException(422, detail=problem)
        return submit(JobKind.inference, job, caller)

    @app.post("/v1/train", status_code=202, response_model=Accepted, responses=submits)
    def post_train(job: TrainJob, caller: Caller = Depends(authenticated)) -> JSONResponse:
        return submit(JobKind.training, job, caller)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=refusals(401, 403, 404, 422))
    def get_job(job_id: JobIdPath, caller: Caller = Depends(authenticated)) -> JobView:
        return own_job(job_id, caller).view()

    @app.get(
        "/v1/jobs/{job_id}/result",
        response_class=Response,
        responses={
            200: {"content": {media_type: {} for media_type in RESULT_MEDIA_TYPES.values()}},
            **refusals(401, 403, 404, 409, 422),
        },
    )
    def get_result(job_id: JobIdPath, caller: Caller = Depends(authenticated)) -> FileResponse:
        record = own_job(job_id, caller)
        if record.status != JobStatus.succeeded or not record.result_path:
            raise HTTPException(409, detail=f"job {job_id} has no result: it is {record.status.value}")
        return FileResponse(
            record.result_path,
            media_type=RESULT_MEDIA_TYPES[record.kind],
            headers={"X-Result-Sha256": record.result_sha256 or ""},
        )

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView, responses=refusals(401, 403, 404, 409, 422))
    def cancel_job(job_id: JobIdPath, caller: Caller = Depends(authenticated)) -> JobView:
        record = own_job(job_id, caller)
        if record.status.terminal:
            raise HTTPException(409, detail=f"job {job_id} already {record.status.value}")
        updated = miner.pool.cancel(record)
        return (updated or record).view()

    @app.get("/v1/capacity", response_model=Capacity, responses=refusals(401, 403))
    def capacity(caller: Caller = Depends(authenticated)) -> Capacity:
        return miner.capacity()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/ready",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready: `problems` says why"}},
    )
    def ready() -> JSONResponse:
        cap = miner.capacity()
        lanes = {"inference": cap.inference, "training": cap.training}
        problems = [
            f"{name}: {lane.workers_alive}/{lane.workers} workers alive"
            for name, lane in lanes.items()
            if lane.workers and lane.workers_alive < lane.workers
        ]
        if not miner.callbacks.alive:
            problems.append("callback sender is not running")
        if not any(lane.available for lane in lanes.values()):
            problems.append("no lane is serving")
        body = {"ready": not problems, "problems": problems, "fingerprint": miner.engine.fingerprint}
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(miner.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/check/{hotkey}", responses=error_responses({404: "not this miner's hotkey", 422: _REASONS[422]}))
    def check_hotkey(hotkey: str) -> dict[str, str]:
        if hotkey != miner.signer.ss58_address:
            raise HTTPException(404, detail="not this miner's hotkey")
        return {"hotkey": hotkey}

    return app
