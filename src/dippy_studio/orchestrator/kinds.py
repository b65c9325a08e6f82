"""Job kinds as data: everything the orchestrator knows about a kind of job, in one registry entry.

A kind says how a client's request becomes a job's payload, what a miner is sent and where, how
the miner's result is checked and audited, what it is worth in a score, and how the API and the
dashboard show it. The core (store, dispatch, callbacks, scoring, audits, dashboard) is written
against `JobKindSpec` and looks kinds up by name (`get`), so a new kind is one `register` call
plus the miner's code for it. The built-in kinds, defined at the end of this module, are the image
kinds `inference` (text-to-image), `edit`, `img2img` and `inpaint` (one per public API `task`,
`image_inputs.TASK_KINDS`; all on the miner's inference lane) and `training` (a LoRA).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from dippy_studio.orchestrator.audit import HELDOUT_KEY, audit_inference_job, audit_training_job
from dippy_studio.orchestrator.errors import InvalidRequest
from dippy_studio.orchestrator.image_inputs import check_sha256, store_inputs, task_inputs
from dippy_studio.orchestrator.results import check_image, check_lora, check_lora_fit, lora_id_for
from dippy_studio.orchestrator.schemas import MIN_DEADLINE_S, ImageRequest, LoraInput, TrainingRequest
from dippy_studio.orchestrator.scoring import KindWeights, kind_weights
from dippy_studio.protocol.limits import (
    DEFAULT_TARGETS,
    IMAGE_TASKS,
    MAX_SEED,
    STRENGTH_TASKS,
    profile_limits,
    task_inputs_problem,
    training_defaults,
)
from dippy_studio.protocol.schemas import InferenceJob, InputDownload, LoraDownload, TrainJob

if TYPE_CHECKING:
    from dippy_studio.orchestrator.audit import AuditContext, AuditOutcome
    from dippy_studio.orchestrator.blobs import BlobStore
    from dippy_studio.orchestrator.models import ApiKey, Job
    from dippy_studio.orchestrator.settings import OrchestratorSettings
    from dippy_studio.orchestrator.store import Store

# What the engine's training accepts as a trigger word (one line, no tabs or brackets).
_TRIGGER = re.compile(r"^[^\t\r\n\[\]]+$")


class SubmitContext(Protocol):
    """What a kind may use while it builds a job's payload (the orchestrator service)."""

    settings: OrchestratorSettings
    store: Store
    assets: BlobStore
    heldout: BlobStore

    @property
    def audits_on(self) -> bool: ...

    def fetch(self, url: str, max_bytes: int, what: str) -> bytes: ...


@dataclass(frozen=True)
class JobKindSpec:
    """One kind of job. Functions take the job (`models.Job`) whose `payload` they built."""

    name: str  # stored in `jobs.kind`, sent back by miners in their JobView
    lane: str  # the miner's capacity lane that serves it (`protocol.schemas.Capacity`)
    miner_path: str  # where the miner takes it: a signed POST of `miner_request(...)`
    # Its share of a miner's score (`scoring.score_window`), from the settings (`scoring.kind_weights`).
    score_weight: Callable[[OrchestratorSettings], float]
    # Seconds: the client's deadline when it gives none, and one miner's time before the sweeper
    # takes the job back.
    default_deadline_s: Callable[[OrchestratorSettings], float]
    attempt_timeout_s: Callable[[OrchestratorSettings], float]
    # The client's request (validated as `request_model`) -> the job's payload. `blocking(request)`
    # says it fetches or stores something: then it runs on a worker thread, after admission.
    request_model: type[BaseModel]
    build_payload: Callable[[SubmitContext, ApiKey, Any, datetime], dict[str, Any]]
    # The wire request for the current attempt: `common` holds job_id, callback_url and deadline.
    miner_request: Callable[[Job, Mapping[str, Any], Callable[[str], str]], BaseModel]
    # Why the miner's result is not acceptable for this job, or None; `errors.Unavailable` when it
    # cannot be checked now (nothing is judged: the miner is asked to send it again).
    check_result: Callable[[Job, bytes, OrchestratorSettings], str | None]
    # A check that takes well under a millisecond on a small result (decoding a PNG) runs on the
    # event loop, saving a thread hop per callback; any other (a LoRA's waits on the model-code
    # process) runs on a worker thread, so the loop never waits for it.
    quick_check: bool = False
    # The most bytes a result for this job can take: a callback declaring more is refused before
    # its body is read.
    max_result_bytes: Callable[[Job, OrchestratorSettings], int] = lambda job, settings: settings.max_result_bytes
    blocking: Callable[[Any], bool] = lambda request: False
    media_type: str = "application/octet-stream"
    filename: str = "result.bin"
    # Results are private to the client, except where later jobs send them to miners (LoRAs).
    shared_result: bool = False
    # A `Prefer: wait` answer carries the result inline (small results: images).
    inline_result: bool = False
    # Re-run or measure the job on a trusted reference (`audit.AuditQueue`); None: never audited.
    audit: Callable[[AuditContext, Job], AuditOutcome] | None = None
    # What a success registers for the client besides its result: a LoRA row (`Store.succeed`).
    registers: Callable[[Job, str], Mapping[str, Any]] | None = None
    # What a client sees of the payload in the request's status.
    public_input: Callable[[Mapping[str, Any]], dict[str, Any]] = dict
    # The image task the miner's lane must list in its capacity (`Capacity.tasks`); None: any.
    task: str | None = None
    # The dashboard: what it calls the kind, and whether results go in the image gallery.
    label: str = ""
    gallery: bool = False


