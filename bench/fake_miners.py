"""Instant fake miners for the throughput benchmark: real HTTP, real signatures, no engine.

    .venv/bin/python bench/fake_miners.py --count 8 --orchestrator SS58 [--key-prefix //bench/miner] [--delay-s S]
        [--workers W]

Starts `count` small ASGI apps under uvicorn on 127.0.0.1 (one event loop, one process), prints
one JSON line `{"miners": [{"uri", "hotkey", "port"}, ...]}` once they listen, and runs until its
stdin closes (so it never outlives the benchmark that started it).

Each miner speaks the miner protocol the orchestrator needs and does no work:

- `GET /health` answers 200; signed `GET /v1/capacity` answers a `Capacity` for the `tiny`
  profile with room in both lanes, so the orchestrator's registry marks it healthy.
- Signed `POST /v1/inference` (btauth/1, from the orchestrator's hotkey only) answers 202 at once,
  then POSTs a signed multipart callback (`meta` JobView, `result` PNG) to the job's callback_url.
  The PNG has the requested size and noise pixels (so the orchestrator's blank-image check
  passes); a tEXt chunk naming the miner's job id makes every result's bytes (and sha256) unique,
  as real results are. `meta.timings.miner_s` is the miner's own time, receipt to callback.
  With `--delay-s` each job takes that long before its callback, so jobs are in flight at a
  miner when a fault test kills it (tests/orchestrator/test_orch_crash.py).
- With `--workers W` a miner works on at most W jobs at once, holds one more in its queue, says so
  in its capacity, and answers 429 with Retry-After beyond that, as a real miner does (the
  fairness test, tests/orchestrator/test_orch_fairness.py). Without it, every job is taken at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import secrets
import socket
import struct
import sys
import threading
import time
import zlib
from datetime import UTC, datetime
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import uvicorn
from PIL import Image
from starlette.datastructures import Headers

from dippy_studio.chain.local import LocalChain
from dippy_studio.protocol import AuthError, MemoryNonceStore, SenderPolicy, Signer, signer_from_uri
from dippy_studio.protocol.auth import sign_request, verify_request

PROFILE = "tiny"
FINGERPRINT = "bench-fake-miner"
CALLBACK_ATTEMPTS = 5
CALLBACK_BACKOFF_S = 0.2
# The callback's deadline is the job's own; its timeout only bounds a stuck connection.
CALLBACK_TIMEOUT_S = 60.0
QUEUE_LIMIT = 1  # with --workers: jobs a busy miner holds beyond those it works on
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@lru_cache(maxsize=16)
def noise_png(width: int, height: int) -> bytes:
    """A valid, non-blank PNG of this size (seeded noise), rendered once per size."""
    pixels = np.random.default_rng(width * 7919 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def unique_png(width: int, height: int, job_id: str) -> bytes:
    """The size's noise PNG with a tEXt chunk naming the job right after the header chunk: same
    pixels, unique bytes. The benchmark recomputes it to check what the orchestrator stored."""
    base = noise_png(width, height)
    ihdr_end = len(_PNG_SIGNATURE) + 8 + 13 + 4  # length + type, 13 bytes of IHDR data, CRC
    data = b"dippy-job\x00" + job_id.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return base[:ihdr_end] + chunk + base[ihdr_end:]


def multipart(parts: list[tuple[str, str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body from (field, filename, content type, bytes) parts, and its
    content type. Built by hand: the miner's own `build_callback` goes through httpx, whose
    multipart encoder costs more than this whole fake miner otherwise does."""
    boundary = secrets.token_hex(16)
    chunks = []
    for name, filename, content_type, data in parts:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        chunks += [head.encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class FakeMiner:
    """One miner as a raw ASGI app: the smallest honest speaker of the miner protocol."""

    def __init__(
        self,
        signer: Signer,
        orchestrator_ss58: str,
        http: aiohttp.ClientSession,
        delay_s: float = 0.0,
        workers: int | None = None,
    ) -> None:
        self.signer = signer
        self.hotkey = signer.ss58_address
        self.http = http
        self.nonces = MemoryNonceStore()
        self.policy = SenderPolicy.allow_list([orchestrator_ss58])
        self.orchestrator = orchestrator_ss58
        self.delay_s = delay_s
        self.workers = workers
        self._working = asyncio.Semaphore(workers) if workers else None
        self.held = 0  # jobs accepted and not yet called back
        self.callbacks_failed = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        received = time.perf_counter()
        body = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/health":
            await _reply(send, 200, {"status": "ok"})
            return
        if (method, path) not in {("GET", "/v1/capacity"), ("POST", "/v1/inference")}:
            await _reply(send, 404, {"detail": "not found"})
            return
        target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        try:
            verify_request(
                Headers(scope=scope),
                body,
                method=method,
                path=target,
                receiver_ss58=self.hotkey,
                nonce_store=self.nonces,
                policy=self.policy,
            )
        except AuthError as exc:
            await _reply(send, exc.status_code, {"detail": exc.reason})
            return
        if path == "/v1/capacity":
            await _reply(send, 200, self.capacity())
            return
        job = json.loads(body)
        if self.workers and self.held >= self.workers + QUEUE_LIMIT:
            await _reply(send, 429, {"detail": "inference queue is full"}, {"retry-after": "1"})
            return
        self.held += 1
        await _reply(send, 202, {"job_id": job["job_id"], "status": "queued"})
        # After the reply, as a real miner's worker would: the orchestrator may see either first.
        task = asyncio.create_task(self.call_back(job, received))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def capacity(self) -> dict[str, Any]:
        workers, limit = (self.workers, QUEUE_LIMIT) if self.workers else (1, 10_000)
        lane = {"available": True, "workers_alive": workers, "workers": workers, "queue_depth": 0, "queue_limit": limit}
        return {
            "hotkey": self.hotkey,
            "profile": PROFILE,
            "fingerprints": [FINGERPRINT],
            "inference": lane,
            "training": {**lane, "available": False},
        }

    async def call_back(self, job: dict[str, Any], received: float) -> None:
        try:
            async with self._working or contextlib.nullcontext():
                await asyncio.sleep(self.delay_s)
                await self._deliver(job, received)
        finally:
            self.held -= 1

    async def _deliver(self, job: dict[str, Any], received: float) -> None:
        png = unique_png(job["width"], job["height"], job["job_id"])
        now = datetime.now(UTC).isoformat()
        meta = {
            "job_id": job["job_id"],
            "kind": "inference",
            "status": "succeeded",
            "created_at": now,
            "started_at": now,
            "finished_at": now,
            "deadline": job["deadline"],
            "result_sha256": hashlib.sha256(png).hexdigest(),
            "result_bytes": len(png),
            "fingerprint": FINGERPRINT,
            "timings": {"miner_s": time.perf_counter() - received},
        }
        body, content_type = multipart(
            [
                ("meta", "meta.json", "application/json", json.dumps(meta).encode()),
                ("result", "result.png", "image/png", png),
            ]
        )
        parts = urlsplit(job["callback_url"])
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        for attempt in range(CALLBACK_ATTEMPTS):
            # A fresh signature per try: the orchestrator refuses a replayed nonce.
            headers = sign_request(self.signer, "POST", target, body, self.orchestrator)
            headers["content-type"] = content_type
            try:
                async with self.http.post(job["callback_url"], data=body, headers=headers) as response:
                    await response.read()
                    if response.status < 500 and response.status not in (408, 409, 425, 429):
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(CALLBACK_BACKOFF_S * 2**attempt)
        self.callbacks_failed += 1


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Any, status: int, payload: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.encode(), value.encode()) for name, value in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bind() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve(
    count: int, orchestrator_ss58: str, key_prefix: str, delay_s: float = 0.0, workers: int | None = None
) -> None:
    # aiohttp rather than httpx: a sixth of the CPU per request (0.1 against 0.6 ms measured
    # here), and this process shares the cores with the orchestrator it measures.
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        servers, announced = [], []
        for i in range(count):
            uri = f"{key_prefix}{i}"
            miner = FakeMiner(signer_from_uri(uri), orchestrator_ss58, http, delay_s, workers)
            sock = bind()
            config = uvicorn.Config(miner, log_level="warning", lifespan="off", access_log=False)
            server = uvicorn.Server(config)
            # uvicorn's own signal handling assumes one server per process; stdin EOF stops these.
            server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
            servers.append((server, sock))
            announced.append({"uri": uri, "hotkey": miner.hotkey, "port": sock.getsockname()[1]})
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        threading.Thread(target=_wait_for_eof, args=(loop, stop), daemon=True).start()
        tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
        while not all(server.started for server, _ in servers):
            await asyncio.sleep(0.01)
        print(json.dumps({"miners": announced}), flush=True)
        await stop.wait()
        for server, _ in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


def register(chain_dir: Path, miners: list[dict[str, Any]]) -> None:
    """A LocalChain with every miner (as `serve` prints them) registered, staked and its endpoint
    committed."""
    chain = LocalChain(chain_dir / "chain.sqlite")
    try:
        for miner in miners:
            chain.register(miner["hotkey"], signer_from_uri(miner["uri"] + "//cold").ss58_address)
            chain.add_stake(miner["hotkey"], 10.0)
            chain.commit(miner["hotkey"], f"http://127.0.0.1:{miner['port']}")
    finally:
        chain.close()


def _wait_for_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    sys.stdin.read()
    loop.call_soon_threadsafe(stop.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--orchestrator", required=True, help="the orchestrator's hotkey (SS58)")
    parser.add_argument("--key-prefix", default="//bench/miner", help="miner i signs with dev key PREFIX{i}")
    parser.add_argument("--delay-s", type=float, default=0.0, help="seconds each job takes before its callback")
    parser.add_argument("--workers", type=int, default=None, help="jobs each miner works on at once (default: all)")
    args = parser.parse_args()
    asyncio.run(serve(args.count, args.orchestrator, args.key_prefix, args.delay_s, args.workers))


if __name__ == "__main__":
    main()
