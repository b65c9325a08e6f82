"""The public API's wire models: what clients send and what they get back."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.protocol.limits import MAX_LORAS, MAX_SEED, Guidance, ImageSide, LoraScale, Prompt, Seed, Steps
from dippy_studio.protocol.schemas import HttpUrl, Sha256

# No job can be dispatched, run and called back in less (a shorter deadline is refused).
MIN_DEADLINE_S = 1.0


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
    deadline_s: float | None = Field(
        default=None,
        ge=MIN_DEADLINE_S,
        description="Seconds from now the request may take; at most the orchestrator's max_deadline_s.",
    )


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
    kind: str
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


class Readiness(BaseModel):
    ready: bool
    problems: list[str]
    healthy_miners: int


class LoraView(BaseModel):
    id: str
    name: str
    trigger_word: str
    rank: int
    sha256: str
    created_at: datetime
    source_request_id: str | None


class TrainingRequest(_Strict):
    """A LoRA training request (the multipart form of `POST /v1/loras`, with the upload read)."""

    trigger_word: str = Field(min_length=1, max_length=64)
    name: str | None = Field(default=None, max_length=200)
    dataset: bytes | None = None
    dataset_url: HttpUrl | None = None
    rank: int | None = Field(default=None, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0, le=1024)
    steps: int | None = Field(default=None, ge=1, le=100_000)
    lr: float | None = Field(default=None, gt=0, le=1.0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    max_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _one_source(self) -> TrainingRequest:
        if (self.dataset is None) == (self.dataset_url is None):
            raise ValueError("give exactly one of a 'dataset' file or a 'dataset_url'")
        return self
