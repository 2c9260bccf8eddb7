"""Errors the proxy answers itself: malformed and smuggling-shaped requests (400, nothing
reaches the backend), oversized heads (431), backends that refuse, hang or misbehave (502,
504), slow heads (closed after --header-timeout). Each is one log line, and other clients go
on unaffected."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import time

import pytest
from peers import (
    BlackholeBackend,
    HttpClient,
    ScriptedConn,
    assert_serves,
    connect,
    header_value,
    refused_port,
    request_bytes,
    simple_get,
    wait_closed,
)

OTHER = "/still-ok"  # the target assert_serves uses; its access line is not the error's


def status_pattern(status: int) -> str:
    return rf"(?<![\w.]){status}(?![\w.])"


def assert_logged_once(proxy, since: int, pattern: str, count: int = 1) -> None:
    """Exactly `count` log lines since `since` match `pattern` (ignoring the lines about
    requests to OTHER). Call after a request to OTHER went through, and the log line of that
    request is used to know that every earlier line has been read."""
    proxy.wait_for_log(re.escape(OTHER), since=since)
    lines = [line for line in proxy.logs_matching(pattern, since) if OTHER not in line]
    assert len(lines) == count, f"expected {count} line(s) matching {pattern!r}:\n" + (
        proxy.log_text(since)
    )


def assert_answer_then_close(c: HttpClient, status: int, method: str = "GET") -> None:
    resp = c.read_response(method)
    assert resp.status == status, resp
    _, rest = c.wait_closed(timeout=5)
    assert rest == b"", f"bytes after the error response: {rest[:200]!r}"


def nothing_reached_backend(http_backend) -> None:
    heads = [r for r in http_backend.heads if r.target != OTHER.encode()]
    assert heads == [], f"the backend received: {heads}"


# --- malformed and ambiguous requests -> 400 ------------------------------------------------

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: b.test\r\n\r\n"

BAD_HEADS = {
    "garbage-request-line": b"GARBAGE\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: b.test\r\nNoColonHere\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : b.test\r\n\r\n",
    "missing-host": b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "cl-not-a-number": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nContent-Length: abc\r\n\r\n",
    "cl-negative": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nContent-Length: -1\r\n\r\n",
    "cl-and-te": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-and-cl": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "differing-duplicate-cl": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello!" + SMUGGLED,
    "cl-list": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "te-xchunked": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: xchunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    # A reverse proxy opens no tunnels: with a path, CONNECT reached the backend, and its 2xx
    # left the client "connected" to a tunnel that moved nothing.
    "connect-origin-form": b"CONNECT /x HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "connect-authority-form": b"CONNECT b.test:22 HTTP/1.1\r\nHost: b.test:22\r\n\r\n",
    # HTTP/1.0 has no chunked framing (RFC 9112 6.1): one reader sees a bodiless request and
    # then SMUGGLED, another reads the chunks.
    "te-in-http10": b"POST /echo HTTP/1.0\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED,
    "obs-fold-space": b"GET / HTTP/1.1\r\nHost: b.test\r\nX-Folded: a\r\n b\r\n\r\n",
    "obs-fold-tab": b"GET / HTTP/1.1\r\nHost: b.test\r\nX-Folded: a\r\n\tb\r\n\r\n",
    "obs-fold-hides-te": b"POST /echo HTTP/1.1\r\nHost: b.test\r\nX-Note: a\r\n"
    b" Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: b.test\r\nX-Nul: a\x00b\r\n\r\n",
    "cr-in-value": b"GET / HTTP/1.1\r\nHost: b.test\r\nX-Cr: a\rb\r\n\r\n",
    "cr-in-value-smuggles-header": b"GET / HTTP/1.1\r\nHost: b.test\r\n"
    b"X-Cr: a\rTransfer-Encoding: chunked\r\n\r\n",
    # Host must be host[:port] (RFC 9112 3.2); the fast path hands these to h11's path
    "host-with-space": b"GET / HTTP/1.1\r\nHost: b.test evil.test\r\n\r\n",
    "host-with-path": b"GET / HTTP/1.1\r\nHost: b.test/x@evil.test\r\n\r\n",
    "absolute-form-userinfo": b"GET http://user@b.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "absolute-form-other-scheme": b"GET ftp://b.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "dot-segments-above-root": b"GET /a/../../etc/passwd HTTP/1.1\r\nHost: b.test\r\n\r\n",
}

CHUNKED_HEAD = b"POST /echo HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\n\r\n"
BAD_BODIES = {
    "bad-chunk-size": b"zz\r\nhello\r\n0\r\n\r\n",
    "bad-chunk-size-after-valid-chunk": b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
    "negative-chunk-size": b"5\r\nhello\r\n-5\r\nworld\r\n0\r\n\r\n",
    "chunk-data-overruns-size": b"5\r\nhelloEXTRA\r\n0\r\n\r\n",
    # Two bytes other than CRLF after the chunk data, then a chunk line: h11 before 0.16
    # skipped any two bytes there (CVE-2025-43859) and read a complete request.
    "chunk-data-not-followed-by-crlf": b"5\r\nhelloXX0\r\n\r\n",
    "chunk-size-overflow": b"5\r\nhello\r\nffffffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    # 2**64 + 5 (h11 reads 20 hex digits; a 64-bit reader reads 5): tests/test_chunk_sizes.py
    "chunk-size-over-63-bits": b"10000000000000005\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", list(BAD_HEADS))
def test_bad_request_head_gets_400(proxy, http_backend, client, name):
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(BAD_HEADS[name])
    assert_answer_then_close(c, 400)
    assert_serves(proxy, http_backend)
    nothing_reached_backend(http_backend)
    assert_logged_once(proxy, mark, status_pattern(400))


@pytest.mark.parametrize(
    ("head", "quoted"),
    [
        (b"GET / HTTP/1.1\r\nHost: b.test\r\nNoColonHere\r\n\r\n", "line: 'NoColonHere'"),
        (b"GARBAGE REQUEST\r\n\r\n", "line: 'GARBAGE REQUEST'"),
    ],
)
def test_a_400_quotes_the_bad_line_as_text_not_as_a_python_object(proxy, client, head, quoted):
    """h11 quotes the line it refuses as Python writes a bytearray: the page and the log
    line said "illegal header line: bytearray(b'NoColonHere')"."""
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    resp = c.request(head)
    assert resp.status == 400
    assert quoted.encode() in resp.body, resp.body
    assert b"bytearray" not in resp.body, resp.body
    line = proxy.wait_for_log(status_pattern(400), mark)
    assert quoted in line, line
    assert "bytearray" not in line, line


@pytest.mark.parametrize("version", ["2.0", "3.1", "0.9"])
def test_http_major_version_other_than_1_gets_505(proxy, http_backend, client, version):
    """h11 reads any digit as a version; what is not HTTP/1.x is not forwarded as HTTP/1.1."""
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(f"GET / HTTP/{version}\r\nHost: b.test\r\n\r\n".encode())
    assert_answer_then_close(c, 505)
    assert_serves(proxy, http_backend)
    nothing_reached_backend(http_backend)
    assert_logged_once(proxy, mark, status_pattern(505))


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_chunked_body_gets_400(proxy, http_backend, client, name):
    """The head is fine and may already be on its way; the body is not: the backend must not
    get a complete request (nor the one smuggled after it), and the client gets 400."""
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(CHUNKED_HEAD + BAD_BODIES[name] + SMUGGLED)
    assert_answer_then_close(c, 400)
    assert_serves(proxy, http_backend)
    done = [r for r in http_backend.requests if r.target != OTHER.encode()]
    assert done == [], f"a complete request reached the backend: {done}"
    assert_logged_once(proxy, mark, status_pattern(400))


@pytest.mark.parametrize(
    ("start", "rest"),
    [
        (b"5;ext=" + b"e" * 70_000, b"\r\nhello\r\n0\r\n\r\n"),
        (b"5\r\nhello\r\n0\r\nX-Trailer: " + b"t" * 70_000, b"\r\n\r\n"),
    ],
    ids=["chunk-line", "trailer-section"],
)
def test_a_body_line_over_the_limit_is_a_bad_body_not_a_large_head(
    proxy, http_backend, client, start, rest
):
    """A chunk line or trailer section that grows past --max-header-size (64 KiB) before it
    ends is refused by h11 with its 431 hint, which was answered and logged as "431: request
    head larger than 65536 bytes" for a head of 70 bytes that had been forwarded whole."""
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(CHUNKED_HEAD + start)
    time.sleep(0.3)  # the unfinished line is over the limit before its end comes
    c.send(rest)
    assert_answer_then_close(c, 400)
    assert_serves(proxy, http_backend)
    assert_logged_once(proxy, mark, status_pattern(400))
    assert "malformed request body: a chunk line or trailer section over" in proxy.log_text(mark)
    assert "request head larger" not in proxy.log_text(mark)