_REGISTRY: dict[str, JobKindSpec] = {}


class UnknownKind(LookupError):
    """No job kind of this name is registered."""


def register(spec: JobKindSpec) -> JobKindSpec:
    """Add a kind (or replace one of the same name); returns it."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> JobKindSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownKind(f"no job kind {name!r}") from None


def all_kinds() -> list[JobKindSpec]:
    return list(_REGISTRY.values())


def score_weights(settings: OrchestratorSettings) -> dict[str, float]:
    """Each registered kind's weight in a score under these settings."""
    return {spec.name: spec.score_weight(settings) for spec in _REGISTRY.values()}


def weights_of(settings: OrchestratorSettings) -> KindWeights:
    return kind_weights(settings.training_weight, settings.inference_weight, settings.edit_share)


def deadline_after(now: datetime, requested_s: float | None, default_s: float, cap_s: float) -> datetime:
    """The client's deadline: `requested_s` from now (the kind's default when None), at most `cap_s`."""
    seconds = requested_s if requested_s is not None else default_s
    if seconds < MIN_DEADLINE_S:
        raise InvalidRequest(f"deadline_s {seconds:g} is under the {MIN_DEADLINE_S:g}s minimum")
    if seconds > cap_s:
        raise InvalidRequest(f"deadline_s {seconds:g} is over the {cap_s:g}s maximum")
    return now + timedelta(seconds=seconds)


def new_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


# ---- image kinds: inference (text-to-image), edit, img2img, inpaint -----------------------------


def _image_payload(ctx: SubmitContext, key: ApiKey, body: ImageRequest, now: datetime, *, task: str) -> dict[str, Any]:
    """The payload of the image kind that runs `task` (`image_inputs.TASK_KINDS`)."""
    # The model the request names, resolved by the service (`Orchestrator.submit`) to one served.
    model = body.model or ctx.settings.profile
    limits = profile_limits(model)
    if body.task != task:
        raise InvalidRequest(f"a {body.task} request is not a {task} job")
    # The cheap checks first: nothing is fetched or decoded for a request refused anyway.
    problem = limits.task_problem(task) or task_inputs_problem(
        task,
        body.image is not None or body.upload("image") is not None,
        body.mask is not None or body.upload("mask") is not None,
        body.strength is not None,
    )
    if problem is None and task not in IMAGE_TASKS and (body.image_sha256 or body.mask_sha256):
        problem = f"task {task} takes no input image, so no image_sha256 or mask_sha256"
    if problem is not None:
        raise InvalidRequest(problem)
    if (body.width is None) != (body.height is None):
        raise InvalidRequest("give both width and height, or neither")
    if task not in IMAGE_TASKS and body.width is None:
        raise InvalidRequest(f"task {task} needs width and height")
    steps = body.steps if body.steps is not None else limits.default_steps
    if body.width is not None and body.height is not None:
        problem = limits.image_problem(body.width, body.height, steps, task)
        if problem is not None:
            raise InvalidRequest(problem)
    loras = [_resolve_lora(ctx, key, lora, model) for lora in body.loras]
    inputs = store_inputs(ctx, body, limits) if task in IMAGE_TASKS else None
    width, height = body.width, body.height
    if width is None or height is None:
        assert inputs is not None  # the image tasks, checked above
        width, height = limits.output_size(*inputs.size)
        problem = limits.image_problem(width, height, steps, task)
        if problem is not None:
            raise InvalidRequest(f"the output size follows the image: {problem}")
    payload: dict[str, Any] = {
        "prompt": body.prompt,
        "seed": body.seed if body.seed is not None else new_seed(),
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": body.guidance if body.guidance is not None else limits.default_guidance,
        "loras": loras,
    }
    if inputs is None:
        return payload  # text-to-image: the payload it always had
    payload.update(task=task, image_sha256=inputs.image_sha256)
    if inputs.mask_sha256 is not None:
        payload["mask_sha256"] = inputs.mask_sha256
    if task in STRENGTH_TASKS:
        # Explicit, so miners cannot differ on defaults.
        payload["strength"] = body.strength if body.strength is not None else limits.default_strength
    return payload


