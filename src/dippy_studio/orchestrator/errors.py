"""What the orchestrator refuses, as domain errors. `api` maps each to its HTTP status; nothing
below the API knows about HTTP."""

from __future__ import annotations


class OrchestratorError(Exception):
    """A request the orchestrator refuses, with a reason a client can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthorized(OrchestratorError):
    """No live API key: missing, malformed, unknown or revoked."""


class RateLimited(OrchestratorError):
    """The key spent its per-minute limit; `retry_after` seconds until the next window."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class InvalidRequest(OrchestratorError):
    """The request is well-formed but cannot be served as asked (limits, unknown LoRA, bad URL)."""


class TooLarge(OrchestratorError):
    """An upload is over its size limit."""


class NotFound(OrchestratorError):
    """No such request, LoRA or blob for this key (another key's ids look unknown too)."""


class Conflict(OrchestratorError):
    """The request is in a state that does not allow this (a result before success, a second cancel)."""


class QuotaExceeded(OrchestratorError):
    """The key's usage quota has no room for this request (`usage`); unlike a rate limit, waiting
    a minute does not help: the period must end or the operator must raise the quota."""


class Unavailable(OrchestratorError):
    """This replica cannot serve what exists (a result stored where it cannot read it) or cannot
    check what arrived (`model_code`): a fault on this side, not the sender's. The reason says
    what went wrong."""
