"""Which DICOM peers may send: calling AE title AND source address, both from ``CXR_SOURCES``."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from service.core.settings import Source

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalise_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer's IP as an address object; IPv4-mapped IPv6 (dual-stack sockets) as plain IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _networks(host: str) -> list[IPNetwork]:
    """An IP, a CIDR network, or a host name resolved now (every address it has)."""
    try:
        return [ipaddress.ip_network(host, strict=False)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        # Fail closed: a name that does not resolve admits nobody, and says so once at start.
        log.warning("source host does not resolve; it admits no peer host=%s", host)
        return []
    found: list[IPNetwork] = []
    for info in infos:
        ip = normalise_address(str(info[4][0]))
        if ip is not None:
            found.append(ipaddress.ip_network(ip))
    return found


@dataclass(frozen=True)
class _Rule:
    ae_title: str
    networks: tuple[IPNetwork, ...]


class PeerPolicy:
    """Allow-list of (calling AE title, address) pairs; an empty list admits every peer."""

    def __init__(self, sources: Iterable[Source]) -> None:
        self._rules = tuple(_Rule(s.ae_title.strip(), tuple(_networks(s.host))) for s in sources)

    @property
    def open(self) -> bool:
        return not self._rules

    @property
    def ae_titles(self) -> list[str]:
        return sorted({r.ae_title for r in self._rules})

    def allows(self, calling_ae_title: str, address: str) -> bool:
        if self.open:
            return True
        ip = normalise_address(address)
        if ip is None:
            return False
        title = calling_ae_title.strip()
        return any(rule.ae_title == title and any(ip in net for net in rule.networks) for rule in self._rules)
