"""What each lane does with a job: inference renders a PNG; training produces a LoRA."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from time import perf_counter
from typing import Protocol

from PIL import Image

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef, RequestError
from dippy_studio.miner.net import DownloadCache, DownloadRejected
from dippy_studio.miner.store import JobRecord
from dippy_studio.miner.workers import AbortCheck, BadInput, Outcome
from dippy_studio.protocol.images import InputImageError, canonical_png, read_input_image
from dippy_studio.protocol.limits import IMAGE_TASKS, MAX_SEED
from dippy_studio.protocol.schemas import InferenceJob, InputDownload, TrainJob


def generation_request(
    job: InferenceJob,
    loras: list[LoraRef] | None = None,
    image: bytes | None = None,
    mask: bytes | None = None,
) -> GenerationRequest:
    """The engine request for a wire job (LoRAs resolved to local files, and the input image and
    mask fetched, by the caller)."""
    return GenerationRequest(
        task=job.task,
        prompt=job.prompt,
        seed=job.seed,
        width=job.width,
        height=job.height,
        steps=job.steps,
        guidance=job.guidance,
        loras=loras or [],
        image=image,
        mask=mask,
        strength=job.strength,
    )


class Cheat(StrEnum):
    """How the demo's dishonest miner fakes an inference job to save work."""

    shifted_seed = "shifted_seed"  # text-to-image with the next seed
    ignored_input = "ignored_input"  # an image task rendered as text-to-image of its prompt
    returned_input = "returned_input"  # an image task answered with its input, resized


class Rolls(Protocol):
    def random(self) -> float: ...


class ProgressSink(Protocol):
    """Where a runner reports a job's steps (`progress.ProgressReporter`); it must return at once."""

    def report(
        self, record: JobRecord, step: int, total: int, loss: float | None = None, eta_s: float | None = None
    ) -> None: ...


def step_reporter(record: JobRecord, check: AbortCheck, sink: ProgressSink | None) -> Callable[[int, int], None]:
    """The engine's `on_step` for a job: the abort check at every denoising step, and the step
    reported with an estimate of the time left (from the pace of the steps so far)."""
    started = perf_counter()

    def on_step(done: int, total: int) -> None:
        check()
        if sink is not None:
            eta = (perf_counter() - started) / done * (total - done) if done > 0 else None
            sink.report(record, done, total, eta_s=eta)

    return on_step


def pick_cheat(task: str, tasks: Sequence[str], cheat_rate: float, rolls: Rolls) -> Cheat | None:
    """Whether to cheat on a job of `task`, and how: image tasks split their cheats evenly between
    ignoring the input and returning it (a profile without text-to-image can only return it)."""
    if not cheat_rate or rolls.random() >= cheat_rate:
        return None
    if task not in IMAGE_TASKS:
        return Cheat.shifted_seed
    if "generate" in tasks and rolls.random() < 0.5:
        return Cheat.ignored_input
    return Cheat.returned_input


def resized_input(image: bytes, width: int, height: int, max_pixels: int) -> bytes:
    """The input image at the output size, as a PNG: what a miner returning its input sends."""
    pixels = read_input_image(image, max_pixels, "input image")
    return canonical_png(pixels.resize((width, height), Image.Resampling.LANCZOS))


class InferenceRunner:
    """Renders an image job on the engine. The input image and mask are fetched through the
    download cache, verified by sha256; one that does not verify or cannot be read fails the job
    as the sender's (`BadInput`), since the sender chose and hashed it."""

    def __init__(
        self,
        engine: Engine,
        downloads: DownloadCache,
        results_dir: Path,
        max_lora_bytes: int,
        cheat_rate: float = 0.0,
        max_input_image_bytes: int = 32 << 20,
        rolls: Rolls | None = None,
        progress: ProgressSink | None = None,
    ) -> None:
        self.engine = engine
        self.progress = progress
        self.cheat_rate = cheat_rate
        self.rolls: Rolls = rolls or secrets.SystemRandom()
        self.downloads = downloads
        self.results_dir = results_dir
        self.max_lora_bytes = max_lora_bytes
        self.max_input_image_bytes = max_input_image_bytes
        results_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: JobRecord, check: AbortCheck) -> Outcome:
        job = InferenceJob.model_validate(record.request)
        loras = []
        for lora in job.loras:
            path = self.downloads.fetch(lora.url, lora.sha256, self.max_lora_bytes, check)
            loras.append(LoraRef(path=path, scale=lora.scale))
            check()
        image = self._input(job.image, "input image", check)
        mask = self._input(job.mask, "mask", check)
        check()
        cheat = pick_cheat(job.task, self.engine.tasks, self.cheat_rate, self.rolls)
        if cheat == Cheat.returned_input and image is not None:
            return self._returned_input(record.job_id, job, image)
        if cheat == Cheat.shifted_seed:
            job = job.model_copy(update={"seed": (job.seed + 1) % (MAX_SEED + 1)})
        request = generation_request(job, loras, image, mask)
        if cheat == Cheat.ignored_input:
            request = request.model_copy(update={"task": "generate", "image": None, "mask": None, "strength": None})
        try:
            result = self.engine.generate(request, on_step=step_reporter(record, check, self.progress))
        except (RequestError, InputImageError) as exc:
            # Checked against the profile at submission; what is left to refuse is the input.
            raise BadInput(str(exc)) from None
        return Outcome(
            result_path=str(self._save(record.job_id, result.png)),
            sha256=result.sha256,
            size=len(result.png),
            fingerprint=result.fingerprint,
            timings=result.timings.as_dict(),
        )

    def _input(self, download: InputDownload | None, what: str, check: AbortCheck) -> bytes | None:
        if download is None:
            return None
        try:
            path = self.downloads.fetch(download.url, download.sha256, self.max_input_image_bytes, check)
        except DownloadRejected as exc:
            raise BadInput(f"the {what}: {exc}") from None
        return path.read_bytes()

    def _save(self, job_id: str, png: bytes) -> Path:
        path = self.results_dir / f"{job_id}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        tmp.replace(path)
        return path

    def _returned_input(self, job_id: str, job: InferenceJob, image: bytes) -> Outcome:
        started = perf_counter()
        try:
            png = resized_input(image, job.width, job.height, self.engine.spec.max_input_pixels)
        except InputImageError as exc:
            raise BadInput(str(exc)) from None
        encode = perf_counter() - started
        # Claims the engine's fingerprint and the stages of a real run, as a dishonest miner would.
        timings = {"load": 0.0, "text_encode": 0.0, "denoise": 0.0, "decode": 0.0, "encode": encode, "total": encode}
        return Outcome(
            result_path=str(self._save(job_id, png)),
            sha256=hashlib.sha256(png).hexdigest(),
            size=len(png),
            fingerprint=self.engine.fingerprint,
            timings=timings,
        )


