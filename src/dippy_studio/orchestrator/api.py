"""The public API for clients, in the style of fal's and Replicate's queue APIs.

    POST /v1/images                 submit a text-to-image request (202; or the result, with Prefer: wait=N)
    POST /v1/loras                  submit a LoRA training request (multipart dataset zip or dataset_url; 202)
    GET  /v1/requests               your recent requests
    GET  /v1/requests/{id}          status, timings, miner uid, result link
    GET  /v1/requests/{id}/result   the PNG or .safetensors
    POST /v1/requests/{id}/cancel   cancel it
    GET  /v1/loras, /v1/loras/{id}  your trained LoRAs
    GET  /v1/blobs/{sha256}         LoRAs and datasets for miners (no key, see `blobs` below)

Clients authenticate with `Authorization: Bearer <API key>`. Each key has its own per-minute
limit (429 with Retry-After when it is spent; every authenticated call counts) and sees only
its own requests and LoRAs: another key's ids answer 404, as unknown ones do.

`Prefer: wait=N` (at most `max_wait_s`) holds the submit response until the request finishes
or N seconds pass. Finished (in any final state): 200 with the request's status; for an image,
`result` then also carries the PNG inline as base64 (`data_base64`), so a synchronous client
needs one round trip. Not finished: the usual 202, and the client polls or waits for its webhook. The wait listens
for an in-process notification and re-reads the database every second, so it also sees results
that arrive at another replica.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import secrets
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dippy_studio.engine.limits import (
    MAX_LORAS,
    MAX_SEED,
    Guidance,
    ImageSide,
    LoraScale,
    Prompt,
    Seed,
    Steps,
)
from dippy_studio.orchestrator.audit import HELDOUT_KEY
from dippy_studio.orchestrator.callbacks import lora_id_for
from dippy_studio.orchestrator.models import ApiKey, Job, Lora
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.protocol.outbound import OutboundError, check_url
from dippy_studio.protocol.schemas import SHA256_PATTERN, HttpUrl, JobKind, Sha256

if TYPE_CHECKING:
    from dippy_studio.orchestrator.app import Orchestrator

MEDIA_TYPES = {JobKind.inference.value: "image/png", JobKind.training.value: "application/octet-stream"}
FILENAMES = {JobKind.inference.value: "result.png", JobKind.training.value: "lora.safetensors"}
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_POLL_S = 1.0


# ---- wire models ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraInput(_Strict):
    """A LoRA to apply: one of yours by `id`, or a .safetensors file at `url` (fetched once, by us)."""

    id: str | None = Field(default=None, max_length=64)
    url: HttpUrl | None = None
    sha256: Sha256 | None = Field(default=None, description="With `url`: the file's sha256, checked after download.")
    scale: LoraScale = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> LoraInput:
        if (self.id is None) == (self.url is None):
            raise ValueError("give exactly one of 'id' or 'url'")
        if self.sha256 is not None and self.url is None:
            raise ValueError("'sha256' goes with 'url'")
        return self


class ImageRequest(_Strict):
    prompt: Prompt
    seed: Seed | None = Field(default=None, description="Random when left out.")
    width: ImageSide
    height: ImageSide
    steps: Steps | None = Field(default=None, description="The profile's default when left out.")
    guidance: Guidance | None = None
    loras: list[LoraInput] = Field(default_factory=list, max_length=MAX_LORAS)
    webhook_url: HttpUrl | None = None
    deadline_s: float | None = Field(default=None, gt=0, description="Seconds from now the request may take.")


class Submitted(BaseModel):
    request_id: str
    status: RequestStatus
    status_url: str
    result_url: str
    cancel_url: str


class ResultInfo(BaseModel):
    url: str
    sha256: str
    bytes: int
    content_type: str
    lora_id: str | None = Field(default=None, description="Training: the new LoRA, for `loras` in /v1/images.")
    data_base64: str | None = Field(default=None, description="The PNG itself, only in a `Prefer: wait` answer.")


class WebhookInfo(BaseModel):
    state: str
    attempts: int


class RequestView(Submitted):
    kind: JobKind
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    deadline: datetime
    attempts: int
    miner_uid: int | None
    miner_hotkey: str | None
    timings: dict[str, Any]
    error: str | None
    input: dict[str, Any]
    result: ResultInfo | None
    webhook: WebhookInfo | None


class LoraView(BaseModel):
    id: str
    name: str
    trigger_word: str
    rank: int
    sha256: str
    created_at: datetime
    source_request_id: str | None


# ---- views ----------------------------------------------------------------------------------


def urls_for(base_url: str, job_id: str) -> dict[str, str]:
    base = f"{base_url.rstrip('/')}/v1/requests/{job_id}"
    return {"status_url": base, "result_url": f"{base}/result", "cancel_url": f"{base}/cancel"}


def request_view(job: Job, base_url: str) -> dict[str, Any]:
    """A request's status as clients see it (also the `data` of its webhook)."""
    urls = urls_for(base_url, job.id)
    timings = dict(job.timings or {})
    if job.finished_at is not None:
        timings["total_s"] = (job.finished_at - job.created_at).total_seconds()
    result = None
    if job.status == RequestStatus.succeeded.value and job.result_sha256:
        result = ResultInfo(
            url=urls["result_url"],
            sha256=job.result_sha256,
            bytes=job.result_bytes or 0,
            content_type=MEDIA_TYPES[job.kind],
            lora_id=lora_id_for(job.id) if job.kind == JobKind.training.value else None,
        )
    view = RequestView(
        request_id=job.id,
        kind=JobKind(job.kind),
        status=RequestStatus(job.status),
        **urls,
        created_at=job.created_at,
        dispatched_at=job.dispatched_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        deadline=job.deadline,
        attempts=job.attempts,
        miner_uid=job.miner_uid,
        miner_hotkey=job.miner_hotkey,
        timings=timings,
        error=job.error,
        input=_public_input(job),
        result=result,
        webhook=WebhookInfo(state=job.webhook_state, attempts=job.webhook_attempts) if job.webhook_url else None,
    )
    return view.model_dump(mode="json")


