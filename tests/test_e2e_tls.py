"""TLS on both legs, end to end: the proxy as a user starts it (`--cert/--key`, `tls://` and
`tcp://` listeners, `https://`/`wss://` backends, `--backend-ca`, `--backend-sni`,
`--backend-insecure`, `--backend-cert/--backend-key`), real TLS on loopback sockets with
certificates from one trustme CA per session (see `tls_peers.Pki`).

- every combination of plain/TLS client and plain/TLS backend: GET, POST, a large response,
  X-Forwarded-Proto, and a WebSocket echo with 1 MiB messages;
- 64 MiB each way (and both at once) through a TLS-to-TLS tunnel, by SHA-256; half-close
  either way by close_notify, close_notify + FIN, or a bare FIN; and one side half-closing
  while the other is still streaming (every byte still arrives);
- the backend's certificate: untrusted, wrong name, expired (502 and one log line naming the
  reason), `--backend-insecure`, `--backend-sni`, mutual TLS;
- the client side: plain HTTP to a TLS port, stalled handshakes, ALPN, TLS 1.1, SNI choosing
  among several certificates, a certificate chain, mixed plain and TLS listeners;
- SIGHUP re-reading the certificate (and keeping it when the new file is broken);
- an encrypted key: a start-up error, or on SIGHUP a logged one, never a passphrase prompt;
- two proxies chained over TLS.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from peers import (
    BLOB_SIZE,
    RESPONSE_101,
    HttpBackend,
    HttpClient,
    ProxyProcess,
    ScriptedBackend,
    ScriptedConn,
    WsBackend,
    WsClient,
    connect,
    header_tokens,
    header_values,
    parse_head,
    pattern_bytes,
    read_to_eof,
    recv_exact,
    recv_until,
    request_bytes,
    run_rawproxy,
    send_blob,
    sha256,
    simple_get,
    tunnel_request,
    wait_closed,
    ws_accept,
    ws_key,
)
from tls_peers import Pki, TlsStream, cert_flags, client_hello, tls_wait_closed
from wsproto.events import CloseConnection

MiB = 1024 * 1024


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def startup_lines(proxy: ProxyProcess) -> list[str]:
    """The log lines up to and including `ready`."""
    lines = proxy.log_text().splitlines()
    for i, line in enumerate(lines):
        if re.search(r"\bready\b", line, re.IGNORECASE):
            return lines[: i + 1]
    raise AssertionError(f"no ready line:\n{proxy.log_text()}")


def listening_line(proxy: ProxyProcess, port: int) -> str:
    [line] = [ln for ln in startup_lines(proxy) if f"listening on 127.0.0.1:{port}" in ln]
    return line


def assert_backend_tls_announced(proxy: ProxyProcess) -> None:
    lines = [ln for ln in startup_lines(proxy) if "TLS" in ln and "backend" in ln.lower()]
    assert lines, "no start-up line says TLS to the backend:\n" + "\n".join(startup_lines(proxy))


def status_pattern(status: int) -> str:
    return rf"(?<![\w.]){status}(?![\w.])"


def log_barrier(proxy: ProxyProcess, port: int) -> None:
    """Return once the proxy has logged everything about earlier exchanges: a malformed
    request on the plain listener `port` gets a 400 and a log line, which the proxy's single
    event loop writes after whatever it logged before."""
    mark = proxy.mark()
    with HttpClient(port, timeout=5) as c:
        assert c.request(b"GARBAGE\r\n\r\n").status == 400
    proxy.wait_for_log(status_pattern(400), since=mark)


def lines_since(proxy: ProxyProcess, mark: int, *excluding: str) -> list[str]:
    return [
        line
        for line in proxy.log_text(mark).splitlines()
        if line and not any(x in line for x in excluding)
    ]


def forwarded_proto(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return header_tokens(headers, "x-forwarded-proto")


# --- WebSocket over any client -------------------------------------------------------------


def websocket_head(host: str = "app.test", path: str = "/chat") -> tuple[bytes, str]:
    key = ws_key()
    head = request_bytes(
        "GET",
        path,
        [
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    return head, key


def open_websocket(c: HttpClient, host: str = "app.test") -> WsClient:
    head, key = websocket_head(host)
    c.send(head)
    status, _, headers, raw = c.read_head()
    assert status == 101, raw
    assert header_values(headers, "sec-websocket-accept") == [ws_accept(key)], raw
    leftover = bytes(c.buf)
    c.buf.clear()
    return WsClient(c.sock, leftover)


BIG_TEXT = "ünïcödé ✓ " * (MiB // 16)  # about 1 MiB of UTF-8


def assert_echoes(ws: WsClient, big: bool = True) -> None:
    messages: list[str | bytes] = ["hello", "ünïcödé ✓", b"\x00\x01\xffbinary", ""]
    if big:
        messages += [os.urandom(MiB), BIG_TEXT]
    for message in messages:
        ws.send(message)
        assert ws.recv() == message


def assert_closes_cleanly(ws: WsClient) -> None:
    closing = ws.close()
    assert isinstance(closing, CloseConnection)
    assert closing.code == 1000


# --- 1. plain/TLS client x plain/TLS backend --------------------------------------------------

LEGS = [
    pytest.param(False, False, id="plain-client-plain-backend"),
    pytest.param(False, True, id="plain-client-tls-backend"),
    pytest.param(True, False, id="tls-client-plain-backend"),
    pytest.param(True, True, id="tls-client-tls-backend"),
]


@dataclasses.dataclass
class Route:
    proxy: ProxyProcess
    client_ctx: ssl.SSLContext | None

    def client(self, client: Callable[..., HttpClient]) -> HttpClient:
        return client(self.proxy.port, ssl_context=self.client_ctx)


@pytest.fixture
def route(
    start_proxy: Callable[..., ProxyProcess], pki: Pki
) -> Callable[[Any, bool, bool, str], Route]:
    """`route(backend, client_tls, backend_tls, scheme)`: a proxy in front of `backend` (which
    must be TLS exactly when backend_tls), TLS to clients when client_tls; with backend_tls its
    --backend is `SCHEME://localhost:PORT` with --backend-ca."""

    def start(backend: Any, client_tls: bool, backend_tls: bool, scheme: str = "https") -> Route:
        flags = cert_flags(pki.server) if client_tls else []
        url = None
        if backend_tls:
            url = f"{scheme}://localhost:{backend.port}"
            flags += ["--backend-ca", str(pki.ca_file)]
        proxy = start_proxy(backend.port, *flags, backend=url)
        kind = "(tls)" if client_tls else "(plain)"
        assert kind in listening_line(proxy, proxy.port)
        if backend_tls:
            assert_backend_tls_announced(proxy)
        return Route(proxy, pki.client_context() if client_tls else None)

    return start


@pytest.mark.parametrize(("client_tls", "backend_tls"), LEGS)
def test_http_through_every_leg_combination(
    route, make_backend, client, pki, client_tls, backend_tls
):
    backend = make_backend(HttpBackend, ssl_context=pki.server_context() if backend_tls else None)
    r = route(backend, client_tls, backend_tls, "https")
    c = r.client(client)

    resp = c.request(simple_get("/hello?x=1", "app.test"))
    assert (resp.status, resp.body) == (200, b"GET /hello?x=1")

    body = os.urandom(MiB + 5)
    resp = c.request(
        request_bytes(
            "POST",
            "/echo",
            [("Host", "app.test"), ("Content-Length", str(len(body)))],
            body,
        ),
        "POST",
    )
    assert resp.status == 200
    assert sha256(resp.body) == sha256(body)

    resp = c.request(simple_get(f"/big?n={8 * MiB}", "app.test"))  # chunked, 8 MiB
    assert resp.status == 200
    assert sha256(resp.body) == sha256(pattern_bytes(8 * MiB))

    requests = backend.wait_for_requests(3)
    assert [r.method for r in requests] == [b"GET", b"POST", b"GET"]
    assert sha256(requests[1].body) == sha256(body)
    proto = b"https" if client_tls else b"http"
    for req in requests:
        assert forwarded_proto(req.headers) == [proto], req.headers
        assert req.values("x-forwarded-for") == [b"127.0.0.1"]
        assert req.values("host") == [b"app.test"]
    if backend_tls:
        assert backend.tls_seen, "the backend saw no TLS handshake"
        assert set(backend.sni_names) == {"localhost"}, backend.sni_names


@pytest.mark.parametrize(("client_tls", "backend_tls"), LEGS)
def test_websocket_through_every_leg_combination(
    route, make_backend, client, pki, client_tls, backend_tls
):
    backend = make_backend(WsBackend, ssl_context=pki.server_context() if backend_tls else None)
    r = route(backend, client_tls, backend_tls, "wss")
    c = r.client(client)
    ws = open_websocket(c)
    assert_echoes(ws)
    assert_closes_cleanly(ws)
    [head] = backend.wait_handshakes(1)
    _, headers = parse_head(head)
    assert forwarded_proto(headers) == [b"https" if client_tls else b"http"], head


@pytest.mark.parametrize(
    ("backend_url", "flags", "backend_tls"),
    [
        ("https://localhost:{port}", [], True),
        ("wss://localhost:{port}", [], True),
        ("localhost:{port}", ["--backend-tls"], True),
        ("https://localhost:{port}", ["--no-backend-tls"], False),
        ("http://localhost:{port}", [], False),
    ],
    ids=["https-scheme", "wss-scheme", "backend-tls-flag", "no-backend-tls-flag", "http-scheme"],
)
def test_backend_tls_chosen_by_scheme_and_flags(
    start_proxy, make_backend, client, pki, backend_url, flags, backend_tls
):
    """(Port 443 meaning TLS is not tested: binding it needs privileges.)"""
    backend = make_backend(HttpBackend, ssl_context=pki.server_context() if backend_tls else None)
    ca = ["--backend-ca", str(pki.ca_file)] if backend_tls else []
    proxy = start_proxy(backend.port, *flags, *ca, backend=backend_url.format(port=backend.port))
    resp = client(proxy.port).request(simple_get("/chosen"))
    assert (resp.status, resp.body) == (200, b"GET /chosen")
    assert bool(backend.tls_seen) == backend_tls
    if backend_tls:
        assert_backend_tls_announced(proxy)


# --- 2. bulk data and half-close through a TLS-to-TLS tunnel ----------------------------------


@dataclasses.dataclass
class TlsTunnel:
    sock: Any  # a TlsStream (or a plain socket for a plain client leg)
    buf: bytearray  # bytes the client received after the 101 head
    backend: ScriptedBackend
    proxy: ProxyProcess
    again: Callable[[], TlsTunnel]  # another client through the same proxy to the same backend

    def read_to_eof(self) -> tuple[int, str]:
        return read_to_eof(self.sock, self.buf)  # type: ignore[arg-type]


@pytest.fixture
def open_tls_tunnel(make_backend, start_proxy, sockets, pki) -> Callable[..., TlsTunnel]:
    """`open_tls_tunnel(script)`: a TLS scripted backend running `script`, a proxy with TLS on
    both legs in front of it, and a TLS client whose upgrade request got the backend's 101.
    `client_tls=False` or `backend_tls=False` makes that leg plain TCP instead; with
    `strict_peers` the client and backend keep OpenSSL 3's default of failing the connection
    at a TCP FIN that came without close_notify."""

    def open_(
        script: Callable[[ScriptedConn], Any],
        *flags: str,
        client_tls: bool = True,
        backend_tls: bool = True,
        strict_peers: bool = False,
    ) -> TlsTunnel:
        tolerant = not strict_peers
        backend = make_backend(
            ScriptedBackend,
            script,
            ssl_context=pki.server_context(tolerate_bare_fin=tolerant) if backend_tls else None,
        )
        leg_flags = cert_flags(pki.server) if client_tls else []
        url = None
        if backend_tls:
            leg_flags += ["--backend-ca", str(pki.ca_file)]
            url = f"https://localhost:{backend.port}"
        proxy = start_proxy(backend.port, *leg_flags, *flags, backend=url)

        def client_leg() -> TlsTunnel:
            stream: Any
            if client_tls:
                ctx = pki.client_context(tolerate_bare_fin=tolerant)
                stream = TlsStream.connect(proxy.port, ctx, timeout=20)
            else:
                stream = connect(proxy.port, timeout=20)
            sockets.append(stream)
            stream.sendall(tunnel_request())
            buf = bytearray()
            head = recv_until(stream, buf, b"\r\n\r\n")
            assert re.match(rb"HTTP/1\.1 101 ", head), head
            return TlsTunnel(stream, buf, backend, proxy, client_leg)

        return client_leg()

    return open_


def test_tls_tunnel_64mib_client_to_backend(open_tls_tunnel, blob, blob_sha):
    def sink(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        n, digest = sc.read_to_eof()
        sc.sock.sendall(f"{n} {digest}".encode())  # the client half-closed; still answer
        return n, digest

    start = time.monotonic()
    t = open_tls_tunnel(sink)
    send_blob(t.sock, blob)  # type: ignore[arg-type]
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result(30) == (BLOB_SIZE, blob_sha)
    answer = f"{BLOB_SIZE} {blob_sha}".encode()
    assert t.read_to_eof() == (len(answer), sha256(answer))
    assert time.monotonic() - start < 15


def test_tls_tunnel_64mib_backend_to_client(open_tls_tunnel, blob, blob_sha):
    def source(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        send_blob(sc.sock, blob)
        sc.sock.shutdown(socket.SHUT_WR)
        return sc.read_to_eof()

    start = time.monotonic()
    t = open_tls_tunnel(source)
    assert t.read_to_eof() == (BLOB_SIZE, blob_sha)
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result(30) == (0, sha256(b""))
    assert time.monotonic() - start < 15


def test_tls_tunnel_64mib_both_ways_at_once(open_tls_tunnel, background, blob, blob_sha):
    def both(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)

        def send():
            send_blob(sc.sock, blob)
            sc.sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            return sc.read_to_eof()
        finally:
            sender.join(30)

    start = time.monotonic()
    t = open_tls_tunnel(both)

    def client_send():
        send_blob(t.sock, blob)  # type: ignore[arg-type]
        t.sock.shutdown(socket.SHUT_WR)

    sender = background(client_send)
    assert t.read_to_eof() == (BLOB_SIZE, blob_sha)
    sender.join()
    assert t.backend.result(30) == (BLOB_SIZE, blob_sha)
    assert time.monotonic() - start < 15


def end_writing(stream: TlsStream, how: str) -> None:
    if how == "close_notify":
        stream.close_notify()  # the TCP connection stays open both ways
    elif how == "close_notify+fin":
        stream.shutdown(socket.SHUT_WR)
    else:
        assert how == "fin"
        stream.fin_only()  # no close_notify: a bare TCP EOF


HALF_CLOSES = ["close_notify", "close_notify+fin", "fin"]
# The peer that gets the proxy's end of stream and then goes on sending: one that reads a bare
# FIN as the end (OP_IGNORE_UNEXPECTED_EOF), or one with OpenSSL 3's default, for which only a
# close_notify is an end it can still send after (a bare FIN fails its connection).
PEERS = [pytest.param(False, id="tolerant-peers"), pytest.param(True, id="strict-peers")]
STREAMED = 8 * MiB
# How often the next two tests repeat their race (a new tunnel each time): a close_notify sent
# while the peer's data is in flight goes wrong only when a record is waiting right then.
ROUNDS = 3


@pytest.mark.parametrize("how", HALF_CLOSES)
@pytest.mark.parametrize("strict_peers", PEERS)
def test_tls_tunnel_half_close_from_client(open_tls_tunnel, how, strict_peers):
    """The client ends its direction (`how`); the backend sees the end of stream, then
    answers, and the client gets the whole answer."""
    answer = b"still talking after your EOF\n" * 5000

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        n, digest = sc.read_to_eof()
        sc.sock.sendall(answer)
        return n, digest

    t = open_tls_tunnel(script, strict_peers=strict_peers)
    t.sock.sendall(b"request data")
    end_writing(t.sock, how)
    assert t.backend.result() == (len(b"request data"), sha256(b"request data"))
    assert t.read_to_eof() == (len(answer), sha256(answer))


@pytest.mark.parametrize("how", HALF_CLOSES)
@pytest.mark.parametrize("strict_peers", PEERS)
def test_tls_tunnel_half_close_from_backend(open_tls_tunnel, how, strict_peers):
    """The backend ends its direction (`how`); the client sees the end of stream, then goes
    on sending, and the backend gets all of it."""
    said = b"all I have to say"
    late = b"client keeps sending after the backend's EOF\n" * 5000

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101 + said)
        end_writing(sc.sock, how)  # type: ignore[arg-type]
        return sc.read_to_eof()

    t = open_tls_tunnel(script, strict_peers=strict_peers)
    assert t.read_to_eof() == (len(said), sha256(said))
    t.sock.sendall(late)
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result() == (len(late), sha256(late))


TUNNEL_LEGS = [
    pytest.param(False, False, id="plain-client-plain-backend"),  # the reference
    pytest.param(True, True, id="tls-client-tls-backend"),
    pytest.param(True, False, id="tls-client-plain-backend"),
    pytest.param(False, True, id="plain-client-tls-backend"),
]


@pytest.mark.parametrize(("client_tls", "backend_tls"), TUNNEL_LEGS)
def test_backend_ends_while_client_streams(
    open_tls_tunnel, background, blob, client_tls, backend_tls
):
    """The backend says its last word and half-closes while the client is in the middle of
    sending 16 MiB: the client gets the word and the EOF, the backend still gets every byte."""
    data = blob[:STREAMED]

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        sc.recv_exact(MiB)  # the client is streaming now
        sc.sock.sendall(b"bye")
        sc.sock.shutdown(socket.SHUT_WR)  # close_notify + FIN on TLS
        n, digest = sc.read_to_eof()
        return n + MiB, digest

    t = open_tls_tunnel(script, client_tls=client_tls, backend_tls=backend_tls)
    for round_ in range(ROUNDS):
        if round_:
            t = t.again()
        tunnel = t

        def client_send(tunnel: TlsTunnel = tunnel) -> None:
            send_blob(tunnel.sock, data)
            tunnel.sock.shutdown(socket.SHUT_WR)

        sender = background(client_send)
        assert t.read_to_eof() == (3, sha256(b"bye"))
        sender.join()
        n, digest = t.backend.result(30)
        assert n == STREAMED, f"round {round_}: the backend got {n} of {STREAMED} bytes"
        assert digest == sha256(data[MiB:])


@pytest.mark.parametrize(("client_tls", "backend_tls"), TUNNEL_LEGS)
def test_client_ends_while_backend_streams(open_tls_tunnel, blob, client_tls, backend_tls):
    """The client says its last word and half-closes while the backend is in the middle of
    sending 16 MiB: the backend gets the word and the EOF, the client still gets every byte."""
    data = blob[:STREAMED]

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(sc.read_to_eof()), daemon=True)
        reader.start()
        try:
            send_blob(sc.sock, data)
            sc.sock.shutdown(socket.SHUT_WR)
        finally:
            reader.join(30)
        return got[0] if got else "the backend's reader did not finish"

    t = open_tls_tunnel(script, client_tls=client_tls, backend_tls=backend_tls)
    for round_ in range(ROUNDS):
        if round_:
            t = t.again()
        first = recv_exact(t.sock, MiB, t.buf)  # the backend is streaming now
        t.sock.sendall(b"bye")
        t.sock.shutdown(socket.SHUT_WR)  # close_notify + FIN on TLS
        n, digest = t.read_to_eof()
        assert n + MiB == STREAMED, f"round {round_}: the client got {n + MiB} of {STREAMED}"
        assert sha256(first) == sha256(data[:MiB])
        assert digest == sha256(data[MiB:])
        assert t.backend.result(30) == (3, sha256(b"bye"))


def test_an_answer_ended_by_close_notify_alone_is_complete(make_backend, start_proxy, pki):
    """A TLS backend ends an answer without a length by its close_notify and waits for ours
    before closing TCP (a bidirectional TLS shutdown, as CPython's unwrap() does): the client
    gets the whole answer, its end included, and the backend our close_notify. (When the
    alert came in the same read as the last bytes, the end waited inside the TLS object and
    nothing announced it: the client got the body without its last chunk.)"""
    body = b"until my close_notify\n" * 200

    def script(sc: ScriptedConn) -> str:
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        sc.sock.close_notify()  # type: ignore[attr-defined]  # and no FIN
        return tls_wait_closed(sc.sock, 20)[0]  # type: ignore[arg-type]

    backend = make_backend(ScriptedBackend, script, ssl_context=pki.server_context())
    url = f"https://localhost:{backend.port}"
    proxy = start_proxy(backend.port, "--backend-ca", str(pki.ca_file), backend=url)
    sock = connect(proxy.port, timeout=10)
    try:
        sock.sendall(simple_get("/until-close"))
        buf = bytearray()
        head = recv_until(sock, buf, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        try:
            chunks = recv_until(sock, buf, b"\r\n0\r\n\r\n")
        except TimeoutError:
            pytest.fail(f"no end of the answer in 10 s; {len(buf)} bytes of its body came")
    finally:
        sock.close()
    assert chunks.endswith(body + b"\r\n0\r\n\r\n")
    assert backend.result(25) == "close_notify"


# --- 3. verifying the backend's certificate -------------------------------------------------

VERIFY_FAILURES = {
    # id: (certificate the backend serves, host in --backend, what the log line must name)
    "untrusted-ca": ("untrusted", "localhost", r"local issuer|self[- ]?signed"),
    "wrong-name-by-name": ("other_name", "localhost", r"hostname|host name|mismatch"),
    "wrong-name-by-ip": ("other_name", "127.0.0.1", r"hostname|host name|mismatch|IP address"),
    "expired": ("expired", "localhost", r"expired"),
}


@pytest.mark.parametrize("case", list(VERIFY_FAILURES))
def test_backend_certificate_rejected(start_proxy, make_backend, client, pki, case):
    cert_name, host, reason = VERIFY_FAILURES[case]
    backend = make_backend(HttpBackend, ssl_context=pki.server_context(getattr(pki, cert_name)))
    proxy = start_proxy(
        backend.port,
        "--backend-ca",
        str(pki.ca_file),
        backend=f"https://{host}:{backend.port}",
    )
    mark = proxy.mark()
    resp = client(proxy.port, timeout=5).request(simple_get("/verify"))
    assert resp.status == 502, resp
    log_barrier(proxy, proxy.port)
    lines = proxy.logs_matching(r"certificate", mark)
    assert len(lines) == 1, "expected one line about the certificate:\n" + proxy.log_text(mark)
    assert re.search(reason, lines[0], re.IGNORECASE), lines[0]
    assert backend.heads == [], "a request reached a backend whose certificate failed"


@pytest.mark.parametrize(
    ("host", "says"), [("127.0.0.1", "no SNI is sent"), ("localhost", "sent as SNI")]
)
def test_startup_says_whether_sni_is_sent(start_proxy, make_backend, pki, host, says):
    """An IP address is never sent as SNI (RFC 6066): the start-up line must not claim it is."""
    backend = make_backend(HttpBackend, ssl_context=pki.server_context(pki.server))
    proxy = start_proxy(
        backend.port, "--backend-ca", str(pki.ca_file), backend=f"https://{host}:{backend.port}"
    )
    [line] = [ln for ln in startup_lines(proxy) if "certificate verified" in ln]
    assert says in line, line


def test_backend_tls_flags_that_do_nothing_are_warned_about(start_proxy, http_backend, pki):
    """--backend-ca for a plain backend, or beside --backend-insecure, changes nothing: the
    admin who wrote it expects verification, so start-up says it is ignored."""
    plain = start_proxy(http_backend.port, "--backend-ca", str(pki.ca_file))
    assert [ln for ln in startup_lines(plain) if "WARNING" in ln and "no backend uses TLS" in ln]
    # --backend-insecure for plain backends only: nothing to turn off either.
    plain_insecure = start_proxy(http_backend.port, "--backend-insecure")
    assert [
        ln
        for ln in startup_lines(plain_insecure)
        if "WARNING" in ln and "--backend-insecure given, but no backend uses TLS" in ln
    ], plain_insecure.log_text()
    insecure = start_proxy(
        http_backend.port,
        "--backend-insecure",
        "--backend-ca",
        str(pki.ca_file),
        backend=f"https://127.0.0.1:{http_backend.port}",
    )
    assert [ln for ln in startup_lines(insecure) if "--backend-ca is ignored" in ln]


@pytest.mark.parametrize("how", ["reset", "close"])
def test_backend_ending_the_tls_handshake_gets_502_at_once(start_proxy, client, how):
    """A TLS backend that resets (or closes) the connection during the handshake (a
    connection limit, a crashing process) is a failed connection: 502 at once, saying so,
    not after --connect-timeout with the blame on a slow backend; and it is not retried
    in a loop on the same address."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        listener.settimeout(2)
        with contextlib.suppress(OSError):
            while len(accepted) < 5:
                conn, _ = listener.accept()
                accepted.append(1)
                conn.recv(10)  # part of the ClientHello: closing now sends a reset
                if how == "close":
                    conn.recv(65536)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proxy = start_proxy(port, "--connect-timeout", "10", backend=f"https://127.0.0.1:{port}")
        mark = proxy.mark()
        started = time.monotonic()
        resp = client(proxy.port, timeout=15).request(simple_get("/hs"))
        assert resp.status == 502, resp
        assert time.monotonic() - started < 3
        assert len(accepted) == 1, f"{len(accepted)} connections to the backend"
        proxy.wait_for_log(r" 502 ", since=mark)  # the 502 may reach the client first
        [line] = proxy.logs_matching(r" 502 ", mark)
        assert "--connect-timeout" not in line
        assert re.search(r"reset|closed|EOF", line), line
    finally:
        listener.close()
        thread.join(5)


def test_backend_stalling_the_tls_handshake_is_not_blamed_on_tcp(start_proxy, client):
    """A backend that accepts TCP and never answers the ClientHello (a plain HTTP server
    waiting for a request, most often) used to be reported as not accepting the connection:
    the 502 now says the TLS handshake did not complete, within --connect-timeout still."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proxy = start_proxy(port, "--connect-timeout", "1", backend=f"https://127.0.0.1:{port}")
    try:
        mark = proxy.mark()
        started = time.monotonic()
        resp = client(proxy.port, timeout=5).request(simple_get("/stalled"))
        elapsed = time.monotonic() - started
        conn, _ = listener.accept()  # it was in the backlog all along: accepted by the kernel
        conn.close()
        assert resp.status == 502, resp
        assert 0.8 <= elapsed <= 3, f"502 after {elapsed:.2f} s with --connect-timeout 1"
        proxy.wait_for_log(
            r"TLS handshake within 1s", since=mark
        )  # the 502 may reach the client first
        [line] = proxy.logs_matching(r"TLS handshake within 1s", mark)
        assert "accepted the TCP connection" in line, line
        assert "did not complete the TLS handshake within 1s (--connect-timeout)" in line, line
        assert "did not accept the connection" not in line, line
    finally:
        listener.close()


def test_plain_http_backend_behind_https_is_named(start_proxy, client):
    """--backend https:// to a plain HTTP server: it answers the ClientHello with its own
    400, and OpenSSL calls that a "wrong version number". The 502's log line says what
    happened instead."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proxy = start_proxy(port, backend=f"https://127.0.0.1:{port}")
        mark = proxy.mark()
        resp = client(proxy.port, timeout=5).request(simple_get("/plain-backend"))
        assert resp.status == 502, resp
        proxy.wait_for_log(r" 502 ", since=mark)
        [line] = proxy.logs_matching(r" 502 ", mark)
        assert "answered in plain HTTP (should it be http://, not https://?)" in line, line
        assert "wrong version" not in line, line
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("case", list(VERIFY_FAILURES))
def test_backend_insecure_accepts_any_certificate(start_proxy, make_backend, client, pki, case):
    cert_name, host, _ = VERIFY_FAILURES[case]
    backend = make_backend(HttpBackend, ssl_context=pki.server_context(getattr(pki, cert_name)))
    proxy = start_proxy(
        backend.port, "--backend-insecure", backend=f"https://{host}:{backend.port}"
    )
    warnings = [
        ln
        for ln in startup_lines(proxy)
        if "WARNING" in ln and re.search(r"insecure|verif", ln, re.IGNORECASE)
    ]
    assert warnings, "no start-up WARNING about --backend-insecure:\n" + proxy.log_text()
    resp = client(proxy.port).request(simple_get("/insecure"))
    assert (resp.status, resp.body) == (200, b"GET /insecure")


def test_backend_sni_names_the_certificate_for_an_ip_backend(
    start_proxy, make_backend, client, pki
):
    backend = make_backend(HttpBackend, ssl_context=pki.server_context(pki.app))
    url = f"https://127.0.0.1:{backend.port}"
    ca = ("--backend-ca", str(pki.ca_file))
    with_sni = start_proxy(backend.port, *ca, "--backend-sni", "app.test", backend=url)
    resp = client(with_sni.port).request(simple_get("/sni"))
    assert (resp.status, resp.body) == (200, b"GET /sni")
    assert backend.sni_names == ["app.test"]

    without = start_proxy(backend.port, *ca, backend=url)  # 127.0.0.1 is not app.test
    assert client(without.port, timeout=5).request(simple_get("/no-sni")).status == 502


def test_backend_sni_with_a_trailing_dot(start_proxy, make_backend, client, pki):
    """--backend-sni localhost. (a fully qualified name) is sent and verified as localhost:
    RFC 6066 forbids the dot in SNI, and no certificate names `localhost.`."""
    backend = make_backend(HttpBackend, ssl_context=pki.server_context(pki.server))
    url = f"https://127.0.0.1:{backend.port}"
    ca = ("--backend-ca", str(pki.ca_file))
    proxy = start_proxy(backend.port, *ca, "--backend-sni", "localhost.", backend=url)
    [line] = [ln for ln in startup_lines(proxy) if "certificate verified" in ln]
    assert "for the name 'localhost' (sent as SNI)" in line, line
    resp = client(proxy.port, timeout=5).request(simple_get("/fqdn"))
    assert (resp.status, resp.body) == (200, b"GET /fqdn")
    assert backend.sni_names == ["localhost"]


# --- 4. mutual TLS --------------------------------------------------------------------------


def test_backend_requiring_client_certificate(start_proxy, make_backend, client, pki):
    backend = make_backend(HttpBackend, ssl_context=pki.server_context(require_client_cert=True))
    url = f"https://localhost:{backend.port}"
    ca = ("--backend-ca", str(pki.ca_file))

    anonymous = start_proxy(backend.port, *ca, backend=url)
    assert client(anonymous.port, timeout=5).request(simple_get("/anonymous")).status == 502
    assert backend.heads == []

    mtls = start_proxy(
        backend.port,
        *ca,
        "--backend-cert",
        str(pki.client.cert),
        "--backend-key",
        str(pki.client.key),
        backend=url,
    )
    resp = client(mtls.port).request(simple_get("/mtls"))
    assert (resp.status, resp.body) == (200, b"GET /mtls")
    assert [seen.peer_cert for seen in backend.tls_seen] == [pki.client.der]


# --- 5. the client side -------------------------------------------------------------------


@pytest.fixture
def tls_proxy(start_proxy, http_backend, pki) -> Callable[..., ProxyProcess]:
    """`tls_proxy(*flags)`: a proxy with TLS for clients (certificate `server`) in front of
    the plain HTTP backend."""

    def start(*flags: str) -> ProxyProcess:
        return start_proxy(http_backend.port, *cert_flags(pki.server), *flags)

    return start


def test_plain_http_to_tls_port_is_closed_promptly(tls_proxy, client, sockets, pki):
    proxy = tls_proxy("--header-timeout", "5")
    mark = proxy.mark()
    raw = connect(proxy.port, timeout=5)
    sockets.append(raw)
    start = time.monotonic()
    raw.sendall(simple_get("/plaintext"))
    wait_closed(raw, timeout=4)
    elapsed = time.monotonic() - start
    assert elapsed < 2, f"plain HTTP on the TLS port closed after {elapsed:.2f} s (timeout 5)"

    c = client(proxy.port, ssl_context=pki.client_context())
    resp = c.request(simple_get("/after-plaintext"))
    assert (resp.status, resp.body) == (200, b"GET /after-plaintext")
    proxy.wait_for_log(re.escape("/after-plaintext"), since=mark)  # everything before is in
    lines = lines_since(proxy, mark, "/after-plaintext")
    assert len(lines) == 1, "expected one line about the plain-HTTP client:\n" + "\n".join(lines)


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/"),
        ("DELETE", "/item/1"),
        ("OPTIONS", "*"),
        ("PATCH", "/item/1"),
        ("PROPFIND", "/dav/"),
        ("CONNECT", "localhost:443"),
        ("M-SEARCH", "*"),
    ],
)
def test_plain_http_to_tls_port_gets_400_whatever_the_method(
    tls_proxy, client, sockets, pki, method, target
):
    """OpenSSL recognises plain HTTP only for GET, POST, HEAD and PUT; the others used to get
    a bare reset. nginx answers every one with its 400, looking at the first bytes."""
    proxy = tls_proxy("--header-timeout", "5")
    mark = proxy.mark()
    raw = connect(proxy.port, timeout=5)
    sockets.append(raw)
    raw.sendall(request_bytes(method, target, [("Host", "localhost"), ("Content-Length", "0")]))
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := raw.recv(4096):
            got += chunk
    assert got.startswith(b"HTTP/1.1 400 "), got
    assert b"plain HTTP was sent to a TLS port" in got, got
    proxy.wait_for_log(r"TLS handshake failed: the client spoke plain HTTP", since=mark)
    c = client(proxy.port, ssl_context=pki.client_context())
    assert c.request(simple_get("/after")).status == 200


