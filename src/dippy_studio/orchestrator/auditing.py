"""The audit queue: which finished jobs get audited, and the audits, in one background thread."""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.audit import Auditor, AuditSampler, unreadable
from dippy_studio.orchestrator.blobs import SHARE_ONE_STORE, BlobStore, MissingBlob
from dippy_studio.orchestrator.dispatch import blob_url
from dippy_studio.orchestrator.leader import Leadership
from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.references import ReferenceUnavailable, ReferenceWorker
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store
from dippy_studio.protocol.keys import Signer

if TYPE_CHECKING:
    from dippy_studio.engine import Engine

log = logging.getLogger("dippy_studio.orchestrator.audits")

ROLE = "audits"  # the singleton role (`leader.ROLES`) whose holder runs the audits
# Flagged jobs read per look at the database; the rest wait for the next look.
FLAGGED_BATCH = 1000


class AuditQueue:
    """Audits of finished jobs, in one background thread (reference engines run one job at a time).

    Every succeeded job is offered; the sampler (`audit.AuditSampler`) picks which to audit, per
    miner and job kind, after the result is in, so a miner cannot tell audited work from the
    rest. A picked job is flagged (`jobs.audit`), checked by its kind's `audit` (`kinds`), and its
    verdict and evidence stored as an `Audit` row. Inference jobs are re-run (the reference image
    goes to the results blob store). Training jobs have their LoRA loaded and measured on the
    held-out part of the client's dataset that was kept from the miner at submission; a job whose
    dataset was too small to split gets an inconclusive verdict once the LoRA's shape is checked.
    Scoring turns failures into penalties, and a training audit's measured improvement into the
    job's quality factor.

    With several replicas on one database, each samples the jobs it receives and flags its picks,
    but only the leader of the "audits" role (`leader.Leadership`) audits: it takes flagged jobs
    without a verdict from the database, woken at once by its own picks and looking every `poll_s`
    for other replicas'. So a new leader, or a restarted one, picks up whatever was left unjudged,
    and a job with a stored verdict is never judged again. Every replica reads new failed audits
    from the store at each turn of its loop, so a failure puts the miner back on audit probation
    on every replica's sampler.
    """

    def __init__(
        self,
        store: Store,
        results: BlobStore,
        assets: BlobStore,
        sampler: AuditSampler,
        auditor: Auditor | OrchestratorSettings,
        *,
        heldout: BlobStore | None = None,
        signer: Signer | None = None,
        clock: Callable[[], datetime] = utcnow,
        leadership: Leadership | None = None,
        poll_s: float = 2.0,
        judges: bool = True,
    ) -> None:
        self.store = store
        self.results = results
        self.assets = assets
        self.heldout = heldout
        self.sampler = sampler
        # Settings instead of an Auditor: build each model's reference at its first audit, so a
        # server (or a test) that never audits never loads a model for it. An Auditor given
        # instead audits every job, whatever its model.
        self._auditor = auditor if isinstance(auditor, Auditor) else None
        self._settings = auditor if isinstance(auditor, OrchestratorSettings) else None
        self._auditors: dict[str, Auditor] = {}
        self._engines: dict[str, Engine] = {}
        self._signer = signer  # signs re-runs sent to reference workers
        self.clock = clock
        self.leadership = leadership  # None: this queue alone audits (one process on its database)
        # False: only pick and flag, never audit (`OrchestratorSettings.judge_audits`).
        self.judges = judges
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._picked: deque[str] = deque()  # picks not flagged in the database yet
        # Flagged jobs this queue could not judge (crashed, or nothing to judge): not retried
        # until a restart, as a crash that repeats would only repeat.
        self._given_up: set[str] = set()
        self._failures_seen = 0  # the newest failed audit's id this sampler has learned
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orch-audits", daemon=True)

    def start(self) -> None:
        # Earlier failures are not replayed: a new sampler starts every miner on probation anyway.
        self._failures_seen = self.store.last_audit_id()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def offer(self, job: Job) -> bool:
        """Decide whether to audit this succeeded job, and queue it if so. Does not block: the
        callback's event loop calls it; the audit thread flags the pick in the database."""
        if not job.miner_hotkey or not job.result_blob:
            return False
        with self._lock:  # the sampler keeps per-miner counts
            decision = self.sampler.decide(job.miner_hotkey, job.kind)
        if not decision.audit:
            return False
        self._picked.append(job.id)
        self._wake.set()
        return True

    def leading(self) -> bool:
        """Whether this replica runs the audits now (checked live: fencing)."""
        return self.judges and (self.leadership is None or self.leadership.lead(ROLE))

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared first, so a pick that arrives during this turn starts the next one at once.
            self._wake.clear()
            leading = False
            try:
                self._flag_picked()
                leading = self.leading()
                if leading:
                    self._audit_flagged()
                self._learn_failures()
            except Exception:
                # A database blip must not end the loop for good.
                log.exception("audit loop failed; trying again")
            # A follower that may judge asks for the role this often, so it takes over within the bound.
            follow_s = self.leadership.retry_s if self.leadership is not None and self.judges else self.poll_s
            self._wake.wait(self.poll_s if leading else min(self.poll_s, follow_s))

    def _flag_picked(self) -> None:
        """Store this replica's picks (`jobs.audit`), so whichever replica leads audits them, and
        an audit cut short by a crash is still owed."""
        while self._picked:
            self.store.flag_for_audit(self._picked[0])
            self._picked.popleft()

    def _audit_flagged(self) -> None:
        for job_id in self.store.flagged_without_verdict(limit=FLAGGED_BATCH):
            if self._stop.is_set():
                return
            if job_id in self._given_up:
                continue
            self._flag_picked()  # picks made during a long audit reach the database meanwhile
            if not self.leading():
                return  # fencing: checked before every audit
            try:
                if not self._audit(job_id):
                    self._given_up.add(job_id)
            except Exception:
                log.exception("audit of %s crashed", job_id)
                self._given_up.add(job_id)
            self._learn_failures()

    def _audit(self, job_id: str) -> bool:
        """Judge one flagged job and store the verdict. False when there is nothing to judge."""
        job = self.store.load_job(job_id)
        if job is None or job.miner_hotkey is None or job.result_blob is None:
            return False
        if self.store.list_audits(job_id=job_id):
            return True  # judged already (by the previous leader, say)
        audit = kinds.get(job.kind).audit
        if audit is None:
            return False  # a kind that is never audited
        try:
            outcome = audit(self, job)
        except MissingBlob as missing:
            # Stored on another machine's disk: no retry will find it here, so the verdict says
            # why, where operators look (the dashboard, /v1/admin), and blames nobody.
            log.warning("audit of %s cannot read what it needs: %s; %s", job.id, missing, SHARE_ONE_STORE)
            outcome = unreadable(f"{missing}: {SHARE_ONE_STORE}")
        if not self.leading():
            # Another replica leads now and will judge this job itself: one verdict per job.
            log.info("audit of %s dropped: no longer leading audits", job.id)
            return True
        evidence = dict(outcome.evidence)
        if outcome.reference_png is not None:
            evidence["reference_blob"] = self.results.put(outcome.reference_png)
        if self.store.add_audit(job.id, job.miner_hotkey, outcome.verdict.label, evidence, now=self.clock()) is None:
            log.info("audit of %s dropped: another replica stored its verdict first", job.id)
            return True
        if outcome.verdict.label == "fail":
            log.warning("miner %s failed the audit of %s: %s", job.miner_hotkey, job.id, outcome.verdict.reason)
        else:
            log.info("audit of %s (%s, miner %s): %s", job.id, job.kind, job.miner_hotkey, outcome.verdict.label)
        return True

    def _learn_failures(self) -> None:
        """Put miners whose audits failed since the last look (on any replica) back on probation."""
        failures = self.store.failed_audits_after(self._failures_seen)
        if not failures:
            return
        with self._lock:
            for _, hotkey in failures:
                self.sampler.record_failure(hotkey)
        self._failures_seen = failures[-1][0]

    def auditor(self, model: str) -> Auditor:
        """The auditor of `model`'s jobs: the reference workers that serve it, else an in-process
        engine of it."""
        if self._auditor is not None:
            return self._auditor
        settings = self._settings
        assert settings is not None
        found = self._auditors.get(model)
        if found is not None:
            return found
        if not settings.reference_workers:
            found = self._auditors[model] = Auditor([self._engine(model, settings)])
            return found
        workers, all_answered = self._workers_for(model, settings)
        if workers:
            # Inference re-runs go to the workers; training audits measure LoRAs on an engine
            # here (held-out loss needs the model in this process), built at the first one.
            found = Auditor(workers, training_engine=functools.partial(self._engine, model, settings))
        else:
            log.warning("no reference worker serves model %s; its jobs are re-run in process", model)
            found = Auditor([self._engine(model, settings)])
        if all_answered:  # else asked again at the next audit: a worker that was down may be back
            self._auditors[model] = found
        return found

    def _engine(self, model: str, settings: OrchestratorSettings) -> Engine:
        """The in-process reference engine of `model`, built once. `audit_model_path` holds the
        default model's weights; the other models are built-in profiles or load their own."""
        engine = self._engines.get(model)
        if engine is None:
            from dippy_studio.engine import Engine, EngineOptions

            path = settings.audit_model_path if model == settings.profile else None
            engine = self._engines[model] = Engine(EngineOptions(profile=model, model_path=path))
        return engine

    def _workers_for(self, model: str, settings: OrchestratorSettings) -> tuple[list[ReferenceWorker], bool]:
        """The configured reference workers for `model`'s audits, and whether every one answered.
        Each is asked which profile it serves (signed `/v1/capacity`): those serving another are
        left out; those that do not answer are kept, so their audits are inconclusive as they
        would be for a single model (never the miner's fault, never re-run elsewhere unasked)."""
        assert self._signer is not None, "reference workers need the orchestrator's signer"
        serving: list[ReferenceWorker] = []
        silent: list[ReferenceWorker] = []
        for hotkey, url in settings.reference_workers:
            worker = ReferenceWorker(
                hotkey,
                url,
                self._signer,
                profile=model,
                blob_url=functools.partial(blob_url, settings.public_url),
                timeout_s=settings.audit_reference_timeout_s,
                request_timeout_s=settings.dispatch_timeout_s,
            )
            try:
                profile = worker.capacity().profile
            except ReferenceUnavailable as exc:
                log.warning("reference worker %s did not say which model it serves: %s", hotkey, exc)
                silent.append(worker)
                continue
            if profile == model:
                serving.append(worker)
        return serving + silent, not silent
