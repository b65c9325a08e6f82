"""The orchestrator is a front door, not a model server: starting it loads no model code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STARTUP = textwrap.dedent(
    """
    import json, sys
    from fastapi.testclient import TestClient
    from dippy_studio.orchestrator.app import create_app
    from dippy_studio.orchestrator.settings import OrchestratorSettings

    settings = OrchestratorSettings(data_dir=sys.argv[1], dev_key="//Alice", audit=True)
    with TestClient(create_app(settings)) as client:  # the lifespan runs: loops, dispatcher, audits
        health = client.get("/health").status_code
        refused = client.post("/v1/images", json={"prompt": "x", "width": 64, "height": 64}).status_code
    heavy = sorted(name for name in ("torch", "diffusers", "transformers", "peft") if name in sys.modules)
    print(json.dumps({"health": health, "refused": refused, "heavy": heavy}))
    """
)


@pytest.mark.timeout(120)
def test_starting_the_orchestrator_imports_no_model_code(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-c", STARTUP, str(tmp_path)], capture_output=True, text=True, timeout=100, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Served, and refused an unauthenticated submission, with no torch, diffusers, transformers or peft.
    assert seen == {"health": 200, "refused": 401, "heavy": []}
