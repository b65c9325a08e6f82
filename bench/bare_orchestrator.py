"""A bare orchestrator, the throughput benchmark's baseline: the same three signed HTTP exchanges
per job as the real one, through minimal handlers and no database.

    .venv/bin/python bench/bare_orchestrator.py --port PORT --dev-key URI --miners JSON --keys JSON

Per job, as the orchestrator does it:

1. A client's `POST /v1/images` (JSON) with `Authorization: Bearer <key>`: the key's sha256 is
   looked up in a dict, the job goes into another, and the answer is 202.
2. A btauth-signed `POST /v1/inference` (a `protocol.schemas.InferenceJob`) to the next fake
   miner, round robin, with aiohttp and at most 32 sends in flight (the orchestrator's defaults).
3. The miner's signed multipart callback `POST /v1/miner-callbacks/{id}`: verified with
   `protocol.auth.verify_request` (nonces in memory, miners' hotkeys allowed), read with
   `protocol.multipart.parse_form`; the result's sha256 must be the one its `meta` claims.

No queue, no registry probes, no retries, no result storage: what is left is the floor that any
orchestrator on this machine stands on. Several of these processes stand in for `serve --workers
N`: each listens on the shared port (SO_REUSEPORT) and on a private port of its own, which its
callbacks and the benchmark's reads use (`GET /bench/counts?key=ID`, `GET /bench/jobs?key=ID`),
since the shared port may reach any process. Prints `{"private_port": P}` once it listens; runs
until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import aiohttp
import uvicorn
from starlette.datastructures import Headers

from dippy_studio.protocol import AuthError, MemoryNonceStore, SenderPolicy, Signer, signer_from_uri
from dippy_studio.protocol.auth import sign_request, verify_request
from dippy_studio.protocol.multipart import FormError, parse_form
from dippy_studio.protocol.schemas import InferenceJob

SENDS_IN_FLIGHT = 32
DEADLINE_S = 120.0
DEFAULT_STEPS = 4
CALLBACK_PREFIX = "/v1/miner-callbacks/"


class BareOrchestrator:
    """The ASGI app: jobs by id in memory, keyed API-key hashes, miners round robin."""

    def __init__(
        self,
        signer: Signer,
        keys: dict[str, str],
        miners: list[dict[str, Any]],
        public_url: str,
        http: aiohttp.ClientSession,
    ) -> None:
        self.signer = signer
        self.hotkey = signer.ss58_address
        self.key_ids = {digest: key_id for key_id, digest in keys.items()}  # sha256 of the secret -> id
        self.miners = itertools.cycle([(m["hotkey"], f"http://127.0.0.1:{m['port']}") for m in miners])
        self.public_url = public_url
        self.http = http
        self.nonces = MemoryNonceStore()
        self.policy = SenderPolicy.allow_list([m["hotkey"] for m in miners])
        self.jobs: dict[str, dict[str, Any]] = {}
        self.sends = asyncio.Semaphore(SENDS_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        method, path = scope["method"], scope["path"]
        if method == "POST" and path == "/v1/images":
            await self.submit(scope, body, send)
        elif method == "POST" and path.startswith(CALLBACK_PREFIX):
            await self.callback(scope, body, send)
        elif method == "GET" and path == "/health":
            await _reply(send, 200, {"status": "ok"})
        elif method == "GET" and path in ("/bench/counts", "/bench/jobs"):
            key_id = parse_qs(scope["query_string"].decode()).get("key", [""])[0]
            mine = [job for job in self.jobs.values() if job["api_key_id"] == key_id]
            if path == "/bench/counts":
                await _reply(send, 200, Counter(job["status"] for job in mine))
            else:
                await _reply(send, 200, mine)
        else:
            await _reply(send, 404, {"detail": "not found"})

    async def submit(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        scheme, _, secret = Headers(scope=scope).get("authorization", "").partition(" ")
        key_id = self.key_ids.get(hashlib.sha256(secret.encode()).hexdigest()) if scheme == "Bearer" else None
        if key_id is None:
            await _reply(send, 401, {"detail": "invalid API key"})
            return
        try:
            request = json.loads(body)
            payload = {k: request[k] for k in ("prompt", "seed", "width", "height")}
        except (ValueError, KeyError, TypeError):
            await _reply(send, 422, {"detail": "prompt, seed, width and height are required"})
            return
        job_id = f"req_{uuid.uuid4().hex}"
        self.jobs[job_id] = job = {
            "id": job_id,
            "api_key_id": key_id,
            "status": "queued",
            "attempts": 0,
            "payload": {**payload, "steps": request.get("steps", DEFAULT_STEPS)},
            "created_at": time.time(),
            "dispatched_at": None,
            "finished_at": None,
            "timings": {},
            "result_sha256": None,
            "miner_hotkey": None,
        }
        await _reply(send, 202, {"request_id": job_id, "status": "queued"})
        task = asyncio.create_task(self.dispatch(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def dispatch(self, job: dict[str, Any]) -> None:
        async with self.sends:
            hotkey, url = next(self.miners)
            job["attempts"] += 1
            job["dispatched_at"] = time.time()
            job["miner_hotkey"] = hotkey
            wire = InferenceJob(
                job_id=f"{job['id']}-{job['attempts']}",
                callback_url=f"{self.public_url}{CALLBACK_PREFIX}{job['id']}",
                deadline=datetime.now(UTC) + timedelta(seconds=DEADLINE_S),
                **job["payload"],
            )
            body = wire.model_dump_json(exclude_none=True).encode()
            headers = sign_request(self.signer, "POST", "/v1/inference", body, hotkey)
            headers["content-type"] = "application/json"
            try:
                async with self.http.post(f"{url}/v1/inference", data=body, headers=headers) as response:
                    await response.read()
                    accepted = response.status in (200, 202)
            except (aiohttp.ClientError, TimeoutError):
                accepted = False
            # A fast miner may have called back before its 202 arrived.
            if job["status"] == "queued":
                job["status"] = "running" if accepted else "failed"

    async def callback(self, scope: dict[str, Any], body: bytes, send: Any) -> None:
        headers = Headers(scope=scope)
        target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        try:
            caller = verify_request(
                headers,
                body,
                method="POST",
                path=target,
                receiver_ss58=self.hotkey,
                nonce_store=self.nonces,
                policy=self.policy,
            )
        except AuthError as exc:
            await _reply(send, exc.status_code, {"detail": exc.reason})
            return
        job = self.jobs.get(scope["path"][len(CALLBACK_PREFIX) :])
        if job is None or job["miner_hotkey"] != caller.hotkey_ss58:
            await _reply(send, 404, {"detail": "no such job for this miner"})
            return
        try:
            form = parse_form(body, headers.get("content-type"))
            meta, result = json.loads(form["meta"]), form["result"]
        except (FormError, KeyError, ValueError):
            await _reply(send, 422, {"detail": "expected a multipart form with meta and result"})
            return
        digest = hashlib.sha256(result).hexdigest()
        if meta.get("job_id") != f"{job['id']}-{job['attempts']}" or meta.get("result_sha256") != digest:
            await _reply(send, 422, {"detail": "not this attempt's result"})
            return
        job.update(status="succeeded", finished_at=time.time(), result_sha256=digest)
        job["timings"]["miner"] = meta.get("timings", {})
        await _reply(send, 200, {"status": "succeeded"})


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def listen(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    return sock


async def serve(port: int, dev_key: str, miners: list[dict[str, Any]], keys: dict[str, str]) -> None:
    shared, private = listen(port, reuse_port=True), listen(0, reuse_port=False)
    private_port = private.getsockname()[1]
    # No connection cap of aiohttp's own, as in the orchestrator's dispatcher: the semaphore bounds sends.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http:
        app = BareOrchestrator(signer_from_uri(dev_key), keys, miners, f"http://127.0.0.1:{private_port}", http)
        # The same server as the orchestrator's (uvicorn, with uvloop and httptools when installed).
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # stdin EOF stops it
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        threading.Thread(target=_wait_for_eof, args=(loop, stop), daemon=True).start()
        task = asyncio.create_task(server.serve(sockets=[shared, private]))
        while not server.started:
            if task.done():
                await task  # it failed: raise why
            await asyncio.sleep(0.01)
        print(json.dumps({"private_port": private_port}), flush=True)
        await stop.wait()
        server.should_exit = True
        await task


def _wait_for_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    sys.stdin.read()
    loop.call_soon_threadsafe(stop.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the shared port (SO_REUSEPORT)")
    parser.add_argument("--dev-key", required=True, help="the orchestrator's dev key URI, e.g. //bench/orchestrator")
    parser.add_argument("--miners", required=True, help='JSON: [{"hotkey": SS58, "port": N}, ...]')
    parser.add_argument("--keys", required=True, help="JSON: {key id: sha256 hex of its secret}")
    args = parser.parse_args()
    # uvloop when installed, as `uvicorn.Server.run` picks it for the orchestrator.
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.port, args.dev_key, json.loads(args.miners), json.loads(args.keys)))


if __name__ == "__main__":
    main()
