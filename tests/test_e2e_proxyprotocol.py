"""The PROXY protocol, end to end:

- `--accept-proxy-protocol`: a v1 or v2 header first (whole or in pieces, before TLS on a TLS
  listener) from a `--trusted-proxy` address; its client address is then the client for
  X-Forwarded-For/Forwarded, for the trusted-proxy check of the forwarded headers the client
  sent, and in the access log; a v2 LOCAL header (a balancer's health check) leaves the
  connection's own address. From an untrusted address, with a malformed header, or with none,
  the connection is closed with one log line and rawproxy_proxy_protocol_errors_total moves;
  nothing reaches the backend;
- `--send-proxy-protocol v1|v2`: every backend connection (requests and upgrades, plain and
  TLS, where the header goes before the TLS handshake) starts with a header naming the client
  and the address it connected to, checked byte for byte against headers built here from the
  specification; with an accepted header, the address it carried is sent on;
- a chain of two rawproxy, the front one ending TLS and sending v2 to the other over plain
  TCP: the SSL TLV carries the client's https to the backend (X-Forwarded-Proto, Forwarded
  proto=, Locations), as it does from a real HAProxy with `send-proxy-v2-ssl`;
- behind a real HAProxy in TCP mode (`send-proxy` / `send-proxy-v2`), and toward a real
  HAProxy that accepts the header (`accept-proxy`) and reports the client in its own
  X-Forwarded-For, with clients on 127.0.0.2 so that the client is told from the balancer.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import (
    HttpBackend,
    HttpClient,
    Metrics,
    WsBackend,
    WsClient,
    connect,
    free_port,
    open_websocket,
    recv_until,
    request_bytes,
    wait_closed,
    websocket_request,
)
from tls_peers import Pki, TlsStream

from rawproxy.proxyproto import NEED_MORE, ProxyHeader, encode_v1, encode_v2, parse_proxy_header

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (Debian: apt-get install -y haproxy)"
)

OTHER_LOOPBACK = "127.0.0.2"  # a client address the proxy can tell from 127.0.0.1
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-proxyprotocol"))


# --- headers built here, from the specification (not with the proxy's encoder) -------------


def spec_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def spec_v2(
    src: tuple[str, int], dst: tuple[str, int], command: int = 0x1, tls: str | None = None
) -> bytes:
    """Version 2, `command` 1 (PROXY) or 0 (LOCAL), TCP over IPv4 or IPv6. With `tls` (a
    version, "TLSv1.3", or "" for none) the SSL TLV follows the addresses: PP2_TYPE_SSL with
    the PP2_CLIENT_SSL flag, verify 0, and the version in PP2_SUBTYPE_SSL_VERSION."""
    if command == 0x0:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    a, b = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    family = 0x21 if a.version == 6 else 0x11  # AF_INET6 or AF_INET, STREAM
    block = a.packed + b.packed + struct.pack("!HH", src[1], dst[1])
    if tls is not None:
        value = b"\x01" + struct.pack("!I", 0)
        if tls:
            value += b"\x21" + struct.pack("!H", len(tls)) + tls.encode("ascii")
        block += b"\x20" + struct.pack("!H", len(value)) + value
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def spec_header(version: str, src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    return spec_v1(src, dst) if version == "v1" else spec_v2(src, dst)


def test_spec_headers_agree_with_the_proxys_encoder():
    """The expectations below are built here; the proxy's encoder writes the same bytes (so a
    difference later is in what the proxy sends, not in how it encodes)."""
    for src, dst in [(("203.0.113.7", 51000), ("127.0.0.1", 8080))]:
        assert spec_v1(src, dst) == encode_v1(src, dst)
        assert spec_v2(src, dst) == encode_v2(src, dst)
    six = (("2001:db8::7", 4242), ("2001:db8::1", 443))
    assert spec_v2(*six) == encode_v2(*six)
    assert spec_v2(*six, tls="TLSv1.3") == encode_v2(*six, client_tls=True, tls_version="TLSv1.3")
    assert spec_v2(*six, tls="") == encode_v2(*six, client_tls=True)


# --- a backend that reads the header first ------------------------------------------------------


def read_proxy_header(conn: socket.socket, timeout: float = 5.0) -> tuple[bytes, ProxyHeader]:
    """Read exactly the PROXY header from `conn` (peeking, so no byte after it is taken)."""
    deadline = time.monotonic() + timeout
    while True:
        data = conn.recv(4096, socket.MSG_PEEK)
        if not data:
            raise EOFError("EOF before a complete PROXY header")
        header = parse_proxy_header(data)
        if header is not NEED_MORE:
            assert isinstance(header, ProxyHeader)
            raw = b""
            while len(raw) < header.length:
                raw += conn.recv(header.length - len(raw))
            return raw, header
        if time.monotonic() > deadline:
            raise TimeoutError(f"incomplete PROXY header: {data!r}")
        time.sleep(0.005)


class _ReadsProxyHeader:
    """Mixed into a backend: each connection starts with a PROXY header (recorded, raw and
    parsed), then TLS if `inner_tls` is set, then what the backend serves."""

    proxy_headers: list[tuple[bytes, ProxyHeader]]
    inner_tls: Any
    lock: Any

    def handle(self, conn: socket.socket, conn_id: int) -> None:
        raw, header = read_proxy_header(conn)
        with self.lock:
            self.proxy_headers.append((raw, header))
        stream: Any = conn
        if self.inner_tls is not None:
            stream = TlsStream(conn, self.inner_tls, server_side=True)
            stream.handshake()
        super().handle(stream, conn_id)  # type: ignore[misc]


class ProxyHttpBackend(_ReadsProxyHeader, HttpBackend):
    name = "proxy-http-backend"

    def __init__(self, inner_tls: Any = None) -> None:
        self.proxy_headers = []
        self.inner_tls = inner_tls
        super().__init__()


class ProxyWsBackend(_ReadsProxyHeader, WsBackend):
    name = "proxy-ws-backend"

    def __init__(self) -> None:
        self.proxy_headers = []
        self.inner_tls = None
        super().__init__()


@pytest.fixture
def make_backend() -> Iterator[Callable[..., Any]]:
    """`make_backend(cls, *args)`; all stopped at teardown; none may have failed a connection
    (a header it could not read) or received malformed HTTP."""
    made: list[Any] = []

    def make(cls: type, *args: Any) -> Any:
        backend = cls(*args)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        if isinstance(backend, HttpBackend):
            backend.gate.set()
        backend.stop()
    for backend in made:
        assert not backend.errors, backend.errors
        bad = [e for e in getattr(backend, "protocol_errors", []) if not e.startswith("incomplete")]
        assert not bad, bad


def proxy_args(*flags: str, backend: str, listen: str = "127.0.0.1:0") -> list[str]:
    return ["--listen", listen, "--backend", backend, *flags]


def behind_balancer(run_proxy: Callable[..., Any], backend_port: int) -> Any:
    """A proxy that takes PROXY headers from 127.0.0.1 and sends both families of
    forwarded headers to the backend on `backend_port`."""
    return run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--forwarded",
            "both",
            backend=f"127.0.0.1:{backend_port}",
        )
    )


def send_in_pieces(sock: Any, data: bytes, cut: int) -> None:
    sock.sendall(data[:cut])
    time.sleep(0.05)
    sock.sendall(data[cut:])


def get(target: str, *extra: tuple[str, str]) -> bytes:
    return request_bytes("GET", target, [("Host", "app.test"), *extra])


def refused_exchange(port: int, data: bytes, source: str | None = None) -> tuple[str, bytes]:
    """Connect (from `source`), send `data`, and wait for the proxy to close: ("eof" or
    "reset", what it sent). The proxy may reset an untrusted client at once: so early, on a
    loaded machine, that connect() itself already reports it."""
    sock = socket.socket()
    try:
        sock.settimeout(5)
        if source:
            sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionResetError:
            return "reset", b""
        with contextlib.suppress(OSError):  # reset before or while we send
            sock.sendall(data)
        return wait_closed(sock, 5)
    finally:
        sock.close()


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    c = HttpClient.__new__(HttpClient)
    c.sock, c.buf = sock, bytearray()
    resp = c.read_response()
    return resp.status, resp.body


# --- accepting ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize(
    ("client_ip", "forwarded_for"),
    [
        ("203.0.113.7", r'(^|[;,\s])for="?203\.0\.113\.7(:\d+)?"?($|[;,])'),
        ("2001:db8::7", r'(^|[;,\s])for="\[2001:db8::7\](:\d+)?"($|[;,])'),
    ],
    ids=["ipv4", "ipv6"],
)
def test_accepted_header_gives_the_client_address(
    run_proxy, http_backend, sockets, version, client_ip, forwarded_for
):
    proxy = behind_balancer(run_proxy, http_backend.port)
    src = (client_ip, 51000)
    dst = ("2001:db8::1", 443) if ":" in client_ip else ("198.51.100.1", 443)
    sock = connect(proxy.port)
    sockets.append(sock)
    # The header in two pieces, the request right behind it in the same segment.
    send_in_pieces(sock, spec_header(version, src, dst) + get(f"/{version}"), 7)
    assert read_answer(sock) == (200, f"GET /{version}".encode())
    seen = http_backend.requests[-1]
    assert seen.values("x-forwarded-for") == [client_ip.encode()], seen.headers
    forwarded = (seen.header("forwarded") or b"").decode()
    assert re.search(forwarded_for, forwarded), forwarded
    # Keep-alive: the next request on the connection needs no header.
    sock.sendall(get("/again"))
    assert read_answer(sock) == (200, b"GET /again")
    assert http_backend.requests[-1].values("x-forwarded-for") == [client_ip.encode()]
    # The access log names the client from the header.
    line = proxy.wait_for_log(r'"GET /again HTTP/1\.1" 200')
    assert f"INFO {client_ip} - - [" in line, line


def test_each_connection_gets_its_own_forwarded_headers(run_proxy, http_backend, sockets):
    """The forwarded headers of one client address, scheme and port are remembered for the
    next connection like it (Session._forwarded_lines): connections through one balancer
    from other clients, to other ports, with and without TLS, in turns, each get their own,
    never the ones remembered for another."""
    proxy = behind_balancer(run_proxy, http_backend.port)
    cases = [
        ("203.0.113.7", 443, "TLSv1.3"),
        ("203.0.113.8", 443, "TLSv1.3"),
        ("203.0.113.7", 8443, "TLSv1.3"),
        ("203.0.113.7", 443, None),
    ]
    for _ in range(2):  # the second round finds them remembered
        for ip, port, tls in cases:
            sock = connect(proxy.port)
            sockets.append(sock)
            header = spec_v2((ip, 51000), ("198.51.100.1", port), tls=tls)
            sock.sendall(header + get("/mine"))
            assert read_answer(sock) == (200, b"GET /mine")
            seen = http_backend.requests[-1]
            scheme = b"https" if tls else b"http"
            assert seen.values("x-forwarded-for") == [ip.encode()], seen.headers
            assert seen.values("x-forwarded-port") == [str(port).encode()], seen.headers
            assert seen.values("x-forwarded-proto") == [scheme], seen.headers
            forwarded = seen.header("forwarded") or b""
            assert forwarded.startswith(b"for=%s;proto=%s;" % (ip.encode(), scheme)), forwarded
            sock.close()


def test_header_comes_before_tls(run_proxy, http_backend, pki, sockets):
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--cert",
            str(pki.server.cert),
            "--key",
            str(pki.server.key),
            backend=f"127.0.0.1:{http_backend.port}",
            listen="tls://127.0.0.1:0",
        )
    )
    for version in ("v1", "v2"):
        raw = connect(proxy.port)
        sockets.append(raw)
        raw.sendall(spec_header(version, ("203.0.113.9", 40000), ("198.51.100.1", 443)))
        stream = TlsStream(raw, pki.client_context(), server_hostname="localhost")
        stream.handshake()
        stream.sendall(get(f"/tls-{version}"))
        c = HttpClient.__new__(HttpClient)
        c.sock, c.buf = stream, bytearray()
        resp = c.read_response()
        assert (resp.status, resp.body) == (200, f"GET /tls-{version}".encode())
        seen = http_backend.requests[-1]
        assert seen.values("x-forwarded-for") == [b"203.0.113.9"], seen.headers
        assert seen.header("x-forwarded-proto") == b"https"
        stream.close()


def test_v2_local_header_keeps_the_connection_address(run_proxy, http_backend, sockets):
    """A balancer's own connection (health check): LOCAL, no client address to take."""
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            backend=f"127.0.0.1:{http_backend.port}",
        )
    )
    sock = connect(proxy.port)
    sockets.append(sock)
    sock.sendall(spec_v2(("0.0.0.0", 0), ("0.0.0.0", 0), command=0x0) + get("/health"))
    assert read_answer(sock) == (200, b"GET /health")
    assert http_backend.requests[-1].values("x-forwarded-for") == [b"127.0.0.1"]


