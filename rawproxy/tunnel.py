"""The opaque two-way byte pump that a connection becomes after a 101.

Two directions, client->backend and backend->client, each moved by one symmetric function.
Bytes are copied through the loop's shared buffer (recv_into + send). When both legs are plain
TCP, a direction whose read fills that buffer is moving bulk: from then on its bytes go socket
-> pipe -> socket with `os.splice` and never enter Python, until a burst of reads moves less
than BULK_BYTES (a small WebSocket message: for those the two calls of a copy cost less than
the two splices and the pipe's bookkeeping, measured). Either way a direction holds at most
one pipe or one backlog of unsent bytes, and reads nothing more until that is delivered: that
is the backpressure, and it bounds memory per tunnel by construction. A direction changes
pump only with nothing in flight (no backlog, an empty pipe), so bytes keep their order.

End states, per direction: end of stream (EOF from the source, carried over as a
shutdown(SHUT_WR) of the destination once everything before it was delivered: half-close), or
error (a reset on either socket ends the whole tunnel and resets the other leg too). The
tunnel ends when both directions reached end of stream, on an error, on the idle timeout, or
when the proxy shuts down.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable

from rawproxy.loop import READ, WRITE, Loop, Timer
from rawproxy.transport import (
    WOULD_BLOCK,
    Stream,
    TlsSocket,
    abort_on_close,
    ignore_event,
    receive_into,
    send_close_notify,
    set_keepalive,
)

log = logging.getLogger("rawproxy")

PIPE_SIZE = 1024 * 1024
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# How many read/write rounds one readiness event may run before other connections get a turn.
ROUNDS = 16
# A splice burst (what one readiness event moved) under this size sends the direction back
# to copying; a copy read that fills the loop's read buffer sends it to splice.
BULK_BYTES = 64 * 1024
# While only one direction carries bulk, its destination socket keeps at most this many bytes
# queued and not yet sent (TCP_NOTSENT_LOWAT); the rest waits in the pipe. Without it the
# kernel queues up to the send buffer, and the queued bytes go out later from the softirq of
# whichever CPU processes the receiver's acknowledgements: on one machine (a local backend,
# the benchmark) that is the receiver's CPU, which then transmits for us. Kept small, the
# sends happen in our own splice calls, on our core. Measured on W2 plain (2 cores, 1 GiB,
# 4 interleaved runs): up 1,790 -> 2,420 MB/s, down 1,770 -> 2,220, for 10-20 % more proxy
# CPU per GiB (more, shorter splices); 64 KiB gained about half as much. With bulk both ways
# the proxy's own core is the limit and the shorter splices cost more than they save (both
# ways 2,006 -> 1,629 MB/s with it): then neither socket has it.
NOTSENT_LOWAT = 16 * 1024

# What a direction waits for.
WANT_READ = 1
WANT_WRITE = 2
FINISHED = 0

# A socket's registration with the loop, beside its interest (READ | WRITE, or 0). A socket
# neither direction needs now stays registered with interest 0: epoll reports its errors and
# hang-ups whatever the interest, and that is how a reset on it is noticed while both
# directions wait on the other socket (a stalled reader there, or a half-closed tunnel).
UNREGISTERED = -1  # not registered (handed over so by the session)
HUNG_UP = -2  # unregistered after a hang-up without an error, until a direction needs it


class PipePool:
    """Pipes for splice, lent to a direction only while it has bytes in flight.

    An idle tunnel holds no pipe; the pool keeps a few empty ones for reuse so that a busy
    tunnel does not pay pipe2()+fcntl() per chunk.
    """

    def __init__(self, keep: int = 64, size: int = PIPE_SIZE, limit: int = -1) -> None:
        self.keep = keep
        self.size = size
        # At most this many pipes open, lent or free (-1: no limit): the share of the file
        # descriptors the server budgets for them (server.pipes_that_fit). Past it take()
        # fails as pipe2() does when descriptors run out, and the tunnel copies instead.
        self.limit = limit
        self.free: list[tuple[int, int]] = []
        self.lent = 0

    def take(self) -> tuple[int, int]:
        if self.free:
            self.lent += 1
            return self.free.pop()
        if 0 <= self.limit <= self.lent:
            raise OSError(errno.EMFILE, "no pipe left in the descriptor budget")
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.lent += 1
        # Over the per-user pipe budget the default size still works.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        return r, w

    def give_back(self, pipe: tuple[int, int], empty: bool = True) -> None:
        self.lent -= 1
        if empty and len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in self.free:
            os.close(r)
            os.close(w)
        self.free.clear()


class LaterKeepalive:
    """TCP keepalive for the backend legs of tunnels that outlive `delay`, set in batches.

    Keepalive is there to notice a backend that vanished from under a long idle tunnel; a tunnel
    that ends within a second (a health check, a page that navigates away) does not need it,
    and setting it costs four system calls. So backend sockets are queued when their tunnel
    starts and set up once `delay` has passed, if still open, by a timer that runs at most
    every delay/4 (the first probe goes out at most that much later than it would have).
    Client legs need none of this: they inherit keepalive from the listening socket. Only the
    socket object waits here (a closed one says so by fileno() -1), not the tunnel."""

    def __init__(self, loop: Loop, delay: float = 1.0) -> None:
        self.loop = loop
        self.delay = delay
        self.waiting: collections.deque[tuple[float, socket.socket, int]] = collections.deque()
        self.timer: Timer | None = None

    def add(self, sock: Stream, idle: int) -> None:
        raw = sock.raw if isinstance(sock, TlsSocket) else sock
        self.waiting.append((self.loop.now + self.delay, raw, idle))
        if self.timer is None:
            self.timer = self.loop.call_later(self.delay, self._run)

    def _run(self) -> None:
        self.timer = None
        now = self.loop.now
        waiting = self.waiting
        while waiting and waiting[0][0] <= now:
            _, sock, idle = waiting.popleft()
            if sock.fileno() >= 0:
                set_keepalive(sock, idle)
        if waiting:
            wait = max(waiting[0][0] - now, self.delay / 4)
            self.timer = self.loop.call_later(wait, self._run)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waiting.clear()


class Direction:
    """One half of a tunnel: bytes from `src` to `dst`."""

    __slots__ = (
        "backlog",
        "bulk",
        "dst",
        "eof",
        "in_pipe",
        "lowat",
        "moved",
        "name",
        "pipe",
        "src",
        "want",
    )

    def __init__(self, name: str, src: Stream, dst: Stream, first: bytes, eof: bool) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.backlog: memoryview | None = memoryview(first) if first else None
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        # Moved by splice (the tunnel's legs allow it and this direction carries bulk).
        self.bulk = False
        # What this direction set as TCP_NOTSENT_LOWAT on `dst` (0: the system's default).
        self.lowat = 0
        self.eof = eof
        self.moved = 0
        self.want = WANT_WRITE if first or eof else WANT_READ


class TunnelError(Exception):
    """A socket of the tunnel failed; `side` names which one."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error


