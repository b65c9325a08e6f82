"""The SSRF guard: which URLs `check_url` refuses, and clients that connect only to the address
they checked (no DNS rebinding window), for httpx (webhooks, downloads, probes, callbacks) and
aiohttp (dispatch to miners). Nothing here leaves this host: public addresses are only checked."""

from __future__ import annotations

import asyncio

import aiohttp
import httpx
import pytest

import outbound_kit
from dippy_studio.protocol.outbound import (
    OutboundError,
    UrlPolicy,
    check_url,
    guarded_client,
    guarded_socket_factory,
)
from outbound_kit import PUBLIC, REBINDING_HOST, Listener, rebinding

listener = outbound_kit.listener  # fixture: a loopback listener that counts connections

DEFAULT = UrlPolicy()

REFUSED = [
    # loopback
    ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://[::1]/", "::1 is a loopback address"),
    ("http://127.1/", "127.0.0.1 is a loopback address"),
    ("http://localhost:8000/", "is a loopback address"),
    # private networks
    ("http://10.1.2.3/", "10.1.2.3 is a private address"),
    ("http://172.16.0.1/", "172.16.0.1 is a private address"),
    ("http://172.31.255.254/", "172.31.255.254 is a private address"),
    ("http://192.168.1.1/", "192.168.1.1 is a private address"),
    ("http://[fc00::1]/", "fc00::1 is a private address"),
    ("http://[fd12:3456::1]/", "fd12:3456::1 is a private address"),
    # link-local and cloud metadata
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
    ("http://169.254.1.1/", "169.254.1.1 is a link-local address"),
    ("http://[fe80::1]/", "fe80::1 is a link-local address"),
    ("http://[fd00:ec2::254]/", "fd00:ec2::254 is a cloud metadata address"),
    # shared address space (carrier-grade NAT), Alibaba Cloud's metadata among it
    ("http://100.64.0.1/", "100.64.0.1 is a shared (carrier-grade NAT) address"),
    ("http://100.127.255.254/", "100.127.255.254 is a shared (carrier-grade NAT) address"),
    ("http://100.100.100.200/latest/meta-data/", "100.100.100.200 is a cloud metadata address"),
    # IPv4 carried inside IPv6
    ("http://[2002:a9fe:a9fe::1]/", "169.254.169.254 (in 2002:a9fe:a9fe::1) is a cloud metadata address"),
    ("http://[2002:7f00:1::1]/", "127.0.0.1 (in 2002:7f00:1::1) is a loopback address"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "127.0.0.1 (in 2001:0:4136:e378:8000:63bf:80ff:fffe)"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "is a non-global address"),  # Teredo, TEST-NET client
    ("http://[64:ff9b::a9fe:a9fe]/", "169.254.169.254 (in 64:ff9b::a9fe:a9fe) is a cloud metadata address"),
    ("http://[64:ff9b::a00:1]/", "10.0.0.1 (in 64:ff9b::a00:1) is a private address"),
    ("http://[64:ff9b:1::808:808]/", "is a non-global address"),  # local-use NAT64
    ("http://[::ffff:169.254.169.254]/", "169.254.169.254 (in ::ffff:a9fe:a9fe) is a cloud metadata address"),
    ("http://[::ffff:127.0.0.1]/", "127.0.0.1 (in ::ffff:7f00:1) is a loopback address"),
    ("http://[::ffff:10.0.0.1]/", "10.0.0.1 (in ::ffff:a00:1) is a private address"),
    ("http://[::127.0.0.1]/", "127.0.0.1 (in ::7f00:1) is a loopback address"),  # IPv4-compatible
    # other non-global space
    ("http://[fec0::1]/", "fec0::1 is a non-global address"),  # site-local, deprecated
    ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
    ("http://[::]/", ":: is an unspecified address"),
    ("http://0.1.2.3/", "0.1.2.3 is a non-global address"),
    ("http://198.18.0.1/", "198.18.0.1 is a non-global address"),
    ("http://192.0.2.1/", "192.0.2.1 is a non-global address"),  # documentation
    ("http://240.0.0.1/", "240.0.0.1 is a non-global address"),
    ("http://255.255.255.255/", "255.255.255.255 is a non-global address"),
    ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
    ("http://[ff02::1]/", "ff02::1 is a multicast address"),
    # numeric forms the resolver turns into 127.0.0.1
    ("http://2130706433/", "127.0.0.1 is a loopback address"),
    ("http://0177.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://0x7f000001/", "127.0.0.1 is a loopback address"),
    ("http://0x7f.0.0.1/", "127.0.0.1 is a loopback address"),
    # the host is what follows the userinfo
    ("http://example.com@127.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://user:pass@169.254.169.254/", "169.254.169.254 is a cloud metadata address"),
    # other schemes, no host, bad ports
    ("file:///etc/passwd", "only http and https"),
    ("ftp://example.com/file", "only http and https"),
    ("gopher://127.0.0.1:6379/_INFO", "only http and https"),
    ("//example.com/x", "only http and https"),
    ("http:///path", "no host"),
    ("http://:80/", "no host"),
    ("http://8.8.8.8:99999/", "Port out of range"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_the_default_policy_refuses_every_non_public_target(url: str, reason: str):
    with pytest.raises(OutboundError, match="refused") as refused:
        check_url(url, DEFAULT)
    assert reason in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/",
        "https://1.1.1.1:8443/hook?x=1",
        "http://[2606:4700:4700::1111]/",
        "http://[::ffff:8.8.8.8]/",  # IPv4-mapped, public inside
        "http://[64:ff9b::808:808]/",  # NAT64 of a public address
        "http://[2002:808:808::1]/",  # 6to4 of a public address
    ],
)
def test_public_addresses_pass(url: str):
    check_url(url, DEFAULT)


