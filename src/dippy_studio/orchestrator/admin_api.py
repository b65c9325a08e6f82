"""Usage for clients, and the operator's admin API for keys and quotas (`install` adds both).

For clients (their API key):

    GET  /v1/usage?days=N                     your metered units per UTC day, and your quota

For operators (`Authorization: Bearer <admin_token>`, the `admin_token` setting, i.e.
DIPPY_ORCH_ADMIN_TOKEN; every path answers 404 saying why until one is set, 401 to any other token):

    POST /v1/admin/keys                       create a key: its secret is in this answer only
    GET  /v1/admin/keys                       list keys (never their secrets)
    GET  /v1/admin/keys/{id}                  one key
    POST /v1/admin/keys/{id}/revoke           revoke it (at once, on every replica)
    PUT  /v1/admin/keys/{id}/quota            set its quota (`{}`: unlimited)
    GET  /v1/admin/keys/{id}/usage?days=N     its usage, as GET /v1/usage answers the key itself

A submission the key's quota has no room for answers 402 (`errors.QuotaExceeded`), in the API's
one error shape; 429 stays for the per-minute rate limit.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from dippy_studio.orchestrator.api import bearer_secret, refusals
from dippy_studio.orchestrator.models import ApiKey
from dippy_studio.orchestrator.schemas import ID_PATTERN, Label
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.store import DEFAULT_RATE_LIMIT_PER_MINUTE, UnknownApiKey
from dippy_studio.orchestrator.usage import MAX_DAYS, Quota, quota_of
from dippy_studio.protocol.http_errors import error_responses

ADMIN_OFF = "the admin API is off: set DIPPY_ORCH_ADMIN_TOKEN to an operator token to turn it on"
ADMIN_WRONG = "wrong or missing admin token: send Authorization: Bearer <DIPPY_ORCH_ADMIN_TOKEN>"
DEFAULT_DAYS = 30

Days = Annotated[int, Query(ge=1, le=MAX_DAYS, description="How many UTC days, today last.")]
KeyId = Annotated[str, Path(pattern=ID_PATTERN, description="The key's id (`key_...`).")]


class UsageDayView(BaseModel):
    date: str = Field(description="The UTC day, YYYY-MM-DD.")
    images: int = Field(description="Succeeded image jobs (every task).")
    megapixel_steps: float = Field(description="Width x height / 1e6 x steps of those jobs, summed.")
    training_steps: int = Field(description="Steps asked for by succeeded LoRA trainings.")


class UsageView(BaseModel):
    key_id: str
    days: list[UsageDayView]
    quota: Quota | None = Field(description="Limits per UTC day and month; null: unlimited.")


class KeyView(BaseModel):
    id: str
    name: str
    rate_limit_per_minute: int
    quota: Quota | None
    created_at: datetime
    revoked_at: datetime | None


class NewKey(BaseModel):
    name: Label = Field(min_length=1, max_length=200, pattern=r"\S")
    rate_limit_per_minute: int = Field(default=DEFAULT_RATE_LIMIT_PER_MINUTE, ge=1, le=1_000_000)
    quota: Quota | None = None


class CreatedKey(BaseModel):
    key: KeyView
    secret: str = Field(description="The API key: shown here once, never stored.")
    webhook_secret: str = Field(description="Verifies the key's webhooks (Standard Webhooks).")


def key_view(key: ApiKey) -> KeyView:
    return KeyView(
        id=key.id,
        name=key.name,
        rate_limit_per_minute=key.rate_limit_per_minute,
        quota=quota_of(key.quota),
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


_bearer = HTTPBearer(auto_error=False, description="An API key (`dsk_...`) or, under /v1/admin, the admin token.")
_ADMIN_REFUSALS = error_responses(
    {401: "wrong or missing admin token", 404: "the admin API is off, or no such key", 422: "invalid request"}
)


def build_usage_router(orch: Orchestrator) -> APIRouter:
    router = APIRouter()

    async def client(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> ApiKey:
        return await orch.admitted(bearer_secret(credentials))

    @router.get("/v1/usage", response_model=UsageView, responses=refusals(401, 422, 429), tags=["usage"])
    async def my_usage(key: ApiKey = Depends(client), days: Days = DEFAULT_DAYS) -> dict[str, Any]:
        """Your metered units for each of the last `days` UTC days (today last), and your quota.
        Counted when a request succeeds, on the day it succeeds."""
        return await run_in_threadpool(orch.store.key_usage, key, days, orch.clock())

    return router


def build_admin_router(orch: Orchestrator) -> APIRouter:
    token = orch.settings.admin_token
    expected = token.get_secret_value().encode() if token is not None else None

    def operator(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if expected is None:
            raise HTTPException(404, detail=ADMIN_OFF)
        offered = (bearer_secret(credentials) or "").encode("utf-8", "replace")
        if not hmac.compare_digest(offered, expected):
            raise HTTPException(401, detail=ADMIN_WRONG, headers={"WWW-Authenticate": 'Bearer realm="admin"'})

    router = APIRouter(
        prefix="/v1/admin",
        dependencies=[Depends(operator)],
        responses=_ADMIN_REFUSALS,
        tags=["admin"],
        include_in_schema=expected is not None,
    )
    store = orch.store

    def existing(key_id: str) -> ApiKey:
        key = store.get_api_key(key_id)
        if key is None:
            raise HTTPException(404, detail=f"no API key {key_id}")
        return key

    @router.post("/keys", response_model=CreatedKey, status_code=201)
    def create_key(body: NewKey) -> CreatedKey:
        """Create an API key. Its secret and webhook secret are in this answer only."""
        created = store.create_api_key(body.name, body.rate_limit_per_minute, now=orch.clock())
        key = created.key
        if body.quota is not None and not body.quota.unlimited:
            key = store.set_api_key_quota(key.id, body.quota)
        return CreatedKey(key=key_view(key), secret=created.secret, webhook_secret=created.key.webhook_secret)

    @router.get("/keys", response_model=list[KeyView])
    def list_keys(include_revoked: bool = True) -> list[KeyView]:
        return [key_view(key) for key in store.list_api_keys(include_revoked=include_revoked)]

    @router.get("/keys/{key_id}", response_model=KeyView)
    def get_key(key_id: KeyId) -> KeyView:
        return key_view(existing(key_id))

    @router.post("/keys/{key_id}/revoke", response_model=KeyView)
    def revoke_key(key_id: KeyId) -> KeyView:
        """Revoke a key (again: no change). Its requests are refused from now on, on every replica."""
        try:
            store.revoke_api_key(key_id, now=orch.clock())
        except UnknownApiKey:
            raise HTTPException(404, detail=f"no API key {key_id}") from None
        return key_view(existing(key_id))

    @router.put("/keys/{key_id}/quota", response_model=KeyView)
    def set_quota(key_id: KeyId, body: Quota) -> KeyView:
        """Replace the key's quota; limits left out or null are unlimited. Takes effect at the
        key's next submission."""
        try:
            return key_view(store.set_api_key_quota(key_id, body))
        except UnknownApiKey:
            raise HTTPException(404, detail=f"no API key {key_id}") from None

    @router.get("/keys/{key_id}/usage", response_model=UsageView)
    def key_usage(key_id: KeyId, days: Days = DEFAULT_DAYS) -> dict[str, Any]:
        return store.key_usage(existing(key_id), days, orch.clock())

    return router


def install(app: FastAPI, orch: Orchestrator) -> None:
    """Add GET /v1/usage and the admin API to the app."""
    app.include_router(build_usage_router(orch))
    app.include_router(build_admin_router(orch))
