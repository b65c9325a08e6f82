"""Audits on reference workers: trusted miners, named in `audit_references`, that re-run audited
jobs. Real miner services over HTTP; the audited miner and the worker run the tiny profile in
bfloat16 (one thread), a fingerprint the orchestrator's in-process engine (float32) cannot
produce, as a GPU miner's cannot be on a CPU."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from typer.testing import CliRunner

import miner_kit
import orchestrator.orch_kit as kit
from dippy_studio.engine import Engine, EngineOptions, GenerationRequest
from dippy_studio.miner.app import create_app as create_miner_app
from dippy_studio.orchestrator.audit import Auditor
from dippy_studio.orchestrator.cli import orchestrator_app
from dippy_studio.orchestrator.references import ReferenceWorker
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.protocol import signer_from_uri
from orchestrator.orch_kit import ORCHESTRATOR, MinerHandle, Subnet, bind, image_body, sha256, wait_status, wait_until

server = miner_kit.server  # fixture: serves the LoRA file the client submits by URL
subnet = kit.subnet  # fixture: a local chain, miners and orchestrators

BF16 = EngineOptions(profile="tiny", dtype="bfloat16", threads=1)


def bf16_miner(subnet: Subnet, uri: str, *, stake: float = 10.0, **settings: object) -> MinerHandle:
    """A real miner on its own bfloat16 engine, registered on the chain with its endpoint."""
    return subnet.add_miner(uri, stake=stake, engine=Engine(BF16), settings=settings)


def reference(miner: MinerHandle) -> str:
    return f"{miner.hotkey}@{miner.url}"


def jobs_at(miner: MinerHandle, subnet: Subnet) -> list[tuple[str, str]]:
    """(job id, sender) of every job the miner was ever sent, from its own job store."""
    path = subnet.tmp_path / f"miner{miner.uri.replace('/', '_')}" / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        return [tuple(row) for row in db.execute("SELECT job_id, sender FROM jobs ORDER BY created_at")]


def lora_file(path: Path) -> bytes:
    """A small diffusers-format LoRA for the tiny profile (random weights on attention layers)."""
    engine = Engine(EngineOptions(profile="tiny"))
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in engine.pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith((".to_q", ".to_v")):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.1
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator)
    save_file(tensors, str(path))
    return path.read_bytes()


def audit_of(orch: kit.OrchHandle, request_id: str):
    wait_until(lambda: orch.store.list_audits(job_id=request_id), 60, f"the audit of {request_id}")
    [audit] = orch.store.list_audits(job_id=request_id)
    return audit


def test_an_honest_gpu_like_miner_is_judged_by_exact_hash_on_the_reference_worker(subnet, server, tmp_path):
    bob = bf16_miner(subnet, "//Bob")
    # Registered on the chain too, with more stake than Bob: still never dispatched a client job.
    worker = bf16_miner(subnet, "//Dave", stake=1000.0)
    orch = subnet.start_orchestrator(audit_all=True, auditor=None, audit_references=[reference(worker)])
    client = subnet.client(orch, subnet.new_key(orch))
    lora = lora_file(tmp_path / "style.safetensors")
    server.files["/style.safetensors"] = lora
    with_lora = {"url": server.url("/style.safetensors"), "sha256": sha256(lora), "scale": 0.8}

    ids = [
        client.post("/v1/images", json=body).json()["request_id"]
        for body in (image_body(), image_body(seed=8, loras=[with_lora]))
    ]
    for request_id in ids:
        view = wait_status(client, request_id, {"succeeded", "failed"})
        assert (view["status"], view["miner_hotkey"]) == ("succeeded", bob.hotkey), view
        audit = audit_of(orch, request_id)
        evidence = audit.evidence
        assert audit.verdict == "pass", evidence["verdict"]
        assert evidence["verdict"]["metrics"]["comparison"] == "exact"
        assert evidence["reference"]["worker"] == worker.hotkey
        # The worker's fingerprint equals the miner's; the in-process float32 engine's does not.
        assert evidence["reference"]["fingerprint"] == evidence["miner"]["fingerprint"] == Engine(BF16).fingerprint
        assert evidence["reference"]["fingerprint"] != subnet.engine.fingerprint
        assert evidence["reference"]["sha256"] == view["result"]["sha256"]
    # The LoRA reached the worker through the orchestrator's blob URL, and was applied there.
    assert evidence["reference"]["loras"] == [{"sha256": sha256(lora), "scale": 0.8}]

    # The worker got the re-runs, signed by the orchestrator, and nothing else; Bob never saw them.
    at_worker = jobs_at(worker, subnet)
    assert len(at_worker) == 2 and all(job.startswith("audit-") for job, _ in at_worker)
    assert {sender for _, sender in at_worker} == {ORCHESTRATOR.ss58_address}
    assert not any(job.startswith("audit-") for job, _ in jobs_at(bob, subnet))

    # Without the worker, the same honest image is failed: the CPU float32 engine cannot reproduce it.
    png = client.get(f"/v1/requests/{ids[0]}/result").content
    request = GenerationRequest(**audit_of(orch, ids[0]).evidence["request"])
    in_process = Auditor([subnet.engine]).audit_inference(request, png, sha256(png), Engine(BF16).fingerprint)
    assert in_process.verdict.label == "fail" and in_process.verdict.metrics["comparison"] == "perceptual"


def test_a_cheating_miner_is_caught_by_exact_hash_on_the_reference_worker(subnet):
    eve = bf16_miner(subnet, "//Eve", cheat_rate=1.0)  # renders with another seed, claims the real one
    worker = bf16_miner(subnet, "//Dave")
    orch = subnet.start_orchestrator(audit_all=True, auditor=None, audit_references=[reference(worker)])
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"}).json()["request_id"]
    assert wait_status(client, request_id, {"succeeded"})["miner_hotkey"] == eve.hotkey

    audit = audit_of(orch, request_id)
    assert (audit.miner_hotkey, audit.verdict) == (eve.hotkey, "fail")
    assert audit.evidence["verdict"]["metrics"]["comparison"] == "exact"
    assert audit.evidence["reference"]["worker"] == worker.hotkey
    assert "bytes differ from the reference on the same profile fingerprint" in audit.evidence["verdict"]["reason"]
    assert orch.orch.refresh_scores().scores == {eve.hotkey: 0.0}


def test_a_reference_worker_that_is_down_makes_the_audit_inconclusive(subnet):
    bob = bf16_miner(subnet, "//Bob")
    closed = bind()  # a port nobody listens on once closed
    down = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    ferdie = signer_from_uri("//Ferdie").ss58_address
    orch = subnet.start_orchestrator(audit_all=True, auditor=None, audit_references=[f"{ferdie}@{down}"])
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = client.post("/v1/images", json=image_body(), headers={"Prefer": "wait=30"}).json()["request_id"]
    assert wait_status(client, request_id, {"succeeded"})["miner_hotkey"] == bob.hotkey

    audit = audit_of(orch, request_id)
    assert (audit.miner_hotkey, audit.verdict) == (bob.hotkey, "inconclusive")
    reason = audit.evidence["verdict"]["reason"]
    assert "could not re-run" in reason and ferdie in reason and "unreachable" in reason
    assert audit.evidence["reference"]["worker"] == ferdie
    assert orch.orch.refresh_scores().scores[bob.hotkey] > 0  # not the miner's fault


def test_a_reference_worker_that_refuses_makes_the_audit_inconclusive(tmp_path):
    # A worker that does not admit the orchestrator's hotkey (a misconfiguration) answers 403.
    settings = miner_kit.miner_settings(tmp_path, dev_key="//Dave", allow_hotkeys=[HOTKEY])
    worker = kit.Served(create_miner_app(settings, engine=Engine(BF16)))
    rerun = ReferenceWorker(HOTKEY, worker.url, ORCHESTRATOR, profile="tiny", blob_url=str, timeout_s=10)
    request = GenerationRequest(prompt="a lighthouse at dusk", seed=7, width=64, height=64, steps=2)
    png = Engine(BF16).generate(request).png
    try:
        outcome = Auditor([rerun]).audit_inference(request, png, sha256(png), Engine(BF16).fingerprint)
    finally:
        worker.stop()
    assert outcome.verdict.label == "inconclusive" and outcome.reference_png is None
    assert "refused the re-run: HTTP 403" in outcome.verdict.reason


def test_reference_workers_get_no_client_jobs(subnet):
    bob = bf16_miner(subnet, "//Bob")
    # Registered, healthy, far more stake than Bob: routing would favour it, were it a miner.
    worker = bf16_miner(subnet, "//Dave", stake=10_000.0)
    orch = subnet.start_orchestrator(audit_references=[reference(worker)])
    client = subnet.client(orch, subnet.new_key(orch))
    ids = [client.post("/v1/images", json=image_body(seed=seed)).json()["request_id"] for seed in range(6)]
    for request_id in ids:
        assert wait_status(client, request_id, {"succeeded"})["miner_hotkey"] == bob.hotkey
    assert jobs_at(worker, subnet) == []
    assert [c.hotkey for c in orch.orch.registry.candidates()] == [bob.hotkey]
    assert orch.store.get_miner(worker.hotkey) is None  # not synced: no probes, no score


HOTKEY = signer_from_uri("//Dave").ss58_address


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ("http://10.0.0.5:8091", "the part before '@' must be the worker's ss58 hotkey"),
        ("not-a-hotkey@http://10.0.0.5:8091", "the part before '@' must be the worker's ss58 hotkey"),
        (f"{HOTKEY}@10.0.0.5:8091", "the part after '@' must be an http:// or https:// base URL"),
        (f"{HOTKEY}@http://10.0.0.5:99999", "the part after '@' must be an http:// or https:// base URL"),
    ],
)
def test_a_malformed_reference_entry_is_refused_with_a_clear_error(entry, complaint):
    with pytest.raises(ValidationError) as raised:
        OrchestratorSettings(audit_references=[entry])
    assert "is not HOTKEY@URL" in str(raised.value) and complaint in str(raised.value)


def test_reference_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DIPPY_ORCH_AUDIT_REFERENCES", f'["{HOTKEY}@http://10.0.0.5:8091/"]')
    assert OrchestratorSettings().reference_workers == [(HOTKEY, "http://10.0.0.5:8091")]
    with pytest.raises(ValidationError, match="names a hotkey twice"):
        OrchestratorSettings(audit_references=[f"{HOTKEY}@http://a:1", f"{HOTKEY}@http://b:1"])

    # `orchestrator serve` stops before starting anything, and says what is wrong.
    monkeypatch.setenv("DIPPY_ORCH_AUDIT_REFERENCES", '["http://10.0.0.5:8091"]')
    served = CliRunner().invoke(
        orchestrator_app, ["serve", "--dev-key", "//Alice", "--data-dir", str(tmp_path), "--port", "0"]
    )
    assert served.exit_code == 2
    assert "audit_references" in served.output and "is not HOTKEY@URL" in served.output


def test_an_image_task_is_re_run_on_the_reference_worker_with_the_input_as_a_blob_url(subnet):
    bob = bf16_miner(subnet, "//Bob")
    worker = bf16_miner(subnet, "//Dave")
    orch = subnet.start_orchestrator(audit_all=True, auditor=None, audit_references=[reference(worker)])
    client = subnet.client(orch, subnet.new_key(orch))
    image = kit.noise_png(32, 32, seed=4)
    body = {
        "task": "img2img",
        "prompt": "a stormy sea",
        "seed": 3,
        "steps": 2,
        "strength": 0.6,
        "image": "data:image/png;base64," + base64.b64encode(image).decode(),
    }
    request_id = client.post("/v1/images", json=body).json()["request_id"]
    view = wait_status(client, request_id, {"succeeded", "failed"})
    assert (view["status"], view["miner_hotkey"]) == ("succeeded", bob.hotkey), view

    audit = audit_of(orch, request_id)
    assert audit.verdict == "pass", audit.evidence["verdict"]
    assert audit.evidence["verdict"]["metrics"]["comparison"] == "exact"
    assert audit.evidence["reference"]["worker"] == worker.hotkey
    assert audit.evidence["request"]["image_sha256"] == view["input"]["image_sha256"]
    [(rerun, _)] = jobs_at(worker, subnet)
    assert rerun.startswith("audit-")


def test_each_model_is_audited_on_the_reference_worker_that_serves_it(subnet):
    """Two models, a worker for each: a job is re-run on the worker of its own model, never on the
    other (whose bytes could not match)."""
    kontext = Engine(EngineOptions(profile="tiny-kontext", threads=1))
    subnet.add_miner("//Bob")
    subnet.add_miner("//Charlie", engine=kontext)
    tiny_worker = subnet.add_miner("//Dave", stake=1000.0)
    kontext_worker = subnet.add_miner("//Eve", stake=1000.0, engine=kontext)
    orch = subnet.start_orchestrator(
        audit_all=True,
        auditor=None,
        models=["tiny-kontext"],
        audit_references=[reference(tiny_worker), reference(kontext_worker)],
    )
    client = subnet.client(orch, subnet.new_key(orch))
    ids = {
        model: client.post("/v1/images", json=image_body(seed=5, model=model)).json()["request_id"]
        for model in ("tiny", "tiny-kontext")
    }
    workers = {"tiny": tiny_worker.hotkey, "tiny-kontext": kontext_worker.hotkey}
    for model, request_id in ids.items():
        assert wait_status(client, request_id, {"succeeded", "failed"})["status"] == "succeeded"
        audit = audit_of(orch, request_id)
        assert audit.verdict == "pass", audit.evidence
        assert audit.evidence["reference"]["worker"] == workers[model]
        assert audit.evidence["reference"]["profile"] == model
        assert audit.evidence["verdict"]["metrics"]["comparison"] == "exact"
