"""SSRF guard for every URL the farm reaches on a user's behalf (webhooks, file inputs).

A URL is vetted by resolving its host ONCE (a numeric host, numeric tricks such as ``2130706433``,
``0x7f000001`` or ``127.1`` included, is read by the OS's ``getaddrinfo`` the way a connection would,
without a query; a name is looked up by c-ares, see below) and refusing it when ANY address is
loopback, private, link-local,
multicast, reserved, unspecified, shared (CGNAT ``100.64/10``) or otherwise not global,
including IPv6 forms that embed such an IPv4 address (mapped, compatible, 6to4, Teredo,
NAT64). The request then connects to the vetted address itself, sending the original
``Host`` header and TLS server name, so a name that changes its answer between the check
and the connection (DNS rebinding) cannot reach anything else. Redirects are followed by
hand, each target vetted again. Only the listed schemes pass; ``file://`` never does.

``settings.webhook_allowlist`` names hosts or CIDRs (optionally with ``:port``) that may be
reached although internal: for tests and private deployments.

Name lookups never block a shared thread past their request's deadline: a name server that never
answers would hold ``getaddrinfo`` (which cannot be cancelled) for as long as the system resolver
retries. c-ares (pycares) runs the lookups of this process on its own event thread, reading
``/etc/hosts`` and ``/etc/resolv.conf`` (search domains, ndots) or ``settings.dns_servers``; the
caller waits at most until the deadline it gives (a webhook attempt's, a download's; else
``dns_timeout_seconds``) and then fails with :class:`UnresolvableURLError`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pycares

from farm.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
USER_AGENT = "lcm-farm"

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # CGNAT: not private, not global either
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_V4_COMPAT = ipaddress.ip_network("::/96")


class UnsafeURLError(ValueError):
    """Raised when a URL may not be reached: its scheme, an internal address, or its redirects."""


class UnresolvableURLError(ValueError):
    """Raised when a URL's host name does not resolve (possibly a temporary failure)."""


# -- addresses ----------------------------------------------------------------------------------


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and may be routed to."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _V4_COMPAT and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is internal (``"a loopback address"`` …), or None for a global unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded_v4(ip):
            reason = address_problem(inner)
            if reason:
                return f"an IPv6 address embedding {inner}, {reason}"
    checks = (
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip in _SHARED, "a shared (CGNAT) address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (not ip.is_global, "not a global address"),
    )
    return next((reason for bad, reason in checks if bad), None)


# -- the allow-list -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AllowEntry:
    host: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    def matches(self, host: str, ip: IPAddress, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip.version == self.network.version and ip in self.network
        return self.host == host.lower().rstrip(".")


def _as_network(text: str) -> IPNetwork | None:
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        return None


def parse_allow_entry(entry: str) -> AllowEntry:
    """``host``, ``host:port``, ``10.0.0.0/8``, ``127.0.0.1:8080``, ``[::1]:8080`` or ``::1``."""
    text = entry.strip().lower()
    network = _as_network(text)
    if network is not None:
        return AllowEntry(network=network)
    head, sep, tail = text.rpartition(":")
    port = int(tail) if sep and tail.isdigit() and (head.endswith("]") or ":" not in head) else None
    if port is not None:
        text = head
    network = _as_network(text)
    if network is not None:
        return AllowEntry(network=network, port=port)
    if not text or "/" in text or "[" in text:
        raise ValueError(f"allow-list entry {entry!r} is neither a host name nor a CIDR")
    return AllowEntry(host=text.rstrip("."), port=port)


def allow_entries(settings: Settings) -> list[AllowEntry]:
    return [parse_allow_entry(e) for e in settings.webhook_allowlist if e.strip()]


# -- vetting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A vetted URL and the address a connection to it must use."""

    url: httpx.URL
    ip: str
    port: int
    allowlisted: bool  # the host or address is on the allow-list

    @property
    def host(self) -> str:
        return self.url.raw_host.decode("ascii")


def parse_url(url: str | httpx.URL, schemes: Iterable[str]) -> httpx.URL:
    allowed = tuple(schemes)
    try:
        parsed = url if isinstance(url, httpx.URL) else httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UnsafeURLError(f"not a valid URL: {exc}") from None
    if parsed.scheme not in allowed:
        raise UnsafeURLError(f"scheme {parsed.scheme or '(none)'!r} is not allowed (only {', '.join(allowed)})")
    if not parsed.raw_host:
        raise UnsafeURLError("the URL has no host")
    return parsed


def _addresses(host: str, found: Iterable[tuple[int, str]]) -> list[IPAddress]:
    addresses: list[IPAddress] = []
    for family, text in found:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise UnsafeURLError(f"host {host!r} resolves to a non-IP address")
        ip = ipaddress.ip_address(text.split("%", 1)[0])  # a scope only comes with link-local
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise UnresolvableURLError(f"host {host!r} has no address")
    return addresses


def _numeric(host: str, port: int) -> list[IPAddress] | None:
    """The addresses of a numeric host, read by the OS as a connection would (no query); None for a name."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    return _addresses(host, ((family, str(sockaddr[0])) for family, *_, sockaddr in infos))


_channels: dict[tuple[int, tuple[str, ...]], pycares.Channel] = {}
_channels_lock = threading.Lock()


def _channel(servers: tuple[str, ...]) -> pycares.Channel:
    """This process's c-ares channel for ``servers`` (empty: the system's); one per process, because a
    forked child has none of its parent's event thread."""
    key = (os.getpid(), servers)
    with _channels_lock:
        channel = _channels.get(key)
        if channel is None:
            channel = _channels[key] = pycares.Channel(servers=list(servers) or None)
        return channel


