"""Outbound URLs, for every service: the SSRF guard. A miner (callbacks, downloads) and the
orchestrator (miner endpoints, webhooks, client-given dataset and LoRA URLs) call `check_url`
before every request to a URL that someone else chose."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


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
