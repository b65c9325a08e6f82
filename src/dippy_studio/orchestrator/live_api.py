"""Live status for clients and progress from miners.

    GET  /v1/models                          what this orchestrator serves, with its real limits
    GET  /v1/requests/{id}/events            server-sent events: `status`, `queue`, `progress`
    POST /v1/miner-callbacks/{id}/progress   a miner's signed progress report

The event stream sends `status` (data: the request's status JSON, as `GET /v1/requests/{id}`)
first and on each status change, `queue` (`{"position": n}`, see `RequestView.queue_position`)
while queued and whenever the position moves, and `progress` (`{"step", "total", "loss"?,
"eta_s"?}`) on each new report from the miner; it ends after a terminal status. A stream wakes
when this replica hears of a change to its request: its own writes, and on PostgreSQL every
replica's (the job events channel, `Store.listen`); it also looks once a second (`Waiters.wait`),
which is how queue positions move and how SQLite deployments see dispatches.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import ClientDisconnect

from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.api import RequestId, bearer, bearer_secret, refusals
from dippy_studio.orchestrator.models import Job
from dippy_studio.orchestrator.schemas import ModelInfo
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.orchestrator.views import queue_position, request_view
from dippy_studio.protocol.asgi import request_target
from dippy_studio.protocol.http_errors import error_responses
from dippy_studio.protocol.limits import profile_limits
from dippy_studio.protocol.progress import MAX_PROGRESS_BYTES

# Seconds between keep-alive comments on a quiet stream: they let proxies and clients tell an
# idle stream from a dead one.
PING_S = 15.0


def model_info(name: str, *, default: bool) -> dict[str, Any]:
    """A model's `ModelInfo`: its limits (`protocol.limits`) and the job kinds it serves (a kind
    with an image task the model lists, and every kind without one: training)."""
    limits = profile_limits(name)
    info = ModelInfo(
        id=limits.name,
        description=limits.description,
        tasks=list(limits.tasks),
        kinds=[spec.name for spec in kinds.all_kinds() if spec.task is None or spec.task in limits.tasks],
        min_side=limits.min_side,
        max_side=limits.max_side,
        max_steps=limits.max_steps,
        default_steps=limits.default_steps,
        default_guidance=limits.default_guidance,
        max_input_pixels=limits.max_input_pixels,
        default=default,
    )
    return info.model_dump(mode="json")


def live_view(orch: Orchestrator, job: Job, base_url: str) -> dict[str, Any]:
    """The status JSON with the queue position looked up (blocking: two reads at most)."""
    return request_view(job, base_url, queue_position(orch.store, job))


async def request_events(orch: Orchestrator, job: Job, base_url: str) -> AsyncIterator[ServerSentEvent]:
    """The events of one request, from its state now until it is final."""
    sent: dict[str, Any] = {}
    view = await asyncio.to_thread(live_view, orch, job, base_url)
    while True:
        for event, data in _changes(sent, view):
            yield ServerSentEvent(json.dumps(data, separators=(",", ":")), event=event)
        if RequestStatus(view["status"]).terminal:
            return
        latest: dict[str, Any] | None = view

        def changed() -> bool:
            nonlocal latest
            current = orch.store.load_job(job.id)
            latest = None if current is None else live_view(orch, current, base_url)
            return latest is None or bool(_changes(dict(sent), latest))

        await orch.waiters.wait(job.id, PING_S, changed)
        if latest is None:  # removed under us: nothing more will happen to it
            return
        view = latest


def _changes(sent: dict[str, Any], view: dict[str, Any]) -> list[tuple[str, Any]]:
    """The events `view` calls for that were not sent yet, recording them in `sent`."""
    out: list[tuple[str, Any]] = []
    if sent.get("status") != view["status"]:
        out.append(("status", view))
    if view["queue_position"] is not None and sent.get("queue") != view["queue_position"]:
        out.append(("queue", {"position": view["queue_position"]}))
    if view["progress"] is not None and sent.get("progress") != view["progress"]:
        out.append(("progress", view["progress"]))
    sent.update(status=view["status"], queue=view["queue_position"], progress=view["progress"])
    return out


def build_live_router(orch: Orchestrator) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models", response_model=list[ModelInfo], tags=["models"])
    def list_models() -> list[dict[str, Any]]:
        """The models this orchestrator serves, the one requests get when they name no `model`
        marked `default`, each with the limits a request for it is checked against: side range
        (multiples of 16), steps, input image size, the tasks `POST /v1/images` accepts and the
        job kinds it serves. LoRA training (`POST /v1/loras`) trains for the `model` it names."""
        return [model_info(name, default=name == orch.settings.profile) for name in orch.settings.served_models]

    @router.get(
        "/v1/requests/{request_id}/events",
        response_class=EventSourceResponse,
        responses={
            **refusals(401, 404, 422, 429),
            200: {
                "content": {"text/event-stream": {}},
                "description": "Server-sent events `status` (the status JSON), `queue` ({position}) and "
                "`progress` ({step, total, loss?, eta_s?}); the stream ends after a final status.",
            },
        },
        tags=["requests"],
    )
    async def request_events_route(
        request_id: RequestId, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> EventSourceResponse:
        """Follow a request live: its status at once and on each change, its place in the queue
        while queued, and the miner's progress (denoising or training steps) while it runs."""
        key = await orch.admitted(bearer_secret(credentials))
        job = await asyncio.to_thread(orch.own_job, key, request_id)
        stream = request_events(orch, job, str(request.base_url))
        return EventSourceResponse(stream, ping=PING_S, headers={"Cache-Control": "no-store"})

    @router.post(
        "/v1/miner-callbacks/{job_id}/progress",
        tags=["miners"],
        responses=error_responses(
            {
                400: "the connection closed before the body ended",
                401: "bad signature",
                403: "not this job's miner",
                404: "no such request",
                409: "the request is no longer at this miner",
                410: "not the request's current attempt",
                413: f"over {MAX_PROGRESS_BYTES} bytes",
                422: "not a progress report",
            }
        ),
    )
    async def miner_progress(job_id: RequestId, request: Request) -> Response:
        """Where miners report progress: a signed POST of a `protocol.progress.ProgressReport`
        (JSON, at most `MAX_PROGRESS_BYTES`), from the job's miner, for its current attempt."""
        too_large = HTTPException(413, detail=f"a progress report may be at most {MAX_PROGRESS_BYTES} bytes")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_PROGRESS_BYTES:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_PROGRESS_BYTES:
                    raise too_large
        except ClientDisconnect:
            return JSONResponse({"detail": "the connection closed before the body ended"}, status_code=400)
        reply = await orch.callbacks.progress(job_id, request.headers, request_target(request.scope), bytes(body))
        if reply.status_code == 200:
            # Streams on this replica wake now; on PostgreSQL the others hear it from the database.
            orch.waiters.notify(job_id)
        return JSONResponse(reply.body, status_code=reply.status_code)

    return router
