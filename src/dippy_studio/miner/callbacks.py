"""Result delivery: a signed multipart POST to the job's callback_url, retried with backoff.

The body has two parts: `meta` (the JobView as JSON) and, for succeeded jobs, `result` (the
PNG or .safetensors). It is signed with the miner's hotkey over the exact bytes sent, so the
orchestrator can prove who sent the result.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from dippy_studio.miner.net import send_for_status
from dippy_studio.miner.store import JobRecord, JobStore
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.outbound import OutboundError, UrlPolicy, check_url, guarded_client
from dippy_studio.protocol.schemas import JobKind, JobStatus

log = logging.getLogger("dippy_studio.miner.callbacks")

MEDIA_TYPES = {
    JobKind.inference: ("result.png", "image/png"),
    JobKind.training: ("lora.safetensors", "application/octet-stream"),
}


def build_callback(record: JobRecord, signer: Signer, receiver_ss58: str | None) -> httpx.Request:
    """The signed multipart request for one job's callback."""
    files: dict[str, tuple[str, bytes, str]] = {
        "meta": ("meta.json", record.view().model_dump_json().encode(), "application/json")
    }
    if record.status == JobStatus.succeeded and record.result_path:
        name, media_type = MEDIA_TYPES[record.kind]
        files["result"] = (name, Path(record.result_path).read_bytes(), media_type)
    assert record.callback_url is not None
    request = httpx.Request("POST", record.callback_url, files=files)
    body = request.read()
    parts = urlsplit(record.callback_url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request.headers.update(sign_request(signer, "POST", path, body, receiver_ss58))
    return request


class CallbackSender:
    """A background thread that delivers callbacks, retrying failures with exponential backoff."""

    def __init__(
        self,
        store: JobStore,
        signer: Signer,
        policy: UrlPolicy,
        *,
        attempts: int,
        backoff: float,
        timeout: float,
        receiver_for: Callable[[JobRecord], str | None] = lambda record: record.sender,
    ) -> None:
        self.store = store
        self.signer = signer
        self.policy = policy
        self.attempts = attempts
        self.backoff = backoff
        self.receiver_for = receiver_for
        self._client = guarded_client(policy, timeout=timeout)
        self._heap: list[tuple[float, int, str, int]] = []
        self._counter = 0
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="callbacks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
        self._client.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job_id: str, attempt: int = 0, delay: float = 0.0) -> None:
        with self._cv:
            self._counter += 1
            heapq.heappush(self._heap, (time.monotonic() + delay, self._counter, job_id, attempt))
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cv.wait(timeout)
                if self._stop:
                    return
                _, _, job_id, attempt = heapq.heappop(self._heap)
            try:
                self._deliver(job_id, attempt)
            except Exception:  # a bug must lose this one callback, not stop every later one
                log.exception("callback for %s could not be sent", job_id)
                self._give_up(job_id, attempt)

    def _give_up(self, job_id: str, attempt: int) -> None:
        try:
            self.store.set_callback_state(job_id, "failed", attempt + 1)
        except Exception:
            log.exception("callback state of %s not recorded", job_id)

    def _deliver(self, job_id: str, attempt: int) -> None:
        record = self.store.get(job_id)
        if record is None or record.callback_url is None:
            return
        try:
            check_url(record.callback_url, self.policy)
            status, preview = send_for_status(
                self._client, build_callback(record, self.signer, self.receiver_for(record))
            )
            if 200 <= status < 300:
                self.store.set_callback_state(job_id, "delivered", attempt + 1)
                return
            reason = f"HTTP {status}"
            if 400 <= status < 500 and status not in (408, 409, 425, 429):
                # The receiver refused this callback for good; retrying cannot help.
                log.warning("callback for %s refused: %s %s", job_id, reason, preview)
                self.store.set_callback_state(job_id, "failed", attempt + 1)
                return
        except OutboundError as exc:
            log.warning("callback for %s refused: %s", job_id, exc)
            self.store.set_callback_state(job_id, "failed", attempt + 1)
            return
        except (httpx.HTTPError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if attempt + 1 >= self.attempts:
            log.warning("callback for %s failed after %d attempts: %s", job_id, attempt + 1, reason)
            self.store.set_callback_state(job_id, "failed", attempt + 1)
            return
        delay = self.backoff * 2**attempt
        log.info("callback for %s failed (%s); retrying in %.1fs", job_id, reason, delay)
        self.store.set_callback_state(job_id, "pending", attempt + 1)
        self.submit(job_id, attempt + 1, delay)
