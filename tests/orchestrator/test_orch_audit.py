"""Audits: every way of cheating on a job is caught, honest miners never are, and the sampler and
penalties behave as documented. The verdicts run on real tiny-profile engines."""

from __future__ import annotations

import json
import random
import secrets
import statistics
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dippy_studio.engine import Engine, EngineOptions, GenerationRequest, LoraRef
from dippy_studio.engine.compare import decode_png
from dippy_studio.engine.images import encode_png
from dippy_studio.orchestrator.audit import (
    DEFAULT_THRESHOLDS,
    Auditor,
    AuditSampler,
    LoraShape,
    MinerAuditState,
    PenaltyPolicy,
    SamplerPolicy,
    Verdict,
    cooldown_for,
    inference_verdict,
    lora_shape,
    penalty_until,
    training_verdict,
)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_lora(pipe, path: Path, seed: int, rank: int = 4, scale: float = 0.5) -> Path:
    """A diffusers-format LoRA with random weights on the attention layers."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=generator) * scale
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A reference engine, an honest twin on the same profile, one on another profile, LoRAs."""
    root = tmp_path_factory.mktemp("audit")
    # One thread: on a machine shared with other test runs, two-thread kernels wait on each
    # other and run several times slower.
    reference = Engine(EngineOptions(profile="tiny", threads=1))
    # Written before any LoRA is loaded: loading wraps the layers this walks.
    loras = {
        "a": write_lora(reference.pipe, root / "a.safetensors", seed=1),
        "b": write_lora(reference.pipe, root / "b.safetensors", seed=2),
        "rank8": write_lora(reference.pipe, root / "rank8.safetensors", seed=3, rank=8),
    }
    request = GenerationRequest(
        prompt="a red fox in the snow", seed=7, width=32, height=32, steps=4, loras=[LoraRef(path=loras["a"])]
    )
    world = SimpleNamespace(
        root=root,
        reference=reference,
        twin=Engine(EngineOptions(profile="tiny", threads=1)),
        # Another fingerprint; on tiny, 1 and 2 threads happen to give equal pixels.
        other=Engine(EngineOptions(profile="tiny", threads=2)),
        loras=loras,
        request=request,
    )
    world.expected = reference.generate(request)
    world.honest = world.twin.generate(request)
    world.honest_other = world.other.generate(request)
    world.cheats = {mode: cheat(world, mode) for mode in CHEATS}
    return world


def cheat(world, mode: str) -> bytes | None:
    """What a miner cheating in `mode` returns for `world.request`."""
    request = world.request
    if mode == "no_image":
        return None
    if mode == "replayed":  # an image it made earlier for another client's request
        return world.twin.generate(request.model_copy(update={"prompt": "a castle", "seed": 3})).png
    changed = {
        "wrong_seed": {"seed": request.seed + 1},
        "wrong_lora": {"loras": [LoraRef(path=world.loras["b"])]},
        "no_lora": {"loras": []},
        "fewer_steps": {"steps": request.steps - 1},
        "other_prompt": {"prompt": "a blue fox in the snow"},
    }[mode]
    return world.twin.generate(request.model_copy(update=changed)).png


CHEATS = ("wrong_seed", "wrong_lora", "no_lora", "fewer_steps", "replayed", "no_image", "other_prompt")


@pytest.fixture(scope="module")
def reference_result(world):
    return world.expected


@pytest.mark.parametrize("claimed", ["same_fingerprint", "other_fingerprint"])
@pytest.mark.parametrize("mode", CHEATS)
def test_every_cheat_is_caught(world, reference_result, mode, claimed):
    png = world.cheats[mode]
    sha = encode_sha(png)
    # Claiming a fingerprint the auditor cannot reproduce only buys the perceptual comparison.
    fingerprint = world.reference.fingerprint if claimed == "same_fingerprint" else "f" * 16
    verdict = inference_verdict(
        reference_result.png, reference_result.fingerprint, png, sha, fingerprint, world.request
    )
    assert not verdict.passed and verdict.conclusive and verdict.label == "fail"
    if mode == "no_image":
        assert verdict.reason == "no image"
    elif claimed == "other_fingerprint":
        assert verdict.metrics["ssim"] < DEFAULT_THRESHOLDS.min_ssim
    else:
        assert "same profile fingerprint" in verdict.reason


