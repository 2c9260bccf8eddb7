"""Plain HTTP through the proxy: bodies both ways, keep-alive, pipelining, HEAD/204/304,
100-continue, and what happens to headers on the way."""

from __future__ import annotations

import hashlib
import re
import select
import time

import pytest
from peers import (
    admin_get,
    connect,
    header_tokens,
    header_values,
    open_websocket,
    pattern_bytes,
    request_bytes,
    sha256,
    simple_get,
    wait_closed,
)


def chunked(*pieces: bytes, extension: bytes = b"") -> bytes:
    out = b""
    for piece in pieces:
        out += b"%x%s\r\n%s\r\n" % (len(piece), extension, piece)
    return out + b"0\r\n\r\n"


def test_get(proxy, http_backend, client):
    c = client(proxy.port)
    resp = c.request(simple_get("/hello?x=1"))
    assert resp.status == 200
    assert resp.body == b"GET /hello?x=1"
    [req] = http_backend.wait_for_requests(1)
    assert (req.method, req.target, req.body) == (b"GET", b"/hello?x=1", b"")


@pytest.mark.parametrize("size", [0, 1, 100_000, 3_000_000])
def test_post_content_length(proxy, http_backend, client, size):
    body = pattern_bytes(size)
    c = client(proxy.port)
    resp = c.request(
        request_bytes("POST", "/echo", [("Host", "b.test"), ("Content-Length", str(size))], body)
    )
    assert resp.status == 200
    assert len(resp.body) == size
    assert resp.body == body
    [req] = http_backend.wait_for_requests(1)
    assert req.body == body


@pytest.mark.parametrize(
    "pieces",
    [
        [b"hello", b" ", b"world"],
        [b"x" * 70_000, b"y", b"z" * 300_000],
        [pattern_bytes(8 * 1024 * 1024)],
    ],
    ids=["small", "uneven", "8MiB"],
)
def test_post_chunked_body_arrives_intact(proxy, http_backend, client, pieces):
    body = b"".join(pieces)
    c = client(proxy.port)
    resp = c.request(
        request_bytes(
            "POST",
            "/echo",
            [("Host", "b.test"), ("Transfer-Encoding", "chunked")],
            chunked(*pieces),
        )
    )
    assert resp.status == 200
    assert sha256(resp.body) == sha256(body)
    [req] = http_backend.wait_for_requests(1)
    assert len(req.body) == len(body)
    assert sha256(req.body) == sha256(body)


def test_chunk_extensions_are_accepted(proxy, http_backend, client):
    c = client(proxy.port)
    resp = c.request(
        request_bytes(
            "POST",
            "/echo",
            [("Host", "b.test"), ("Transfer-Encoding", "chunked")],
            chunked(b"abc", b"def", extension=b";name=value"),
        )
    )
    assert resp.status == 200
    assert resp.body == b"abcdef"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_10mb_response_streamed(proxy, client, framing):
    n = 10_000_000
    target = f"/big?n={n}" + ("&cl=1" if framing == "content-length" else "")
    c = client(proxy.port)
    resp = c.request(simple_get(target))
    assert resp.status == 200
    assert len(resp.body) == n
    assert hashlib.sha256(resp.body).digest() == hashlib.sha256(pattern_bytes(n)).digest()


def test_response_is_streamed_not_buffered(proxy, http_backend, client):
    """The backend sends part of its body and waits for the client to have it: a proxy that
    holds the response until it is complete never delivers the first part."""
    c = client(proxy.port, timeout=5)
    c.send(simple_get("/stream"))
    status, _, _headers, _ = c.read_head()
    assert status == 200
    got = bytearray(c.buf)
    c.buf.clear()
    while b"first-part" not in got:
        chunk = c.sock.recv(65536)
        assert chunk, "EOF before the first part of the body"
        got += chunk
    http_backend.gate.set()
    while not got.endswith(b"0\r\n\r\n"):
        chunk = c.sock.recv(65536)
        assert chunk, "EOF before the end of the body"
        got += chunk
    assert b"second-part" in got


