"""One leg of a session: a non-blocking socket with interest tracking and a write backlog.

A leg keeps bytes of its own only when a send was partial (`backlog`); reads go into the
loop's shared buffer. Interest is changed in the selector only when it differs from what is
registered, so a connection whose state does not change costs no system calls.

Errors from the operating system are not translated here: `OSError` subclasses (reset,
broken pipe) propagate to the session, which knows what they mean for the exchange.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence

from rawproxy.loop import Callback, Loop

Buffer = bytes | bytearray | memoryview


class Leg:
    __slots__ = ("backlog", "callback", "fd", "interest", "loop", "sock")

    def __init__(self, loop: Loop, sock: socket.socket, callback: Callback) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.callback = callback
        self.interest = 0
        self.backlog: bytearray | None = None

    def want(self, events: int) -> None:
        """Set the selector interest to exactly `events` (0 unregisters)."""
        current = self.interest
        if events == current:
            return
        if current == 0:
            self.loop.add(self.fd, events, self.callback)
        elif events == 0:
            self.loop.remove(self.fd)
        else:
            self.loop.modify(self.fd, events, self.callback)
        self.interest = events

    def receive(self) -> memoryview | None:
        """Read what is there into the loop's shared buffer; return a view of it (empty at
        end of stream) or None when nothing can be read now. The view is valid until the
        next read by anyone."""
        try:
            n = self.sock.recv_into(self.loop.read_buffer)
        except (BlockingIOError, InterruptedError):
            return None
        return self.loop.read_view[:n]

    def send_parts(self, parts: Sequence[Buffer]) -> bool:
        """Send `parts` in order after any backlog; keep what the kernel did not take.
        Return True when nothing is left waiting."""
        if self.backlog is not None:
            for part in parts:
                self.backlog += part
            return False
        parts = [p for p in parts if len(p)]
        if not parts:
            return True
        try:
            sent = self.sock.sendmsg(parts) if len(parts) > 1 else self.sock.send(parts[0])
        except (BlockingIOError, InterruptedError):
            sent = 0
        total = sum(len(p) for p in parts)
        if sent == total:
            return True
        backlog = bytearray()
        for part in parts:
            size = len(part)
            if sent >= size:
                sent -= size
                continue
            backlog += memoryview(part)[sent:]
            sent = 0
        self.backlog = backlog
        return False

    def send(self, data: Buffer) -> bool:
        return self.send_parts((data,))

    def flush(self) -> bool:
        """Send what waits in the backlog; True when it is empty."""
        backlog = self.backlog
        if backlog is None:
            return True
        try:
            sent = self.sock.send(backlog)
        except (BlockingIOError, InterruptedError):
            return False
        del backlog[:sent]
        if backlog:
            return False
        self.backlog = None
        return True

    def detach(self) -> socket.socket:
        """Stop watching the socket and hand it over (to a tunnel)."""
        self.want(0)
        return self.sock

    def close(self, reset: bool = False) -> None:
        self.want(0)
        if reset:
            abort_on_close(self.sock)
        self.sock.close()


def abort_on_close(sock: socket.socket) -> None:
    """Make close() send a reset instead of a FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def set_nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_keepalive(sock: socket.socket, idle: int) -> None:
    """TCP keepalive probes after `idle` seconds of silence, then every idle/3 seconds; a
    peer that misses 3 probes is dead. 0 turns keepalive off."""
    try:
        if idle <= 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 3))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass
