"""The TLS edges a production proxy meets: renegotiation (refused on both legs, at once and
without spinning), TLS 1.3 KeyUpdate from either side of a tunnel, a client's close_notify
without a FIN before its answer is out, unusual ClientHellos (a byte at a time, larger than a
record), session resumption, close_notify or a bad record in the middle of a request body,
close_notify while a large answer streams, a backend's close_notify on a kept-alive
connection, and flat memory with a slow TLS reader on either side.

TLS 1.3 KeyUpdate and TLS 1.2 renegotiation have no API in the ssl module: they are reached
through libssl itself (ctypes, `ssl_pointer`), the same library the ssl module uses; the tests
that need it skip where that cannot be confirmed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import re
import socket
import ssl
import threading
import time
from typing import Any

import pytest
from peers import (
    RESPONSE_101,
    HttpBackend,
    ProxyProcess,
    ScriptedBackend,
    ScriptedConn,
    connect,
    pattern_bytes,
    recv_exact,
    recv_until,
    request_bytes,
    send_blob,
    sha256,
    simple_get,
    tunnel_request,
)
from tls_peers import Pki, TlsStream, cert_flags, client_hello, tls_wait_closed

MiB = 1024 * 1024
KiB = 1024


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


# --- libssl through ctypes: KeyUpdate and renegotiation ----------------------------------------


def _load_libssl() -> Any:
    """The libssl the ssl module is linked with (found in this process's memory map)."""
    import _ssl  # noqa: F401  (loads libssl into the process)

    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libssl" in line.split()[-1]}
    for path in sorted(paths):
        with contextlib.suppress(OSError):
            return ctypes.CDLL(path)
    name = ctypes.util.find_library("ssl")
    return ctypes.CDLL(name) if name else None


_libssl = _load_libssl()
if _libssl is not None:
    for _name in ("SSL_renegotiate", "SSL_renegotiate_pending", "SSL_version"):
        getattr(_libssl, _name).argtypes = [ctypes.c_void_p]
    _libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]

SSL_KEY_UPDATE_REQUESTED = 1
_WIRE_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def ssl_pointer(obj: ssl.SSLObject) -> int:
    """The `SSL *` of a handshaken SSLObject (CPython's PySSLSocket holds it right after its
    socket weakref); skips the test when that cannot be confirmed."""
    if _libssl is None:
        pytest.skip("libssl not found")
    inner = obj._sslobj  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(id(inner) + 3 * ctypes.sizeof(ctypes.c_void_p)).value
    if not pointer or _libssl.SSL_version(pointer) != _WIRE_VERSIONS.get(obj.version() or ""):
        pytest.skip("cannot reach the SSL object through ctypes on this Python")
    return pointer


def key_update(stream: TlsStream) -> None:
    """Send a TLS 1.3 KeyUpdate asking the peer to update its keys too."""
    pointer = ssl_pointer(stream.obj)
    with stream._ssl_lock:
        assert _libssl.SSL_key_update(pointer, SSL_KEY_UPDATE_REQUESTED) == 1
        stream.obj.do_handshake()  # writes the KeyUpdate
    stream._flush()


def start_renegotiation(stream: TlsStream) -> int:
    """Begin a TLS 1.2 renegotiation on `stream` and send its first message (a server's
    HelloRequest, a client's ClientHello); the SSL pointer, to follow it with."""
    pointer = ssl_pointer(stream.obj)
    with stream._ssl_lock:
        assert _libssl.SSL_renegotiate(pointer) == 1
        with contextlib.suppress(ssl.SSLWantReadError):
            stream.obj.do_handshake()
    stream._flush()
    return pointer


def server_renegotiate(stream: TlsStream, timeout: float) -> None:
    """As a TLS 1.2 server, send a HelloRequest and run the renegotiation the client then
    starts (what Apache does for a location with its own SSLVerifyClient). Application data
    that comes meanwhile is kept for `recv`. Raises TimeoutError if it does not complete."""
    pointer = start_renegotiation(stream)  # as a server: a HelloRequest
    deadline = time.monotonic() + timeout
    try:
        while True:
            with stream._ssl_lock, contextlib.suppress(ssl.SSLWantReadError):
                stream._plain += stream.obj.read(65536)
            stream._flush()
            if not _libssl.SSL_renegotiate_pending(pointer):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the client did not renegotiate")
            stream.raw.settimeout(left)
            chunk = stream.raw.recv(65536)
            if not chunk:
                raise EOFError("EOF during the renegotiation")
            with stream._ssl_lock:
                stream._in.write(chunk)
    finally:
        stream.raw.settimeout(None)