class Tunnel:
    __slots__ = (
        "adopted",
        "b2c",
        "backend",
        "backend_fd",
        "backend_interest",
        "c2b",
        "client",
        "client_fd",
        "client_interest",
        "ended",
        "idle_timeout",
        "last_active",
        "loop",
        "on_backend",
        "on_client",
        "on_close",
        "pipes",
        "splice",
        "started",
        "timer",
    )

    def __init__(
        self,
        loop: Loop,
        pipes: PipePool,
        client: Stream,
        backend: Stream,
        to_backend: bytes,
        to_client: bytes,
        uncounted: tuple[int, int],
        client_eof: bool,
        backend_eof: bool,
        *,
        registered: tuple[int, int] = (0, 0),
        splice: bool,
        idle_timeout: float | None,
        keepalive: int,
        on_close: Callable[[Tunnel, str, float], None],
        later_keepalive: LaterKeepalive | None = None,
    ) -> None:
        self.loop = loop
        self.pipes = pipes
        self.client = client
        self.backend = backend
        self.client_fd = client.fileno()
        self.backend_fd = backend.fileno()
        # The sockets may come registered with the loop by their previous owner (`registered`:
        # the interest of each, 0 for not registered); the first interest update takes the
        # registrations over.
        self.client_interest = registered[0] or UNREGISTERED
        self.backend_interest = registered[1] or UNREGISTERED
        self.adopted = False
        # Bound once: the loop recognises a registration by its callback's identity.
        self.on_client: Callable[[int], None] = self._on_client
        self.on_backend: Callable[[int], None] = self._on_backend
        self.splice = splice
        self.on_close = on_close
        self.started = time.monotonic()
        self.ended: str | None = None
        self.c2b = Direction("client", client, backend, to_backend, client_eof)
        self.b2c = Direction("backend", backend, client, to_client, backend_eof)
        # Bytes read past the heads count as tunnelled; `uncounted` is how much at the front of
        # to_backend and to_client is HTTP (a request head not sent yet, the 101 head).
        self.c2b.moved = len(to_backend) - uncounted[0]
        self.b2c.moved = len(to_client) - uncounted[1]
        # TCP_NODELAY is on both already (the session sets it on the backend socket; the
        # client's comes from the listener, like its keepalive): keepalive for the backend, at
        # once or, with `later_keepalive`, if the tunnel lasts. A new socket has it off, so 0
        # needs nothing.
        if keepalive > 0:
            if later_keepalive is not None:
                later_keepalive.add(backend, keepalive)
            else:
                set_keepalive(backend, keepalive)
        self.idle_timeout = idle_timeout
        self.last_active = loop.now
        self.timer: Timer | None = None
        if idle_timeout:
            self.timer = loop.call_later(idle_timeout, self._on_idle_timer)

    def start(self) -> None:
        """Deliver what was read past the heads, then pump. Separate from __init__ so that
        the owner holds the tunnel before `on_close` can possibly be called.

        A plain socket is not read here: the selector reports it when bytes or its end of
        stream are there (a read now would mostly cost a system call for EAGAIN). A TLS one is,
        as decrypted bytes may wait inside its SSL object. The interest is set once, for both
        directions, taking the previous owner's registrations over."""
        self._run(self.c2b, readable=isinstance(self.client, TlsSocket), update=False)
        if self.client_fd >= 0:
            self._run(self.b2c, readable=isinstance(self.backend, TlsSocket))

    # -- events ----------------------------------------------------------------------------

    def _on_client(self, mask: int) -> None:
        if self.client_interest == 0:
            self._hung_up("client")
            return
        if mask & READ and self.c2b.want == WANT_READ:
            self._run(self.c2b)
        if mask & WRITE and self.b2c.want == WANT_WRITE and self.client_fd >= 0:
            self._run(self.b2c)

    def _on_backend(self, mask: int) -> None:
        if self.backend_interest == 0:
            self._hung_up("backend")
            return
        if mask & READ and self.b2c.want == WANT_READ:
            self._run(self.b2c)
        if mask & WRITE and self.c2b.want == WANT_WRITE and self.client_fd >= 0:
            self._run(self.c2b)

    def _hung_up(self, side: str) -> None:
        """An error or a hang-up on a socket that no direction needs now (interest 0). An
        error (a reset) ends the tunnel and resets the other leg, as it would have if a
        direction had been reading or writing. A hang-up without one (the peer closed and we
        shut down our side: nothing more to read or write there, though the other direction
        may still be delivering what it read before) is not reported again: level-triggered,
        it would be on every round. The socket is registered again when a direction needs it."""
        sock = self.client if side == "client" else self.backend
        try:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            error = e.errno or errno.EBADF
        if error:
            how = "reset" if error in (errno.ECONNRESET, errno.EPIPE) else os.strerror(error)
            self.close(f"{side} {how}", reset=True)
            return
        if side == "client":
            self.loop.remove(self.client_fd)
            self.client_interest = HUNG_UP
        else:
            self.loop.remove(self.backend_fd)
            self.backend_interest = HUNG_UP

    def _run(self, d: Direction, readable: bool = True, update: bool = True) -> None:
        """Move what can be moved in direction `d`; `readable`: its source may have bytes."""
        self.last_active = self.loop.now
        try:
            if d.bulk:
                self._pump_splice(d, readable)
            else:
                self._pump_copy(d, readable)
        except TunnelError as e:
            how = "reset" if e.error.errno in (errno.ECONNRESET, errno.EPIPE) else str(e.error)
            self.close(f"{e.side} {how}", reset=True)
            return
        if self.c2b.want == FINISHED and self.b2c.want == FINISHED:
            self.close(self.ended or "both sides closed")
            return
        if update:
            self._update_interest()

    def _update_interest(self) -> None:
        c2b, b2c = self.c2b.want, self.b2c.want
        client = (READ if c2b == WANT_READ else 0) | (WRITE if b2c == WANT_WRITE else 0)
        backend = (READ if b2c == WANT_READ else 0) | (WRITE if c2b == WANT_WRITE else 0)
        if not self.adopted:
            # Take over the previous owner's registrations: rebinding one to the tunnel with
            # the same interest costs no system call.
            self.adopted = True
            self.client_interest = self._set(
                self.client_fd, self.client_interest, client, self.on_client
            )
            self.backend_interest = self._set(
                self.backend_fd, self.backend_interest, backend, self.on_backend
            )
            return
        if client != self.client_interest:
            self.client_interest = self._set(
                self.client_fd, self.client_interest, client, self.on_client
            )
        if backend != self.backend_interest:
            self.backend_interest = self._set(
                self.backend_fd, self.backend_interest, backend, self.on_backend
            )

    def _set(self, fd: int, old: int, new: int, callback: Callable[[int], None]) -> int:
        """Register `fd` for `new` (0 included; see UNREGISTERED); returns its new state."""
        if old >= 0:
            self.loop.modify(fd, new, callback)
        elif new or old == UNREGISTERED:
            self.loop.add(fd, new, callback)
        else:
            return HUNG_UP  # nothing needed from a hung-up socket yet: it stays unregistered
        return new

    # -- pumps -----------------------------------------------------------------------------

    def _finish(self, d: Direction) -> None:
        """End of stream from d.src, and everything before it delivered: half-close."""
        if self.ended is None:
            self.ended = f"{d.name} closed"
        other = self.b2c if d is self.c2b else self.c2b
        if other.want == FINISHED and not isinstance(d.dst, TlsSocket):
            # The last direction to end: the tunnel closes both sockets right after, and a
            # plain socket's close() sends the same FIN (its peer's end was read, so nothing
            # unread turns it into a reset). One system call per tunnel fewer, as HAProxy.
            d.want = FINISHED
            return
        try:
            done = send_close_notify(d.dst)
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                raise TunnelError(self._other(d), e) from e
            done = True
        # A TLS destination's kernel that did not take all of the close_notify: the rest (and
        # the FIN after it) goes when it is writable, or its peer never sees the end.
        d.want = FINISHED if done else WANT_WRITE

    def _other(self, d: Direction) -> str:
        return "backend" if d is self.c2b else "client"

    def _send_backlog(self, d: Direction) -> bool:
        backlog = d.backlog
        assert backlog is not None
        try:
            sent = d.dst.send(backlog)
        except WOULD_BLOCK:
            sent = 0
        except OSError as e:
            raise TunnelError(self._other(d), e) from e
        if sent < len(backlog):
            d.backlog = backlog[sent:]
            d.want = WANT_WRITE
            return False
        d.backlog = None
        return True

    def _pump_splice(self, d: Direction, readable: bool = True) -> None:
        src_fd = d.src.fileno()
        dst_fd = d.dst.fileno()
        drained = not readable
        burst = 0
        for _ in range(ROUNDS):
            if d.backlog is not None and not self._send_backlog(d):
                return
            if d.in_pipe:
                assert d.pipe is not None
                try:
                    n = os.splice(d.pipe[0], dst_fd, d.in_pipe, flags=SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    d.want = WANT_WRITE
                    return
                except OSError as e:
                    raise TunnelError(self._other(d), e) from e
                d.in_pipe -= n
                if d.in_pipe:
                    d.want = WANT_WRITE
                    return
            if d.eof:
                self._release_pipe(d)
                self._finish(d)
                return
            if drained:
                # The last read took less than it could: the socket was empty then. Asking
                # again would most likely cost a system call for EAGAIN (one in three for a
                # small WebSocket message); the level-triggered selector says when there is
                # more, end of stream included.
                self._release_pipe(d)
                d.want = WANT_READ
                if readable and burst < BULK_BYTES:
                    d.bulk = False  # small messages again: copy them
                return
            if d.pipe is None:
                try:
                    d.pipe = self.pipes.take()
                except OSError as e:
                    if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                        raise TunnelError(d.name, e) from e
                    # Out of file descriptors (or pipe memory): copy instead of failing a
                    # working tunnel over a speed-up, from now on (asking again on every
                    # full read would cost a failing pipe2() each time).
                    self.splice = d.bulk = False
                    self._pump_copy(d)
                    return
                self._pace(d)
            try:
                n = os.splice(src_fd, d.pipe[1], self.pipes.size, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                # The pipe is empty here, so EAGAIN means the socket is: give the pipe back.
                self._release_pipe(d)
                d.want = WANT_READ
                return
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOSYS):
                    # This kernel or socket type does not splice: copy instead, for good. Only
                    # this direction switches now (its pipe is empty); the other may have bytes
                    # in its pipe, and switches when it has delivered them.
                    self._release_pipe(d)
                    self.splice = d.bulk = False
                    self._pump_copy(d)
                    return
                raise TunnelError(d.name, e) from e
            if n == 0:
                d.eof = True
            else:
                d.in_pipe = n
                d.moved += n
                burst += n
                drained = n < self.pipes.size
        d.want = WANT_WRITE if d.in_pipe else WANT_READ

    def _pace(self, d: Direction) -> None:
        """Direction `d` starts a splice burst: limit its destination's unsent queue while it
        alone carries bulk, lift the limit on both sockets once the other does too."""
        other = self.b2c if d is self.c2b else self.c2b
        if not other.bulk:
            if not d.lowat:
                self._set_lowat(d, NOTSENT_LOWAT)
        elif d.lowat or other.lowat:
            self._set_lowat(d, 0)
            self._set_lowat(other, 0)

    def _set_lowat(self, d: Direction, value: int) -> None:
        if d.lowat == value or d.lowat < 0:
            return
        try:
            d.dst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, value)
        except OSError:
            value = -1  # not TCP, or already reset: never ask again for this direction
        d.lowat = value

    def _release_pipe(self, d: Direction) -> None:
        if d.pipe is not None:
            self.pipes.give_back(d.pipe, empty=d.in_pipe == 0)
            d.pipe = None
            d.in_pipe = 0

    def _pump_copy(self, d: Direction, readable: bool = True) -> None:
        view = self.loop.read_view
        size = len(view)
        src = d.src
        # Not for TLS: its end of stream (close_notify) may have been read with the data, and
        # no readiness event would announce it again; so a short TLS read is not "drained".
        plain = not isinstance(src, TlsSocket)
        drained = not readable
        for _ in range(ROUNDS):
            if d.backlog is not None and not self._send_backlog(d):
                return
            if d.eof:
                self._finish(d)
                return
            if drained:
                d.want = WANT_READ  # as in _pump_splice: the source was empty
                return
            try:
                n = receive_into(src, view)
            except OSError as e:
                raise TunnelError(d.name, e) from e
            if n < 0:
                d.want = WANT_READ
                return
            if n == 0:
                d.eof = True
                continue
            d.moved += n
            drained = n < size and plain
            try:
                sent = d.dst.send(view[:n])
            except WOULD_BLOCK:
                # (On TLS the retry must offer the same bytes again: the backlog holds them.)
                sent = 0
            except OSError as e:
                raise TunnelError(self._other(d), e) from e
            if sent < n:
                # The one copy a direction may hold: what the destination did not take.
                d.backlog = memoryview(bytes(view[sent:n]))
                d.want = WANT_WRITE
                if n == size and self.splice:
                    d.bulk = True  # bulk: splice once the backlog is delivered
                return
            if n == size and self.splice:
                # Bulk: what follows goes by splice, nothing being in flight now.
                d.bulk = True
                self._pump_splice(d)
                return
        d.want = WANT_READ
        if isinstance(src, TlsSocket) and (src.pending() or src.at_end):
            # Out of rounds with decrypted bytes (or the peer's end of stream, read with the
            # last of them) inside the SSL object: no readiness event would ever announce
            # them, so come back on the next loop turn.
            self.loop.call_later(0, lambda: self._resume(d))

    def _resume(self, d: Direction) -> None:
        if self.client_fd >= 0 and d.want == WANT_READ:
            self._run(d)

    # -- timeouts and closing --------------------------------------------------------------

    def _on_idle_timer(self) -> None:
        assert self.idle_timeout is not None
        idle = self.loop.now - self.last_active
        if idle < self.idle_timeout:
            self.timer = self.loop.call_later(self.idle_timeout - idle, self._on_idle_timer)
            return
        self.close(f"idle for {self.idle_timeout:g}s (--tunnel-idle-timeout)")

    def abort(self) -> None:
        self.close("internal error", reset=True)

    def shutdown(self) -> None:
        self.close("proxy shutting down")

    def drain(self) -> None:
        """The proxy is stopping: the tunnel runs on until the drain time is over."""

    def close(self, how: str, reset: bool = False) -> None:
        if self.client_fd < 0:
            return
        if self.timer is not None:
            self.timer.cancel()
        c2b, b2c = self.c2b, self.b2c
        if c2b.backlog is not None or b2c.backlog is not None or c2b.in_pipe or b2c.in_pipe:
            # Cut (idle timeout, shutdown) with bytes read and not delivered: a reset says so.
            # An orderly end would tell the peer it got everything.
            reset = True
        for fd, interest in (
            (self.client_fd, self.client_interest),
            (self.backend_fd, self.backend_interest),
        ):
            if interest >= 0:
                self.loop.forget(fd)  # closed below: no EPOLL_CTL_DEL needed
        self.client_interest = self.backend_interest = UNREGISTERED
        for d in (c2b, b2c):
            self._release_pipe(d)
        for sock in (self.client, self.backend):
            if reset:
                abort_on_close(sock)
            sock.close()
        self.client_fd = self.backend_fd = -1
        on_close = self.on_close
        # The bound methods kept for the loop point back at the tunnel: let go of them, so that
        # reference counting frees a closed tunnel at once (no work left for the cyclic GC,
        # which otherwise ran often enough to cost W5 about 7 % of its time).
        self.on_client = self.on_backend = ignore_event
        self.on_close = _ignore_close
        on_close(self, how, time.monotonic() - self.started)


def _ignore_close(_tunnel: Tunnel, _how: str, _duration: float) -> None:
    """The close callback of a tunnel closed already."""
