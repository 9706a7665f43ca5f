"""Who may open a connection to an edge: browser origins and client addresses. Pure: no
I/O; the edge's runtime part is edge/admission.py.

Origins. A browser sends the page's origin (``Origin: https://app.example.com``) with every
WebSocket handshake, and lets any page open a WebSocket to any host: without a check, a page
on another site can read the market data (or, with cookies-based auth in front, a user's
account channels) through its visitors' browsers (cross-site WebSocket hijacking). An
allow-list of patterns decides:

- ``https://app.example.com``: that scheme, host and port (no port: the scheme's default,
  80 or 443, as browsers omit it);
- ``https://*.example.com``: any host *below* example.com (``a.example.com``,
  ``a.b.example.com``; not ``example.com`` itself, not ``badexample.com``);
- ``http://localhost:*``: any port; ``http://*:8000``: any host on that port;
- ``null``: the opaque origin (sandboxed frames, ``file:`` pages);
- ``*``: any origin at all (the same as no list).

Hosts compare case-insensitively; a malformed Origin header matches nothing.

Client addresses. Behind a load balancer every connection comes from the balancer; the
client is in ``X-Forwarded-For``, which anyone can also send. So it is believed only from
peers in a configured list of trusted proxy networks, read from the right (each proxy
appends the address it got the connection from): the first address that is not itself a
trusted proxy is the client. From any other peer the header is ignored.

Per-address limits count an IPv6 client by its /64 (one subscriber's network: its holder can
use any of 2^64 addresses) and an IPv4-mapped IPv6 address as the IPv4 address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}
IPV6_LIMIT_PREFIX = 64  # per-address limits count an IPv6 client by this prefix

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}$")
_ORIGIN = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[^/:\[\]]+)"
                     r"(?::(?P<port>[0-9]{1,5}|\*))?$")


# --- origins -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OriginPattern:
    """One allowed origin pattern. `host` is lower case: a name, an IP literal (IPv6 in
    brackets), ``*`` (any host) or ``*.<suffix>``; `port` None means any port."""

    scheme: str
    host: str
    port: int | None

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or (self.port is not None and port != self.port):
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def _split_origin(text: str, pattern: bool) -> tuple[str, str, str | None]:
    m = _ORIGIN.match(text.strip().lower())
    if m is None:
        raise ValueError("expected <scheme>://<host>[:<port>], without a path")
    port = m.group("port")
    if port == "*" and not pattern:
        raise ValueError("a port must be a number")
    return m.group("scheme"), m.group("host"), port


def parse_origin_pattern(text: str) -> OriginPattern | None:
    """A pattern from the allow-list; None for ``*`` and ``null`` (handled by the policy).
    ValueError says what is wrong."""
    text = text.strip()
    if text in ("*", "null"):
        return None
    scheme, host, port = _split_origin(text, pattern=True)
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{text!r}: the scheme must be http or https")
    name = host[2:] if host.startswith("*.") else host
    if host != "*" and not _valid_host(name):
        raise ValueError(f"{text!r}: bad host (a name, an IP address, * or *.<domain>)")
    if port is None:
        number: int | None = DEFAULT_PORTS[scheme]
    elif port == "*":
        number = None
    else:
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError(f"{text!r}: bad port")
    return OriginPattern(scheme, host, number)


def _valid_host(host: str) -> bool:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return bool(_HOST.match(host)) and len(host) <= 253


def check_origin_patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    """The allow-list as given, each pattern checked (ValueError names the bad one), in a
    canonical spelling (lower case, stripped)."""
    out = []
    for text in patterns:
        parse_origin_pattern(text)
        out.append(text.strip().lower())
    return tuple(out)


class OriginPolicy:
    """Whether a handshake's Origin header is allowed."""

    __slots__ = ("_any", "_null", "_patterns", "allow_missing")

    def __init__(self, patterns: Sequence[str], allow_missing: bool = True) -> None:
        parsed = [(p, parse_origin_pattern(p)) for p in patterns]
        self._any = not patterns or any(p.strip() == "*" for p, _ in parsed)
        self._null = any(p.strip() == "null" for p, _ in parsed)
        self._patterns = tuple(o for _, o in parsed if o is not None)
        self.allow_missing = allow_missing

    @property
    def allows_any(self) -> bool:
        """True when every origin is allowed (no list, or ``*`` in it)."""
        return self._any

    def allows(self, origin: str | None) -> bool:
        """`origin`: the header's value, None when the request has none (not a browser)."""
        if origin is None:
            return self.allow_missing
        if self._any:
            return True
        origin = origin.strip().lower()
        if origin == "null":
            return self._null
        try:
            scheme, host, port = _split_origin(origin, pattern=False)
        except ValueError:
            return False
        number = int(port) if port is not None else DEFAULT_PORTS.get(scheme, 0)
        host = host.rstrip(".")
        return any(p.matches(scheme, host, number) for p in self._patterns)


# --- client addresses ----------------------------------------------------------------------


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (``10.0.0.0/8``, ``2001:db8::/32``) or single addresses (``10.0.0.5``, a /32).
    ValueError names a bad one (host bits set included: ``10.0.0.1/8`` is a typo more often
    than not)."""
    out = []
    for text in items:
        try:
            out.append(ipaddress.ip_network(text.strip()))
        except ValueError as exc:
            raise ValueError(f"bad network {text.strip()!r}: {exc}") from None
    return tuple(out)


def parse_ip(text: str) -> IPAddress | None:
    """An address as a proxy or a socket gives it: bare, ``[v6]``, ``[v6]:port`` or
    ``v4:port``; IPv4-mapped IPv6 as IPv4. None if it is not an address."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ClientAddresses:
    """The client's address of a connection, through the trusted proxies."""

    __slots__ = ("trusted",)

    def __init__(self, trusted: Sequence[IPNetwork] = ()) -> None:
        self.trusted = tuple(trusted)

    def is_trusted(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.trusted)

    def resolve(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> str:
        """The client's address: `peer` (the socket's), or from the `X-Forwarded-For`
        values (every header line, in order) when the peer is a trusted proxy. Not an
        address (a Unix socket's peer): the peer as given, or ``unknown``."""
        if peer is None:
            return "unknown"
        ip = parse_ip(peer)
        if ip is None:
            return peer
        if not self.trusted or not self.is_trusted(ip) or not forwarded_for:
            return str(ip)
        hops = [hop for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            forwarded = parse_ip(hop)
            if forwarded is None:
                break  # garbage: believe the trusted proxy that handed it over, not it
            ip = forwarded
            if not self.is_trusted(ip):
                break
        return str(ip)


def limit_key(address: str) -> str:
    """What a per-address limit counts: the address, an IPv6 one by its /64."""
    ip = parse_ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_LIMIT_PREFIX), strict=False))
    return address if ip is None else str(ip)
