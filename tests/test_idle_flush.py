"""A kept-alive connection is between requests (IDLE) as soon as its last answer is queued;
the end of a large answer to a slow reader may still wait to be sent. Draining the proxy
must not cut that answer short. Driven turn by turn on a real Server in the test's process
(the `inprocess_server` fixture)."""

from __future__ import annotations

import contextlib
import socket

from rawproxy.server import Server
from rawproxy.session import IDLE, Session

BODY = bytes(range(250)) * 400  # 100,000 bytes: one read of the backend's answer


def _turn(server: Server, times: int = 1) -> None:
    for _ in range(times):
        server.loop.run_once(0.005)


def _slow_download(
    server: Server, backend: socket.socket, half_close: bool = False
) -> tuple[socket.socket, Session]:
    """A client with a small receive buffer asks for BODY (and, with `half_close`, ends its
    side right after the request); the backend answers it whole and closes. Returns once the
    answer is with the proxy, the client's socket still blocking."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow, small reader
    client.connect(server.listeners[0].getsockname())
    client.sendall(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
    if half_close:
        client.shutdown(socket.SHUT_WR)
    conn = None
    for _ in range(200):
        _turn(server)
        try:
            conn = backend.accept()[0]
            break
        except BlockingIOError:
            pass
    assert conn is not None, "the proxy did not connect to the backend"
    conn.recv(65536)
    [session] = [c for c in server.connections if isinstance(c, Session)]
    # The proxy's side of the client's connection takes little at a time too.
    session.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
    conn.close()
    return client, session


def _idle_with_backlog(server: Server, backend: socket.socket) -> tuple[socket.socket, Session]:
    client, session = _slow_download(server, backend)
    for _ in range(200):
        _turn(server)
        if session.phase == IDLE:
            break
    assert session.phase == IDLE
    assert session.client.backlog is not None, "the answer went out whole: nothing to test"
    client.setblocking(False)
    return client, session


def _read_all(server: Server, client: socket.socket) -> bytes:
    got = bytearray()
    for _ in range(2000):
        _turn(server)
        try:
            chunk = client.recv(65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += chunk
    return bytes(got)


def test_draining_lets_the_last_answer_finish(inprocess_server) -> None:
    server, backend = inprocess_server
    client, session = _idle_with_backlog(server, backend)
    session.drain()
    got = _read_all(server, client)  # the proxy closes once it is all out
    client.close()
    assert got.endswith(b"\r\n\r\n" + BODY), f"{len(got)} bytes arrived"


def test_pipelined_404s_wait_for_a_client_that_does_not_read(inprocess_404_server) -> None:
    """Answers the proxy gives itself (404: no route) to pipelined requests used to be queued
    however many the client sent, whether or not it read them: a client that pipelined
    without reading grew its connection's backlog with every request it sent (20 MB a
    minute through a running proxy, without end: each request re-armed the header timeout).
    Now the next request waits until the answers before it are out, as nginx's and HAProxy's
    do, so the client's unread answers stop at what the kernel buffers."""
    server = inprocess_404_server()
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
        client.connect(server.listeners[0].getsockname())
        client.setblocking(False)
        pipelined = b"GET /nowhere HTTP/1.1\r\nHost: app\r\n\r\n" * 100
        sessions: list[Session] = []
        most = 0
        for _ in range(300):
            with contextlib.suppress(BlockingIOError):
                client.send(pipelined)
            _turn(server)
            if not sessions:
                sessions = [c for c in server.connections if isinstance(c, Session)]
                if sessions:
                    sessions[0].client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                continue
            most = max(most, len(sessions[0].client.backlog or b""))
        assert sessions, "the proxy did not accept the client"
        assert most > 0, "the answers went out whole: nothing to test"
        assert most < 16 * 1024, f"{most} bytes of answers queued for a client that reads none"
    finally:
        client.close()


def test_a_client_that_half_closed_gets_the_whole_answer(inprocess_server) -> None:
    """A client may end its side once its last request is sent (shutdown(SHUT_WR)). The
    proxy saw that end when the exchange was over and closed at once, with the end of a large
    answer still in its backlog for a slow reader: the client got a truncated answer. Now
    the answer goes out first, as after a Connection: close (or on drain)."""
    server, backend = inprocess_server
    client, _ = _slow_download(server, backend, half_close=True)
    client.setblocking(False)
    got = _read_all(server, client)
    client.close()
    assert got.endswith(b"\r\n\r\n" + BODY), f"{len(got)} bytes arrived"


def test_an_idle_connection_passed_over_while_flushing_may_make_room_later(
    inprocess_server,
) -> None:
    """At --max-connections the longest idle kept-alive connection makes room for a new
    client, but not one whose last answer is still going out (closing it would cut that
    answer): the scan drops it from the idle register. Once its answer was out it stayed
    unregistered until its next request, so it could no longer make room (new clients waited
    in the backlog for its --idle-timeout). Now it registers again when flushed."""
    server, backend = inprocess_server
    client, session = _idle_with_backlog(server, backend)
    assert server._oldest_idle() is None  # still sending: passed over, and dropped
    assert session not in server.idle
    got = bytearray()
    for _ in range(2000):
        _turn(server)
        with contextlib.suppress(BlockingIOError):
            got += client.recv(65536)
        if got.endswith(BODY):
            break
    assert got.endswith(b"\r\n\r\n" + BODY), f"{len(got)} bytes arrived"
    _turn(server, 3)
    assert session.is_idle()
    assert server._oldest_idle() is session
    client.close()
