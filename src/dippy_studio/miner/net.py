"""Outbound HTTP for the miner: verified downloads into a content-addressed LRU cache, and posts
whose answers are read no further than their status. Every outbound URL goes through the SSRF
guard (`protocol.outbound.check_url`) first."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from dippy_studio.protocol.outbound import OutboundError, UrlPolicy, check_url, guarded_client

# How much of a refusal's body is kept for the log.
PREVIEW_BYTES = 200


def send_for_status(client: httpx.Client, request: httpx.Request) -> tuple[int, str]:
    """Send `request` and return the answer's status with the start of its body (for a log).
    The rest is never read: a receiver chosen by a job's sender could answer without end."""
    response = client.send(request, stream=True)
    try:
        if response.is_success:
            return response.status_code, ""
        preview = b""
        for chunk in response.iter_raw(PREVIEW_BYTES):
            preview += chunk
            if len(preview) >= PREVIEW_BYTES:
                break
        return response.status_code, preview[:PREVIEW_BYTES].decode("utf-8", errors="replace")
    finally:
        response.close()


class DownloadRejected(OutboundError):
    """The download arrived but is not what was promised: over the size limit, or another sha256.
    Unlike a network failure, the fault is whoever named and hashed the file."""


class DownloadCache:
    """Downloads verified by sha256, kept as DIR/<sha256> and evicted least-recently-used
    first when the total size passes `max_total_bytes`."""

    def __init__(self, directory: Path, max_total_bytes: int, policy: UrlPolicy, timeout: float) -> None:
        self.directory = directory
        self.max_total_bytes = max_total_bytes
        self.policy = policy
        self.timeout = timeout
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def fetch(self, url: str, sha256: str, max_bytes: int, abort: Callable[[], None] | None = None) -> Path:
        """The verified file. `abort` is called as the bytes arrive and stops the download by
        raising: a job's deadline and cancelation hold however slowly a server sends."""
        target = self.directory / sha256
        if target.is_file():
            # Cached under another fetch's limit (a dataset's is far above an input image's).
            size = target.stat().st_size
            if size > max_bytes:
                raise DownloadRejected(f"download of {url} is {size} bytes, over the {max_bytes}-byte limit")
            os.utime(target)  # mark as recently used
            self.hits += 1
            return target
        self.misses += 1
        check_url(url, self.policy)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".part-")
        tmp = Path(tmp_name)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                guarded_client(self.policy, timeout=self.timeout) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise OutboundError(f"download of {url} failed: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise DownloadRejected(f"download of {url} is {declared} bytes, over the {max_bytes}-byte limit")
                # As each read arrives: a fixed chunk size would wait for that many bytes first.
                for chunk in response.iter_bytes():
                    if abort is not None:
                        abort()
                    size += len(chunk)
                    if size > max_bytes:
                        raise DownloadRejected(f"download of {url} passed the {max_bytes}-byte limit")
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha256:
                raise DownloadRejected(f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}")
            tmp.replace(target)
        except httpx.HTTPError as exc:
            raise OutboundError(f"download of {url} failed: {type(exc).__name__}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=target)
        return target

    def _evict(self, keep: Path) -> None:
        with self._lock:
            files = [p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith(".part-")]
            total = sum(p.stat().st_size for p in files)
            for path in sorted(files, key=lambda p: p.stat().st_mtime):
                if total <= self.max_total_bytes:
                    break
                if path == keep:
                    continue
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
