"""The orchestrator's ASGI app, built from settings by `create_app`: the service (`service`), its
routes (`api`, `dashboard`), a body-size limit, and a lifespan that starts and stops the loops."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from dippy_studio.orchestrator import admin_api, errors
from dippy_studio.orchestrator.api import build_router, document_request_models, http_error
from dippy_studio.orchestrator.blobs import CorruptBlob
from dippy_studio.orchestrator.dashboard_access import DashboardGuard
from dippy_studio.orchestrator.live_api import build_live_router
from dippy_studio.orchestrator.openai_compat import build_router as build_openai_router
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.protocol import api_docs, http_errors
from dippy_studio.protocol.asgi import BodyLimit
from dippy_studio.protocol.http_errors import error_body

JSON_BODY_LIMIT = 1 << 20

log = logging.getLogger("dippy_studio.orchestrator")


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
        # Served from the package by `api_docs.install`: FastAPI's pages load from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.orchestrator = orch

    def limit_for(path: str) -> int:
        if path.startswith("/v1/miner-callbacks/"):
            return settings.max_result_bytes + JSON_BODY_LIMIT
        if path == "/v1/loras":
            return settings.max_dataset_bytes + JSON_BODY_LIMIT
        if path in ("/v1/images", "/v1/images/edits"):
            # An image and a mask, uploaded or as base64 data: URIs (4 characters for 3 bytes).
            return 2 * (settings.max_input_image_bytes * 4 // 3 + 4) + JSON_BODY_LIMIT
        return JSON_BODY_LIMIT

    async def refused(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.OrchestratorError)
        http = http_error(exc)
        return JSONResponse(error_body(http.detail), status_code=http.status_code, headers=http.headers)

    async def corrupt(_request: Request, exc: Exception) -> JSONResponse:
        # Where and how it failed (bucket, key, hashes) is the operator's business: logged, not sent.
        log.error("refused to serve a blob: %s", exc)
        reason = "a stored blob failed its sha256 check and is not served (the orchestrator's log says which)"
        return JSONResponse(error_body(reason), status_code=502)

    app.add_middleware(BodyLimit, limit=limit_for)
    # Always in place: with the dashboard off, its paths still answer why.
    app.add_middleware(DashboardGuard, token=settings.dashboard_token, enabled=settings.dashboard)
    http_errors.install(app)
    app.add_exception_handler(errors.OrchestratorError, refused)
    app.add_exception_handler(CorruptBlob, corrupt)
    app.include_router(build_router(orch))
    app.include_router(build_live_router(orch))
    admin_api.install(app, orch)  # GET /v1/usage, /v1/admin, 402 for a spent quota
    app.include_router(build_openai_router(orch))
    api_docs.install(app)
    openapi = app.openapi

    def documented() -> dict[str, Any]:
        # Built once, by FastAPI, then completed with the request models routes read themselves.
        if app.openapi_schema is None:
            app.openapi_schema = document_request_models(openapi())
        return app.openapi_schema

    app.openapi = documented  # type: ignore[method-assign]
    if settings.dashboard and settings.dashboard_token is not None:
        from dippy_studio.orchestrator import dashboard

        dashboard.mount(app, orch)
    return app
