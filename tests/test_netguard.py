"""The SSRF guard against real servers on loopback: internal addresses in every spelling,
redirects, schemes, the allow-list, TLS with the original server name, and DNS rebinding."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from farm import netguard
from farm.config import Settings
from tests.receivers import Receiver


def settings_with(tmp_path: Path, *allow: str) -> Settings:
    return Settings(data_dir=tmp_path, webhook_allowlist=list(allow))


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


def refused(url: str, settings: Settings, match: str) -> None:
    with pytest.raises(netguard.UnsafeURLError, match=match):
        netguard.check_url(url, settings)
    with pytest.raises(netguard.UnsafeURLError, match=match):
        netguard.post(url, settings, content=b"{}", headers={}, timeout=5)


INTERNAL = [
    ("http://127.0.0.1:{port}/hook", "loopback"),
    ("http://[::1]:{port}/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/hook", "embedding 127.0.0.1, a loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://2130706433:{port}/hook", r"2130706433 \(127.0.0.1\) is a loopback"),
    ("http://0x7f000001:{port}/hook", r"\(127.0.0.1\) is a loopback"),
    ("http://127.1:{port}/hook", r"127.1 \(127.0.0.1\) is a loopback"),
    ("http://0177.0.0.1:{port}/hook", "not a valid URL"),
    ("http://localhost:{port}/hook", r"localhost \(.*\) is a loopback"),
    ("http://0.0.0.0:{port}/", "unspecified"),
    ("http://10.0.0.5/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "shared"),
    ("http://224.0.0.251/", "multicast"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[::]/", "unspecified"),
    ("http://[::127.0.0.1]/", "embedding 127.0.0.1"),
    ("http://[2002:7f00:1::]/", "embedding 127.0.0.1"),  # 6to4
    ("http://[64:ff9b::a9fe:a9fe]/", "embedding 169.254.169.254"),  # NAT64
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "refused"),  # Teredo
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("gopher://127.0.0.1:70/", "scheme 'gopher' is not allowed"),
    ("ftp://example.com/", "scheme 'ftp' is not allowed"),
]


@pytest.mark.parametrize(("template", "match"), INTERNAL, ids=[t for t, _ in INTERNAL])
def test_internal_targets_are_refused_before_any_connection(tmp_path, receiver, template, match):
    """The live receiver on 127.0.0.1 never sees a request, whatever the spelling."""
    refused(template.format(port=receiver.port), settings_with(tmp_path), match)
    assert receiver.requests == []


def test_allow_listed_address_is_reached_with_the_original_host_header(tmp_path, receiver):
    settings = settings_with(tmp_path, f"127.0.0.1:{receiver.port}")
    assert netguard.post(receiver.url("/hook?x=1"), settings, content=b'{"a":1}',
                         headers={"Content-Type": "application/json"}, timeout=5) == 200
    [req] = receiver.requests
    assert (req.method, req.path, req.body) == ("POST", "/hook?x=1", b'{"a":1}')
    assert req.headers["Host"] == f"127.0.0.1:{receiver.port}"
    # the allow-list entry names one port: the same address on another port stays refused
    with Receiver() as other:
        refused(other.url(), settings, "loopback")
        assert other.requests == []


def test_allow_list_by_name_and_cidr(tmp_path, receiver):
    by_name = settings_with(tmp_path, "localhost")
    assert netguard.post(receiver.url(host="localhost"), by_name, content=b"", headers={}, timeout=5) == 200
    assert receiver.requests[-1].headers["Host"] == f"localhost:{receiver.port}"
    refused(receiver.url(), by_name, "loopback")  # the name is listed, not the address
    by_cidr = settings_with(tmp_path, "127.0.0.0/8")
    assert netguard.post(receiver.url(), by_cidr, content=b"", headers={}, timeout=5) == 200


def test_allow_list_entries_parse():
    entry = netguard.parse_allow_entry
    assert entry("[::1]:8080") == netguard.AllowEntry(network=ipaddress.ip_network("::1/128"), port=8080)
    assert entry("127.0.0.1:80") == netguard.AllowEntry(network=ipaddress.ip_network("127.0.0.1/32"), port=80)
    assert entry("10.0.0.0/8") == netguard.AllowEntry(network=ipaddress.ip_network("10.0.0.0/8"))
    assert entry("::1") == netguard.AllowEntry(network=ipaddress.ip_network("::1/128"))
    assert entry("Hooks.Internal.:9000") == netguard.AllowEntry(host="hooks.internal", port=9000)
    with pytest.raises(ValueError, match="neither"):
        entry("a/b")


def test_public_addresses_pass_and_names_need_no_dns_without_resolve(tmp_path):
    settings = settings_with(tmp_path)
    for ip in ("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "2a00:1450:4001:80b::200e"):
        assert netguard.address_problem(ipaddress.ip_address(ip)) is None
    target = netguard.vet("https://8.8.8.8/x", settings)
    assert target is not None and (target.ip, target.port, target.allowlisted) == ("8.8.8.8", 443, False)
    assert netguard.vet("https://hooks.example.invalid/x", settings, resolve=False) is None
    with pytest.raises(netguard.UnresolvableURLError, match="does not resolve"):
        netguard.check_url("https://hooks.example.invalid/x", settings)


def test_redirect_to_loopback_is_refused(tmp_path):
    """An allow-listed server answers 302 to a loopback port that is not listed: refused, not followed."""
    with Receiver() as internal, Receiver() as front:
        front.default = (302, {"Location": internal.url("/admin")}, b"")
        settings = settings_with(tmp_path, f"127.0.0.1:{front.port}")
        with pytest.raises(netguard.UnsafeURLError, match="loopback"):
            netguard.post(front.url("/hook"), settings, content=b"{}", headers={}, timeout=5)
        assert len(front.requests) == 1 and internal.requests == []
        # and to other schemes
        front.default = (307, {"Location": "file:///etc/passwd"}, b"")
        with pytest.raises(netguard.UnsafeURLError, match="scheme 'file'"):
            netguard.post(front.url("/hook"), settings, content=b"{}", headers={}, timeout=5)


def test_redirects_are_followed_by_hand_and_bounded(tmp_path):
    with Receiver() as target, Receiver() as front:
        settings = settings_with(tmp_path, "127.0.0.1")
        front.script = [(307, {"Location": target.url("/kept")}, b""), (302, {"Location": "/relative"}, b"")]
        assert netguard.post(front.url("/a"), settings, content=b"body", headers={}, timeout=5) == 200
        assert (target.requests[0].method, target.requests[0].body) == ("POST", b"body")  # 307 keeps POST
        assert netguard.post(front.url("/b"), settings, content=b"body", headers={}, timeout=5) == 200
        assert (front.requests[-1].method, front.requests[-1].path) == ("GET", "/relative")  # 302 → GET
        front.default = (302, {"Location": "/loop"}, b"")
        with pytest.raises(netguard.UnsafeURLError, match="more than 5 redirects"):
            netguard.post(front.url("/loop"), settings, content=b"", headers={}, timeout=5)


def test_tls_uses_the_original_name_for_sni_and_certificate(tmp_path, monkeypatch):
    """Connected to the pinned address, TLS still names (and verifies) the URL's host."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    with Receiver(tls=server_ctx) as r:
        settings = settings_with(tmp_path, f"localhost:{r.port}", f"127.0.0.1:{r.port}")
        assert netguard.post(r.url(host="localhost"), settings, content=b"x", headers={}, timeout=5) == 200
        assert r.requests[0].server_name == "localhost"
        assert r.requests[0].headers["Host"] == f"localhost:{r.port}"
        # the certificate names localhost only: by address, verification fails
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|IP address mismatch"):
            netguard.post(r.url(host="127.0.0.1"), settings, content=b"x", headers={}, timeout=5)