def tls12_backend_context(pki: Pki) -> ssl.SSLContext:
    context = pki.server_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def renegotiating_backend(make_backend, pki: Pki, after) -> ScriptedBackend:
    """A TLS 1.2 backend that renegotiates right after the request head, then runs
    `after(sc)`; its result is `after`'s, or a string saying the renegotiation failed."""

    def script(sc: ScriptedConn) -> Any:
        try:
            server_renegotiate(sc.sock, timeout=6)  # type: ignore[arg-type]
        except (OSError, EOFError) as e:
            return f"renegotiation failed: {e!r}"
        return after(sc)

    return make_backend(ScriptedBackend, script, ssl_context=tls12_backend_context(pki))


def direct_request(port: int, pki: Pki, data: bytes, until: bytes) -> bytes:
    """`data` to a TLS backend straight, with the ssl module (an OpenSSL client, as curl)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pki.client_context().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(data)
        got = b""
        while until not in got:
            chunk = tls.recv(4096)
            assert chunk, got
            got += chunk
        return got


def tls_backend_proxy(start_proxy, backend, pki: Pki, *flags: str) -> ProxyProcess:
    """A proxy that speaks verified TLS to `backend` (certificate `localhost` of the test CA)."""
    return start_proxy(
        backend.port,
        *flags,
        "--backend-ca",
        str(pki.ca_file),
        backend=f"https://localhost:{backend.port}",
    )


def tls_client(proxy: ProxyProcess, pki: Pki, sockets: list) -> TlsStream:
    """A TLS connection to the proxy, closed with the test (the `sockets` fixture)."""
    stream = TlsStream.connect(proxy.port, pki.client_context(), timeout=10)
    sockets.append(stream)
    return stream


# --- renegotiation: refused on both legs, at once -------------------------------------------


def test_a_backend_tls12_renegotiation_does_not_stall_the_answer(
    make_backend, start_proxy, client, pki
):
    """A TLS 1.2 backend that renegotiates after the request head (Apache with
    `SSLVerifyClient require` in a <Location>, IIS client-certificate negotiation) is refused
    as HAProxy refuses it: the no_renegotiation alert goes at once (it was left in the memory
    BIO until --response-timeout), the backend gives up, and the client gets a prompt 502
    whose log line says why. (An OpenSSL client, checked first straight to the backend, would
    renegotiate: the backend is a real one.)"""

    def answer(sc: ScriptedConn) -> str:
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nrenegotiated")
        return "answered"

    backend = renegotiating_backend(make_backend, pki, answer)
    assert direct_request(backend.port, pki, simple_get("/client-cert"), b"renegotiated")
    assert backend.result(5) == "answered"

    proxy = tls_backend_proxy(start_proxy, backend, pki, "--response-timeout", "5")
    c = client(proxy.port, timeout=10)
    start = time.monotonic()
    resp = c.request(simple_get("/client-cert"))
    elapsed = time.monotonic() - start
    assert backend.result(10).startswith("renegotiation failed"), "the backend renegotiated"
    assert resp.status == 502
    assert elapsed < 2, f"502 after {elapsed:.1f} s"
    line = proxy.wait_for_log(r"/client-cert")
    assert "asked for a TLS renegotiation, which rawproxy refuses" in line, line


@pytest.mark.parametrize("where", ["tunnel", "request-body"])
def test_a_backend_renegotiation_does_not_make_the_proxy_spin(
    make_backend, start_proxy, sockets, pki, where
):
    """A backend's renegotiation in a tunnel or while a request body streams does not make
    the loop spin. Before, a renegotiation under way made SSLObject.write() raise
    SSLWantReadError, which the pumps took for "kernel full": they waited for writability of a
    writable socket, 1.5 s of CPU in 1.5 s."""

    def after(sc: ScriptedConn) -> bytes:
        return sc.recv_exact(10)

    if where == "tunnel":

        def script(sc: ScriptedConn) -> Any:
            sc.sock.sendall(RESPONSE_101 + b"hello")
            assert sc.recv_exact(4) == b"ping"
            try:
                server_renegotiate(sc.sock, timeout=4)  # type: ignore[arg-type]
            except (OSError, EOFError) as e:
                return f"renegotiation failed: {e!r}"
            return sc.recv_exact(10)

        backend = make_backend(ScriptedBackend, script, ssl_context=tls12_backend_context(pki))
    else:
        backend = renegotiating_backend(make_backend, pki, after)
    proxy = tls_backend_proxy(start_proxy, backend, pki, "--response-timeout", "8")
    sock = connect(proxy.port, timeout=10)
    sockets.append(sock)
    buf = bytearray()
    if where == "tunnel":
        sock.sendall(tunnel_request())
        recv_until(sock, buf, b"\r\n\r\n")
        assert recv_exact(sock, 5, buf) == b"hello"
        sock.sendall(b"ping")  # the backend renegotiates now
    else:
        sock.sendall(request_bytes("POST", "/upload", [("Host", "x"), ("Content-Length", "10")]))
    time.sleep(0.5)
    cpu_before = proxy.cpu_seconds()
    sock.sendall(b"0123456789")  # bytes for the backend, while its renegotiation is pending
    time.sleep(1.5)
    cpu = proxy.cpu_seconds() - cpu_before
    assert cpu < 0.4, (
        f"the proxy used {cpu:.2f} s of CPU in 1.5 s while a {where} waited for the "
        f"backend's renegotiation"
    )


def test_a_client_renegotiation_is_refused_at_once(start_proxy, http_backend, client, pki):
    """A client's TLS 1.2 renegotiation is refused (OP_NO_RENEGOTIATION, CVE-2011-1473) at
    once, as HAProxy does: the alert was left in the memory BIO until --idle-timeout."""
    proxy = start_proxy(http_backend.port, *cert_flags(pki.server), "--idle-timeout", "8")
    context = pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    c = client(proxy.port, ssl_context=context, timeout=8)
    assert c.request(simple_get("/before")).status == 200
    stream: TlsStream = c.sock
    pointer = start_renegotiation(stream)  # as a client: a ClientHello
    start = time.monotonic()
    stream.settimeout(3)
    try:
        got = stream.recv(4096)
        outcome = f"read {got!r}"  # b"": the proxy closed: a refusal too
    except TimeoutError:
        pytest.fail(
            "no answer to the client's renegotiation within 3 s (it waits for the idle timeout)"
        )
    except (ssl.SSLError, ConnectionError) as e:
        outcome = repr(e)  # the client's OpenSSL fails the renegotiation: refused
    assert time.monotonic() - start < 3, outcome
    assert not _libssl.SSL_renegotiate_pending(pointer) or "NO_RENEGOTIATION" in outcome
    other = client(proxy.port, ssl_context=pki.client_context(), timeout=5)
    assert other.request(simple_get("/other")).status == 200


# --- a client's close_notify without a FIN -----------------------------------------------


@pytest.mark.parametrize("size", [2, 4 * MiB], ids=["small-answer", "answer-backlogged"])
@pytest.mark.parametrize("when", ["with-the-request", "before-the-answer", "after-the-answer"])
@pytest.mark.parametrize("how", ["close_notify", "close_notify+fin"])
def test_a_client_end_before_its_answer_closes_the_connection_after_it(
    make_backend, start_proxy, sockets, pki, when, how, size
):
    """A client ends its direction after its request, before the answer is out, with
    close_notify alone (the TLS half-close: Go's tls.Conn.CloseWrite, an SSL_shutdown before
    reading), in the request's flight or later; the answer is small, or large enough to wait
    in the proxy for the client. The connection closes once the answer is out. It stayed open
    until --idle-timeout: a FIN is read again after the answer (the socket stays readable),
    a close_notify read with the request or while the answer waited was never looked at
    again."""

    body = pattern_bytes(size)

    def script(sc: ScriptedConn) -> str:
        time.sleep(0.3)  # the client's end comes before the answer
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
        return "answered"

    backend = make_backend(ScriptedBackend, script)
    proxy = start_proxy(backend.port, *cert_flags(pki.server), "--idle-timeout", "8")
    stream = tls_client(proxy, pki, sockets)
    if when == "with-the-request":
        with stream._ssl_lock:  # request and close_notify in one flight
            stream.obj.write(simple_get("/x"))
            with contextlib.suppress(ssl.SSLWantReadError):
                stream.obj.unwrap()
        stream._flush()
    else:
        stream.sendall(simple_get("/x"))
        # before: while the backend waits; after: once its answer is in the proxy, unread.
        time.sleep(0.1 if when == "before-the-answer" else 0.8)
        stream.close_notify()
    if how == "close_notify+fin":
        stream.raw.shutdown(socket.SHUT_WR)
    if size > 2:
        time.sleep(0.8)  # the answer is queued in the proxy meanwhile
    start = time.monotonic()
    try:
        kind, got = tls_wait_closed(stream, 3)
    except TimeoutError:
        pytest.fail(
            f"the client's {how} came {when.replace('-', ' ')}; the answer came but the "
            f"connection was still open 3 s later (closed only by --idle-timeout)"
        )
    assert got.endswith(b"\r\n\r\n" + body), got[-100:]
    assert kind == "close_notify"
    assert time.monotonic() - start < 2
    assert backend.result(5) == "answered"


@pytest.mark.timeout(60)
def test_a_close_notify_read_while_a_whole_answer_waits_closes_after_it(
    make_backend, start_proxy, sockets, pki
):
    """The race of the test above, pinned down. A client sends its request and its
    close_notify (no FIN) and reads nothing for a while. When the backend's whole answer is in
    the proxy while part of it still waits in the proxy's backlog (answers a little larger
    than what the kernel holds for a silent client), the exchange ends with the client's end
    already read: nothing announces it again. The connection must close once the answer is
    out, not at --idle-timeout. The backend answers 0.3 s late, so that the client's end is
    read while the answer is awaited. Answers of a spread of sizes around what the proxy takes for a
    silent client make some of them end that way on every run."""

    def serve(sc: ScriptedConn) -> str:
        size = int(re.search(rb"/size/(\d+) ", sc.head).group(1))
        time.sleep(0.3)  # the client's end comes before the answer
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        sc.sock.sendall(b"a" * size)
        return "answered"

    backend = make_backend(ScriptedBackend, serve)
    proxy = start_proxy(backend.port, *cert_flags(pki.server), "--idle-timeout", "20")
    # What the proxy takes at once for a client that reads nothing: the bytes it relayed to
    # one that leaves after a while, as its access line counts them.
    mark = proxy.mark()
    probe = tls_client(proxy, pki, sockets)
    probe.sendall(simple_get(f"/size/{16 * MiB}"))
    time.sleep(0.8)
    probe.raw.close()
    line = proxy.wait_for_log(r"GET /size/\d+ .*client went away", since=mark)
    queued = int(re.search(r'" 200 (\d+) ', line).group(1))
    sizes = [queued - 320 * KiB + i * 32 * KiB for i in range(14)]
    streams = {}
    for size in sizes:
        stream = tls_client(proxy, pki, sockets)
        stream.sendall(simple_get(f"/size/{size}"))
        time.sleep(0.1)  # in a flight of its own, read while the answer is awaited
        stream.close_notify()
        streams[size] = stream
    time.sleep(1.0)  # the answers come; nobody reads
    stuck: dict[int, str] = {}

    def read_all(size: int) -> None:
        try:
            kind, got = tls_wait_closed(streams[size], 6)
        except TimeoutError:
            stuck[size] = "still open 6 s after the answer was read"
            return
        if kind != "close_notify" or not got.endswith(b"a" * 64) or len(got) < size:
            stuck[size] = f"{kind} after {len(got)} bytes"

    readers = [threading.Thread(target=read_all, args=(size,)) for size in sizes]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(15)
    assert not stuck, (
        f"clients that ended with close_notify before their answers (size: what happened): "
        f"{stuck}; log:\n{proxy.log_text(mark)}"
    )


# --- TLS 1.3 KeyUpdate ------------------------------------------------------------


@pytest.mark.parametrize("who", ["client", "backend"])
def test_key_updates_in_a_tls_tunnel(make_backend, start_proxy, sockets, pki, who):
    """TLS 1.3 KeyUpdate (update_requested) from the client or from the backend in the middle
    of a tunnel, five times: every exchange goes through in order, both legs rekeyed."""

    def script(sc: ScriptedConn) -> str:
        sc.sock.sendall(RESPONSE_101)
        for i in range(5):
            assert sc.recv_exact(6) == b"ping%02d" % i
            if who == "backend":
                key_update(sc.sock)  # type: ignore[arg-type]
            sc.sock.sendall(b"pong%02d" % i)
        assert sc.read_to_eof() == (0, sha256(b""))
        return "ok"

    backend = make_backend(ScriptedBackend, script, ssl_context=pki.server_context())
    proxy = tls_backend_proxy(start_proxy, backend, pki, *cert_flags(pki.server))
    stream = tls_client(proxy, pki, sockets)
    assert stream.version() == "TLSv1.3"
    stream.sendall(tunnel_request())
    buf = bytearray()
    recv_until(stream, buf, b"\r\n\r\n")  # type: ignore[arg-type]
    for i in range(5):
        if who == "client":
            key_update(stream)
        stream.sendall(b"ping%02d" % i)
        assert recv_exact(stream, 6, buf) == b"pong%02d" % i  # type: ignore[arg-type]
    stream.shutdown(socket.SHUT_WR)
    assert backend.result(10) == "ok"


# --- unusual ClientHellos, resumption -----------------------------------------------


def test_a_client_hello_one_byte_at_a_time(start_proxy, http_backend, sockets, pki):
    """A ClientHello sent one byte per TCP segment still makes a handshake."""
    proxy = start_proxy(http_backend.port, *cert_flags(pki.server))
    raw = connect(proxy.port, timeout=10)
    sockets.append(raw)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = pki.client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    for i in range(len(hello)):
        raw.send(hello[i : i + 1])
        time.sleep(0.001)
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        if outgoing.pending:
            raw.sendall(outgoing.read())
        chunk = raw.recv(65536)
        assert chunk, "the proxy closed during the handshake"
        incoming.write(chunk)
    obj.write(simple_get("/bytewise"))
    raw.sendall(outgoing.read())
    got = b""
    while not got.endswith(b"GET /bytewise"):
        try:
            got += obj.read(65536)
        except ssl.SSLWantReadError:
            chunk = raw.recv(65536)
            assert chunk, got
            incoming.write(chunk)
    assert got.startswith(b"HTTP/1.1 200 "), got


def test_a_client_hello_larger_than_a_tls_record(start_proxy, http_backend, client, pki):
    """A 24 KiB ClientHello (a long ALPN list) spans two records: the handshake succeeds and
    http/1.1, last in the list, is chosen."""
    protocols = [f"x{i:03d}" * 50 for i in range(120)] + ["http/1.1"]
    context = pki.client_context(alpn=protocols)
    assert len(client_hello(context)) > 16 * 1024
    proxy = start_proxy(http_backend.port, *cert_flags(pki.server))
    c = client(proxy.port, ssl_context=context, timeout=10)
    assert c.sock.selected_alpn() == "http/1.1"
    assert c.request(simple_get("/big-hello")).body == b"GET /big-hello"


@pytest.mark.parametrize(
    ("version", "sni"),
    [(ssl.TLSVersion.TLSv1_2, False), (ssl.TLSVersion.TLSv1_3, True)],
    ids=["tls12", "tls13-sni-certificate"],
)
def test_clients_resume_their_sessions(start_proxy, http_backend, pki, version, sni):
    """A client's second and third connections resume the session (ticket) of the one before,
    with one certificate, or with one chosen by SNI among several."""
    certs = [pki.a, pki.b] if sni else [pki.server]
    name = "b.test" if sni else "localhost"
    proxy = start_proxy(http_backend.port, *cert_flags(*certs))
    context = pki.client_context()
    context.maximum_version = version
    session = None
    reused = []
    for i in range(3):
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=name, session=session) as tls,
        ):
            tls.sendall(simple_get(f"/r{i}"))
            got = b""
            while not got.endswith(b"GET /r%d" % i):
                chunk = tls.recv(4096)
                assert chunk, got
                got += chunk
            assert ("DNS", name) in tls.getpeercert()["subjectAltName"]
            reused.append(tls.session_reused)
            session = tls.session
    assert reused == [False, True, True]


# --- a client's end, or a bad record, in the middle of an exchange -----------------


def _reading_backend(sc: ScriptedConn) -> tuple[str, int] | str:
    """Read what the proxy sends until it ends; (how it ended, byte count). A GET is
    answered instead."""
    if sc.head.startswith(b"GET "):
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine")
        return "answered"
    got = len(sc.extra)
    sc.sock.settimeout(8)
    try:
        while chunk := sc.sock.recv(65536):
            got += len(chunk)
    except OSError as e:
        return repr(e), got
    return "eof", got


def test_close_notify_in_the_middle_of_a_request_body(make_backend, start_proxy, sockets, pki):
    """The client sends 5,000 of 100,000 body bytes and its close_notify: it gets a 400 and
    the proxy's close_notify at once; the backend sees the connection end after the 5,000
    (no complete request)."""
    backend = make_backend(ScriptedBackend, _reading_backend)
    proxy = start_proxy(backend.port, *cert_flags(pki.server))
    stream = tls_client(proxy, pki, sockets)
    stream.sendall(request_bytes("POST", "/up", [("Host", "x"), ("Content-Length", "100000")]))
    stream.sendall(b"a" * 5000)
    time.sleep(0.2)
    stream.close_notify()
    kind, got = tls_wait_closed(stream, 3)
    assert kind == "close_notify"
    assert got.startswith(b"HTTP/1.1 400 "), got
    assert backend.result(10) == ("eof", 5000)


def test_a_bad_record_in_the_middle_of_a_request_body(
    make_backend, start_proxy, client, sockets, pki
):
    """A record that fails its integrity check mid-body: the client is dropped, the access log
    says 499 with OpenSSL's reason, the backend's connection ends, other clients go on."""
    backend = make_backend(ScriptedBackend, _reading_backend)
    proxy = start_proxy(backend.port, *cert_flags(pki.server))
    mark = proxy.mark()
    stream = tls_client(proxy, pki, sockets)
    stream.sendall(request_bytes("POST", "/up", [("Host", "x"), ("Content-Length", "100000")]))
    stream.sendall(b"a" * 5000)
    time.sleep(0.2)
    stream.raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    kind, _ = tls_wait_closed(stream, 3)
    assert kind in ("reset", "eof", "error")
    assert backend.result(10)[1] == 5000
    line = proxy.wait_for_log(r'"POST /up HTTP/1.1" 499', since=mark)
    assert "bad record mac" in line.lower(), line
    other = client(proxy.port, ssl_context=pki.client_context(), timeout=5)
    assert other.request(simple_get("/after")).body == b"fine"
    assert backend.result(5) == "answered"


def test_close_notify_while_a_large_answer_streams(start_proxy, http_backend, sockets, pki):
    """The client ends its direction (close_notify, TCP stays open) while 8 MiB come to it:
    the answer is still delivered whole, then the proxy's close_notify."""
    proxy = start_proxy(http_backend.port, *cert_flags(pki.server))
    stream = tls_client(proxy, pki, sockets)
    n = 8 * MiB
    stream.sendall(simple_get(f"/big?n={n}&cl=1"))
    buf = bytearray()
    recv_until(stream, buf, b"\r\n\r\n")  # type: ignore[arg-type]
    first = recv_exact(stream, MiB, buf)  # type: ignore[arg-type]
    stream.close_notify()
    kind, rest = tls_wait_closed(stream, 10)
    assert kind == "close_notify"
    assert sha256(first + bytes(buf) + rest) == sha256(pattern_bytes(n))


