"""The knobs that make generation bit-reproducible (see FACTS.md for the measurements)."""

from __future__ import annotations

import os

import torch


def configure_threads(threads: int) -> None:
    """Pin torch's intra-op thread count: reductions split differently with more threads."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def configure_cuda() -> None:
    """Disable the CUDA paths that trade determinism for speed."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@torch.no_grad()
def realign_parameters(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer with a fresh, aligned copy.

    Tensors memory-mapped from safetensors can sit at addresses that are not 64-byte aligned;
    MKL then takes different code paths and results differ in the last bits.
    """
    for param in module.parameters():
        param.data = param.data.clone()
    for name, buffer in list(module.named_buffers()):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._buffers[attr] = buffer.clone()
