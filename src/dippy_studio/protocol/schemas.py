"""Wire schemas shared by the miner, the orchestrator and the validator.

Both sides import these models, so a field changes in one place. Times on the wire are
timezone-aware ISO 8601 datetimes; sizes and limits that depend on the model profile are
checked by the engine, not here.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from dippy_studio.protocol.limits import (
    MAX_LORAS,
    Guidance,
    ImageSide,
    LoraScale,
    Prompt,
    Seed,
    Steps,
    Strength,
    Task,
    task_inputs_problem,
)

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


def _http_url(url: str) -> str:
    if not re.match(r"^https?://[^\s/]+", url):
        raise ValueError("must be an http:// or https:// URL")
    if len(url) > 2048:
        raise ValueError("URL longer than 2048 characters")
    return url


HttpUrl = Annotated[str, AfterValidator(_http_url)]

# A deadline is kept as unix seconds (a float) and shown again as a datetime: within Python's
# years (up to 9999) in UTC whatever its offset, with room for the float's rounding at the end.
LATEST_DEADLINE = datetime(9999, 1, 1, tzinfo=UTC)


def _representable(deadline: datetime) -> datetime:
    try:
        in_utc = deadline.astimezone(UTC)
    except OverflowError:
        in_utc = LATEST_DEADLINE
    if in_utc >= LATEST_DEADLINE:
        raise ValueError(f"must be before {LATEST_DEADLINE.isoformat()}")
    return deadline


Deadline = Annotated[AwareDatetime, AfterValidator(_representable)]
JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN, description="Letters, digits, '_' and '-'; at most 128.")]
Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN, description="Lower-case hex sha256.")]


class JobKind(StrEnum):
    inference = "inference"
    training = "training"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    expired = "expired"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.expired, JobStatus.canceled})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraDownload(_Strict):
    url: HttpUrl
    sha256: Sha256
    scale: LoraScale = 1.0


class InputDownload(_Strict):
    """An input image or mask: a canonical PNG (`protocol.images.canonical_png`) to fetch and verify."""

    url: HttpUrl
    sha256: Sha256


class InferenceJob(_Strict):
    """An image job. `task` says which (`limits.Task`); the image tasks carry their input image,
    inpainting a mask, img2img and inpainting a strength. The output is `width` x `height`."""

    job_id: JobId
    task: Task = "generate"
    prompt: Prompt
    seed: Seed
    width: ImageSide
    height: ImageSide
    steps: Steps
    guidance: Guidance = 3.5
    loras: list[LoraDownload] = Field(default_factory=list, max_length=MAX_LORAS)
    image: InputDownload | None = None
    mask: InputDownload | None = None
    strength: Strength | None = None
    callback_url: HttpUrl | None = None
    deadline: Deadline

    @model_validator(mode="after")
    def _inputs_fit_task(self) -> InferenceJob:
        given = (self.image is not None, self.mask is not None, self.strength is not None)
        problem = task_inputs_problem(self.task, *given)
        if problem is not None:
            raise ValueError(problem)
        return self


class TrainJob(_Strict):
    """A LoRA training job. Hyperparameters left out take the miner profile's defaults
    (for real Flux models: rank 16, alpha 16, lr 1e-4, 1000 steps)."""

    job_id: JobId
    dataset_url: HttpUrl
    dataset_sha256: Sha256
    trigger_word: str | None = Field(default=None, min_length=1, max_length=64)
    rank: int | None = Field(default=None, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0, le=1024, allow_inf_nan=False)
    steps: int | None = Field(default=None, ge=1, le=100_000)
    lr: float | None = Field(default=None, gt=0, le=1.0, allow_inf_nan=False)
    seed: Seed = 0
    max_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    callback_url: HttpUrl | None = None
    deadline: Deadline


class Accepted(BaseModel):
    job_id: str
    status: JobStatus


class JobView(BaseModel):
    """A job's state as the miner reports it (GET /v1/jobs/{id} and callbacks)."""

    job_id: str
    # A job kind's name (the orchestrator's registry knows them; miners serve `JobKind` lanes).
    kind: str = Field(max_length=32)
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime
    error: str | None = None
    # True when the job failed because its input is unusable (a LoRA that does not fit the
    # profile, a dataset that does not load): the sender's request is at fault, not the miner.
    input_error: bool = False
    result_sha256: str | None = None
    result_bytes: int | None = None
    fingerprint: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


class LaneCapacity(BaseModel):
    available: bool
    workers_alive: int
    workers: int
    queue_depth: int
    queue_limit: int
    # How long one job of this lane has recently taken a worker (None until one finished): a
    # sender holds no more jobs here than the workers get through within its attempt timeout.
    seconds_per_job: float | None = None


class Capacity(BaseModel):
    """What the miner serves right now. A lane with no live worker is not available."""

    hotkey: str
    profile: str
    fingerprints: list[str]
    # The image tasks its inference lane serves (`limits.Task`); a miner that does not say serves
    # text-to-image only.
    tasks: list[Task] = Field(default_factory=lambda: ["generate"])
    inference: LaneCapacity
    training: LaneCapacity