SSL_TLV_CASES = {
    # (the SSL TLV the balancer sends: a version, "" for none, None for no TLV; the scheme)
    "TLS, version named": ("TLSv1.3", "https"),
    "TLS, version not named": ("", "https"),
    "no SSL TLV": (None, "http"),
}


@pytest.mark.parametrize("case", list(SSL_TLV_CASES))
def test_ssl_tlv_gives_the_scheme(run_proxy, http_backend, sockets, case):
    """Behind a balancer that ends TLS and sends PROXY v2 over plain TCP, the SSL TLV with
    PP2_CLIENT_SSL is what says the client used https: X-Forwarded-Proto, Forwarded proto=
    and rewritten Locations say https exactly as behind our own TLS listener. The headers
    of the client the header names are not believed (it is no trusted proxy)."""
    tls, scheme = SSL_TLV_CASES[case]
    proxy = behind_balancer(run_proxy, http_backend.port)
    sock = connect(proxy.port)
    sockets.append(sock)
    header = spec_v2(("203.0.113.7", 51000), ("198.51.100.1", 443), tls=tls)
    # The client's own claim is not believed, whichever way it goes.
    claim = ("X-Forwarded-Proto", "http" if scheme == "https" else "https")
    send_in_pieces(sock, header + get("/scheme", claim), 20)
    assert read_answer(sock) == (200, b"GET /scheme")
    seen = http_backend.requests[-1]
    assert seen.values("x-forwarded-proto") == [scheme.encode()], seen.headers
    assert seen.values("x-forwarded-for") == [b"203.0.113.7"], seen.headers
    forwarded = (seen.header("forwarded") or b"").decode()
    assert f"proto={scheme}" in forwarded, forwarded
    # A redirect to the backend's own address is rewritten to what the client used.
    sock.sendall(get(f"/redirect?to=http://127.0.0.1:{http_backend.port}/next"))
    c = HttpClient.__new__(HttpClient)
    c.sock, c.buf = sock, bytearray()
    resp = c.read_response()
    assert resp.status == 302
    assert resp.values("location") == [f"{scheme}://app.test/next".encode()], resp.headers


