"""The job state machine, as data. The store, and the database itself (migration 0003), refuse
any transition that is not listed here.

    queued ──claim──> dispatched ──miner accepted──> running ──> succeeded | failed
      ^                   │                            │
      └──── miner timeout / failure: re-dispatch ──────┘
    queued ──client deadline passed──> failed
    any non-terminal ──client──> canceled

There is no separate `expired` state: a job whose client deadline passes is `failed` with an
error that says so, which keeps the public status list to the six the API documents.
"""

from __future__ import annotations

from enum import StrEnum


class RequestStatus(StrEnum):
    queued = "queued"
    dispatched = "dispatched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: frozenset[RequestStatus] = frozenset({RequestStatus.succeeded, RequestStatus.failed, RequestStatus.canceled})
ACTIVE: frozenset[RequestStatus] = frozenset({RequestStatus.dispatched, RequestStatus.running})
NON_TERMINAL: frozenset[RequestStatus] = frozenset(RequestStatus) - TERMINAL

_Q, _D, _R = RequestStatus.queued, RequestStatus.dispatched, RequestStatus.running
_S, _F, _C = RequestStatus.succeeded, RequestStatus.failed, RequestStatus.canceled

TRANSITIONS: frozenset[tuple[RequestStatus, RequestStatus]] = frozenset(
    {
        (_Q, _D),  # claimed by a dispatcher
        (_Q, _F),  # the client's deadline passed before any miner took it
        (_D, _R),  # the miner accepted the job (or reported that it started)
        (_D, _Q),  # the miner refused, failed or timed out: try another one
        (_R, _Q),
        (_D, _S),  # a fast miner may call back before we saw it running
        (_D, _F),
        (_R, _S),
        (_R, _F),
        (_Q, _C),
        (_D, _C),
        (_R, _C),
    }
)


# How an attempt (one dispatch to one miner, a `job_attempts` row) ended, and who that is on:
#   succeeded, canceled           the job ended there.
#   failed, invalid, timeout,     the miner did not deliver: the attempt counts against the job's
#   refused                       `max_attempts` ("refused": any refusal not listed below).
#   busy, unreachable             the miner did not take the job: it pushed back (429, or 503 with
#                                 Retry-After), its answer did not come in time, or it could not be
#                                 reached. Back-pressure, not a failure: no attempt is used up.
#   bad_input, expired            the client's request ended it: the miner found its input unusable,
#                                 or the client's deadline, not the attempt timeout, cut the
#                                 attempt short. The job fails; the miner is not to blame.
NOT_TAKEN: frozenset[str] = frozenset({"busy", "unreachable"})
CLIENTS_DOING: frozenset[str] = frozenset({"bad_input", "expired"})


def can_transition(frm: RequestStatus | str, to: RequestStatus | str) -> bool:
    """True when the state machine allows moving a job from `frm` to `to`."""
    try:
        return (RequestStatus(frm), RequestStatus(to)) in TRANSITIONS
    except ValueError:
        return False


# The database enforces TRANSITIONS too (migration 0003 copies them into `job_transitions`), and
# refuses a status change outside them, or a new job that is not queued, with this message prefix
# on both dialects and this SQLSTATE on PostgreSQL. Drivers raise it as an IntegrityError.
ILLEGAL_TRANSITION_MESSAGE = "illegal job transition"
ILLEGAL_TRANSITION_SQLSTATE = "23J01"


def is_illegal_transition(exc: BaseException) -> bool:
    """True when `exc` (a SQLAlchemy error, or the driver's own under it) is the database refusing
    a job status change that the state machine does not allow."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg; sqlite3 has none
    if sqlstate is not None:
        return sqlstate == ILLEGAL_TRANSITION_SQLSTATE
    return str(orig).startswith(ILLEGAL_TRANSITION_MESSAGE)
