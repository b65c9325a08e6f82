"""Typed views of what the API answers. Fields the server adds later are kept (`extra`), never refused,
so an older client keeps working against a newer orchestrator."""

from __future__ import annotations

import base64
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Status(StrEnum):
    queued = "queued"
    dispatched = "dispatched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def done(self) -> bool:
        """Finished for good: succeeded, failed or canceled."""
        return self in (Status.succeeded, Status.failed, Status.canceled)


class _View(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Progress(_View):
    """How far a running job is: denoising or training `step` of `total`, with training's `loss`
    and the miner's estimate of the seconds left (`eta_s`) when it sends them."""

    step: int
    total: int
    loss: float | None = None
    eta_s: float | None = None


class Result(_View):
    url: str
    sha256: str
    size: int = Field(alias="bytes")
    content_type: str
    lora_id: str | None = None
    # The PNG inline, only in a `Prefer: wait` answer: `data` decodes it.
    data_base64: str | None = None

    @property
    def data(self) -> bytes | None:
        return base64.b64decode(self.data_base64) if self.data_base64 is not None else None


class Request(_View):
    """A request's status, as `GET /v1/requests/{id}` answers it (and a webhook's `data`).

    `status` says where it is; `done` whether it has finished; `result` is set once it succeeded
    (`client.download(request)` fetches the bytes) and `error` says why it failed."""

    id: str = Field(alias="request_id")
    status: Status
    status_url: str
    result_url: str
    cancel_url: str
    kind: str | None = None
    model: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int | None = None
    miner_uid: int | None = None
    timings: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    result: Result | None = None
    progress: Progress | None = None
    queue_position: int | None = None

    @property
    def done(self) -> bool:
        return self.status.done


class Lora(_View):
    """A trained LoRA: pass its `id` in `loras=[{"id": ...}]` of an image request."""

    id: str
    name: str
    trigger_word: str
    rank: int
    model: str | None = None
    sha256: str
    created_at: datetime
    source_request_id: str | None = None


class Model(_View):
    """A model the orchestrator serves (pass its `id` as `model=`), with the limits it checks
    requests against: width and height are multiples of 16 in `min_side`..`max_side`, `steps` at
    most `max_steps`; `tasks` and job `kinds` it serves; `default` for the one requests get when
    they name none."""

    id: str
    description: str = ""
    tasks: list[str]
    kinds: list[str] = Field(default_factory=list)
    min_side: int
    max_side: int
    max_steps: int
    default_steps: int
    default_guidance: float
    max_input_pixels: int
    default: bool = False


class Event(_View):
    """One server-sent event of `stream`: `event` is `status` (then `request` is set), `progress`
    (`progress`) or `queue` (`queue_position`); `data` is the raw JSON."""

    event: str
    data: dict[str, Any]
    request: Request | None = None
    progress: Progress | None = None
    queue_position: int | None = None


class WebhookEvent(_View):
    """A verified webhook: `type` is `request.succeeded`, `request.failed` or `request.canceled`."""

    type: str
    timestamp: datetime
    data: Request