def test_ssl_tlv_without_the_tls_flag_gives_http(run_proxy, http_backend, sockets):
    """An SSL TLV whose client flags lack PP2_CLIENT_SSL (0x01) says the client did not use
    TLS, whatever else it carries."""
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            backend=f"127.0.0.1:{http_backend.port}",
        )
    )
    plain = spec_v2(("203.0.113.7", 51000), ("198.51.100.1", 443))
    value = b"\x06" + struct.pack("!I", 0) + b"\x21\x00\x07TLSv1.3"
    tlv = b"\x20" + struct.pack("!H", len(value)) + value
    header = plain[:14] + struct.pack("!H", 12 + len(tlv)) + plain[16:] + tlv
    sock = connect(proxy.port)
    sockets.append(sock)
    sock.sendall(header + get("/flags"))
    assert read_answer(sock) == (200, b"GET /flags")
    assert http_backend.requests[-1].values("x-forwarded-proto") == [b"http"]


def test_malformed_ssl_tlv_is_refused(run_proxy, http_backend):
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            backend=f"127.0.0.1:{http_backend.port}",
        )
    )
    good = spec_v2(("203.0.113.7", 51000), ("198.51.100.1", 443), tls="TLSv1.3")
    bad = good[:-8] + b"\x08" + good[-7:]  # the version announces 8 bytes, 7 follow
    mark = proxy.mark()
    kind, got = refused_exchange(proxy.port, bad + get("/bad"))
    assert (kind in ("eof", "reset"), got) == (True, b"")
    line = proxy.wait_for_log(r"bad PROXY protocol header", since=mark)
    assert "TLV" in line, line
    assert http_backend.heads == []