# --- oversized heads -> 431 -----------------------------------------------------------------

LIMIT = 4096


@pytest.fixture
def small_head_proxy(start_proxy, http_backend):
    return start_proxy(http_backend.port, "--max-header-size", str(LIMIT))


@pytest.mark.parametrize(
    "head",
    [
        simple_get("/", "b.test", ("X-Big", "a" * 2 * LIMIT)),
        simple_get("/", "b.test", *[(f"X-Many-{i}", "v" * 50) for i in range(200)]),
        simple_get("/" + "p" * 2 * LIMIT, "b.test"),
    ],
    ids=["one-big-header", "many-headers", "long-target"],
)
def test_head_too_large_gets_431(small_head_proxy, http_backend, client, head):
    proxy = small_head_proxy
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(head)
    assert_answer_then_close(c, 431)
    assert_serves(proxy, http_backend)
    nothing_reached_backend(http_backend)
    assert_logged_once(proxy, mark, status_pattern(431))


def test_unfinished_head_over_limit_gets_431_without_waiting(
    small_head_proxy, http_backend, client
):
    """Bytes keep coming and the head never ends: 431 as soon as the limit is passed, not a
    wait for --header-timeout (default 10 s) while buffering."""
    proxy = small_head_proxy
    c = client(proxy.port, timeout=5)
    start = time.monotonic()
    c.send(b"GET / HTTP/1.1\r\nHost: b.test\r\nX-Endless: " + b"a" * (3 * LIMIT))
    resp = c.read_response()
    assert resp.status == 431
    assert time.monotonic() - start < 3
    nothing_reached_backend(http_backend)