def _public_input(job: Job) -> dict[str, Any]:
    payload = dict(job.payload)
    payload.pop("targets", None)
    # Internal to audits; `heldout_images` tells the client how many of its images were kept back.
    payload.pop(HELDOUT_KEY, None)
    return payload


def lora_view(lora: Lora) -> dict[str, Any]:
    return LoraView(
        id=lora.id,
        name=lora.name,
        trigger_word=lora.trigger_word,
        rank=lora.rank,
        sha256=lora.sha256,
        created_at=lora.created_at,
        source_request_id=lora.source_job_id,
    ).model_dump(mode="json")


# ---- waiting for a request to finish ----------------------------------------------------------


class Waiters:
    """Lets an async request handler wait for a job that another thread finishes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def notify(self, job_id: str) -> None:
        with self._lock:
            waiting = list(self._waiting.get(job_id, ()))
        for loop, event in waiting:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, timeout: float, is_done: Callable[[], bool]) -> bool:
        """True once `is_done()` holds, False after `timeout` seconds. `is_done` (a blocking read)
        runs first, then on every notification and at least every second."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._waiting.setdefault(job_id, []).append(entry)
        try:
            end = loop.time() + timeout
            while True:
                # Checked after registering, so a notification cannot slip in between unseen.
                if await run_in_threadpool(is_done):
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


def prefer_wait(header: str | None, cap: float) -> float:
    """Seconds asked for with `Prefer: wait=N` (RFC 7240), capped; 0 when not asked."""
    if not header:
        return 0.0
    match = _PREFER_WAIT.search(header)
    return min(float(match.group(1)), cap) if match else 0.0


# ---- routes -----------------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="Your API key: `Authorization: Bearer dsk_...`")


