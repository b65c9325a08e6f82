"""A miner's progress report on a job: the body of its signed
`POST /v1/miner-callbacks/{request id}/progress` to the orchestrator.

Denoising steps of an image, or optimizer steps of a LoRA training run with its latest loss and
the time the miner expects it still needs. Small and bounded (`MAX_PROGRESS_BYTES`): the
orchestrator refuses a larger body before it parses it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dippy_studio.protocol.schemas import JobId

MAX_PROGRESS_BYTES = 1024
# The furthest ahead a report's time left may be.
MAX_ETA_S = 30 * 24 * 3600
# The path a miner posts progress to, under the orchestrator's callback URL of the job.
PROGRESS_SUFFIX = "/progress"


class ProgressReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: JobId = Field(description="The miner's job id: `<request id>-<attempt>`.")
    step: int = Field(ge=0, le=10_000_000)
    total: int = Field(ge=1, le=10_000_000)
    loss: float | None = Field(default=None, allow_inf_nan=False)
    eta_s: float | None = Field(default=None, ge=0, le=MAX_ETA_S, allow_inf_nan=False)

    @model_validator(mode="after")
    def _within_total(self) -> ProgressReport:
        if self.step > self.total:
            raise ValueError(f"step {self.step} is past total {self.total}")
        return self

    def public(self) -> dict[str, float | int]:
        """What clients see: the report without the miner's job id, and without unknown fields."""
        return self.model_dump(exclude={"job_id"}, exclude_none=True)
