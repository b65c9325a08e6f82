"""Logging for the long-running services (miner, orchestrator, validator): one format, and the
HTTP client's per-request INFO lines turned down, since every probe, callback and download
would otherwise drown the service's own messages."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("httpx", "httpcore")


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
