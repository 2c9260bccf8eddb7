"""Chunked bodies whose chunk-size lines end in a bare LF instead of CRLF (RFC 9112 7.1).

h11 ends a chunk-size line only at CRLF and waits for one, so such a body used to hang until
a timeout (60 s by default) with the head already relayed. It is refused as soon as it is
seen: the client's with 400 before the request reaches the backend whole, the backend's by
ending the answer (its head is out, so no 502 can follow), each with one log line."""

from __future__ import annotations

import time

import h11
import pytest
from peers import ScriptedConn, assert_serves, simple_get

from rawproxy.http import bare_lf_chunk_line
from rawproxy.session import _stuck_on_bare_lf

OTHER = "/still-ok"  # the target assert_serves uses


@pytest.mark.parametrize(
    "pending",
    [
        b"5\nhello\n0\n\n",
        b"5\n",
        b"a;ext=1\n",
        b"0 \n\n",
        b"FF\t;x\n",
        b"5;a\rb\n",  # a CR inside the extension, then a bare LF
        b"5;\r\r;x\nhello",
    ],
)
def test_a_chunk_line_ended_by_a_bare_lf_is_seen(pending):
    assert bare_lf_chunk_line(pending)
    # Refusing it at once refuses nothing h11 would take: whatever follows, h11 fails it.
    head = b"POST /up HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    conn = _waiting_server(head + pending)
    conn.receive_data(b"hello\r\n0\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        _events_until_waiting(conn)


@pytest.mark.parametrize(
    "pending",
    [
        b"",
        b"5",  # the line is not over yet
        b"5\r",
        b"5;ext",
        b"5;a\rb\r\n",  # a CR inside the extension is h11's to judge (it takes this line)
        b"5;a\rb",
        b"5\r\n",  # what h11 takes itself (never held, but must not be called bare)
        b"5;ext=1\r\nhello",
        b"X-Trailer: 1\n",  # a trailer line: h11 takes bare LF there
        b"abc: 1\n",  # a trailer field whose name is made of hex digits
        b"\r",  # the CRLF after a chunk's data, half arrived
        b"\n",
        b"zz\n",
    ],
)
def test_other_pending_bytes_are_not_a_bare_lf_chunk_line(pending):
    assert not bare_lf_chunk_line(pending)


def _events_until_waiting(conn: h11.Connection) -> None:
    while conn.next_event() not in (h11.NEED_DATA, h11.PAUSED):
        pass


def _waiting_server(data: bytes) -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    while conn.next_event() is not h11.NEED_DATA:
        pass
    return conn


def test_only_a_body_waiting_on_a_bare_lf_chunk_line_is_stuck():
    """The check looks at what h11 holds only while it reads a body: a head that is not over
    yet may hold the same bytes (here a request line that starts like a chunk size)."""
    head = b"POST /up HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert _stuck_on_bare_lf(_waiting_server(head + b"5\nhello\n"))
    assert not _stuck_on_bare_lf(_waiting_server(head + b"5\r\nhel"))
    assert not _stuck_on_bare_lf(_waiting_server(b"ABC\n"))  # a head, not a body


def test_a_request_body_with_bare_lf_chunk_lines_gets_400_at_once(
    start_proxy, http_backend, client
):
    proxy = start_proxy(http_backend.port, "--idle-timeout", "30", "--header-timeout", "30")
    mark = proxy.mark()
    c = client(proxy.port, timeout=10)
    start = time.monotonic()
    c.send(
        b"POST /echo HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"
    )
    resp = c.read_response()
    waited = time.monotonic() - start
    assert resp.status == 400
    assert waited < 3, f"answered after {waited:.1f} s"
    line = proxy.wait_for_log("chunk line", mark)
    assert "bare LF" in line, line
    assert_serves(proxy, http_backend)
    done = [r for r in http_backend.requests if r.target != OTHER.encode()]
    assert done == [], f"a complete request reached the backend: {done}"


def _answers_with_bare_lf_chunks(sc: ScriptedConn) -> str:
    if f" {OTHER} ".encode() in sc.head.split(b"\r\n", 1)[0]:
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    else:
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n")
    sc.sock.settimeout(20)
    sc.sock.recv(1)  # keeps the connection open until the proxy closes it
    return "sent"


def test_a_response_body_with_bare_lf_chunk_lines_is_cut_at_once(
    scripted_backend, start_proxy, client
):
    backend = scripted_backend(_answers_with_bare_lf_chunks)
    proxy = start_proxy(backend.port, "--response-timeout", "30")
    mark = proxy.mark()
    c = client(proxy.port, timeout=10)
    start = time.monotonic()
    c.send(simple_get("/bare-lf"))
    _, got = c.wait_closed(timeout=10)
    waited = time.monotonic() - start
    assert waited < 3, f"closed after {waited:.1f} s"
    # The head may have gone out before the body was read; the body never ends as if whole.
    assert got == b"" or got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert b"0\r\n\r\n" not in got, "the body was ended, as if complete"
    line = proxy.wait_for_log("chunk line", mark)
    assert "invalid response" in line, line
    assert "bare LF" in line, line
    assert_serves(proxy)
