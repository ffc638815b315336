"""Where webhooks may go: the SSRF guard.

A webhook URL is chosen by a client, and the worker that POSTs to it sits inside the
operator's network. So: ``https`` only (unless ``BATCHD_WEBHOOK_ALLOW_HTTP``), no credentials
in the URL, and no address that is not globally routable (private, loopback, link-local,
shared, multicast, reserved, unspecified; IPv4-mapped IPv6 is judged by its IPv4 address)
unless it lies in ``BATCHD_WEBHOOK_ALLOW_NETWORKS``.

The check runs twice. At create, on the URL: a literal address is judged at once (a hostname
cannot be, DNS may answer differently later). At delivery, on the addresses the name resolves
to: ``CheckedResolver`` is the resolver of the delivery client, so the connection goes to an
address that was checked, and a name that re-resolves to 127.0.0.1 (DNS rebinding) is refused.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_URL_LENGTH = 2048


class WebhookURLError(ValueError):
    """A webhook URL this server will not call; the message says why."""


class AddressRefused(OSError):
    """Every address a webhook host resolved to is outside the policy. An ``OSError`` with a
    ``strerror``, so aiohttp's connection error carries the reason."""

    def __init__(self, message: str):
        super().__init__(errno.EACCES, message)


def literal_ip(host: str) -> IPAddress | None:
    """The address ``host`` spells, also in the legacy IPv4 forms that ``inet_aton`` (and so
    the system resolver) accepts: ``2130706433``, ``0x7f.1``, ``127.1``."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class AddressPolicy:
    allow_http: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def build(cls, allow_http: bool, networks: Iterable[str]) -> AddressPolicy:
        return cls(allow_http, tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def address_allowed(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip.version == net.version and ip in net for net in self.allowed_networks):
            return True
        return is_public(ip)

    def check_url(self, url: str) -> str:
        """The URL if this server may call it; ``WebhookURLError`` otherwise. A hostname
        passes here and is judged again, by the addresses it resolves to, at every delivery."""
        if len(url) > MAX_URL_LENGTH:
            raise WebhookURLError(f"The webhook URL may be at most {MAX_URL_LENGTH} characters.")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise WebhookURLError(f"The webhook URL is not a valid URL: {exc}.") from exc
        scheme = parts.scheme.lower()
        if scheme not in ("https", "http"):
            raise WebhookURLError("The webhook URL must be an https:// URL.")
        if scheme == "http" and not self.allow_http:
            raise WebhookURLError(
                "The webhook URL must use https; this server does not allow plain http webhooks."
            )
        if parts.username is not None or parts.password is not None:
            raise WebhookURLError("The webhook URL must not contain credentials.")
        host = parts.hostname
        if not host:
            raise WebhookURLError("The webhook URL has no host.")
        if port == 0:
            raise WebhookURLError("The webhook URL has an invalid port.")
        ip = literal_ip(host)
        if ip is not None and not self.address_allowed(ip):
            raise WebhookURLError(
                f"The webhook URL points at {ip}, a private, loopback or reserved address; "
                "this server does not send webhooks there."
            )
        return url


class CheckedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then keeps only the addresses the policy
    allows; raises ``AddressRefused`` when none is left. The connector connects to what this
    returns, so the address checked is the address used."""

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None):
        self.policy = policy
        self.inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        kept = [r for r in results if self.policy.address_allowed(ipaddress.ip_address(r["host"]))]
        if not kept:
            found = ", ".join(sorted({r["host"] for r in results})) or "nothing"
            raise AddressRefused(
                f"webhook host {host} resolves to {found}: not an address this server sends webhooks to"
            )
        return kept

    async def close(self) -> None:
        await self.inner.close()
