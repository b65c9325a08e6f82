"""Training audits: the orchestrator keeps part of each client dataset from the miner, and checks
sampled LoRAs on it. Honest LoRAs pass and score by their held-out improvement; LoRAs that were
not really trained fail. Real miners and a real orchestrator over HTTP, on the tiny profile."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

import orchestrator.orch_kit as kit
from dippy_studio.engine import Engine, EngineOptions
from dippy_studio.engine.datasets import dataset_zip, load_zip_bytes, split_dataset
from dippy_studio.engine.images import encode_png
from dippy_studio.engine.synthetic_data import shape_images, zip_bytes
from dippy_studio.engine.training import DEFAULT_TARGETS
from dippy_studio.miner.store import JobRecord
from dippy_studio.miner.workers import AbortCheck, Outcome
from dippy_studio.orchestrator.audit import DEFAULT_THRESHOLDS, HELDOUT_KEY
from dippy_studio.orchestrator.kinds import score_weights
from dippy_studio.orchestrator.scoring import latency_score, training_quality
from orchestrator.orch_kit import dataset_zip as upload_zip
from orchestrator.orch_kit import sha256, wait_status, wait_until

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators

# Enough for an honest tiny LoRA to clear the 5% threshold with a wide margin (asserted below),
# and a second or so of training on a shared CPU.
STEPS = "30"


def files_of(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(name, bytes) entries of a captioned dataset: png + txt pairs."""
    files = []
    for name, image, caption in shape_images("sunset", count, seed=seed, size=32):
        files += [(f"{name}.png", encode_png(image)), (f"{name}.txt", caption.encode())]
    return files


def names_in(archive: bytes) -> set[str]:
    return set(zipfile.ZipFile(io.BytesIO(archive)).namelist())


# ---- the split ----------------------------------------------------------------------------------


def test_the_split_is_deterministic_disjoint_and_keeps_captions_with_their_images():
    files = files_of(10)
    dataset = load_zip_bytes(zip_bytes(files))
    split = split_dataset(dataset, share=0.2, min_images=5)
    assert split is not None
    train, heldout = [item.name for item in split.train.items], [item.name for item in split.heldout.items]
    assert len(heldout) == 2 and len(train) == 8
    assert not set(train) & set(heldout) and sorted(train + heldout) == [item.name for item in dataset.items]

    # The same content in another entry order and inside a folder splits the same way, into the same bytes.
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    again = split_dataset(load_zip_bytes(zip_bytes([(f"upload/{n}", d) for n, d in shuffled])), 0.2, 5)
    assert again is not None and [item.name for item in again.heldout.items] == heldout
    assert dataset_zip(again.train) == dataset_zip(split.train)
    assert dataset_zip(again.heldout) == dataset_zip(split.heldout)

    # Each part is a dataset of its own: images with their own captions, read back to the same content.
    captions = {item.name: item.caption for item in dataset.items}
    for part in (split.train, split.heldout):
        archive = dataset_zip(part)
        expected = {item.name for item in part.items} | {item.name.replace(".png", ".txt") for item in part.items}
        assert names_in(archive) == expected
        reloaded = load_zip_bytes(archive)
        assert reloaded.sha256 == part.sha256
        assert all(item.caption == captions[item.name] for item in reloaded.items)


def test_small_datasets_are_not_split():
    def held(count: int, share: float = 0.2) -> int | None:
        split = split_dataset(load_zip_bytes(zip_bytes(files_of(count))), share, min_images=5)
        return None if split is None else len(split.heldout)

    assert held(4) is None  # too few to spare one
    assert held(5) == 1 and held(12) == 2 and held(13) == 3  # 20%, rounded, at least one
    assert held(10, share=0.0) is None
    assert held(5, share=0.9) == 4  # never all of them: the miner needs something to train on
    with pytest.raises(ValueError):
        split_dataset(load_zip_bytes(zip_bytes(files_of(5))), 1.0, 5)