class TrainingRunner:
    """Downloads the dataset (verified by sha256), trains a LoRA on this miner's profile, and
    returns the .safetensors. The time budget is the job's max_seconds, cut short so the
    LoRA is written before the deadline."""

    # Seconds kept back from the deadline for writing the LoRA and calling back.
    DEADLINE_MARGIN = 5.0
    # The demo's dishonest miner gives itself no time: train_lora starts no step and writes the
    # LoRA as initialised (lora_B = 0), of the promised shape but changing nothing.
    CHEAT_BUDGET_S = 1e-9

    def __init__(
        self,
        options: EngineOptions,
        downloads: DownloadCache,
        results_dir: Path,
        max_dataset_bytes: int,
        cheat_rate: float = 0.0,
        progress: ProgressSink | None = None,
    ) -> None:
        self.options = options
        self.progress = progress
        self.cheat_rate = cheat_rate
        self.downloads = downloads
        self.results_dir = results_dir
        self.max_dataset_bytes = max_dataset_bytes
        results_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: JobRecord, check: AbortCheck) -> Outcome:
        # Imported here: training pulls in PEFT and the optimizer only when a job needs them.
        from dippy_studio.engine.datasets import DatasetLimits, load_dataset
        from dippy_studio.engine.training import TrainConfig, TrainProgress, train_lora

        job = TrainJob.model_validate(record.request)
        archive = self.downloads.fetch(job.dataset_url, job.dataset_sha256, self.max_dataset_bytes, check)
        check()
        limits = DatasetLimits(max_total_bytes=self.max_dataset_bytes)
        dataset = load_dataset(archive, limits, name=f"dataset {job.dataset_sha256[:12]}")
        config = TrainConfig(
            profile=self.options.profile,
            trigger=job.trigger_word,
            rank=job.rank,
            alpha=job.alpha,
            steps=job.steps,
            lr=job.lr,
            seed=job.seed,
        )
        budget = record.deadline - time.time() - self.DEADLINE_MARGIN
        if job.max_seconds is not None:
            budget = min(budget, job.max_seconds)
        if budget <= 0:
            check()  # reports the deadline if it has passed
            budget = 1.0
        if self.cheat_rate and secrets.SystemRandom().random() < self.cheat_rate:
            budget = self.CHEAT_BUDGET_S
        output = self.results_dir / f"{record.job_id}.safetensors"
        sink = self.progress

        def on_progress(progress: TrainProgress) -> None:
            check()
            if sink is not None:
                sink.report(record, progress.step, progress.total, progress.loss, progress.eta)

        result = train_lora(dataset, output, config, options=self.options, max_seconds=budget, on_progress=on_progress)
        return Outcome(
            result_path=str(output),
            sha256=result.sha256,
            size=output.stat().st_size,
            fingerprint=result.metadata.get("dippy.fingerprint"),
            timings={"train": result.train_seconds, "cache": result.cache_seconds, "total": result.seconds},
            metrics={
                "steps": result.steps,
                "planned_steps": result.planned_steps,
                "stopped_early": result.stopped_early,
                "final_loss": result.final_loss,
                "steps_per_second": result.steps_per_second,
                "rank": config.rank,
                "alpha": config.alpha,
                "targets": list(config.targets),
                "dataset_sha256": dataset.sha256,
            },
        )