def test_plain_http_to_tls_port_answer_is_not_cut_by_a_reset(tls_proxy, sockets):
    """An upload sent in plain HTTP to the TLS port: closing with its bytes unread sent a
    reset right behind the 400 (on a real network it can destroy the answer before the
    client reads it; here the client's next read failed). Now the connection ends as after
    any answer of ours: a FIN, and the rest of the upload read and dropped."""
    proxy = tls_proxy("--header-timeout", "5")
    raw = connect(proxy.port, timeout=5)
    sockets.append(raw)
    body = b"x" * (4 << 20)
    head = request_bytes(
        "POST", "/upload", [("Host", "localhost"), ("Content-Length", str(len(body)))]
    )
    raw.sendall(head + body)  # a reset fails this, or the reads below
    got = b""
    while chunk := raw.recv(65536):
        got += chunk
    assert got.startswith(b"HTTP/1.1 400 "), got
    assert b"plain HTTP was sent to a TLS port" in got, got


def test_a_client_that_does_not_trust_our_certificate_is_told_apart(tls_proxy, pki):
    """A client without our CA ends the handshake with an 'unknown ca' alert; the log line
    said only OpenSSL's "tlsv1 alert unknown ca". It now says what that most often means (a
    CA the client lacks, or a --cert file without its intermediates)."""
    proxy = tls_proxy()
    mark = proxy.mark()
    stranger = ssl.create_default_context()  # the system's CAs: not the test CA
    with (
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        stranger.wrap_socket(raw, server_hostname="localhost")
    line = proxy.wait_for_log(r"TLS handshake failed", since=mark)
    assert "tlsv1 alert unknown ca (the client does not trust our certificate" in line, line
    assert "intermediate certificates" in line, line


@pytest.mark.parametrize(
    ("sends", "closed_by", "lines_logged"),
    [("nothing", "eof", 0), ("half-a-client-hello", "reset", 1)],
)
def test_stalled_handshake_closed_after_header_timeout(
    tls_proxy, client, sockets, pki, sends, closed_by, lines_logged
):
    """At --header-timeout a handshake begun and stalled is reset, with one log line; a
    connection that sent nothing at all (a port check, a spare connection) gets a FIN and no
    line at info, as on a plain listener."""
    proxy = tls_proxy("--header-timeout", "1")
    ctx = pki.client_context()
    mark = proxy.mark()
    raw = connect(proxy.port, timeout=5)
    sockets.append(raw)
    start = time.monotonic()
    if sends == "half-a-client-hello":
        hello = client_hello(ctx)
        raw.sendall(hello[: len(hello) // 2])

    other = client(proxy.port, ssl_context=ctx, timeout=5)
    resp = other.request(simple_get("/meanwhile"))
    assert (resp.status, resp.body) == (200, b"GET /meanwhile")
    served = time.monotonic() - start
    assert served < 0.8, f"another client was served only after {served:.2f} s"

    assert wait_closed(raw, timeout=4) == (closed_by, b"")
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed <= 3, f"stalled handshake closed after {elapsed:.2f} s (timeout 1)"

    after = client(proxy.port, ssl_context=ctx, timeout=5)
    assert after.request(simple_get("/after-stall")).status == 200
    proxy.wait_for_log(re.escape("/after-stall"), since=mark)
    lines = lines_since(proxy, mark, "/meanwhile", "/after-stall")
    assert len(lines) == lines_logged, "lines about the stalled client:\n" + "\n".join(lines)


def test_at_max_connections_spare_tls_connections_make_room(tls_proxy, client, sockets, pki):
    """A connection to the TLS port that sent nothing, or finished its handshake and sent no
    request (a browser's preconnect), makes room for a new client at --max-connections, the
    one waiting longest first; one in the middle of its handshake is busy and stays."""
    proxy = tls_proxy("--max-connections", "3", "--header-timeout", "30")
    ctx = pki.client_context()
    half = connect(proxy.port, timeout=5)
    sockets.append(half)
    hello = client_hello(ctx)
    half.sendall(hello[: len(hello) // 2])
    time.sleep(0.1)
    tcp_spare = connect(proxy.port, timeout=5)
    sockets.append(tcp_spare)
    time.sleep(0.1)
    tls_spare = client(proxy.port, ssl_context=ctx, timeout=5)
    time.sleep(0.1)
    started = time.monotonic()
    first = client(proxy.port, ssl_context=ctx, timeout=5)
    assert first.request(simple_get("/first")).body == b"GET /first"
    assert wait_closed(tcp_spare, timeout=2)[1] == b""
    second = client(proxy.port, ssl_context=ctx, timeout=5)
    assert second.request(simple_get("/second")).body == b"GET /second"
    assert tls_wait_closed(tls_spare.sock, timeout=2)[1] == b""
    assert time.monotonic() - started < 4, "new clients waited for a header timeout"
    readable, _, _ = select.select([half], [], [], 0.2)
    assert not readable, "a handshake under way was closed to make room"
    # The kept-alive clients were not touched.
    assert first.request(simple_get("/first/2")).status == 200


def test_alpn_selects_http11(tls_proxy, client, pki):
    proxy = tls_proxy()
    c = client(proxy.port, ssl_context=pki.client_context(alpn=["h2", "http/1.1"]))
    assert c.sock.selected_alpn() == "http/1.1"
    resp = c.request(simple_get("/alpn"))
    assert (resp.status, resp.body) == (200, b"GET /alpn")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_refused_and_1_2_accepted(tls_proxy, client, pki):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        hello = client_hello(old, server_hostname=None)
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"the local OpenSSL cannot make a TLS 1.1 client: {exc}")
    if not hello:
        pytest.skip("the local OpenSSL made no TLS 1.1 ClientHello")

    proxy = tls_proxy()
    refused = None
    try:
        TlsStream.connect(proxy.port, old, server_hostname=None, timeout=5).close()
    except (ssl.SSLError, ConnectionError) as exc:
        refused = exc
    assert refused is not None, "a TLS 1.1 handshake succeeded"

    tls12 = pki.client_context()
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    c = client(proxy.port, ssl_context=tls12)
    assert c.sock.version() == "TLSv1.2"
    assert c.request(simple_get("/tls12")).status == 200


# A TLS 1.3 client that asks for AES-128-GCM first, as Chrome and Firefox do. Python cannot
# order TLS 1.3 suites itself; OpenSSL's configuration file can, for the process it starts.
_BROWSER_ORDER_CNF = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = {suites}
"""
_PRINT_CIPHER = """
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        print(tls.version(), tls.cipher()[0])
"""


@pytest.mark.parametrize(
    "suites",
    [
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256",
    ],
)
def test_the_client_chooses_the_tls13_suite(tls_proxy, pki, tmp_path, suites):
    """Every TLS 1.3 suite is strong: the client's first choice wins (a browser's AES-128-GCM,
    a phone's ChaCha20), not OpenSSL's server order, which starts with AES-256-GCM."""
    proxy = tls_proxy()
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text(_BROWSER_ORDER_CNF.format(suites=suites))
    env = {**os.environ, "OPENSSL_CONF": str(cnf)}
    done = subprocess.run(
        [sys.executable, "-c", _PRINT_CIPHER, str(proxy.port), str(pki.ca_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert done.stdout.split() == ["TLSv1.3", suites.split(":")[0]]


def test_the_client_chooses_among_aead_suites_only_with_tls12(tls_proxy, client, pki):
    proxy = tls_proxy()
    for first in ("CHACHA20-POLY1305", "AES128-GCM-SHA256"):
        ctx = pki.client_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(
            ":".join(
                f"ECDHE-{auth}-{suite}"
                for suite in (first, "AES256-GCM-SHA384")
                for auth in ("ECDSA", "RSA")
            )
        )
        c = client(proxy.port, ssl_context=ctx)
        assert c.sock.obj.cipher()[0].endswith(first)
        assert c.request(simple_get("/tls12")).status == 200
    cbc = pki.client_context()
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256")  # CBC, no AEAD
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TlsStream.connect(proxy.port, cbc, server_hostname="localhost", timeout=5).close()


def test_sni_chooses_the_certificate(start_proxy, http_backend, sockets, pki):
    proxy = start_proxy(http_backend.port, *cert_flags(pki.a, pki.b, pki.wild))
    ctx = pki.client_context(check_hostname=False)  # the chain is verified; names compared here
    expected = {
        "b.test": pki.b,
        "x.wild.test": pki.wild,
        "a.test": pki.a,
        "unknown.test": pki.a,  # the first pair is the default
        None: pki.a,  # no SNI at all
    }
    for name, cert in expected.items():
        stream = TlsStream.connect(proxy.port, ctx, server_hostname=name, timeout=5)
        sockets.append(stream)  # type: ignore[arg-type]
        assert stream.peer_cert_der() == cert.der, f"SNI {name!r} did not get {cert.name}"
    b_client = HttpClient(proxy.port, 5, pki.client_context(), server_hostname="b.test")
    sockets.append(b_client.sock)
    resp = b_client.request(simple_get("/b", "b.test"))
    assert (resp.status, resp.body) == (200, b"GET /b")


@pytest.mark.parametrize("exact_first", [False, True], ids=["wildcard-first", "exact-first"])
def test_sni_prefers_an_exact_name_to_a_wildcard(
    start_proxy, http_backend, sockets, pki, exact_first
):
    """--cert *.wild.test and --cert pay.wild.test: SNI pay.wild.test gets its own
    certificate whatever the order (nginx and HAProxy do the same); the wildcard's used to
    win when it came first, and the dedicated certificate was never served."""
    named = [pki.pay_wild, pki.wild] if exact_first else [pki.wild, pki.pay_wild]
    proxy = start_proxy(http_backend.port, *cert_flags(pki.a, *named))
    ctx = pki.client_context()
    for name, cert in {"pay.wild.test": pki.pay_wild, "www.wild.test": pki.wild}.items():
        stream = TlsStream.connect(proxy.port, ctx, server_hostname=name, timeout=5)
        sockets.append(stream)  # type: ignore[arg-type]
        assert stream.peer_cert_der() == cert.der, f"SNI {name!r} did not get {cert.name}"


def test_certificate_file_with_chain(start_proxy, http_backend, client, pki):
    """The clients trust only the root; the proxy's certificate comes from an intermediate CA
    that is in the --cert file after the leaf."""
    proxy = start_proxy(http_backend.port, *cert_flags(pki.chained))
    c = client(proxy.port, ssl_context=pki.client_context())
    assert c.sock.peer_cert_der() == pki.chained.der
    assert c.request(simple_get("/chained")).status == 200


# --- 6. plain and TLS listeners in one process -------------------------------------------------


def test_mixed_plain_and_tls_listeners(start_proxy, http_backend, client, pki):
    proxy = start_proxy(
        http_backend.port,
        *cert_flags(pki.server),
        listen=["tcp://127.0.0.1:0", "tls://127.0.0.1:0"],
    )
    assert len(proxy.ports) == 2, startup_lines(proxy)
    plain_port, tls_port = proxy.ports
    assert "(plain)" in listening_line(proxy, plain_port)
    assert "(tls)" in listening_line(proxy, tls_port)

    assert client(plain_port).request(simple_get("/plain")).status == 200
    c = client(tls_port, ssl_context=pki.client_context())
    assert c.request(simple_get("/tls")).status == 200
    plain_req, tls_req = http_backend.wait_for_requests(2)
    assert forwarded_proto(plain_req.headers) == [b"http"]
    assert forwarded_proto(tls_req.headers) == [b"https"]


def test_bare_listen_is_plain_without_cert(start_proxy, http_backend):
    proxy = start_proxy(http_backend.port)
    assert "(plain)" in listening_line(proxy, proxy.port)


# --- 7. SIGHUP reloads the certificate -----------------------------------------------------


def test_sighup_reloads_certificate(start_proxy, ws_backend, client, pki, tmp_path: Path):
    cert_file, key_file = tmp_path / "live.pem", tmp_path / "live.key"
    cert_file.write_bytes(pki.server.cert.read_bytes())
    key_file.write_bytes(pki.server.key.read_bytes())
    proxy = start_proxy(ws_backend.port, "--cert", str(cert_file), "--key", str(key_file))
    ctx = pki.client_context()

    def new_connection_cert() -> bytes | None:
        c = client(proxy.port, ssl_context=ctx, timeout=5)
        der = c.sock.peer_cert_der()
        ws = open_websocket(c)
        assert_echoes(ws, big=False)
        assert_closes_cleanly(ws)
        return der

    old = client(proxy.port, ssl_context=ctx)
    assert old.sock.peer_cert_der() == pki.server.der
    tunnel = open_websocket(old)
    tunnel.send("before reload")
    assert tunnel.recv() == "before reload"

    # a good new certificate
    cert_file.write_bytes(pki.server_b.cert.read_bytes())
    key_file.write_bytes(pki.server_b.key.read_bytes())
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded", since=mark)
    assert new_connection_cert() == pki.server_b.der
    tunnel.send(b"after reload" * 1000)
    assert tunnel.recv() == b"after reload" * 1000

    # a broken certificate file: the current certificate stays
    cert_file.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_log(r"keeping", since=mark)
    assert new_connection_cert() == pki.server_b.der

    # a good certificate with a key that is not its own: kept as well
    cert_file.write_bytes(pki.server.cert.read_bytes())  # key_file still holds server_b's key
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_log(r"keeping", since=mark)
    assert new_connection_cert() == pki.server_b.der

    tunnel.send("old tunnel still up")
    assert tunnel.recv() == "old tunnel still up"
    assert_closes_cleanly(tunnel)
    assert proxy.proc.poll() is None


# --- 7b. encrypted keys: refused, never a passphrase prompt -----------------------------------

# Runs its arguments in a new session whose controlling terminal is the tty named first, as
# an interactive shell (or tmux) gives one: where OpenSSL, left to itself, would ask for a
# key's passphrase and wait for an answer.
_ON_A_TERMINAL = """
import os, sys
os.setsid()
os.close(os.open(sys.argv[1], os.O_RDWR))  # a session leader's first tty becomes its own
os.execv(sys.argv[2], sys.argv[2:])
"""


@contextlib.contextmanager
def a_terminal():
    """(launcher, read_terminal): a launcher for a process whose controlling terminal is a
    new pty, and a function returning what was written to that terminal so far. The pty's
    master stays open until the block ends: stop the proxy inside the block (a hang-up would
    send it SIGHUP)."""
    master, slave = os.openpty()
    os.set_blocking(master, False)

    def read_terminal() -> bytes:
        got = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(master, 4096):
                got += chunk
        return got

    try:
        yield [sys.executable, "-c", _ON_A_TERMINAL, os.ttyname(slave)], read_terminal
    finally:
        os.close(slave)
        os.close(master)


@pytest.mark.parametrize("which", ["--key", "--backend-key"])
def test_encrypted_key_is_a_start_up_error_not_a_prompt(http_backend, pki, tmp_path, which):
    """Without a password callback OpenSSL asks for the passphrase on the terminal (and
    without one says only "Invalid argument"): the proxy must exit at once, saying the key
    is encrypted and how to make an unencrypted one."""
    encrypted = pki.client.write_encrypted_key(tmp_path / "encrypted.key")
    if which == "--key":
        flags = ["--cert", str(pki.client.cert), "--key", str(encrypted)]
    else:
        flags = [*cert_flags(pki.server), "--backend-cert", str(pki.client.cert)]
        flags += ["--backend-key", str(encrypted)]
    args = ["--listen", "tls://127.0.0.1:0", "--backend", f"https://127.0.0.1:{http_backend.port}"]
    with a_terminal() as (launcher, read_terminal):
        try:
            done = subprocess.run(
                [*launcher, sys.executable, "-m", "rawproxy", *args, *flags],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent.parent,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after 10 s; the terminal shows {read_terminal()!r}")
        prompt = read_terminal()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert f"{which} {encrypted} is encrypted with a passphrase" in lines[0], lines[0]
    assert f"openssl pkey -in {encrypted} -out {encrypted}.plain" in lines[0], lines[0]
    assert b"pass phrase" not in prompt.lower(), prompt


def test_sighup_with_an_encrypted_key_keeps_serving(run_proxy, http_backend, pki, tmp_path):
    """A key replaced by an encrypted one, then SIGHUP, the proxy on a terminal: OpenSSL's
    passphrase prompt used to block the event loop (no connection served, ever). Now the
    reload fails at once, is logged, and the current certificate stays."""
    cert_file, key_file = tmp_path / "live.pem", tmp_path / "live.key"
    cert_file.write_bytes(pki.server.cert.read_bytes())
    key_file.write_bytes(pki.server.key.read_bytes())
    args = ["--listen", "tls://127.0.0.1:0", "--backend", f"127.0.0.1:{http_backend.port}"]
    args += ["--cert", str(cert_file), "--key", str(key_file)]
    ctx = pki.client_context()
    with a_terminal() as (launcher, read_terminal):
        proxy = run_proxy(*args, launcher=launcher)
        try:
            with HttpClient(proxy.port, 5, ctx) as c:
                assert c.request(simple_get("/before")).status == 200

            pki.server.write_encrypted_key(key_file)
            mark = proxy.mark()
            proxy.proc.send_signal(signal.SIGHUP)
            [line] = proxy.wait_for_logs(r"SIGHUP: keeping", 1, since=mark, timeout=2)
            assert f"--key {key_file} is encrypted with a passphrase" in line, line
            started = time.monotonic()
            with HttpClient(proxy.port, 5, ctx) as c:
                assert c.sock.peer_cert_der() == pki.server.der
                assert c.request(simple_get("/after")).status == 200
            assert time.monotonic() - started < 1
            assert b"pass phrase" not in read_terminal().lower()
        finally:
            proxy.stop()


# What is in the cert and key files (or --backend-ca) -> the start-up line names the file at
# fault and says what is wrong with it; OpenSSL's own "[SSL] PEM lib (_ssl.c:3905)" or
# "KEY_VALUES_MISMATCH" named neither.
BAD_PEM_FILES = {
    "cert-not-pem": ("garbage", "server.key", "--cert {cert} holds no PEM certificate"),
    "key-not-pem": ("server.pem", "garbage", "--key {key} holds no PEM private key"),
    "cert-is-der": ("server.der", "server.key", "--cert {cert} is in DER (binary) form"),
    "swapped": ("server.key", "server.pem", "--cert {cert} holds a private key and --key {key}"),
    "not-its-key": ("server.pem", "other.key", "--key {key} is not the private key of --cert"),
    "backend-pair-swapped": (
        "server.key",
        "server.pem",
        "--backend-cert {cert} holds a private key and --backend-key {key}",
    ),
    "backend-ca-not-pem": ("garbage", None, "--backend-ca {cert} holds no PEM CA certificate"),
}


@pytest.mark.parametrize("case", list(BAD_PEM_FILES))
def test_a_bad_certificate_or_key_file_is_named(pki, tmp_path, case):
    cert_name, key_name, says = BAD_PEM_FILES[case]
    contents = {
        "garbage": b"this is not a certificate\n",
        "server.pem": pki.server.cert.read_bytes(),
        "server.key": pki.server.key.read_bytes(),
        "server.der": pki.server.der,
        "other.key": pki.server_b.key.read_bytes(),
    }
    cert = tmp_path / f"a-{cert_name}"
    cert.write_bytes(contents[cert_name])
    args = ["--listen", "127.0.0.1:0", "--backend", "https://127.0.0.1:9"]
    if case == "backend-ca-not-pem":
        args += ["--backend-ca", str(cert)]
        key = tmp_path / "unused"
    else:
        key = tmp_path / f"b-{key_name}"
        key.write_bytes(contents[str(key_name)])
        flags = ("--backend-cert", "--backend-key") if case.startswith("backend") else ()
        cert_flag, key_flag = flags or ("--cert", "--key")
        args += [cert_flag, str(cert), key_flag, str(key)]
    done = run_rawproxy(*args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert says.format(cert=cert, key=key) in lines[0], lines[0]


# --- 8. two proxies chained over TLS -------------------------------------------------------


def chain(start_proxy, pki: Pki, backend_port: int) -> ProxyProcess:
    """client -TLS-> proxy1 -TLS-> proxy2 -plain-> backend; returns proxy1."""
    second = start_proxy(backend_port, *cert_flags(pki.server))
    return start_proxy(
        second.port,
        *cert_flags(pki.server),
        "--backend-ca",
        str(pki.ca_file),
        backend=f"https://localhost:{second.port}",
    )


def test_two_proxies_chained_websocket(start_proxy, ws_backend, client, pki):
    first = chain(start_proxy, pki, ws_backend.port)
    c = client(first.port, ssl_context=pki.client_context())
    ws = open_websocket(c)
    assert_echoes(ws)
    assert_closes_cleanly(ws)
    [head] = ws_backend.wait_handshakes(1)
    _, headers = parse_head(head)
    assert set(forwarded_proto(headers)) == {b"https"}, head


def test_two_proxies_chained_http(start_proxy, http_backend, client, pki):
    first = chain(start_proxy, pki, http_backend.port)
    c = client(first.port, ssl_context=pki.client_context())
    resp = c.request(simple_get("/chained-get", "app.test"))
    assert (resp.status, resp.body) == (200, b"GET /chained-get")
    body = os.urandom(256 * 1024)
    resp = c.request(
        request_bytes(
            "POST", "/echo", [("Host", "app.test"), ("Content-Length", str(len(body)))], body
        ),
        "POST",
    )
    assert resp.status == 200
    assert resp.body == body
    for req in http_backend.wait_for_requests(2):
        assert set(forwarded_proto(req.headers)) == {b"https"}, req.headers
        assert req.values("host") == [b"app.test"]


# --- TLS session resumption toward the backend -----------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("kind", ["tunnel", "request"])
def test_backend_tls_sessions_are_resumed(route, make_backend, client, pki, kind, version):
    """Each new backend connection offers the session of the last one (as HAProxy and nginx
    do), for tunnels too: their backend connection is never dropped by the session, so the
    session (with its TLS 1.3 ticket, which arrives after the handshake) is kept when the
    tunnel starts."""
    reused: list[bool] = []

    def script(conn: ScriptedConn) -> None:
        assert isinstance(conn.sock, TlsStream)
        reused.append(conn.sock.obj.session_reused)
        if kind == "tunnel":
            conn.sock.sendall(RESPONSE_101)
        else:
            conn.sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )
        conn.read_to_eof()

    context = pki.server_context()
    context.maximum_version = version
    backend = make_backend(ScriptedBackend, script, ssl_context=context)
    r = route(backend, False, True, "https")
    for _ in range(3):
        with r.client(client) as c:
            if kind == "tunnel":
                c.sock.sendall(tunnel_request())
                assert recv_until(c.sock, bytearray(), b"\r\n\r\n").startswith(b"HTTP/1.1 101")
            else:
                assert c.request(simple_get("/", "app.test")).body == b"ok"
        backend.result()
    assert reused == [False, True, True]


def test_a_tcp_health_check_on_a_tls_port_is_no_failed_handshake(tls_proxy, client, pki):
    """A balancer's TCP check connects and closes without a byte: it was logged (INFO) and
    counted as a failed TLS handshake, a line for every check. Now it is a debug line; a
    client that sends something and fails is still reported."""
    proxy = tls_proxy()
    mark = proxy.mark()
    for _ in range(3):
        connect(proxy.port, timeout=5).close()
    garbage = connect(proxy.port, timeout=5)
    garbage.sendall(b"\x16\x03\x01\x00\x05hello")
    wait_closed(garbage, timeout=5)
    garbage.close()
    c = client(proxy.port, ssl_context=pki.client_context())
    assert c.request(simple_get("/after")).status == 200
    failures = proxy.logs_matching(r"TLS handshake failed", since=mark)
    assert len(failures) == 1, failures
