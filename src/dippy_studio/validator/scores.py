"""Fetching the orchestrator's scores and deciding whether to trust them.

A payload counts only when it is signed (btauth/1) by the orchestrator hotkey this validator
was configured with, for this validator's hotkey, and its scoring window ended recently.
Anything else raises `ScoresRejected`, and the caller keeps its previous weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from dippy_studio.protocol.auth import AuthError, SenderPolicy, verify_request
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.nonces import NonceStore


class ScoresUnavailable(Exception):
    """The orchestrator could not be reached or did not answer 200."""


class ScoresRejected(Exception):
    """The orchestrator answered, but the payload cannot be trusted (unsigned, stale, wrong signer...)."""


@dataclass(frozen=True)
class ScoreSheet:
    scores: dict[str, float]
    window_start: datetime
    window_end: datetime
    orchestrator: str


def fetch_scores(
    http: httpx.Client,
    *,
    me: Signer,
    orchestrator_hotkey: str,
    nonce_store: NonceStore,
    max_age_s: float,
    now: float | None = None,
) -> ScoreSheet:
    path = f"/v1/scores?for={me.ss58_address}"
    try:
        response = http.get(path)
    except httpx.HTTPError as exc:
        raise ScoresUnavailable(f"orchestrator unreachable: {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise ScoresUnavailable(f"orchestrator answered HTTP {response.status_code}")
    return verify_scores(
        response.headers,
        response.content,
        path=path,
        me=me,
        orchestrator_hotkey=orchestrator_hotkey,
        nonce_store=nonce_store,
        max_age_s=max_age_s,
        now=now,
    )


def verify_scores(
    headers,
    body: bytes,
    *,
    path: str,
    me: Signer,
    orchestrator_hotkey: str,
    nonce_store: NonceStore,
    max_age_s: float,
    now: float | None = None,
) -> ScoreSheet:
    try:
        verify_request(
            headers,
            body,
            method="GET",
            path=path,
            receiver_ss58=me.ss58_address,
            nonce_store=nonce_store,
            policy=SenderPolicy.allow_list([orchestrator_hotkey]),
            now=now,
        )
    except AuthError as exc:
        raise ScoresRejected(f"scores signature refused: {exc.reason}") from None
    try:
        payload = json.loads(body)
        scores = {str(k): float(v) for k, v in payload["scores"].items()}
        start = datetime.fromisoformat(payload["window"]["start"])
        end = datetime.fromisoformat(payload["window"]["end"])
    # OverflowError: an integer too large for a float; RecursionError: nesting deeper than the
    # decoder goes. Both come from the payload, not from this validator.
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        raise ScoresRejected(f"malformed scores payload: {type(exc).__name__}: {exc}") from None
    if any(v != v or v < 0 or v == float("inf") for v in scores.values()):
        raise ScoresRejected("scores must be finite and non-negative")
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    age = (now if now is not None else time.time()) - end.timestamp()
    if age > max_age_s:
        raise ScoresRejected(f"scores window ended {age:.0f}s ago; the limit is {max_age_s:.0f}s")
    return ScoreSheet(scores=scores, window_start=start, window_end=end, orchestrator=orchestrator_hotkey)
