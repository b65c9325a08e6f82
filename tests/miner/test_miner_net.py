"""Outbound safety: the SSRF guard and the verified, size-capped download cache."""

from __future__ import annotations

import hashlib
import socket

import pytest

from dippy_studio.miner.net import DownloadCache, DownloadRejected
from dippy_studio.protocol.outbound import OutboundError, UrlPolicy, check_url

STRICT = UrlPolicy()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8000/cb", "loopback"),
        ("http://localhost/cb", "loopback"),
        ("http://[::1]/cb", "loopback"),
        ("http://10.0.0.5/cb", "private"),
        ("http://192.168.1.1/cb", "private"),
        ("http://172.16.3.4/cb", "private"),
        ("http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("http://[fe80::1]/cb", "link-local"),
        ("http://0.0.0.0/cb", "unspecified"),
        ("http://[::ffff:10.0.0.1]/cb", "private"),
        ("ftp://example.com/file", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
def test_private_and_local_targets_are_refused(url, reason):
    with pytest.raises(OutboundError, match=reason):
        check_url(url, STRICT)


def test_policy_can_allow_loopback_and_private():
    check_url("http://127.0.0.1:9/x", UrlPolicy(allow_loopback=True))
    check_url("http://10.0.0.5/x", UrlPolicy(allow_private=True))
    with pytest.raises(OutboundError, match="private"):
        check_url("http://10.0.0.5/x", UrlPolicy(allow_loopback=True))
    with pytest.raises(OutboundError, match="cloud metadata"):  # never allowed: cloud metadata lives here
        check_url("http://169.254.169.254/x", UrlPolicy(allow_loopback=True, allow_private=True))


def test_a_public_name_resolving_to_a_private_address_is_refused(monkeypatch):
    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.8.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(OutboundError, match="10.9.8.7 is a private address"):
        check_url("https://innocent.example.com/cb", STRICT)


def test_downloads_are_verified_capped_and_cached(tmp_path, server):
    data = b"lora-bytes" * 100
    sha = hashlib.sha256(data).hexdigest()
    server.files["/a"] = data
    cache = DownloadCache(tmp_path / "cache", max_total_bytes=10_000, policy=UrlPolicy(allow_loopback=True), timeout=5)
    path = cache.fetch(server.url("/a"), sha, max_bytes=10_000)
    assert path.read_bytes() == data and path.name == sha
    del server.files["/a"]  # a cached file is not downloaded again
    assert cache.fetch(server.url("/a"), sha, max_bytes=10_000) == path
    assert (cache.hits, cache.misses) == (1, 1)

    server.files["/b"] = b"x" * 5000
    with pytest.raises(OutboundError, match="expected " + "0" * 64):
        cache.fetch(server.url("/b"), "0" * 64, max_bytes=10_000)
    with pytest.raises(OutboundError, match="over the 100-byte limit"):
        cache.fetch(server.url("/b"), "1" * 64, max_bytes=100)
    with pytest.raises(OutboundError, match="HTTP 404"):
        cache.fetch(server.url("/missing"), "2" * 64, max_bytes=100)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [sha], "failed downloads leave nothing behind"


def test_a_cached_file_is_held_to_the_limit_of_each_fetch(tmp_path, server):
    # A file cached for a large limit (a dataset) and asked for again under the same sha256 where
    # the limit is small (an input image): refused, not read past that limit from the cache.
    data = b"d" * 5000
    sha = hashlib.sha256(data).hexdigest()
    server.files["/dataset.zip"] = data
    cache = DownloadCache(tmp_path / "cache", max_total_bytes=100_000, policy=UrlPolicy(allow_loopback=True), timeout=5)
    cache.fetch(server.url("/dataset.zip"), sha, max_bytes=10_000)
    with pytest.raises(DownloadRejected, match="5000 bytes, over the 100-byte limit"):
        cache.fetch(server.url("/image.png"), sha, max_bytes=100)
    assert cache.fetch(server.url("/dataset.zip"), sha, max_bytes=10_000).read_bytes() == data


def test_cache_evicts_least_recently_used(tmp_path, server):
    blobs = {f"/{i}": bytes([i]) * 4000 for i in range(3)}
    server.files.update(blobs)
    cache = DownloadCache(tmp_path / "cache", max_total_bytes=9000, policy=UrlPolicy(allow_loopback=True), timeout=5)
    shas = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    import os
    import time

    first = cache.fetch(server.url("/0"), shas["/0"], 10_000)
    os.utime(first, (time.time() - 100, time.time() - 100))
    second = cache.fetch(server.url("/1"), shas["/1"], 10_000)
    os.utime(second, (time.time() - 50, time.time() - 50))
    cache.fetch(server.url("/0"), shas["/0"], 10_000)  # a hit refreshes /0
    cache.fetch(server.url("/2"), shas["/2"], 10_000)  # over the cap: /1 is the oldest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([shas["/0"], shas["/2"]])
