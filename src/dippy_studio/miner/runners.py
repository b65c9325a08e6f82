"""What each lane does with a job: inference renders a PNG; training produces a LoRA."""

from __future__ import annotations

from pathlib import Path

from dippy_studio.engine import Engine, GenerationRequest, LoraRef
from dippy_studio.miner.net import DownloadCache
from dippy_studio.miner.store import JobRecord
from dippy_studio.miner.workers import AbortCheck, Outcome
from dippy_studio.protocol.schemas import InferenceJob


class InferenceRunner:
    def __init__(self, engine: Engine, downloads: DownloadCache, results_dir: Path, max_lora_bytes: int) -> None:
        self.engine = engine
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
        request = GenerationRequest(
            prompt=job.prompt,
            seed=job.seed,
            width=job.width,
            height=job.height,
            steps=job.steps,
            guidance=job.guidance,
            loras=loras,
        )
        result = self.engine.generate(request, on_step=lambda done, total: check())
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
