"""Results coming back from miners: `POST /v1/miner-callbacks/{request id}`.

A callback is the miner's signed multipart POST (`meta`: its JobView as JSON; `result`: the
result's bytes). In order:

1. Before the body is read: the signature headers must be well formed, fresh and for our hotkey
   (401), the request must exist (404) and be assigned to the hotkey they name (403), and the
   Content-Length must be given (411) and fit the job's kind: a few megabytes for an image, up to
   `max_result_bytes` for a LoRA (413). An unauthenticated body costs no memory.
   Then the body is streamed to a temporary file (in memory while small), hashed as it arrives,
   and the signature must verify against that digest (401); nothing has changed until here.
2. A request that already finished answers 200 without changing anything (`duplicate` when the
   same result arrives again), so a miner's retries are harmless.
3. `meta.job_id` must name the current attempt (`<request id>-<attempt>`): 410 for an older one.
4. A reported failure sends the request to another miner (or fails it when no attempts or time
   are left). A reported success needs a `result` whose sha256 (recomputed here) matches what
   the miner claims and which passes its kind's check (`kinds.JobKindSpec.check_result`); an
   invalid result is refused with 422 and treated like a failure of that miner (the attempt is
   recorded as `invalid`). A result this replica cannot check now (its LoRA checker stopped or
   overran its time limit: `errors.Unavailable`) is answered 503, and judged when the miner
   sends it again.
5. The bytes are stored content-addressed, then the request moves to `succeeded` (a
   compare-and-set, so two copies of one callback cannot both win) together with what its kind
   registers (a training request's LoRA), and only after that commit are waiters, the webhook
   sender and the audit queue told.

Status codes are chosen for the miner's retry logic: it retries 408/409/425/429 and 5xx, and
gives up on any other 4xx.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import tempfile
import unicodedata
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol

from pydantic import ValidationError

from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.blobs import BlobStore
from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.orchestrator.store import Store, Success, cut_short_by_deadline
from dippy_studio.protocol.auth import (
    AuthError,
    Checked,
    SenderPolicy,
    SignedHeaders,
    check_headers,
    check_nonce_window,
)
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.multipart import FormError, parse_form
from dippy_studio.protocol.nonces import NonceStore
from dippy_studio.protocol.progress import MAX_PROGRESS_BYTES, ProgressReport
from dippy_studio.protocol.schemas import JobStatus, JobView

log = logging.getLogger("dippy_studio.orchestrator.callbacks")


class JobEvents(Protocol):
    """What the rest of the orchestrator wants to hear about a job, once its change has committed."""

    def requeued(self, job_id: str) -> None:
        """The job is back in the queue: dispatch soon."""

    def finished(self, job: Job) -> None:
        """The job reached a terminal state: wake waiters and, when it has a webhook, the sender."""

    def succeeded(self, job: Job) -> None:
        """The job succeeded (after `finished`): offer it to the audit queue."""


@dataclass(frozen=True)
class Reply:
    status_code: int
    body: dict[str, Any]


def miner_job_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


class CallbackHandler:
    def __init__(
        self,
        store: Store,
        blobs: Callable[[kinds.JobKindSpec], BlobStore],
        signer: Signer,
        nonces: NonceStore,
        settings: OrchestratorSettings,
        events: JobEvents,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.blobs = blobs  # where a kind's results are kept
        self.signer = signer
        self.nonces = nonces
        self.settings = settings
        self.events = events
        self.clock = clock
        # Who signed is checked against the job below; any correct signature passes this policy.
        self._policy = SenderPolicy.open()
        check_nonce_window(nonces, settings.max_signature_age, settings.allowed_clock_skew)
        # Where bodies too big to keep in memory wait for their signature check.
        self.incoming = settings.data_dir / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    async def handle(self, job_id: str, headers: Mapping[str, str], target: str, body: AsyncIterator[bytes]) -> Reply:
        """One callback, on the event loop: `target` is the request target as received, `body` its
        chunks, read only once the signature headers and the declared size allow (and, for a body
        over `IN_MEMORY_BYTES`, the job: its miner and its kind's size limit). Database work runs on
        the store's writer thread; hashing, spooling, result checks and blob writes on workers."""
        try:
            signed = self._signed_headers(headers, target)
        except AuthError as exc:
            return Reply(exc.status_code, {"detail": exc.reason})
        size = content_length(headers)
        if size is None:
            return Reply(411, {"detail": "a callback must declare its size in Content-Length"})
        if size > IN_MEMORY_BYTES:
            # Too big to take on trust: the job must be this sender's and allow this size before a
            # byte is read. (A small body is read first and its job checked after the signature,
            # which saves every image callback a read.)
            early = await asyncio.to_thread(self.store.load_job, job_id)
            if (refusal := self._refusal(early, job_id, signed.sender, size)) is not None:
                return refusal
        with Spooled(self.incoming) as received:
            await received.take(body)
            if received.size != size:
                return Reply(400, {"detail": f"the body has {received.size} bytes, its Content-Length says {size}"})
            try:
                checked = signed.check_body(received.sha256, self._policy)
                job = await self.store.call(self._claim_and_load, checked, job_id)
            except AuthError as exc:
                return Reply(exc.status_code, {"detail": exc.reason})
            # Again on the fresh row: it may have been taken back and given to another miner while
            # this body was arriving.
            if (refusal := self._refusal(job, job_id, checked.caller.hotkey_ss58, size)) is not None:
                return refusal
            assert job is not None
            # Authenticated, and no larger than this job's kind allows: now it may be in memory.
            data = await received.read()
        # After the signature: a bad signature is refused before a malformed body.
        try:
            form = parse_form(data, headers.get("content-type"), max_parts=2)
        except FormError as exc:
            return Reply(400, {"detail": f"not a multipart form: {exc}"})
        if "meta" not in form:
            return Reply(422, {"detail": "no 'meta' part"})
        try:
            meta = JobView.model_validate_json(form["meta"])
        except ValidationError as exc:
            return Reply(422, {"detail": f"meta is not a JobView: {exc.errors()[0].get('msg', 'invalid')}"})
        return await self._accept(job, meta, form.get("result"))

    async def progress(self, job_id: str, headers: Mapping[str, str], target: str, body: bytes) -> Reply:
        """A miner's signed progress report (`protocol.progress.ProgressReport`): kept on the job
        (`Store.record_progress`) while it is this miner's current attempt. 401 for a bad
        signature, 404 unknown job, 403 another miner's job, 413 over `MAX_PROGRESS_BYTES`, 422 not
        a report, 410 not the current attempt, 409 no longer active."""
        try:
            signed = self._signed_headers(headers, target)
            checked = signed.check_body(hashlib.sha256(body).hexdigest(), self._policy)
            job = await self.store.call(self._claim_and_load, checked, job_id)
        except AuthError as exc:
            return Reply(exc.status_code, {"detail": exc.reason})
        if (refusal := self._refusal(job, job_id, checked.caller.hotkey_ss58, 0)) is not None:
            return refusal
        assert job is not None
        if len(body) > MAX_PROGRESS_BYTES:
            return Reply(413, {"detail": f"a progress report may be at most {MAX_PROGRESS_BYTES} bytes"})
        try:
            report = ProgressReport.model_validate_json(body)
        except ValidationError as exc:
            return Reply(422, {"detail": f"not a progress report: {exc.errors()[0].get('msg', 'invalid')}"})
        if report.job_id != miner_job_id(job.id, job.attempts):
            return Reply(410, {"detail": f"{report.job_id} is not the current attempt of {job.id}"})
        recorded = await self.store.call(
            self.store.record_progress, job.id, job.miner_hotkey, job.attempts, report.public(), lock_key=job.id
        )
        if not recorded:
            return Reply(409, {"detail": f"request {job.id} is no longer at this miner"})
        return Reply(200, {"status": "recorded"})

    def _signed_headers(self, headers: Mapping[str, str], target: str) -> SignedHeaders:
        return check_headers(
            headers,
            method="POST",
            path=target,
            receiver_ss58=self.signer.ss58_address,
            max_age=self.settings.max_signature_age,
            allowed_skew=self.settings.allowed_clock_skew,
        )

    def _refusal(self, job: Job | None, job_id: str, sender: str, size: int) -> Reply | None:
        """Why `sender` may not deliver a body of `size` bytes for this job, if it may not."""
        if job is None:
            return Reply(404, {"detail": f"no request {job_id}"})
        if job.miner_hotkey is None or sender != job.miner_hotkey:
            log.warning("callback for %s from %s, which it is not assigned to", job_id, sender)
            return Reply(403, {"detail": f"request {job_id} is not assigned to this hotkey"})
        limit = kinds.get(job.kind).max_result_bytes(job, self.settings) + META_BYTES
        if size > limit:
            detail = f"a {job.kind} callback may be at most {limit} bytes; this one declares {size}"
            return Reply(413, {"detail": detail})
        return None

    def _claim_and_load(self, checked: Checked, job_id: str) -> Job | None:
        # The nonce is recorded last, as `verify_request` would, beside the job's read.
        checked.claim(self.nonces)
        return self.store.load_job(job_id)

    async def _accept(self, job: Job, meta: JobView, result: bytes | None) -> Reply:
        """The callback's effect, once the caller is known to be the job's miner."""
        if RequestStatus(job.status).terminal:
            return already_finished(job, result)
        if meta.job_id != miner_job_id(job.id, job.attempts):
            return Reply(410, {"detail": f"{meta.job_id} is not the current attempt of {job.id}"})
        if meta.status in (JobStatus.queued, JobStatus.running):
            await self.store.call(
                self.store.transition, job.id, "dispatched", "running", now=self.clock(), lock_key=job.id
            )
            return Reply(200, {"status": "running"})
        if meta.status != JobStatus.succeeded:
            said = meta.error or "no reason given"
            reason = printable(scrub_paths(f"miner reported {meta.status.value}: {said}"))[:1000]
            outcome = failure_outcome(job, meta, self.clock(), self.settings.allowed_clock_skew)
            status = await self._take_back(job, reason, outcome)
            return Reply(200, {"status": status or job.status})
        spec = kinds.get(job.kind)
        # A check that cannot run now raises `errors.Unavailable` (503): nothing is judged.
        problem = await self._check(spec, job, meta, result)
        if problem is not None:
            log.warning("invalid result for %s from uid %s: %s", job.id, job.miner_uid, problem)
            await self._take_back(job, f"invalid result: {problem}", "invalid")
            return Reply(422, {"detail": f"invalid result: {problem}"})
        assert result is not None
        return await self._succeed(spec, job, meta, result)

    async def _check(self, spec: kinds.JobKindSpec, job: Job, meta: JobView, result: bytes | None) -> str | None:
        if result is None:
            return "the callback says succeeded but has no result part"
        if meta.fingerprint is not None and (problem := fingerprint_problem(meta.fingerprint)) is not None:
            return problem
        sha256 = hashlib.sha256(result).hexdigest()
        if meta.result_sha256 is not None and meta.result_sha256 != sha256:
            return f"sha256 of the bytes is {sha256}, the miner claimed {meta.result_sha256}"
        # Miners name their lane: every image task (edit, img2img, ...) runs on "inference".
        if meta.kind not in (job.kind, spec.lane):
            return f"a {meta.kind} result for a {job.kind} request"
        if spec.quick_check and len(result) <= SMALL_RESULT_BYTES:
            return spec.check_result(job, result, self.settings)
        return await asyncio.to_thread(spec.check_result, job, result, self.settings)

    async def _succeed(self, spec: kinds.JobKindSpec, job: Job, meta: JobView, result: bytes) -> Reply:
        # Stored first (a blob's fsync waits on the disk: on a worker thread): a durable blob
        # before any row names it.
        sha256 = await asyncio.to_thread(self.blobs(spec).put, result)
        now = self.clock()
        latency = (now - job.dispatched_at).total_seconds() if job.dispatched_at else None
        success = Success(
            result_sha256=sha256,
            result_bytes=len(result),
            fingerprint=meta.fingerprint,
            timings={"miner": finite(meta.timings), "latency_s": latency},
            lora=spec.registers(job, sha256) if spec.registers is not None else None,
        )
        if not await self.store.call(self.store.succeed, job.id, success, now, attempt=job.attempts, lock_key=job.id):
            # Another copy of this callback, a cancel, or the next attempt got there first.
            current = await self.store.call(self.store.load_job, job.id)
            return already_finished(current or job, result)
        # The row now holds what was just written: hand that on rather than read it back.
        job.status, job.finished_at, job.updated_at = RequestStatus.succeeded.value, now, now
        job.result_sha256 = job.result_blob = sha256
        job.result_bytes, job.fingerprint, job.timings, job.error = len(result), meta.fingerprint, success.timings, None
        self.events.finished(job)
        self.events.succeeded(job)
        return Reply(200, {"status": "succeeded", "sha256": sha256})

    async def _take_back(self, job: Job, reason: str, outcome: str) -> str | None:
        return await take_back(
            self.store, self.events, job, reason, outcome, now=self.clock(), min_attempt_s=self.settings.min_attempt_s
        )


# Results up to this size of a kind with a quick check are checked on the event loop (a small PNG
# decodes in well under a ms).
SMALL_RESULT_BYTES = 1 << 20
# Room in a callback for its `meta` part and the form's framing, beside the result.
META_BYTES = 1 << 20
# While its signature waits to be checked, a callback body is kept in memory up to this size; past
# it, it goes to a temporary file in batches of this size.
IN_MEMORY_BYTES = 1 << 20


# The longest fingerprint the jobs table keeps (an engine's is a short id).
MAX_FINGERPRINT_CHARS = 128


def fingerprint_problem(fingerprint: str) -> str | None:
    """Why a reported fingerprint is none an engine gives (too long to keep, or with control
    characters, which PostgreSQL's text refuses), or None."""
    if len(fingerprint) > MAX_FINGERPRINT_CHARS or not fingerprint.isprintable():
        return f"the fingerprint is not an engine's: at most {MAX_FINGERPRINT_CHARS} printable characters"
    return None


def finite(timings: Mapping[str, float]) -> dict[str, float]:
    """The miner's timings that are numbers: NaN and infinities time nothing, and neither a JSON
    answer to the client nor PostgreSQL's json holds them."""
    return {name: value for name, value in timings.items() if math.isfinite(value)}


def printable(text: str) -> str:
    """A miner's text as it is kept and shown to the client: control characters (a NUL, which
    PostgreSQL's text refuses) as spaces, line breaks and tabs kept."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else " " for c in text)


def content_length(headers: Mapping[str, str]) -> int | None:
    """The declared body size, or None when there is no usable Content-Length."""
    raw = headers.get("content-length")
    return int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None


async def take_back(
    store: Store, events: JobEvents, job: Job, reason: str, outcome: str, *, now: datetime, min_attempt_s: float
) -> str | None:
    """Take a job back from its miner (`Store.take_back`, on the writer thread), announce where it
    went, and return that status."""
    status = await store.call(
        store.take_back, job, reason, outcome=outcome, now=now, min_attempt_s=min_attempt_s, lock_key=job.id
    )
    announce(events, job, status)
    return status


def announce(events: JobEvents, job: Job, status: str | None) -> None:
    """Tell `events` where a job that was taken back from its miner went (after the commit)."""
    if status == RequestStatus.queued.value:
        events.requeued(job.id)
    elif status is not None:
        job.status = status
        events.finished(job)


def already_finished(job: Job, result: bytes | None) -> Reply:
    same = result is not None and hashlib.sha256(result).hexdigest() == job.result_sha256
    if job.status == RequestStatus.succeeded.value and same:
        return Reply(200, {"status": "duplicate"})
    return Reply(200, {"status": "ignored", "detail": f"request {job.id} is already {job.status}"})


def failure_outcome(job: Job, meta: JobView, now: datetime, skew_s: float) -> str:
    """How a failure the miner reported counts (`states.CLIENTS_DOING`): the request's own doing
    when its input is unusable, or when the client's deadline, not the attempt timeout, ran out
    (and has passed, give or take `skew_s` of clock difference: a miner that gives up earlier
    than that gave up on its own)."""
    if meta.input_error:
        return "bad_input"
    if meta.status == JobStatus.expired:
        due = cut_short_by_deadline(job) and (job.deadline - now).total_seconds() <= skew_s
        return "expired" if due else "timeout"
    return "failed"


# An absolute path: a slash-led run of path segments, not inside a word or a URL.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s/:'\"]+)+/?")


def scrub_paths(message: str) -> str:
    """`message` with every absolute path shortened to its last segment: a miner's directories
    are no business of the client who reads the error."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "<path>", message)


class Spooled:
    """A callback body as it arrives: hashed, kept in memory while small, then in an unnamed
    temporary file (gone when closed, or if the process dies)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.size = 0
        self._digest = hashlib.sha256()
        self._tail = bytearray()  # what has not gone to the file
        self._file: IO[bytes] | None = None

    async def take(self, chunks: AsyncIterator[bytes]) -> None:
        async for chunk in chunks:
            self.size += len(chunk)
            self._tail += chunk
            if len(self._tail) >= IN_MEMORY_BYTES:
                # Hashing and writing a megabyte: on a worker thread, off the event loop.
                await asyncio.to_thread(self._spill, bytes(self._tail))
                self._tail.clear()
        self._digest.update(self._tail)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    async def read(self) -> bytes:
        if self._file is None:
            return bytes(self._tail)
        file = self._file

        def read_all() -> bytes:
            file.seek(0)
            return file.read() + self._tail

        return await asyncio.to_thread(read_all)

    def _spill(self, data: bytes) -> None:
        self._digest.update(data)
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115 (closed by __exit__)
        self._file.write(data)

    def __enter__(self) -> Spooled:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