def test_an_honest_miner_on_the_same_profile_passes_exactly(world, reference_result):
    result = world.honest
    assert result.fingerprint == reference_result.fingerprint
    verdict = inference_verdict(
        reference_result.png, reference_result.fingerprint, result.png, result.sha256, result.fingerprint, world.request
    )
    assert verdict.passed and verdict.label == "pass"
    assert verdict.metrics["comparison"] == "exact"


def test_an_honest_miner_on_another_profile_passes(world, reference_result):
    result = world.honest_other
    assert result.fingerprint != reference_result.fingerprint
    verdict = inference_verdict(
        reference_result.png, reference_result.fingerprint, result.png, result.sha256, result.fingerprint, world.request
    )
    assert verdict.passed, verdict.reason
    assert verdict.metrics["comparison"] == "perceptual"


def test_threads_drift_on_small_passes_across_profiles():
    # On `small` at 64x64, 1 and 2 threads differ in a few pixel values for this request.
    request = GenerationRequest(prompt="a red fox in the snow", seed=5, width=64, height=64, steps=4)
    two = Engine(EngineOptions(profile="small", threads=2)).generate(request)
    one = Engine(EngineOptions(profile="small", threads=1)).generate(request)
    verdict = inference_verdict(two.png, two.fingerprint, one.png, one.sha256, one.fingerprint, request)
    assert verdict.passed, verdict.reason
    assert verdict.metrics["max_abs_diff"] <= 1
    # The same bytes under the reference's own fingerprint would have to be identical.
    if one.sha256 != two.sha256:
        strict = inference_verdict(two.png, two.fingerprint, one.png, one.sha256, two.fingerprint, request)
        assert not strict.passed


def test_malformed_results_fail(world, reference_result):
    ref = (reference_result.png, reference_result.fingerprint)
    good = world.honest
    lied = inference_verdict(*ref, good.png, "0" * 64, good.fingerprint, world.request)
    assert not lied.passed and "sha256" in lied.reason
    garbage = b"\x89PNG\r\n\x1a\ngarbage"
    undecodable = inference_verdict(*ref, garbage, encode_sha(garbage), "x", world.request)
    assert not undecodable.passed and "does not decode" in undecodable.reason
    bigger = encode_png(decode_png(good.png).resize((48, 32)))
    wrong_size = inference_verdict(*ref, bigger, encode_sha(bigger), "x", world.request)
    assert not wrong_size.passed and "wrong size" in wrong_size.reason
    blank = encode_png(Image.new("RGB", (32, 32), (128, 128, 128)))
    assert not inference_verdict(*ref, blank, encode_sha(blank), "x", world.request).passed


def test_auditor_reruns_and_keeps_evidence(world):
    auditor = Auditor([world.reference, world.other])
    honest = world.honest
    outcome = auditor.audit_inference(world.request, honest.png, honest.sha256, honest.fingerprint)
    assert outcome.verdict.passed and outcome.reference_png == honest.png
    evidence = json.loads(json.dumps(outcome.evidence))  # JSON-ready for the Audit row
    assert evidence["request"]["seed"] == world.request.seed
    assert evidence["miner"]["sha256"] == honest.sha256
    assert evidence["reference"]["sha256"] == honest.sha256
    assert evidence["reference"]["fingerprint"] == world.reference.fingerprint
    assert evidence["verdict"]["label"] == "pass"

    # A miner reporting the threads=2 fingerprint is re-run on that twin and must match exactly.
    other = world.honest_other
    outcome = auditor.audit_inference(world.request, other.png, other.sha256, other.fingerprint)
    assert outcome.verdict.metrics["comparison"] == "exact" and outcome.verdict.passed

    wrong = world.cheats["wrong_seed"]
    failed = auditor.audit_inference(world.request, wrong, encode_sha(wrong), "unknown-profile")
    assert failed.verdict.label == "fail"
    assert failed.evidence["miner"]["sha256"] == encode_sha(wrong)
    assert failed.evidence["reference"]["sha256"] == honest.sha256
    assert failed.evidence["verdict"]["metrics"]["ssim"] < 0.5