def _lookup(host: str, port: int, settings: Settings, deadline: float) -> list[IPAddress]:
    """``host``'s addresses from c-ares, waited for at most until ``deadline`` (``time.monotonic()``)."""
    allowed = max(0.0, deadline - time.monotonic())
    done = threading.Event()
    answer: list[Any] = []

    def got(result: Any, error: int | None) -> None:  # on c-ares's event thread
        answer.extend((result, error))
        done.set()

    try:
        _channel(tuple(settings.dns_servers)).getaddrinfo(host, port, type=socket.SOCK_STREAM, callback=got)
    except (pycares.AresError, UnicodeError, ValueError) as exc:
        raise UnresolvableURLError(f"host {host!r} does not resolve: {exc}") from None
    if not done.wait(allowed):  # the query is left to c-ares, which drops it at its own timeout
        raise UnresolvableURLError(f"host {host!r} did not resolve before the deadline: its name servers did "
                                   "not answer")
    result, error = answer
    if error:
        reason = str(pycares.errno.strerror(error))  # typed bytes, a str at run time
        raise UnresolvableURLError(f"host {host!r} does not resolve: {reason}")
    found = _addresses(host, ((node.family, node.addr[0].decode("ascii")) for node in result.nodes))
    return sorted(found, key=lambda ip: ip.version)  # IPv4 first, as the OS resolver orders ``localhost``: the
    # connection uses the first address only, and a receiver on a dual-stack name may listen on IPv4 alone


def vet(
    url: str | httpx.URL, settings: Settings, *, schemes: Iterable[str] = ("https", "http"), resolve: bool = True,
    deadline: float | None = None,
) -> Target | None:
    """Check ``url`` and return where to connect; raise UnsafeURLError / UnresolvableURLError.

    A name is looked up until ``deadline`` (``time.monotonic()``; None: ``dns_timeout_seconds`` from
    now). With ``resolve=False`` no DNS query is made: only a numeric host is checked, and None
    comes back for a name (the caller vets it again, resolving, when it connects).
    """
    parsed = parse_url(url, schemes)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or DEFAULT_PORTS.get(parsed.scheme, 0)
    addresses = _numeric(host, port)
    if addresses is None:
        if not resolve:
            return None
        limit = time.monotonic() + settings.dns_timeout_seconds
        addresses = _lookup(host, port, settings, limit if deadline is None else min(deadline, limit))
    entries = allow_entries(settings)
    listed = [any(e.matches(host, ip, port) for e in entries) for ip in addresses]
    for ip, ok in zip(addresses, listed, strict=True):
        problem = address_problem(ip)
        if problem and not ok:
            shown = host if host == str(ip) else f"{host} ({ip})"
            raise UnsafeURLError(f"{shown} is {problem}; refused (not on the allow-list)")
    return Target(url=parsed, ip=str(addresses[0]), port=port, allowlisted=listed[0])