REFUSED = {
    "malformed v1": (b"PROXY TCP4 203.0.113.7\r\nGET / HTTP/1.1\r\n\r\n", None),
    "v1 with a bad address": (b"PROXY TCP4 203.0.113.777 127.0.0.1 1 2\r\n", None),
    "bad v2 version": (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), None),
    "no header at all": (b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n", None),
    "untrusted address": (spec_v1(("203.0.113.7", 1), ("127.0.0.1", 2)), OTHER_LOOPBACK),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_headers_close_the_connection(run_proxy, http_backend, sockets, case):
    data, source = REFUSED[case]
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--admin-listen",
            "127.0.0.1:0",
            backend=f"127.0.0.1:{http_backend.port}",
        )
    )
    assert proxy.admin_port is not None, proxy.log_text()
    before = Metrics(proxy.admin_port)
    mark = proxy.mark()
    kind, got = refused_exchange(proxy.port, data + get("/after"), source)
    assert got == b"", f"{case}: the proxy answered {got!r}"
    assert kind in ("eof", "reset")
    after = Metrics(proxy.admin_port)
    name = "rawproxy_proxy_protocol_errors_total"
    assert after(name) - before(name) == 1, case
    proxy.wait_for_log(r"PROXY", since=mark)
    time.sleep(0.2)  # time for a second line, if there were one
    lines = proxy.log_text(mark).splitlines()
    assert len(lines) == 1, f"{case}: not one log line:\n{proxy.log_text(mark)}"
    assert "PROXY" in lines[0], lines
    if source:
        assert "trusted" in lines[0], lines
    assert http_backend.heads == [], "a refused connection reached the backend"
    # A good connection is still served.
    good = connect(proxy.port)
    sockets.append(good)
    good.sendall(spec_v1(("203.0.113.8", 1234), ("127.0.0.1", proxy.port)) + get("/good"))
    assert read_answer(good) == (200, b"GET /good")


