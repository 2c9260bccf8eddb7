"""One leg of a session: a non-blocking socket with interest tracking and a write backlog.

A leg keeps bytes of its own only when a send was partial (`backlog`); reads go into the
loop's shared buffer. Interest is changed in the selector only when it differs from what is
registered, so a connection whose state does not change costs no system calls.

A leg may be TLS (a `TlsSocket`, below): then "would block" arrives as
SSLWantReadError/SSLWantWriteError instead of BlockingIOError, plaintext may wait inside it
where the selector cannot see it (`pending()`), sendmsg() is not available, and an orderly end
of stream is a close_notify alert before the TCP FIN.

Errors from the operating system are not translated here: `OSError` subclasses (reset,
broken pipe, TLS alerts) propagate to the session, which knows what they mean for the exchange.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import ssl
import struct
import sys
import termios
from collections.abc import Sequence

from rawproxy.loop import READ, WRITE, Callback, Loop

Buffer = bytes | bytearray | memoryview
# What a non-blocking socket, plain or TLS, raises instead of blocking.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# Raw TLS bytes are read from the kernel in chunks of this size (into a buffer shared by all).
_RAW_CHUNK = 64 * 1024
_raw_buffer = bytearray(_RAW_CHUNK)
_raw_view = memoryview(_raw_buffer)
# How much of the start of a stream a TlsSocket keeps (`first_bytes`).
FIRST_BYTES = 32


class TlsSocket:
    """A non-blocking TLS connection over a plain socket, driven through memory BIOs.

    Why not `ssl.SSLSocket`: ending our direction with close_notify while the peer still
    sends needs one SSL_shutdown call, and CPython's unwrap() makes a second one that reads
    and discards the peer's application data. Here every complete record is decrypted before
    the alert is written, so nothing is lost, and a half-close is a real TLS half-close.

    It speaks the part of the socket API the proxy uses, with the same contract as a
    non-blocking SSLSocket: `send` either takes bytes or raises a would-block error, and after
    a would-block the caller offers the same bytes again (what was encrypted but not yet
    written to the kernel is remembered, not encrypted twice).
    """

    __slots__ = (
        "_incoming",
        "_notified",
        "_obj",
        "_out",
        "_outgoing",
        "_plain",
        "_raw_eof",
        "_raw_short",
        "_tls_eof",
        "_unacked",
        "first_bytes",
        "raw",
        "refused_renegotiation",
    )

    def __init__(
        self,
        raw: socket.socket,
        context: ssl.SSLContext,
        server_hostname: str | None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_hostname is None,
            server_hostname=server_hostname,
            session=session,
        )
        self._out = bytearray()  # ciphertext the kernel did not take yet
        self._unacked = 0  # plaintext bytes whose ciphertext is still in _out
        self._plain = bytearray()  # plaintext decrypted early (before our close_notify)
        self._raw_eof = False
        # The last read from the kernel took less than it could: the socket was empty then.
        self._raw_short = False
        # The peer's stream ended (close_notify, or a bare FIN): every later read says so.
        self._tls_eof = False
        # Our close_notify was written (into the outgoing BIO; `_out` may still hold it).
        self._notified = False
        # The start of what the peer sent, as it came (a failed handshake may have been
        # plain HTTP: OpenSSL names only some methods).
        self.first_bytes = b""
        # The peer asked for a renegotiation (TLS 1.2) and our no_renegotiation alert went.
        self.refused_renegotiation = False

    # -- the socket API the proxy uses -------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Raw TLS bytes that were read from the socket before it became TLS (after a PROXY
        protocol header): they are the start of the stream."""
        self._incoming.write(data)
        self._note_first_bytes(data)

    def _note_first_bytes(self, data: Buffer) -> None:
        if len(self.first_bytes) < FIRST_BYTES:
            self.first_bytes += bytes(data[: FIRST_BYTES - len(self.first_bytes)])

    def fileno(self) -> int:
        return self.raw.fileno()

    def setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        self.raw.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int) -> int:
        return self.raw.getsockopt(level, option)

    def close(self) -> None:
        self.raw.close()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._obj.session

    @property
    def session_reused(self) -> bool:
        return self._obj.session_reused

    def version(self) -> str | None:
        return self._obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._obj.cipher()

    def selected_alpn_protocol(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    def pending(self) -> int:
        """Plaintext available without the kernel: decrypted, or in records already read."""
        return len(self._plain) + self._obj.pending() + self._incoming.pending

    @property
    def at_end(self) -> bool:
        """The peer's end of stream was read (every later read returns 0): like pending
        bytes, the kernel no longer announces it."""
        return self._tls_eof

    def do_handshake(self) -> None:
        """One step; raises SSLWantReadError/SSLWantWriteError until it is done."""
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                if not self._flush():
                    raise ssl.SSLWantWriteError() from None
                if not self._read_raw():
                    raise
                continue
            if not self._flush():
                # Our last flight is not out yet; the caller waits for writability.
                raise ssl.SSLWantWriteError()
            return

    def recv_into(self, view: memoryview) -> int:
        return self._recv(view, True)

    def recv_more(self, view: memoryview) -> int:
        """recv_into for the reads that follow one (of the same readiness event), -1 instead
        of a would-block error: the kernel is asked again only if its last read filled the
        buffer. Otherwise it most likely has nothing, and asking costs a system call for
        EAGAIN on every request; the selector (level-triggered) says when more comes. Records
        already read are decrypted either way, a close_notify among them included."""
        if self._raw_short and not self.pending():
            return -1  # the usual end of a read: no exception for it (they cost microseconds)
        try:
            return self._recv(view, not self._raw_short)
        except ssl.SSLWantReadError:
            return -1

    def _recv(self, view: memoryview, kernel: bool) -> int:
        if self._plain:
            n = min(len(view), len(self._plain))
            view[:n] = self._plain[:n]
            del self._plain[:n]
            return n
        if self._tls_eof:
            return 0
        if (
            kernel
            and not self._raw_eof
            and not self._incoming.pending
            and not self._obj.pending()
            and not self._read_raw()
        ):
            # Nothing buffered, and the kernel has nothing: say so without asking SSL, whose
            # want-read error would cost an exception on every read event.
            raise ssl.SSLWantReadError()
        while True:
            try:
                # With a buffer, read() fills it and returns the count (typeshed says bytes).
                n = self._obj.read(len(view), view)  # type: ignore[assignment]
            except ssl.SSLWantReadError:
                if not kernel or not self._read_raw():
                    if self._outgoing.pending:
                        # Records the read made that carry no data: an alert refusing a
                        # renegotiation (TLS 1.2), or a TLS 1.3 key update's answer. They go
                        # now, as no send may follow.
                        if self._obj.version() != "TLSv1.3":
                            self.refused_renegotiation = True
                        self._flush()
                    raise
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                n = 0
            if not n:
                # close_notify (read() returns 0 for it, or raises), or a bare FIN (tolerated
                # by our contexts).
                self._tls_eof = True
                return 0
            if self._outgoing.pending:
                self._flush()  # TLS 1.3 answers some records (key updates, tickets)
            return n

    def send(self, data: Buffer) -> int:
        if self._unacked:
            # The retry of a send that would have blocked: `data` starts with those bytes.
            if not self._flush():
                raise ssl.SSLWantWriteError()
            n, self._unacked = self._unacked, 0
            return n
        if self._out and not self._flush():
            raise ssl.SSLWantWriteError()
        try:
            size = self._obj.write(data)
        except ssl.SSLWantReadError:
            # Only a renegotiation under way makes a write wait for a read, and our contexts
            # refuse renegotiation: waiting for writability here would spin.
            raise ssl.SSLError("TLS write blocked by a renegotiation") from None
        if self._flush():
            return size
        self._unacked = size
        raise ssl.SSLWantWriteError()

    def close_notify(self) -> bool:
        """Send close_notify (our direction ends; the peer's goes on). True when the alert
        reached the kernel; if not, call again once the socket is writable: that only writes
        what is left of it (a second SSL_shutdown would read and discard the peer's data)."""
        if self._notified:
            return self._flush()
        self._notified = True
        # Decrypt every complete record already read: SSL_shutdown's wait for the peer's
        # alert would otherwise swallow them.
        while True:
            try:
                chunk = self._obj.read(_RAW_CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                # The peer's end was among them: later reads report it once _plain is
                # handed out (it is not read again; the kernel may never announce it).
                self._tls_eof = True
                break
            self._plain += chunk
        with contextlib.suppress(ssl.SSLError, ValueError):
            self._obj.unwrap()
        return self._flush()

    # -- moving ciphertext ---------------------------------------------------------------

    def _flush(self) -> bool:
        """Write pending ciphertext to the kernel; True when none is left."""
        if self._outgoing.pending:
            data = self._outgoing.read()
            if not self._out:
                # The usual case: nothing older waits, so the BIO's bytes go straight to the
                # kernel and only what it did not take is copied (profiling showed the copy
                # into a bytearray costing twice the encryption itself).
                try:
                    sent = self.raw.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                if sent == len(data):
                    return True
                self._out += memoryview(data)[sent:]
                return False
            self._out += data
        out = self._out
        if not out:
            return True
        try:
            sent = self.raw.send(out)
        except (BlockingIOError, InterruptedError):
            return False
        del out[:sent]
        return not out

    def _read_raw(self) -> bool:
        """Move what the kernel has into the incoming BIO; False when it has nothing now.
        Raises OSError for a reset."""
        if self._raw_eof:
            return False
        try:
            n = self.raw.recv_into(_raw_view)
        except (BlockingIOError, InterruptedError):
            return False
        if n == 0:
            self._raw_eof = True
            self._incoming.write_eof()
        else:
            self._incoming.write(_raw_view[:n])
            self._raw_short = n < len(_raw_view)
            if len(self.first_bytes) < FIRST_BYTES:
                self._note_first_bytes(_raw_view[:n])
        return True


Stream = socket.socket | TlsSocket


def receive_into(sock: Stream, view: memoryview) -> int:
    """Read what is there into `view`: the byte count, 0 at end of stream, -1 when nothing can
    be read now. A TLS socket is read record after record until the view is full or nothing
    more is there, so that one readiness event moves more than one 16 KiB record."""
    try:
        total = sock.recv_into(view)
    except WOULD_BLOCK:
        return -1
    if total == 0 or not isinstance(sock, TlsSocket):
        return total
    size = len(view)
    while total < size:
        n = sock.recv_more(view[total:])
        if n <= 0:
            break  # nothing more now; or end of stream, which the next read reports
        total += n
    return total


def send_close_notify(sock: Stream) -> bool:
    """End our direction of a stream: on TLS the close_notify alert, then a TCP half-close.
    The other direction still reads. False when the kernel is full and took not all of the
    alert: the FIN must not overtake it, so nothing is ended yet; call again once the socket
    is writable."""
    if isinstance(sock, TlsSocket):
        if not sock.close_notify():
            return False
        sock.raw.shutdown(socket.SHUT_WR)
        return True
    sock.shutdown(socket.SHUT_WR)
    return True


# The most pieces handed to one sendmsg() (IOV_MAX is 1024 on Linux).
MAX_PARTS = 64
# Pieces adding up to less than this are joined and sent with send(): cheaper than sendmsg()
# for a small answer's head and body.
JOIN_BELOW = 4096


class Leg:
    __slots__ = ("backlog", "callback", "ended", "fd", "interest", "loop", "queued", "sock", "tls")

    def __init__(self, loop: Loop, sock: Stream, callback: Callback) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.callback = callback
        self.interest = 0
        self.backlog: bytearray | None = None
        self.queued: list[Buffer] | None = None
        self.tls = isinstance(sock, TlsSocket)
        self.ended = False  # a read returned the peer's end of stream

    def start_tls(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        """Wrap the (connected) socket; the handshake is then run by `handshake()`. A
        `session` from an earlier connection to the same backend is offered for resumption."""
        assert isinstance(self.sock, socket.socket)
        self.sock = TlsSocket(self.sock, context, server_hostname, session)
        self.tls = True

    def drop_tls(self) -> None:
        """Speak plain TCP again on the same socket: after a handshake that failed because
        the peer never spoke TLS, to answer it in its own language."""
        if isinstance(self.sock, TlsSocket):
            self.sock = self.sock.raw
            self.tls = False

    def handshake(self) -> int:
        """One step of the TLS handshake: 0 when it is done, else the event it waits for.
        Raises ssl.SSLError (or OSError) when it fails."""
        assert isinstance(self.sock, TlsSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return READ
        except ssl.SSLWantWriteError:
            return WRITE
        return 0

    def pending(self) -> bool:
        """Decrypted bytes wait inside the SSL object, or the peer's end of stream read with
        the last of them and not returned yet (the selector cannot see either)."""
        sock = self.sock
        return isinstance(sock, TlsSocket) and (
            sock.pending() > 0 or (sock.at_end and not self.ended)
        )

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
        view = self.loop.read_view
        if self.tls:
            n = receive_into(self.sock, view)
            if n < 0:
                return None
            if n == 0:
                self.ended = True
        else:
            try:
                n = self.sock.recv_into(view)
            except WOULD_BLOCK:
                return None
        return view[:n]

    def queue(self, parts: Sequence[Buffer]) -> None:
        """Add `parts` to what `push()` will send: the owner queues everything one event
        produces (a response head and its body, say) and pushes once, one system call."""
        if self.backlog is not None:
            for part in parts:
                self.backlog += part
        elif self.queued is None:
            self.queued = list(parts)
        else:
            self.queued.extend(parts)

    def push(self) -> bool:
        """Send what was queued; True when nothing is left waiting."""
        queued = self.queued
        if queued is None:
            return self.backlog is None
        self.queued = None
        return self.send_parts(queued)

    def send_parts(self, parts: Sequence[Buffer]) -> bool:
        """Send `parts` in order after any backlog; keep what the kernel did not take.
        Return True when nothing is left waiting."""
        if self.queued is not None:
            # Keep the order: what was queued goes first.
            parts = [*self.queued, *parts]
            self.queued = None
        if self.backlog is not None:
            for part in parts:
                self.backlog += part
            return False
        if not parts:
            return True
        if len(parts) > 1:
            total = 0
            for part in parts:
                total += len(part)
            if total <= JOIN_BELOW or self.tls or len(parts) > MAX_PARTS:
                # A small answer (head and body) is cheaper joined than gathered; one TLS
                # write is one flight of records; and sendmsg() takes at most IOV_MAX pieces
                # (h11 writes each header line as a piece of its own).
                parts = (b"".join(parts),)
        if len(parts) == 1:
            # The usual case: one piece, sent with one call and nothing to split up.
            data = parts[0]
            try:
                sent = self.sock.send(data) if len(data) else 0
            except WOULD_BLOCK:
                sent = 0
            if sent == len(data):
                return True
            self.backlog = bytearray(memoryview(data)[sent:])
            return False
        # Several pieces, more than JOIN_BELOW bytes, on plain TCP: gathered by the kernel.
        sock = self.sock
        assert isinstance(sock, socket.socket)
        try:
            sent = sock.sendmsg(parts)
        except WOULD_BLOCK:
            sent = 0
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

    def hand_over(self) -> tuple[Stream, int]:
        """Give the socket to a new owner together with its selector registration (the
        interest registered now): the owner rebinds it with Loop.modify, which costs no system
        call when the interest stays the same. This leg no longer touches the selector."""
        interest = self.interest
        self.interest = 0
        self.callback = ignore_event
        return self.sock, interest

    def close(self, reset: bool = False) -> None:
        if self.interest:
            self.loop.forget(self.fd)  # the socket is closed below: no EPOLL_CTL_DEL needed
            self.interest = 0
        if not reset:
            if self.queued is not None:
                with contextlib.suppress(OSError):
                    self.push()  # best effort: the last answer of an orderly close
            # What the kernel did not take is lost: a reset says so, where an orderly end
            # would tell the peer it got everything (an answer framed by the close).
            reset = self.backlog is not None
        if reset:
            abort_on_close(self.sock)
        elif self.tls:
            # An orderly TLS close says so (close_notify), or the peer sees a truncation.
            with contextlib.suppress(OSError):
                send_close_notify(self.sock)
        self.sock.close()
        # The callback is a bound method of the owner, which holds this leg: letting go of it
        # lets reference counting free a closed connection at once, without the cyclic GC.
        self.callback = ignore_event


def ignore_event(_mask: int) -> None:
    """The event callback of a leg or tunnel that is closed or handed over: it is never
    registered, and holds nothing (a bound method would hold its owner)."""


def abort_on_close(sock: Stream) -> None:
    """Make close() send a reset instead of a FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def send_queue(sock: Stream) -> int:
    """Bytes in the kernel's send queue not yet taken by the peer (SIOCOUTQ: unsent plus
    unacknowledged); -1 when the kernel does not say."""
    raw = sock.raw if isinstance(sock, TlsSocket) else sock
    try:
        out = fcntl.ioctl(raw.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return -1
    return int.from_bytes(out, sys.byteorder, signed=True)


def set_nodelay(sock: Stream) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_keepalive(sock: Stream, idle: int) -> None:
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