def _bind_pair() -> tuple[Receiver, Receiver]:
    """Receivers on 127.0.0.1 and 127.0.0.2 with the same port."""
    for _ in range(20):
        internal = Receiver(host="127.0.0.1")
        try:
            public = Receiver(host="127.0.0.2", port=internal.port)
        except OSError:
            internal.server.server_close()
            continue
        return internal, public
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


def test_dns_rebinding_cannot_reach_an_internal_address(tmp_path, monkeypatch):
    """FAKE RESOLVER (the one fake here): a DNS server that changes its answer between the
    check and the connection cannot be run on this machine, so ``socket.getaddrinfo`` is
    patched for the name ``rebind.test`` only: its first answer is 127.0.0.2 (standing in
    for a public address, allow-listed), every later answer 127.0.0.1 (an internal service).
    The servers, the connections and the HTTP exchange are real.
    """
    real = socket.getaddrinfo
    answers = iter(["127.0.0.2"])

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            return real(next(answers, "127.0.0.1"), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    internal, public = _bind_pair()
    with internal, public:
        url = f"http://rebind.test:{internal.port}/hook"
        settings = settings_with(tmp_path, "127.0.0.2")
        assert netguard.post(url, settings, content=b"{}", headers={}, timeout=5) == 200
        assert len(public.requests) == 1 and internal.requests == []
        assert public.requests[0].headers["Host"] == f"rebind.test:{internal.port}"
        # control: a client that resolves again at connect time is rebound to the internal service
        assert httpx.post(url, content=b"{}", timeout=5).status_code == 200
        assert len(internal.requests) == 1
        # and the guard, asked again, now sees the internal answer and refuses
        with pytest.raises(netguard.UnsafeURLError, match="loopback"):
            netguard.post(url, settings, content=b"{}", headers={}, timeout=5)
        assert len(internal.requests) == 1



def test_allow_listed_ipv6_literal_is_reached(tmp_path):
    try:
        r = Receiver(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with r:
        settings = settings_with(tmp_path, f"[::1]:{r.port}")
        assert netguard.post(r.url("/six"), settings, content=b"6", headers={}, timeout=5) == 200
        assert r.requests[0].headers["Host"] == f"[::1]:{r.port}" and r.requests[0].body == b"6"
        refused(r.url("/six"), settings_with(tmp_path, "::2"), "loopback")