def test_auditor_is_inconclusive_when_it_cannot_rerun(world):
    missing = world.request.model_copy(update={"loras": [LoraRef(path=world.root / "gone.safetensors")]})
    outcome = Auditor([world.reference]).audit_inference(missing, b"png", encode_sha(b"png"), "x")
    assert outcome.verdict.label == "inconclusive" and not outcome.verdict.conclusive
    assert outcome.reference_png is None


def encode_sha(png: bytes | None) -> str | None:
    import hashlib

    return hashlib.sha256(png).hexdigest() if png else None


# Training audits


def evaluation(improvement: float) -> SimpleNamespace:
    return SimpleNamespace(
        base_loss=1.0,
        lora_loss=1.0 - improvement,
        improvement=improvement,
        lora_sha256="a" * 64,
        dataset_sha256="b" * 64,
    )


SHAPE = lora_shape(
    {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 32),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (32, 4),
        "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": (4, 32),
        "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": (32, 4),
    }
)


def test_training_verdict_rules():
    good = training_verdict(evaluation(0.3), SHAPE, 4, ["to_q", "to_out.0"], 0.05)
    assert good.passed and good.metrics["improvement"] == 0.3
    assert training_verdict(evaluation(0.3), SHAPE, None, None).passed
    assert not training_verdict(evaluation(0.01), SHAPE, 4, ["to_q"], 0.05).passed  # barely trained
    assert not training_verdict(evaluation(float("nan")), SHAPE, 4, None, 0.05).passed
    assert "rank" in training_verdict(evaluation(0.3), SHAPE, 8, None).reason
    assert "promised layers" in training_verdict(evaluation(0.3), SHAPE, 4, ["to_q", "to_k"]).reason
    assert "not asked for" in training_verdict(evaluation(0.3), SHAPE, 4, ["to_q"]).reason
    assert "does not load" in training_verdict(None, None, 4, None, load_error="bad header").reason
    assert training_verdict(None, SHAPE, 4, None).label == "inconclusive"


def test_lora_shape_reads_layers_and_ranks():
    assert (
        LoraShape(
            {"transformer.transformer_blocks.0.attn.to_q": 4, "transformer.transformer_blocks.0.attn.to_out.0": 4}
        )
        == SHAPE
    )
    assert SHAPE.matching("attn.to_q") == ["transformer.transformer_blocks.0.attn.to_q"]
    with pytest.raises(ValueError, match="unexpected tensor"):
        lora_shape({"model.weight": (4, 4)})
    with pytest.raises(ValueError, match="not a LoRA"):
        lora_shape({})


def test_auditor_judges_delivered_loras(world, tmp_path):
    from dippy_studio.engine.datasets import load_dataset
    from dippy_studio.engine.synthetic_data import write_dataset
    from dippy_studio.engine.training import TrainConfig, train_lora

    train = load_dataset(write_dataset(tmp_path / "train", "sunset", count=4, seed=0, size=32))
    heldout = load_dataset(write_dataset(tmp_path / "heldout", "sunset", count=2, seed=1, size=32))
    # 12 steps: enough for this LoRA to clear the 5% threshold on the held-out loss, and quick on a CPU.
    config = TrainConfig(steps=12, trigger="sks")
    trained = train_lora(train, tmp_path / "trained.safetensors", config, options=world.reference.options).path
    auditor = Auditor([world.reference])
    kwargs = {"trigger": "sks", "seeds": (0,)}

    outcome = auditor.audit_training(trained, heldout, 4, TARGETS, **kwargs, job={"rank": 4})
    assert outcome.verdict.passed, outcome.verdict.reason
    assert outcome.evidence["evaluation"]["improvement"] > DEFAULT_THRESHOLDS.min_improvement
    assert json.loads(json.dumps(outcome.evidence))["request"] == {"rank": 4}

    outcome = auditor.audit_training(world.loras["rank8"], heldout, 4, TARGETS, **kwargs)
    assert not outcome.verdict.passed and "rank [8] instead of the promised 4" in outcome.verdict.reason
    assert "evaluation" not in outcome.evidence  # a wrong shape is not worth an evaluation

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    outcome = auditor.audit_training(garbage, heldout, 4, TARGETS, **kwargs)
    assert not outcome.verdict.passed and "does not load" in outcome.verdict.reason
    assert not auditor.audit_training(None, heldout, 4, TARGETS).verdict.passed