def test_half_a_header_is_closed_after_the_header_timeout(run_proxy, http_backend, sockets):
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--header-timeout",
            "0.5",
            backend=f"127.0.0.1:{http_backend.port}",
        )
    )
    sock = connect(proxy.port)
    sockets.append(sock)
    sock.sendall(b"PROXY TCP4 203.0.11")
    started = time.monotonic()
    kind, got = wait_closed(sock, 5)
    assert (kind in ("eof", "reset"), got) == (True, b"")
    assert 0.3 < time.monotonic() - started < 3
    proxy.wait_for_log(r"PROXY")


def test_forwarded_headers_trusted_by_the_header_address(run_proxy, http_backend, sockets):
    """Behind the balancer, the client is the header's address: its forwarded headers count
    only when that address is a trusted proxy, not because the balancer is one."""
    common = ("--accept-proxy-protocol", "--trusted-proxy", "127.0.0.1/32")
    backend = f"127.0.0.1:{http_backend.port}"
    request = get("/fwd", ("X-Forwarded-For", "198.51.100.1"))
    header = spec_v1(("203.0.113.7", 5555), ("127.0.0.1", 80))

    plain = run_proxy(*proxy_args(*common, backend=backend))
    sock = connect(plain.port)
    sockets.append(sock)
    sock.sendall(header + request)
    assert read_answer(sock)[0] == 200
    assert http_backend.requests[-1].values("x-forwarded-for") == [b"203.0.113.7"]

    chain = run_proxy(*proxy_args(*common, "--trusted-proxy", "203.0.113.0/24", backend=backend))
    sock = connect(chain.port)
    sockets.append(sock)
    sock.sendall(header + request)
    assert read_answer(sock)[0] == 200
    values = b", ".join(http_backend.requests[-1].values("x-forwarded-for"))
    assert values == b"198.51.100.1, 203.0.113.7"


# --- sending -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sends_a_header_on_every_backend_connection(
    run_proxy, make_backend, client, sockets, version
):
    http = make_backend(ProxyHttpBackend)
    ws = make_backend(ProxyWsBackend)
    proxy = run_proxy(
        "--listen",
        "127.0.0.1:0",
        "--route",
        f"/=http://127.0.0.1:{http.port}",
        "--route",
        f"/ws=http://127.0.0.1:{ws.port}",
        "--send-proxy-protocol",
        version,
    )
    c = client(proxy.port)
    client_address = c.sock.getsockname()
    for target in ("/one", "/two"):  # one backend connection, kept alive: one header
        resp = c.request(get(target))
        assert (resp.status, resp.body) == (200, f"GET {target}".encode())
    assert len(http.proxy_headers) == 1, http.proxy_headers
    raw, parsed = http.proxy_headers[0]
    assert raw == spec_header(version, client_address, ("127.0.0.1", proxy.port))
    assert parsed.command == "PROXY"

    ws_client = client(proxy.port)
    websocket = open_websocket(ws_client, "/ws")
    websocket.send("through")
    assert websocket.recv() == "through"
    websocket.close()
    assert len(ws.proxy_headers) == 1
    assert ws.proxy_headers[0][0] == spec_header(
        version, ws_client.sock.getsockname(), ("127.0.0.1", proxy.port)
    )