# ---- what the miner sees ------------------------------------------------------------------------


def test_the_miner_never_receives_the_held_out_images(subnet):
    stub = subnet.add_stub_miner("//Dave")  # records what it is sent
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    upload = upload_zip(10)
    submitted = client.post(
        "/v1/loras", data={"trigger_word": "sks", "steps": STEPS}, files={"dataset": ("d.zip", upload)}
    )
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    [body] = wait_until(lambda: [b for b in stub.received if "dataset_url" in b], 15, "the job at the miner")

    job = orch.store.load_job(request_id)
    heldout_sha = job.payload[HELDOUT_KEY]
    assert not any("heldout" in field for field in body), body
    assert heldout_sha not in str(body)

    # What the miner downloads is the training part, and the held-out archive is served to nobody.
    training = httpx.get(body["dataset_url"]).content
    assert sha256(training) == body["dataset_sha256"] == job.payload["dataset_sha256"] != sha256(upload)
    assert client.get(f"/v1/blobs/{heldout_sha}").status_code == 404
    heldout = load_zip_bytes(orch.orch.heldout.get(heldout_sha))
    trained_on = load_zip_bytes(training)
    assert len(heldout) == 2 and len(trained_on) == 8
    assert not {item.data for item in heldout.items} & {item.data for item in trained_on.items}
    everything = load_zip_bytes(upload)
    assert sorted(i.name for i in heldout.items + trained_on.items) == [i.name for i in everything.items]

    # The client learns how many images were kept back, not where they are.
    view = client.get(f"/v1/requests/{request_id}").json()
    assert view["input"]["heldout_images"] == 2 and HELDOUT_KEY not in view["input"]

    # The same upload again: the same split.
    second = client.post("/v1/loras", data={"trigger_word": "sks"}, files={"dataset": ("d.zip", upload)})
    payload = orch.store.load_job(second.json()["request_id"]).payload
    assert (payload["dataset_sha256"], payload[HELDOUT_KEY]) == (job.payload["dataset_sha256"], heldout_sha)


# ---- audits of real training jobs ---------------------------------------------------------------


def train(client: httpx.Client, upload: bytes, steps: str = STEPS) -> dict:
    submitted = client.post(
        "/v1/loras", data={"trigger_word": "sks", "steps": steps}, files={"dataset": ("d.zip", upload)}
    )
    assert submitted.status_code == 202, submitted.text
    view = wait_status(client, submitted.json()["request_id"], {"succeeded", "failed"}, timeout=60)
    assert view["status"] == "succeeded", view  # the LoRA has the promised shape: it is delivered
    return view


def expected_score(orch: kit.OrchHandle, request_id: str, quality: float) -> float:
    [attempt] = orch.store.list_attempts(request_id)
    job = orch.store.load_job(request_id)
    return (
        score_weights(orch.orch.settings)["training"]
        * latency_score(attempt.latency_s, job.attempt_timeout_s)
        * quality
    )


def test_an_honest_lora_passes_its_audit_and_scores_by_its_improvement(subnet):
    bob = subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(audit_all=True)
    client = subnet.client(orch, subnet.new_key(orch))
    view = train(client, upload_zip(10))
    request_id = view["request_id"]

    [audit] = wait_until(lambda: orch.store.list_audits(job_id=request_id), 30, "the training audit")
    evaluation = audit.evidence["evaluation"]
    assert (audit.miner_hotkey, audit.verdict) == (bob.hotkey, "pass"), audit.evidence["verdict"]
    # Well over the threshold, so drift between platforms cannot turn an honest LoRA into a fail.
    assert evaluation["improvement"] > 3 * DEFAULT_THRESHOLDS.min_improvement
    assert evaluation["lora_loss"] < evaluation["base_loss"] and evaluation["images"] == 2
    assert evaluation["lora_sha256"] == view["result"]["sha256"] and evaluation["trigger"] == "sks"
    heldout = load_zip_bytes(orch.orch.heldout.get(orch.store.load_job(request_id).payload[HELDOUT_KEY]))
    assert evaluation["dataset_sha256"] == heldout.sha256
    metrics = audit.evidence["verdict"]["metrics"]
    assert (metrics["promised_rank"], metrics["ranks"]) == (4, [4])
    assert metrics["promised_targets"] == list(DEFAULT_TARGETS)

    # The quality factor is the measured improvement, scaled: not the 1.0 of an unaudited job.
    quality = training_quality(evaluation["improvement"])
    assert 0 < quality < 1
    scores = orch.orch.refresh_scores().scores
    assert scores[bob.hotkey] == pytest.approx(expected_score(orch, request_id, quality))