def test_head_under_limit_passes(small_head_proxy, http_backend, client):
    c = client(small_head_proxy.port, timeout=5)
    resp = c.request(simple_get("/", "b.test", ("X-Big", "a" * (LIMIT - 1000))))
    assert resp.status == 200
    [req] = http_backend.wait_for_requests(1)
    assert req.values("x-big") == [b"a" * (LIMIT - 1000)]


BIG_TRAILERS = {
    "size": b"X-Trailer: " + b"t" * (LIMIT + 1000) + b"\r\n",
    "count": b"".join(b"X-T-%d: v\r\n" % i for i in range(150)),
}


@pytest.mark.parametrize("trailers", list(BIG_TRAILERS))
def test_request_trailers_over_the_limits_get_400(small_head_proxy, http_backend, client, trailers):
    """A trailer section is held to the head's limits, --max-header-size and
    --max-header-count. h11 bounds one only while it arrives in pieces: sent whole (here in
    one write, a few KiB), any size or number of fields was taken and sent on."""
    proxy = small_head_proxy
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n" + BIG_TRAILERS[trailers] + b"\r\n")
    assert_answer_then_close(c, 400)
    assert_serves(proxy, http_backend)
    done = [r for r in http_backend.requests if r.target != OTHER.encode()]
    assert done == [], f"a complete request reached the backend: {done}"
    assert_logged_once(proxy, mark, status_pattern(400))
    assert "malformed request body: trailer section" in proxy.log_text(mark)


def test_response_trailers_over_the_limit_end_the_answer(scripted_backend, start_proxy, client):
    """The same limit for a backend's trailer section (sent whole): the client gets no end of
    the chunked body (its connection is closed, so it cannot take the answer for complete),
    and the log line says why."""
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        + BIG_TRAILERS["size"]
        + b"\r\n"
    )
    backend = scripted_backend(misbehaving(answer))
    proxy = start_proxy(backend.port, "--max-header-size", str(LIMIT))
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(simple_get("/trailers"))
    _, got = c.wait_closed(timeout=5)
    # What the client has of the answer depends on how the backend's bytes were cut: the
    # head and body, or (all in one read: the reset drops what was queued) nothing.
    assert got == b"" or got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert b"\r\n0\r\n" not in got, "the body was ended, as if complete"
    assert b"X-Trailer" not in got
    assert_serves(proxy)
    line = proxy.wait_for_log("trailer section of", mark)
    assert "invalid response body" in line


