"""What each lane does with a job: inference renders a PNG; training produces a LoRA."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef
from dippy_studio.miner.net import DownloadCache
from dippy_studio.miner.store import JobRecord
from dippy_studio.miner.workers import AbortCheck, Outcome
from dippy_studio.protocol.schemas import InferenceJob, TrainJob


def generation_request(job: InferenceJob, loras: list[LoraRef] | None = None) -> GenerationRequest:
    """The engine request for a wire job (LoRAs resolved to local files by the caller)."""
    return GenerationRequest(
        prompt=job.prompt,
        seed=job.seed,
        width=job.width,
        height=job.height,
        steps=job.steps,
        guidance=job.guidance,
        loras=loras or [],
    )


class InferenceRunner:
    def __init__(
        self, engine: Engine, downloads: DownloadCache, results_dir: Path, max_lora_bytes: int, cheat_rate: float = 0.0
    ) -> None:
        self.engine = engine
        self.cheat_rate = cheat_rate
        self.downloads = downloads
        self.results_dir = results_dir
        self.max_lora_bytes = max_lora_bytes
        results_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: JobRecord, check: AbortCheck) -> Outcome:
        job = InferenceJob.model_validate(record.request)
        loras = []
        for lora in job.loras:
            path = self.downloads.fetch(lora.url, lora.sha256, self.max_lora_bytes)
            loras.append(LoraRef(path=path, scale=lora.scale))
            check()
        if self.cheat_rate and secrets.SystemRandom().random() < self.cheat_rate:
            job = job.model_copy(update={"seed": (job.seed + 1) % 2**63})  # the demo's dishonest miner
        result = self.engine.generate(generation_request(job, loras), on_step=lambda done, total: check())
        path = self.results_dir / f"{record.job_id}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(result.png)
        tmp.replace(path)
        return Outcome(
            result_path=str(path),
            sha256=result.sha256,
            size=len(result.png),
            fingerprint=result.fingerprint,
            timings=result.timings.as_dict(),
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
    ) -> None:
        self.options = options
        self.cheat_rate = cheat_rate
        self.downloads = downloads
        self.results_dir = results_dir
        self.max_dataset_bytes = max_dataset_bytes
        results_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, record: JobRecord, check: AbortCheck) -> Outcome:
        # Imported here: training pulls in PEFT and the optimizer only when a job needs them.
        from dippy_studio.engine.datasets import DatasetLimits, load_dataset
        from dippy_studio.engine.training import TrainConfig, train_lora

        job = TrainJob.model_validate(record.request)
        archive = self.downloads.fetch(job.dataset_url, job.dataset_sha256, self.max_dataset_bytes)
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
        result = train_lora(
            dataset, output, config, options=self.options, max_seconds=budget, on_progress=lambda _: check()
        )
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
