"""What a miner delivers is checked before it counts: one LoRA shape rule at delivery and in audits."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save

from dippy_studio.orchestrator.results import check_lora

TARGETS = ["to_q", "to_k"]


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
