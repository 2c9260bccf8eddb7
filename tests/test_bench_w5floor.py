"""benchmarks/w5floor.py, the W5 floor relay that benchmarks/README.md quotes, does the work it
claims to do: a figure from a relay that skipped the HTTP work (or broke the handshake) would
make the floor look lower than it is."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.peers import LOOPBACK, free_port, recv_until, wait_closed

ROOT = Path(__file__).resolve().parent.parent
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


Start = Callable[..., int]


@pytest.fixture
def floor() -> Iterator[tuple[Start, socket.socket]]:
    """A backend listener, and a function that starts a floor relay in front of it (with
    extra arguments) and returns the relay's port."""
    backend = socket.create_server((LOOPBACK, 0))
    backend.settimeout(5)
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> int:
        port = free_port()
        backend_port = str(backend.getsockname()[1])
        argv = ["-m", "benchmarks.w5floor", "--port", str(port), "--backend-port", backend_port]
        proc = subprocess.Popen([sys.executable, *argv, *args], cwd=ROOT)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
                return port
            assert proc.poll() is None, "the floor relay exited"
            time.sleep(0.05)
        raise AssertionError("the floor relay did not listen")

    try:
        yield start, backend
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)
        backend.close()


def handshake(port: int, backend: socket.socket, request: bytes) -> tuple[bytes, bytes]:
    """One handshake and a tunnel both ways with half-closes: (what the backend got, what the
    client got)."""
    got: dict[str, bytes] = {}

    def serve() -> None:
        conn, _ = backend.accept()
        with conn:
            conn.settimeout(5)
            rest = bytearray()
            got["head"] = recv_until(conn, rest, b"\r\n\r\n")
            conn.sendall(SWITCH + b"from backend")
            how, tunnel = wait_closed(conn, 5)  # ends with the client's half-close
            assert how == "eof"
            got["tunnel"] = bytes(rest) + tunnel
            conn.sendall(b" after client end")
            conn.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection((LOOPBACK, port), timeout=5) as client:
        client.sendall(request)
        time.sleep(0.2)
        client.sendall(b"from client")
        client.shutdown(socket.SHUT_WR)
        how, answer = wait_closed(client, 5)
        assert how == "eof"
    thread.join(5)
    return got["head"] + b"|" + got.get("tunnel", b""), answer


@pytest.mark.timeout(30)
def test_the_floor_does_rawproxys_http_work(floor: tuple[Start, socket.socket]) -> None:
    start, backend = floor
    port = start()
    request = (
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: keep-alive, Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    at_backend, at_client = handshake(port, backend, request)
    head, tunnel = at_backend.split(b"|", 1)
    # The head rawproxy's fast path writes: hop-by-hop lines out, forwarded headers and its
    # own Connection/Upgrade in.
    assert head == (
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Forwarded-For: 127.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: app.test\r\n"
        b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert tunnel == b"from client"
    assert at_client == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nConnection: upgrade\r\n\r\n"
        b"from backend after client end"
    )


@pytest.mark.timeout(30)
def test_the_floor_refuses_what_is_no_upgrade(floor: tuple[Start, socket.socket]) -> None:
    start, backend = floor
    port = start()
    backend.settimeout(0.5)
    with socket.create_connection((LOOPBACK, port), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert wait_closed(client, 5) == ("eof", b"")
    with pytest.raises(TimeoutError):
        backend.accept()  # never connected to the backend


@pytest.mark.timeout(30)
def test_the_bare_floor_relays_bytes_as_they_come(floor: tuple[Start, socket.socket]) -> None:
    start, backend = floor
    port = start("--bare")
    request = b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
    at_backend, at_client = handshake(port, backend, request)
    assert at_backend == request + b"|from client"
    assert at_client == SWITCH + b"from backend after client end"
