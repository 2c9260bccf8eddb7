"""Backend answers that the client must get in the form its HTTP version and the answer's
status allow: found by a black-box review of what backends send (each test failed before
the change it came with)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from tests import peers

Start = Callable[..., peers.ProxyProcess]
Scripted = Callable[..., peers.ScriptedBackend]


def _ask(port: int, request: bytes) -> bytes:
    """Send `request` and read until the proxy closes (or 5 s of silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(request)
        got = bytearray()
        try:
            while chunk := c.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return bytes(got)


def test_an_http10_client_gets_a_chunked_answer_with_trailers_without_them(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    def script(conn: peers.ScriptedConn) -> None:
        conn.sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: Server-Timing\r\n\r\n"
            b"5\r\nhello\r\n0\r\nServer-Timing: db;dur=53\r\n\r\n"
        )

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    got = _ask(proxy.port, b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), got
    assert body == b"hello"  # close-delimited, as HTTP/1.0 reads it
    assert b"Server-Timing" not in got


def test_an_http10_client_gets_no_interim_answer(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    def script(conn: peers.ScriptedConn) -> None:
        conn.sock.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        )

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    got = _ask(proxy.port, b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 OK\r\n"), got
    assert got.endswith(b"\r\n\r\nhello")
    assert b"103" not in got


def test_an_http11_client_still_gets_interim_answers(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    def script(conn: peers.ScriptedConn) -> None:
        conn.sock.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    got = _ask(proxy.port, b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 103 Early Hints\r\n"), got
    assert b"\r\n\r\nHTTP/1.1 200 OK\r\n" in got


def test_bodiless_answers_carry_no_framing_headers(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    answers = {
        b"/204-length": b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\n",
        b"/204-chunked": b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"/100-length": (
            b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
        ),
    }

    def script(conn: peers.ScriptedConn) -> None:
        target = conn.head.split(b" ")[1]
        conn.sock.sendall(answers[target])

    for target in answers:
        backend = scripted_backend(script)
        proxy = start_proxy(backend.port)
        got = _ask(
            proxy.port, b"GET %s HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n" % target
        )
        assert b" 204 No Content\r\n" in got, (target, got)
        lowered = got.lower()
        assert b"content-length" not in lowered, (target, got)
        assert b"transfer-encoding" not in lowered, (target, got)


def test_a_101_that_names_no_protocol_is_refused(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    def script(conn: peers.ScriptedConn) -> None:
        conn.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\nRAW")

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    got = _ask(proxy.port, peers.websocket_request())
    assert got.startswith(b"HTTP/1.1 502 "), got
    assert b"RAW" not in got
    proxy.wait_for_log("no Upgrade header")


def test_a_101_passes_on_no_framing_headers(start_proxy: Start, scripted_backend: Scripted) -> None:
    """A 101 has no body (the bytes after it are the tunnel's): a Content-Length or
    Transfer-Encoding the backend wrote in it reached the client, which could take the first
    tunnel bytes for a body, as the 100 and 204 answers were already kept from doing."""
    answers = {
        b"/length": b"Content-Length: 5\r\n",
        b"/chunked": b"Transfer-Encoding: chunked\r\n",
    }

    def script(conn: peers.ScriptedConn) -> None:
        framing = answers[conn.head.split(b" ")[1]]
        conn.sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + framing
            + b"\r\nTUNNEL"
        )

    for target in answers:
        backend = scripted_backend(script)
        proxy = start_proxy(backend.port)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            c.sendall(peers.websocket_request(target.decode()))
            buf = bytearray()
            head = peers.recv_until(c, buf, b"\r\n\r\n")
            rest = peers.recv_exact(c, 6, buf)
        assert head.startswith(b"HTTP/1.1 101 "), (target, head)
        lowered = head.lower()
        assert b"content-length" not in lowered, (target, head)
        assert b"transfer-encoding" not in lowered, (target, head)
        assert rest == b"TUNNEL", (target, rest)


def test_an_answer_before_the_end_of_an_upload_says_the_connection_closes(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    def script(conn: peers.ScriptedConn) -> None:
        conn.sock.sendall(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic\r\nContent-Length: 4\r\n\r\nauth"
        )

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        c.sendall(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nabc")
        head = peers.recv_until(c, bytearray(), b"\r\n\r\n")
    status, headers = peers.parse_head(head)
    assert status.startswith(b"HTTP/1.1 401"), head
    assert peers.header_tokens(headers, "connection") == [b"close"], head


def test_a_whole_upload_answered_keeps_the_connection(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    def script(conn: peers.ScriptedConn) -> None:
        conn.recv_exact(3)
        conn.sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        c.sendall(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc")
        head = peers.recv_until(c, bytearray(), b"\r\n\r\n")
    _, headers = peers.parse_head(head)
    assert head.startswith(b"HTTP/1.1 201"), head
    assert peers.header_tokens(headers, "connection") == [], head


def test_a_response_head_over_the_limit_is_refused_however_it_arrives(
    start_proxy: Start, scripted_backend: Scripted
) -> None:
    """--max-header-size bounds the backend's head too: one that came whole in one read
    was passed on whatever its size (h11 bounds only heads that arrive in pieces), so the
    limit depended on how TCP cut the bytes."""
    big = b"X-Big: " + b"a" * 30_000 + b"\r\n"
    heads = {
        b"/simple": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + big + b"\r\nok",
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + big + b"\r\n0\r\n\r\n",
        b"/interim": b"HTTP/1.1 103 Early Hints\r\n" + big + b"\r\n",
    }

    def script(conn: peers.ScriptedConn) -> None:
        conn.sock.sendall(heads[conn.head.split(b" ")[1]])

    for target in heads:
        backend = scripted_backend(script)
        proxy = start_proxy(backend.port, "--max-header-size", "8192")
        mark = proxy.mark()
        got = _ask(
            proxy.port, b"GET %s HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n" % target
        )
        assert got.startswith(b"HTTP/1.1 502 "), (target, got[:100])
        assert b"aaaa" not in got
        proxy.wait_for_log("over the limit of 8192", mark)
