"""The README's curl examples for builders run as written, with real curl, against an orchestrator
with a real miner: a documented command that stopped working would fail here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import orchestrator.orch_kit as kit
from orchestrator.orch_kit import image_body, wait_status

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators

README = Path(__file__).resolve().parents[2] / "README.md"


def section_commands(heading: str) -> list[str]:
    """The shell lines of the first ```bash block under `heading`, comments dropped."""
    text = README.read_text()
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {heading!r}"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl on PATH")
def test_the_live_status_paging_and_models_examples_run(subnet, tmp_path):
    subnet.add_miner("//Bob")
    orch = subnet.start_orchestrator()
    key = subnet.new_key(orch)
    client = subnet.client(orch, key)
    request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    wait_status(client, request_id, {"succeeded"})

    commands = section_commands("### Live status, paging, models")
    assert len(commands) == 3 and all(command.startswith("curl ") for command in commands)
    # A .curlrc that makes every HTTP error a failed command, as `set -e` sees it.
    (tmp_path / ".curlrc").write_text("fail\nsilent\nshow-error\nmax-time = 60\n")
    env = {**os.environ, "CURL_HOME": str(tmp_path), "URL": orch.url, "KEY": key.secret, "ID": request_id}
    outputs = []
    for command in commands:
        run = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, (command, run.stderr)
        outputs.append(run.stdout)
    events, listing, models = outputs
    assert "event: status" in events and '"succeeded"' in events
    assert request_id in listing
    assert '"id":"tiny"' in models.replace(" ", "")
