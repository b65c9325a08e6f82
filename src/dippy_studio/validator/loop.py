"""The validator loop: every tempo, scores -> weights -> chain, surviving outages.

One round (`Validator.run_round`):
1. read the chain (block, hyperparameters, metagraph); wait out weights_rate_limit;
2. fetch the orchestrator's signed scores and verify signature, signer and freshness;
3. compute weights with the pure `next_weights` (win rates, softmax, burn, EMA, conformance);
4. set them with the configured version_key, and persist the EMA state.
A bad or missing score payload never zeroes miners: the round re-sets the previous weights
(so the validator stays active) and leaves the EMA state untouched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from dippy_studio.chain.base import Chain, ChainError, ChainUnavailable, InvalidWeights, RateLimited
from dippy_studio.chain.conformance import blocks_until_allowed
from dippy_studio.protocol.auth import DEFAULT_ALLOWED_SKEW, DEFAULT_MAX_AGE
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.nonces import MemoryNonceStore, retention_for
from dippy_studio.validator.scores import ScoresRejected, ScoresUnavailable, fetch_scores
from dippy_studio.validator.settings import ValidatorSettings
from dippy_studio.validator.weights import drop_reassigned, next_weights

log = logging.getLogger("dippy_studio.validator")


@dataclass
class RoundReport:
    """What a round did and why; `rows` feed the operator's table."""

    block: int
    action: str  # "set", "kept previous", "waiting", "dry run", "nothing to set", "failed"
    reason: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    weights: dict[int, int] = field(default_factory=dict)


