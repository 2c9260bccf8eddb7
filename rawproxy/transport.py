"""One leg of a session: a non-blocking socket with interest tracking and a write backlog.

A leg keeps bytes of its own only when a send was partial (`backlog`); reads go into the
loop's shared buffer. Interest is changed in the selector only when it differs from what is
registered, so a connection whose state does not change costs no system calls.

A leg may be TLS (an `ssl.SSLSocket` in non-blocking mode): then "would block" arrives as
SSLWantReadError/SSLWantWriteError instead of BlockingIOError, decrypted bytes may wait inside
the SSL object where the selector cannot see them (`pending()`), sendmsg() is not available,
and an orderly end of stream is a close_notify alert before the TCP FIN.

Errors from the operating system are not translated here: `OSError` subclasses (reset,
broken pipe, TLS alerts) propagate to the session, which knows what they mean for the exchange.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Sequence

from rawproxy.loop import READ, WRITE, Callback, Loop

Buffer = bytes | bytearray | memoryview
# What a non-blocking socket, plain or TLS, raises instead of blocking.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def receive_into(sock: socket.socket, view: memoryview) -> int:
    """Read what is there into `view`: the byte count, 0 at end of stream, -1 when nothing can
    be read now. A TLS socket is read record after record until the view is full or nothing
    more is there, so that one readiness event moves more than one 16 KiB record."""
    try:
        total = sock.recv_into(view)
    except WOULD_BLOCK:
        return -1
    except ssl.SSLZeroReturnError:
        # The peer's close_notify after we sent ours: ssl reports it as an error, not as the
        # end of stream it is.
        return 0
    if total == 0 or not isinstance(sock, ssl.SSLSocket):
        return total
    size = len(view)
    while total < size:
        try:
            n = sock.recv_into(view[total:])
        except (*WOULD_BLOCK, ssl.SSLZeroReturnError):
            break
        if n == 0:
            break  # end of stream; the next read reports it
        total += n
    return total


def send_close_notify(sock: socket.socket, still_reading: bool = False) -> None:
    """End our direction of a stream: on TLS the close_notify alert, then a TCP half-close.

    `still_reading` says the other direction of this socket is still being read. Then no
    close_notify is sent, only the FIN: the ssl module cannot send the alert without going
    on to wait for the peer's, and that wait reads and *discards* whatever application data
    the peer is still sending (CPython calls SSL_shutdown twice). Losing bytes is worse than
    a peer seeing a FIN without the alert, which every TLS stack we meet reads as the end.
    """
    if isinstance(sock, ssl.SSLSocket) and not still_reading:
        # In non-blocking mode unwrap() sends the alert, then raises SSLWantReadError waiting
        # for the peer's: that is all we want from it.
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            sock.unwrap()
    socket.socket.shutdown(sock, socket.SHUT_WR)


class Leg:
    __slots__ = ("backlog", "callback", "fd", "interest", "loop", "sock", "tls")

    def __init__(self, loop: Loop, sock: socket.socket, callback: Callback) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.callback = callback
        self.interest = 0
        self.backlog: bytearray | None = None
        self.tls = isinstance(sock, ssl.SSLSocket)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        """Wrap the (connected) socket; the handshake is then run by `handshake()`."""
        self.sock = context.wrap_socket(
            self.sock,
            server_side=server_hostname is None,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
        )
        self.tls = True

    def handshake(self) -> int:
        """One step of the TLS handshake: 0 when it is done, else the event it waits for.
        Raises ssl.SSLError (or OSError) when it fails."""
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return READ
        except ssl.SSLWantWriteError:
            return WRITE
        return 0

    def pending(self) -> bool:
        """Decrypted bytes wait inside the SSL object (the selector cannot see them)."""
        return self.tls and self.sock.pending() > 0  # type: ignore[attr-defined]

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
        n = receive_into(self.sock, self.loop.read_view)
        if n < 0:
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
        if len(parts) > 1 and self.tls:
            parts = [b"".join(parts)]  # SSLSocket has no sendmsg()
        try:
            sent = self.sock.sendmsg(parts) if len(parts) > 1 else self.sock.send(parts[0])
        except WOULD_BLOCK:
            # A TLS write that would block must be retried with the same bytes: the backlog
            # keeps them, in order, and only grows at its end.
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
        except WOULD_BLOCK:
            return False
        del backlog[:sent]
        if backlog:
            return False
        self.backlog = None
        return True

    def shutdown_write(self) -> None:
        """Half-close: end of stream toward the peer (close_notify first on TLS)."""
        send_close_notify(self.sock)

    def detach(self) -> socket.socket:
        """Stop watching the socket and hand it over (to a tunnel)."""
        self.want(0)
        return self.sock

    def close(self, reset: bool = False) -> None:
        self.want(0)
        if reset:
            abort_on_close(self.sock)
        elif self.tls:
            # An orderly TLS close says so (close_notify), or the peer sees a truncation.
            with contextlib.suppress(OSError):
                send_close_notify(self.sock)
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
