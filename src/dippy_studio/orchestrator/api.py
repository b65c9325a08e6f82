"""The HTTP layer: the routes, and the mapping of the service's refusals (`errors`) to statuses.

For clients, in the style of fal's and Replicate's queue APIs:

    POST /v1/images                 submit an image request: text-to-image, or an edit, image-to-image
                                    or inpainting of an input image (JSON, or multipart with the
                                    image as a file; 202, or the result with Prefer: wait=N)
    POST /v1/loras                  submit a LoRA training request (multipart dataset zip or dataset_url; 202)
    GET  /v1/requests               your requests, newest first (paged: X-Next-Cursor, Link rel=next)
    GET  /v1/requests/{id}          status, timings, miner uid, result link, queue position, progress
    GET  /v1/requests/{id}/events   the same live, as server-sent events (`live_api`)
    GET  /v1/requests/{id}/result   the PNG or .safetensors
    POST /v1/requests/{id}/cancel   cancel it
    GET  /v1/loras, /v1/loras/{id}  your trained LoRAs (paged as requests)
    GET  /v1/models                 the models served, with their limits (`live_api`)

For miners: `POST /v1/miner-callbacks/{id}` (signed results), `POST /v1/miner-callbacks/{id}/progress`
(signed progress reports, `live_api`) and `GET /v1/blobs/{sha256}` (LoRAs,
datasets and input images). For validators: `GET /v1/scores` (signed). For operators: `/health`, `/ready`.

Clients authenticate with `Authorization: Bearer <API key>`. Each key has its own per-minute
limit (429 with Retry-After when it is spent; every authenticated call counts) and sees only
its own requests and LoRAs: another key's ids answer 404, as unknown ones do. Every refusal is
`{"detail": "<reason>"}` (`protocol.http_errors`), and each route documents the ones it gives.

`Prefer: wait=N` (at most `max_wait_s`) holds the submit response until the request finishes
or N seconds pass. Finished (in any final state): 200 with the request's status; for an image,
`result` then also carries the PNG inline as base64 (`data_base64`), so a synchronous client
needs one round trip. Not finished: the usual 202 with the status it has reached meanwhile, and
the client polls, follows its events or waits for its webhook.

Lists are newest first and paged by an opaque cursor (`paging`): `?limit=N`, then `?cursor=` the
`X-Next-Cursor` of the page before (also given as `Link: <url>; rel="next"`); the last page has
neither header. Requests submitted while a client pages sort before its first page, so a walk
sees every older request exactly once.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from dippy_studio.orchestrator import errors, kinds
from dippy_studio.orchestrator.image_inputs import TASK_KINDS
from dippy_studio.orchestrator.models import ApiKey, Job
from dippy_studio.orchestrator.paging import BadCursor, decode_cursor, encode_cursor, next_link
from dippy_studio.orchestrator.schemas import (
    ID_PATTERN,
    MIN_DEADLINE_S,
    ClientUrl,
    ImageRequest,
    LoraView,
    Readiness,
    RequestView,
    Submitted,
    TrainingRequest,
)
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.orchestrator.views import lora_view, queue_position, request_view, urls_for
from dippy_studio.protocol.asgi import request_target
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.http_errors import error_responses
from dippy_studio.protocol.limits import MAX_SEED
from dippy_studio.protocol.schemas import SHA256_PATTERN

# An id in a path: one this API could have handed out, else 422 before any lookup.
RequestId = Annotated[str, Path(pattern=ID_PATTERN, description="The request's id (`req_...`).")]
LoraId = Annotated[str, Path(pattern=ID_PATTERN, description="The LoRA's id (`lora_...`).")]

_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_SS58 = r"^[1-9A-HJ-NP-Za-km-z]{46,48}$"
_STATUS = {
    errors.Unauthorized: 401,
    errors.RateLimited: 429,
    errors.QuotaExceeded: 402,
    errors.InvalidRequest: 422,
    errors.TooLarge: 413,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Unavailable: 503,
}


# Why this API answers each refusal status; every one of them carries an `ErrorBody`.
_REASONS = {
    400: "the body could not be read as sent",
    401: "missing, invalid or revoked API key",
    402: "the key's usage quota for this period is spent (the reason says which, and when it resets)",
    404: "no such request or LoRA for this API key",
    409: "not in a state that allows this",
    413: "the body is over its size limit",
    422: "the request is invalid, or cannot be served as asked (the reason says which)",
    429: "rate limit reached; see Retry-After",
    503: "the result is stored where this replica cannot read it (the reason says what to configure)",
}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's documented refusals (its `responses=`), each with this API's reason."""
    return error_responses({status: _REASONS[status] for status in statuses})


