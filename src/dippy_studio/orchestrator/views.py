"""How a request and a LoRA look to clients: the API's status JSON, also the `data` of webhooks."""

from __future__ import annotations

from typing import Any

from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.models import Job, Lora
from dippy_studio.orchestrator.results import lora_id_for
from dippy_studio.orchestrator.schemas import LoraView, Progress, RequestView, ResultInfo, WebhookInfo
from dippy_studio.orchestrator.states import ACTIVE, RequestStatus
from dippy_studio.orchestrator.store import Store


def urls_for(base_url: str, job_id: str) -> dict[str, str]:
    base = f"{base_url.rstrip('/')}/v1/requests/{job_id}"
    return {"status_url": base, "result_url": f"{base}/result", "cancel_url": f"{base}/cancel"}


def job_progress(job: Job) -> Progress | None:
    """The current attempt's progress report, while the job is at a miner (`Store.record_progress`)."""
    report = (job.timings or {}).get("progress")
    if not isinstance(report, dict) or RequestStatus(job.status) not in ACTIVE or report.get("attempt") != job.attempts:
        return None
    return Progress.model_validate({k: v for k, v in report.items() if k != "attempt"})


def queue_position(store: Store, job: Job) -> int | None:
    """A queued job's place among the queued jobs of its miner lane (`Store.queue_position`);
    None once it has left the queue (a blocking read while queued)."""
    if job.status != RequestStatus.queued.value:
        return None
    lane = kinds.get(job.kind).lane
    return store.queue_position(job, [spec.name for spec in kinds.all_kinds() if spec.lane == lane])


def request_view(job: Job, base_url: str, queue_position: int | None = None) -> dict[str, Any]:
    """A request's status as clients see it (also the `data` of its webhook). `queue_position`:
    the queued job's place in line (`Store.queue_position`), where the caller looked it up."""
    spec = kinds.get(job.kind)
    urls = urls_for(base_url, job.id)
    timings = {name: value for name, value in (job.timings or {}).items() if name != "progress"}
    if job.finished_at is not None:
        timings["total_s"] = (job.finished_at - job.created_at).total_seconds()
    result = None
    if job.status == RequestStatus.succeeded.value and job.result_sha256:
        result = ResultInfo(
            url=urls["result_url"],
            sha256=job.result_sha256,
            bytes=job.result_bytes or 0,
            content_type=spec.media_type,
            lora_id=lora_id_for(job.id) if spec.registers is not None else None,
        )
    view = RequestView(
        request_id=job.id,
        kind=job.kind,
        model=job.model,
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
        input=spec.public_input(job.payload),
        result=result,
        webhook=WebhookInfo(state=job.webhook_state, attempts=job.webhook_attempts) if job.webhook_url else None,
        progress=job_progress(job),
        queue_position=queue_position if job.status == RequestStatus.queued.value else None,
    )
    return view.model_dump(mode="json")


def lora_view(lora: Lora) -> dict[str, Any]:
    return LoraView(
        id=lora.id,
        name=lora.name,
        trigger_word=lora.trigger_word,
        rank=lora.rank,
        model=lora.model,
        sha256=lora.sha256,
        created_at=lora.created_at,
        source_request_id=lora.source_job_id,
    ).model_dump(mode="json")
