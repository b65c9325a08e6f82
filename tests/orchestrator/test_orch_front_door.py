"""The orchestrator is a front door, not a model server: starting it loads no model code."""

from __future__ import annotations

import json
import operator
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dippy_studio.orchestrator import model_code

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


LORA_CHECKS = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from dippy_studio.orchestrator.results import check_lora, check_lora_fit

    good, misfit = (Path(p).read_bytes() for p in sys.argv[1:3])
    seen = {
        "fits": check_lora_fit(good, "tiny", None, time_limit=60),
        "misfit": check_lora_fit(misfit, "tiny", None, time_limit=60),
        "trained": check_lora(good, 2, ["to_q"], time_limit=60),
        "wrong_rank": check_lora(good, 4, ["to_q"], time_limit=60),
        "pickle": check_lora_fit(b"\\x80\\x04 pickle", "tiny", None, time_limit=60),
    }
    seen["heavy"] = sorted(name for name in ("torch", "diffusers", "transformers", "peft") if name in sys.modules)
    print(json.dumps(seen))
    """
)


def tiny_lora(width: int) -> bytes:
    """A LoRA of rank 2 on one attention layer; the tiny profile's layers are 32 wide."""
    import torch
    from safetensors.torch import save

    layer = "transformer.transformer_blocks.0.attn.to_q"
    return save({f"{layer}.lora_A.weight": torch.zeros(2, width), f"{layer}.lora_B.weight": torch.zeros(width, 2)})


@pytest.mark.timeout(120)
def test_a_lora_is_checked_without_loading_model_code_in_the_orchestrator(tmp_path: Path):
    """A client's LoRA (fitted to the profile's layers) and a miner's trained one (its promised
    shape) are checked as before, in a child process: the replica still holds no torch."""
    (tmp_path / "good").write_bytes(tiny_lora(width=32))
    (tmp_path / "misfit").write_bytes(tiny_lora(width=8))
    args = [sys.executable, "-c", LORA_CHECKS, str(tmp_path / "good"), str(tmp_path / "misfit")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["fits"] is None and seen["trained"] is None, seen
    assert "does not fit this profile" in seen["misfit"] and "needs (2, 32)" in seen["misfit"]
    assert "rank" in seen["wrong_rank"] and "pickle" in seen["pickle"]
    assert seen["heavy"] == []


@pytest.mark.timeout(240)
def test_a_check_that_kills_or_outlasts_the_checking_process_gets_no_answer_and_the_next_is_checked():
    with pytest.raises(model_code.ModelCodeUnavailable, match="stopped while reading it"):
        model_code.run(os._exit, (3,), 60)
    # The hung check is stopped at its limit, not at its end; a new child is started for it first
    # (its torch import is outside the limit).
    started = time.monotonic()
    with pytest.raises(model_code.ModelCodeUnavailable, match="longer than 0.5 s"):
        model_code.run(time.sleep, (120,), 0.5)
    assert time.monotonic() - started < 90
    assert model_code.run(operator.add, ("still ", "answering"), 60) == "still answering"


STOPPED_BY_SIGNAL = textwrap.dedent(
    """
    import sys
    from dippy_studio.orchestrator import model_code
    from dippy_studio.orchestrator.serve import run_server
    from dippy_studio.orchestrator.settings import OrchestratorSettings

    async def app(scope, receive, send):  # a server that has checked a LoRA: its child is up
        assert scope["type"] == "lifespan"
        while (message := await receive())["type"] != "lifespan.shutdown":
            model_code.run(len, (b"a LoRA",), 60)
            print("checked", flush=True)
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    if __name__ == "__main__":
        run_server(app, OrchestratorSettings(data_dir=sys.argv[1], dev_key="//Alice", port=0))
    """
)


@pytest.mark.timeout(120)
def test_a_server_stopped_by_its_signal_stops_the_checking_process_and_leaks_nothing(tmp_path: Path):
    """uvicorn ends a stopped server by re-raising the signal, which runs no finalizers: the
    model-code child must be stopped before, or multiprocessing warns of leaked semaphores."""
    script = tmp_path / "serve.py"
    script.write_text(STOPPED_BY_SIGNAL)
    server = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "checked"
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == -signal.SIGTERM, stderr[-2000:]
    assert "leaked semaphore" not in stderr, stderr[-2000:]
