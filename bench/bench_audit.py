"""Audit efficiency: how fast a cheating miner is caught, what auditing costs, and false positives.

Two stages:

1. Real verdicts. Real engines make a reference image for each of a few requests, then the
   results of honest miners (the same profile, which must match byte for byte, and other
   profiles: 1 thread instead of 2 on `small`, AVX2 instead of AVX-512) and of cheats (wrong
   seed, one step fewer, wrong LoRA, no LoRA, a replayed image, no image, another prompt).
   Each is judged by `inference_verdict`, cheats as if they claimed a profile the auditor
   cannot reproduce (the lenient, perceptual path) and on the reference's own fingerprint.
2. A simulated network. Honest miners and one cheater finish jobs; `AuditSampler` (the
   production sampler, with a seeded RNG so runs repeat) picks audits; an audited job's
   verdict is drawn from stage 1's verdicts for its kind (a verdict is a pure function of the
   pair, so drawing it is the same as recomputing it). Compute is counted in jobs: every
   client job is one unit, every audit one more (a re-run).

Targets (issue 5): a miner cheating on 20% of its jobs is detected within 100 of its jobs;
at most 10% of compute goes to audits; no false positive over 5,000 honest jobs.

    .venv/bin/python bench/bench_audit.py            # 1-5 minutes on 2 cores, depending on load
    .venv/bin/python bench/bench_audit.py --quick    # no AVX2 subprocess, fewer runs
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

import measure_audit_thresholds as measure
from dippy_studio.orchestrator.audit import AuditSampler, SamplerPolicy, Verdict, inference_verdict

CHEAT_RATE = 0.2
TARGET_DETECTION_JOBS = 100
TARGET_AUDIT_SHARE = 0.10
CHEATS = ("wrong_seed", "one_step_fewer", "wrong_lora", "no_lora", "replayed", "no_image", "other_prompt")


@dataclass(frozen=True)
class Config:
    honest_miners: int = 10
    jobs_per_miner: int = 500  # 10 x 500: the 5,000 honest jobs of the target
    detection_runs: int = 2000
    max_jobs: int = 2000  # a cheater still undetected after this many jobs counts as missed
    established_after: int = 500  # the "established" cheater's honest jobs before it starts cheating
    requests: int = 6
    avx2: bool = True
    seed: int = 0


FULL = Config()
QUICK = Config(detection_runs=400, requests=4, avx2=False)


@dataclass
class Verdicts:
    """Stage 1: verdicts of real image pairs, by kind of miner result."""

    honest: dict[str, list[Verdict]] = field(default_factory=dict)  # "same_profile", "threads1", "avx2"
    cheats: dict[str, list[Verdict]] = field(default_factory=dict)  # perceptual path (claims another profile)
    cheats_exact: dict[str, list[Verdict]] = field(default_factory=dict)  # on the reference's own fingerprint


def judge_real_pairs(config: Config) -> Verdicts:
    from dippy_studio.engine import Engine, EngineOptions, GenerationRequest

    out = Verdicts()
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        loras = measure.train_loras("tiny", Path(tmp))
        case = measure.Case("tiny", 64, 4, config.requests)
        requests = measure.requests_for(case, loras)
        reference = Engine(EngineOptions(profile="tiny"))
        twin = Engine(EngineOptions(profile="tiny"))  # an honest miner on the same profile
        ref_pngs = [reference.generate(GenerationRequest.model_validate(r)).png for r in requests]

        def judge(index: int, png: bytes | None, fingerprint: str) -> Verdict:
            request = GenerationRequest.model_validate(requests[index])
            sha = measure_sha(png)
            return inference_verdict(ref_pngs[index], reference.fingerprint, png, sha, fingerprint, request)

        out.honest["same_profile"] = [
            judge(i, twin.generate(GenerationRequest.model_validate(r)).png, twin.fingerprint)
            for i, r in enumerate(requests)
        ]
        other_profile = "claimed-" + "0" * 8  # a fingerprint the auditor has no engine for
        for mode in CHEATS:
            pngs: list[tuple[int, bytes | None]]
            if mode == "no_image":
                pngs = [(i, None) for i in range(len(requests))]
            elif mode == "replayed":
                pngs = [(i, ref_pngs[(i + 1) % len(requests)]) for i in range(len(requests))]
            else:
                changed = [(i, measure.dishonest(mode, i, r, loras)) for i, r in enumerate(requests)]
                pngs = [
                    (i, reference.generate(GenerationRequest.model_validate(r)).png)
                    for i, r in changed
                    if r is not None
                ]
            out.cheats[mode] = [judge(i, png, other_profile) for i, png in pngs]
            out.cheats_exact[mode] = [judge(i, png, reference.fingerprint) for i, png in pngs]

    # Honest miners on other profiles: the small profile, where 1 thread and AVX2 change pixels.
    small_case = measure.Case("small", 64, 8, config.requests)
    small_requests = measure.requests_for(small_case, {"a": "", "b": ""})
    small_requests = [{**r, "loras": []} for r in small_requests]
    small = Engine(EngineOptions(profile="small"))
    small_ref = [small.generate(GenerationRequest.model_validate(r)).png for r in small_requests]
    variants = {"threads1": measure.generate_all("small", small_requests, threads=1)}
    if config.avx2:
        variants["avx2"], _ = measure.generate_in_subprocess("small", small_requests, {"ATEN_CPU_CAPABILITY": "avx2"})
    for name, pngs in variants.items():
        out.honest[name] = [
            inference_verdict(
                small_ref[i],
                small.fingerprint,
                png,
                measure_sha(png),
                f"{name}-profile",
                GenerationRequest.model_validate(small_requests[i]),
            )
            for i, png in enumerate(pngs)
        ]
    return out


def measure_sha(png: bytes | None) -> str | None:
    import hashlib

    return hashlib.sha256(png).hexdigest() if png else None


@dataclass(frozen=True)
class Detection:
    scenario: str
    runs: int
    detected_within_target: float  # share of runs
    median_jobs: float
    p95_jobs: float
    missed: int  # runs never detected within max_jobs
    audit_share_of_cheater: float  # the cheater's audits per job until detection


def simulate_detection(
    policy: SamplerPolicy, verdicts: Verdicts, config: Config, warmup_jobs: int, scenario: str
) -> Detection:
    """Jobs from the first cheating job until a failed audit, over many independent runs."""
    rng = random.Random(f"{config.seed}-{scenario}")
    cheat_verdicts = [v for mode in CHEATS for v in verdicts.cheats[mode]]
    honest_verdicts = [v for pool in verdicts.honest.values() for v in pool]
    found: list[int] = []
    missed = 0
    audits = jobs = 0
    for _ in range(config.detection_runs):
        sampler = AuditSampler(policy, rng=random.Random(rng.getrandbits(64)))
        for _ in range(warmup_jobs):  # an honest history first: probation is long over
            if sampler.decide("cheater", "inference").audit and not rng.choice(honest_verdicts).passed:
                raise AssertionError("an honest job failed its audit")
        for job in range(1, config.max_jobs + 1):
            jobs += 1
            cheated = rng.random() < CHEAT_RATE
            if not sampler.decide("cheater", "inference").audit:
                continue
            audits += 1
            verdict = rng.choice(cheat_verdicts) if cheated else rng.choice(honest_verdicts)
            if not verdict.passed:
                found.append(job)
                break
        else:
            missed += 1
    ordered = sorted(found) + [config.max_jobs + 1] * missed
    return Detection(
        scenario=scenario,
        runs=config.detection_runs,
        detected_within_target=sum(j <= TARGET_DETECTION_JOBS for j in found) / config.detection_runs,
        median_jobs=statistics.median(ordered),
        p95_jobs=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        missed=missed,
        audit_share_of_cheater=audits / jobs,
    )


@dataclass(frozen=True)
class Network:
    honest_jobs: int
    audits: int
    false_positives: int
    audits_per_job: float  # re-runs per client job
    audit_share: float  # re-runs / (client jobs + re-runs): the share of all compute
    steady_audits_per_job: float  # after every miner's probation


def simulate_network(policy: SamplerPolicy, verdicts: Verdicts, config: Config) -> Network:
    """Honest miners, each on its own profile mix, jobs interleaved; every audit judged for real."""
    rng = random.Random(f"{config.seed}-network")
    sampler = AuditSampler(policy, rng=random.Random(rng.getrandbits(64)))
    pools = list(verdicts.honest.values())
    miners = [f"honest-{i}" for i in range(config.honest_miners)]
    pool_of = {miner: pools[i % len(pools)] for i, miner in enumerate(miners)}  # same-profile and cross
    audits = false_positives = 0
    steady_jobs = steady_audits = 0
    for job in range(config.jobs_per_miner):
        for miner in miners:
            if sampler.decide(miner, "inference").audit:
                audits += 1
                if job >= policy.probation_jobs:
                    steady_audits += 1
                if not rng.choice(pool_of[miner]).passed:
                    false_positives += 1
            if job >= policy.probation_jobs:
                steady_jobs += 1
    jobs = config.honest_miners * config.jobs_per_miner
    return Network(
        honest_jobs=jobs,
        audits=audits,
        false_positives=false_positives,
        audits_per_job=audits / jobs,
        audit_share=audits / (jobs + audits),
        steady_audits_per_job=steady_audits / max(1, steady_jobs),
    )


@dataclass
class Result:
    verdicts: Verdicts
    policies: dict[str, tuple[list[Detection], Network]]
    failed_checks: list[str]


POLICIES = {
    "default": SamplerPolicy(),
    "uniform 10%": SamplerPolicy(base_rate=0.10, probation_jobs=0, max_gap=10_000),
}


def run(config: Config) -> Result:
    verdicts = judge_real_pairs(config)
    policies = {}
    for name, policy in POLICIES.items():
        detections = [
            simulate_detection(policy, verdicts, config, 0, "new miner"),
            simulate_detection(policy, verdicts, config, config.established_after, "established"),
        ]
        policies[name] = (detections, simulate_network(policy, verdicts, config))
    failed = []
    caught_everywhere = all(not v.passed for pool in verdicts.cheats.values() for v in pool) and all(
        not v.passed for pool in verdicts.cheats_exact.values() for v in pool
    )
    if not caught_everywhere:
        failed.append("a cheat passed its audit")
    if any(not v.passed for pool in verdicts.honest.values() for v in pool):
        failed.append("an honest result failed its audit")
    detections, network = policies["default"]
    if detections[0].median_jobs > TARGET_DETECTION_JOBS:
        failed.append("median detection of a new cheater over 100 jobs")
    if network.audits_per_job > TARGET_AUDIT_SHARE:
        failed.append("audits over 10% of compute")
    if network.false_positives:
        failed.append("false positives among honest jobs")
    return Result(verdicts, policies, failed)


def print_result(result: Result, config: Config, console: Console) -> None:
    verdicts = result.verdicts
    table = Table(
        title="Real verdicts (tiny 64x64 cheats; honest: same profile on tiny, other profiles on small 64x64)"
    )
    for column in ("result", "path", "n", "failed", "1-SSIM at edge", "reason (first)"):
        table.add_column(column, justify="right" if column in ("n", "failed", "1-SSIM at edge") else "left")
    for name, pool in verdicts.honest.items():
        table.add_row(
            f"honest: {name}",
            _path(pool),
            str(len(pool)),
            str(sum(not v.passed for v in pool)),
            _nearest_the_line(pool, honest=True),
            pool[0].reason,
        )
    for mode in CHEATS:
        for path, pools in (("claims another profile", verdicts.cheats), ("same fingerprint", verdicts.cheats_exact)):
            pool = pools[mode]
            table.add_row(
                f"cheat: {mode}",
                path,
                str(len(pool)),
                str(sum(not v.passed for v in pool)),
                _nearest_the_line(pool, honest=False),
                pool[0].reason,
            )
    console.print(table)

    detection = Table(
        title=f"Detection of a miner cheating on {CHEAT_RATE:.0%} of its jobs ({config.detection_runs} runs)"
    )
    for column in ("sampler", "cheater", "median jobs", "p95 jobs", "within 100", "never (of runs)", "its audits/job"):
        detection.add_column(column, justify="left" if column in ("sampler", "cheater") else "right")
    for name, (detections, _) in result.policies.items():
        for d in detections:
            detection.add_row(
                name,
                d.scenario,
                f"{d.median_jobs:g}",
                f"{d.p95_jobs:g}",
                f"{d.detected_within_target:.1%}",
                str(d.missed),
                f"{d.audit_share_of_cheater:.1%}",
            )
    console.print(detection)

    cost = Table(title=f"Cost and false positives: {config.honest_miners} honest miners x {config.jobs_per_miner} jobs")
    for column in (
        "sampler",
        "honest jobs",
        "audits",
        "audits/job",
        "share of compute",
        "steady audits/job",
        "false positives",
    ):
        cost.add_column(column, justify="left" if column == "sampler" else "right")
    for name, (_, n) in result.policies.items():
        cost.add_row(
            name,
            str(n.honest_jobs),
            str(n.audits),
            f"{n.audits_per_job:.1%}",
            f"{n.audit_share:.1%}",
            f"{n.steady_audits_per_job:.1%}",
            str(n.false_positives),
        )
    console.print(cost)
    policy = POLICIES["default"]
    console.print(
        f"default sampler: base rate {policy.base_rate:.0%}, first {policy.probation_jobs} jobs at "
        f"{policy.probation_rate:.0%}, never more than {policy.max_gap} jobs without an audit"
    )
    console.print("checks: " + ("all passed" if not result.failed_checks else "; ".join(result.failed_checks)))


def _path(pool: Sequence[Verdict]) -> str:
    return str(pool[0].metrics.get("comparison", "-"))


def _nearest_the_line(pool: Sequence[Verdict], honest: bool) -> str:
    """1 - SSIM of the pair nearest the threshold: the farthest honest one, the closest cheat."""
    gaps = [1 - v.metrics["ssim"] for v in pool if "ssim" in v.metrics]
    if not gaps:
        return "-"
    return f"{max(gaps) if honest else min(gaps):.1e}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no AVX2 subprocess, fewer simulated runs")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    console = Console(width=150)
    result = run(config)
    print_result(result, config, console)
    return 1 if result.failed_checks else 0


if __name__ == "__main__":
    sys.exit(main())