@pytest.mark.parametrize("together", [False, True], ids=["later", "with-the-answer"])
def test_a_backend_close_notify_on_a_kept_alive_connection(
    make_backend, start_proxy, client, pki, together
):
    """A TLS backend answers with a length, then sends close_notify and keeps TCP open (after
    a while, or in the answer's own flight): the next request goes to a new connection."""

    def script(sc: ScriptedConn) -> Any:
        stream: TlsStream = sc.sock  # type: ignore[assignment]
        if b"/second" in sc.head:
            stream.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            return "second connection"
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
        if together:
            with stream._ssl_lock:
                stream.obj.write(answer)
                with contextlib.suppress(ssl.SSLWantReadError):
                    stream.obj.unwrap()
            stream._flush()
        else:
            stream.sendall(answer)
            time.sleep(0.3)
            stream.close_notify()
        return tls_wait_closed(stream, 8)

    backend = make_backend(ScriptedBackend, script, ssl_context=pki.server_context())
    proxy = tls_backend_proxy(start_proxy, backend, pki, "--response-timeout", "5")
    c = client(proxy.port, timeout=8)
    assert c.request(simple_get("/first")).body == b"first"
    if not together:
        time.sleep(0.6)
    assert c.request(simple_get("/second")).body == b"second"
    results = [backend.result(8), backend.result(8)]
    assert "second connection" in results, results
    [(kind, more)] = [r for r in results if r != "second connection"]
    assert kind in ("close_notify", "eof")
    assert more == b"", "the request went to the connection the backend had ended"