def test_sends_the_header_before_tls(run_proxy, make_backend, client, pki):
    backend = make_backend(ProxyHttpBackend, pki.server_context())
    proxy = run_proxy(
        "--listen",
        "127.0.0.1:0",
        "--backend",
        f"https://localhost:{backend.port}",
        "--backend-ca",
        str(pki.ca_file),
        "--send-proxy-protocol",
        "v2",
    )
    c = client(proxy.port)
    resp = c.request(get("/tls"))
    assert (resp.status, resp.body) == (200, b"GET /tls")
    assert backend.proxy_headers[0][0] == spec_v2(c.sock.getsockname(), ("127.0.0.1", proxy.port))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_tls_client_is_said_in_v2(run_proxy, make_backend, client, pki, version):
    """A client that spoke TLS to a TLS listener: v2 carries the SSL TLV with the version
    the client negotiated, as HAProxy's send-proxy-v2-ssl does, so that a proxy behind can
    tell the backend https; v1 has no TLVs and is the same as for a plain client."""
    backend = make_backend(ProxyHttpBackend)
    proxy = run_proxy(
        *proxy_args(
            "--cert",
            str(pki.server.cert),
            "--key",
            str(pki.server.key),
            "--send-proxy-protocol",
            version,
            backend=f"127.0.0.1:{backend.port}",
            listen="tls://127.0.0.1:0",
        )
    )
    c = client(proxy.port, ssl_context=pki.client_context())
    resp = c.request(get("/tls-client"))
    assert (resp.status, resp.body) == (200, b"GET /tls-client")
    negotiated = c.sock.version()
    assert negotiated is not None
    assert negotiated.startswith("TLSv"), negotiated
    raw, parsed = backend.proxy_headers[0]
    address = c.sock.raw.getsockname()
    if version == "v1":
        assert raw == spec_v1(address, ("127.0.0.1", proxy.port))
        assert not parsed.client_tls
    else:
        assert raw == spec_v2(address, ("127.0.0.1", proxy.port), tls=negotiated)
        assert (parsed.client_tls, parsed.tls_version) == (True, negotiated)


@pytest.mark.parametrize(
    ("send", "tls"),
    [("v1", None), ("v2", None), ("v2", "TLSv1.2"), ("v2", "")],
    ids=["v1", "v2", "v2-tls-version", "v2-tls"],
)
def test_accepted_header_is_sent_on(run_proxy, make_backend, sockets, send, tls):
    """Accept v2 from the balancer, send v1 or v2 to the backend: the client and the address
    it connected to (the balancer's, as HAProxy does with accept-proxy and send-proxy) go
    on; with the SSL TLV (the client spoke TLS to the balancer), a v2 header sent on says so
    with the version the accepted one named."""
    backend = make_backend(ProxyHttpBackend)
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--send-proxy-protocol",
            send,
            backend=f"127.0.0.1:{backend.port}",
        )
    )
    src, dst = ("203.0.113.7", 4444), ("198.51.100.9", 443)
    sock = connect(proxy.port)
    sockets.append(sock)
    sock.sendall(spec_v2(src, dst, tls=tls) + get("/on"))
    assert read_answer(sock) == (200, b"GET /on")
    expected = spec_v1(src, dst) if send == "v1" else spec_v2(src, dst, tls=tls)
    assert backend.proxy_headers[0][0] == expected


# --- a chain: the front proxy ends TLS, the one behind accepts its PROXY header ---------------


def tls_client_from(port: int, pki: Pki, source: str, sockets: list[Any]) -> HttpClient:
    """An HttpClient over TLS whose connection comes from `source`."""
    raw = socket.socket()
    sockets.append(raw)
    raw.settimeout(5)
    raw.bind((source, 0))
    raw.connect(("127.0.0.1", port))
    stream = TlsStream(raw, pki.client_context(), server_hostname="localhost")
    stream.handshake()
    c = HttpClient.__new__(HttpClient)
    c.sock, c.buf = stream, bytearray()
    return c


