"""Fixtures for chain tests (helpers and keys: `chain.chain_support`, tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chain.chain_support import Clock
from dippy_studio.chain import Hyperparameters, LocalChain


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_chain(tmp_path: Path, clock: Clock):
    """A LocalChain with 1 s blocks on the test clock; keyword arguments set hyperparameters."""

    def make(**hyperparameters) -> LocalChain:
        return LocalChain(tmp_path / "chain.sqlite", 1.0, clock, hyperparameters=Hyperparameters(**hyperparameters))

    return make
