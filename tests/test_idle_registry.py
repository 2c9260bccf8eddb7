"""The server's register of idle kept-alive sessions (the ones --max-connections may close
for a new client) holds sessions only while they are idle: one that closed must not stay in
it, or every idle-timeout close would leave a session behind for the proxy's lifetime.
Driven turn by turn on a real Server in the test's process (the `inprocess_server` fixture)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from rawproxy.server import Server
from rawproxy.session import IDLE, Session

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