# --- backend trouble ------------------------------------------------------------------------


def test_backend_refused_gets_502(start_proxy, client):
    holder, port = refused_port()
    try:
        proxy = start_proxy(port, "--connect-timeout", "5")
        mark = proxy.mark()
        for i in (1, 2):  # a second client gets the same prompt answer: the proxy goes on
            c = client(proxy.port, timeout=5)
            start = time.monotonic()
            resp = c.request(simple_get("/refused"))
            assert resp.status == 502
            assert time.monotonic() - start < 2, "a refused connection is not a timeout"
            proxy.wait_for_logs(status_pattern(502), i, since=mark)
        assert len(proxy.logs_matching(status_pattern(502), mark)) == 2, proxy.log_text(mark)
    finally:
        holder.close()


def test_a_head_request_gets_our_502_without_its_body(start_proxy, client):
    """Our own error answer to HEAD says the length of the body a GET would get, sends none,
    and closes."""
    holder, port = refused_port()
    try:
        proxy = start_proxy(port)
        c = client(proxy.port, timeout=5)
        get = c.request(simple_get("/refused"))
        c = client(proxy.port, timeout=5)
        c.send(request_bytes("HEAD", "/refused", [("Host", "b.test")]))
        head = c.read_response("HEAD")
        assert (get.status, head.status) == (502, 502)
        assert header_value(head.headers, "content-length") == str(len(get.body)).encode()
        assert head.body == b""
        after = bytes(c.buf) + wait_closed(c.sock, timeout=2)[1]
        assert after == b"", f"bytes after the head: {after!r}"
    finally:
        holder.close()


def test_backend_unreachable_gets_502_after_connect_timeout(start_proxy, client):
    blackhole = BlackholeBackend()
    try:
        assert blackhole.connect_hangs(), "could not make a port whose connect hangs"
        proxy = start_proxy(blackhole.port, "--connect-timeout", "1")
        mark = proxy.mark()
        start = time.monotonic()
        first = client(proxy.port, timeout=5)
        first.send(simple_get("/unreachable/1"))
        second = client(proxy.port, timeout=5)  # waits alongside, not behind, the first
        second.send(simple_get("/unreachable/2"))
        assert first.read_response().status == 502
        elapsed = time.monotonic() - start
        assert 0.8 <= elapsed <= 3, f"502 after {elapsed:.2f} s with --connect-timeout 1"
        assert second.read_response().status == 502
        assert time.monotonic() - start < 1.9, "the second client waited behind the first"
        proxy.wait_for_logs(status_pattern(502), 2, since=mark)
        assert len(proxy.logs_matching(status_pattern(502), mark)) == 2, proxy.log_text(mark)
    finally:
        blackhole.stop()


def test_backend_silent_gets_504_after_response_timeout(start_proxy, http_backend, client):
    proxy = start_proxy(http_backend.port, "--response-timeout", "1")
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    start = time.monotonic()
    c.send(simple_get("/slow"))
    http_backend.wait_for_heads(1)
    assert_serves(proxy, http_backend)  # during: another client is served meanwhile
    resp = c.read_response()
    elapsed = time.monotonic() - start
    assert resp.status == 504
    assert 0.8 <= elapsed <= 4, f"504 after {elapsed:.2f} s with --response-timeout 1"
    mark_after = proxy.mark()
    assert_serves(proxy, http_backend)  # and after
    proxy.wait_for_log(re.escape(OTHER), since=mark_after)
    lines = [ln for ln in proxy.logs_matching(status_pattern(504), mark) if OTHER not in ln]
    assert len(lines) == 1, proxy.log_text(mark)


def test_backend_that_stops_reading_an_upload_gets_504(scripted_backend, start_proxy, sockets):
    """A backend that took the request head and then read nothing of a large body: the proxy
    stops reading the client too (backpressure), and --response-timeout later it answered
    408 "client sent no request body bytes", blaming a client that was sending as fast as
    it could. The backend is the one that did not go on: 504, as nginx (proxy_send_timeout)
    and HAProxy (timeout server) answer."""

    def script(sc: ScriptedConn) -> str:
        time.sleep(3)  # reads nothing of the body
        return "done"

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port, "--response-timeout", "1")
    mark = proxy.mark()
    sock = connect(proxy.port, timeout=5)
    sockets.append(sock)
    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: b.test\r\nContent-Length: 1000000000\r\n\r\n")
    sock.setblocking(False)
    chunk = b"x" * 65536
    answer = b""
    deadline = time.monotonic() + 8
    while not answer and time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            sock.send(chunk)
        with contextlib.suppress(BlockingIOError):
            answer = sock.recv(100)
        time.sleep(0.001)
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    line = proxy.wait_for_log(status_pattern(504), since=mark)
    assert "request body" in line
    assert "--response-timeout" in line


