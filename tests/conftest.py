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


@pytest.fixture(autouse=True)
def _sse_streams_open():
    """sse-starlette ends every event stream in the process once any uvicorn server in it is told
    to exit (a process-global flag, right for a service that is one server per process). Tests run
    many servers in one process, and one test's Ctrl-C must not end another test's streams."""
    from sse_starlette.sse import AppStatus

    AppStatus.should_exit = False
    yield
    AppStatus.should_exit = False