def check_url(
    url: str, settings: Settings, *, schemes: Iterable[str] = ("https", "http"), resolve: bool = True,
    deadline: float | None = None,
) -> None:
    """Raise a ValueError (UnsafeURLError or UnresolvableURLError) naming why ``url`` may not be reached."""
    vet(url, settings, schemes=schemes, resolve=resolve, deadline=deadline)


# -- pinned requests ----------------------------------------------------------------------------


def _client(timeout: float, deadline: float | None = None) -> httpx.Client:
    # An explicit transport: no proxies from the environment (they would defeat the pinning);
    # trust_env on the transport still honours SSL_CERT_FILE / SSL_CERT_DIR. With a deadline,
    # every network operation gets at most the time left (farm.deadline): a total bound.
    from farm.deadline import DeadlineTransport

    transport: httpx.HTTPTransport = (httpx.HTTPTransport(trust_env=True, retries=0) if deadline is None
                                      else DeadlineTransport(deadline))
    return httpx.Client(transport=transport, trust_env=False, timeout=timeout, follow_redirects=False)


def _send(
    client: httpx.Client, method: str, target: Target, headers: Mapping[str, str], content: bytes | None
) -> httpx.Response:
    pinned = target.url.copy_with(host=target.ip)
    request = client.build_request(
        method,
        pinned,
        headers={"User-Agent": USER_AGENT, **headers, "Host": target.url.netloc.decode("ascii")},
        content=content,
        extensions={"sni_hostname": target.host},
    )
    return client.send(request, stream=True, follow_redirects=False)


@contextmanager
def open_url(
    method: str,
    url: str,
    settings: Settings,
    *,
    schemes: Iterable[str] = ("https", "http"),
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    timeout: float = 10.0,
    max_redirects: int = MAX_REDIRECTS,
    tls_unless_allowlisted: bool = False,
    deadline: float | None = None,
) -> Iterator[httpx.Response]:
    """Send a request to the vetted, pinned address of ``url``; yield the (streamed) final response.

    Redirects (up to ``max_redirects``) are followed here, each target vetted anew: 307/308
    keep the method and body, the others turn into a GET without a body. With
    ``tls_unless_allowlisted``, a plain ``http://`` hop must be on the allow-list. ``deadline``
    (``time.monotonic()``) bounds the whole exchange, name lookups, redirects and body included: past it
    the next network operation fails with ``httpx.TimeoutException`` (``farm.deadline``), a lookup
    with ``UnresolvableURLError``.
    Transport failures raise ``httpx.HTTPError``.
    """
    allowed = tuple(schemes)
    current: str | httpx.URL = url
    body = content
    with _client(timeout, deadline) as client:
        for _ in range(max_redirects + 1):
            target = vet(current, settings, schemes=allowed, deadline=deadline)
            assert target is not None
            if tls_unless_allowlisted and target.url.scheme != "https" and not target.allowlisted:
                raise UnsafeURLError(f"plain http to {target.host} is refused (use https, or allow-list the host)")
            response = _send(client, method, target, headers or {}, body)
            location = response.headers.get("location")
            if response.status_code in REDIRECT_CODES and location:
                response.close()
                try:
                    current = target.url.join(location)
                except httpx.InvalidURL as exc:
                    raise UnsafeURLError(f"redirect to an invalid URL {location!r}: {exc}") from None
                if response.status_code not in (307, 308):
                    method, body = "GET", None
                continue
            try:
                yield response
            finally:
                response.close()
            return
    raise UnsafeURLError(f"more than {max_redirects} redirects")


def post(url: str, settings: Settings, *, content: bytes, headers: Mapping[str, str], timeout: float,
         deadline: float | None = None) -> int:
    """POST ``content`` to ``url`` through the guard; the final HTTP status code (the status line
    and headers are read; the body is not waited for)."""
    with open_url("POST", url, settings, headers=headers, content=content, timeout=timeout,
                  deadline=deadline) as response:
        return response.status_code


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed request."""
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def redact(url: str) -> str:
    """``url`` for logs and messages: without its query string, fragment or credentials (they may hold tokens)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return url.split("?", 1)[0][:200]
    if not parsed.scheme or not parsed.host:
        return url.split("?", 1)[0][:200]
    return str(parsed.copy_with(query=None, fragment=None, username=None, password=None))[:200]