@dataclass
class State:
    smoothed: dict[int, float] = field(default_factory=dict)
    hotkeys: dict[int, str] = field(default_factory=dict)
    chain: dict[int, int] = field(default_factory=dict)
    last_round_block: int | None = None

    @classmethod
    def load(cls, path: Path) -> State:
        """The state saved at `path` (empty when there is none); `StateError` when the file cannot
        be read as one. It is never replaced silently: it holds the EMA the weights move from."""
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            last_round_block = data.get("last_round_block")
            return cls(
                smoothed={int(k): float(v) for k, v in data.get("smoothed", {}).items()},
                hotkeys={int(k): str(v) for k, v in data.get("hotkeys", {}).items()},
                chain={int(k): int(v) for k, v in data.get("chain", {}).items()},
                last_round_block=None if last_round_block is None else int(last_round_block),
            )
        except (OSError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise StateError(
                f"validator state {path} is unreadable ({type(exc).__name__}: {exc}); "
                "move it aside to start the weights' moving average afresh"
            ) from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        text = json.dumps(
            {"smoothed": self.smoothed, "hotkeys": self.hotkeys, "chain": self.chain,
             "last_round_block": self.last_round_block}, indent=2, sort_keys=True,
        )  # fmt: skip
        with tmp.open("w") as file:
            file.write(text)
            file.flush()
            # On disk before the rename: a crash must leave the old state or the new, never an empty file.
            os.fsync(file.fileno())
        tmp.replace(path)


class StateError(ValueError):
    """The validator's saved state cannot be read."""


def with_retries(call: Callable[[], Any], *, retries: int, backoff_s: float, retry_on: tuple[type[Exception], ...]):
    """Call, retrying `retry_on` errors with exponential backoff; the last error propagates."""
    for attempt in range(retries + 1):
        try:
            return call()
        except retry_on as exc:
            if attempt == retries:
                raise
            delay = backoff_s * 2**attempt
            log.warning("%s; retrying in %.1fs", exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Validator:
    def __init__(
        self,
        settings: ValidatorSettings,
        chain: Chain,
        signer: Signer,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not settings.orchestrator_url or not settings.orchestrator_hotkey:
            raise ValueError("the validator needs orchestrator_url and orchestrator_hotkey")
        self.settings = settings
        self.chain = chain
        self.signer = signer
        self.http = http or httpx.Client(base_url=settings.orchestrator_url, timeout=settings.http_timeout_s)
        self.clock = clock
        # Scores are verified with the default freshness window (validator/scores.py).
        self.nonces = MemoryNonceStore(retention=retention_for(DEFAULT_MAX_AGE, DEFAULT_ALLOWED_SKEW))
        self.state_path = settings.state_path or (
            settings.data_dir / "validator" / f"state-{signer.ss58_address[:10]}.json"
        )
        self.state = State.load(self.state_path)

    def _retry(self, call, retry_on):
        return with_retries(call, retries=self.settings.retries, backoff_s=self.settings.backoff_s, retry_on=retry_on)

    def run_round(self, *, dry_run: bool = False) -> RoundReport:
        settings = self.settings
        block = self._retry(self.chain.block, (ChainUnavailable,))
        hp = self._retry(self.chain.hyperparameters, (ChainUnavailable,))
        graph = self._retry(self.chain.metagraph, (ChainUnavailable,))
        me = graph.by_hotkey(self.signer.ss58_address)
        if me is None:
            return RoundReport(
                block, "waiting", f"this validator's hotkey {self.signer.ss58_address} is not registered"
            )
        wait = blocks_until_allowed(me.last_update, block, hp.weights_rate_limit)
        if wait and not dry_run:
            return RoundReport(block, "waiting", f"weights_rate_limit: {wait} more blocks")

        hotkeys = {n.uid: n.hotkey for n in graph.neurons}
        coldkeys = {n.uid: n.coldkey for n in graph.neurons}
        try:
            sheet = self._retry(
                lambda: fetch_scores(
                    self.http,
                    me=self.signer,
                    orchestrator_hotkey=settings.orchestrator_hotkey,
                    nonce_store=self.nonces,
                    max_age_s=settings.max_scores_age_s,
                    now=self.clock(),
                ),
                (ScoresUnavailable,),
            )
        except (ScoresUnavailable, ScoresRejected) as exc:
            return self._keep_previous(block, str(exc), dry_run)

        scores = {graph.uid_of(hk): s for hk, s in sheet.scores.items() if graph.uid_of(hk) is not None}
        previous = drop_reassigned(self.state.smoothed, self.state.hotkeys, hotkeys)
        try:
            round_ = next_weights(
                scores, previous, hyperparameters=hp, alpha=settings.alpha, hotkeys=hotkeys, coldkeys=coldkeys,
                banned_hotkeys=settings.banned_hotkeys, banned_coldkeys=settings.banned_coldkeys,
                burn_uid=settings.burn_uid, burn_share=settings.burn_share, self_uid=me.uid,
            )  # fmt: skip
        except InvalidWeights as exc:
            return self._keep_previous(block, f"weights cannot meet the subnet's rules: {exc}", dry_run)
        rows = [
            {"uid": uid, "hotkey": hotkeys.get(uid, "?"), "score": scores.get(uid, 0.0),
             "target": round_.target.get(uid, 0.0), "smoothed": round_.smoothed.get(uid, 0.0),
             "u16": round_.chain.get(uid, 0)}
            for uid in sorted(set(round_.smoothed) | set(scores))
        ]  # fmt: skip
        if not round_.chain:
            return RoundReport(block, "nothing to set", "no miner earned weight and no burn uid is set", rows)
        if dry_run:
            return RoundReport(block, "dry run", "computed, not set", rows, round_.chain)
        try:
            set_ = self._set(me.hotkey, round_.chain)
        except (RateLimited, ChainError) as exc:
            return RoundReport(block, "kept previous", f"chain refused the weights: {exc}", rows)
        self.state = State(round_.smoothed, hotkeys, set_, block)
        self.state.save(self.state_path)
        window = f"{_span(sheet.window_end - sheet.window_start)} ending {sheet.window_end:%Y-%m-%d %H:%M:%S}"
        return RoundReport(block, "set", f"scores of the {window} from {len(sheet.scores)} miners", rows, set_)

    def _set(self, hotkey: str, row: dict[int, int]) -> dict[int, int]:
        uids = sorted(row)
        return self._retry(
            lambda: self.chain.set_weights(
                hotkey, uids, [float(row[u]) for u in uids], version_key=self.settings.version_key
            ),
            (ChainUnavailable,),
        )

    def _keep_previous(self, block: int, reason: str, dry_run: bool) -> RoundReport:
        rows = [
            {"uid": uid, "hotkey": self.state.hotkeys.get(uid, "?"), "score": None, "target": None,
             "smoothed": w, "u16": self.state.chain.get(uid, 0)}
            for uid, w in sorted(self.state.smoothed.items())
        ]  # fmt: skip
        if not self.state.chain or dry_run:
            return RoundReport(block, "kept previous", reason, rows, dict(self.state.chain))
        try:
            self._set(self.signer.ss58_address, self.state.chain)
        except ChainError as exc:
            reason += f"; re-setting the previous weights failed too: {exc}"
        return RoundReport(block, "kept previous", reason, rows, dict(self.state.chain))

    def run_forever(self, block_time_s: float, on_report: Callable[[RoundReport], None], stop=None) -> None:
        """A round every tempo (or sooner when a round had to wait), until `stop()` is true."""
        while not (stop and stop()):
            try:
                report = self.run_round()
            except ChainError as exc:
                report = RoundReport(-1, "waiting", f"chain unavailable: {exc}")
            except Exception as exc:
                # Whatever else breaks a round (a full disk, a bug) must not stop the validator:
                # say what failed, keep the traceback in the log, and try again next block.
                log.exception("validator round failed")
                report = RoundReport(-1, "failed", f"round failed: {type(exc).__name__}: {exc}")
            on_report(report)
            tempo = self.settings.tempo or self._tempo()
            blocks = tempo if report.action in ("set", "kept previous") else 1
            deadline = time.monotonic() + blocks * block_time_s
            while time.monotonic() < deadline and not (stop and stop()):
                time.sleep(min(1.0, block_time_s))

    def _tempo(self) -> int:
        try:
            return self.chain.hyperparameters().tempo
        except ChainError:
            return 1


def _span(length: timedelta) -> str:
    """A scoring window's length for the operator: "24 h", "30 min", "45 s"."""
    seconds = length.total_seconds()
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"
