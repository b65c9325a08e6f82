"""A callback's body is not read before its signature headers, its signer and its declared size
check out: huge unsigned or wrongly signed bodies cost the orchestrator neither memory nor time.

Measured on the process that serves the orchestrator (this one: uvicorn runs in a thread), while a
client streams the body from one reused buffer, so the client side adds nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

import orchestrator.orch_kit as kit
from dippy_studio.orchestrator.callbacks import IN_MEMORY_BYTES, Spooled
from dippy_studio.protocol import signer_from_uri
from dippy_studio.protocol.auth import sign_request
from orchestrator.orch_kit import ORCHESTRATOR, image_body, wait_status

subnet = kit.subnet  # fixture: a local chain, miners and orchestrators

MIB = 1 << 20
# Well under what buffering any of these bodies would cost (64 MiB and more).
GROWTH_BOUND = 40 * MIB
FORM = "multipart/form-data; boundary=x"

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak RSS from Linux /proc")


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} line")


def reset_peak() -> None:
    # Buffered bodies are freed after the answer: only the peak (VmHWM) shows them.
    Path("/proc/self/clear_refs").write_text("5")


def zeros(total: int, chunk: int = MIB) -> Iterator[bytes]:
    block = bytes(chunk)
    for start in range(0, total, chunk):
        yield block[: min(chunk, total - start)]


def post_streamed(url: str, headers: dict[str, str], size: int) -> tuple[httpx.Response, float, int]:
    """POST `size` bytes with a Content-Length, streamed; the answer, seconds taken, and how far
    the peak RSS rose above the RSS before."""
    reset_peak()
    before = status("VmRSS")
    start = time.monotonic()
    with httpx.Client(timeout=60) as http:
        response = http.post(url, content=zeros(size), headers={**headers, "content-length": str(size)})
    return response, time.monotonic() - start, status("VmHWM") - before


def running_job(subnet, body: dict | None = None) -> tuple[kit.OrchHandle, httpx.Client, str]:
    subnet.add_stub_miner("//Dave")
    orch = subnet.start_orchestrator()
    client = subnet.client(orch, subnet.new_key(orch))
    if body is None:
        request_id = client.post("/v1/images", json=image_body()).json()["request_id"]
    else:
        upload = kit.dataset_zip()
        request_id = client.post("/v1/loras", data=body, files={"dataset": ("d.zip", upload)}).json()["request_id"]
    wait_status(client, request_id, {"running"})
    return orch, client, request_id


def test_an_unsigned_huge_callback_is_refused_without_reading_it(subnet):
    orch, client, request_id = running_job(subnet)
    url = f"{orch.url}/v1/miner-callbacks/{request_id}"
    response, seconds, growth = post_streamed(url, {"content-type": FORM}, 128 * MIB)
    assert response.status_code == 401 and "not signed" in response.json()["detail"]
    assert growth < GROWTH_BOUND, f"RSS grew {growth / MIB:.0f} MiB"
    assert seconds < 20
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "running"


def test_a_wrongly_signed_huge_lora_callback_is_streamed_not_buffered(subnet):
    # A training job's result may be large, so its body is read, to a temporary file, hashing as it
    # goes; the signature is then checked against that digest.
    orch, client, request_id = running_job(subnet, {"trigger_word": "sks", "steps": 1})
    path = f"/v1/miner-callbacks/{request_id}"
    # The assigned miner's hotkey, but signed over other bytes.
    headers = sign_request(signer_from_uri("//Dave"), "POST", path, b"other bytes", ORCHESTRATOR.ss58_address)
    response, seconds, growth = post_streamed(orch.url + path, {**headers, "content-type": FORM}, 96 * MIB)
    assert response.status_code == 401 and "does not verify" in response.json()["detail"]
    assert growth < GROWTH_BOUND, f"RSS grew {growth / MIB:.0f} MiB"
    assert seconds < 30
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "running"


def test_a_callback_must_declare_a_size_that_fits_its_kind(subnet):
    orch, client, request_id = running_job(subnet)
    path = f"/v1/miner-callbacks/{request_id}"
    url = orch.url + path
    miner = signer_from_uri("//Dave")

    def signed(body: bytes) -> dict[str, str]:
        return {**sign_request(miner, "POST", path, body, ORCHESTRATOR.ss58_address), "content-type": FORM}

    # A 64x64 image is a few kilobytes: 64 MiB is refused from its Content-Length alone.
    response, seconds, growth = post_streamed(url, signed(b""), 64 * MIB)
    assert response.status_code == 413 and "inference" in response.json()["detail"]
    assert growth < GROWTH_BOUND and seconds < 20
    # No Content-Length (chunked): the size cannot be checked first.
    with httpx.Client(timeout=30) as http:
        chunked = http.post(url, content=zeros(2 * MIB), headers=signed(b""))
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["detail"]
    assert client.get(f"/v1/requests/{request_id}").json()["status"] == "running"


@pytest.mark.parametrize("size", [0, 1000, IN_MEMORY_BYTES, 2 * IN_MEMORY_BYTES + 12345])
def test_a_spooled_body_hashes_and_reads_back_whole(tmp_path, size: int):
    data = os.urandom(size)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, size, 65536):
            yield data[start : start + 65536]

    async def spool() -> tuple[int, str, bytes]:
        with Spooled(tmp_path) as received:
            await received.take(chunks())
            return received.size, received.sha256, await received.read()

    assert asyncio.run(spool()) == (size, hashlib.sha256(data).hexdigest(), data)
