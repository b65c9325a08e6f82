"""The benchmarks run end to end at the tiniest settings and their variants agree byte for byte."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    """bench/ is a folder of scripts, not a package: import its modules the way run.py sees them."""
    sys.path.insert(0, str(BENCH))
    try:
        names = (
            "bench_overhead",
            "bench_lora_switch",
            "bench_throughput",
            "bench_training",
            "bench_miner",
            "bench_startup",
            "bench_edit",
            "bench_memory",
            "bench_sql_overhead",
            "bench_owed_audits",
            "run",
        )
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(BENCH))


def test_overhead_variants_give_identical_pngs(bench):
    module = bench["bench_overhead"]
    result = module.run((module.Config("tiny", 32, 1, reps=1, warmup=0, threads=1),))

    (row,) = result.rows
    assert row["identical"]
    assert row["ours_ms"] > 0 and row["bare_ms"] > 0
    assert result.failed_checks == []


def test_lora_switch_streams_give_identical_pngs(bench):
    module = bench["bench_lora_switch"]
    result = module.run((module.Config("tiny", 32, 1, cycles=1, loras=2, threads=1),))

    (row,) = result.rows
    assert row["identical"]
    assert row["checks"] == {"lora_changes_image": True, "all_switches_were_cache_hits": True}
    assert row["ours_ms"] > 0 and row["naive_load_ms"] > 0 and row["naive_unload_ms"] > 0
    assert result.failed_checks == []


@pytest.mark.slow
def test_throughput_scores_every_job_through_a_real_orchestrator(bench):
    module = bench["bench_throughput"]
    # Two orchestrator processes (`serve --workers 2`), so the replicas' path is measured too.
    config = module.Config("sqlite", jobs=20, clients=4, workers=2, miners=2, warmup=0, latency_jobs=5, latency_rate=10)
    result = module.run((config,))

    (row,) = result.rows
    assert row["identical"], row["statuses"]
    assert result.failed_checks == []
    assert row["jobs_per_s"] > 0 and row["target"] in ("met", "missed")
    assert row["workers"] == 2 and row["orch_cpu_ms_per_job"] > 0
    assert 0 < row["added_p50_ms"] <= row["added_p99_ms"]
    # The bare baseline ran the same requests through two processes of its own.
    assert row["bare_jobs_per_s"] > 0 and row["bare_cpu_ms_per_job"] > 0
    assert row["vs_bare"] == row["jobs_per_s"] / row["bare_jobs_per_s"]
    assert sorted(m["variant"] for m in row["measured"]) == ["bare", "new"]


@pytest.mark.slow
def test_startup_bench_times_a_real_server_and_reads_its_memory(bench):
    module = bench["bench_startup"]
    result = module.run((module.Config(workers=1, reps=1),))

    (row,) = result.rows
    assert 0 < row["new_ready_s"] < module.START_TIMEOUT_S
    assert row["new_rss_mb"] > 10 and row["new_processes"] == 1
    assert row["new_torch_mapped"] in ("yes", "no")
    assert not row["new_imports"].startswith("probe failed"), row["new_imports"]
    assert row["ready_goal"] in ("met", "missed") and row["rss_goal"] in ("met", "missed")


def test_training_bench_times_both_trainers_and_caching_changes_no_bytes(bench):
    module = bench["bench_training"]
    result = module.run((module.Config("tiny", 32, 2, steps=6, rounds=1, images=4),))

    (row,) = result.rows
    assert row["identical"], "cached and uncached training must write the same LoRA"
    assert row["ours_sps"] > 0 and row["ref_sps"] > 0 and row["ratio"] > 0
    assert result.failed_checks == []


@pytest.mark.slow
def test_miner_bench_serves_the_engines_bytes_and_loses_no_job(bench):
    module = bench["bench_miner"]
    result = module.run((module.Config(jobs=3, clients=3, per_client=2),))

    (row,) = result.rows
    assert row["identical"], "the miner's PNG must be the bare engine's"
    assert result.failed_checks == []
    assert row["e2e_p50_ms"] > 0 and row["bare_p50_ms"] > 0 and row["target"] in ("met", "missed")


def test_runner_lists_every_benchmark(bench):
    assert set(bench["run"].BENCHMARKS) == {
        "overhead",
        "lora_switch",
        "throughput",
        "training",
        "miner",
        "startup",
        "edit",
    }


def test_edit_bench_compares_equal_work_with_bare_kontext(bench):
    # The engine and a bare FluxKontextPipeline on the same components give identical PNGs, so the
    # edit overhead it reports compares equal work.
    module = bench["bench_edit"]
    result = module.run((module.Config("tiny-kontext", 32, 1, reps=1, warmup=0, threads=1),))
    (row,) = result.rows
    assert row["identical"]
    assert row["ours_ms"] > 0 and row["bare_ms"] > 0
    assert result.failed_checks == []


def test_memory_bench_builds_full_flux_dev_on_meta(bench, capsys):
    """FLUX.1-dev at full size, built without allocating: the published parameter counts, and a
    total that is the weights plus the larger activation peak."""
    module = bench["bench_memory"]
    assert module.main(["--only", "flux-dev", "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)["profiles"]
    rows = {row["component"]: row for row in summary["rows"]}
    assert all(row["error"] is None for row in rows.values())
    assert 11.8e9 < rows["transformer"]["params"] < 12.0e9  # "a 12 billion parameter" transformer
    assert 4.7e9 < rows["text_encoder_2"]["params"] < 4.8e9  # the T5-XXL encoder
    weights = sum(row["weights_bf16_gib"] for row in rows.values())
    assert rows["transformer"]["weights_fp32_gib"] == 2 * rows["transformer"]["weights_bf16_gib"]
    peak = max(summary["denoiser_activation_gib"], summary["vae_decode_activation_gib"])
    assert summary["total_bf16_gib"] == weights + peak
    assert 30 < summary["total_bf16_gib"] < 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_gpu_bench_says_it_needs_a_gpu(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        module = importlib.import_module("bench_gpu_flux")
    finally:
        sys.path.remove(str(BENCH))
    assert module.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_sql_overhead_stores_the_same_jobs_both_ways(bench):
    result = bench["bench_sql_overhead"].run(rows_per_round=20, rounds=2)
    assert result["same_rows"]
    assert len(result["rounds"]["core"]) == len(result["rounds"]["sqlite3"]) == 2
    assert result["ratio"] == result["core_us"] / result["sqlite3_us"] > 0


def test_owed_audits_finds_the_same_jobs_through_the_index_as_by_a_scan(bench):
    result = bench["bench_owed_audits"].run(jobs=200, pick_every=10, owed=3, looks=2)
    assert result["same_jobs"]
    assert len(result["seconds"]["index"]) == len(result["seconds"]["scan"]) == 2
    assert result["ratio"] == result["scan_ms"] / result["index_ms"] > 0


def test_owed_audits_refuses_more_owed_than_picked(bench, capsys):
    with pytest.raises(SystemExit) as refused:
        bench["bench_owed_audits"].main(["--jobs", "20", "--pick-every", "10", "--owed", "3"])
    assert refused.value.code == 2 and "--owed cannot exceed" in capsys.readouterr().err
