"""Audits by re-run: which finished jobs to check, the verdicts, and the penalty for failing one.

Four parts, each usable alone:

- `AuditSampler` decides, with a CSPRNG, whether a job that just finished is audited.
- `inference_verdict` and `training_verdict` are pure functions from results to a `Verdict`.
- `Auditor` re-runs a job on a reference (an in-process engine, or a reference worker: see
  references.py) and applies the verdicts, returning the evidence an `Audit` row keeps.
- `penalty_until` is the pure rule for how long failed audits zero a miner's score.

Audit traffic looks like client traffic because there is no audit traffic: the sampler is
asked only after a client job has finished, and the re-run happens on the orchestrator's own
engine or on a reference worker (a trusted miner that gets no client jobs), never on the miner
under audit. Nothing a miner sees depends on whether its job will be audited, so it cannot
behave well only when watched.

Verdicts for inference: when the miner's profile fingerprint is one the auditor can reproduce,
the PNG bytes must be equal (sha256). Otherwise the images are compared (engine/compare.py)
against thresholds measured on honest cross-profile pairs and on cheats
(bench/measure_audit_thresholds.py). A miner cannot escape the exact check by claiming an
unknown fingerprint: every cheat we know of fails the perceptual thresholds too.

Verdicts for training: the LoRA must load, have the promised rank on the promised layers, and
lower the flow-matching loss on held-out images by `Thresholds.min_improvement`. The held-out
images are part of the client's upload that the orchestrator kept from the miner
(`engine.datasets.split_dataset`), so a LoRA cannot be fitted to them, and a LoRA that was not
trained (initial weights, random weights) does not lower their loss.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dippy_studio.orchestrator.image_inputs import task_inputs

if TYPE_CHECKING:
    from typing import TypeGuard

    from dippy_studio.engine.datasets import Dataset
    from dippy_studio.engine.evaluation import LoraEvaluation
    from dippy_studio.engine.generation import Engine, GenerationRequest, GenerationResult
    from dippy_studio.orchestrator.blobs import BlobStore
    from dippy_studio.orchestrator.models import Job
    from dippy_studio.orchestrator.references import ReferenceWorker, WorkerResult


# ---------------------------------------------------------------------------------------------
# Thresholds


# The thread counts an auditor tries to match a miner's fingerprint with (EngineOptions' bound):
# one hash each, no generation.
MAX_THREADS = 256


@dataclass(frozen=True)
class Thresholds:
    """Where an audit across profiles, and a training audit, draws the line.

    Measured by bench/measure_audit_thresholds.py on the built-in profiles (tiny at 32-128 px,
    small at 64-256 px; numbers in bench/README.md). Honest drifts (1 vs 2 threads, AVX2 vs
    AVX-512) change at most 1/255 on a few pixels: 1 - SSIM <= 7e-8 and pHash distance 0. The
    closest cheats (one step fewer, one prompt word changed) have 1 - SSIM >= 3e-4, because
    models with random weights barely move away from the seed's noise. The SSIM line sits at
    1e-5, two orders of magnitude from the honest drift and over 30x from the closest cheat.
    pHash cannot see those subtle cheats (0-6 bits); it backs SSIM up against gross ones (a
    replay or another seed: 18+ bits).

    bfloat16 drifts as far as the subtle cheats (1 - SSIM 8e-4 to 4e-2), so no threshold can
    pass it and fail them: a dtype is a different reference profile, audited on its own
    engine. Real Flux models drift differently across GPUs: measure them before trusting these.
    """

    min_ssim: float = 0.99999
    max_phash_distance: int = 4  # of 64 bits
    # Training: the LoRA must lower held-out loss by at least this share to count as trained.
    min_improvement: float = 0.05


DEFAULT_THRESHOLDS = Thresholds()

# The training job payload key naming the held-out part of its dataset (an archive in the
# orchestrator's private blob store). Miners never see it: dispatch sends named fields only.
HELDOUT_KEY = "heldout_sha256"


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass(frozen=True)
class Verdict:
    """The outcome of one audit. `conclusive` False means the reference could not judge (not
    the miner's fault): such a verdict neither passes nor fails anyone."""

    passed: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    conclusive: bool = True

    @property
    def label(self) -> Literal["pass", "fail", "inconclusive"]:
        """The `Audit.verdict` column value."""
        if not self.conclusive:
            return "inconclusive"
        return "pass" if self.passed else "fail"


class Sized(Protocol):
    """Anything with the requested image size (a GenerationRequest, a wire InferenceJob)."""

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


def inference_verdict(
    reference_png: bytes,
    reference_fingerprint: str,
    miner_png: bytes | None,
    miner_sha256: str | None,
    miner_fingerprint: str | None,
    request: Sized,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> Verdict:
    """Judge a miner's image against the reference engine's image for the same request.

    Fails when there is no image, when its bytes do not hash to the claimed sha256, when it
    does not decode or is not the requested size; on the reference's own fingerprint when the
    bytes differ at all; on another fingerprint when SSIM or pHash distance is past threshold.
    """
    # Imported here: scoring and the service import this module for penalties and sampling,
    # and need not load the image libraries for that.
    from dippy_studio.engine.compare import ComparisonError, compare_images, decode_png

    reference_sha = hashlib.sha256(reference_png).hexdigest()
    metrics: dict[str, Any] = {"reference_sha256": reference_sha, "miner_claimed_sha256": miner_sha256}
    if not miner_png:
        return Verdict(False, "no image", metrics)
    actual_sha = hashlib.sha256(miner_png).hexdigest()
    metrics["miner_sha256"] = actual_sha
    if miner_sha256 is not None and miner_sha256.lower() != actual_sha:
        return Verdict(False, "the image bytes do not match the sha256 the miner reported", metrics)
    try:
        candidate = decode_png(miner_png)
    except ComparisonError as exc:
        return Verdict(False, f"the image does not decode: {exc}", metrics)
    metrics["miner_size"] = list(candidate.size)
    if candidate.size != (request.width, request.height):
        return Verdict(False, f"wrong size {candidate.size}, requested {(request.width, request.height)}", metrics)
    try:
        reference = decode_png(reference_png)
    except ComparisonError as exc:  # our own engine's output: a bug here, not the miner's
        return Verdict(False, f"the reference image does not decode: {exc}", metrics, conclusive=False)
    if reference.size != candidate.size:
        return Verdict(False, f"the reference is {reference.size}, not the requested size", metrics, conclusive=False)

    same_profile = miner_fingerprint is not None and miner_fingerprint == reference_fingerprint
    metrics["comparison"] = "exact" if same_profile else "perceptual"
    if same_profile and actual_sha == reference_sha:
        metrics["ssim"] = 1.0  # skip decoding work: equal bytes are equal images
        return Verdict(True, "identical to the reference (same profile fingerprint)", metrics)
    try:
        similarity = compare_images(reference, candidate)
    except ComparisonError as exc:
        return Verdict(False, f"cannot compare: {exc}", metrics, conclusive=False)
    metrics.update(
        ssim=similarity.ssim,
        phash_distance=similarity.phash_distance,
        dhash_distance=similarity.dhash_distance,
        max_abs_diff=similarity.max_abs_diff,
        mean_abs_diff=similarity.mean_abs_diff,
        differing_values=similarity.differing_values,
        min_ssim=thresholds.min_ssim,
        max_phash_distance=thresholds.max_phash_distance,
    )
    if same_profile:
        # Equal fingerprints promise equal bytes; any difference means another computation.
        return Verdict(False, "the bytes differ from the reference on the same profile fingerprint", metrics)
    if similarity.ssim < thresholds.min_ssim:
        return Verdict(False, f"SSIM {similarity.ssim:.6f} is below {thresholds.min_ssim}", metrics)
    if similarity.phash_distance > thresholds.max_phash_distance:
        return Verdict(
            False,
            f"perceptual hash distance {similarity.phash_distance} is over {thresholds.max_phash_distance}",
            metrics,
        )
    return Verdict(True, "matches the reference within the cross-profile thresholds", metrics)


_LORA_KEY = re.compile(r"^(transformer|text_encoder)\.(.+)\.(lora_A|lora_B)\.(weight|bias)$")


@dataclass(frozen=True)
class LoraShape:
    """What a LoRA file adapts: the layers (`component.module.path`) and the rank of each."""

    ranks: Mapping[str, int]

    def matching(self, target: str) -> list[str]:
        """Layers a PEFT `target_modules` entry like "to_q" or "attn.to_out.0" selects (by suffix)."""
        return [layer for layer in self.ranks if layer == target or layer.endswith(f".{target}")]


def lora_shape(shapes: Mapping[str, Sequence[int]]) -> LoraShape:
    """The layers and ranks of a diffusers-format LoRA, from its tensor names and shapes.

    Raises ValueError for keys that are not LoRA weights or shapes that are not matrices.
    """
    ranks: dict[str, int] = {}
    inner: dict[str, int] = {}  # the rank each lora_B weight takes
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if not match:
            raise ValueError(f"unexpected tensor {key!r} in a LoRA")
        component, module, which, kind = match.groups()
        if kind != "weight":
            continue
        if len(shape) != 2:
            raise ValueError(f"{key!r} has shape {tuple(shape)}, expected a matrix")
        layer = f"{component}.{module}"
        if which == "lora_A":
            ranks[layer] = int(shape[0])
        else:
            inner[layer] = int(shape[1])
    if not ranks:
        raise ValueError("no lora_A weights: not a LoRA")
    for layer, rank in inner.items():
        if ranks.get(layer) != rank:
            raise ValueError(f"{layer}: lora_B takes rank {rank}, lora_A gives {ranks.get(layer)}")
    return LoraShape(ranks)


def lora_shape_problem(
    shape: LoraShape, promised_rank: int | None, promised_targets: Sequence[str] | None
) -> str | None:
    """Why a LoRA does not have the promised shape, or None when it does.

    The promise is a rank and PEFT target names ("to_q", "attn.to_out.0"): every target must
    select at least one transformer layer, every adapted layer must be selected by a target,
    and every layer must have exactly the promised rank. None skips that part of the check.
    """
    ranks = sorted(set(shape.ranks.values()))
    if promised_rank is not None and ranks != [promised_rank]:
        return f"rank {ranks} instead of the promised {promised_rank}"
    if promised_targets:
        missing = [
            t for t in promised_targets if not any(layer.startswith("transformer.") for layer in shape.matching(t))
        ]
        if missing:
            return f"the LoRA does not adapt the promised layers {missing}"
        chosen = {layer for t in promised_targets for layer in shape.matching(t)}
        extra = sorted(set(shape.ranks) - chosen)
        if extra:
            shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
            return f"the LoRA adapts layers that were not asked for: {shown}"
    return None


def training_verdict(
    evaluation: LoraEvaluation | None,
    shape: LoraShape | None,
    promised_rank: int | None,
    promised_targets: Sequence[str] | None,
    min_improvement: float = DEFAULT_THRESHOLDS.min_improvement,
    load_error: str | None = None,
) -> Verdict:
    """Judge a delivered LoRA: it loads, has the promised rank on exactly the promised
    transformer layers (`lora_shape_problem`), and lowers held-out loss by at least
    `min_improvement` (a share: 0.05 is 5% lower than the base model's).

    `evaluation` is `evaluate_lora`'s result on held-out data the miner never saw; None with
    a good shape means it was not run, and the verdict is inconclusive.
    """
    metrics: dict[str, Any] = {"promised_rank": promised_rank, "promised_targets": list(promised_targets or [])}
    if load_error is not None:
        return Verdict(False, f"the LoRA does not load: {load_error}", metrics)
    if shape is None:
        return Verdict(False, "the LoRA does not load", metrics)
    metrics["layers"] = len(shape.ranks)
    metrics["ranks"] = sorted(set(shape.ranks.values()))
    problem = lora_shape_problem(shape, promised_rank, promised_targets)
    if problem is not None:
        return Verdict(False, problem, metrics)
    if evaluation is None:
        return Verdict(False, "the LoRA was not evaluated", metrics, conclusive=False)
    metrics.update(
        base_loss=evaluation.base_loss,
        lora_loss=evaluation.lora_loss,
        improvement=evaluation.improvement,
        min_improvement=min_improvement,
        lora_sha256=evaluation.lora_sha256,
        dataset_sha256=evaluation.dataset_sha256,
    )
    if not evaluation.improvement >= min_improvement:  # NaN fails too
        return Verdict(
            False,
            f"held-out loss improvement {evaluation.improvement:.1%} is below {min_improvement:.1%}",
            metrics,
        )
    return Verdict(True, f"held-out loss {evaluation.improvement:.1%} lower with the LoRA", metrics)


# ---------------------------------------------------------------------------------------------
# The auditor: re-runs on reference engines


@dataclass(frozen=True)
class AuditOutcome:
    """A verdict with its evidence (JSON-ready, for `Audit.evidence`). The reference image is
    returned apart so the caller can keep it in the blob store beside the miner's image."""

    verdict: Verdict
    evidence: dict[str, Any]
    reference_png: bytes | None = None


class Auditor:
    """Re-runs jobs on trusted references and judges the miners' results.

    `references` are what the orchestrator trusts to re-run inference: in-process engines, or
    reference workers (`references.ReferenceWorker`, trusted miners run by the subnet owner). A
    job whose miner reported a reference's fingerprint is re-run on that reference and must match
    exactly; any other job is re-run on the first one and compared across profiles.

    Training audits measure the LoRA's held-out loss, which needs the model in this process: they
    run on `training_engine` (an engine, or a function that builds one at the first training
    audit), by default the first reference when that is an engine. Engines run one generation at
    a time, so call an Auditor from one worker thread (or keep one per thread).
    """

    def __init__(
        self,
        references: Sequence[Engine | ReferenceWorker],
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        *,
        training_engine: Engine | Callable[[], Engine] | None = None,
    ) -> None:
        if not references:
            raise ValueError("an auditor needs at least one reference")
        self.references = list(references)
        self.primary = references[0]
        self.thresholds = thresholds
        if training_engine is None and not _is_worker(self.primary):
            training_engine = self.primary
        self._training_engine = training_engine

    def reference_for(self, fingerprint: str | None) -> Engine | ReferenceWorker:
        """The reference to re-run a job reported under `fingerprint`: its twin if we have one
        (a worker that cannot be reached has no known fingerprint), or an in-process engine run
        with the miner's thread count when that is all that differs, else the first."""
        from dippy_studio.orchestrator.references import ReferenceUnavailable

        if fingerprint is not None:
            for reference in self.references:
                try:
                    if reference.fingerprint == fingerprint:
                        return reference
                except ReferenceUnavailable:
                    continue
            # Honest engines on different thread counts drift past the perceptual line for
            # img2img and inpainting (bench/README.md, audit thresholds): re-run as the miner ran.
            for reference in self.references:
                if not _is_worker(reference):
                    for threads in range(1, MAX_THREADS + 1):
                        if replace(reference.fingerprint_parts, threads=threads).id == fingerprint:
                            return reference.with_threads(threads)
        return self.primary

    def training_engine(self) -> Engine:
        """The in-process engine training audits run on (built now if it was given as a function)."""
        engine = self._training_engine
        if engine is None:
            raise ValueError("this auditor has no in-process engine for training audits")
        if callable(engine):  # built once, at the first training audit
            engine = self._training_engine = engine()
        return engine

    def audit_inference(
        self,
        request: GenerationRequest,
        miner_png: bytes | None,
        miner_sha256: str | None,
        miner_fingerprint: str | None,
        *,
        lora_sha256: Sequence[str] = (),
    ) -> AuditOutcome:
        """Re-run `request` and judge the miner's result for it. The request's LoRAs are local
        files, for an engine here; `lora_sha256` names each in the orchestrator's blob store, for
        a reference worker, which downloads them from there as miners do."""
        from dippy_studio.engine.errors import EngineError
        from dippy_studio.orchestrator.references import ReferenceUnavailable

        reference = self.reference_for(miner_fingerprint)
        evidence: dict[str, Any] = {
            "kind": "inference",
            "request": _request_evidence(request),
            "miner": {
                "fingerprint": miner_fingerprint,
                "claimed_sha256": miner_sha256,
                "sha256": hashlib.sha256(miner_png).hexdigest() if miner_png else None,
                "bytes": len(miner_png) if miner_png else 0,
            },
        }
        try:
            if _is_worker(reference):
                evidence["reference"] = reference.describe()
                result: GenerationResult | WorkerResult = reference.generate(request, lora_sha256)
            else:
                evidence["reference"] = {"fingerprint": reference.fingerprint, "profile": reference.spec.name}
                result = reference.generate(request)
        except (EngineError, ReferenceUnavailable) as exc:
            # The reference cannot run it (a LoRA file gone, limits of this profile, a reference
            # worker down or failing): no verdict, and never the miner's fault.
            verdict = Verdict(False, f"the reference could not re-run the job: {exc}", conclusive=False)
            return _outcome(verdict, evidence)
        evidence["reference"].update(
            fingerprint=result.fingerprint, sha256=result.sha256, bytes=len(result.png), loras=result.loras
        )
        verdict = inference_verdict(
            result.png, result.fingerprint, miner_png, miner_sha256, miner_fingerprint, request, self.thresholds
        )
        return _outcome(verdict, evidence, result.png)

    def audit_training(
        self,
        lora: Path | None,
        heldout: Dataset | Path | None,
        promised_rank: int | None,
        promised_targets: Sequence[str] | None,
        *,
        trigger: str | None = None,
        seeds: Sequence[int] = (0, 1, 2),
        job: Mapping[str, Any] | None = None,
    ) -> AuditOutcome:
        """Load the miner's LoRA and measure its held-out loss improvement on the primary profile.

        `heldout` holds images of what the client asked for that the miner never saw; `job` is
        the training request as the client sent it, kept in the evidence. Pass the job's trigger
        word: the LoRA's own metadata was written by the miner, who could bend it to flatter the
        LoRA. The loss is measured at the profile's training resolution. Without held-out images
        only the LoRA's loading and shape are judged: a pass there is inconclusive, a failure is not.
        """
        from dippy_studio.engine.errors import DatasetError, LoraError, RequestError
        from dippy_studio.engine.evaluation import evaluate_lora
        from dippy_studio.engine.lora import read_lora
        from dippy_studio.engine.training import TrainConfig

        # In this process even with reference workers: held-out loss needs the model here.
        engine = self.training_engine()
        defaults = TrainConfig(profile=engine.spec.name)

        threshold = self.thresholds.min_improvement
        evidence: dict[str, Any] = {
            "kind": "training",
            "request": dict(job or {}),
            "lora": str(lora) if lora is not None else None,
            "reference": {"fingerprint": engine.fingerprint, "profile": engine.spec.name},
        }
        if lora is None:
            verdict = training_verdict(None, None, promised_rank, promised_targets, threshold, "no LoRA was delivered")
            return _outcome(verdict, evidence)
        shape: LoraShape | None = None
        evaluation: LoraEvaluation | None = None
        load_error: str | None = None
        try:
            lora_file = read_lora(lora)
            evidence["lora_sha256"] = lora_file.sha256
            shape = lora_shape({key: tuple(t.shape) for key, t in _diffusers_keys(lora_file.state_dict).items()})
            # A LoRA of the wrong shape fails without spending an evaluation on it.
            if heldout is not None and lora_shape_problem(shape, promised_rank, promised_targets) is None:
                evaluation = evaluate_lora(
                    engine,
                    lora,
                    heldout,
                    seeds,
                    resolution=defaults.resolution,
                    # Without a trigger word in the job, evaluate_lora falls back on the LoRA's metadata.
                    trigger=trigger,
                    guidance=defaults.guidance,
                )
        except (DatasetError, RequestError) as exc:  # our held-out data or settings, not the miner's LoRA
            verdict = Verdict(False, f"the evaluation could not run: {exc}", conclusive=False)
            return _outcome(verdict, evidence)
        except (LoraError, ValueError) as exc:
            load_error = str(exc)
        if evaluation is not None:
            evidence["evaluation"] = evaluation.as_dict()
        verdict = training_verdict(evaluation, shape, promised_rank, promised_targets, threshold, load_error)
        if heldout is None and not verdict.conclusive:
            verdict = replace(verdict, reason="no held-out images to measure the LoRA on (the dataset was too small)")
        return _outcome(verdict, evidence)


class AuditContext(Protocol):
    """What a job's audit reads: the blob stores and the reference (`auditing.AuditQueue`)."""

    results: BlobStore
    assets: BlobStore
    heldout: BlobStore | None

    def auditor(self, model: str) -> Auditor:
        """The auditor whose references run `model` (the job's)."""
        ...


def unreadable(reason: str) -> AuditOutcome:
    """The inconclusive verdict of an audit that cannot read the job's result or inputs."""
    verdict = Verdict(False, f"the job cannot be judged here: {reason}", conclusive=False)
    return _outcome(verdict, {})


def audit_inference_job(ctx: AuditContext, job: Job) -> AuditOutcome:
    """Re-run an image job (text-to-image or an image task: its input image, mask and strength
    read back from the assets store) on the reference and judge the miner's image."""
    from dippy_studio.engine import GenerationRequest, LoraRef

    assert job.result_blob is not None
    payload = job.payload
    inputs = task_inputs(payload, ctx.assets.get)
    request = GenerationRequest(
        prompt=payload["prompt"],
        seed=payload["seed"],
        width=payload["width"],
        height=payload["height"],
        steps=payload["steps"],
        guidance=payload["guidance"],
        loras=[LoraRef(path=ctx.assets.local_path(lora["sha256"]), scale=lora["scale"]) for lora in payload["loras"]],
        **inputs,
    )
    png = ctx.results.get(job.result_blob)
    lora_sha256 = [lora["sha256"] for lora in payload["loras"]]
    return ctx.auditor(job.model).audit_inference(
        request, png, job.result_sha256, job.fingerprint, lora_sha256=lora_sha256
    )


def audit_training_job(ctx: AuditContext, job: Job) -> AuditOutcome:
    """Measure a training job's LoRA on the held-out part of the client's dataset."""
    assert job.result_blob is not None
    payload = job.payload
    # No held-out part: the dataset was too small to split (or audits were off at submission).
    heldout_sha = payload.get(HELDOUT_KEY)
    heldout = ctx.heldout.local_path(heldout_sha) if heldout_sha and ctx.heldout is not None else None
    return ctx.auditor(job.model).audit_training(
        ctx.assets.local_path(job.result_blob),
        heldout,
        payload["rank"],
        payload["targets"],
        # The client's trigger word, not the one the miner wrote into the LoRA's metadata.
        trigger=payload["trigger_word"],
        job=payload,
    )


def _request_evidence(request: GenerationRequest) -> dict[str, Any]:
    """The re-run request for an audit's evidence: input images by sha256, not their bytes."""
    evidence = request.model_dump(mode="json", exclude={"image", "mask"})
    for name, data in (("image", request.image), ("mask", request.mask)):
        if data is not None:
            evidence[f"{name}_sha256"] = hashlib.sha256(data).hexdigest()
    return evidence


def _diffusers_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The LoRA's tensors under diffusers names: Kohya, ai-toolkit and XLabs files converted as
    `load_lora_weights` converts them, so their shape is judged like that of our own files."""
    from diffusers import FluxPipeline

    try:
        return dict(FluxPipeline.lora_state_dict(dict(state_dict)))
    except Exception as exc:  # diffusers raises assorted types for layouts it cannot read
        raise ValueError(f"not a Flux LoRA diffusers can read: {exc}") from None


def _is_worker(reference: Engine | ReferenceWorker) -> TypeGuard[ReferenceWorker]:
    # Imported here: engines load torch, and this module must load without it (see inference_verdict).
    from dippy_studio.orchestrator.references import ReferenceWorker

    return isinstance(reference, ReferenceWorker)


def _outcome(verdict: Verdict, evidence: Mapping[str, Any], reference_png: bytes | None = None) -> AuditOutcome:
    """The verdict with its evidence, the verdict itself included (as `Audit.evidence` keeps it)."""
    verdict_dict = {"label": verdict.label, "reason": verdict.reason, "metrics": verdict.metrics}
    return AuditOutcome(verdict, {**evidence, "verdict": verdict_dict}, reference_png)


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplerPolicy:
    """How often jobs are audited.

    - Every job is audited with probability `base_rate`.
    - A miner's first `probation_jobs` jobs of each kind (and those after a failed audit) are
      audited at `probation_rate`: a new hotkey has earned no trust, and a cheater caught
      once is likely to come back under a new one.
    - A miner that has gone `max_gap` jobs of a kind without an audit gets the next one
      audited, however the dice fall: a floor under every miner's rate that luck cannot
      undercut. It also spaces audits more evenly than coin flips alone, which is what
      catches a steady cheater sooner for the same number of audits.

    The defaults are chosen by bench/bench_audit.py (detection time against a cheater on 20% of
    its jobs, audit share of all compute; results in bench/README.md). No policy can catch such
    a cheater within 100 jobs in 95% of runs while auditing much less than 14% of its jobs: each
    audit catches it with probability 0.2, and 0.8 ** k < 0.05 needs k >= 14 audits.
    """

    base_rate: float = 0.06
    probation_jobs: int = 30
    probation_rate: float = 0.25
    max_gap: int = 18

    def __post_init__(self) -> None:
        if not (0.0 <= self.base_rate <= 1.0 and 0.0 <= self.probation_rate <= 1.0):
            raise ValueError("audit rates are probabilities in [0, 1]")
        if self.probation_jobs < 0 or self.max_gap < 0:
            raise ValueError("probation_jobs and max_gap are counts of jobs (>= 0)")


@dataclass
class MinerAuditState:
    """What the sampler remembers about one miner and one job kind."""

    jobs: int = 0  # finished jobs seen
    audits: int = 0  # of which picked for audit
    since_audit: int = 0  # jobs since the last one picked
    probation_left: int = 0  # jobs still to be sampled at the probation rate


@dataclass(frozen=True)
class AuditDecision:
    audit: bool
    reason: Literal["probation", "gap", "sampled", "skipped"]


class AuditSampler:
    """Decides which finished jobs to audit. State is per (miner hotkey, job kind), in memory.

    Ask once per job that finished with a result, after the result is in (never at dispatch).
    The randomness comes from `secrets.SystemRandom` (the OS CSPRNG), so miners cannot predict
    the draws; tests inject a seeded `random.Random`. After a restart every miner starts on
    probation again (costlier for a while, never laxer); `restore` can seed state from storage.
    """

    def __init__(self, policy: SamplerPolicy | None = None, rng: random.Random | None = None) -> None:
        self.policy = policy or SamplerPolicy()
        self._rng = rng if rng is not None else secrets.SystemRandom()
        self._states: dict[tuple[str, str], MinerAuditState] = {}

    def decide(self, hotkey: str, kind: str) -> AuditDecision:
        """Whether to audit the job that `hotkey` just finished, and why."""
        state = self._state(hotkey, kind)
        on_probation = state.probation_left > 0
        rate = self.policy.probation_rate if on_probation else self.policy.base_rate
        draw = self._rng.random()  # drawn every time: one draw per job, whatever the state
        if state.since_audit >= self.policy.max_gap:
            decision = AuditDecision(True, "gap")
        elif draw < rate:
            decision = AuditDecision(True, "probation" if on_probation else "sampled")
        else:
            decision = AuditDecision(False, "skipped")
        state.jobs += 1
        if on_probation:
            state.probation_left -= 1
        if decision.audit:
            state.audits += 1
            state.since_audit = 0
        else:
            state.since_audit += 1
        return decision

    def record_failure(self, hotkey: str) -> None:
        """A failed audit puts the miner back on probation, for every job kind."""
        # Kinds it has no state for yet start on probation anyway (`_state`).
        for (miner, _kind), state in self._states.items():
            if miner == hotkey:
                state.probation_left = self.policy.probation_jobs

    def state(self, hotkey: str, kind: str) -> MinerAuditState:
        """A copy of what the sampler knows about this miner and kind (new miners start on probation)."""
        return replace(self._state(hotkey, kind))

    def _state(self, hotkey: str, kind: str) -> MinerAuditState:
        return self._states.setdefault((hotkey, kind), MinerAuditState(probation_left=self.policy.probation_jobs))


# ---------------------------------------------------------------------------------------------
# Penalties


@dataclass(frozen=True)
class PenaltyPolicy:
    """How long failed audits zero a miner's score.

    The k-th failure within `horizon` (counting back from that failure, itself included)
    starts a cooldown of `base_cooldown * escalation ** (k - 1)`, capped at `max_cooldown`.
    With the defaults: 6 h, 12 h, 24 h, 48 h, 96 h, then 7 days for every further failure
    while earlier ones are less than 14 days old; in effect a ban for a miner that keeps
    cheating, since a failed audit also puts it back on audit probation. A failure older than
    the horizon no longer escalates anything.
    """

    base_cooldown: timedelta = timedelta(hours=6)
    escalation: float = 2.0
    max_cooldown: timedelta = timedelta(days=7)
    horizon: timedelta = timedelta(days=14)

    def __post_init__(self) -> None:
        if self.base_cooldown <= timedelta(0) or self.max_cooldown < self.base_cooldown:
            raise ValueError("cooldowns must be positive, and the cap at least the base")
        if self.escalation < 1.0:
            raise ValueError("escalation must be at least 1 (repeats never shorten a cooldown)")
        if self.horizon <= timedelta(0):
            raise ValueError("the horizon must be positive")


DEFAULT_PENALTY = PenaltyPolicy()


def cooldown_for(nth_failure: int, policy: PenaltyPolicy = DEFAULT_PENALTY) -> timedelta:
    """The cooldown the n-th failure within the horizon starts (n >= 1)."""
    if nth_failure < 1:
        raise ValueError("failures are counted from 1")
    cap = policy.max_cooldown / policy.base_cooldown
    factor = min(policy.escalation ** min(nth_failure - 1, 64), cap)  # the exponent cap avoids overflow
    return policy.base_cooldown * factor


def penalty_until(failures: Sequence[datetime], now: datetime, policy: PenaltyPolicy | None = None) -> datetime | None:
    """When the miner's penalty ends, or None if none is running at `now`.

    `failures` are the times of failed audits, in any order; those after `now` are ignored.
    """
    policy = policy or DEFAULT_PENALTY
    past = sorted(t for t in failures if t <= now)
    ends: datetime | None = None
    for index, failed_at in enumerate(past):
        nth = sum(1 for earlier in past[: index + 1] if failed_at - earlier < policy.horizon)
        end = failed_at + cooldown_for(nth, policy)
        if ends is None or end > ends:
            ends = end
    return ends if ends is not None and ends > now else None
