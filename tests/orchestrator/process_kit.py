"""Real processes for fault tests: `dippy-studio orchestrator serve` and bench/fake_miners.py
(signed miner protocol, no engine), each in a process of its own so a test can kill it alone."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from dippy_studio.protocol import signer_from_uri
from localnet_kit import free_port

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_module(name: str) -> Any:
    """A module of bench/ (a folder of scripts, not a package), loaded under a private name."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fake_miners = _bench_module("fake_miners")
register = fake_miners.register
tail = _bench_module("common").tail


class FakeMiners:
    """bench/fake_miners.py in a process of its own, so that it can be killed alone."""

    def __init__(self, prefix: str, count: int, log: Path, orchestrator_uri: str, *extra: str) -> None:
        args = [sys.executable, str(BENCH / "fake_miners.py"), "--count", str(count), "--key-prefix", prefix,
                "--orchestrator", signer_from_uri(orchestrator_uri).ss58_address, *extra]  # fmt: skip
        self.log = log
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
        )

    def listening(self) -> list[dict[str, Any]]:
        """The miners (uri, hotkey, port), once they listen: the process prints them as one JSON
        line (call this once)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"fake miners did not start:\n{tail(self.log)}")
        return json.loads(line)["miners"]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF is its signal to stop
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class OrchestratorProcess:
    """`dippy-studio orchestrator serve` on one database and port, started again after a crash."""

    def __init__(
        self,
        tmp_path: Path,
        db_url: str,
        dev_key: str,
        env: Mapping[str, str],
        name: str = "orchestrator",
        data_dir: Path | None = None,
    ) -> None:
        """`name`: replicas on one database each get their own data dir and log (tmp_path/NAME-data,
        tmp_path/logs/NAME.log); the first keeps tmp_path/orch. `data_dir`: share one instead."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env)
        self.log = tmp_path / "logs" / f"{name}.log"
        self.data_dir = data_dir or tmp_path / ("orch" if name == "orchestrator" else f"{name}-data")
        self.args = [sys.executable, "-m", "dippy_studio.cli", "orchestrator", "serve",
                     "--data-dir", str(self.data_dir), "--db", db_url, "--port", str(self.port),
                     "--dev-key", dev_key, "--chain-data-dir", str(tmp_path / "chain"),
                     "--allow-loopback"]  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                self.args, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def kill(self) -> None:
        """kill -9, its whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def healthy_miners(self) -> int:
        try:
            return int(httpx.get(f"{self.url}/ready", timeout=2).json().get("healthy_miners", 0))
        except (httpx.HTTPError, ValueError):
            return 0
