"""Results coming back from miners: `POST /v1/miner-callbacks/{request id}`.

A callback is the miner's signed multipart POST (`meta`: its JobView as JSON; `result`: the PNG
or .safetensors). In order:

1. The signature must verify (btauth/1 or Epistula, for our hotkey) and the signer must be the
   hotkey the request is assigned to: 401 / 403 otherwise, and nothing changes.
2. A request that already finished answers 200 without changing anything (`duplicate` when the
   same result arrives again), so a miner's retries are harmless.
3. `meta.job_id` must name the current attempt (`<request id>-<attempt>`): 410 for an older one.
4. A reported failure sends the request to another miner (or fails it when no attempts or time
   are left). A reported success needs a `result` whose sha256 (recomputed here) matches what
   the miner claims and which passes the checks below; an invalid result is refused with 422
   and treated like a failure of that miner (the attempt is recorded as `invalid`).
5. The bytes are stored content-addressed, the request moves to `succeeded` (a compare-and-set,
   so two copies of one callback cannot both win), a training request registers its LoRA, and
   waiters and the webhook sender are told.

Status codes are chosen for the miner's retry logic: it retries 408/409/425/429 and 5xx, and
gives up on any other 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import logging
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from dippy_studio.orchestrator.blobs import BlobStore
from dippy_studio.orchestrator.dispatch import JobEvents, miner_job_id, retry_or_fail
from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.states import ACTIVE, RequestStatus
from dippy_studio.orchestrator.store import Store
from dippy_studio.protocol.auth import AuthError, SenderPolicy, check_nonce_window, check_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.multipart import FormError, parse_form
from dippy_studio.protocol.nonces import NonceStore
from dippy_studio.protocol.schemas import JobKind, JobStatus, JobView

log = logging.getLogger("dippy_studio.orchestrator.callbacks")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An image whose every channel spans at most this many levels is one flat colour: blank.
BLANK_RANGE = 2
_LORA_KEY = re.compile(r"^(?:transformer|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight$")


@dataclass(frozen=True)
class Reply:
    status_code: int
    body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Write:
    """A callback's database write: `prepare()` (storing the result), then `write()` on the store's
    writer thread or on the calling thread, then `reply(what write returned)`."""

    write: Callable[[], Any]
    reply: Callable[[Any], Reply]
    prepare: Callable[[], object] | None = None
    lock_key: str = ""


def lora_id_for(job_id: str) -> str:
    """A training request's LoRA id, fixed by the request so a retried callback cannot make two."""
    return "lora_" + job_id.removeprefix("req_")


# ---- result checks (pure) -----------------------------------------------------------------------


def check_image(data: bytes, width: int, height: int) -> str | None:
    """Why this is not an acceptable result image, or None: it must be a PNG that decodes, has
    the requested size and is not one flat colour."""
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG"
    try:
        with Image.open(io.BytesIO(data)) as image:
            # The size comes from the header: checked before decoding, so a huge image is never decoded.
            if image.size != (width, height):
                return f"image is {image.width}x{image.height}, the request was {width}x{height}"
            image.load()
            extrema = image.convert("RGB").getextrema()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"PNG does not decode: {exc}"
    if all(high - low <= BLANK_RANGE for low, high in extrema):
        return "image is blank (one flat colour)"
    return None


