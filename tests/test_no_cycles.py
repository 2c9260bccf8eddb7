"""A finished connection leaves no reference cycles behind: reference counting frees its
Session, legs and Tunnel the moment it ends. Cycles there cost twice: the cyclic GC ran every
few hundred handshakes and took about 7 % of W5, and a cancelled timer or a cycle kept closed
connections (sockets, buffers, h11 machines) in memory until the GC came round.

The proxy runs in this process, driven turn by turn (no thread, no sleeping), against a
backend and clients on loopback sockets."""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from peers import RESPONSE_101, tunnel_request

from rawproxy.cli import build_parser, load_settings
from rawproxy.server import Server
from rawproxy.session import Session
from rawproxy.transport import Leg
from rawproxy.tunnel import Tunnel

pytestmark = pytest.mark.timeout(60)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Driven:
    """A Server in this process, a backend listener, and a way to run loop turns."""

    def __init__(self) -> None:
        self.backend_listener = socket.create_server(("127.0.0.1", 0))
        self.backend_listener.setblocking(False)
        port = self.backend_listener.getsockname()[1]
        args = build_parser().parse_args(
            ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{port}", "--log-level", "error"]
        )
        config, _ = load_settings(args)
        self.server = Server(config)
        self.server.open()
        self.server._accept_on()
        self.port = self.server.listeners[0].getsockname()[1]

    def turns(self, until: Callable[[], bool] = lambda: True, limit: float = 5.0) -> None:
        """Run loop turns until `until()` holds (one turn by default, at most `limit` s)."""
        loop = self.server.loop
        deadline = time.monotonic() + limit
        while True:
            loop.run_once(0.01)
            if until() or time.monotonic() > deadline:
                return

    def backend_conn(self) -> socket.socket:
        found: list[socket.socket] = []

        def accepted() -> bool:
            try:
                found.append(self.backend_listener.accept()[0])
            except BlockingIOError:
                return False
            return True

        self.turns(accepted)
        assert found, "the proxy did not connect to the backend"
        found[0].setblocking(True)
        found[0].settimeout(5)
        return found[0]

    def client(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.turns()
        return sock

    def read(self, sock: socket.socket, upto: bytes) -> bytes:
        data = b""
        deadline = time.monotonic() + 5
        while upto not in data:
            assert time.monotonic() < deadline, f"waited for {upto!r}, got {data!r}"
            self.turns()
            try:
                sock.setblocking(False)
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            finally:
                sock.setblocking(True)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.server.stop()
        self.backend_listener.close()


@pytest.fixture
def driven() -> Iterator[Driven]:
    d = Driven()
    yield d
    d.close()


def websocket_then_close(d: Driven) -> None:
    c = d.client()
    c.sendall(tunnel_request())
    b = d.backend_conn()
    assert b.recv(65536).startswith(b"GET /tunnel")
    b.sendall(RESPONSE_101 + b"server first")
    assert d.read(c, b"server first").startswith(b"HTTP/1.1 101")
    c.sendall(b"client bytes")
    d.turns(lambda: False, 0.05)
    assert b.recv(65536) == b"client bytes"
    c.close()
    d.turns(lambda: False, 0.05)
    assert b.recv(65536) == b""  # the half-close came through
    b.close()
    d.turns(lambda: not d.server.connections)


def keepalive_get_then_close(d: Driven) -> None:
    c = d.client()
    c.sendall(b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\n")
    b = d.backend_conn()
    assert b.recv(65536).startswith(b"GET /a")
    b.sendall(OK)
    assert d.read(c, b"hello").startswith(b"HTTP/1.1 200")
    c.sendall(b"POST /b HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc")  # h11's path
    d.turns(lambda: False, 0.05)
    assert b"abc" in b.recv(65536)
    b.sendall(OK)
    assert d.read(c, b"hello").startswith(b"HTTP/1.1 200")
    c.close()
    d.turns(lambda: not d.server.connections)
    b.close()
    d.turns(lambda: False, 0.05)


def malformed_then_close(d: Driven) -> None:
    c = d.client()
    c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    assert d.read(c, b"\r\n\r\n").startswith(b"HTTP/1.1 400")
    c.close()
    d.turns(lambda: not d.server.connections)


@pytest.mark.parametrize(
    "scenario", [websocket_then_close, keepalive_get_then_close, malformed_then_close]
)
def test_a_finished_connection_is_freed_without_the_cyclic_gc(driven, scenario):
    scenario(driven)  # once first: imports, caches and lazily made objects settle
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            scenario(driven)
        assert not driven.server.connections
        gc.collect()
        ours = [o for o in gc.garbage if isinstance(o, Session | Tunnel | Leg)]
        assert not ours, f"{len(ours)} objects of finished connections were in reference cycles"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
