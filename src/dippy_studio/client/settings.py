"""The client's defaults, in one place. Every one is also a keyword of `Client` / `AsyncClient`."""

from __future__ import annotations

import os
from dataclasses import dataclass

# Read when `Client()` is given no base_url / api_key: what `dippy-studio up` prints.
ENV_BASE_URL = "DIPPY_API_URL"
ENV_API_KEY = "DIPPY_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8090"


@dataclass(frozen=True)
class ClientSettings:
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    # One HTTP exchange; a `Prefer: wait=N` submit adds N to it.
    timeout_s: float = 30.0
    # 429 and 503 are retried this many times, after the server's Retry-After...
    max_retries: int = 3
    # ...unless it asks for longer than this: then the error is raised at once (its `retry_after`
    # says when to come back), so a script never hangs for minutes on a spent rate limit.
    max_retry_wait_s: float = 30.0
    # Without a Retry-After: this, doubled on each retry.
    retry_backoff_s: float = 0.5
    # `wait` polls the request this often when the server does not hold the answer.
    poll_interval_s: float = 1.0
    # An event stream silent for this long is dead (the server sends a keep-alive every 15 s).
    stream_idle_s: float = 60.0
    # Requests and LoRAs per page when listing.
    page_size: int = 50

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, **overrides: object) -> ClientSettings:
        """Settings from the arguments given, then the environment, then the defaults."""
        return cls(
            base_url=(base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).rstrip("/"),
            api_key=api_key or os.environ.get(ENV_API_KEY),
            **{name: value for name, value in overrides.items() if value is not None},  # type: ignore[arg-type]
        )
