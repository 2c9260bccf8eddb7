"""One connection's flood of tiny body chunks neither holds the loop nor multiplies itself.

A chunked body of 1-byte chunks is one h11 event per 6 bytes. The proxy turns at most
PUMP_BUDGET of one connection's events into actions per turn of the loop, and passes a run of
body data on as one chunk. The first test drives a real Server in this process turn by turn
(no clock involved): another client's request is answered while the flood is still being
relayed. The others check through a running proxy that the chunks arrive joined and whole.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from rawproxy import session
from rawproxy.server import Server
from tests import peers

CHUNKS = 10_000
PAYLOAD = bytes(b"abcdefghij"[i % 10] for i in range(CHUNKS))
TINY_CHUNKED = b"".join(b"1\r\n%c\r\n" % byte for byte in PAYLOAD) + b"0\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def decode_chunked(data: bytes) -> tuple[bytes, int]:
    """The body of a complete chunked message body `data`, and how many chunks carried it."""
    body = bytearray()
    chunks = 0
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            assert data[pos:] == b"\r\n", "trailers or junk after the last chunk"
            return bytes(body), chunks
        body += data[pos : pos + size]
        assert data[pos + size : pos + size + 2] == b"\r\n"
        pos += size + 2
        chunks += 1


def _turns(server: Server, until: Callable[[], bool], limit: int = 500) -> int:
    for turn in range(1, limit + 1):
        server.loop.run_once(0.01)
        if until():
            return turn
    raise AssertionError(f"not done in {limit} turns of the loop")


def _accept(backend: socket.socket) -> socket.socket | None:
    try:
        conn = backend.accept()[0]
    except BlockingIOError:
        return None
    conn.setblocking(False)
    return conn


def _drain(conn: socket.socket, into: bytearray) -> None:
    try:
        while chunk := conn.recv(1 << 20):
            into += chunk
    except BlockingIOError:
        pass


def test_a_flood_of_tiny_chunks_does_not_hold_up_other_clients(
    inprocess_server: tuple[Server, socket.socket],
) -> None:
    server, backend = inprocess_server
    address = server.listeners[0].getsockname()
    flood = socket.create_connection(address, timeout=5)
    other = socket.create_connection(address, timeout=5)
    conns: list[socket.socket] = []
    try:
        flood.sendall(
            b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
            + TINY_CHUNKED
        )

        def accepted() -> bool:
            conn = _accept(backend)
            if conn is not None:
                conns.append(conn)
            return bool(conns)

        _turns(server, accepted)
        flood_conn = conns[0]
        flooded = bytearray()
        # The flood's head is at the backend; now another client asks for a page.
        other.sendall(b"GET /page HTTP/1.1\r\nHost: app\r\n\r\n")
        other.setblocking(False)
        answer = bytearray()

        def other_answered() -> bool:
            _drain(flood_conn, flooded)
            if len(conns) == 1:
                accepted()
            elif not answer:
                page = conns[1]
                request = bytearray()
                _drain(page, request)
                if request.endswith(b"\r\n\r\n"):
                    page.sendall(ANSWER)
                    answer.extend(b" ")  # asked and answered: wait for the client's copy
            try:
                got = other.recv(65536)
            except BlockingIOError:
                return False
            answer[:] = got
            return True

        _turns(server, other_answered)
        assert bytes(answer).startswith(b"HTTP/1.1 200 OK")
        assert not flooded.endswith(b"0\r\n\r\n"), (
            "the other client waited until the whole flood had been relayed"
        )
        _turns(server, lambda: (_drain(flood_conn, flooded), flooded.endswith(b"0\r\n\r\n"))[1])
        head, _, body = bytes(flooded).partition(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        data, chunks = decode_chunked(body)
        assert data == PAYLOAD
        # A turn's run of chunks goes on as one chunk.
        assert chunks <= CHUNKS // session.PUMP_BUDGET + 2
    finally:
        for sock in [flood, other, *conns]:
            sock.close()


def test_tiny_request_chunks_reach_the_backend_joined(
    start_proxy: Callable[..., peers.ProxyProcess],
    scripted_backend: Callable[..., peers.ScriptedBackend],
) -> None:
    def script(conn: peers.ScriptedConn) -> bytes:
        body = peers.recv_until(conn.sock, conn.extra, b"\r\n0\r\n\r\n", limit=1 << 20)
        conn.sock.sendall(ANSWER)
        return body

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(
            b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
            + TINY_CHUNKED
        )
        assert peers.recv_until(c, bytearray(), b"ok").startswith(b"HTTP/1.1 200 OK")
    data, chunks = decode_chunked(backend.result())
    assert data == PAYLOAD
    assert chunks <= CHUNKS // 10, f"{chunks} chunks for {CHUNKS} 1-byte chunks"


def test_tiny_response_chunks_reach_the_client_joined(
    start_proxy: Callable[..., peers.ProxyProcess],
    scripted_backend: Callable[..., peers.ScriptedBackend],
) -> None:
    def script(conn: peers.ScriptedConn) -> None:
        conn.sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + TINY_CHUNKED)

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(b"GET /stream HTTP/1.1\r\nHost: app\r\n\r\n")
        got = peers.recv_until(c, bytearray(), b"\r\n0\r\n\r\n", limit=1 << 20)
    backend.result()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    data, chunks = decode_chunked(body)
    assert data == PAYLOAD
    assert chunks <= CHUNKS // 10, f"{chunks} chunks for {CHUNKS} 1-byte chunks"


def test_each_pipelined_request_costs_its_own_head_not_all_that_follows(
    monkeypatch, inprocess_404_server
) -> None:
    """Every pipelined request after the first was checked (head_error, the field count) in a
    copy of everything the client had sent after it: up to a whole read (256 KiB) for a head
    of 30 bytes, so a read of pipelined requests cost the square of its size. With 404s (no
    route, no backend round trip between requests) one such client held the loop for 200 ms
    a turn, and an open WebSocket's echo on another connection took 550 ms instead of 0.3.
    Now a pipelined request's checks look at no more than --max-header-size of it."""
    seen: list[int] = []
    real = session.head_error

    def recording(data: bytes | bytearray, *args: int) -> tuple[int, str] | None:
        seen.append(len(data))
        return real(data, *args)

    monkeypatch.setattr(session, "head_error", recording)
    server = inprocess_404_server("--max-header-size", "4k")
    client = socket.create_connection(server.listeners[0].getsockname())
    try:
        client.sendall(b"GET /nowhere HTTP/1.1\r\nHost: app\r\n\r\n" * 5000)
        client.setblocking(False)
        answers = bytearray()
        counts = server.metrics.requests_by_class
        for _ in range(20_000):  # one answer of our own a turn
            server.loop.run_once(0)
            _drain(client, answers)
            if counts[4] >= 5000:
                break
        assert counts[4] == 5000
    finally:
        client.close()
    assert len(seen) >= 4000, "the pipelined requests were not checked one by one"
    average = sum(seen) / len(seen)
    assert average < 16 * 1024, f"{average:.0f} bytes looked at per pipelined request"


def test_pipelined_answers_of_our_own_are_one_a_turn(inprocess_404_server) -> None:
    """A pipelined request after one the proxy answered itself (404, no route) is handled in
    the next turn of the loop, after every other connection's events: in the same turn, up
    to PUMP_BUDGET events, some 128 answers (parsed, answered and logged) went out before
    anyone else had a turn, and an open WebSocket's echo on another connection took 50 ms
    per such client instead of 0.3 ms."""
    server = inprocess_404_server()
    client = socket.create_connection(server.listeners[0].getsockname())
    try:
        client.sendall(b"GET /nowhere HTTP/1.1\r\nHost: app\r\n\r\n" * 2000)
        client.setblocking(False)
        answers = bytearray()
        counts = server.metrics.requests_by_class
        most = 0
        for _ in range(300):
            before = counts[4]
            server.loop.run_once(0.001)
            most = max(most, counts[4] - before)
            _drain(client, answers)
        assert counts[4] >= 100, "the pipelined requests were not answered"
        assert most <= 2, f"{most} answers of the proxy's own in one turn of the loop"
    finally:
        client.close()
