"""The floor of a WebSocket handshake relay in Python: what W5 plain could reach at best.

    python -m benchmarks.w5floor --port P --backend-port B [--bare]

A relay with one epoll loop and no proxy around it, for one measurement: how many
handshakes per second (connect, upgrade, 101, close) a single CPython process can relay on
this machine when it does only the work every handshake needs. It is not a proxy: anything
but a simple upgrade is closed, nothing is logged or counted, errors close the connection.

- default: per handshake the protocol work rawproxy's fast path does (the same functions of
  `rawproxy.http`: parse and check the request head, decide the upgrade, write the head for
  the backend with forwarded headers, parse and check the 101, write the client's head), a
  header timeout and a response timeout in a timer heap, the garbage collector settled as
  rawproxy settles it; then a copying tunnel that carries each end of stream over;
- `--bare`: the same sockets and system calls with no HTTP at all (bytes relayed as they
  come), the floor of the interpreter and the kernel alone.

Run it where the harness runs rawproxy (CPU 1; the backend and the load on CPU 0):

    B=~/.cache/rawproxy-bench/benchtool-*   # built by `python -m benchmarks`
    taskset -c 0 $B serve --port 19101 &
    taskset -c 1 python -m benchmarks.w5floor --port 19102 --backend-port 19101 &
    taskset -c 0 $B handshake --port 19102 --inflight 50 --seconds 3

and the same with rawproxy (`--listen 127.0.0.1:19102 --backend 127.0.0.1:19101
--log-level warning`) and HAProxy (`nbthread 1`) on port 19102; benchmarks/README.md has
the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import select
import socket
import time
from collections.abc import Callable

from rawproxy.http import (
    decided_upgrade,
    header_lines,
    parse_simple_request,
    parse_simple_response,
    plain_request_head,
    plain_switch_head,
)
from rawproxy.loop import settle_gc

READ = select.EPOLLIN
CHUNK = 64 * 1024
HEAD_LIMIT = 64 * 1024
HEADER_TIMEOUT = 10.0
RESPONSE_TIMEOUT = 60.0


class Timers:
    """A heap of (when, seq, entry); an entry is [callback] and cancelling empties it."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, list[Callable[[], None]]]] = []
        self.seq = itertools.count()

    def later(self, delay: float, callback: Callable[[], None]) -> list[Callable[[], None]]:
        entry = [callback]
        heapq.heappush(self.heap, (time.monotonic() + delay, next(self.seq), entry))
        return entry

    def run(self) -> None:
        heap = self.heap
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)[2]
            if entry:
                entry.pop()()


class Relay:
    def __init__(self, port: int, backend_port: int, bare: bool) -> None:
        self.backend = ("127.0.0.1", backend_port)
        self.bare = bare
        self.epoll = select.epoll()
        self.callbacks: dict[int, Callable[[int], None]] = {}
        self.timers = Timers()
        # The forwarded lines for a client address and Host, as rawproxy keeps them.
        self.forwarded: dict[tuple[str, bytes], bytes] = {}
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.epoll.register(self.listener.fileno(), READ)
        self.callbacks[self.listener.fileno()] = self.accept

    def accept(self, _mask: int) -> None:
        while True:
            try:
                sock, address = self.listener.accept()
            except OSError:  # none waiting (or out of descriptors: later)
                return
            sock.setblocking(False)
            pair = Pair(self, sock, address[0])
            self.epoll.register(sock.fileno(), READ)
            self.callbacks[sock.fileno()] = pair.on_client

    def forwarded_lines(self, ip: str, host: bytes) -> bytes:
        lines = self.forwarded.get((ip, host))
        if lines is None:
            lines = self.forwarded[ip, host] = header_lines(
                [
                    (b"X-Forwarded-For", ip.encode()),
                    (b"X-Forwarded-Proto", b"http"),
                    (b"X-Forwarded-Host", host),
                ]
            )
        return lines

    def run(self) -> None:
        settle_gc()
        callbacks = self.callbacks
        while True:
            for fd, mask in self.epoll.poll(1.0):
                callback = callbacks.get(fd)
                if callback is not None:
                    try:
                        callback(mask)
                    except OSError:
                        owner = callback.__self__  # type: ignore[attr-defined]
                        owner.close()
            self.timers.run()


class Pair:
    """One client connection and its backend connection: head, 101, then a tunnel."""

    __slots__ = ("backend", "client", "ends", "ip", "relay", "state", "timer", "upgrade")

    def __init__(self, relay: Relay, client: socket.socket, ip: str) -> None:
        self.relay = relay
        self.client = client
        self.ip = ip
        self.backend: socket.socket | None = None
        self.state = 0  # 0 head, 1 awaiting the 101, 2 tunnel
        self.ends = 0
        self.upgrade = False
        self.timer = relay.timers.later(HEADER_TIMEOUT, self.close)

    def on_client(self, _mask: int) -> None:
        data = self.client.recv(CHUNK)
        if self.state == 0:
            if not data:
                self.close()
                return
            head = data
            if not self.relay.bare:
                request = parse_simple_request(data, HEAD_LIMIT)
                if request is None or not request.upgrade_fields or not request.plain:
                    self.close()
                    return
                decision = decided_upgrade(request.upgrade_fields)
                if decision.upgrade is None:
                    self.close()
                    return
                added = self.relay.forwarded_lines(self.ip, request.raw[0][1])
                head = plain_request_head(data, request, request.target, added, decision.upgrade)
            backend = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            self.backend = backend
            backend.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend.connect_ex(self.relay.backend)
            backend.send(head)  # a loopback backend has accepted by now (rawproxy's bet too)
            self.timer.clear()
            self.timer = self.relay.timers.later(RESPONSE_TIMEOUT, self.close)
            self.relay.epoll.register(backend.fileno(), READ)
            self.relay.callbacks[backend.fileno()] = self.on_backend
            self.relay.epoll.modify(self.client.fileno(), 0)
            self.state = 1
            return
        assert self.backend is not None
        self.carry(data, self.client, self.backend)

    def on_backend(self, _mask: int) -> None:
        assert self.backend is not None
        data = self.backend.recv(CHUNK)
        if self.state == 1:
            out = data
            if not self.relay.bare:
                response = parse_simple_response(data, upgrade=True)
                if response is None or response.status != 101 or not response.plain:
                    self.close()
                    return
                out = plain_switch_head(data, response) + data[response.head_size :]
            self.client.sendall(out)
            self.timer.clear()
            self.state = 2
            self.relay.epoll.modify(self.client.fileno(), READ)
            return
        self.carry(data, self.backend, self.client)

    def carry(self, data: bytes, src: socket.socket, dst: socket.socket) -> None:
        """In the tunnel: what `src` sent goes to `dst`; its end of stream becomes a
        half-close of `dst`, and the pair closes when both ends came."""
        if data:
            dst.sendall(data)
            return
        dst.shutdown(socket.SHUT_WR)
        self.relay.epoll.modify(src.fileno(), 0)
        self.ends += 1
        if self.ends == 2:
            self.close()

    def close(self) -> None:
        self.timer.clear()
        for sock in (self.client, self.backend):
            if sock is not None and sock.fileno() >= 0:
                del self.relay.callbacks[sock.fileno()]
                sock.close()  # closing leaves the epoll set


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.w5floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    parser.add_argument("--backend-port", type=int, required=True, help="backend on loopback")
    parser.add_argument("--bare", action="store_true", help="relay bytes with no HTTP at all")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        Relay(args.port, args.backend_port, args.bare).run()


if __name__ == "__main__":
    main()