def test_silent_backend_to_a_client_waiting_for_100_continue_gets_504(
    scripted_backend, start_proxy, client
):
    """A client that sent Expect: 100-continue may wait for the 100 before its body (RFC
    9110 10.1.1). With a backend that said nothing, --response-timeout later the client
    got 408 "client sent no request body bytes": blamed for waiting as it was allowed to.
    The backend is the one that did not answer: 504."""

    def script(sc: ScriptedConn) -> str:
        time.sleep(3)  # neither 100 Continue nor an answer
        return "done"

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port, "--response-timeout", "1")
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    c.send(
        request_bytes(
            "POST",
            "/upload",
            [("Host", "b.test"), ("Expect", "100-continue"), ("Content-Length", "10")],
        )
    )
    assert c.read_response("POST").status == 504
    line = proxy.wait_for_log(status_pattern(504), since=mark)
    assert "sent no response" in line


def test_an_answer_cut_for_a_client_that_reads_nothing_says_so(http_backend, start_proxy, sockets):
    """A large answer to a client that reads none of it is cut after --response-timeout, as
    one stalled by its backend is, and the one log line read the same for both: "no
    progress for 1s while relaying the response". The admin could not tell a stuck backend
    from a client that went quiet; the line says which side it was now."""
    proxy = start_proxy(http_backend.port, "--response-timeout", "1")
    mark = proxy.mark()
    sock = socket.socket()
    sockets.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", proxy.port))
    sock.sendall(simple_get(f"/big?n={64 << 20}&cl=1"))
    line = proxy.wait_for_log(r"no progress for 1s", since=mark, timeout=10)
    assert "the client took none of it" in line


def misbehaving(action: bytes | None):
    """A scripted backend that answers OTHER normally and every other request with `action`:
    raw bytes to send before closing, or None to close without a word."""

    def script(sc: ScriptedConn):
        if f" {OTHER} ".encode() in sc.head.split(b"\r\n", 1)[0]:
            body = f"GET {OTHER}".encode()
            sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            sc.sock.recv(1)  # until the proxy closes or reuses (then it gets EOF at stop)
            return "ok"
        if action is not None:
            sc.sock.sendall(action)
        return "misbehaved"

    return script


