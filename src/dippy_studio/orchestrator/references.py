"""Reference workers: trusted miners that inference audits re-run jobs on.

A reference worker is a miner process (`dippy-studio miner serve`) that the subnet owner runs
and names in `audit_references` as HOTKEY@URL. The auditor sends it the audited job as dispatch
sends jobs to miners (signed for its hotkey; LoRAs and an image task's input image and mask as the
orchestrator's blob URLs), with no callback URL: it polls the job, downloads the image and checks
its sha256. The fingerprint the worker reports (signed `/v1/capacity`, then each job's own) is the
reference a miner's reported fingerprint is matched against. A worker on the miners' GPU and dtype
can reproduce their bytes, which an in-process CPU engine in float32 never can.

Workers get no client jobs (`Registry` leaves their hotkeys out), and audited miners are never
asked to re-run anything: no miner under audit ever sees audit traffic. A worker that is down,
refuses, fails or is too slow raises `ReferenceUnavailable`, which makes the audit inconclusive,
never the miner's fault.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import ValidationError

from dippy_studio.orchestrator.registry import endpoint_url
from dippy_studio.protocol.auth import sign_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.schemas import Capacity, InferenceJob, InputDownload, JobStatus, JobView, LoraDownload

if TYPE_CHECKING:
    from dippy_studio.engine.generation import GenerationRequest

# Polling a re-run: quick at first (a small profile finishes in well under a second), then
# backing off so a long queue at the worker costs one request a second.
FIRST_POLL_S = 0.05
MAX_POLL_S = 1.0


class ReferenceUnavailable(Exception):
    """The reference worker could not re-run the job: the audit cannot judge the miner."""


@dataclass(frozen=True)
class WorkerResult:
    """A reference worker's image for a re-run (the fields the auditor reads of an engine's result)."""

    png: bytes
    sha256: str
    fingerprint: str
    loras: list[dict[str, object]]


class ReferenceWorker:
    """One trusted miner that re-runs inference jobs for audits. Call from one thread at a time."""

    def __init__(
        self,
        hotkey: str,
        url: str,
        signer: Signer,
        *,
        profile: str,
        blob_url: Callable[[str], str],
        timeout_s: float,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.hotkey = hotkey
        self.url = url.rstrip("/")
        self.signer = signer
        self.profile = profile  # the one it must serve: the audited job's model
        self.blob_url = blob_url
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """The worker's profile fingerprint: asked of the worker (signed `/v1/capacity`) the first
        time, ReferenceUnavailable when it cannot be; each re-run then reports its own."""
        if self._fingerprint is None:
            capacity = self.capacity()
            if capacity.profile != self.profile:
                raise self._unavailable(f"serves profile {capacity.profile!r}, not {self.profile!r}")
            if not capacity.fingerprints or not capacity.inference.available:
                raise self._unavailable("does not serve inference right now")
            self._fingerprint = capacity.fingerprints[0]
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """Who the reference is, for an audit's evidence."""
        return {"worker": self.hotkey, "url": self.url, "profile": self.profile, "fingerprint": self._fingerprint}

    def capacity(self) -> Capacity:
        """The worker's signed `/v1/capacity`, checked to come from the configured hotkey."""
        with self._client() as http:
            response = self._call(http, "GET", "/v1/capacity")
        if response.status_code != 200:
            raise self._unavailable(f"/v1/capacity answered HTTP {response.status_code} {_detail(response)}".rstrip())
        try:
            capacity = Capacity.model_validate_json(response.content)
        except ValidationError:
            raise self._unavailable("/v1/capacity answered something that is not a Capacity") from None
        if capacity.hotkey != self.hotkey:
            raise self._unavailable(f"answers as {capacity.hotkey}, not as the configured hotkey")
        return capacity

    def generate(self, request: GenerationRequest, lora_sha256: Sequence[str] = ()) -> WorkerResult:
        """Re-run `request` on the worker. `lora_sha256` names each of `request.loras` in the
        orchestrator's blob store: the worker downloads them from there, as miners do."""
        if len(lora_sha256) != len(request.loras):
            raise ValueError("give the blob sha256 of every LoRA of the request")
        loras = [
            LoraDownload(url=self.blob_url(sha), sha256=sha, scale=lora.scale)
            for sha, lora in zip(lora_sha256, request.loras, strict=True)
        ]
        # An image task's inputs are the orchestrator's blobs: canonical PNGs stored under their
        # sha256 at submission, so the worker downloads them as the miner did.
        inputs: dict[str, Any] = {"task": request.task, "strength": request.strength}
        for name, data in (("image", request.image), ("mask", request.mask)):
            if data is not None:
                sha = hashlib.sha256(data).hexdigest()
                inputs[name] = InputDownload(url=self.blob_url(sha), sha256=sha)
        job = InferenceJob(
            job_id=f"audit-{secrets.token_hex(12)}",
            prompt=request.prompt,
            seed=request.seed,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance=request.guidance,
            loras=loras,
            deadline=datetime.now(UTC) + timedelta(seconds=self.timeout_s),
            **inputs,
        )
        give_up = time.monotonic() + self.timeout_s
        with self._client() as http:
            sent = self._call(http, "POST", "/v1/inference", job.model_dump_json(exclude_none=True).encode())
            if sent.status_code not in (200, 202):
                raise self._unavailable(f"refused the re-run: HTTP {sent.status_code} {_detail(sent)}".rstrip())
            view = self._wait(http, job.job_id, give_up)
            if view.status != JobStatus.succeeded:
                raise self._unavailable(f"the re-run ended {view.status.value}: {view.error or 'no reason given'}")
            result = self._call(http, "GET", f"/v1/jobs/{job.job_id}/result")
        if result.status_code != 200:
            raise self._unavailable(f"the re-run's result answered HTTP {result.status_code}")
        png = result.content
        sha = hashlib.sha256(png).hexdigest()
        if sha != view.result_sha256:
            raise self._unavailable("the re-run's image does not hash to the sha256 the worker reported")
        if not view.fingerprint:
            raise self._unavailable("the re-run reports no fingerprint")
        self._fingerprint = view.fingerprint
        return WorkerResult(png, sha, view.fingerprint, [{"sha256": d.sha256, "scale": d.scale} for d in loras])

    # ---- HTTP ---------------------------------------------------------------------------------

    def _wait(self, http: httpx.Client, job_id: str, give_up: float) -> JobView:
        pause = FIRST_POLL_S
        while True:
            response = self._call(http, "GET", f"/v1/jobs/{job_id}")
            if response.status_code != 200:
                raise self._unavailable(f"the re-run's status answered HTTP {response.status_code}")
            try:
                view = JobView.model_validate_json(response.content)
            except ValidationError:
                raise self._unavailable("the re-run's status is not a job view") from None
            if view.status.terminal:
                return view
            if time.monotonic() + pause > give_up:
                self._cancel(http, job_id)
                raise self._unavailable(f"no result within {self.timeout_s:g}s (the re-run is {view.status.value})")
            time.sleep(pause)
            pause = min(pause * 2, MAX_POLL_S)

    def _cancel(self, http: httpx.Client, job_id: str) -> None:
        # Best effort: the job's deadline stops it at the worker anyway.
        with contextlib.suppress(ReferenceUnavailable):
            self._call(http, "POST", f"/v1/jobs/{job_id}/cancel")

    def _call(self, http: httpx.Client, method: str, path: str, body: bytes = b"") -> httpx.Response:
        url, target = endpoint_url(self.url, path)
        headers = sign_request(self.signer, method, target, body, self.hotkey)
        if body:
            headers["content-type"] = "application/json"
        try:
            return http.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._unavailable(f"unreachable: {type(exc).__name__}") from None

    def _client(self) -> httpx.Client:
        # A plain client, not the guarded one miners' URLs go through: the operator named this
        # URL, and reference workers typically sit on a private network next to the orchestrator.
        return httpx.Client(timeout=self.request_timeout_s, follow_redirects=False, trust_env=False)

    def _unavailable(self, reason: str) -> ReferenceUnavailable:
        return ReferenceUnavailable(f"reference worker {self.hotkey} at {self.url}: {reason}")


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return str(detail)[:200] if detail else ""
