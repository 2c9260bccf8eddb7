"""A kept-alive connection is between requests (IDLE) as soon as its last answer is queued;
the end of a large answer to a slow reader may still wait to be sent. Draining the proxy
must not cut that answer short. Driven turn by turn on a real Server in the test's process
(the `inprocess_server` fixture)."""

from __future__ import annotations

import socket

from rawproxy.server import Server
from rawproxy.session import IDLE, Session

BODY = bytes(range(250)) * 400  # 100,000 bytes: one read of the backend's answer


def _turn(server: Server, times: int = 1) -> None:
    for _ in range(times):
        server.loop.run_once(0.005)


def _idle_with_backlog(server: Server, backend: socket.socket) -> tuple[socket.socket, Session]:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow, small reader
    client.connect(server.listeners[0].getsockname())
    client.sendall(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
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