def _resolve_lora(ctx: SubmitContext, key: ApiKey, lora: LoraInput, model: str) -> dict[str, Any]:
    if lora.id is not None:
        found = ctx.store.get_lora(lora.id, key.id)
        if found is None:
            raise InvalidRequest(f"no LoRA {lora.id} for this API key")
        if found.model != model:
            # A LoRA's tensors are shaped for its model's layers; on another model it cannot load.
            raise InvalidRequest(
                f"LoRA {lora.id} was trained for model {found.model}; this request is for model {model}"
            )
        return {"id": lora.id, "sha256": found.sha256, "scale": lora.scale}
    assert lora.url is not None
    data = ctx.fetch(lora.url, ctx.settings.max_lora_bytes, "LoRA")
    sha256 = check_sha256(data, lora.sha256, f"the LoRA at {lora.url}")
    # Checked here, as a miner's engine would: a LoRA that cannot work is the client's to fix, and
    # must not fail on miners as if they were at fault.
    model_path = ctx.settings.audit_model_path if model == ctx.settings.profile else None
    problem = check_lora_fit(data, model, model_path, time_limit=ctx.settings.lora_check_timeout_s)
    if problem is not None:
        raise InvalidRequest(f"the LoRA at {lora.url} is not usable with model {model}: {problem}")
    ctx.assets.put(data)  # idempotent: a LoRA fetched before is not stored again
    return {"url": lora.url, "sha256": sha256, "scale": lora.scale}


def _image_request(job: Job, common: Mapping[str, Any], blob_url: Callable[[str], str]) -> InferenceJob:
    payload = job.payload
    loras = [
        LoraDownload(url=blob_url(lora["sha256"]), sha256=lora["sha256"], scale=lora["scale"])
        for lora in payload.get("loras", [])
    ]
    fields = {k: payload[k] for k in ("prompt", "seed", "width", "height", "steps", "guidance")}
    # The image tasks' inputs, as blobs miners download like LoRAs.
    inputs = task_inputs(payload, lambda sha256: InputDownload(url=blob_url(sha256), sha256=sha256))
    return InferenceJob(**common, **fields, loras=loras, **inputs)


def largest_png(width: int, height: int) -> int:
    """An upper bound on a PNG of this size: 16-bit RGBA stored uncompressed (8 bytes a pixel and
    a filter byte a row), with room for zlib's and the chunks' framing and some metadata."""
    raw = height * (1 + 8 * width)
    return raw + raw // 100 + (64 << 10)


def _image_kind(name: str, task: str, label: str, weight: Callable[[KindWeights], float]) -> JobKindSpec:
    """An image kind: runs on the miner's inference lane, checked and audited the same way."""
    return JobKindSpec(
        name=name,
        lane="inference",
        miner_path="/v1/inference",
        score_weight=lambda settings: weight(weights_of(settings)),
        default_deadline_s=lambda settings: settings.inference_deadline_s,
        attempt_timeout_s=lambda settings: settings.inference_attempt_timeout_s,
        request_model=ImageRequest,
        build_payload=functools.partial(_image_payload, task=task),
        # Input images are fetched or decoded and stored: off the event loop and the writer.
        blocking=(lambda body: True)
        if task in IMAGE_TASKS
        else (lambda body: any(lora.url is not None for lora in body.loras)),
        miner_request=_image_request,
        check_result=lambda job, data, settings: check_image(data, job.payload["width"], job.payload["height"]),
        quick_check=True,
        max_result_bytes=lambda job, settings: min(
            settings.max_result_bytes, largest_png(job.payload["width"], job.payload["height"])
        ),
        media_type="image/png",
        filename="result.png",
        inline_result=True,
        audit=audit_inference_job,
        label=label,
        gallery=True,
        task=task,
    )


INFERENCE = register(_image_kind("inference", "generate", "text-to-image", lambda w: w.generate))
EDIT = register(_image_kind("edit", "edit", "image edit", lambda w: w.edit))
IMG2IMG = register(_image_kind("img2img", "img2img", "image-to-image", lambda w: w.edit))
INPAINT = register(_image_kind("inpaint", "inpaint", "inpainting", lambda w: w.edit))


