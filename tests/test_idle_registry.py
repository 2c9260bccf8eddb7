"""The server's register of idle sessions (the ones --max-connections may close for a new
client: kept alive between requests, or connected without a request yet) holds sessions only
while they are idle: one that closed must not stay in it, or every idle-timeout close would
leave a session behind for the proxy's lifetime; and one whose request is in the kernel but
not yet read is never picked to make room. Driven turn by turn on a real Server in the
test's process (the `inprocess_server` fixture)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from rawproxy.server import SPARE_GRACE, Server
from rawproxy.session import HEAD, IDLE, Session

pytestmark = pytest.mark.timeout(30)


def _turns_until(server: Server, done: Callable[[], bool], limit: int = 400) -> None:
    for _ in range(limit):
        server.loop.run_once(0.005)
        if done():
            return
    raise AssertionError("the proxy did not get there")


def _idle_session(
    server: Server, backend: socket.socket
) -> tuple[socket.socket, socket.socket, Session]:
    """A client served once through `server` (its connection now idle), the backend's
    side of the proxy's connection, and the session."""
    client = socket.create_connection(server.listeners[0].getsockname())
    client.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    conns: list[socket.socket] = []

    def backend_connected() -> bool:
        try:
            conns.append(backend.accept()[0])
        except BlockingIOError:
            return False
        return True

    _turns_until(server, backend_connected)
    conn = conns[0]
    conn.settimeout(5)
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    [session] = [c for c in server.connections if isinstance(c, Session)]
    _turns_until(server, lambda: session.phase == IDLE)
    client.settimeout(5)
    assert client.recv(65536).endswith(b"ok")
    return client, conn, session


def test_a_session_is_in_the_idle_register_only_while_idle(inprocess_server) -> None:
    server, backend = inprocess_server
    client, conn, session = _idle_session(server, backend)
    try:
        assert list(server.idle) == [session]
        # A new request takes it out while it is served, its answer puts it back.
        client.sendall(b"GET /again HTTP/1.1\r\nHost: app\r\n\r\n")
        _turns_until(server, lambda: session.phase != IDLE)
        assert session not in server.idle
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        _turns_until(server, lambda: session.phase == IDLE)
        assert list(server.idle) == [session]
    finally:
        client.close()
        conn.close()


def test_a_closed_idle_session_leaves_the_idle_register(inprocess_server) -> None:
    server, backend = inprocess_server
    client, conn, session = _idle_session(server, backend)
    try:
        assert session in server.idle
        client.close()  # closed while idle: the usual end of a kept-alive connection
        _turns_until(server, lambda: session not in server.connections)
        assert not server.idle, "a closed session stayed in the idle register"
    finally:
        conn.close()


def _fresh_session(server: Server) -> tuple[socket.socket, Session]:
    """A client connected through `server` that has sent nothing, and its session."""
    client = socket.create_connection(server.listeners[0].getsockname())
    client.settimeout(5)
    _turns_until(server, lambda: any(isinstance(c, Session) for c in server.connections))
    [session] = [c for c in server.connections if isinstance(c, Session)]
    return client, session


def test_a_new_connection_is_idle_until_its_request_begins(inprocess_server) -> None:
    server, _backend = inprocess_server
    client, session = _fresh_session(server)
    try:
        assert session.phase == HEAD
        assert list(server.idle) == [session]
        # Too new to tell from a client about to send its request: not closed yet.
        assert server._oldest_idle() is None
        assert server.spare_timer is not None, "nothing would look at the limit again"
        server.loop.now += SPARE_GRACE
        assert server._oldest_idle() is session
        client.sendall(b"GET / HTTP/1.1\r\n")  # half a head: busy now
        _turns_until(server, lambda: session not in server.idle)
        assert server._oldest_idle() is None
    finally:
        client.close()


def test_bytes_not_yet_read_make_a_session_busy(inprocess_server) -> None:
    """The loop has not read them yet (the new client's accept came first in its turn): the
    connection that sent them is not closed to make room, new or kept alive."""
    server, backend = inprocess_server
    fresh, session = _fresh_session(server)
    try:
        fresh.sendall(b"GET / HTTP/1.1\r\nHost: app\r\n")
        assert session in server.idle  # the loop has not turned since
        server.loop.now += SPARE_GRACE
        assert server._oldest_idle() is None
        assert session not in server.idle
    finally:
        fresh.close()
    _turns_until(server, lambda: not server.connections)
    client, conn, kept = _idle_session(server, backend)
    try:
        assert server._oldest_idle() is kept
        client.sendall(b"GET /next HTTP/1.1\r\nHost: app\r\n\r\n")
        assert kept.phase == IDLE
        assert server._oldest_idle() is None
        # Read and served as usual; idle again after its answer, and in the register again.
        _turns_until(server, lambda: kept.phase != IDLE)
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        _turns_until(server, lambda: kept.phase == IDLE)
        assert server._oldest_idle() is kept
    finally:
        client.close()
        conn.close()
