"""Orchestrator test kit: a local subnet in one process.

A LocalChain file; real miner apps (and small stub miners for misbehaviour) served by uvicorn on
127.0.0.1 in background threads, registered on the chain with their endpoints committed; an
orchestrator app, also under uvicorn, so miners call back over real HTTP; and clients with API keys.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from dippy_studio.chain.local import LocalChain
from dippy_studio.engine.images import encode_png
from dippy_studio.engine.synthetic_data import shape_images, zip_bytes
from dippy_studio.miner.app import create_app as create_miner_app
from dippy_studio.miner.settings import MinerSettings
from dippy_studio.miner.store import JobRecord
from dippy_studio.miner.workers import AbortCheck, Outcome
from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.app import create_app as create_orchestrator_app
from dippy_studio.orchestrator.audit import Auditor, AuditSampler, SamplerPolicy
from dippy_studio.orchestrator.models import Lora
from dippy_studio.orchestrator.results import lora_id_for
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store, Success, job_row
from dippy_studio.protocol import signer_from_uri

ORCHESTRATOR = signer_from_uri("//Alice")
MINER_URIS = ["//Bob", "//Charlie", "//Dave", "//Eve", "//Ferdie"]


class Served:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, sock: socket.socket | None = None) -> None:
        self.sock = sock or bind()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


def bind() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class MinerHandle:
    uri: str
    hotkey: str
    uid: int
    served: Served
    # What a stub miner received (job bodies), for assertions.
    received: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.served.url


@dataclass
class Key:
    id: str
    secret: str
    webhook_secret: str


@dataclass
class OrchHandle:
    app: FastAPI
    served: Served

    @property
    def orch(self) -> Orchestrator:
        return self.app.state.orchestrator

    @property
    def url(self) -> str:
        return self.served.url

    @property
    def store(self) -> Store:
        return self.orch.store


def stub_miner_app(
    hotkey: str,
    received: list[dict[str, Any]],
    *,
    accept: bool = True,
    refusals: Iterable[tuple[int, str]] = (),
    lane: dict[str, Any] | None = None,
) -> FastAPI:
    """A miner that answers probes like a real one and accepts jobs (202) but never does them:
    the 'never calls back' miner. With accept=False it refuses every job with 503. `refusals`
    answer the first sends, one each, as (status, Retry-After); `lane` is what it advertises."""
    app = FastAPI()
    lane = {"available": True, "workers_alive": 1, "workers": 1, "queue_depth": 0, "queue_limit": 64, **(lane or {})}
    pending = list(refusals)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/capacity")
    def capacity() -> dict[str, Any]:
        return {"hotkey": hotkey, "profile": "tiny", "fingerprints": ["stub"], "inference": lane, "training": lane}

    @app.post("/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, str]:
        received.append({"cancel": job_id})
        return {"job_id": job_id, "status": "canceled"}

    @app.post("/v1/inference")
    @app.post("/v1/train")
    async def job(request: Request) -> JSONResponse:
        body = await request.json()
        received.append(body)
        if not accept:
            return JSONResponse({"detail": "busy"}, status_code=503, headers={"Retry-After": "30"})
        if pending:
            status, retry_after = pending.pop(0)
            return JSONResponse({"detail": "queue is full"}, status_code=status, headers={"Retry-After": retry_after})
        return JSONResponse({"job_id": body["job_id"], "status": "queued"}, status_code=202)

    return app


class Subnet:
    def __init__(self, tmp_path: Path, engine: Any) -> None:
        self.tmp_path = tmp_path
        self.engine = engine
        self.chain = LocalChain(tmp_path / "chain.sqlite", 0.5)
        self.chain.register(ORCHESTRATOR.ss58_address, signer_from_uri("//Alice//cold").ss58_address)
        self.miners: list[MinerHandle] = []
        self.orchestrators: list[OrchHandle] = []
        self._clients: list[httpx.Client] = []

    # ---- miners -------------------------------------------------------------------------------

    def _register(self, uri: str, url: str, stake: float) -> tuple[str, int]:
        hotkey = signer_from_uri(uri).ss58_address
        uid = self.chain.register(hotkey, signer_from_uri(uri + "//cold").ss58_address)
        if stake > 0:
            self.chain.add_stake(hotkey, stake)
        self.chain.commit(hotkey, url)
        return hotkey, uid

    def add_miner(self, uri: str, *, stake: float = 10.0, **components: Any) -> MinerHandle:
        """A real miner service (tiny engine shared), registered with its endpoint committed."""
        settings = MinerSettings(
            data_dir=self.tmp_path / f"miner{uri.replace('/', '_')}",
            dev_key=uri,
            allow_hotkeys=[ORCHESTRATOR.ss58_address],
            allow_loopback_urls=True,
            callback_backoff=0.05,
            callback_attempts=3,
            **components.pop("settings", {}),
        )
        app = create_miner_app(settings, engine=components.pop("engine", self.engine), **components)
        served = Served(app)
        hotkey, uid = self._register(uri, served.url, stake)
        handle = MinerHandle(uri, hotkey, uid, served)
        self.miners.append(handle)
        return handle

    def add_stub_miner(
        self,
        uri: str,
        *,
        stake: float = 10.0,
        accept: bool = True,
        refusals: Iterable[tuple[int, str]] = (),
        lane: dict[str, Any] | None = None,
    ) -> MinerHandle:
        hotkey = signer_from_uri(uri).ss58_address
        received: list[dict[str, Any]] = []
        served = Served(stub_miner_app(hotkey, received, accept=accept, refusals=refusals, lane=lane))
        hotkey, uid = self._register(uri, served.url, stake)
        handle = MinerHandle(uri, hotkey, uid, served, received)
        self.miners.append(handle)
        return handle

    # ---- orchestrators and clients ------------------------------------------------------------

    def start_orchestrator(
        self, *, data_dir: Path | None = None, audit_all: bool = False, **overrides: Any
    ) -> OrchHandle:
        """An orchestrator under uvicorn. Audits run on the shared tiny engine: of every job with
        `audit_all`, else of none (so other tests do not pay for re-runs)."""
        sock = bind()
        values: dict[str, Any] = dict(
            data_dir=data_dir or self.tmp_path / f"orch{len(self.orchestrators)}",
            public_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
            allow_loopback_urls=True,
            dispatch_interval_s=0.05,
            sweep_interval_s=0.1,
            sync_interval_s=0.2,
            probe_interval_s=0.2,
            webhook_interval_s=0.05,
            webhook_backoff_s=0.05,
            min_attempt_s=0.5,
            refusal_cooldown_s=0.5,
        )
        names = ("store", "score_fn", "rng", "clock", "auditor", "sampler")
        components = {k: overrides.pop(k) for k in names if k in overrides}
        settings = OrchestratorSettings(**{**values, **overrides})
        rate = 1.0 if audit_all else 0.0
        sampler = AuditSampler(SamplerPolicy(base_rate=rate, probation_rate=rate, max_gap=10**9))
        components.setdefault("auditor", Auditor([self.engine]))
        components.setdefault("sampler", sampler)
        app = create_orchestrator_app(settings, chain=self.chain, signer=ORCHESTRATOR, **components)
        handle = OrchHandle(app, Served(app, sock))
        self.orchestrators.append(handle)
        return handle

    def new_key(self, orch: OrchHandle, *, rate: int = 100_000, name: str = "test") -> Key:
        created = orch.store.create_api_key(name, rate_limit_per_minute=rate)
        return Key(created.key.id, created.secret, created.key.webhook_secret)

    def client(self, orch: OrchHandle, key: Key | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key.secret}"} if key else {}
        client = httpx.Client(base_url=orch.url, headers=headers, timeout=30)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for handle in self.orchestrators:
            handle.served.stop()
        for miner in self.miners:
            miner.served.stop()
        self.chain.close()


@pytest.fixture
def subnet(tmp_path: Path, tiny_engine: Any) -> Iterator[Subnet]:
    net = Subnet(tmp_path, tiny_engine)
    yield net
    net.close()


def image_body(**overrides: Any) -> dict[str, Any]:
    return {"prompt": "a lighthouse at dusk", "seed": 7, "width": 64, "height": 64, "steps": 2, **overrides}


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_status(client: httpx.Client, request_id: str, statuses: set[str], timeout: float = 30.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = client.get(f"/v1/requests/{request_id}").json()
        return last if last.get("status") in statuses else None

    try:
        return wait_until(reached, timeout, f"{request_id} to reach {statuses}")
    except AssertionError:
        raise AssertionError(f"{request_id} never reached {statuses}; last {last}") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dataset_zip(count: int = 2) -> bytes:
    """A small training dataset: png + caption pairs in a zip."""
    files = []
    for name, image, caption in shape_images("sunset", count, seed=0, size=32):
        files += [(f"{name}.png", encode_png(image)), (f"{name}.txt", caption.encode())]
    return zip_bytes(files)


def noise_png(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


def bad_runner(tmp_path: Path, make_png: Callable[[dict[str, Any]], bytes]):
    """A miner lane that 'renders' whatever `make_png` returns for the request."""

    def run(record: JobRecord, check: AbortCheck) -> Outcome:
        data = make_png(record.request)
        path = tmp_path / f"{record.job_id}.png"
        path.write_bytes(data)
        return Outcome(str(path), sha256(data), len(data), "fingerprint-of-a-cheat")

    return run


def trained_lora(
    store: Store, api_key_id: str, name: str, sha256: str, rank: int, trigger_word: str = "", model: str = "tiny"
) -> Lora:
    """A LoRA registered the way production registers one: a training job for the key (and
    `model`) whose miner delivered `sha256` (`Store.succeed` with what the training kind registers)."""
    deadline = datetime.now(UTC) + timedelta(hours=1)
    payload = {"name": name, "rank": rank, "trigger_word": trigger_word, "dataset_sha256": "0" * 64}
    (job,) = store.insert_jobs([job_row(api_key_id, "training", payload, deadline, 60, model=model)])
    (claimed,) = store.claim_for_dispatch(1, kinds=["training"], assign=lambda job, tried: ("miner", 1))
    assert claimed.id == job.id
    success = Success(sha256, 1, None, {}, lora=kinds.get("training").registers(claimed, sha256))
    assert store.succeed(job.id, success, attempt=claimed.attempts)
    lora = store.get_lora(lora_id_for(job.id), api_key_id)
    assert lora is not None
    return lora