@pytest.mark.parametrize(
    "request_head",
    [
        simple_get("/unrequested-101"),
        request_bytes("GET", "/unrequested-101", [("Host", "b.test"), ("Upgrade", "websocket")]),
        request_bytes(
            "GET",
            "/unrequested-101",
            [
                ("Host", "b.test"),
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", "h2c"),
                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
        ),
    ],
    ids=["plain-get", "upgrade-without-connection-token", "h2c"],
)
def test_unrequested_101_gets_502(proxy, http_backend, client, request_head):
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    resp = c.request(request_head)
    assert resp.status == 502
    assert b"raw-bytes-after-101" not in resp.body
    assert_serves(proxy, http_backend)
    assert_logged_once(proxy, mark, status_pattern(502))


@pytest.mark.parametrize("connection", ["Upgrade", "Upgrade, X-Trace"], ids=["fast", "h11"])
def test_101_to_a_protocol_not_offered_gets_502(proxy, http_backend, client, connection):
    """RFC 9110 7.8: a server switches only to a protocol the client offered. The backend
    answers `Upgrade: websocket` to a request for `rawtest`: no tunnel, 502 (on the fast path
    and, with a Connection token that sends the head to h11, on h11's)."""
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    resp = c.request(
        request_bytes(
            "GET",
            "/unrequested-101",
            [("Host", "b.test"), ("Connection", connection), ("Upgrade", "rawtest")],
        )
    )
    assert resp.status == 502
    assert b"raw-bytes-after-101" not in resp.body
    assert_serves(proxy, http_backend)
    assert_logged_once(proxy, mark, status_pattern(502))
    assert "which the request did not offer" in proxy.wait_for_log(status_pattern(502), mark)


@pytest.mark.parametrize(
    "action",
    [None, b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"],
    ids=["closes-without-answer", "garbage-answer", "closes-mid-head"],
)
def test_backend_misbehaving_gets_502(scripted_backend, start_proxy, client, action):
    backend = scripted_backend(misbehaving(action))
    proxy = start_proxy(backend.port)
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    resp = c.request(simple_get("/misbehave"))
    assert resp.status == 502
    assert_serves(proxy)
    assert_logged_once(proxy, mark, status_pattern(502))


# --- slow heads -----------------------------------------------------------------------------


def test_slowloris_head_closed_after_header_timeout(start_proxy, http_backend, client):
    """A head trickled a line every 0.2 s and never finished is closed about --header-timeout
    after it started (trickling does not extend it); a 408 may come first."""
    proxy = start_proxy(http_backend.port, "--header-timeout", "1")
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    start = time.monotonic()
    c.send(b"GET / HTTP/1.1\r\nHost: b.test\r\n")
    assert_serves(proxy, http_backend)  # during
    got = b""
    closed_by = None
    i = 0
    while closed_by is None:
        assert time.monotonic() - start < 6, "the slow head was never cut off"
        readable, _, _ = select.select([c.sock], [], [], 0.2)
        if readable:
            try:
                chunk = c.sock.recv(65536)
            except ConnectionResetError:
                closed_by = "reset"
                break
            if not chunk:
                closed_by = "eof"
            got += chunk
            continue
        try:
            c.sock.sendall(b"X-Slow-%d: y\r\n" % i)
        except (BrokenPipeError, ConnectionResetError):
            closed_by = "send failed"
        i += 1
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed <= 3.5, f"closed after {elapsed:.2f} s with --header-timeout 1"
    if got:
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert_serves(proxy, http_backend)  # after
    nothing_reached_backend(http_backend)
    assert_logged_once(proxy, mark, rf"{status_pattern(408)}|header.timeout|timed out")


@pytest.mark.parametrize("duration", ["720h", "99999999999999999"])
def test_a_timeout_of_weeks_is_a_long_wait_not_a_crash(start_proxy, http_backend, client, duration):
    """A duration longer than epoll can wait (about 24.8 days; or than time_t holds) is
    accepted at start-up: the first connection that armed such a timer used to stop the whole
    proxy with an OverflowError traceback. It is a long wait."""
    proxy = start_proxy(http_backend.port, "--header-timeout", duration, "--idle-timeout", duration)
    c = client(proxy.port, timeout=5)
    c.send(b"GET / HTTP/1.1\r\nHost: b.test\r\n")  # an unfinished head: the header timer
    assert_serves(proxy, http_backend)  # its kept-alive connection arms the idle timer
    time.sleep(0.3)
    assert proxy.proc.poll() is None, proxy.log_text()
    assert_serves(proxy, http_backend)


def test_a_502_page_names_neither_the_backend_nor_what_it_sent(
    scripted_backend, start_proxy, client
):
    """The reason is for the log: a 5xx page the proxy writes says only what kind of failure
    it was (it used to quote the backend's address and the invalid line, secrets and all)."""

    def script(sc):
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nX-Internal-Auth: Bearer SECRET\x00\r\n\r\n")

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    resp = c.request(simple_get("/leak"))
    assert resp.status == 502
    assert resp.body.startswith(b"502 Bad Gateway: ")
    assert b"SECRET" not in resp.body
    assert str(backend.port).encode() not in resp.body
    line = proxy.wait_for_log(status_pattern(502), mark)
    assert str(backend.port) in line
    assert "invalid" in line


def test_a_huge_invalid_header_is_not_quoted_whole(proxy, client):
    """h11 quotes the line it refuses: a 60 KB header line with a NUL wrote 350 KB of logs
    per request. The detail is cut, in the log and on the 400 page."""
    mark = proxy.mark()
    c = client(proxy.port, timeout=5)
    resp = c.request(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 60_000 + b"\x00\r\n\r\n")
    assert resp.status == 400
    assert len(resp.body) < 1000
    assert b"characters)" in resp.body
    line = proxy.wait_for_log(status_pattern(400), mark)
    assert len(line) < 1000
