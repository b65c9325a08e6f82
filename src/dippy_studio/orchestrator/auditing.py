"""The audit queue: which finished jobs get audited, in one background thread."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime

from dippy_studio.orchestrator import kinds
from dippy_studio.orchestrator.audit import Auditor, AuditSampler
from dippy_studio.orchestrator.blobs import BlobStore
from dippy_studio.orchestrator.models import Job, utcnow
from dippy_studio.orchestrator.settings import OrchestratorSettings
from dippy_studio.orchestrator.store import Store

log = logging.getLogger("dippy_studio.orchestrator.audits")


class AuditQueue:
    """Audits of finished jobs, in one background thread (reference engines run one job at a time).

    Every succeeded job is offered; the sampler (`audit.AuditSampler`) picks which to audit, per
    miner and job kind, after the result is in, so a miner cannot tell audited work from the
    rest. A picked job is flagged (`jobs.audit`), checked by its kind's `audit` (`kinds`), and its
    verdict and evidence stored as an `Audit` row. Inference jobs are re-run (the reference image
    goes to the results blob store). Training jobs have their LoRA loaded and measured on the
    held-out part of the client's dataset that was kept from the miner at submission; a job whose
    dataset was too small to split gets an inconclusive verdict once the LoRA's shape is checked.
    A failed audit puts the miner back on audit probation; scoring turns failures into penalties,
    and a training audit's measured improvement into the job's quality factor.

    Picked jobs that have no verdict when the queue starts (the orchestrator stopped before
    auditing them) are queued again, so a restart never lets a picked job go unjudged.
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
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.results = results
        self.assets = assets
        self.heldout = heldout
        self.sampler = sampler
        # Settings instead of an Auditor: build the reference engine at the first audit, so a
        # server (or a test) that never audits never loads a model for it.
        self._auditor = auditor if isinstance(auditor, Auditor) else None
        self._settings = auditor if isinstance(auditor, OrchestratorSettings) else None
        self.clock = clock
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="orch-audits", daemon=True)

    def start(self) -> None:
        # Audits picked before a restart are still owed: the pick is stored (`jobs.audit`), the
        # queue was only in memory.
        for job_id in self.store.flagged_without_verdict():
            self._queue.put(job_id)
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def offer(self, job: Job) -> bool:
        """Decide whether to audit this succeeded job, and queue it if so. Does not block: the
        callback's event loop calls it; the audit thread records the pick before the audit."""
        if not job.miner_hotkey or not job.result_blob:
            return False
        with self._lock:  # the sampler keeps per-miner counts
            decision = self.sampler.decide(job.miner_hotkey, job.kind)
        if not decision.audit:
            return False
        self._queue.put(job.id)
        return True

    def _run(self) -> None:
        while (job_id := self._queue.get()) is not None:
            try:
                # Stored first, so an audit cut short by a restart is still owed (`start`).
                self.store.flag_for_audit(job_id)
                self._audit(job_id)
            except Exception:
                log.exception("audit of %s crashed", job_id)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _audit(self, job_id: str) -> None:
        job = self.store.load_job(job_id)
        if job is None or job.miner_hotkey is None or job.result_blob is None:
            return
        if self.store.list_audits(job_id=job_id):
            return  # judged already (by another orchestrator on the same database, say)
        audit = kinds.get(job.kind).audit
        if audit is None:
            return  # a kind that is never audited
        outcome = audit(self, job)
        evidence = dict(outcome.evidence)
        if outcome.reference_png is not None:
            evidence["reference_blob"] = self.results.put(outcome.reference_png)
        self.store.add_audit(job.id, job.miner_hotkey, outcome.verdict.label, evidence, now=self.clock())
        if outcome.verdict.label == "fail":
            log.warning("miner %s failed the audit of %s: %s", job.miner_hotkey, job.id, outcome.verdict.reason)
            with self._lock:
                self.sampler.record_failure(job.miner_hotkey)

    def auditor(self) -> Auditor:
        if self._auditor is None:
            from dippy_studio.engine import Engine, EngineOptions

            assert self._settings is not None
            options = EngineOptions(profile=self._settings.profile, model_path=self._settings.audit_model_path)
            self._auditor = Auditor([Engine(options)])
        return self._auditor
