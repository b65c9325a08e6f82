"""Outbound HTTP for the miner: an SSRF guard, verified downloads into a content-addressed
LRU cache, and nothing else. Every outbound URL goes through `check_url` first."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx


class OutboundError(Exception):
    """An outbound URL was refused or a download failed; the message says why."""


@dataclass(frozen=True)
class UrlPolicy:
    allow_loopback: bool = False
    allow_private: bool = False


def check_url(url: str, policy: UrlPolicy) -> None:
    """Refuse URLs that would reach this host or a private network, unless the policy allows it.

    Every address the name resolves to is checked, so a public name that resolves to a
    private address is refused too.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise OutboundError(f"refused {url!r}: only http and https URLs are allowed")
    if not parts.hostname:
        raise OutboundError(f"refused {url!r}: no host")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundError(f"refused {url!r}: cannot resolve {parts.hostname}: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_loopback:
            if not policy.allow_loopback:
                raise OutboundError(f"refused {url!r}: {address} is a loopback address")
        elif address.is_link_local or address.is_multicast or address.is_unspecified or address.is_reserved:
            raise OutboundError(f"refused {url!r}: {address} is not a routable unicast address")
        elif address.is_private and not policy.allow_private:
            raise OutboundError(f"refused {url!r}: {address} is a private address")


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

    def fetch(self, url: str, sha256: str, max_bytes: int) -> Path:
        target = self.directory / sha256
        if target.is_file():
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
                httpx.stream("GET", url, timeout=self.timeout, follow_redirects=False) as response,
            ):
                if response.status_code != 200:
                    raise OutboundError(f"download of {url} failed: HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise OutboundError(f"download of {url} is {declared} bytes, over the {max_bytes}-byte limit")
                for chunk in response.iter_bytes(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise OutboundError(f"download of {url} passed the {max_bytes}-byte limit")
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != sha256:
                raise OutboundError(f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}")
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