# ---- training: a LoRA --------------------------------------------------------------------------


def _training_payload(ctx: SubmitContext, key: ApiKey, body: TrainingRequest, now: datetime) -> dict[str, Any]:
    # Imported here: dataset handling reads images (PIL), which only training submissions need.
    from dippy_studio.engine.datasets import DatasetLimits, dataset_zip, load_zip_bytes, split_dataset
    from dippy_studio.engine.errors import DatasetError

    settings = ctx.settings
    model = body.model or settings.profile
    trigger_word = body.trigger_word.strip()
    if not _TRIGGER.match(trigger_word):
        raise InvalidRequest("trigger_word must be one line of text without tabs or brackets")
    dataset = body.dataset
    if dataset is None:
        assert body.dataset_url is not None
        dataset = ctx.fetch(body.dataset_url, settings.max_dataset_bytes, "dataset")
    try:
        limits = DatasetLimits(max_total_bytes=settings.max_dataset_bytes)
        uploaded = load_zip_bytes(dataset, limits, source="the dataset")
    except DatasetError as exc:
        raise InvalidRequest(str(exc)) from None
    held: dict[str, Any] = {}
    # Split whenever audits are on, not only for jobs that will be audited: the miner must not
    # learn from its dataset whether its result will be checked.
    split = (
        split_dataset(uploaded, settings.audit_heldout_share, settings.audit_heldout_min_images)
        if ctx.audits_on
        else None
    )
    if split is not None:
        dataset = dataset_zip(split.train)
        held = {HELDOUT_KEY: ctx.heldout.put(dataset_zip(split.heldout)), "heldout_images": len(split.heldout)}
    options = {"alpha": body.alpha, "lr": body.lr, "seed": body.seed, "max_seconds": body.max_seconds}
    return {
        # What the miner downloads: the training part when the upload was split.
        "dataset_sha256": ctx.assets.put(dataset),
        **held,
        "trigger_word": trigger_word,
        "name": (body.name or "").strip() or trigger_word,
        **{k: v for k, v in options.items() if v is not None},
        # The promise the result is checked against: explicit, so miners cannot differ on defaults.
        "rank": body.rank or training_defaults(model)["rank"],
        # Explicit too: the steps a client is metered for (`usage`) are the steps miners are asked for.
        "steps": body.steps or training_defaults(model)["steps"],
        "targets": list(DEFAULT_TARGETS),
    }


def _training_request(job: Job, common: Mapping[str, Any], blob_url: Callable[[str], str]) -> TrainJob:
    payload = job.payload
    names = ("trigger_word", "rank", "alpha", "steps", "lr", "seed", "max_seconds")
    fields = {k: payload[k] for k in names if payload.get(k) is not None}
    return TrainJob(
        **common, **fields, dataset_url=blob_url(payload["dataset_sha256"]), dataset_sha256=payload["dataset_sha256"]
    )


def _training_public_input(payload: Mapping[str, Any]) -> dict[str, Any]:
    # Internal to audits; `heldout_images` tells the client how many of its images were kept back.
    return {k: v for k, v in payload.items() if k not in ("targets", HELDOUT_KEY)}


def _training_lora(job: Job, sha256: str) -> dict[str, Any]:
    # The id follows from the request, so a retried callback cannot register two.
    return {
        "id": lora_id_for(job.id),
        "api_key_id": job.api_key_id,
        "name": job.payload.get("name") or lora_id_for(job.id),
        "sha256": sha256,
        "rank": int(job.payload["rank"]),
        "trigger_word": job.payload.get("trigger_word") or "",
        "source_job_id": job.id,
    }


TRAINING = register(
    JobKindSpec(
        name="training",
        lane="training",
        miner_path="/v1/train",
        score_weight=lambda settings: weights_of(settings).training,
        default_deadline_s=lambda settings: settings.training_deadline_s,
        attempt_timeout_s=lambda settings: settings.training_attempt_timeout_s,
        request_model=TrainingRequest,
        build_payload=_training_payload,
        blocking=lambda body: True,
        miner_request=_training_request,
        check_result=lambda job, data, settings: check_lora(
            data, int(job.payload["rank"]), job.payload["targets"], time_limit=settings.lora_check_timeout_s
        ),
        filename="lora.safetensors",
        shared_result=True,
        audit=audit_training_job,
        registers=_training_lora,
        public_input=_training_public_input,
        label="LoRA training",
    )
)