@pytest.mark.parametrize(("front", "scheme"), [("tls", "https"), ("tcp", "http")])
def test_chain_of_two_proxies(run_proxy, http_backend, pki, sockets, front, scheme):
    """client (127.0.0.2) --TLS or not--> rawproxy A, --send-proxy-protocol v2 --> rawproxy
    B, --accept-proxy-protocol from 127.0.0.1 --> backend. B takes the client from A's
    header and does not believe the forwarded headers A wrote (they come, to B, from the
    client the header names): the scheme the backend is told is the one A's SSL TLV gives,
    https behind A's TLS listener, http behind its plain one (no TLV)."""
    b = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--forwarded",
            "both",
            backend=f"127.0.0.1:{http_backend.port}",
        )
    )
    tls_flags = ["--cert", str(pki.server.cert), "--key", str(pki.server.key)]
    a = run_proxy(
        *proxy_args(
            *(tls_flags if front == "tls" else []),
            "--send-proxy-protocol",
            "v2",
            backend=f"127.0.0.1:{b.port}",
            listen=f"{front}://127.0.0.1:0",
        )
    )
    if front == "tls":
        c = tls_client_from(a.port, pki, OTHER_LOOPBACK, sockets)
    else:
        c = HttpClient(a.port, timeout=5, source=OTHER_LOOPBACK)
        sockets.append(c.sock)
    resp = c.request(get("/chain"))
    assert (resp.status, resp.body) == (200, b"GET /chain")
    seen = http_backend.requests[-1]
    assert seen.values("x-forwarded-proto") == [scheme.encode()], seen.headers
    assert seen.values("x-forwarded-for") == [OTHER_LOOPBACK.encode()], seen.headers
    forwarded = (seen.header("forwarded") or b"").decode()
    assert f"for={OTHER_LOOPBACK};proto={scheme}" in forwarded, forwarded
    # The backend's redirect to itself reaches the client with the scheme the client used.
    resp = c.request(get(f"/redirect?to=http://127.0.0.1:{http_backend.port}/next"))
    assert resp.status == 302
    assert resp.values("location") == [f"{scheme}://app.test/next".encode()], resp.headers
    line = b.wait_for_log(r'"GET /redirect')
    assert f"INFO {OTHER_LOOPBACK} - - [" in line, line


# --- behind (and in front of) a real HAProxy ---------------------------------------------------


class HAProxy:
    """`haproxy -f CFG -db` (foreground), its log collected; stopped by its PID."""

    def __init__(self, config: str, workdir: Path, ports: list[int]) -> None:
        path = workdir / "haproxy.cfg"
        path.write_text(config)
        self.proc = subprocess.Popen(
            [str(HAPROXY), "-f", str(path), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        deadline = time.monotonic() + 10
        for port in ports:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"haproxy exited: {self.output()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"haproxy not listening: {self.output()}") from None
                    time.sleep(0.02)

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


HAPROXY_CONFIG = """\
global
    maxconn 200
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend clients
    mode tcp
    bind 127.0.0.1:{front}
    default_backend to_rawproxy
backend to_rawproxy
    mode tcp
    server rawproxy 127.0.0.1:{rawproxy} {send}
frontend from_rawproxy
    mode http
    bind 127.0.0.1:{back} accept-proxy
    option forwardfor
    default_backend app
backend app
    mode http
    server app 127.0.0.1:{app}
"""


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., HAProxy]]:
    started: list[HAProxy] = []

    def start(config: str, ports: list[int]) -> HAProxy:
        h = HAProxy(config, tmp_path, ports)
        started.append(h)
        return h

    yield start
    for h in started:
        h.stop()


@pytest.fixture
def haproxy_app() -> Iterator[HttpBackend]:
    """The app behind HAProxy. HAProxy closes idle server connections with a reset (its
    "nolinger" close), so resets are not errors here; malformed HTTP still is."""
    app = HttpBackend()
    yield app
    app.stop()
    assert not [e for e in app.errors if "ConnectionResetError" not in e], app.errors
    assert not [e for e in app.protocol_errors if not e.startswith("incomplete")]


