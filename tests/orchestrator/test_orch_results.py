"""What a miner delivers is checked before it counts: one LoRA shape rule at delivery and in audits, and
what a callback carries beside its result."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save

import orchestrator.orch_kit as kit
from dippy_studio.orchestrator.results import check_lora
from dippy_studio.protocol import signer_from_uri
from orchestrator.orch_kit import image_body, noise_png, wait_status, wait_until

TARGETS = ["to_q", "to_k"]

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators


def lora_bytes(layers: dict[str, tuple[int, int]], width: int = 8) -> bytes:
    """A diffusers-format LoRA: for each layer, lora_A (rank x width) and lora_B (width x rank_b)."""
    tensors = {}
    for layer, (rank, rank_b) in layers.items():
        tensors[f"transformer.{layer}.lora_A.weight"] = torch.randn(rank, width)
        tensors[f"transformer.{layer}.lora_B.weight"] = torch.randn(width, rank_b)
    return save(tensors)


LIMIT = 60.0  # seconds; a check of these LoRAs takes milliseconds
GOOD = {"blocks.0.attn.to_q": (4, 4), "blocks.0.attn.to_k": (4, 4)}


def test_a_lora_of_the_promised_shape_is_accepted():
    assert check_lora(lora_bytes(GOOD), 4, TARGETS, time_limit=LIMIT) is None


@pytest.mark.parametrize(
    ("layers", "problem"),
    [
        ({**GOOD, "blocks.0.attn.to_k": (8, 8)}, "rank [4, 8] instead of the promised 4"),
        ({"blocks.0.attn.to_q": (4, 4)}, "does not adapt the promised layers ['to_k']"),
        ({**GOOD, "blocks.0.attn.to_v": (4, 4)}, "adapts layers that were not asked for"),
        ({**GOOD, "blocks.0.attn.to_q": (4, 2)}, "lora_B takes rank 2, lora_A gives 4"),
    ],
)
def test_a_lora_of_another_shape_is_refused_with_the_reason(layers, problem):
    assert problem in (check_lora(lora_bytes(layers), 4, TARGETS, time_limit=LIMIT) or "")


def test_files_that_are_not_loras_are_refused():
    not_a_lora = save({"model.weight": torch.randn(2, 2)})
    assert "unexpected tensor" in (check_lora(not_a_lora, None, None, time_limit=LIMIT) or "")
    assert check_lora(b"not a safetensors file", None, None, time_limit=LIMIT) is not None
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buffer)  # a pickle checkpoint
    assert check_lora(buffer.getvalue(), None, None, time_limit=LIMIT) is not None


# ---- what a miner's callback carries besides the result -------------------------------------------


def test_a_miners_odd_timings_fingerprint_or_error_never_break_the_clients_view(subnet, db_url: str):
    # NaN and infinities (which Python's JSON reads), an over-long fingerprint and a NUL are
    # nothing PostgreSQL stores or a JSON answer holds: the client's status and list still answer.
    from orchestrator.test_orch_dispatch import CallbackSender, view_meta

    subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator(db_url=db_url, max_attempts=3)
    client = subnet.client(orch, subnet.new_key(orch))
    miner, callbacks, png = signer_from_uri("//Dave"), CallbackSender(orch.url), noise_png()

    timed = client.post("/v1/images", json=image_body()).json()["request_id"]
    wait_status(client, timed, {"running"})
    odd = {"total": float("nan"), "step_s": float("inf"), "load_s": 0.25}
    delivered = callbacks.send(timed, miner, view_meta(f"{timed}-1", png, timings=odd), png)
    assert delivered.status_code == 200 and delivered.json()["status"] == "succeeded", delivered.text
    view = client.get(f"/v1/requests/{timed}")
    assert view.status_code == 200 and view.json()["timings"]["miner"] == {"load_s": 0.25}, view.text

    marked = client.post("/v1/images", json=image_body(seed=8)).json()["request_id"]
    wait_status(client, marked, {"running"})
    long_print = callbacks.send(marked, miner, view_meta(f"{marked}-1", png, fingerprint="f" * 200), png)
    assert long_print.status_code == 422 and "fingerprint" in long_print.json()["detail"], long_print.text
    wait_until(lambda: client.get(f"/v1/requests/{marked}").json()["attempts"] == 2, 10, "the retry")
    failed = callbacks.send(
        marked, miner, view_meta(f"{marked}-2", None, status="failed", error="out\x00of memory"), None
    )
    assert failed.status_code == 200, failed.text
    attempts = orch.store.list_attempts(marked)
    assert [a.outcome for a in attempts][:2] == ["invalid", "failed"] and "out" in attempts[1].error
    listed = client.get("/v1/requests")
    assert listed.status_code == 200 and {view["request_id"] for view in listed.json()} == {timed, marked}