def http_error(exc: errors.OrchestratorError) -> HTTPException:
    """The HTTP answer to a refusal of the service."""
    status = next((code for cls, code in _STATUS.items() if isinstance(exc, cls)), 400)
    headers = None
    if isinstance(exc, errors.Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, errors.RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return HTTPException(status, detail=exc.reason, headers=headers)


def prefer_wait(header: str | None, cap: float) -> float:
    """Seconds asked for with `Prefer: wait=N` (RFC 7240), capped; 0 when not asked."""
    if not header:
        return 0.0
    match = _PREFER_WAIT.search(header)
    return min(float(match.group(1)), cap) if match else 0.0


bearer = HTTPBearer(auto_error=False, description="Your API key: `Authorization: Bearer dsk_...`")


def bearer_secret(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The API key a request offered as `Authorization: Bearer`, if any."""
    return credentials.credentials if credentials is not None else None


def build_router(orch: Orchestrator) -> APIRouter:
    router = APIRouter()
    store = orch.store
    settings = orch.settings

    async def client(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
        return await orch.admitted(bearer_secret(credentials))

    async def submitted(request: Request, job: Job) -> JSONResponse:
        base = str(request.base_url)
        wait_s = prefer_wait(request.headers.get("prefer"), settings.max_wait_s)
        if wait_s > 0 and (finished := await orch.wait_finished(job.id, wait_s)) is not None:
            view = request_view(finished, base)
            # Small results inline (images); a LoRA (megabytes to gigabytes) stays behind its result_url.
            if view["result"] is not None and kinds.get(finished.kind).inline_result:
                # Unavailable (the result is on another replica's disk): the view without the
                # bytes still names the request, which a 503 would not; its result_url says why.
                with contextlib.suppress(errors.Unavailable):
                    data = await run_in_threadpool(orch.result_bytes, finished)
                    view["result"]["data_base64"] = base64.b64encode(data).decode()
            return JSONResponse(view, headers={"Preference-Applied": f"wait={wait_s:g}"})
        if wait_s > 0:
            # `job` is the row as inserted (queued); after a wait the request has usually moved
            # on (dispatched, running), and the answer must say where it stands now.
            job = await run_in_threadpool(store.load_job, job.id) or job
        body = Submitted(request_id=job.id, status=RequestStatus(job.status), **urls_for(base, job.id))
        return JSONResponse(body.model_dump(mode="json"), status_code=202)

    @router.post(
        "/v1/images",
        status_code=202,
        response_model=Submitted,
        responses={
            **refusals(400, 401, 402, 413, 422, 429),
            200: {"model": RequestView, "description": "finished within Prefer: wait=N"},
        },
        tags=["requests"],
        openapi_extra={"requestBody": _image_request_body()},
    )
    async def submit_image(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> JSONResponse:
        """Queue an image request: text-to-image (`task` generate, the default), or an edit,
        image-to-image or inpainting of an input image given as a URL or `data:` URI (JSON), or
        uploaded as a file part (multipart/form-data, the same fields). Send `Prefer: wait=N` to
        get the image in this response when it is ready within N seconds."""
        key = None
        multipart = _is_multipart(request.headers.get("content-type"))
        if multipart or not _small_body(request):
            # Authenticated before a body worth reading is read: a stranger's upload (or data: URI)
            # costs us nothing. Small bodies are admitted with their job, in one transaction.
            key = await orch.admitted(bearer_secret(credentials))
        if multipart:
            body = await _image_form(request, settings.max_input_image_bytes)
        else:
            raw = await request.body()
            # A body with data: URIs can be tens of megabytes: parsed off the event loop.
            parse = lambda: _validated(ImageRequest, _json_body(raw))  # noqa: E731
            body = parse() if len(raw) < _PARSE_ON_LOOP_BYTES else await run_in_threadpool(parse)
        job = await orch.submit(
            bearer_secret(credentials),
            TASK_KINDS[body.task],
            body,
            webhook_url=body.webhook_url,
            deadline_s=body.deadline_s,
            key=key,
        )
        return await submitted(request, job)

    @router.post(
        "/v1/loras",
        status_code=202,
        response_model=Submitted,
        responses=refusals(400, 401, 402, 413, 422, 429),
        tags=["loras"],
    )
    async def submit_training(
        request: Request,
        trigger_word: Annotated[str, Form(min_length=1, max_length=64)],
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        dataset: Annotated[UploadFile | None, File(description="A zip of images with same-name .txt captions.")] = None,
        dataset_url: Annotated[str | None, Form(max_length=2048)] = None,
        model: Annotated[
            str | None,
            Form(max_length=64, description="The model to train for (`GET /v1/models`); the default when left out."),
        ] = None,
        name: Annotated[str | None, Form(max_length=200)] = None,
        rank: Annotated[int | None, Form(ge=1, le=256)] = None,
        alpha: Annotated[float | None, Form(gt=0, le=1024)] = None,
        steps: Annotated[int | None, Form(ge=1, le=100_000)] = None,
        lr: Annotated[float | None, Form(gt=0, le=1.0)] = None,
        seed: Annotated[int, Form(ge=0, le=MAX_SEED)] = 0,
        max_seconds: Annotated[float | None, Form(gt=0, le=7 * 24 * 3600)] = None,
        webhook_url: Annotated[str | None, Form(max_length=2048)] = None,
        deadline_s: Annotated[float | None, Form(ge=MIN_DEADLINE_S)] = None,
    ) -> JSONResponse:
        """Queue a LoRA training request. When it succeeds, its status names the new LoRA's id
        (`result.lora_id`), which `/v1/images` accepts in `loras`."""
        # Authenticated before the upload is read: a stranger's upload costs us nothing.
        key = await orch.admitted(bearer_secret(credentials))
        if (dataset is None) == (not dataset_url):
            raise HTTPException(422, detail="give exactly one of a 'dataset' file or a 'dataset_url'")
        if webhook_url is not None:
            _validated(_WebhookForm, {"webhook_url": webhook_url})
        data = await _read_upload(dataset, settings.max_dataset_bytes) if dataset is not None else None
        fields = {
            "trigger_word": trigger_word,
            "model": model or None,
            "name": name,
            "dataset": data,
            "dataset_url": dataset_url or None,
            "rank": rank,
            "alpha": alpha,
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "max_seconds": max_seconds,
        }
        body = _validated(TrainingRequest, fields)
        job = await orch.submit(None, "training", body, webhook_url=webhook_url, deadline_s=deadline_s, key=key)
        return await submitted(request, job)

    @router.get(
        "/v1/requests",
        response_model=list[RequestView],
        responses={**refusals(401, 422, 429), 200: {"headers": _PAGE_HEADERS}},
        tags=["requests"],
    )
    def list_requests(
        request: Request,
        response: Response,
        key: ApiKey = Depends(client),
        status: RequestStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(description=_CURSOR_DOC)] = None,
    ) -> list[dict[str, Any]]:
        """Your requests, newest first, a page at a time: when there are more, the `X-Next-Cursor`
        header (and `Link: <...>; rel="next"`) gives the cursor of the next page."""
        after = _after(cursor)
        jobs = store.list_jobs(key.id, status=status, after=after, limit=limit + 1)
        _paged(request, response, jobs, limit)
        return [request_view(job, str(request.base_url)) for job in jobs[:limit]]

    @router.get(
        "/v1/requests/{request_id}",
        response_model=RequestView,
        responses=refusals(401, 404, 422, 429),
        tags=["requests"],
    )
    def get_request(request_id: RequestId, request: Request, key: ApiKey = Depends(client)) -> dict[str, Any]:
        """The request's status; while queued, `queue_position`; while at a miner, `progress`."""
        job = orch.own_job(key, request_id)
        return request_view(job, str(request.base_url), queue_position(store, job))

    @router.get(
        "/v1/requests/{request_id}/result",
        responses={
            **refusals(401, 404, 409, 422, 429, 503),
            200: {"content": {"image/png": {}, "application/octet-stream": {}}},
        },
        response_class=Response,
        tags=["requests"],
    )
    def get_result(request_id: RequestId, key: ApiKey = Depends(client)) -> FileResponse:
        """The PNG (inference) or .safetensors (training); 409 until the request has succeeded."""
        job = orch.own_job(key, request_id)
        spec = kinds.get(job.kind)
        return FileResponse(
            orch.result_path(job),
            media_type=spec.media_type,
            filename=spec.filename,
            headers={"X-Result-Sha256": job.result_blob or ""},
        )

    @router.post(
        "/v1/requests/{request_id}/cancel",
        response_model=RequestView,
        responses=refusals(401, 404, 409, 422, 429),
        tags=["requests"],
    )
    def cancel_request(request_id: RequestId, request: Request, key: ApiKey = Depends(client)) -> dict[str, Any]:
        """Cancel a request that has not finished; 409 when it already has."""
        return request_view(orch.cancel(key, request_id), str(request.base_url))

    @router.get(
        "/v1/loras",
        response_model=list[LoraView],
        responses={**refusals(401, 422, 429), 200: {"headers": _PAGE_HEADERS}},
        tags=["loras"],
    )
    def list_loras(
        request: Request,
        response: Response,
        key: ApiKey = Depends(client),
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(description=_CURSOR_DOC)] = None,
    ) -> list[dict[str, Any]]:
        """Your LoRAs, newest first, paged as `GET /v1/requests`."""
        loras = store.list_loras(key.id, after=_after(cursor), limit=limit + 1)
        _paged(request, response, loras, limit)
        return [lora_view(lora) for lora in loras[:limit]]

    @router.get("/v1/loras/{lora_id}", response_model=LoraView, responses=refusals(401, 404, 422, 429), tags=["loras"])
    def get_lora(lora_id: LoraId, key: ApiKey = Depends(client)) -> dict[str, Any]:
        lora = store.get_lora(lora_id, key.id)
        if lora is None:
            raise HTTPException(404, detail=f"no LoRA {lora_id}")
        return lora_view(lora)

    @router.get(
        "/v1/blobs/{sha256}",
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}},
            **error_responses({404: "no such blob", 422: _REASONS[422]}),
        },
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
        if not re.match(SHA256_PATTERN, sha256):
            raise HTTPException(404, detail="no such blob")
        try:
            path = orch.assets.local_path(sha256)
        except FileNotFoundError:
            raise HTTPException(404, detail="no such blob") from None
        return FileResponse(path, media_type="application/octet-stream")

    @router.post(
        "/v1/miner-callbacks/{job_id}",
        tags=["miners"],
        responses=error_responses(
            {
                400: "the body is not a multipart form, or shorter than its Content-Length",
                401: "bad signature",
                403: "not this job's miner",
                404: "no such request",
                410: "not the request's current attempt",
                411: "no Content-Length",
                413: "larger than a result of this job's kind can be",
                422: "no valid 'meta' part, or the result is not acceptable",
            }
        ),
    )
    async def miner_callback(job_id: RequestId, request: Request) -> Response:
        """Where miners deliver results: a signed multipart POST (`meta` JobView, `result` file) with
        a Content-Length. The signature headers, the job's miner and the size are checked before
        the body is read."""
        try:
            target = request_target(request.scope)
            reply = await orch.callbacks.handle(job_id, request.headers, target, request.stream())
        except ClientDisconnect:
            # The miner went away mid-body: nobody may read this, but the shape stays the same.
            return JSONResponse({"detail": "the connection closed before the body ended"}, status_code=400)
        return JSONResponse(reply.body, status_code=reply.status_code)

    @router.get(
        "/v1/scores",
        tags=["validators"],
        responses={200: {"description": "signed with btauth headers"}, **refusals(422)},
    )
    async def scores(
        request: Request,
        receiver: Annotated[
            str | None, Query(alias="for", pattern=_SS58, description="Your hotkey (SS58), to sign for.")
        ] = None,
    ) -> Response:
        """`{scores: {hotkey: score}, window: {start, end}, orchestrator, netuid}`, signed by the
        orchestrator's hotkey over the exact body (btauth/1 headers, method GET and this path).
        Pass `?for=<your hotkey>` to have it signed for you as receiver (else for our own hotkey);
        verify with `protocol.auth.verify_request`."""
        receiver = receiver or orch.signer.ss58_address
        snapshot = await run_in_threadpool(orch.scores)
        payload = {
            "scores": dict(sorted(snapshot.scores.items())),
            "window": {"start": snapshot.start.isoformat(), "end": snapshot.end.isoformat()},
            "orchestrator": orch.signer.ss58_address,
            "netuid": orch.chain.netuid if orch.chain is not None else None,
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        headers = sign_request(orch.signer, "GET", request_target(request.scope), body, receiver)
        return Response(body, media_type="application/json", headers=headers)

    @router.get("/health", tags=["operators"])
    def health() -> dict[str, Any]:
        """`leads`: the singleton loops this replica runs now (sweep, sync, probe, scores, audits);
        with several replicas on one database each loop has one leader."""
        return {"status": "ok", "leads": orch.leadership.leads()}

    @router.get(
        "/ready",
        tags=["operators"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready: `problems` says why"}},
    )
    def ready() -> JSONResponse:
        loops = {"dispatch": orch.dispatcher, **orch.tasks}
        problems = [f"{name} loop is not running" for name, task in loops.items() if not task.alive]
        try:
            store.ping()
        except Exception as exc:
            problems.append(f"database: {type(exc).__name__}")
        miners = len(store.list_miners(healthy_only=True)) if not problems else 0
        if not problems and miners == 0:
            problems.append("no healthy miner")
        body = {"ready": not problems, "problems": problems, "healthy_miners": miners}
        return JSONResponse(body, status_code=503 if problems else 200)

    return router


_CURSOR_DOC = "The `X-Next-Cursor` of the previous page; leave out for the first page."
_STRING = {"type": "string"}
_PAGE_HEADERS = {
    "X-Next-Cursor": {"description": "The cursor of the next page; absent on the last page.", "schema": _STRING},
    "Link": {"description": 'The next page as `<url>; rel="next"`; absent on the last page.', "schema": _STRING},
}


def _after(cursor: str | None) -> tuple[datetime, str] | None:
    """Where a page starts: after the item a cursor names; 422 for a cursor we did not hand out."""
    if cursor is None:
        return None
    try:
        position = decode_cursor(cursor)
    except BadCursor as exc:
        raise HTTPException(422, detail=str(exc)) from None
    return position.created_at, position.id


def _paged(request: Request, response: Response, items: list[Any], limit: int) -> None:
    """Set the next-page headers when `items` (fetched `limit + 1`) holds more than a page."""
    if len(items) > limit:
        last = items[limit - 1]
        cursor = encode_cursor(last.created_at, last.id)
        response.headers["X-Next-Cursor"] = cursor
        response.headers["Link"] = next_link(str(request.url), cursor)


async def _read_upload(upload: UploadFile, limit: int, what: str = "dataset") -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, detail=f"{what} over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_multipart(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "multipart/form-data"


# A JSON body up to this size is parsed on the event loop; larger ones (data: URIs) on a thread.
_PARSE_ON_LOOP_BYTES = 256 << 10


def _small_body(request: Request) -> bool:
    """Whether the request declares a body under `_PARSE_ON_LOOP_BYTES` (a chunked one declares none)."""
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) < _PARSE_ON_LOOP_BYTES


# Form parts that hold JSON (a list), and those that are files.
_JSON_PARTS = frozenset({"loras"})
_FILE_PARTS = ("image", "mask")


async def _image_form(request: Request, max_image_bytes: int) -> ImageRequest:
    """An `ImageRequest` from a multipart form: the JSON body's fields as parts, `image` and
    `mask` as file parts (or as text parts holding a URL or data: URI), `loras` as JSON text."""
    try:
        form = await request.form(max_files=len(_FILE_PARTS), max_fields=2 * len(ImageRequest.model_fields))
    except (HTTPException, ValueError, KeyError, AssertionError) as exc:
        reason = getattr(exc, "detail", exc)
        raise HTTPException(400, detail=f"the multipart body could not be read: {reason}") from None
    fields: dict[str, Any] = {}
    uploads: dict[str, bytes | None] = {}
    for name in form:
        values = form.getlist(name)
        if len(values) != 1:
            raise HTTPException(422, detail=f"form part {name!r} is given {len(values)} times")
        value = values[0]
        if isinstance(value, str):
            if name in _JSON_PARTS:
                try:
                    fields[name] = json_value(value)
                except ValueError:
                    raise HTTPException(422, detail=f"form part {name!r} is not JSON") from None
            else:
                fields[name] = value
        elif name in _FILE_PARTS:
            uploads[name] = await _read_upload(value, max_image_bytes, name)
        else:
            raise HTTPException(422, detail=f"form part {name!r} must not be a file")
    return _validated(ImageRequest, fields).with_uploads(**uploads)


def json_value(text: str | bytes) -> Any:
    """`json.loads` of a client's text, every way it can fail a ValueError: nesting deeper than the
    parser recurses (a few kilobytes of brackets) is bad JSON too, not a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json_body(raw: bytes) -> Any:
    """The JSON body, refused as FastAPI refuses a body it cannot parse."""
    try:
        return json_value(raw)
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        error = {"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**error, "ctx": {"error": str(exc)}}]) from None


_Model = TypeVar("_Model", bound=BaseModel)


def _validated(model: type[_Model], fields: Any) -> _Model:
    """`model` from a client's fields, its problems refused as FastAPI refuses a body that does
    not validate."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


class _WebhookForm(BaseModel):
    """The `webhook_url` form field of `POST /v1/loras`, checked as `ImageRequest` checks its own."""

    webhook_url: ClientUrl


_COMPONENTS = "#/components/schemas/{model}"


def _image_form_schema() -> dict[str, Any]:
    """The multipart form of `POST /v1/images`: the JSON body's fields, `image` and `mask` as files."""
    schema = ImageRequest.model_json_schema(ref_template=_COMPONENTS)
    schema.pop("$defs", None)
    schema.pop("examples", None)
    properties = dict(schema["properties"])
    for name in _FILE_PARTS:
        properties[name] = {
            "type": "string",
            "format": "binary",
            "description": f"The {name} file (PNG, JPEG or WebP).",
        }
    properties["loras"] = {
        "type": "string",
        "description": "The LoRAs as a JSON array, as in the JSON body.",
        "examples": ['[{"id": "lora_..."}]'],
    }
    return {**schema, "properties": properties, "title": "ImageForm"}


def document_request_models(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the models that routes read themselves (`POST /v1/images`) to an OpenAPI document's
    components, where those routes' request bodies refer to them."""
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    schema = ImageRequest.model_json_schema(ref_template=_COMPONENTS)
    components.update(schema.pop("$defs", {}))
    components["ImageRequest"] = schema
    components["ImageForm"] = _image_form_schema()
    return spec


def _image_request_body() -> dict[str, Any]:
    """The OpenAPI request body of `POST /v1/images`: JSON, or the same fields as a multipart form
    (`document_request_models` adds both schemas)."""
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": _COMPONENTS.format(model="ImageRequest")}},
            "multipart/form-data": {
                "schema": {"$ref": _COMPONENTS.format(model="ImageForm")},
                "encoding": {name: {"contentType": "image/png, image/jpeg, image/webp"} for name in _FILE_PARTS},
            },
        },
    }
