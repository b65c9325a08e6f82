"""Outbound URLs, for every service: the SSRF guard. A miner (callbacks, downloads) and the
orchestrator (miner endpoints, webhooks, client-given dataset and LoRA URLs) reach URLs that
someone else chose; one policy decides which addresses they may reach.

Two layers apply it:

- `check_url` refuses a URL early with a clear reason: at submission (a 422) and before a send.
- the clients built here check again at connect time and connect only to the address they
  checked: `guarded_client` (httpx) and `guarded_socket_factory` (aiohttp's `TCPConnector`). A name
  that resolves to a public address for `check_url` and to a private one a moment later (DNS
  rebinding) so reaches nothing, and neither does a URL that the HTTP client parses differently
  from `urllib` (userinfo and backslash tricks). They take no proxy from the environment: a proxy
  would connect on our behalf, past the check.

Only globally routable unicast addresses pass, unless the policy opens loopback or the private
networks. IPv6 addresses that carry an IPv4 address (IPv4-mapped and -compatible, 6to4, Teredo,
NAT64) are judged by the IPv4 address too. Cloud metadata addresses never pass.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

IPAddress = IPv4Address | IPv6Address

# Never reachable, whatever the policy: instance credentials live there. AWS, GCP and Azure
# (169.254.169.254), AWS over IPv6, AWS ECS task metadata, Alibaba Cloud, Oracle Cloud.
METADATA_ADDRESSES = frozenset(
    ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200", "192.0.0.192")
)
# What `allow_private` opens: the networks an operator runs its own hosts on (RFC 1918, IPv6
# unique local) and shared address space (carrier-grade NAT, and VPN overlays such as Tailscale).
PRIVATE_NETWORKS = tuple(ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
SHARED_NETWORK = ip_network("100.64.0.0/10")
# Not globally routable, though `is_global` says they are on some Python versions: "this
# network", IETF protocol assignments, benchmarking, reserved, deprecated site-local, local-use
# NAT64, IPv6 documentation, SRv6 SIDs.
NOT_GLOBAL = tuple(
    ip_network(n)
    for n in (
        "0.0.0.0/8",
        "192.0.0.0/24",
        "198.18.0.0/15",
        "240.0.0.0/4",
        "fec0::/10",
        "64:ff9b:1::/48",
        "3fff::/20",
        "5f00::/16",
    )
)
NAT64_NETWORK = ip_network("64:ff9b::/96")
SHARED = "shared (carrier-grade NAT)"


class OutboundError(Exception):
    """An outbound URL was refused or a download failed; the message says why."""


@dataclass(frozen=True)
class UrlPolicy:
    allow_loopback: bool = False
    allow_private: bool = False


def _kind(address: IPAddress) -> str | None:
    """What kind of non-public address this is, or None for a globally routable unicast one."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified:
        return "unspecified"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if any(address in network for network in PRIVATE_NETWORKS):
        return "private"
    if address in SHARED_NETWORK:
        return SHARED
    if not address.is_global or any(address in network for network in NOT_GLOBAL):
        return "non-global"
    return None


def _embedded_ipv4(address: IPv6Address) -> tuple[list[IPv4Address], bool]:
    """The IPv4 addresses an IPv6 address carries, and whether they are all it stands for (an
    IPv4-mapped or -compatible address is the IPv4 host itself, not an IPv6 one)."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped], True
    if int(address) >> 32 == 0 and int(address) > 1:  # IPv4-compatible ::a.b.c.d (not :: or ::1)
        return [IPv4Address(int(address))], True
    if address.sixtofour is not None:
        return [address.sixtofour], False
    if address.teredo is not None:
        server, client = address.teredo
        return [client, server], False
    if address in NAT64_NETWORK:
        return [IPv4Address(int(address) & 0xFFFFFFFF)], False
    return [], False


def _views(address: IPAddress) -> Iterator[IPAddress]:
    """Every address a packet to `address` may end up at: the IPv4 ones it carries first."""
    if isinstance(address, IPv6Address):
        embedded, only = _embedded_ipv4(address)
        yield from embedded
        if only:
            return
    yield address


def refusal(address: IPAddress, policy: UrlPolicy) -> str | None:
    """Why `policy` refuses `address` ("X is a loopback address"), or None when it allows it."""
    for view in _views(address):
        kind = _kind(view)
        if kind is None or (kind == "loopback" and policy.allow_loopback):
            continue
        if kind in ("private", SHARED) and policy.allow_private:
            continue
        where = f"{view} (in {address})" if view != address else str(address)
        article = "an" if kind[0] in "aeiou" else "a"
        return f"{where} is {article} {kind} address"
    return None


def _address(sockaddr: tuple[Any, ...]) -> IPAddress:
    return ip_address(sockaddr[0])


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo's TCP answers for `host`; OSError (or UnicodeError) when it does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} resolves to no address")
    return infos


def _first_refusal(infos: list[tuple[Any, ...]], policy: UrlPolicy) -> str | None:
    """Why `policy` refuses one of these answers: one bad answer is enough to refuse the name."""
    for info in infos:
        reason = refusal(_address(info[4]), policy)
        if reason is not None:
            return reason
    return None


def check_url(url: str, policy: UrlPolicy) -> None:
    """Refuse URLs that would reach this host or a non-public network, unless the policy allows
    it. Resolves the name (blocking): every address it resolves to is checked, so a public name
    that resolves to a private address is refused too."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise OutboundError(f"refused {url!r}: only http and https URLs are allowed")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number, or out of range
        raise OutboundError(f"refused {url!r}: {exc}") from None
    if not host:
        raise OutboundError(f"refused {url!r}: no host")
    try:
        infos = _resolve(host, port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError) as exc:
        raise OutboundError(f"refused {url!r}: cannot resolve {host}: {exc}") from None
    reason = _first_refusal(infos, policy)
    if reason is not None:
        raise OutboundError(f"refused {url!r}: {reason}")


class _GuardedBackend(httpcore.SyncBackend):
    """httpcore's socket backend, resolving the name itself, checking every address and
    connecting to a checked one. TLS (SNI, certificate) and the Host header still use the name."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            infos = _resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        reason = _first_refusal(infos, self.policy)
        if reason is not None:
            raise OutboundError(f"refused a connection to {host}: {reason}")
        failure: Exception | None = None
        for info in infos:
            try:
                return super().connect_tcp(str(_address(info[4])), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure


def guarded_client(policy: UrlPolicy, *, timeout: float) -> httpx.Client:
    """An httpx client that connects only to addresses `policy` allows (OutboundError otherwise)
    and never follows redirects."""
    ssl_context = httpx.create_ssl_context()
    transport = httpx.HTTPTransport(verify=ssl_context, trust_env=False)
    # httpx has no setting for its pool's network backend, so the pool is built here, with
    # httpx's default limits.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ssl_context,
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=_GuardedBackend(policy),
    )
    return httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False)


AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]


def guarded_socket_factory(policy: UrlPolicy) -> Callable[[AddrInfo], socket.socket]:
    """For aiohttp's `TCPConnector(socket_factory=...)`: the socket for each address the
    connector is about to connect to, refused (OSError, which aiohttp reports as a
    `ClientConnectorError`) when `policy` does not allow that address. The connector calls it
    for names and IP literals alike."""

    def factory(addr_info: AddrInfo) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        reason = refusal(_address(sockaddr), policy)
        if reason is not None:
            # With an errno, aiohttp shows the message (its strerror) in the error it raises.
            raise OSError(errno.EACCES, f"refused: {reason}")
        return socket.socket(family, kind, proto)

    return factory