def test_request_body_is_streamed_not_buffered(proxy, http_backend, client):
    """The client sends the first chunk of a body and then waits until the backend has it."""
    c = client(proxy.port, timeout=5)
    c.send(
        request_bytes("POST", "/stream-in", [("Host", "b.test"), ("Transfer-Encoding", "chunked")])
        + b"5\r\nfirst\r\n"
    )
    assert http_backend.first_data.wait(5), "the backend never saw the first chunk"
    c.send(b"6\r\nsecond\r\n0\r\n\r\n")
    resp = c.read_response()
    assert resp.status == 200
    assert resp.body == f"11 {sha256(b'firstsecond')}".encode()


def test_keep_alive_reuses_one_backend_connection(proxy, http_backend, client):
    c = client(proxy.port)
    for i in range(5):
        resp = c.request(simple_get(f"/ka/{i}"))
        assert resp.status == 200
        assert resp.body == f"GET /ka/{i}".encode()
    resp = c.request(
        request_bytes("POST", "/echo", [("Host", "b.test"), ("Content-Length", "4")], b"last")
    )
    assert resp.body == b"last"
    reqs = http_backend.wait_for_requests(6)
    assert [r.target for r in reqs][:5] == [f"/ka/{i}".encode() for i in range(5)]
    assert http_backend.accepts == 1, "the backend connection was not reused"
    assert len({r.conn_id for r in reqs}) == 1


def test_pipelined_requests_answered_in_order(proxy, http_backend, client):
    reqs = [
        simple_get("/p/1"),
        request_bytes("POST", "/echo", [("Host", "b.test"), ("Content-Length", "7")], b"payload"),
        simple_get("/p/3"),
        request_bytes(
            "POST",
            "/echo",
            [("Host", "b.test"), ("Transfer-Encoding", "chunked")],
            chunked(b"chunk", b"ed"),
        ),
        request_bytes("HEAD", "/big?n=50&cl=1", [("Host", "b.test")]),
        simple_get("/p/6"),
    ]
    c = client(proxy.port)
    c.send(b"".join(reqs))
    bodies = [c.read_response("HEAD" if i == 4 else "GET").body for i in range(len(reqs))]
    assert bodies == [b"GET /p/1", b"payload", b"GET /p/3", b"chunked", b"", b"GET /p/6"]
    got = http_backend.wait_for_requests(len(reqs))
    assert [r.target for r in got] == [
        b"/p/1",
        b"/echo",
        b"/p/3",
        b"/echo",
        b"/big?n=50&cl=1",
        b"/p/6",
    ]


def test_trailers_pass_without_framing_and_hop_by_hop_fields(scripted_backend, start_proxy, client):
    """Trailer fields travel both ways, but not Content-Length, Transfer-Encoding, Host or
    hop-by-hop ones (RFC 9110 6.5.1): a recipient that merged those into the header section
    would frame or route the message otherwise than the proxy did. Nor a client's claims
    about itself (X-Forwarded-For, X_Real_IP), which the header section drops. The Trailer
    header that announces them travels too (end to end, RFC 9110 6.6.2; HAProxy keeps it),
    but not a Trailer field inside a trailer section."""

    def script(sc):
        while not sc.extra.endswith(b"\r\n\r\n") or b"0\r\n" not in sc.extra:
            chunk = sc.sock.recv(65536)
            if not chunk:
                break
            sc.extra += chunk
        sc.sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sig\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Sig: 1\r\nContent-Length: 99\r\nHost: evil.test\r\n"
            b"Connection: close\r\nTrailer: X-Late\r\n\r\n"
        )
        return bytes(sc.extra)

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    c = client(proxy.port)
    body = (
        b"4\r\nbody\r\n0\r\nX-Checksum: abc\r\nContent-Length: 99\r\nTE: trailers\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n\r\n"
    )
    resp = c.request(
        request_bytes("POST", "/t", [("Host", "b.test"), ("Transfer-Encoding", "chunked")], body)
    )
    assert (resp.status, resp.body) == (200, b"hello")
    assert resp.trailers == [(b"X-Sig", b"1")]
    assert resp.values("trailer") == [b"X-Sig"]
    sent = backend.result()
    trailer_section = sent[sent.index(b"0\r\n") + 3 :]
    assert trailer_section == b"X-Checksum: abc\r\n\r\n"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_head(proxy, client, framing):
    target = "/big?n=1000" + ("&cl=1" if framing == "content-length" else "")
    c = client(proxy.port)
    resp = c.request(request_bytes("HEAD", target, [("Host", "b.test")]), method="HEAD")
    assert resp.status == 200
    if framing == "content-length":
        assert resp.header("content-length") == b"1000"
    # no body followed: the next response on this connection parses cleanly
    resp = c.request(simple_get("/after-head"))
    assert (resp.status, resp.body) == (200, b"GET /after-head")


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_status(proxy, client, status):
    c = client(proxy.port)
    resp = c.request(simple_get(f"/status/{status}"))
    assert resp.status == status
    if status == 304:
        assert resp.header("etag") == b'"v1"'
    assert not header_values(resp.headers, "transfer-encoding")
    resp = c.request(simple_get("/after"))
    assert (resp.status, resp.body) == (200, b"GET /after")