def read_lora_bytes(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The tensors of a .safetensors LoRA (refusing pickles, bad headers, non-finite or
    non-float values), or None and why not."""
    # Imported here: torch is needed only when a LoRA arrives.
    from dippy_studio.engine.errors import LoraError
    from dippy_studio.engine.lora import read_lora

    with tempfile.TemporaryDirectory(prefix="dippy-lora-") as tmp:
        path = Path(tmp) / "lora.safetensors"
        path.write_bytes(data)
        try:
            return read_lora(path, max_bytes=len(data) + 1).state_dict, None
        except LoraError as exc:
            return None, str(exc).replace(str(path), "LoRA")


def check_lora(data: bytes, rank: int | None = None, targets: Sequence[str] | None = None) -> str | None:
    """Why this is not the promised LoRA, or None: a diffusers-format Flux LoRA (what our miners
    train) of lora_A/lora_B pairs, of rank `rank` on exactly the `targets` modules when given."""
    tensors, problem = read_lora_bytes(data)
    if tensors is None:
        return problem
    found_targets: set[str] = set()
    for name, tensor in tensors.items():
        match = _LORA_KEY.match(name)
        if match is None:
            return f"unexpected tensor {name!r}: not a diffusers-format Flux LoRA"
        module, which = match.groups()
        if tensor.dim() != 2:
            return f"tensor {name!r} has shape {tuple(tensor.shape)}, expected a matrix"
        if targets is not None:
            target = next((t for t in targets if module == t or module.endswith("." + t)), None)
            if target is None:
                return f"tensor {name!r} is on a module outside the promised targets {list(targets)}"
            found_targets.add(target)
        tensor_rank = tensor.shape[0] if which == "lora_A" else tensor.shape[1]
        if rank is not None and tensor_rank != rank:
            return f"tensor {name!r} has rank {tensor_rank}, the request promised rank {rank}"
    missing = sorted(set(targets or ()) - found_targets)
    if missing:
        return f"no LoRA weights for promised targets {missing}"
    return None


# ---- the handler --------------------------------------------------------------------------------


class CallbackHandler:
    def __init__(
        self,
        store: Store,
        results: BlobStore,
        assets: BlobStore,
        signer: Signer,
        nonces: NonceStore,
        settings: OrchestratorSettings,
        events: JobEvents,
        *,
        clock: Callable[[], datetime] = utcnow,
        on_succeeded: Callable[[Job], None] | None = None,
    ) -> None:
        self.store = store
        self.results = results
        self.assets = assets
        self.signer = signer
        self.nonces = nonces
        self.settings = settings
        self.events = events
        self.clock = clock
        # Audits hook in here: called with the succeeded job.
        self.on_succeeded = on_succeeded
        # Who signed is checked against the job below; any correct signature passes this policy.
        self._policy = SenderPolicy.open()
        check_nonce_window(nonces, settings.max_signature_age, settings.allowed_clock_skew)

    async def handle(self, job_id: str, headers: Mapping[str, str], body: bytes, target: str) -> Reply:
        """One callback, on the event loop: its database work goes to the store's writer thread,
        and a training result (loading a LoRA takes torch and time) to a worker thread."""
        try:
            checked = check_request(
                headers,
                body,
                method="POST",
                path=target,
                receiver_ss58=self.signer.ss58_address,
                policy=self._policy,
                max_age=self.settings.max_signature_age,
                allowed_skew=self.settings.allowed_clock_skew,
            )
            # The nonce is recorded (last, as `verify_request` would) beside the job's read.
            claim = functools.partial(checked.claim, self.nonces)
            job = await self.store.submit(lambda: self.store.load_job(job_id), prepare=claim)
        except AuthError as exc:
            return Reply(exc.status_code, {"detail": exc.reason})
        if job is None:
            return Reply(404, {"detail": f"no request {job_id}"})
        if job.miner_hotkey is None or checked.caller.hotkey_ss58 != job.miner_hotkey:
            log.warning("callback for %s from %s, which it is not assigned to", job_id, checked.caller.hotkey_ss58)
            return Reply(403, {"detail": f"request {job_id} is not assigned to this hotkey"})
        # After the signature: a bad signature is refused before a malformed body.
        try:
            form = parse_form(body, headers.get("content-type"), max_parts=2)
        except FormError as exc:
            return Reply(400, {"detail": f"not a multipart form: {exc}"})
        if "meta" not in form:
            return Reply(422, {"detail": "no 'meta' part"})
        if job.kind == JobKind.training.value:
            return await asyncio.to_thread(self.accept, job, form["meta"], form.get("result"))
        step = self._decide(job, form["meta"], form.get("result"))
        if isinstance(step, Reply):
            return step
        if step.prepare is not None:
            # A blob's fsync waits on the disk: on a worker thread, not the writer's.
            await asyncio.to_thread(step.prepare)
        return step.reply(await self.store.submit(step.write, step.lock_key))

    def accept(self, job: Job, meta_json: bytes, result: bytes | None) -> Reply:
        """`handle`'s work once the caller is known to be the job's miner, on the calling thread."""
        step = self._decide(job, meta_json, result)
        if isinstance(step, Reply):
            return step
        if step.prepare is not None:
            step.prepare()
        return step.reply(step.write())

    def _decide(self, job: Job, meta_json: bytes, result: bytes | None) -> Reply | _Write:
        """The reply, or the database write still to make and how to reply after it."""
        try:
            meta = JobView.model_validate_json(meta_json)
        except ValidationError as exc:
            return Reply(422, {"detail": f"meta is not a JobView: {exc.errors()[0].get('msg', 'invalid')}"})
        if RequestStatus(job.status).terminal:
            return self._already_finished(job, result)
        if meta.job_id != miner_job_id(job.id, job.attempts):
            return Reply(410, {"detail": f"{meta.job_id} is not the current attempt of {job.id}"})
        if meta.status in (JobStatus.queued, JobStatus.running):
            return _Write(
                lambda: self.store.transition(job.id, "dispatched", "running", now=self.clock()),
                lambda _: Reply(200, {"status": "running"}),
                lock_key=job.id,
            )
        if meta.status != JobStatus.succeeded:
            outcome = "timeout" if meta.status == JobStatus.expired else "failed"
            reason = f"miner reported {meta.status.value}: {meta.error or 'no reason given'}"[:1000]
            return _Write(
                lambda: self._take_back(job, reason, outcome),
                lambda status: Reply(200, {"status": status or job.status}),
                lock_key=job.id,
            )
        problem, rank = self._check(job, meta, result)
        if problem is not None:
            log.warning("invalid result for %s from uid %s: %s", job.id, job.miner_uid, problem)
            return _Write(
                lambda: self._take_back(job, f"invalid result: {problem}", "invalid"),
                lambda _: Reply(422, {"detail": f"invalid result: {problem}"}),
                lock_key=job.id,
            )
        assert result is not None
        return self._succeed(job, meta, result, rank)

    def _check(self, job: Job, meta: JobView, result: bytes | None) -> tuple[str | None, int | None]:
        if result is None:
            return "the callback says succeeded but has no result part", None
        sha256 = hashlib.sha256(result).hexdigest()
        if meta.result_sha256 is not None and meta.result_sha256 != sha256:
            return f"sha256 of the bytes is {sha256}, the miner claimed {meta.result_sha256}", None
        if meta.kind.value != job.kind:
            return f"a {meta.kind.value} result for a {job.kind} request", None
        payload = job.payload
        if job.kind == JobKind.inference.value:
            return check_image(result, payload["width"], payload["height"]), None
        rank = int(payload["rank"])
        return check_lora(result, rank, payload["targets"]), rank

    def _succeed(self, job: Job, meta: JobView, result: bytes, rank: int | None) -> _Write:
        training = job.kind == JobKind.training.value
        blobs = self.assets if training else self.results
        sha256 = hashlib.sha256(result).hexdigest()
        now = self.clock()
        latency = (now - job.dispatched_at).total_seconds() if job.dispatched_at else None
        outcome = {
            "result_sha256": sha256,
            "result_blob": sha256,
            "result_bytes": len(result),
            "fingerprint": meta.fingerprint,
            "timings": {"miner": dict(meta.timings), "latency_s": latency},
            "error": None,
        }

        def write() -> Job | None:
            """The job as it is now when another copy of this callback (or a cancel) got there
            first; None when this one moved it to `succeeded`."""
            if training:
                # Before the request reads `succeeded`, so a client never sees a LoRA id that 404s. If
                # a cancel wins the race below, the client keeps a LoRA it no longer waited for.
                self._register_lora(job, sha256, rank or int(job.payload["rank"]))
            if self.store.transition(job.id, list(ACTIVE), "succeeded", now=now, **outcome):
                return None
            return self.store.load_job(job.id) or job

        def reply(current: Job | None) -> Reply:
            if current is not None:
                return self._already_finished(current, result)
            self.events.finished(job.id, webhook=job.webhook_url is not None)
            if self.on_succeeded is not None:
                # The row now holds what was just written: hand the hook that rather than read it back.
                written = {**outcome, "status": RequestStatus.succeeded.value, "finished_at": now, "updated_at": now}
                for name, value in written.items():
                    setattr(job, name, value)
                self.on_succeeded(job)
            return Reply(200, {"status": "succeeded", "sha256": sha256})

        # Stored first: a durable blob before any row names it.
        return _Write(write, reply, prepare=lambda: blobs.put(result), lock_key=job.id)

    def _already_finished(self, job: Job, result: bytes | None) -> Reply:
        same = result is not None and hashlib.sha256(result).hexdigest() == job.result_sha256
        if job.status == RequestStatus.succeeded.value and same:
            if job.kind == JobKind.training.value and job.result_sha256:
                # The first callback may have died between the two writes: finish its work.
                self._register_lora(job, job.result_sha256, int(job.payload["rank"]))
            return Reply(200, {"status": "duplicate"})
        return Reply(200, {"status": "ignored", "detail": f"request {job.id} is already {job.status}"})

    def _register_lora(self, job: Job, sha256: str, rank: int) -> None:
        lora_id = lora_id_for(job.id)
        if self.store.get_lora(lora_id, job.api_key_id) is not None:
            return
        # A concurrent copy of this callback may register it first (IntegrityError): that is fine.
        with contextlib.suppress(IntegrityError):
            self.store.create_lora(
                job.api_key_id,
                job.payload.get("name") or lora_id,
                sha256,
                rank,
                trigger_word=job.payload.get("trigger_word") or "",
                source_job_id=job.id,
                lora_id=lora_id,
                now=self.clock(),
            )

    def _take_back(self, job: Job, reason: str, outcome: str) -> str | None:
        return retry_or_fail(
            self.store,
            job,
            reason,
            outcome=outcome,
            events=self.events,
            now=self.clock(),
            min_attempt_s=self.settings.min_attempt_s,
        )