# --- memory with a slow TLS reader in an HTTP exchange -----------------------------

RSS_GROWTH_LIMIT_KIB = 8 * 1024


def test_a_slow_tls_client_reader_keeps_memory_flat(make_backend, start_proxy, sockets, pki):
    """TLS on both legs, a 48 MiB answer, a client that reads 1 MiB and then nothing for 2 s:
    the proxy's RSS grows by less than 8 MiB, and the answer then arrives intact."""
    n = 48 * MiB
    backend = make_backend(HttpBackend, ssl_context=pki.server_context())
    proxy = tls_backend_proxy(start_proxy, backend, pki, *cert_flags(pki.server))
    stream = tls_client(proxy, pki, sockets)
    stream.sendall(simple_get(f"/big?n={n}&cl=1"))
    buf = bytearray()
    recv_until(stream, buf, b"\r\n\r\n")  # type: ignore[arg-type]
    digest = hashlib.sha256(recv_exact(stream, MiB, buf))  # type: ignore[arg-type]
    baseline = proxy.rss_kib()
    grown = proxy.peak_rss_kib(2.0) - baseline
    assert grown < RSS_GROWTH_LIMIT_KIB, f"the proxy grew by {grown} KiB"
    got = MiB
    while got < n:
        chunk = bytes(buf) or stream.recv(MiB)
        buf.clear()
        assert chunk, f"EOF after {got} of {n} bytes"
        digest.update(chunk)
        got += len(chunk)
    assert digest.hexdigest() == sha256(pattern_bytes(n))