# Sampling


def run_jobs(sampler: AuditSampler, hotkey: str, jobs: int, kind: str = "inference") -> list[bool]:
    return [sampler.decide(hotkey, kind).audit for _ in range(jobs)]


def test_sampler_uses_the_os_csprng_by_default():
    assert isinstance(AuditSampler()._rng, secrets.SystemRandom)


def test_long_run_rate_is_the_base_rate():
    sampler = AuditSampler(SamplerPolicy(base_rate=0.07, probation_jobs=0, max_gap=10_000), rng=random.Random(1))
    picks = run_jobs(sampler, "miner", 20_000)
    assert sum(picks) / len(picks) == pytest.approx(0.07, abs=0.006)  # about 3 standard deviations


def test_new_miners_are_on_probation_and_no_miner_goes_unaudited_for_long():
    policy = SamplerPolicy(base_rate=0.05, probation_jobs=30, probation_rate=0.25, max_gap=20)
    sampler = AuditSampler(policy, rng=random.Random(2))
    histories = [run_jobs(sampler, f"miner-{i}", 130) for i in range(200)]
    probation = [pick for history in histories for pick in history[:30]]
    later = [pick for history in histories for pick in history[30:]]
    assert sum(probation) / len(probation) == pytest.approx(0.25, abs=0.03)
    # After probation: a 5% coin plus "never more than 20 in a row": 0.05 / (1 - 0.95**21) = 7.3%.
    assert sum(later) / len(later) == pytest.approx(0.073, abs=0.01)
    for history in histories:
        gaps = "".join("x" if pick else "." for pick in history).split("x")
        assert max(len(gap) for gap in gaps) <= 20


def test_default_policy_catches_a_20_percent_cheater_within_100_jobs_for_under_10_percent():
    # The targets, with every cheat caught when audited (the verdict tests show it is).
    rng = random.Random(5)
    detected_at = []
    for run in range(300):
        sampler = AuditSampler(rng=random.Random(run))
        for job in range(1, 1001):
            cheated = rng.random() < 0.2
            if sampler.decide("cheater", "inference").audit and cheated:
                detected_at.append(job)
                break
    # The bounds leave room for this small sample; bench/bench_audit.py simulates the policy at scale.
    assert statistics.median(detected_at) <= 30
    assert sum(job <= 100 for job in detected_at) / len(detected_at) >= 0.88

    sampler = AuditSampler(rng=random.Random(6))
    audits = sum(run_jobs(sampler, f"honest-{i}", 500).count(True) for i in range(10))
    assert audits / 5000 <= 0.10  # probation included


def test_job_kinds_are_sampled_separately_and_failures_restart_probation():
    policy = SamplerPolicy(base_rate=0.0, probation_jobs=3, probation_rate=1.0, max_gap=1000)
    sampler = AuditSampler(policy, rng=random.Random(3))
    assert run_jobs(sampler, "m", 5) == [True, True, True, False, False]
    assert sampler.decide("m", "training").reason == "probation"  # its first training job
    assert sampler.state("m", "inference") == MinerAuditState(jobs=5, audits=3, since_audit=2, probation_left=0)
    sampler.record_failure("m")
    assert run_jobs(sampler, "m", 4) == [True, True, True, False]
    assert sampler.state("m", "training").probation_left == 3
    assert sampler.state("other", "inference").probation_left == 3  # a new miner


