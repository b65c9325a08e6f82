"""Miner test kit (fixtures for tests/miner): dev keys, a signed client, and a real HTTP server that receives callbacks
and serves files (LoRAs, datasets) on 127.0.0.1."""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dippy_studio.miner.app import create_app
from dippy_studio.miner.settings import MinerSettings
from dippy_studio.protocol import signer_from_uri
from dippy_studio.protocol.auth import sign_request

ORCHESTRATOR = signer_from_uri("//Alice")
MINER = signer_from_uri("//Bob")
STRANGER = signer_from_uri("//Charlie")


def deadline(seconds: float = 120.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def parts(self) -> dict[str, bytes]:
        """The multipart form parts by name."""
        head = f"Content-Type: {self.headers['content-type']}\r\n\r\n".encode()
        message = email.message_from_bytes(head + self.body, policy=email.policy.HTTP)
        return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                for part in message.iter_parts()}  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return json.loads(self.parts()["meta"])


@dataclass
class TestServer:
    """Receives POSTs (recording them, failing the first `fail_first` with 500) and serves files."""

    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    fail_first: int = 0
    attempts: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 60.0) -> list[Received]:
        with self.cond:
            if not self.cond.wait_for(lambda: predicate(self.received), timeout=timeout):
                raise AssertionError(f"timed out; received {[r.path for r in self.received]}")
            return list(self.received)

    def callbacks_for(self, job_id: str) -> list[Received]:
        return [r for r in self.received if r.path == f"/callback/{job_id}"]


@pytest.fixture
def server() -> Iterator[TestServer]:
    state = TestServer()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with state.cond:
                state.attempts += 1
                failing = state.attempts <= state.fail_first
                if not failing:
                    state.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                state.cond.notify_all()
            self.send_response(500 if failing else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            data = state.files.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.send_header("content-length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()


def miner_settings(tmp_path: Path, **overrides: Any) -> MinerSettings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "miner",
        dev_key="//Bob",
        allow_hotkeys=[ORCHESTRATOR.ss58_address],
        allow_loopback_urls=True,
        callback_backoff=0.05,
        callback_attempts=4,
        # The receiver here counts callbacks; progress reports are tested on their own (test_miner_progress).
        progress_interval_s=0.0,
    )
    return MinerSettings(**{**values, **overrides})


class SignedClient:
    """A TestClient wrapper that signs every /v1 request like the orchestrator does."""

    def __init__(self, client: TestClient, signer=ORCHESTRATOR, scheme: str = "btauth") -> None:
        self.client = client
        self.signer = signer
        self.scheme = scheme

    def request(self, method: str, path: str, payload: Any = None, *, signer=None, scheme=None, **kwargs: Any):
        body = b"" if payload is None else json.dumps(payload).encode()
        headers = sign_request(signer or self.signer, method, path, body, MINER.ss58_address, scheme or self.scheme)
        headers["content-type"] = "application/json"
        return self.client.request(method, path, content=body, headers=headers, **kwargs)

    def post(self, path: str, payload: Any = None, **kwargs: Any):
        return self.request("POST", path, payload, **kwargs)

    def get(self, path: str, **kwargs: Any):
        return self.request("GET", path, **kwargs)

    def wait_status(self, job_id: str, statuses: set[str], timeout: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            view = self.get(f"/v1/jobs/{job_id}").json()
            if view["status"] in statuses:
                return view
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {statuses}; last {view}")


@pytest.fixture
def make_miner(tmp_path, tiny_engine):
    """Start a miner app (lifespan included) and return a signed client for it."""
    clients: list[TestClient] = []

    def start(settings: MinerSettings | None = None, **components: Any) -> SignedClient:
        app = create_app(settings or miner_settings(tmp_path), engine=components.pop("engine", tiny_engine),
                         **components)  # fmt: skip
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return SignedClient(client)

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def inference_job(job_id: str, server: TestServer | None = None, **overrides: Any) -> dict[str, Any]:
    job: dict[str, Any] = dict(
        job_id=job_id, prompt="a lighthouse at dusk", seed=7, width=64, height=64, steps=4, guidance=3.5,
        loras=[], deadline=deadline(),
    )  # fmt: skip
    if server is not None:
        job["callback_url"] = server.url(f"/callback/{job_id}")
    job.update(overrides)
    return job
