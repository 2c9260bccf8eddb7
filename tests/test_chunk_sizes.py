"""Chunk sizes over 2**63 - 1, the limit a Content-Length has too (http.MAX_CONTENT_LENGTH).

h11 takes chunk sizes of up to 20 hex digits (80 bits). A proxy or server that keeps a chunk
size in 64 bits without an overflow check reads 2**64 + 5 as 5, and the bytes after those 5
as its next message: in front of rawproxy, another client's request would become this one's
body (RFC 9112 7.1 asks recipients to guard against such overflows). HAProxy and nginx refuse
such a size: a request with 400, an answer with 502 or a cut; so does rawproxy now."""

from __future__ import annotations

import socket
import time

import h11
import pytest
from peers import ScriptedConn, request_bytes

from rawproxy.http import MAX_CONTENT_LENGTH
from rawproxy.session import _chunk_too_large

HEAD = b"POST /up HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\n\r\n"


def _body_events(body: bytes) -> list[tuple[object, bool]]:
    """The events of HEAD + body up to the first wait or refusal, each with what
    _chunk_too_large said right after it (as the proxy calls it)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD + body)
    assert isinstance(conn.next_event(), h11.Request)
    events: list[tuple[object, bool]] = []
    while True:
        event = conn.next_event()
        too_large = _chunk_too_large(conn, event)
        events.append((event, too_large))
        if too_large or event is h11.NEED_DATA or isinstance(event, h11.EndOfMessage):
            return events


@pytest.mark.parametrize(
    ("size_line", "too_large"),
    [
        (b"%x" % MAX_CONTENT_LENGTH, False),
        (b"%x" % (MAX_CONTENT_LENGTH + 1), True),
        (b"%X" % (2**64 + 5), True),
        (b"0000000000000000000%x" % 5, False),  # 20 digits, value 5
        (b"ffffffffffffffffffff", True),  # 20 digits, the most h11 reads
    ],
)
@pytest.mark.parametrize("data", [b"", b"hello"], ids=["size-line-alone", "with-data"])
def test_the_chunk_size_limit(size_line, too_large, data):
    """Checked right after the size line, whether the chunk's first bytes came with it (the
    Data event that starts the chunk) or not yet (h11 waits for them)."""
    events = _body_events(size_line + b";ext=1\r\n" + data)
    assert events[-1][1] is too_large, events
    assert not any(refused for _, refused in events[:-1]), events


def test_later_chunks_of_a_body_are_checked_too():
    events = _body_events(b"5\r\nhello\r\n" + b"%x" % (2**64 + 5) + b"\r\nhello")
    assert [(type(e), refused) for e, refused in events] == [(h11.Data, False), (h11.Data, True)]


def test_an_answer_chunk_size_beyond_63_bits_relays_no_data(start_proxy, scripted_backend):
    """What follows the bad size line (framing, not content) never reaches the client as body:
    the answer is cut (its head may be out already), with one log line naming the fault."""

    def script(conn: ScriptedConn) -> None:
        conn.sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10000000000000005\r\nhello\r\n0\r\n\r\n0\r\n\r\n"
        )
        time.sleep(0.5)

    proxy = start_proxy(scripted_backend(script).port)
    mark = proxy.mark()
    got = bytearray()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        c.sendall(request_bytes("GET", "/huge-chunk", [("Host", "b.test")]))
        try:
            while chunk := c.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    assert b"hello" not in got, f"data after a bad chunk size reached the client: {got!r}"
    line = proxy.wait_for_log(r"/huge-chunk", mark)
    assert "a chunk size over 9223372036854775807" in line, line