def test_expect_100_continue(proxy, http_backend, client):
    c = client(proxy.port, timeout=5)
    c.send(
        request_bytes(
            "POST",
            "/echo",
            [("Host", "b.test"), ("Content-Length", "11"), ("Expect", "100-continue")],
        )
    )
    interim = c.read_response(allow_informational=True)
    assert interim.status == 100
    assert interim.header("x-continue-from") == b"backend", "not the backend's 100"
    c.send(b"hello world")
    resp = c.read_response()
    assert (resp.status, resp.body) == (200, b"hello world")
    [req] = http_backend.wait_for_requests(1)
    assert req.body == b"hello world"


def test_hop_by_hop_stripped_and_forwarded_headers_added(proxy, http_backend, client):
    c = client(proxy.port)
    resp = c.request(
        request_bytes(
            "GET",
            "/hop",
            [
                ("Host", "Example.COM:8080"),
                ("Connection", "keep-alive, X-Private"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("TE", "trailers"),
                ("Trailer", "X-Checksum"),
                ("X-Private", "secret"),
                ("X-Public", "visible"),
            ],
        )
    )
    assert resp.status == 200
    [req] = http_backend.wait_for_requests(1)
    names = {k.lower() for k, _ in req.headers}
    for gone in (b"keep-alive", b"proxy-connection", b"te", b"x-private", b"upgrade"):
        assert gone not in names, f"{gone!r} reached the backend: {req.headers}"
    assert b"x-private" not in header_tokens(req.headers, "connection")
    assert req.values("x-public") == [b"visible"]
    assert req.values("trailer") == [b"X-Checksum"]  # end to end (RFC 9110 6.6.2)
    assert req.values("host") == [b"Example.COM:8080"]
    assert req.values("x-forwarded-for") == [b"127.0.0.1"]
    assert req.values("x-forwarded-proto") == [b"http"]
    assert req.values("x-forwarded-host") == [b"Example.COM:8080"]


def test_x_forwarded_for_from_an_untrusted_client_is_replaced(proxy, http_backend, client):
    c = client(proxy.port)
    resp = c.request(simple_get("/xff", "b.test", ("X-Forwarded-For", "203.0.113.7, 10.0.0.1")))
    assert resp.status == 200
    [req] = http_backend.wait_for_requests(1)
    assert header_tokens(req.headers, "x-forwarded-for") == [b"127.0.0.1"]


def test_x_forwarded_for_spelled_with_underscores_is_dropped(proxy, http_backend, client):
    """The fast path (a simple GET) hands a head with an underscore name to the rules that
    drop a forged X_Forwarded_For; a WSGI backend would read it as X-Forwarded-For."""
    c = client(proxy.port)
    resp = c.request(simple_get("/xff", "b.test", ("X_Forwarded_For", "203.0.113.7")))
    assert resp.status == 200
    [req] = http_backend.wait_for_requests(1)
    names = [k.lower() for k, _ in req.headers]
    assert b"x_forwarded_for" not in names
    assert header_tokens(req.headers, "x-forwarded-for") == [b"127.0.0.1"]


def test_x_forwarded_for_from_a_trusted_proxy_is_appended(start_proxy, http_backend, client):
    proxy = start_proxy(http_backend.port, "--trusted-proxy", "127.0.0.0/8")
    c = client(proxy.port)
    resp = c.request(simple_get("/xff", "b.test", ("X-Forwarded-For", "203.0.113.7, 10.0.0.1")))
    assert resp.status == 200
    [req] = http_backend.wait_for_requests(1)
    assert header_tokens(req.headers, "x-forwarded-for") == [
        b"203.0.113.7",
        b"10.0.0.1",
        b"127.0.0.1",
    ]


def test_end_to_end_header_case_preserved(proxy, http_backend, client):
    c = client(proxy.port)
    resp = c.request(
        simple_get(
            "/case",
            "b.test",
            ("X-CaSe-TeSt", "MiXeD Value"),
            ("x-all-lower", "v"),
            ("X-ALL-UPPER", "V"),
        )
    )
    assert resp.status == 200
    [req] = http_backend.wait_for_requests(1)
    sent = {
        (b"X-CaSe-TeSt", b"MiXeD Value"),
        (b"x-all-lower", b"v"),
        (b"X-ALL-UPPER", b"V"),
        (b"Host", b"b.test"),
    }
    assert sent <= set(req.headers), req.headers
    # and back: the backend's header names reach the client as the backend wrote them
    assert (b"X-Backend-CaSe", b"MiXeD") in resp.headers


def test_response_hop_by_hop_headers_not_passed_to_client(proxy, client):
    c = client(proxy.port)
    resp = c.request(simple_get("/"))
    names = {k.lower() for k, _ in resp.headers}
    assert b"keep-alive" not in names
    assert b"x-backend-hop" not in names, "a header the backend's Connection named leaked"


def test_backend_closing_after_response(proxy, http_backend, client):
    c = client(proxy.port)
    resp = c.request(simple_get("/close"))
    assert (resp.status, resp.body) == (200, b"closing")
    # the client's connection keeps working (the proxy opens a new backend connection), or the
    # proxy closed it cleanly after the response; either way a next request works
    c.send(simple_get("/after-close"))
    try:
        resp = c.read_response()
    except (EOFError, ConnectionResetError):
        c = client(proxy.port)
        resp = c.request(simple_get("/after-close"))
    assert (resp.status, resp.body) == (200, b"GET /after-close")
    assert http_backend.accepts == 2


@pytest.mark.parametrize(
    "request_and_more",
    [
        simple_get("/last", "b.test", ("Connection", "close")) + simple_get("/never"),
        request_bytes(
            "POST", "/echo", [("Host", "b.test"), ("Content-Length", "4")], b"last"
        ).replace(b"HTTP/1.1", b"HTTP/1.0")
        + b"\r\n",
    ],
    ids=["connection-close-then-request", "http10-body-then-crlf"],
)
def test_bytes_after_a_last_request_are_ignored(proxy, http_backend, client, request_and_more):
    """RFC 9112 9.6: after a request that closes the connection, the server answers it and
    ignores what follows (h11 calls such bytes an error: the client got 400 for a request
    the backend had answered)."""
    c = client(proxy.port)
    c.send(request_and_more)
    resp = c.read_response()
    assert resp.status == 200
    assert resp.body in (b"GET /last", b"last")
    assert c.wait_closed()[1] == b""
    http_backend.wait_for_requests(1)
    time.sleep(0.2)
    assert len(http_backend.requests) == 1, "the bytes after the last request were forwarded"


def test_empty_lines_before_requests_are_ignored(proxy, http_backend, client):
    """RFC 9112 2.2: empty lines before a request line are skipped: before the first request,
    after a body (old clients end a POST body with CRLF), alone in a packet, and pipelined."""
    c = client(proxy.port)
    assert c.request(b"\r\n" + simple_get("/first")).body == b"GET /first"
    post = request_bytes("POST", "/echo", [("Host", "b.test"), ("Content-Length", "4")], b"body")
    c.send(post + b"\r\n" + simple_get("/pipelined"))
    assert c.read_response().body == b"body"
    assert c.read_response().body == b"GET /pipelined"
    c.send(post + b"\r\n")
    assert c.read_response().body == b"body"
    time.sleep(0.1)
    c.send(b"\r\n\n")
    time.sleep(0.1)
    assert c.request(simple_get("/later")).body == b"GET /later"
    targets = [r.target for r in http_backend.wait_for_requests(5)]
    assert targets == [b"/first", b"/echo", b"/pipelined", b"/echo", b"/later"]


def test_empty_lines_leave_a_kept_alive_connection_idle(start_proxy, http_backend, client):
    """An empty line between requests is no request begun: the connection stays idle under
    --idle-timeout and is not held to --header-timeout."""
    proxy = start_proxy(http_backend.port, "--header-timeout", "0.5", "--idle-timeout", "30")
    c = client(proxy.port, timeout=5)
    assert c.request(simple_get("/first")).status == 200
    c.send(b"\r\n")
    time.sleep(1.2)
    assert c.request(simple_get("/second")).body == b"GET /second"


# --- connection limits and timeouts (as --help describes them) ------------------------------


def test_idle_timeout_closes_kept_alive_connection(start_proxy, http_backend, client):
    proxy = start_proxy(http_backend.port, "--idle-timeout", "1")
    c = client(proxy.port, timeout=5)
    assert c.request(simple_get("/")).status == 200
    start = time.monotonic()
    _, rest = c.wait_closed(timeout=5)
    elapsed = time.monotonic() - start
    assert 0.8 <= elapsed <= 3.5, f"closed after {elapsed:.2f} s with --idle-timeout 1"
    assert rest == b""


PARTIAL_HEAD = b"GET /busy HTTP/1.1\r\nHost: app.test\r\n"


def test_max_connections_holds_extra_clients_until_one_closes(start_proxy, http_backend, client):
    proxy = start_proxy(http_backend.port, "--max-connections", "1")
    # Busy, not idle: half a request head. (An idle kept-alive one would make room.)
    first = client(proxy.port, timeout=5)
    first.send(PARTIAL_HEAD)
    second = client(proxy.port, timeout=5)  # the kernel completes the connect (backlog)
    second.send(simple_get("/second"))
    readable, _, _ = select.select([second.sock], [], [], 0.5)
    assert not readable, "a client beyond --max-connections 1 was served"
    first.close()
    resp = second.read_response()
    assert (resp.status, resp.body) == (200, b"GET /second")
    # Reaching the limit again and again is logged once (a minute), not once per client.
    for i in range(5):
        second.send(PARTIAL_HEAD)  # busy again
        waiting = client(proxy.port, timeout=5)
        waiting.send(simple_get(f"/again/{i}"))
        time.sleep(0.05)
        second.close()
        assert waiting.read_response().status == 200
        second = waiting
    assert len(re.findall(r"connections open \(--max-connections\)", proxy.log_text())) == 1
    assert "make room" not in proxy.log_text()


RECLAIMED = r"--max-connections 2 reached: idle connections \(kept alive between requests"


def test_at_max_connections_a_new_client_takes_the_longest_idle_ones_place(
    start_proxy, http_backend, client
):
    """Idle kept-alive connections would hold every place for --idle-timeout (60 s by
    default) while new clients wait in the backlog: the one idle longest makes room, as in
    nginx, and only it."""
    proxy = start_proxy(
        http_backend.port, "--max-connections", "2", "--admin-listen", "127.0.0.1:0"
    )
    oldest, newer = client(proxy.port, timeout=5), client(proxy.port, timeout=5)
    assert newer.request(simple_get("/newer")).status == 200
    time.sleep(0.05)
    assert oldest.request(simple_get("/oldest")).status == 200
    time.sleep(0.05)
    # Idle since its last answer, not since it connected: this one is now the newer.
    assert newer.request(simple_get("/newer/2")).status == 200
    newcomer = client(proxy.port, timeout=5)
    started = time.monotonic()
    resp = newcomer.request(simple_get("/new"))
    assert (resp.status, resp.body) == (200, b"GET /new")
    assert time.monotonic() - started < 2, "the new client waited for an idle timeout"
    _, rest = oldest.wait_closed(timeout=2)
    assert rest == b""
    # The other idle one was left alone and still serves.
    assert newer.request(simple_get("/newer/3")).body == b"GET /newer/3"
    proxy.wait_for_log(RECLAIMED)
    assert len(re.findall(RECLAIMED, proxy.log_text())) == 1
    assert proxy.admin_port is not None
    metrics = admin_get(proxy.admin_port, "/metrics").body.decode()
    assert "\nrawproxy_idle_connections_reclaimed_total 1\n" in metrics


def test_at_max_connections_a_connection_that_never_sent_a_request_makes_room(
    start_proxy, http_backend, client, sockets
):
    """A browser opens spare connections it may never use; at the limit they would hold
    every place for --header-timeout. Like an idle kept-alive one, the one that waited
    longest makes room (nginx counts them the same); one that began a request does not."""
    proxy = start_proxy(
        http_backend.port,
        "--max-connections",
        "2",
        "--header-timeout",
        "30",
        "--admin-listen",
        "127.0.0.1:0",
    )
    spare = connect(proxy.port, timeout=5)
    connected = time.monotonic()
    sockets.append(spare)
    time.sleep(0.1)  # accepted, and read once: nothing there
    busy = client(proxy.port, timeout=5)
    busy.send(PARTIAL_HEAD)
    time.sleep(0.1)
    newcomer = client(proxy.port, timeout=5)
    resp = newcomer.request(simple_get("/new"))
    assert (resp.status, resp.body) == (200, b"GET /new")
    waited = time.monotonic() - connected
    # Not before the spare connection had waited SPARE_GRACE (1 s): until then it could be
    # a client about to send its request.
    assert 0.9 < waited < 3, f"served {waited:.2f} s after the spare connection came"
    how, rest = wait_closed(spare, timeout=2)
    assert (how, rest) == ("eof", b"")
    # The half-sent request was left alone: it completes and is answered.
    busy.send(b"\r\n")
    assert busy.read_response().body == b"GET /busy"
    proxy.wait_for_log(RECLAIMED)
    assert proxy.admin_port is not None
    metrics = admin_get(proxy.admin_port, "/metrics").body.decode()
    assert "\nrawproxy_idle_connections_reclaimed_total 1\n" in metrics


def test_at_max_connections_a_request_on_its_way_is_not_cut(start_proxy, http_backend, client):
    """The limit reached with a client whose request is in the kernel but not yet read (its
    bytes and the new client's connect came in the same turn): it is busy, not idle."""
    proxy = start_proxy(http_backend.port, "--max-connections", "1")
    for i in range(20):
        first = client(proxy.port, timeout=5)
        first.send(simple_get(f"/first/{i}"))
        second = client(proxy.port, timeout=5)
        second.send(simple_get(f"/second/{i}"))
        assert first.read_response().body == f"GET /first/{i}".encode()
        first.close()
        assert second.read_response().body == f"GET /second/{i}".encode()
        second.close()


def test_at_max_connections_a_connection_turning_idle_lets_a_waiting_client_in(
    start_proxy, http_backend, client
):
    """Accepting stopped at the limit with every connection busy; the moment one goes idle
    the waiting client takes its place, rather than after its idle timeout."""
    proxy = start_proxy(http_backend.port, "--max-connections", "1")
    busy = client(proxy.port, timeout=5)
    busy.send(PARTIAL_HEAD)
    waiting = client(proxy.port, timeout=5)
    waiting.send(simple_get("/waiting"))
    readable, _, _ = select.select([waiting.sock], [], [], 0.5)
    assert not readable, "a client beyond --max-connections 1 was served"
    busy.send(b"\r\n")  # the head is complete: answered, then idle
    assert busy.read_response().status == 200
    started = time.monotonic()
    resp = waiting.read_response()
    assert (resp.status, resp.body) == (200, b"GET /waiting")
    assert time.monotonic() - started < 2
    busy.wait_closed(timeout=2)


def test_at_max_connections_tunnels_are_never_reclaimed(start_proxy, ws_backend, client):
    proxy = start_proxy(ws_backend.port, "--max-connections", "1")
    tunnel_client = client(proxy.port, timeout=5)
    ws = open_websocket(tunnel_client)
    waiting = client(proxy.port, timeout=5)
    waiting.send(simple_get("/"))
    readable, _, _ = select.select([waiting.sock], [], [], 0.5)
    assert not readable, "a client beyond --max-connections 1 was served"
    ws.send("still here")
    assert ws.recv() == "still here"
