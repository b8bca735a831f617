"""The real client behind trusted reverse proxies (`web.trusted_proxies`): address and scheme of each request.

Forwarded / X-Forwarded-For / X-Forwarded-Proto count only when the peer is trusted; anyone else could forge them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ATTRIBUTE = "bsscihub_client"
"""Where the resolved client is kept on the request (set once, by the outermost resource)."""

_FOR = re.compile(r'(?i)(?:^|;)\s*for\s*=\s*("[^"]*"|[^;,\s]*)')
_PROTO = re.compile(r'(?i)(?:^|;)\s*proto\s*=\s*("[^"]*"|[^;,\s]*)')


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) -> networks; ValueError naming the bad entry."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"expected IP addresses or CIDRs such as 10.0.0.0/8; {value!r} is not one") from None
    return tuple(out)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address from an XFF or Forwarded node: 1.2.3.4, 1.2.3.4:80, [::1]:80, ::1; None if obfuscated."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


@attrs.frozen
class Client:
    address: str
    https: bool


@attrs.frozen
class ProxyPolicy:
    trusted: tuple[Network, ...] = ()

    def is_trusted(self, address: Any) -> bool:
        return address is not None and any(address in network for network in self.trusted)

    def _hops(self, request: Any) -> tuple[list[str], list[str]]:
        """(client-side addresses, protocols) the proxies reported, nearest last."""
        forwarded = request.requestHeaders.getRawHeaders(b"forwarded") or []
        if forwarded:
            nodes, protos = [], []
            for element in b",".join(forwarded).decode("latin-1").split(","):
                found = _FOR.search(element)
                proto = _PROTO.search(element)
                nodes.append(found.group(1) if found else "")
                protos.append(proto.group(1).strip('"').lower() if proto else "")
            return nodes, protos
        xff = b",".join(request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []).decode("latin-1")
        xfp = b",".join(request.requestHeaders.getRawHeaders(b"x-forwarded-proto") or []).decode("latin-1")
        nodes = [part.strip() for part in xff.split(",") if part.strip()]
        protos = [part.strip().lower() for part in xfp.split(",") if part.strip()]
        return nodes, protos

    def resolve(self, request: Any) -> Client:
        try:
            peer = str(request.getClientAddress().host)
        except AttributeError:
            peer = "unknown"
        is_secure = getattr(request, "isSecure", None)
        https = bool(is_secure()) if is_secure is not None else False
        if not self.trusted or not self.is_trusted(_address(peer)):
            return Client(peer, https)
        nodes, protos = self._hops(request)
        # Walk from the nearest proxy back: the first hop we do not trust is the client.
        client = peer
        for node in reversed(nodes):
            address = _address(node)
            if address is None:
                break
            client = str(address)
            if not self.is_trusted(address):
                break
        # The nearest proxy's word on the scheme: it terminated (or was told about) the client's TLS.
        if protos and protos[-1]:
            https = protos[-1] == "https"
        return Client(client, https)


def limit_key(address: str) -> str:
    """What rate limits count by: the address, or for IPv6 its /64 (one client gets a whole /64 to pick from)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return address


def client_of(request: Any, policy: ProxyPolicy | None = None) -> Client:
    """The request's client, resolved once and kept on the request."""
    found = getattr(request, ATTRIBUTE, None)
    if found is None:
        found = (policy or ProxyPolicy()).resolve(request)
        try:
            setattr(request, ATTRIBUTE, found)
        except AttributeError:
            pass
    return found  # type: ignore[no-any-return]


def networks_text(networks: Sequence[Network]) -> list[str]:
    return [str(n) for n in networks]