def test_sampler_reasons():
    policy = SamplerPolicy(base_rate=0.0, probation_jobs=0, max_gap=2)
    sampler = AuditSampler(policy, rng=random.Random(4))
    assert [sampler.decide("m", "inference").reason for _ in range(6)] == ["skipped", "skipped", "gap"] * 2
    with pytest.raises(ValueError):
        SamplerPolicy(base_rate=1.5)


# Penalties

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def test_one_failure_zeroes_for_the_base_cooldown():
    assert penalty_until([], T0) is None
    assert penalty_until([T0], T0 + HOUR) == T0 + 6 * HOUR
    assert penalty_until([T0], T0 + 6 * HOUR) is None  # over at the end of the cooldown
    assert penalty_until([T0 + HOUR], T0) is None  # a failure after `now` is not counted yet


def test_repeated_failures_escalate_to_the_cap():
    # Each failure within 14 days doubles the cooldown: 6 h, 12 h, 24 h, ...
    failures = [T0, T0 + 7 * HOUR]
    assert penalty_until(failures, T0 + 8 * HOUR) == T0 + 7 * HOUR + 12 * HOUR
    failures = [T0 + 40 * HOUR, T0, T0 + 7 * HOUR]  # any order
    assert penalty_until(failures, T0 + 41 * HOUR) == T0 + 40 * HOUR + 24 * HOUR
    assert [cooldown_for(n) for n in (1, 2, 3, 4, 5, 6, 7, 100)] == [
        6 * HOUR,
        12 * HOUR,
        24 * HOUR,
        48 * HOUR,
        96 * HOUR,
        7 * 24 * HOUR,  # 192 h capped at 7 days
        7 * 24 * HOUR,
        7 * 24 * HOUR,
    ]


def test_old_failures_stop_escalating_after_the_horizon():
    later = T0 + timedelta(days=15)
    assert penalty_until([T0, later], later + HOUR) == later + 6 * HOUR
    custom = PenaltyPolicy(base_cooldown=HOUR, escalation=3.0, max_cooldown=100 * HOUR, horizon=timedelta(days=1))
    assert penalty_until([T0, T0 + HOUR, T0 + 2 * HOUR], T0 + 2 * HOUR, custom) == T0 + 2 * HOUR + 9 * HOUR
    with pytest.raises(ValueError):
        PenaltyPolicy(escalation=0.5)


def test_verdict_labels():
    assert Verdict(True, "ok").label == "pass"
    assert Verdict(False, "bad").label == "fail"
    assert Verdict(False, "?", conclusive=False).label == "inconclusive"


def test_a_miner_on_another_thread_count_is_rerun_as_it_ran_and_compared_exactly():
    """img2img on `small`: 1 and 2 threads drift past the perceptual line (bench/README.md, audit
    thresholds), so the auditor re-runs with the miner's thread count and demands its bytes."""
    from PIL import Image as PILImage

    gradient = PILImage.linear_gradient("L").resize((96, 96)).convert("RGB")
    request = GenerationRequest(
        prompt="an oil painting", seed=5, width=128, height=128, steps=6, task="img2img",
        image=encode_png(gradient), strength=0.7,
    )  # fmt: skip
    reference = Engine(EngineOptions(profile="small", threads=2))
    miner = Engine(EngineOptions(profile="small", threads=1)).generate(request)
    twin = reference.with_threads(1)
    assert twin.fingerprint == miner.fingerprint != reference.fingerprint
    assert twin.generate(request).png == miner.png

    auditor = Auditor([reference])
    honest = auditor.audit_inference(request, miner.png, miner.sha256, miner.fingerprint)
    assert honest.verdict.passed and honest.verdict.metrics["comparison"] == "exact"
    assert honest.evidence["reference"]["fingerprint"] == miner.fingerprint
    cheat = reference.generate(request.model_copy(update={"steps": 5})).png  # one step fewer
    caught = auditor.audit_inference(request, cheat, encode_sha(cheat), miner.fingerprint)
    assert caught.verdict.label == "fail" and "same profile fingerprint" in caught.verdict.reason
    # The reference itself still runs with its own threads.
    assert reference.generate(request).fingerprint == reference.fingerprint