def test_the_policy_switches_open_only_what_they_name():
    loopback, private = UrlPolicy(allow_loopback=True), UrlPolicy(allow_private=True)
    both = UrlPolicy(allow_loopback=True, allow_private=True)
    for url in ("http://127.0.0.1:9/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://localhost/"):
        check_url(url, loopback)
        with pytest.raises(OutboundError, match="loopback"):
            check_url(url, private)
    for url in ("http://10.0.0.5/", "http://192.168.0.2/", "http://[fd12::1]/", "http://100.64.0.1/"):
        check_url(url, private)
        with pytest.raises(OutboundError, match="private|shared"):
            check_url(url, loopback)
    # Metadata, link-local and other non-global space stay closed whatever the policy.
    for url in (
        "http://169.254.169.254/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
        "http://[fe80::1]/",
        "http://[fec0::1]/",
        "http://0.0.0.0/",
        "http://[2002:a9fe:a9fe::1]/",
    ):
        with pytest.raises(OutboundError, match="metadata|link-local|non-global|unspecified"):
            check_url(url, both)


def test_a_name_resolving_to_a_public_and_a_private_address_is_refused(monkeypatch):
    def answers(host, port, *args, **kwargs):
        return [(2, 1, 6, "", (PUBLIC, port)), (2, 1, 6, "", ("10.9.8.7", port))]

    monkeypatch.setattr("socket.getaddrinfo", answers)
    with pytest.raises(OutboundError, match="10.9.8.7 is a private address"):
        check_url("https://mixed.example.com/", DEFAULT)


# ---- httpx: connect to the address that was checked ----------------------------------------


def test_httpx_a_name_rebound_after_the_check_reaches_nothing(monkeypatch, listener: Listener):
    dns = rebinding(monkeypatch, public_answers=1)
    url = listener.url("/hook", host=REBINDING_HOST)
    check_url(url, DEFAULT)  # the first answer is public: the check passes
    with guarded_client(DEFAULT, timeout=5) as client, pytest.raises(OutboundError) as refused:
        client.post(url, content=b"{}")
    assert "127.0.0.1 is a loopback address" in str(refused.value)
    assert dns.lookups == 2 and listener.connections == 0


def test_httpx_the_same_rebinding_reaches_the_listener_when_loopback_is_allowed(monkeypatch, listener: Listener):
    # The control for the test above: the stub and the listener do work, and the request goes to
    # the checked address under the URL's own name (the Host header is kept).
    rebinding(monkeypatch, public_answers=0)
    with guarded_client(UrlPolicy(allow_loopback=True), timeout=5) as client:
        response = client.post(listener.url("/hook", host=REBINDING_HOST), content=b"{}")
    assert response.status_code == 204 and listener.connections == 1
    assert listener.hosts == [f"{REBINDING_HOST}:{listener.port}"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/",
        "http://[::ffff:127.0.0.1]:{port}/",
        "http://localhost:{port}/",
        "http://2130706433:{port}/",
        "http://example.com@127.0.0.1:{port}/",
    ],
)
def test_httpx_refuses_at_connect_time_without_any_check_url(url: str, listener: Listener):
    with guarded_client(DEFAULT, timeout=5) as client, pytest.raises(OutboundError, match="loopback"):
        client.get(url.format(port=listener.port))
    assert listener.connections == 0


def test_httpx_redirects_are_not_followed_and_each_hop_is_checked_when_asked(listener: Listener):
    with guarded_client(UrlPolicy(allow_loopback=True), timeout=5) as client:
        assert client.get(listener.url("/redirect")).status_code == 302
        assert listener.connections == 1
        with pytest.raises(OutboundError, match="10.0.0.1 is a private address"):
            client.get(listener.url("/redirect"), follow_redirects=True)


def test_httpx_unresolvable_names_are_connection_errors():
    with guarded_client(DEFAULT, timeout=5) as client, pytest.raises(httpx.ConnectError):
        client.get("http://no-such-host.invalid/")


# ---- aiohttp: the connector's socket factory ------------------------------------------------


def aiohttp_post(url: str, policy: UrlPolicy) -> int:
    async def post() -> int:
        connector = aiohttp.TCPConnector(socket_factory=guarded_socket_factory(policy))
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.post(url, data=b"{}", allow_redirects=False) as response,
        ):
            return response.status

    return asyncio.run(post())


@pytest.mark.parametrize("host", ["127.0.0.1", REBINDING_HOST])
def test_aiohttp_refuses_a_loopback_target_by_address_or_by_name(monkeypatch, listener: Listener, host: str):
    rebinding(monkeypatch, public_answers=0)
    with pytest.raises(aiohttp.ClientConnectorError, match="127.0.0.1 is a loopback address"):
        aiohttp_post(listener.url("/v1/inference", host=host), DEFAULT)
    assert listener.connections == 0
    # Allowed when the policy opens loopback: the refusal above was the guard's.
    assert aiohttp_post(listener.url("/v1/inference", host=host), UrlPolicy(allow_loopback=True)) == 204
    assert listener.connections == 1