def test_a_slow_tls_backend_reader_keeps_memory_flat(
    make_backend, start_proxy, background, sockets, pki
):
    """TLS on both legs, a 48 MiB upload, a backend that reads 1 MiB and then nothing for 2 s:
    the client is held back, the proxy's RSS grows by less than 8 MiB, and the body then
    arrives intact."""
    n = 48 * MiB
    data = os.urandom(n)
    go = threading.Event()

    def script(sc: ScriptedConn) -> str:
        digest = hashlib.sha256(sc.recv_exact(MiB))
        go.wait(10)
        left = n - MiB
        while left:
            chunk = sc.recv_exact(min(left, MiB))
            digest.update(chunk)
            left -= len(chunk)
        answer = digest.hexdigest().encode()
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + answer)
        return "ok"

    backend = make_backend(ScriptedBackend, script, ssl_context=pki.server_context())
    proxy = tls_backend_proxy(start_proxy, backend, pki, *cert_flags(pki.server))
    stream = tls_client(proxy, pki, sockets)
    stream.sendall(request_bytes("POST", "/up", [("Host", "x"), ("Content-Length", str(n))]))
    time.sleep(0.3)
    baseline = proxy.rss_kib()
    sender = background(send_blob, stream, data)
    try:
        grown = proxy.peak_rss_kib(2.0) - baseline
        held_back = sender.thread.is_alive()
    finally:
        go.set()
    assert grown < RSS_GROWTH_LIMIT_KIB, f"the proxy grew by {grown} KiB"
    assert held_back, "the client sent all 48 MiB while the backend read nothing"
    sender.join(20)
    buf = bytearray()
    recv_until(stream, buf, b"\r\n\r\n")  # type: ignore[arg-type]
    assert recv_exact(stream, 64, buf).decode() == sha256(data)  # type: ignore[arg-type]
    assert backend.result(5) == "ok"