def random_lora(path: Path, rank: int = 4) -> Path:
    """A LoRA of the promised rank on the promised layers of the tiny transformer, with random weights."""
    transformer = Engine(EngineOptions(profile="tiny")).pipe.transformer  # a fresh one: no adapters yet
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{t}") for t in DEFAULT_TARGETS):
            # Scaled like a trained LoRA's weights: a real change to every layer, but finite losses.
            down = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=generator) * 0.5
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def random_lora_runner(tmp_path: Path):
    """A miner training lane that delivers random weights of the promised shape, without training."""

    def run(record: JobRecord, check: AbortCheck) -> Outcome:
        path = random_lora(tmp_path / f"{record.job_id}.safetensors")
        data = path.read_bytes()
        return Outcome(str(path), sha256(data), len(data), "fingerprint-of-a-cheat")

    return run


@pytest.mark.parametrize("cheat", ["untrained", "random_weights"])
def test_a_lora_that_was_not_trained_fails_its_audit_and_scores_nothing(subnet, tmp_path, cheat):
    if cheat == "untrained":  # the demo cheater: the LoRA as initialised, lora_B = 0
        eve = subnet.add_miner("//Eve", settings={"cheat_rate": 1.0})
    else:
        eve = subnet.add_miner("//Eve", training_runner=random_lora_runner(tmp_path))
    orch = subnet.start_orchestrator(audit_all=True)
    client = subnet.client(orch, subnet.new_key(orch))
    request_id = train(client, upload_zip(10))["request_id"]

    [audit] = wait_until(lambda: orch.store.list_audits(job_id=request_id), 30, "the training audit")
    assert (audit.miner_hotkey, audit.verdict) == (eve.hotkey, "fail"), audit.evidence["verdict"]
    improvement = audit.evidence["evaluation"]["improvement"]
    assert "held-out loss improvement" in audit.evidence["verdict"]["reason"]
    if cheat == "untrained":
        assert improvement == pytest.approx(0.0, abs=1e-9)  # a LoRA that adds nothing changes nothing
    else:
        assert improvement < 0  # random weights make the model worse
    assert orch.orch.refresh_scores().scores == {eve.hotkey: 0.0}
    assert orch.store.get_miner(eve.hotkey).score == 0.0


def test_a_dataset_too_small_to_split_gets_an_inconclusive_training_audit(subnet):
    bob = subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator(audit_all=True)
    client = subnet.client(orch, subnet.new_key(orch))
    upload = upload_zip(3)
    view = train(client, upload, steps="2")
    request_id = view["request_id"]
    payload = orch.store.load_job(request_id).payload
    assert HELDOUT_KEY not in payload and payload["dataset_sha256"] == sha256(upload)  # the upload as it came

    [audit] = wait_until(lambda: orch.store.list_audits(job_id=request_id), 30, "the training audit")
    assert (audit.miner_hotkey, audit.verdict) == (bob.hotkey, "inconclusive")
    assert "no held-out images" in audit.evidence["verdict"]["reason"]
    assert "evaluation" not in audit.evidence
    # Nothing was measured, so the job counts at full quality.
    scores = orch.orch.refresh_scores().scores
    assert scores[bob.hotkey] == pytest.approx(expected_score(orch, request_id, 1.0))
