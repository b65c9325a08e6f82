"""Refusals that cost nothing. Admission goes through the database writer, which every client's
requests share; a client that keeps sending requests that are refused anyway (a key over its
per-minute limit, a secret that is not a live key) must not take turns of it from the others.

So a refusal is remembered in memory, per secret, for as long as it stays true: a rate limit
until its window ends, an unknown or revoked secret for `unknown_ttl_s`. Later requests with that
secret are refused from memory. Each replica learns on its own first refusal, and raising a key's
limit takes effect at the next window at the latest.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from dippy_studio.orchestrator.errors import OrchestratorError, RateLimited, Unauthorized

# A refused secret that is not a key at all is remembered this long; a key created later has a new
# secret, so the only cost of a longer time is memory, which `max_entries` bounds.
UNKNOWN_TTL_S = 30.0
MAX_ENTRIES = 10_000


class Refusals:
    """Remembered refusals by secret (hashed: the cache holds no secret), least recently used
    dropped first. Thread-safe: admission runs on the event loop and on worker threads."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        unknown_ttl_s: float = UNKNOWN_TTL_S,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self.clock = clock
        self.unknown_ttl_s = unknown_ttl_s
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._until: OrderedDict[str, tuple[float, OrchestratorError]] = OrderedDict()

    def check(self, secret: str | None) -> None:
        """Raise the refusal this secret still has, if any."""
        if secret is None:
            raise Unauthorized("missing Authorization: Bearer <API key>")
        digest = _digest(secret)
        now = self.clock()
        with self._lock:
            remembered = self._until.get(digest)
            if remembered is None:
                return
            until, error = remembered
            if until <= now:
                del self._until[digest]
                return
            self._until.move_to_end(digest)
        if isinstance(error, RateLimited):
            raise RateLimited(str(error), until - now)
        raise type(error)(str(error))

    def remember(self, secret: str | None, error: OrchestratorError) -> None:
        """Note a refusal the database gave; other errors are not about the caller and are ignored."""
        if secret is None:
            return
        if isinstance(error, RateLimited):
            ttl = error.retry_after
        elif isinstance(error, Unauthorized):
            ttl = self.unknown_ttl_s
        else:
            return
        digest = _digest(secret)
        with self._lock:
            self._until[digest] = (self.clock() + ttl, error)
            self._until.move_to_end(digest)
            while len(self._until) > self.max_entries:
                self._until.popitem(last=False)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
