"""Shared fixtures. The tiny profile builds in well under a second, so most tests use it directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests pin the thread count the engine uses; keep stray BLAS pools from oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_engine():
    from dippy_studio.engine import Engine, EngineOptions

    return Engine(EngineOptions(profile="tiny"))