@needs_haproxy
@pytest.mark.parametrize(("haproxy_sends", "rawproxy_sends"), [("v2", "v1"), ("v1", "v2")])
def test_between_two_haproxies(
    run_proxy, haproxy, haproxy_app, make_backend, sockets, haproxy_sends, rawproxy_sends
):
    """client (127.0.0.2) -> HAProxy, TCP mode, send-proxy[-v2] -> rawproxy (accepts it from
    127.0.0.1, sends its own header) -> HAProxy, HTTP mode, accept-proxy, forwardfor -> app.
    rawproxy adds no forwarded headers here: the client address the app sees in
    X-Forwarded-For is HAProxy's reading of the header rawproxy sent."""
    app = haproxy_app
    ws = make_backend(ProxyWsBackend)
    send = "send-proxy-v2" if haproxy_sends == "v2" else "send-proxy"
    for attempt in range(2):
        front, back = free_port(), free_port()
        proxy = run_proxy(
            "--listen",
            "127.0.0.1:0",
            "--route",
            f"/=http://127.0.0.1:{back}",
            "--route",
            f"/ws=http://127.0.0.1:{ws.port}",
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--send-proxy-protocol",
            rawproxy_sends,
            "--forwarded",
            "none",
        )
        config = HAPROXY_CONFIG.format(
            front=front, back=back, rawproxy=proxy.port, send=send, app=app.port
        )
        try:
            haproxy(config, [front, back])
            break
        except RuntimeError:
            if attempt:
                raise

    for i in range(3):
        with HttpClient(front, timeout=5, source=OTHER_LOOPBACK) as c:
            resp = c.request(get(f"/via-haproxy-{i}"))
        assert (resp.status, resp.body) == (200, f"GET /via-haproxy-{i}".encode()), resp
        seen = app.requests[-1]
        assert seen.values("x-forwarded-for") == [OTHER_LOOPBACK.encode()], seen.headers
    line = proxy.wait_for_log(r'"GET /via-haproxy-2 HTTP/1\.1" 200')
    assert f"INFO {OTHER_LOOPBACK} - - [" in line, line

    # A WebSocket through the TCP-mode HAProxy, to a backend that reads rawproxy's header.
    sock = connect(front, source=OTHER_LOOPBACK)
    sockets.append(sock)
    sock.sendall(websocket_request("/ws"))
    buf = bytearray()
    head = recv_until(sock, buf, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    websocket = WsClient(sock, bytes(buf))
    websocket.send("through two balancers")
    assert websocket.recv() == "through two balancers"
    websocket.close()
    _, header = ws.proxy_headers[-1]
    assert header.source is not None
    assert header.source[0] == OTHER_LOOPBACK, header

    # Straight to rawproxy from 127.0.0.2 (not a trusted proxy): refused.
    assert refused_exchange(proxy.port, get("/direct"), OTHER_LOOPBACK)[1] == b""


HAPROXY_TLS_CONFIG = """\
global
    maxconn 200
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend clients
    mode tcp
    bind 127.0.0.1:{front} ssl crt {pem}
    default_backend to_rawproxy
backend to_rawproxy
    mode tcp
    server rawproxy 127.0.0.1:{rawproxy} {send}
"""


@needs_haproxy
@pytest.mark.parametrize(
    ("send", "scheme"),
    [
        ("send-proxy-v2-ssl", "https"),
        ("send-proxy-v2", "http"),
        # HAProxy's header with its CRC32C TLV (and the SSL TLV): rawproxy verifies it.
        ("send-proxy-v2-ssl proxy-v2-options crc32c", "https"),
    ],
)
def test_behind_haproxy_ending_tls(
    run_proxy, haproxy, http_backend, pki, sockets, tmp_path, send, scheme
):
    """client (127.0.0.2) --TLS--> HAProxy, TCP mode, ending TLS --> rawproxy: with
    send-proxy-v2-ssl HAProxy's header has the SSL TLV, and the backend is told https; with
    send-proxy-v2 it has none, and nothing says the client used TLS."""
    proxy = run_proxy(
        *proxy_args(
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            backend=f"127.0.0.1:{http_backend.port}",
        )
    )
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(Path(pki.server.cert).read_bytes() + Path(pki.server.key).read_bytes())
    for attempt in range(2):
        front = free_port()
        config = HAPROXY_TLS_CONFIG.format(front=front, pem=pem, rawproxy=proxy.port, send=send)
        try:
            haproxy(config, [front])
            break
        except RuntimeError:
            if attempt:
                raise
    c = tls_client_from(front, pki, OTHER_LOOPBACK, sockets)
    resp = c.request(get("/via-haproxy-tls"))
    assert (resp.status, resp.body) == (200, b"GET /via-haproxy-tls")
    seen = http_backend.requests[-1]
    assert seen.values("x-forwarded-proto") == [scheme.encode()], seen.headers
    assert seen.values("x-forwarded-for") == [OTHER_LOOPBACK.encode()], seen.headers