def build_router(orch: Orchestrator) -> APIRouter:
    router = APIRouter()
    store = orch.store
    settings = orch.settings

    def client(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        return orch.admit(_secret(credentials))

    def own_job(job_id: str, key: ApiKey) -> Job:
        job = store.get_job(job_id, key.id)
        if job is None:
            raise HTTPException(404, detail=f"no request {job_id}")
        return job

    async def submitted(request: Request, job: Job) -> JSONResponse:
        base = str(request.base_url)
        wait_s = prefer_wait(request.headers.get("prefer"), settings.max_wait_s)
        if wait_s > 0:

            def done() -> bool:
                current = store.load_job(job.id)
                return current is not None and RequestStatus(current.status).terminal

            if await orch.waiters.wait(job.id, wait_s, done):
                finished = await run_in_threadpool(store.load_job, job.id)
                assert finished is not None
                view = request_view(finished, base)
                # Images inline; a LoRA (megabytes to gigabytes) stays behind its result_url.
                if view["result"] is not None and finished.kind == JobKind.inference.value:
                    data = await run_in_threadpool(orch.result_bytes, finished)
                    view["result"]["data_base64"] = base64.b64encode(data).decode()
                return JSONResponse(view, headers={"Preference-Applied": f"wait={wait_s:g}"})
        body = Submitted(request_id=job.id, status=RequestStatus(job.status), **urls_for(base, job.id))
        return JSONResponse(body.model_dump(mode="json"), status_code=202)

    errors: dict[int | str, dict[str, Any]] = {
        401: {"description": "missing, invalid or revoked API key"},
        429: {"description": "rate limit reached; see Retry-After"},
    }

    @router.post(
        "/v1/images",
        status_code=202,
        response_model=Submitted,
        responses={**errors, 200: {"model": RequestView, "description": "finished within Prefer: wait=N"}},
        tags=["requests"],
    )
    async def submit_image(
        body: ImageRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> JSONResponse:
        """Queue a text-to-image request. Send `Prefer: wait=N` to get the image in this response when
        it is ready within N seconds."""
        job = await orch.submit_image_job(_secret(credentials), body)
        return await submitted(request, job)

    @router.post("/v1/loras", status_code=202, response_model=Submitted, responses=errors, tags=["loras"])
    async def submit_training(
        request: Request,
        trigger_word: Annotated[str, Form(min_length=1, max_length=64)],
        key: ApiKey = Depends(client),
        dataset: Annotated[UploadFile | None, File(description="A zip of images with same-name .txt captions.")] = None,
        dataset_url: Annotated[str | None, Form(max_length=2048)] = None,
        name: Annotated[str | None, Form(max_length=200)] = None,
        rank: Annotated[int | None, Form(ge=1, le=256)] = None,
        alpha: Annotated[float | None, Form(gt=0, le=1024)] = None,
        steps: Annotated[int | None, Form(ge=1, le=100_000)] = None,
        lr: Annotated[float | None, Form(gt=0, le=1.0)] = None,
        seed: Annotated[int, Form(ge=0, le=MAX_SEED)] = 0,
        max_seconds: Annotated[float | None, Form(gt=0, le=7 * 24 * 3600)] = None,
        webhook_url: Annotated[str | None, Form(max_length=2048)] = None,
        deadline_s: Annotated[float | None, Form(gt=0)] = None,
    ) -> JSONResponse:
        """Queue a LoRA training request. When it succeeds, its status names the new LoRA's id
        (`result.lora_id`), which `/v1/images` accepts in `loras`."""
        if (dataset is None) == (not dataset_url):
            raise HTTPException(422, detail="give exactly one of a 'dataset' file or a 'dataset_url'")
        data = await _read_upload(dataset, settings.max_dataset_bytes) if dataset is not None else None
        options = {"rank": rank, "alpha": alpha, "steps": steps, "lr": lr, "seed": seed, "max_seconds": max_seconds}
        job = await run_in_threadpool(
            orch.create_training_job, key, trigger_word, name, data, dataset_url, options, webhook_url, deadline_s
        )
        return await submitted(request, job)

    @router.get("/v1/requests", response_model=list[RequestView], responses=errors, tags=["requests"])
    def list_requests(
        request: Request,
        key: ApiKey = Depends(client),
        status: RequestStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> list[dict[str, Any]]:
        """Your requests, newest first."""
        return [request_view(job, str(request.base_url)) for job in store.list_jobs(key.id, status=status, limit=limit)]

    @router.get("/v1/requests/{request_id}", response_model=RequestView, responses=errors, tags=["requests"])
    def get_request(request_id: str, request: Request, key: ApiKey = Depends(client)) -> dict[str, Any]:
        return request_view(own_job(request_id, key), str(request.base_url))

    @router.get(
        "/v1/requests/{request_id}/result",
        responses={**errors, 200: {"content": {"image/png": {}, "application/octet-stream": {}}}},
        response_class=Response,
        tags=["requests"],
    )
    def get_result(request_id: str, key: ApiKey = Depends(client)) -> FileResponse:
        """The PNG (inference) or .safetensors (training); 409 until the request has succeeded."""
        job = own_job(request_id, key)
        if job.status != RequestStatus.succeeded.value or not job.result_blob:
            raise HTTPException(409, detail=f"request {request_id} has no result: it is {job.status}")
        return FileResponse(
            orch.result_path(job),
            media_type=MEDIA_TYPES[job.kind],
            filename=FILENAMES[job.kind],
            headers={"X-Result-Sha256": job.result_blob},
        )

    @router.post("/v1/requests/{request_id}/cancel", response_model=RequestView, responses=errors, tags=["requests"])
    def cancel_request(request_id: str, request: Request, key: ApiKey = Depends(client)) -> dict[str, Any]:
        """Cancel a request that has not finished; 409 when it already has."""
        job = own_job(request_id, key)
        if RequestStatus(job.status).terminal or not store.cancel_job(job.id, key.id, now=orch.clock()):
            current = own_job(request_id, key)
            raise HTTPException(409, detail=f"request {request_id} already {current.status}")
        orch.dispatcher.cancel_at_miner(job)
        orch.finished(job.id, webhook=job.webhook_url is not None)
        return request_view(own_job(request_id, key), str(request.base_url))

    @router.get("/v1/loras", response_model=list[LoraView], responses=errors, tags=["loras"])
    def list_loras(key: ApiKey = Depends(client)) -> list[dict[str, Any]]:
        return [lora_view(lora) for lora in store.list_loras(key.id)]

    @router.get("/v1/loras/{lora_id}", response_model=LoraView, responses=errors, tags=["loras"])
    def get_lora(lora_id: str, key: ApiKey = Depends(client)) -> dict[str, Any]:
        lora = store.get_lora(lora_id, key.id)
        if lora is None:
            raise HTTPException(404, detail=f"no LoRA {lora_id}")
        return lora_view(lora)

    @router.get(
        "/v1/blobs/{sha256}",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "no such blob"}},
        tags=["miners"],
    )
    def get_blob(sha256: str) -> FileResponse:
        """LoRAs and datasets, by content address, for miners to download.

        No key or signature: miners fetch these with plain GETs and check the sha256 themselves.
        Only inputs (uploaded datasets, trained or fetched LoRAs) are served, never result images,
        and an address is the sha256 of the content, which nobody can name without having the
        bytes (or being told by us). The trade-off: anyone given a dispatched job's URL can fetch
        that LoRA or dataset, as with a signed URL that never expires.
        """
        if not re.match(SHA256_PATTERN, sha256) or not orch.assets.exists(sha256):
            raise HTTPException(404, detail="no such blob")
        return FileResponse(orch.assets.path(sha256), media_type="application/octet-stream")

    return router


def _secret(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, detail=f"dataset over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


# ---- helpers the orchestrator uses to build jobs -------------------------------------------------


def fetch(client: httpx.Client, url: str, max_bytes: int, policy: Any, what: str) -> bytes:
    """Download a client-given URL (SSRF-checked, size-capped); HTTPException 422 on failure."""
    try:
        check_url(url, policy)
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise HTTPException(422, detail=f"{what} download from {url} failed: HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes(1 << 16):
                size += len(chunk)
                if size > max_bytes:
                    raise HTTPException(422, detail=f"{what} at {url} is over the {max_bytes}-byte limit")
                chunks.append(chunk)
    except OutboundError as exc:
        raise HTTPException(422, detail=f"{what} URL refused: {exc}") from None
    except httpx.HTTPError as exc:
        raise HTTPException(422, detail=f"{what} download from {url} failed: {type(exc).__name__}") from None
    return b"".join(chunks)


def check_sha256(data: bytes, expected: str | None, what: str) -> str:
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise HTTPException(422, detail=f"{what} has sha256 {actual}, not the {expected} given")
    return actual


def new_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def deadline_after(now: datetime, requested_s: float | None, default_s: float, cap_s: float) -> datetime:
    seconds = requested_s if requested_s is not None else default_s
    if seconds > cap_s:
        raise HTTPException(422, detail=f"deadline_s {seconds:g} is over the {cap_s:g}s maximum")
    return now + timedelta(seconds=seconds)
