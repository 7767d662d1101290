"""Private-network policy: catalog URLs reach only the public internet, unless told otherwise.

A catalog is written by sellers and partners. A crawler that runs inside a company network and
fetches whatever URL a row names can be turned against that network: the cloud's metadata
service (169.254.169.254), an admin page on 10.0.0.1, a database on localhost. So by default
every connection the downloader opens, the first request's and each redirect hop's, goes only
to addresses that are globally routable; anything else ends the URL as `blocked_address`
without a byte sent.

The check sits where the connection is made (an httpcore network backend), not on the URL's
text: the host name is resolved once, every address it resolves to is checked, and the
connection goes to a checked address. So a redirect, a numeric host in any spelling
(`http://2130706433/`, `http://[::ffff:127.0.0.1]/`) or a name whose DNS answer changes
between a check and the connection (DNS rebinding) cannot slip past it.

`allow_private=True` lifts the policy (in-house catalogs, tests against a local server);
`allowed_networks` lifts it for named networks only (e.g. an internal image CDN on
10.20.0.0/16) and keeps it for every other address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import httpcore

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class BlockedAddress(Exception):
    """A connection refused by the policy; its message says which address and why."""


def _kind(ip: _Address) -> str | None:
    """Why `ip` is not on the public internet, or None when it is."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def unmapped(ip: _Address) -> _Address:
    """The IPv4 address inside an IPv4-mapped IPv6 one (::ffff:a.b.c.d), else `ip`."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_networks(networks: Iterable[str]) -> tuple[_Network, ...]:
    """CIDR strings ("10.20.0.0/16", "fd00::/8", a bare address) as networks; ValueError names
    the one that is not."""
    parsed = []
    for text in networks:
        try:
            parsed.append(ipaddress.ip_network(text, strict=False))
        except ValueError as err:
            raise ValueError(f"allowed_networks: {text!r} is not a network ({err})") from None
    return tuple(parsed)


def refusal(ip: _Address, allowed: tuple[_Network, ...] = ()) -> str | None:
    """Why a connection to `ip` is refused under the default policy, or None if it may go."""
    ip = unmapped(ip)
    kind = _kind(ip)
    if kind is None or any(ip in net for net in allowed if net.version == ip.version):
        return None
    return f"{kind} address {ip}"


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own network backend, connecting only to addresses the policy allows."""

    def __init__(self, allowed: tuple[_Network, ...] = ()):
        self._inner = httpcore.AnyIOBackend()
        self._allowed = allowed

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._resolve(host, port)
        for ip in addresses:  # a name with one refused address is refused as a whole
            why = refusal(ip, self._allowed)
            if why is not None:
                raise BlockedAddress(f"{host} is a {why}" if str(ip) != host else why)
        last: Exception | None = None
        for ip in addresses:  # the checked address, not a second lookup of the name
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as err:
                last = err
        assert last is not None
        raise last

    async def _resolve(self, host: str, port: int) -> list[_Address]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as err:  # no such name: what httpcore's own lookup would raise
            raise httpcore.ConnectError(f"cannot resolve {host}: {err}") from err
        seen: dict[_Address, None] = {}
        for _family, _type, _proto, _name, sockaddr in infos:
            seen.setdefault(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
        if not seen:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        return list(seen)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
