"""The operator dashboard: live statistics on every miner and model, served by the orchestrator.

Three layers, so each is testable alone:

- `DashboardInput` is what one refresh reads: jobs, attempts, audits and miners from the store,
  scores from the last scoring round, and a `ChainView` (uids, stake, weights, emission).
- `build_snapshot` is a pure function from that input to the JSON the page renders.
- `Dashboard` reads the input at most once per `refresh_s` for every viewer together, and
  streams snapshots as server-sent events (a new event only when something changed).

The page itself (`static/dashboard.{html,js,css}`) is plain HTML, JS and CSS served from the
package: no CDN, no build step, charts drawn as inline SVG.

The page, the state and every client image are for the operator only: `create_app` mounts them
only with an operator token set, and `dashboard_access.DashboardGuard` lets a request under
/dashboard through only with that token. That includes the input images of editing jobs, served
from the assets blob store under their job, and only where that job's payload names them: the
page is not an open server of that store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse, ServerSentEvent

from dippy_studio.chain.base import Chain, ChainError, Neuron
from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.audit import DEFAULT_PENALTY, PenaltyPolicy, penalty_until
from dippy_studio.orchestrator.models import Audit, Job, JobAttempt, Miner
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.protocol.http_errors import error_responses

if TYPE_CHECKING:
    from dippy_studio.orchestrator.service import Orchestrator

STATIC_DIR = Path(__file__).parent / "static"
# Points per latency plot; the time axis spans the data in the window, so a short demo and a day
# of traffic both fill the plot.
PLOT_BUCKETS = 30
MIN_PLOT_SPAN = timedelta(minutes=1)
GALLERY_SIZE = 12
AUDIT_FAILURES_SHOWN = 10
PROMPT_CHARS = 200
# The payload keys of an image task's inputs (blobs in the assets store) and what the page calls them.
INPUT_KEYS = {"image": "image_sha256", "mask": "mask_sha256"}
# The chain changes once a block (12 s on Bittensor): reading it more often only costs RPCs.
CHAIN_REFRESH_S = 5.0
# One event stream lasts this long; the browser reconnects at once (`retry`), so a server that is
# shutting down never waits on an endless response.
STREAM_S = 15.0
RETRY_MS = 1000
# Comments sent while nothing changes, so proxies keep an idle stream open.
KEEPALIVE_S = 5.0
# Every dashboard route needs the operator token (dashboard_access), never a client's API key.
OPERATOR_ONLY = error_responses(
    {401: "No operator token, or a wrong one: send Authorization: Bearer <dashboard token>."}
)


@dataclass(frozen=True)
class ChainView:
    """What the dashboard shows from the chain: the block, each hotkey's neuron, and the weight
    each miner uid gets on chain (validators' rows averaged by their stake)."""

    block: int | None = None
    neurons: Mapping[str, Neuron] = field(default_factory=dict)
    weights: Mapping[int, float] = field(default_factory=dict)
    error: str | None = None


def read_chain(chain: Chain | None) -> ChainView:
    if chain is None:
        return ChainView(error="no chain configured")
    try:
        graph = chain.metagraph()
        rows = chain.weights()
    except ChainError as exc:
        return ChainView(error=str(exc))
    neurons = {n.hotkey: n for n in graph.neurons}
    return ChainView(graph.block, neurons, consensus_weights(rows, {n.uid: n.stake for n in graph.neurons}))


def consensus_weights(rows: Mapping[int, Mapping[int, float]], stakes: Mapping[int, float]) -> dict[int, float]:
    """Each miner's weight as the chain sees it: every validator's row (fractions summing to 1),
    averaged with the validators' stake as the weights; an unstaked chain averages plainly."""
    total = sum(stakes.get(v, 0.0) for v in rows)
    out: dict[int, float] = defaultdict(float)
    for validator, row in rows.items():
        share = stakes.get(validator, 0.0) / total if total > 0 else 1.0 / len(rows)
        for uid, weight in row.items():
            out[uid] += share * weight
    return dict(out)


@dataclass(frozen=True)
class DashboardInput:
    now: datetime
    window_start: datetime
    profile: str
    orchestrator: str
    jobs: Sequence[Job]
    attempts: Sequence[JobAttempt]
    audits: Sequence[Audit]
    miners: Sequence[Miner]
    scores: Mapping[str, float]
    chain: ChainView
    gallery: bool = True
    penalty: PenaltyPolicy = DEFAULT_PENALTY
    # Every model served (the default, `profile`, first): each gets a row even before its first job.
    models: Sequence[str] = ()
    # Jobs picked for an audit and still without a verdict, on every replica.
    audits_owed: int = 0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, interpolated linearly between the closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def build_snapshot(data: DashboardInput) -> dict[str, Any]:
    """The page's whole state as JSON-able data. Pure: the same input gives the same output."""
    jobs = {job.id: job for job in data.jobs}
    in_window = [a for a in data.attempts if a.finished_at is not None and a.finished_at >= data.window_start]
    span_start = min((a.finished_at for a in in_window if a.finished_at), default=data.now)
    span = max(data.now - span_start, MIN_PLOT_SPAN)
    plot_start = data.now - span
    bucket = span / PLOT_BUCKETS
    verdicts_by_miner: dict[str, Counter[str]] = defaultdict(Counter)
    failures: dict[str, list[datetime]] = defaultdict(list)
    caught: set[str] = set()
    for audit in data.audits:
        if audit.verdict == "fail" and audit.job_id not in caught:  # one caught job, one failure
            caught.add(audit.job_id)
            failures[audit.miner_hotkey].append(audit.created_at)
        if audit.created_at >= data.window_start:
            verdicts_by_miner[audit.miner_hotkey][audit.verdict] += 1
    attempts_by_miner: dict[str, list[JobAttempt]] = defaultdict(list)
    for attempt in in_window:
        attempts_by_miner[attempt.miner_hotkey].append(attempt)

    miners = []
    # Neurons without an endpoint (validators, the owner) are on the metagraph but serve nothing.
    for miner in sorted((m for m in data.miners if m.endpoint), key=lambda m: m.uid):
        mine = attempts_by_miner.get(miner.hotkey, [])
        latencies = [a.latency_s for a in mine if a.outcome == "succeeded" and a.latency_s is not None]
        neuron = data.chain.neurons.get(miner.hotkey)
        penalized = penalty_until(failures.get(miner.hotkey, []), data.now, data.penalty)
        miners.append(
            {
                "uid": miner.uid,
                "hotkey": miner.hotkey,
                "endpoint": miner.endpoint,
                "profile": miner.capacity.get("profile"),
                "status": "penalized" if penalized else "healthy" if miner.healthy else "unreachable",
                "penalized_until": _iso(penalized),
                "last_probe_at": _iso(miner.last_probe_at),
                "outcomes": dict(sorted(Counter(a.outcome or "running" for a in mine).items())),
                "jobs": len(mine),
                "latency": _latency(latencies),
                "series": _latency_series(mine, plot_start, bucket),
                "audits": _verdict_counts(verdicts_by_miner[miner.hotkey]),
                "score": data.scores.get(miner.hotkey),
                "stake": neuron.stake if neuron else None,
                "weight": data.chain.weights.get(neuron.uid, 0.0) if neuron else None,
                "incentive": neuron.incentive if neuron else None,
                "emission": neuron.emission if neuron else None,
            }
        )

    return {
        "now": data.now.isoformat(),
        "orchestrator": data.orchestrator,
        "profile": data.profile,
        "block": data.chain.block,
        "chain_error": data.chain.error,
        "window": {
            "start": data.window_start.isoformat(),
            "plot_start": plot_start.isoformat(),
            "bucket_s": bucket.total_seconds(),
        },
        "totals": _totals(data.jobs, data.audits, data.window_start) | {"audits_owed": data.audits_owed},
        "miners": miners,
        "kinds": _kinds(data.jobs),
        "models": _models(data, plot_start, bucket),
        "profiles": _profiles(data.jobs),
        "gallery": _gallery(data.jobs, data.audits) if data.gallery else None,
        "audit_failures": _audit_failures(data.audits, jobs, {m.hotkey: m.uid for m in data.miners}),
    }


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


def _latency(seconds: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(seconds, 50), "p95": percentile(seconds, 95)}


def _verdict_counts(verdicts: Counter[str]) -> dict[str, int]:
    return {verdict: verdicts[verdict] for verdict in ("pass", "fail", "inconclusive")}


def _latency_series(attempts: Iterable[JobAttempt], start: datetime, bucket: timedelta) -> list[dict[str, Any]]:
    """p50/p95 latency of succeeded attempts per time bucket (None where a bucket is empty)."""
    buckets: list[list[float]] = [[] for _ in range(PLOT_BUCKETS)]
    for a in attempts:
        if a.outcome == "succeeded" and a.latency_s is not None and a.finished_at is not None:
            index = int((a.finished_at - start) / bucket)
            buckets[min(max(index, 0), PLOT_BUCKETS - 1)].append(a.latency_s)
    return [{"t": (start + bucket * (i + 1)).isoformat(), "n": len(b), **_latency(b)} for i, b in enumerate(buckets)]


def _totals(jobs: Sequence[Job], audits: Sequence[Audit], start: datetime) -> dict[str, Any]:
    statuses = Counter(job.status for job in jobs)
    return {
        "requests": {s.value: statuses.get(s.value, 0) for s in RequestStatus},
        "by_kind": dict(sorted(Counter(job.kind for job in jobs).items())),
        "audits": dict(sorted(Counter(a.verdict for a in audits if a.created_at >= start).items())),
    }


def _volume(members: Sequence[Job]) -> dict[str, Any]:
    """How many of these jobs there are, how they ended, and the client's latency (submitted to
    finished) of those that succeeded."""
    done = [j for j in members if j.status == RequestStatus.succeeded.value and j.finished_at]
    seconds = [(j.finished_at - j.created_at).total_seconds() for j in done if j.finished_at]
    return {
        "jobs": len(members),
        "succeeded": len(done),
        "failed": sum(j.status == RequestStatus.failed.value for j in members),
        "latency": _latency(seconds),
    }


def _kinds(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Volume and latency per job kind (`jobs.kind`), named by the registry's label."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.kind].append(job)
    return [{"kind": kind, "label": _label(kind), **_volume(groups[kind])} for kind in sorted(groups)]


def _models(data: DashboardInput, plot_start: datetime, bucket: timedelta) -> list[dict[str, Any]]:
    """Live statistics per model (`jobs.model`): volume, success rate and client latency
    (`_volume`), the latency of miners' succeeded attempts over time, audit verdicts in the
    window, and the miners serving it (their capacity's profile) and how many are healthy."""
    by_model: dict[str, list[Job]] = defaultdict(list)
    for job in data.jobs:
        by_model[job.model].append(job)
    model_of = {job.id: job.model for job in data.jobs}
    attempts: dict[str, list[JobAttempt]] = defaultdict(list)
    for attempt in data.attempts:
        if attempt.finished_at is not None and attempt.finished_at >= data.window_start and attempt.job_id in model_of:
            attempts[model_of[attempt.job_id]].append(attempt)
    verdicts: dict[str, Counter[str]] = defaultdict(Counter)
    for audit in data.audits:
        if audit.created_at >= data.window_start and audit.job_id in model_of:
            verdicts[model_of[audit.job_id]][audit.verdict] += 1
    serving: dict[str, list[Miner]] = defaultdict(list)
    for miner in data.miners:
        if miner.endpoint and miner.capacity.get("profile"):
            serving[miner.capacity["profile"]].append(miner)
    names = list(dict.fromkeys([*data.models, *sorted(by_model)]))
    rows = []
    for name in names:
        volume = _volume(by_model.get(name, []))
        ended = volume["succeeded"] + volume["failed"]
        miners = sorted(serving.get(name, []), key=lambda m: m.uid)
        rows.append(
            {
                "model": name,
                "default": name == data.profile,
                "served": name in data.models,
                **volume,
                "success_rate": volume["succeeded"] / ended if ended else None,
                "series": _latency_series(attempts.get(name, []), plot_start, bucket),
                "audits": _verdict_counts(verdicts[name]),
                "miners": [m.uid for m in miners],
                "healthy_miners": sum(m.healthy for m in miners),
            }
        )
    return rows


def _profiles(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Volume and latency per model and profile fingerprint (the build miners advertise) and
    job kind. Jobs no miner has answered yet have no fingerprint."""
    groups: dict[tuple[str, str | None, str], list[Job]] = defaultdict(list)
    for job in jobs:
        groups[(job.model, job.fingerprint, job.kind)].append(job)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1] or ""))
    return [
        {"profile": name, "fingerprint": fingerprint, "kind": kind, "label": _label(kind), **_volume(members)}
        for (name, fingerprint, kind), members in ordered
    ]


def input_url(job: Job, role: str) -> str | None:
    """Where the page loads an input of this job (`role` in INPUT_KEYS), or None when it has none."""
    sha256 = job.payload.get(INPUT_KEYS[role])
    return f"/dashboard/inputs/{job.id}/{sha256}.png" if isinstance(sha256, str) and sha256 else None


def _inputs(job: Job) -> dict[str, Any]:
    """What the gallery and the audit failures show of an image task's inputs: before/after."""
    return {
        "kind": job.kind,
        "label": _label(job.kind),
        "task": job.payload.get("task"),
        "strength": job.payload.get("strength"),
        "input_image": input_url(job, "image"),
        "mask_image": input_url(job, "mask"),
    }


def _gallery(jobs: Sequence[Job], audits: Sequence[Audit]) -> list[dict[str, Any]]:
    verdicts = {a.job_id: a.verdict for a in audits}  # audits come oldest first: the latest wins
    done = [j for j in jobs if _shows_images(j.kind) and j.status == RequestStatus.succeeded.value and j.result_blob]
    done.sort(key=lambda j: (j.finished_at or j.updated_at, j.id), reverse=True)
    return [
        {
            "job_id": job.id,
            "image": f"/dashboard/images/{job.id}.png",
            "prompt": str(job.payload.get("prompt", ""))[:PROMPT_CHARS],
            "seed": job.payload.get("seed"),
            "width": job.payload.get("width"),
            "height": job.payload.get("height"),
            "loras": len(job.payload.get("loras", [])),
            **_inputs(job),
            "miner_uid": job.miner_uid,
            "finished_at": _iso(job.finished_at),
            "audit": verdicts.get(job.id),
        }
        for job in done[:GALLERY_SIZE]
    ]


def _audit_failures(audits: Sequence[Audit], jobs: Mapping[str, Job], uids: Mapping[str, int]) -> list[dict[str, Any]]:
    failed = [a for a in audits if a.verdict == "fail"]
    failed.sort(key=lambda a: (a.created_at, a.id), reverse=True)
    out = []
    for audit in failed[:AUDIT_FAILURES_SHOWN]:
        evidence = audit.evidence or {}
        verdict = evidence.get("verdict", {})
        job = jobs.get(audit.job_id)
        request = evidence.get("request") or {}
        out.append(
            {
                "id": audit.id,
                "job_id": audit.job_id,
                # The job's own kind: an audit's evidence says "inference" for every image task.
                "kind": (job.kind if job else None) or evidence.get("kind"),
                "label": _label(job.kind) if job else evidence.get("kind"),
                "miner_uid": uids.get(audit.miner_hotkey),
                "miner_hotkey": audit.miner_hotkey,
                "created_at": audit.created_at.isoformat(),
                "reason": verdict.get("reason", ""),
                "metrics": verdict.get("metrics", {}),
                "prompt": str(request.get("prompt", ""))[:PROMPT_CHARS] if request else None,
                "seed": request.get("seed") if request else None,
                "miner": evidence.get("miner", {}),
                "reference": {k: v for k, v in evidence.get("reference", {}).items() if k != "loras"},
                "miner_image": f"/dashboard/images/{audit.job_id}.png"
                if job is not None and job.result_blob and _shows_images(job.kind)
                else None,
                "reference_image": f"/dashboard/audits/{audit.id}/reference.png"
                if evidence.get("reference_blob")
                else None,
                "input_image": input_url(job, "image") if job is not None else None,
                "mask_image": input_url(job, "mask") if job is not None else None,
            }
        )
    return out


class Dashboard:
    """One cached snapshot for every viewer, refreshed at most every `refresh_s` seconds."""

    def __init__(self, orch: Orchestrator) -> None:
        settings = orch.settings
        self.orch = orch
        self.refresh_s = settings.dashboard_refresh_s
        self.window = timedelta(seconds=settings.dashboard_window_s)
        self.lookback = timedelta(
            seconds=max(settings.inference_attempt_timeout_s, settings.training_attempt_timeout_s)
        )
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._version = ""
        self._taken = -float("inf")
        self._chain = ChainView()
        self._chain_taken = -float("inf")

    def snapshot(self) -> tuple[str, dict[str, Any]]:
        """The current snapshot and its version (a hash of everything but the time it was taken)."""
        with self._lock:
            if self._snapshot is None or time.monotonic() - self._taken >= self.refresh_s:
                self._snapshot = build_snapshot(self._read())
                content = {k: v for k, v in self._snapshot.items() if k != "now"}
                self._version = hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
                self._taken = time.monotonic()
            return self._version, self._snapshot

    def _read(self) -> DashboardInput:
        orch, store = self.orch, self.orch.store
        now = orch.clock()
        start = now - self.window
        if time.monotonic() - self._chain_taken >= CHAIN_REFRESH_S:
            self._chain = read_chain(orch.chain)
            self._chain_taken = time.monotonic()
        # Every audit in the window; before it only failures, which still decide whether a
        # penalty is running (reading weeks of passes on every refresh would be wasted work).
        history = min(start, now - DEFAULT_PENALTY.horizon - DEFAULT_PENALTY.max_cooldown)
        failed = store.list_audits(since=history, verdict="fail")
        merged = {a.id: a for a in [*failed, *store.list_audits(since=start)]}
        audits = sorted(merged.values(), key=lambda a: (a.created_at, a.id))
        jobs = store.list_recent_jobs(since=start)
        known = {job.id for job in jobs}
        # The failures shown with their evidence may be of jobs older than the window.
        shown = sorted(failed, key=lambda a: (a.created_at, a.id), reverse=True)[:AUDIT_FAILURES_SHOWN]
        older = {a.job_id for a in shown if a.job_id not in known}
        jobs += [job for job_id in sorted(older) if (job := store.load_job(job_id)) is not None]
        return DashboardInput(
            now=now,
            window_start=start,
            profile=orch.settings.profile,
            models=orch.settings.served_models,
            orchestrator=orch.signer.ss58_address,
            jobs=jobs,
            # Attempts dispatched before the window that finished in it count too.
            attempts=store.list_attempts(since=start - self.lookback),
            audits=audits,
            miners=store.list_miners(),
            scores=orch.scores().scores,
            chain=self._chain,
            gallery=orch.settings.dashboard_gallery,
            audits_owed=store.count_owed_audits(),
        )

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """`snapshot` events, one whenever the snapshot changes. sse-starlette sends keep-alive
        pings in between and ends the stream when the client leaves or the server shuts down.
        Ends after `STREAM_S`; the browser reconnects after `retry`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STREAM_S
        sent = None
        while loop.time() < deadline:
            version, snapshot = await run_in_threadpool(self.snapshot)
            if version != sent:
                yield ServerSentEvent(data=json.dumps(snapshot), event="snapshot", id=version, retry=RETRY_MS)
                sent = version
            await asyncio.sleep(min(self.refresh_s, max(0.0, deadline - loop.time())))


def mount(app: FastAPI, orch: Orchestrator) -> None:
    """Add the dashboard's routes to the orchestrator app: the page and its assets, the snapshot
    as JSON (`/dashboard/api/state`) and as an event stream, and the images it shows."""
    dashboard = Dashboard(orch)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")

    @app.get("/dashboard", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html", headers={"Cache-Control": "no-cache"})

    @app.get("/dashboard/api/state", tags=["operators"], responses=OPERATOR_ONLY)
    async def state() -> JSONResponse:
        """Everything the dashboard shows: per-miner jobs, latency, audits, score, weight and
        emission; per-kind and per-profile volume and latency; recent images (with the inputs of
        editing jobs); recent audit failures."""
        version, snapshot = await run_in_threadpool(dashboard.snapshot)
        return JSONResponse(snapshot, headers={"ETag": f'"{version}"'})

    @app.get(
        "/dashboard/api/events",
        tags=["operators"],
        response_class=EventSourceResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "snapshots as server-sent events"},
            **OPERATOR_ONLY,
        },
    )
    async def events() -> EventSourceResponse:
        """The same snapshot as server-sent events (`event: snapshot`), sent when it changes."""
        return EventSourceResponse(
            dashboard.events(), ping=KEEPALIVE_S, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.get("/dashboard/images/{job_id}.png", include_in_schema=False)
    def image(job_id: str) -> FileResponse:
        job = orch.store.load_job(job_id) if orch.settings.dashboard_gallery else None
        if job is None or not _shows_images(job.kind) or not job.result_blob:
            raise HTTPException(404, detail="no image for this job")
        return FileResponse(orch.result_path(job), media_type="image/png")

    @app.get("/dashboard/inputs/{job_id}/{sha256}.png", include_in_schema=False)
    def input_image(job_id: str, sha256: str) -> FileResponse:
        # Only a blob this job's payload names: the assets store also holds other clients' LoRAs
        # and datasets, which the page has no reason to serve.
        job = orch.store.load_job(job_id) if orch.settings.dashboard_gallery else None
        named = job is not None and sha256 in (job.payload.get(key) for key in INPUT_KEYS.values())
        if not named or not orch.assets.exists(sha256):
            raise HTTPException(404, detail="no such input image for this job")
        # Content-addressed: the same URL always gives the same bytes.
        headers = {"Cache-Control": "private, max-age=86400, immutable"}
        return FileResponse(orch.assets.local_path(sha256), media_type="image/png", headers=headers)

    @app.get("/dashboard/audits/{audit_id}/reference.png", include_in_schema=False)
    def reference(audit_id: int) -> FileResponse:
        audit = orch.store.get_audit(audit_id)
        blob = (audit.evidence or {}).get("reference_blob") if audit else None
        if not blob or not orch.results.exists(blob):
            raise HTTPException(404, detail="no reference image for this audit")
        return FileResponse(orch.results.local_path(blob), media_type="image/png")


def _label(kind: str) -> str:
    """What the page calls a kind: its registry label, or its name for one no longer registered."""
    try:
        return kinds.get(kind).label or kind
    except kinds.UnknownKind:
        return kind


def _shows_images(kind: str) -> bool:
    """Whether results of this kind are images the gallery shows (`kinds.JobKindSpec.gallery`)."""
    try:
        return kinds.get(kind).gallery
    except kinds.UnknownKind:
        return False
