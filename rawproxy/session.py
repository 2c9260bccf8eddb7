"""One client connection's life: request heads, backend connection, relay, keep-alive, and the
hand-off to a tunnel after a 101.

Two h11 state machines drive it: `client_h11` (server role, toward the client) and
`backend_h11` (client role, toward the backend). Every header decision is asked of
rawproxy.http; this module only moves bytes and keeps time.

Phases:
    PROXY_HEADER  waiting for the PROXY protocol header (--accept-proxy-protocol)
    HANDSHAKE   TLS handshake with the client (TLS listeners); header timeout running
    HEAD        waiting for (the rest of) a request head; header timeout running
    IDLE        between requests on a kept-alive connection; idle timeout running
    CONNECTING  request head parsed, backend connection under way; connect timeout running
    EXCHANGE    request forwarded (body streaming), response expected or streaming;
                an inactivity timer (--response-timeout) running
    REJECT      no route for the request: reading what is left of it, then answering 404
    CLOSING     an error answer or a last response written; draining the client so that
                close() does not turn into a reset that destroys the answer in flight
    DONE        closed, or handed to a tunnel
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import h11

from rawproxy.http import (
    IDEMPOTENT_METHODS,
    MAX_CONTENT_LENGTH,
    REASONS,
    REWRITTEN_HEADERS,
    ClientSide,
    ForwardedLines,
    Header,
    RequestRefused,
    ResponseRewrite,
    SimpleRequest,
    SimpleResponse,
    UpgradeDecision,
    backend_request_headers,
    bare_lf_chunk_line,
    client_response_headers,
    client_scheme,
    closing_error_head,
    decide_upgrade,
    decided_upgrade,
    error_body,
    error_headers,
    error_response,
    fields_size,
    forwarded_headers,
    forwarded_trailers,
    framing_error,
    head_error,
    header_lines,
    length_error,
    looks_like_plain_http,
    origin_of_host,
    parse_simple_request,
    parse_simple_response,
    plain_request_head,
    plain_request_headers,
    plain_switch_head,
    request_line_of,
    resolve_request,
    rewrite_response_headers,
    shortened,
    switch_error,
    trailer_error,
    without_cuts,
    write_head,
)
from rawproxy.loop import READ, WRITE, Timer
from rawproxy.metrics import classify_connect_error
from rawproxy.proxyproto import (
    NEED_MORE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)
from rawproxy.transport import Leg, TlsSocket, send_queue, set_nodelay
from rawproxy.tunnel import Tunnel

if TYPE_CHECKING:
    from rawproxy.config import Route
    from rawproxy.server import Server, Target

log = logging.getLogger("rawproxy")

HEAD, IDLE, CONNECTING, EXCHANGE, CLOSING, DONE, HANDSHAKE, REJECT, PROXY_HEADER = range(9)

# CR and LF: a request may follow empty lines, which a server ignores (RFC 9112 2.2).
_EMPTY_LINE = (13, 10)


def _without_empty_lines(data: memoryview) -> memoryview:
    """`data` without the CR and LF bytes it starts with."""
    return memoryview(bytes(data).lstrip(b"\r\n"))


# How long a closing connection keeps reading (and discarding) what the client still sends,
# so that our last answer is not destroyed by a reset.
LINGER_SECONDS = 2.0

_NO_MORE = (h11.NEED_DATA, h11.PAUSED)
# Why a chunked body is refused when h11 would wait for the end of its chunk line forever.
BARE_LF_CHUNK_LINE = "a chunk line ended by a bare LF (chunked framing needs CRLF)"
# Seconds between the two looks at a send queue that decide whether a peer is silent.
QUEUE_LOOK_AGAIN = 1.0
HUGE_CHUNK = f"a chunk size over {MAX_CONTENT_LENGTH} (2**63 - 1)"
# The longest PROXY header we read: v2's fixed part and its largest accepted block.
PROXY_HEADER_LIMIT = 16 + 4096
# A request without a route is answered 404 on the same connection when what is left of its
# body is this small; a larger body is not read: 404 and close.
REJECT_BODY_LIMIT = 64 * 1024
# h11 events one connection turns into actions per turn of the loop; the rest wait for the
# next turn, after every other connection's events. A body of 1-byte chunks is one event per
# 6 bytes: without a bound, one client's 256 KiB read held the loop for 300 ms.
PUMP_BUDGET = 256
# A body's Data events are passed on as one once they add up to this (or at any other
# event): 1-byte chunks do not become 1-byte chunks with 5 bytes of framing each.
COALESCE_LIMIT = 64 * 1024


_REFERER_OR_AGENT_LENGTHS = frozenset({len(b"referer"), len(b"user-agent")})


def _referer_and_agent(request: h11.Request | SimpleRequest) -> tuple[str | None, str | None]:
    """The first Referer and User-Agent of a request, for its access line: one pass over
    its headers (a WebSocket handshake's are a dozen)."""
    referer = user_agent = None
    if isinstance(request, SimpleRequest):
        headers: Iterable[Header] = request.raw
        lowered = False
    else:
        headers = request.headers  # h11 gives lower-case names
        lowered = True
    for name, value in headers:
        if len(name) in _REFERER_OR_AGENT_LENGTHS:  # no other name needs lower()
            if not lowered:
                name = name.lower()
            if name == b"referer":
                if referer is None:
                    referer = value.decode("latin-1")
            elif name == b"user-agent" and user_agent is None:
                user_agent = value.decode("latin-1")
    return referer, user_agent


def _request_head(sent: SimpleRequest) -> bytes:
    """The head of a fast-path request for the backend: the one the plain path made, or one
    written from its headers."""
    if sent.head is not None:
        return sent.head
    return write_head(b"%s %s HTTP/1.1\r\n" % (sent.method, sent.target), sent.raw)


def _header(request: h11.Request | SimpleRequest, name: bytes) -> bytes | None:
    if isinstance(request, SimpleRequest):
        return request.header(name)
    for key, value in request.headers:
        if key == name:
            return value
    return None


# The decision for a simple request with neither a Connection nor an Upgrade header.
_NO_UPGRADE = UpgradeDecision(None, "not an upgrade", considered=False)


# Session._forwarded_lines' memo: entries at most (then emptied), and the longest Host kept.
FORWARDED_MEMO_MAX = 1024
FORWARDED_MEMO_HOST_MAX = 256

# Backend connection states beside READ and WRITE (what its TLS handshake waits for).
_TCP_CONNECTING = -1
_READY = 0


_PLAIN_HTTP = "the client spoke plain HTTP to a TLS port"


def _described(peer: str, method: str, target: str, version: str) -> str:
    """A client and its request, as the log lines about it name them."""
    return f'{peer} "{method} {target} HTTP/{version}"'


# What a client's failed handshake most often means, beside OpenSSL's words for it.
_CLIENT_TLS_HINTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust our certificate: its CA is not in "
    "the client's store, or the file given as --cert lacks the intermediate certificates",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused our certificate: a name it does "
    "not cover, or a CA it does not trust",
    "UNSUPPORTED_PROTOCOL": "the client offers only TLS older than 1.2; rawproxy takes TLS "
    "1.2 and 1.3",
    "NO_SHARED_CIPHER": "no cipher in common with the client (an old client, most likely)",
}


def _client_tls_reason(error: ssl.SSLError) -> str:
    """_tls_reason for a client's handshake, with what it most often means."""
    hint = _CLIENT_TLS_HINTS.get(error.reason or "")
    reason = _tls_reason(error)
    return f"{reason} ({hint})" if hint else reason


def _tls_reason(error: ssl.SSLError) -> str:
    """OpenSSL's reason for a TLS failure, in words an admin can search for."""
    reason = error.reason or ""
    if reason == "HTTP_REQUEST":
        return _PLAIN_HTTP
    if reason:
        return reason.lower().replace("_", " ")
    return str(error)


class _Broken(Exception):
    """A send to `side` failed; raised through the handler of the other side's event so
    that the failure is blamed on the socket that failed."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error


def _drop_traceback(error: BaseException) -> None:
    """h11 re-raises its errors with `raise self` from a method of the error, so the error,
    its traceback and that method's frame form a reference cycle, and the traceback holds our
    frames and through them the session: it would wait for the cyclic GC. Dropping the
    traceback (the message is all we use) breaks the cycle."""
    error.__traceback__ = None


def _stuck_on_bare_lf(conn: h11.Connection) -> bool:
    """`conn` asks for more of its peer's body and holds a chunk line it will never end
    (bare_lf_chunk_line): the exchange would hang until a timeout."""
    return conn.their_state is h11.SEND_BODY and bare_lf_chunk_line(conn.trailing_data[0])


# What h11 says when the peer's end of stream comes before the end of a head or a body.
_H11_BODY_CUT = "peer closed connection without sending complete message body"
_H11_HEAD_CUT = "peer unexpectedly closed connection"


def _client_ended_early(conn: h11.Connection, error: h11.RemoteProtocolError) -> str | None:
    """Why the client's request is incomplete, when `error` is h11 seeing the client's end of
    stream in the middle of it (a detail for the log), else None."""
    text = str(error)
    if not text.startswith((_H11_BODY_CUT, _H11_HEAD_CUT)) or not conn.trailing_data[1]:
        return None
    if text.startswith(_H11_HEAD_CUT):
        return "client closed its side in the middle of its request head"
    rest = text[len(_H11_BODY_CUT) :].strip(" ()")
    return f"client closed its side before the end of its request body ({rest})"


def _chunk_too_large(conn: h11.Connection, event: object) -> bool:
    """The chunk whose size line h11 has just read is larger than MAX_CONTENT_LENGTH. h11
    takes sizes of up to 20 hex digits (80 bits); a peer that keeps them in 64 bits without
    an overflow check reads 2**64 + 5 as 5 and the rest as its next message (RFC 9112 7.1).
    Call with each event of a body: a chunk's size is what h11 has left of it (its reader's
    count, which no public API shows) when it waits for the chunk's first byte, plus that
    first data when the chunk begins in the event."""
    if isinstance(event, h11.Data):
        if not event.chunk_start:
            return False
        first = len(event.data)
    elif event is h11.NEED_DATA:
        first = 0
    else:
        return False
    return getattr(conn._reader, "_bytes_in_chunk", 0) + first > MAX_CONTENT_LENGTH


def _no_deadline() -> None:
    """The deadline callback of a session that is done (its timer is cancelled)."""


def format_peer(
    address: tuple[str, int] | tuple[str, int, int, int] | str | bytes,
) -> tuple[str, str]:
    """(address for X-Forwarded-For, address:port for logs), IPv4-mapped IPv6 shown as IPv4.
    An AF_UNIX address (a path, or bytes in the abstract namespace) is "unix"."""
    if isinstance(address, bytes):
        return "unix", "unix"
    if isinstance(address, str):
        return address or "unix", address or "unix"
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, shown


class Session:
    __slots__ = (
        "backend",
        "backend_framing_doubtful",
        "backend_h11",
        "backend_offered",
        "backend_request",
        "backend_reused",
        "backend_state",
        "body_sent",
        "client",
        "client_h11",
        "client_handshake",
        "client_ip",
        "client_peeked",
        "client_port",
        "client_side_cache",
        "config",
        "connect_started",
        "connect_tried",
        "deadline",
        "deadline_callback",
        "decision",
        "draining",
        "exchange_start",
        "fast_client_eof",
        "fast_extra",
        "fast_head",
        "fast_pending",
        "fast_remaining",
        "forwarded_cache",
        "head_bytes",
        "head_lines",
        "local_address",
        "local_port",
        "loop",
        "next_address",
        "peer",
        "pending_tls",
        "phase",
        "progress",
        "proxy_buffer",
        "pump_later",
        "queue_seen",
        "rejected_bytes",
        "relayed_tls_version",
        "request",
        "request_at",
        "request_done",
        "response_bytes",
        "response_started",
        "response_status",
        "route",
        "runtime",
        "scheme",
        "server",
        "target",
        "timer",
    )

    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        address: tuple[str, int],
        tls: ssl.SSLContext | None,
        local_port: int = 0,
    ) -> None:
        """`local_port` is the port of the listener that accepted `sock` (0: ask the socket).
        The accepted socket inherited TCP_NODELAY and keepalive from the listener."""
        self.server = server
        self.loop = server.loop
        # The settings of the moment: a reload does not change them under this connection.
        self.runtime = server.runtime
        self.config = self.runtime.config
        self.draining = False
        self.client_ip, self.peer = format_peer(address)
        self.client_port = address[1] if isinstance(address, tuple) else 0
        self.client = Leg(self.loop, sock, self._on_client)
        self.scheme = client_scheme(tls_listener=tls is not None)
        # The TLS version a PROXY v2 header named for a client that spoke TLS to the balancer.
        self.relayed_tls_version: str | None = None
        # Our end of the connection, asked of the socket only when a PROXY header needs it.
        self.local_address: tuple[str, int] | None = None
        if not local_port:
            local_port = self._local_address()[1]
        self.local_port = local_port
        self.pending_tls: ssl.SSLContext | None = None
        self.proxy_buffer: bytearray | None = None
        self.route: Route | None = None
        self.target: Target | None = None
        self.rejected_bytes = 0
        self.connect_started = self.request_at = self.loop.now
        # Made on first use (_client_machine): a connection whose exchanges all take the fast
        # path (a WebSocket handshake, most GETs) never needs it.
        self.client_h11: h11.Connection | None = None
        self.backend: Leg | None = None
        self.backend_h11: h11.Connection | None = None
        # The TLS session the backend connection offered for resumption.
        self.backend_offered: ssl.SSLSession | None = None
        self.backend_state = _TCP_CONNECTING
        self.backend_reused = False
        self.next_address = 0
        # What each address of the backend's name answered, while a later one is tried.
        self.connect_tried: list[str] | None = None
        self.timer: Timer | None = None
        # h11 holds events that the budget of a turn left for the next one (PUMP_BUDGET).
        self.pump_later = False
        self.deadline = 0.0
        self.deadline_callback: Callable[[], None] = self._on_timeout
        self.request: h11.Request | SimpleRequest | None = None
        self.backend_request: h11.Request | SimpleRequest | None = None
        self.decision: UpgradeDecision | None = None
        self.request_done = False
        self.client_peeked = False
        self.body_sent = 0
        self.response_started = False
        self.response_status = 0
        self.response_bytes = 0
        self.exchange_start = self.loop.now
        self.progress = self.loop.now
        # The kernel's send queue toward the peer whose backlog waits, at the last look of a
        # timeout (_look_again); -1: not looked at since the last progress.
        self.queue_seen = -1
        self.head_bytes: bytearray | None = bytearray()
        self.head_lines = 0  # LFs in head_bytes: a cheap bound on its header fields
        # The exchange under way bypasses h11 (see _take_simple_request): its request head as
        # the client sent it (replayed into h11 if the exchange leaves the fast path), the
        # response body bytes still to relay (-1 before the response head) and whether the
        # backend sent more than the body (its connection is then not reused).
        self.fast_head: bytes | None = None
        self.fast_remaining = -1
        self.fast_extra = False
        # The h11 path's answer came with both Content-Length and Transfer-Encoding: its
        # backend connection is not reused (see _on_response).
        self.backend_framing_doubtful = False
        # What the client sent while a fast-path answer was awaited (pipelined requests), and
        # whether it ended its side: the client is read throughout a fast exchange, so that its
        # socket need not leave the selector and come back with every request.
        self.fast_pending: bytearray | None = None
        self.fast_client_eof = False
        self.client_side_cache: ClientSide | None = None
        # For a `plain` fast-path request: the Host it came with, the forwarded headers that
        # follow it to the backend, and their lines (the same for every request of a client
        # that keeps its Host).
        self.forwarded_cache: ForwardedLines | None = None
        # The header timeout bounds the TLS handshake and the first head together.
        self._arm(self.config.header_timeout, self._on_timeout)
        self.client_handshake = 0
        self.phase = HEAD
        if self.config.accept_proxy_protocol:
            # The balancer's PROXY header comes first, before any TLS.
            if not self.client_side().trusted:
                self.server.metrics.proxy_protocol_errors += 1
                log.warning(
                    "%s PROXY protocol from an address not in --trusted-proxy; closed", self.peer
                )
                self._close(reset=True)
                return
            self.phase = PROXY_HEADER
            self.pending_tls = tls
            self.proxy_buffer = bytearray()
        else:
            self._start(tls, b"")
            if tls is None:
                # A client usually sends its request as soon as it is connected, and by the
                # time we accept it is often here: read it now rather than after one more turn
                # of the loop (an empty socket costs one EAGAIN).
                self._on_client(READ)
                self._note_if_spare()
                return
        self._note_if_spare()
        self._update_interest()

    def _start(self, tls: ssl.SSLContext | None, early: bytes) -> None:
        """Begin with the client: TLS handshake or the first request head. `early` are bytes
        already read past a PROXY header."""
        if tls is None:
            self.phase = HEAD
            if early:
                self._take_client_bytes(memoryview(early))
            return
        self.phase = HANDSHAKE
        try:
            self.client.start_tls(tls)
        except OSError as e:  # the client is gone already (getpeername fails)
            self._client_lost(e)
            return
        self.client_handshake = READ
        if early:
            sock = self.client.sock
            assert isinstance(sock, TlsSocket)
            sock.feed(early)
            self._client_handshake_step()

    def _read_proxy_header(self) -> None:
        buffer = self.proxy_buffer
        assert buffer is not None
        sock = self.client.sock
        assert isinstance(sock, socket.socket)  # TLS starts after the PROXY header
        try:
            data = sock.recv(PROXY_HEADER_LIMIT - len(buffer))
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            log.info("%s closed before its PROXY header was complete", self.peer)
            self._close()
            return
        buffer += data
        try:
            header = parse_proxy_header(buffer)
        except ProxyProtocolError as e:
            self.server.metrics.proxy_protocol_errors += 1
            log.warning("%s bad PROXY protocol header: %s; closed", self.peer, e)
            self._close(reset=True)
            return
        if header is NEED_MORE:
            return
        assert isinstance(header, ProxyHeader)
        if header.source is not None:
            balancer = self.peer
            self.client_ip, self.peer = format_peer(header.source)
            self.client_port = header.source[1]
            log.debug("%s PROXY v%d: client %s", balancer, header.version, self.peer)
        if header.destination is not None:
            self.local_address = header.destination
            self.local_port = header.destination[1]
        # What the balancer says of TLS (v2's SSL TLV) counts as much as our own listener.
        self.scheme = client_scheme(self.pending_tls is not None, header.client_tls)
        self.relayed_tls_version = header.tls_version
        self.forwarded_cache = None
        self.client_side_cache = None
        early = bytes(buffer[header.length :])
        self.proxy_buffer = None
        self._start(self.pending_tls, early)
        self.pending_tls = None
        self._note_if_spare()  # only the PROXY header so far?

    def _note_if_spare(self) -> None:
        """Connected, and not a byte of a request (or of TLS) read yet: a browser's spare
        connection, often. Until its first byte it may make room for a new client at
        --max-connections (may_make_room); _on_client and _read_client take it out."""
        phase = self.phase
        if phase == HEAD:
            if not self.head_bytes:
                self.server.became_idle(self)
        elif phase == HANDSHAKE:
            sock = self.client.sock
            if isinstance(sock, TlsSocket) and not sock.first_bytes:
                self.server.became_idle(self)

    def _local_address(self) -> tuple[str, int]:
        local = self.local_address
        if local is None:
            try:
                sock = self.client.sock
                name = (sock.raw if isinstance(sock, TlsSocket) else sock).getsockname()
                # An AF_UNIX listener (from systemd) has a path or bytes here, and no port.
                local = (format_peer(name)[0], name[1]) if isinstance(name, tuple) else ("unix", 0)
            except (OSError, IndexError, TypeError):
                local = ("0.0.0.0", 0)
            self.local_address = local
        return local

    def __repr__(self) -> str:
        return f"<Session {self.peer} phase={self.phase} backend={self.backend is not None}>"

    # -- small helpers ---------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback` in `delay` seconds instead of what was armed before. The loop's
        timer is replaced only when the new deadline is earlier than the one it holds: a later
        one (the usual case: every request moves the deadline on) is checked when the timer
        fires, which then sleeps again for what is left. No timer is made per request."""
        deadline = self.deadline = self.loop.now + delay
        self.deadline_callback = callback
        timer = self.timer
        if timer is not None:
            if not timer.cancelled and timer.when <= deadline:
                return
            timer.cancel()
        self.timer = self.loop.call_later(delay, self._on_deadline)

    def _on_deadline(self) -> None:
        self.timer = None
        left = self.deadline - self.loop.now
        if left > 0:
            self.timer = self.loop.call_later(left, self._on_deadline)
            return
        self.deadline_callback()

    def _describe(self) -> str:
        request = self.request
        if request is None:
            return self.peer
        return _described(
            self.peer,
            request.method.decode("latin-1"),
            request.target.decode("latin-1"),
            request.http_version.decode(),
        )

    def _update_interest(self) -> None:
        """Derive what each socket must be watched for from the state; the legs touch the
        selector only when that differs from what is registered."""
        phase = self.phase
        if phase == DONE:
            return
        backend = self.backend
        if phase == HANDSHAKE:
            client_events = self.client_handshake
        else:
            client_events = READ if self._client_wants_read() else 0
            if self.client.backlog is not None:
                client_events |= WRITE
        if client_events != self.client.interest:
            self.client.want(client_events)
        if backend is not None:
            state = self.backend_state
            if state == _TCP_CONNECTING:
                backend_events = WRITE
            elif state != _READY:
                backend_events = state  # READ or WRITE, as the TLS handshake asks
            else:
                # _backend_wants_read(), the state being _READY
                backend_events = (
                    READ
                    if (phase != EXCHANGE or self.client.backlog is None) and not self.pump_later
                    else 0
                )
                if backend.backlog is not None:
                    backend_events |= WRITE
            if backend_events != backend.interest:
                backend.want(backend_events)

    def _client_wants_read(self) -> bool:
        if self.pump_later:
            return False  # h11 holds bytes to handle first
        phase = self.phase
        if self.client.backlog is not None and phase in (HEAD, IDLE, CLOSING):
            # The next request waits for the client to take its answers; and its end, which
            # closes the connection, must not come before they are out (a client may end
            # its side once its last request is sent).
            return False
        if phase in (HEAD, IDLE, CLOSING, REJECT, PROXY_HEADER):
            return True
        if self.fast_head is not None and phase in (CONNECTING, EXCHANGE):
            pending = self.fast_pending
            return not self.fast_client_eof and (
                pending is None or len(pending) < self.config.max_header_size
            )
        if self._awaiting_answer():
            return not self.client_peeked  # watched for the client leaving: _peek_client
        backend = self.backend
        return (
            phase == EXCHANGE
            and self.client_h11 is not None
            and self.client_h11.their_state is h11.SEND_BODY
            and backend is not None
            and backend.backlog is None
        )

    def _backend_wants_read(self) -> bool:
        # Outside an exchange the backend is idle: read to notice it closing.
        return (
            self.backend_state == _READY
            and not self.pump_later
            and (self.phase != EXCHANGE or self.client.backlog is None)
        )

    # -- client side -----------------------------------------------------------------------

    def _on_client(self, mask: int) -> None:
        try:
            if self.phase == PROXY_HEADER:
                self._read_proxy_header()
            elif self.phase == HANDSHAKE:
                self.server.idle.pop(self, None)  # under way: no longer a spare connection
                self._client_handshake_step()
            else:
                if mask & WRITE and self._flush(self.client):
                    self._client_drained()
                if mask & READ and self.phase != DONE:
                    if self._awaiting_answer():
                        self._peek_client()
                    else:
                        self._read_client()
                        if self.client.tls:
                            self._read_client_tls_rest()
            if self.phase != DONE:
                self._push()
        except _Broken as e:
            self._on_broken(e.side, e.error)
        except OSError as e:
            self._on_broken("client", e)
        self._update_interest()

    def _awaiting_answer(self) -> bool:
        """A complete request on h11's path waits for its answer: the client is not read, only
        watched (_peek_client). The fast path reads it instead (_hold_client_bytes)."""
        return self.phase in (CONNECTING, EXCHANGE) and self.request_done and self.fast_head is None

    def _peek_client(self) -> None:
        """A complete request waits for its answer (h11's path; the fast path keeps reading
        instead): the client is watched for a reset, which means it left (499 in the access
        log, and the backend's connection dropped, as nginx does). Bytes (a pipelined request,
        WebSocket frames before the 101) or the client's end (a half-close, which a client may
        do after its request) are left where they are, and the socket is not watched again
        in this exchange: level-triggered, it would be reported on every round."""
        sock = self.client.sock
        raw = sock.raw if isinstance(sock, TlsSocket) else sock
        try:
            raw.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            raise _Broken("client", e) from e
        self.client_peeked = True

    def _read_client_tls_rest(self) -> None:
        """Decrypted bytes left inside the client's SSL object raise no readiness event: read
        them while the backend takes what we send (what was queued is sent first, so that a
        full backend stops the reading; its drain calls this again)."""
        client = self.client
        if not client.tls:
            return
        while client.pending() and self.phase != DONE and self._client_wants_read():
            self._push()
            if not self._client_wants_read():
                return
            self._read_client()

    def _read_backend_tls_rest(self) -> None:
        """The same for the backend's SSL object, while the client takes what we send."""
        backend = self.backend
        if backend is None or not backend.tls:
            return
        while self.backend is backend and backend.pending() and self._backend_wants_read():
            self._push()
            if not self._backend_wants_read():
                return
            self._read_backend()

    def _client_handshake_step(self) -> None:
        try:
            wants = self.client.handshake()
        except ssl.SSLError as e:
            sock = self.client.sock
            assert isinstance(sock, TlsSocket)
            if not sock.first_bytes and isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                # Connected and closed without a byte: a TCP health check (a balancer's, a
                # monitor's), not a failed handshake; logged only at debug (HAProxy's
                # dontlognull), or every check would be a line.
                log.debug("%s closed before sending anything", self.peer)
                self._close()
                return
            # OpenSSL recognises GET, POST, HEAD and PUT only; any method is plain HTTP.
            plain = e.reason == "HTTP_REQUEST" or looks_like_plain_http(sock.first_bytes)
            reason = _PLAIN_HTTP if plain else _client_tls_reason(e)
            log.info("%s TLS handshake failed: %s", self.peer, reason)
            self.server.metrics.tls_handshake_failures["client"] += 1
            if not plain:
                self._close(reset=True)
                return
            # Say it in the client's language, past the SSL object (as nginx does), and close
            # as after any answer of ours: a FIN, then what the client still sends is read and
            # dropped for a while. A reset at once (unread bytes at close) could destroy the
            # answer on its way, and the client would see only "connection reset".
            self.client.drop_tls()
            try:
                self.client.send(
                    error_response(400, "plain HTTP was sent to a TLS port; use https://")
                )
            except OSError:
                self._close(reset=True)
                return
            # An answer like any 400 of ours: counted, and its line in the access log file
            # (the line above is the stderr one), naming the request when its line is among
            # the first bytes kept.
            self.server.metrics.count_request(400)
            self.server.access.unparsed(
                client=self.client_ip,
                status=400,
                duration=self.loop.now - self.exchange_start,
                error=_PLAIN_HTTP,
                line=request_line_of(sock.first_bytes),
                stderr=False,
            )
            self._close_gracefully()
            return
        if wants:
            self.client_handshake = wants
            return
        self.client_handshake = 0
        self.phase = HEAD
        if log.isEnabledFor(logging.DEBUG):
            sock = self.client.sock
            assert isinstance(sock, TlsSocket)
            log.debug(
                "%s TLS %s, cipher %s, ALPN %s",
                self.peer,
                sock.version(),
                (sock.cipher() or ("?",))[0],
                sock.selected_alpn_protocol(),
            )
        self._read_client()
        self._note_if_spare()  # TLS is up: a request yet?

    def _on_broken(self, side: str, error: OSError) -> None:
        if side == "client":
            self._client_lost(error)
        else:
            self._backend_lost(f"connection error: {error.strerror or error}")

    def _read_client(self) -> None:
        data = self.client.receive()
        if data is None:
            return
        phase = self.phase
        if self.fast_head is not None and phase in (CONNECTING, EXCHANGE):
            self._hold_client_bytes(data)
            return
        if phase == CLOSING:
            if not data:
                self._close()
            return
        if phase == IDLE:
            if not data:
                self._close()
                return
            if data[0] in _EMPTY_LINE:
                data = _without_empty_lines(data)
                if not data:
                    return  # still idle: the request, if any, comes after them
            self.phase = HEAD
            self.exchange_start = self.loop.now
            self.server.idle.pop(self, None)
            if self._take_simple_request(data, idle=True):
                self.progress = self.loop.now
                return
            self.head_bytes = bytearray()
            self.head_lines = 0
            self._arm(self.config.header_timeout, self._on_timeout)
            self._take_client_bytes(data, fast=False)
            return
        elif phase == HEAD and not self.head_bytes:
            if not data:
                # The client left (or a browser's spare connection closed) before a request.
                self._close()
                return
            self.server.idle.pop(self, None)  # its first request begins
            # Timed from its first byte, as nginx's $request_time: not from the accept (a
            # browser's spare connection may wait long, and a TLS handshake is not the
            # request's).
            self.exchange_start = self.loop.now
        self._take_client_bytes(data)

    def _take_client_bytes(self, data: memoryview, fast: bool = True) -> None:
        head_bytes = self.head_bytes
        if head_bytes is not None:
            if not head_bytes:
                if data and data[0] in _EMPTY_LINE:
                    data = _without_empty_lines(data)
                    if not data:
                        return  # the head has not begun; the header timeout still runs
                if fast and self._take_simple_request(data):
                    self.progress = self.loop.now
                    return
            before = len(head_bytes)
            head_bytes += data
            self.head_lines += head_bytes.count(b"\n", before)
            if self._too_many_fields(head_bytes):
                return
        self.progress = self.loop.now
        # h11 copies what it is given (its annotation says bytes; any bytes-like works).
        self._client_machine().receive_data(data)  # type: ignore[arg-type]
        self._pump_client()

    def _too_many_fields(self, head: bytearray) -> bool:
        """A head (so far) with more than --max-header-count fields is answered 431 before
        h11 parses a field of it: True when it was. Only the LFs were counted as the bytes
        came; the head is looked at only once they are more than the fields allowed (they
        may include a body's)."""
        limit = self.config.max_header_count
        if self.head_lines <= limit + 1:
            return False
        refused = head_error(head, self.config.max_header_size, limit)
        if refused is None or refused[0] != 431:
            return False
        self.head_bytes = None
        self._fail(*refused)
        return True

    def _take_simple_request(self, data: memoryview, idle: bool = False) -> bool:
        """The fast path: a whole simple request head (rawproxy.http.parse_simple_request) in
        one read, on a connection whose backend is connected, idle and the one its route
        names, is forwarded without h11. True when it was taken. `idle`: the connection was
        between requests, so the client's h11 machine is known to be idle."""
        backend = self.backend
        if (
            self.draining
            or self.phase != HEAD
            or (
                not idle
                and self.client_h11 is not None  # a machine not made yet is idle
                and self.client_h11.their_state is not h11.IDLE
            )
            or (backend is not None and (self.backend_state != _READY or backend.backlog))
        ):
            return False
        self._follow_reload()
        config = self.config
        raw = bytes(data)
        request = parse_simple_request(raw, config.max_header_size, config.max_header_count)
        if request is None:
            return False
        chosen = self.runtime.choose(request.target)
        if chosen is None:
            return False
        route, target, backend_target = chosen
        if backend is not None and backend_target is not self.target:
            return False
        decision = _NO_UPGRADE
        if request.upgrade_fields:
            decision = decided_upgrade(request.upgrade_fields)
        head: bytes | None = None
        if request.plain and not config.backend_host_header:
            # Nothing of the client's head changes: its lines go as they came, then ours.
            host = request.raw[0][1]
            cached = self.forwarded_cache
            if cached is None or cached[0] != host:
                cached = self.forwarded_cache = self._forwarded_lines(host)
            upgrade = decision.upgrade
            headers = plain_request_headers(request, cached[1], upgrade)
            head = plain_request_head(raw, request, target, cached[2], upgrade)
        else:
            headers = backend_request_headers(
                request.raw,
                decision,
                self.client_side_cache or self.client_side(),
                forwarded=config.forwarded,
                default_host=backend_target.authority,
                host_override=backend_target.authority if config.backend_host_header else None,
            )
        self._begin_exchange(request, request_done=True)
        if decision.considered and log.isEnabledFor(logging.DEBUG):
            log.debug("%s upgrade decision: %s", self._describe(), decision.reason)
        self.route = route
        self.backend_request = SimpleRequest(request.method, target, headers, head=head)
        self.decision = decision
        self.fast_head = raw
        self.fast_remaining = -1
        self.fast_extra = False
        self.head_bytes = None
        self.target = backend_target
        if backend is None:
            self.phase = CONNECTING
            self._connect()  # the head is written by _send_request_head
            return True
        self.backend_reused = True
        self.phase = EXCHANGE
        self._arm(config.response_timeout, self._on_timeout)
        if head is None:
            head = write_head(b"%s %s HTTP/1.1\r\n" % (request.method, target), headers)
        backend.queue((head,))
        return True

    def _forwarded_lines(self, host: bytes) -> ForwardedLines:
        """The forwarded headers that follow a `plain` request with this Host, and their
        lines. They depend on nothing but the client's address, the scheme and port it came
        to and the Host, so the runtime remembers them for the next connection from there
        (a browser opens several; a WebSocket handshake is a new connection each time). Only
        short Hosts are kept, and the memo is emptied when full: many clients only make it
        begin again."""
        memo = self.runtime.forwarded_memo
        key = (self.client_ip, self.scheme, self.local_port, host)
        found = memo.get(key)
        if found is None:
            added = forwarded_headers(self.client_side(), host, self.config.forwarded)
            found = (host, added, header_lines(added))
            if len(host) <= FORWARDED_MEMO_HOST_MAX:
                if len(memo) >= FORWARDED_MEMO_MAX:
                    memo.clear()
                memo[key] = found
        return found

    def _hold_client_bytes(self, data: memoryview) -> None:
        """Bytes from the client while a fast-path answer is awaited: kept for after it."""
        if not data:
            self.fast_client_eof = True
        elif self.fast_pending is None:
            self.fast_pending = bytearray(data)
        else:
            self.fast_pending += data

    def _give_held_bytes_to_h11(self) -> None:
        pending = self.fast_pending
        if pending:
            self._client_machine().receive_data(bytes(pending))
        if self.fast_client_eof:
            self._client_machine().receive_data(b"")
        self.fast_pending = None
        self.fast_client_eof = False

    def _leave_fast_path(self) -> bool:
        """Hand the exchange under way to h11 as if h11 had parsed it: the request head is
        replayed into both machines (what they would send was sent already). False (and the
        connection closed) if h11 refuses what the fast path accepted, which the tests of
        rawproxy.http say cannot happen."""
        head = self.fast_head
        sent = self.backend_request
        assert head is not None
        assert isinstance(sent, SimpleRequest)
        self.fast_head = None
        client_h11 = self._client_machine()
        try:
            client_h11.receive_data(head)
            request = client_h11.next_event()
            end = client_h11.next_event()
            if not isinstance(request, h11.Request) or not isinstance(end, h11.EndOfMessage):
                raise h11.LocalProtocolError(f"h11 read {request!r}, {end!r}")
            self._give_held_bytes_to_h11()
            backend_request = h11.Request(method=sent.method, target=sent.target, headers=sent.raw)
            if self.backend is not None:
                machine = self._backend_machine()
                machine.send(backend_request)
                machine.send(h11.EndOfMessage())
        except h11.ProtocolError as e:
            _drop_traceback(e)
            log.error("%s fast path and h11 disagree on a request: %s", self._describe(), e)
            self._close(reset=True)
            return False
        self.request = request
        self.backend_request = backend_request
        return True

    def _relay_simple_response(self, data: memoryview) -> None:
        """The backend's answer to a fast-path request: a simple response is relayed here;
        anything else (or a backend that closed) goes to h11 from its first byte."""
        remaining = self.fast_remaining
        body: memoryview | bytes
        lead = 0  # bytes at the start of `body` that are the response head
        if remaining < 0:
            chunk = bytes(data)
            request = self.request
            assert request is not None
            response = None
            if not self.draining and request.method != b"HEAD":
                decision = self.decision
                response = parse_simple_response(
                    chunk, decision is not None and decision.upgrade is not None
                )
            if response is not None and response.head_size > self.config.max_header_size:
                response = None  # h11's path refuses it (_head_over_limit)
            if response is None:
                if self._leave_fast_path():
                    assert self.backend_h11 is not None
                    self.backend_h11.receive_data(chunk)
                    self._pump_backend()
                return
            if response.status == 101:
                if not self._refuse_switch(response.raw):
                    self._switch_simple(response, chunk)
                return
            self._on_simple_response(response)
            remaining = response.content_length
            if response.plain:
                # The client gets the head as the backend wrote it, in one send with the body
                # bytes that came with it.
                lead = response.head_size
                body = memoryview(chunk)
                if response.cuts:  # less its hop-by-hop lines
                    head = without_cuts(chunk, 0, lead, response.cuts)
                    lead = len(head)
                    body = memoryview(b"".join((head, body[response.head_size :])))
            else:
                body = memoryview(chunk)[response.head_size :]
        elif not data:
            self._backend_lost("closed the connection")
            return
        else:
            body = bytes(data)  # the loop's read buffer is reused by the next read
        size = len(body) - lead
        if size > remaining:
            self.fast_extra = True
            body = body[: lead + remaining]
            size = remaining
        if size or lead:
            self.client.queue((body,))
            self.response_bytes += size
            remaining -= size
        self.fast_remaining = remaining
        if remaining == 0:
            self._simple_exchange_done()

    def _on_simple_response(self, response: SimpleResponse) -> None:
        self.server.metrics.observe_head_latency(self.loop.now - self.request_at)
        self.response_started = True
        self.response_status = response.status
        if not response.plain:
            headers = self._response_headers(response.raw, response.status)
            start = b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason)
            self.client.queue((write_head(start, headers),))

    def _simple_exchange_done(self) -> None:
        self.fast_head = None
        self.fast_remaining = -1
        self._log_access(self.response_status)
        if self.fast_extra:
            log.debug(
                "%s backend sent bytes after its response; its connection is not reused",
                self._describe(),
            )
            self._drop_backend()
        self.request = None
        if self.draining:
            self._close_gracefully()
            return
        if self.fast_pending is None and not self.fast_client_eof:
            # The usual case: nothing came meanwhile, and h11 holds nothing (a fast exchange
            # starts only on an idle machine with an empty buffer).
            self._await_request(b"", False)
            return
        self._give_held_bytes_to_h11()  # pipelined requests, or the client's end: h11's now
        self._next_request()

    def _pump_client(self) -> None:
        """Turn what h11 holds from the client into actions, until it needs more bytes, the
        backend cannot take more (backpressure), or the exchange waits for the backend."""
        client_h11 = self._client_machine()
        body: list[bytes] = []  # Data not passed on yet (COALESCE_LIMIT)
        gathered = 0
        budget = PUMP_BUDGET
        try:
            while self.phase in (HEAD, EXCHANGE, REJECT):
                if gathered >= COALESCE_LIMIT:
                    self._body_to_backend(body)
                    gathered = 0
                if self.phase == EXCHANGE and self.backend is not None and self.backend.backlog:
                    return
                if self.pump_later:
                    # A pipelined request after an answer of our own (_await_request), or the
                    # budget spent: the rest is the next turn's (_pump_again).
                    return
                if self.phase == HEAD and self.client.backlog is not None:
                    # A pipelined request waits until the client has taken the answers before
                    # it (_client_drained goes on), as in nginx and HAProxy: answers of our
                    # own (404) would otherwise pile up for a client that reads none.
                    self._arm(self.config.idle_timeout, self._on_timeout)
                    return
                if not budget:
                    self._pump_next_turn()
                    return
                budget -= 1
                event = self._next_client_event(client_h11)
                if event is None:
                    if self.phase == REJECT and client_h11.they_are_waiting_for_100_continue:
                        # Its body comes only when asked for (RFC 9110 10.1.1): the 404 goes
                        # now, and the connection closes without reading it.
                        self._fail(404, "no route for this path (request body not read)")
                    return
                if isinstance(event, h11.Data) and self.phase == EXCHANGE:
                    body.append(event.data)
                    gathered += len(event.data)
                    continue
                if body:
                    self._body_to_backend(body)
                    gathered = 0
                self._on_client_event(event)
        finally:
            if body and self.phase == EXCHANGE:
                self._body_to_backend(body)

    def _body_to_backend(self, body: list[bytes]) -> None:
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._to_backend(h11.Data(data=data))
        self.body_sent += len(data)

    def _pump_next_turn(self) -> None:
        """The budget of this turn is spent: go on in the next one (either side's pump),
        reading nothing new from either side meanwhile."""
        if not self.pump_later:
            self.pump_later = True
            self.loop.call_later(0, self._pump_again)

    def _pump_again(self) -> None:
        self.pump_later = False
        if self.phase == DONE:
            return
        try:
            self._pump_client()
            if self.phase == EXCHANGE and self.fast_head is None and self.backend_h11 is not None:
                self._pump_backend()
            if self.phase != DONE:
                self._push()
        except _Broken as e:
            self._on_broken(e.side, e.error)
        except OSError as e:
            self._on_broken("client", e)
        self._update_interest()

    def _next_client_event(self, client_h11: h11.Connection) -> object | None:
        """The next event h11 has of the client, or None when there is none to act on now
        (it needs more bytes, or the request failed and was answered)."""
        if client_h11.their_state is h11.MUST_CLOSE:
            # The request is whole and the client said it is its last (Connection: close,
            # HTTP/1.0): what came after it is ignored, as RFC 9112 9.6 says, and the
            # connection closes after the answer. (h11 would call those bytes an error.)
            return None
        try:
            event = client_h11.next_event()
        except h11.RemoteProtocolError as e:
            _drop_traceback(e)
            early = _client_ended_early(client_h11, e)
            if early is not None:
                # Not a malformed request: a client that gave up (an upload cancelled), as
                # nginx's "client prematurely closed connection"; a 400 all the same.
                self._fail(400, early, logging.INFO)
                return None
            limit = self.config.max_header_size
            status = 431 if e.error_status_hint == 431 else 400
            if self.phase in (EXCHANGE, REJECT):
                # The head was read: what h11 refuses is the body's framing. Its 431 there is a
                # chunk line or trailer section that grew over the limit, no head: a bad body.
                status = 400
                detail = (
                    f"malformed request body: a chunk line or trailer section over {limit} "
                    "bytes (--max-header-size)"
                    if e.error_status_hint == 431
                    else f"malformed request body: {e}"
                )
            elif status == 431:
                detail = f"request head larger than {limit} bytes (--max-header-size)"
            else:
                detail = f"malformed request: {e}"
            self._fail(status, detail)
            return None
        if client_h11.their_state is h11.SEND_BODY and _chunk_too_large(client_h11, event):
            self._fail(400, f"malformed request body: {HUGE_CHUNK}")
            return None
        if event in _NO_MORE:
            if _stuck_on_bare_lf(client_h11):
                self._fail(400, f"malformed request body: {BARE_LF_CHUNK_LINE}")
            return None
        return event

    def _on_client_event(self, event: object) -> None:
        """Act on one of the client's events (a body's Data is gathered by _pump_client)."""
        if self.phase == REJECT:
            if isinstance(event, h11.Data):
                self.rejected_bytes += len(event.data)
                if self.rejected_bytes > REJECT_BODY_LIMIT:
                    self._fail(404, "no route for this path (request body not read)")
            elif isinstance(event, h11.EndOfMessage):
                self._answer_locally(404, "no route for this path")
        elif isinstance(event, h11.EndOfMessage):
            trailers = event.headers
            if trailers:
                config = self.config
                problem = trailer_error(
                    trailers.raw_items(), config.max_header_size, config.max_header_count
                )
                if problem is not None:
                    self._fail(400, f"malformed request body: {problem}")
                    return
            self.request_done = True
            self._to_backend(
                h11.EndOfMessage(headers=forwarded_trailers(trailers.raw_items()))
                if trailers
                else event
            )
        elif isinstance(event, h11.Request):
            self._on_request(event)
        elif isinstance(event, h11.ConnectionClosed):
            self._close()

    def _answer_locally(self, status: int, detail: str) -> None:
        """Answer a complete request ourselves and keep the connection for the next one."""
        request = self.request
        assert request is not None
        body = error_body(status, detail)
        self._report(status, detail, own=0 if request.method == b"HEAD" else len(body))
        self._to_client(
            h11.Response(
                status_code=status, headers=error_headers(len(body)), reason=REASONS[status]
            )
        )
        if request.method != b"HEAD":
            self._to_client(h11.Data(data=body))
        self._to_client(h11.EndOfMessage())
        self._client_cycle_done()

    def _begin_exchange(self, request: h11.Request | SimpleRequest, request_done: bool) -> None:
        """A new request head is in: the state of the exchange starts afresh."""
        self.request = request
        self.request_at = self.loop.now
        self.request_done = request_done
        self.client_peeked = False
        self.body_sent = 0
        self.response_started = False
        self.response_status = 0
        self.response_bytes = 0

    def _follow_reload(self) -> None:
        """A new request on a kept-alive connection follows the configuration reloaded
        since the last one (routes, backends, headers, limits), as a new connection would:
        a client that keeps its connection busy would otherwise never see a reload. Its
        TLS, and a tunnel once upgraded, keep what they started with."""
        runtime = self.server.runtime
        if runtime is not self.runtime:
            self.runtime = runtime
            self.config = runtime.config
            self.forwarded_cache = None
            self.client_side_cache = None

    def _on_request(self, request: h11.Request) -> None:
        self._follow_reload()
        self._begin_exchange(request, request_done=False)
        head = self.head_bytes
        self.head_bytes = None
        config = self.config
        refused = (
            head_error(head, config.max_header_size, config.max_header_count)
            if head is not None
            else None
        )
        if refused is not None:
            self._fail(*refused)
            return
        problem = framing_error(request.headers, request.http_version)
        if problem is not None:
            self._fail(400, problem)
            return
        try:
            target, resolved = resolve_request(
                request.target, request.http_version, request.headers.raw_items(), request.method
            )
        except RequestRefused as e:
            self._fail(e.status, e.reason)
            return
        if target != request.target or resolved is not None:
            log.debug("%s routed and forwarded as %s", self._describe(), target.decode("latin-1"))
            request = h11.Request(
                method=request.method,
                target=target,
                headers=request.headers.raw_items() if resolved is None else resolved,
                http_version=request.http_version,
            )
            self.request = request
        chosen = self.runtime.choose(request.target)
        if chosen is None:
            # Answered here once the request (and any small body) is in; the connection stays.
            # Its body is waited for as a proxied one's is (_on_timeout).
            self.phase = REJECT
            self.rejected_bytes = 0
            self._arm(config.response_timeout, self._on_timeout)
            return
        route, target, backend_target = chosen
        self.route = route
        decision = self.decision = decide_upgrade(request.headers, request.http_version)
        if decision.considered and log.isEnabledFor(logging.DEBUG):
            log.debug("%s upgrade decision: %s", self._describe(), decision.reason)
        headers = backend_request_headers(
            request.headers.raw_items(),
            decision,
            self.client_side(),
            forwarded=config.forwarded,
            default_host=backend_target.authority,
            host_override=backend_target.authority if config.backend_host_header else None,
        )
        try:
            self.backend_request = h11.Request(
                method=request.method, target=target, headers=headers
            )
        except h11.LocalProtocolError as e:
            _drop_traceback(e)
            self._fail(400, f"request cannot be forwarded: {e}")
            return
        self.phase = CONNECTING
        if self.backend is not None and self.target is not backend_target:
            self._drop_backend()  # kept alive for another route's backend
        self.target = backend_target
        if self.backend is None:
            self._connect()
        else:
            self.backend_reused = True
            self._send_request_head()

    @property
    def current_target(self) -> Target:
        """The backend of the exchange under way."""
        target = self.target
        assert target is not None
        return target

    def client_side(self) -> ClientSide:
        side = self.client_side_cache
        if side is None:
            side = self.client_side_cache = self._client_side()
        return side

    def _client_side(self) -> ClientSide:
        ip = self.client_ip
        trusted = False
        if self.runtime.trusted:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                address = None
            trusted = address is not None and any(address in net for net in self.runtime.trusted)
        return ClientSide(ip, self.scheme, self.local_port, trusted)

    def _flush(self, leg: Leg) -> bool:
        """leg.flush(); a peer that took any of the backlog made progress. A slow reader that
        keeps reading is not silent: --response-timeout counts silence, not slowness (as
        nginx's send_timeout does)."""
        backlog = leg.backlog
        if backlog is None:
            return True
        waiting = len(backlog)
        if leg.flush():
            self.progress = self.loop.now
            self.queue_seen = -1
            return True
        if len(leg.backlog or b"") < waiting:
            self.progress = self.loop.now
            self.queue_seen = -1
        return False

    def _not_silent_yet(self, waiting: Leg | None) -> bool:
        """At a --response-timeout deadline: True, and the deadline armed again, when there
        was progress less than --response-timeout ago, or when the kernel's send queue toward
        `waiting` (the peer whose backlog waits, if any) says it is still taking bytes."""
        timeout = self.config.response_timeout
        quiet = self.loop.now - self.progress
        if quiet < timeout:
            self._arm(timeout - quiet, self._on_timeout)
            return True
        again = None if waiting is None else self._look_again(waiting)
        if again is None:
            return False
        self._arm(again, self._on_timeout)
        return True

    def _look_again(self, leg: Leg) -> float | None:
        """At --response-timeout with a backlog for `leg`, nothing taken from it: is the peer
        silent? It may be reading all along while the socket stays unwritable (a large send
        buffer becomes writable again only once a third of it is free: seconds, for a slow
        reader). The kernel's send queue tells: shrunk since the last look is progress (wait
        --response-timeout again); the first look notes its size and looks again shortly.
        Returns the delay to the next look, or None: the peer took nothing."""
        seen = self.queue_seen
        queued = self.queue_seen = send_queue(leg.sock)
        if queued < 0:
            return None
        if seen < 0:
            return QUEUE_LOOK_AGAIN
        if queued < seen:
            self.progress = self.loop.now
            return self.config.response_timeout
        return None

    def _client_drained(self) -> None:
        if self.phase == CLOSING:
            self._shutdown_client()
        elif self.phase == IDLE:
            if self.draining or self.client.ended:
                # The last answer is out (see is_idle), or the client ended its side before
                # it was: a FIN is read again now, a TLS close_notify was read once (the leg
                # has ended) and no readiness event will announce it again.
                self._close()
                return
            # Idle from now on (is_idle): the wait for the next request starts.
            self._arm(self.config.idle_timeout, self._on_timeout)
            if self not in self.server.idle:
                # Passed over at --max-connections while its last answer was going out
                # (Server._oldest_idle drops such entries): it may make room from now on.
                self.server.became_idle(self)
            self._read_client_soon()
        elif self.phase == HEAD:
            # The answers are out: the pipelined request that waited for them is read now.
            self._arm(self.config.header_timeout, self._on_timeout)
            self._pump_client()
        elif self.phase == EXCHANGE:
            if self.fast_head is None:
                self._pump_backend()
            self._read_backend_tls_rest()

    def _to_client(self, event: h11.Event) -> None:
        self.client.queue(self._client_machine().send_with_data_passthrough(event) or ())

    def _push(self) -> None:
        """Send what this event queued for either side: one system call per side."""
        client = self.client
        if client.queued is not None:
            try:
                client.push()
            except OSError as e:
                raise _Broken("client", e) from e
        backend = self.backend
        if backend is not None and backend.queued is not None:
            try:
                backend.push()
            except OSError as e:
                raise _Broken("backend", e) from e

    def _client_lost(self, error: OSError) -> None:
        reason = error.strerror or str(error)
        if self.phase in (HEAD, IDLE, CLOSING) and self.request is None:
            log.debug("%s client connection ended: %s", self.peer, reason)
        elif self.request is not None and self.phase in (CONNECTING, EXCHANGE):
            # In the access log too, as nginx's 499 ("client closed request") before an
            # answer, or the status it was getting, with the bytes it got.
            status = self.response_status if self.response_started else 499
            # At INFO: browsers cancel requests all the time (a page left, a tab closed).
            self._report(status, f"client went away: {reason}", logging.INFO)
        else:
            log.info("%s client went away: %s", self._describe(), reason)
        self._close(reset=True)

    # -- backend side ----------------------------------------------------------------------

    def _connect(self) -> None:
        family, address = self.current_target.addresses[self.next_address]
        self.next_address += 1
        try:
            # Non-blocking from the start (Python sees the flag): no extra system call.
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self._fail(502, f"cannot open a socket to the backend: {e.strerror or e}")
            return
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(os.strerror(err), err)
            return
        self.connect_started = self.loop.now
        self.backend = Leg(self.loop, sock, self._on_backend)
        self.backend_h11 = None  # made when an exchange on this connection needs h11
        self.backend_state = _TCP_CONNECTING
        self.backend_reused = False
        sent = self.backend_request
        if (
            isinstance(sent, SimpleRequest)
            and self.current_target.tls is None
            and self.config.send_proxy_protocol is None
            and self._send_early(sent)
        ):
            return  # connected (the response timeout runs) or failed: no connect timeout
        self._arm(self.config.connect_timeout, self._on_timeout)

    def _send_early(self, sent: SimpleRequest) -> bool:
        """A loopback or nearby backend has mostly accepted the connection by the time
        connect() returns: offer a fast-path request head at once, as HAProxy does. TCP takes
        data only on an established connection, so bytes taken mean connected; EAGAIN means
        still connecting (the selector then says when, as usual); an error is a failed
        connect. Saves the SO_ERROR query, a selector change and a loop turn per new backend
        connection. Only for plain TCP without a PROXY header, and only for a head that is
        plain bytes (an h11 machine's send cannot be taken back). False while still
        connecting."""
        backend = self.backend
        assert backend is not None
        head = _request_head(sent)
        sock = backend.sock
        set_nodelay(sock)  # before the first byte; it works on a connecting socket
        try:
            taken = sock.send(head)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self._connect_failed(e.strerror or str(e), e.errno)
            return True
        self.next_address = 0
        self.connect_tried = None
        self.backend_state = _READY
        self.server.metrics.observe_connect_latency(self.loop.now - self.connect_started)
        self.phase = EXCHANGE
        self.progress = self.loop.now
        self._arm(self.config.response_timeout, self._on_timeout)
        if taken < len(head):
            backend.queue((memoryview(head)[taken:],))
        return True

    def _connect_failed(
        self, reason: str, err: int | None = None, alone: str | None = None
    ) -> None:
        """The address just tried failed (`reason`): the name's next address is tried, as
        nginx goes on to the next upstream on an error or a timeout; after the last one, a
        502 whose line names every address and what it answered (a name with one address:
        `alone`, or the reason after the backend's name)."""
        target = self.current_target
        tried = self.connect_tried or []
        address = target.addresses[self.next_address - 1][1]
        tried.append(f"{format_peer(address)[1]}: {reason}")
        self._drop_backend()
        if self.next_address < len(target.addresses):
            self.connect_tried = tried
            self._connect()
            return
        self.connect_tried = None
        self.server.metrics.backend_connect_errors[classify_connect_error(err)] += 1
        if len(tried) > 1:
            detail = (
                f"cannot connect to backend {target.name}, at any of its addresses: "
                + "; ".join(tried)
            )
        else:
            detail = alone or f"cannot connect to backend {target.name}: {reason}"
        self._fail(502, detail)

    def _send_proxy_header(self, backend: Leg) -> None:
        version = self.config.send_proxy_protocol
        if version is None:
            return
        source = (self.client_ip, self.client_port)
        if version == "v2":
            # v2 says whether the client spoke TLS (the SSL TLV), for a backend that needs the
            # client's scheme and cannot have it from headers (another proxy that accepts
            # this header, or anything else that does not speak HTTP): TLS to us, or to the
            # balancer in front whose header said so (a relayed header says what the
            # accepted one did, as the specification has it).
            sock = self.client.sock
            tls_version = (
                sock.version() if isinstance(sock, TlsSocket) else self.relayed_tls_version
            )
            header = encode_v2(
                source,
                self._local_address(),
                client_tls=self.scheme == "https",
                tls_version=tls_version,
            )
        else:
            header = encode_v1(source, self._local_address())
        # The first bytes on a fresh connection: its send buffer takes them whole.
        backend.sock.send(header)

    def _backend_ready(self) -> None:
        self.backend_state = _READY
        self.next_address = 0  # connected (TLS and all): the next connection starts afresh
        self.connect_tried = None
        backend = self.backend
        if (
            backend is not None
            and isinstance(backend.sock, TlsSocket)
            and backend.sock.version() != "TLSv1.3"
        ):
            # Kept for the next connection to this backend: a resumed handshake instead of
            # a full one (nginx and HAProxy do the same). A TLS 1.2 session is complete now;
            # a TLS 1.3 ticket comes after the handshake: _keep_tls_session takes that one.
            self.current_target.keep_tls_session(backend.sock.session)
        self.server.metrics.observe_connect_latency(self.loop.now - self.connect_started)
        self._send_request_head()

    def _on_backend(self, mask: int) -> None:
        backend = self.backend
        if backend is None:
            return
        try:
            state = self.backend_state
            if state == _TCP_CONNECTING:
                err = backend.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._connect_failed(os.strerror(err), err)
                else:
                    set_nodelay(backend.sock)
                    self._send_proxy_header(backend)
                    tls = self.current_target.tls
                    if tls is None:
                        self._backend_ready()
                    else:
                        target = self.current_target
                        self.backend_offered = target.tls_session
                        backend.start_tls(tls, target.sni, target.tls_session)
                        self._backend_handshake_step()
            elif state != _READY:
                self._backend_handshake_step()
            else:
                if mask & WRITE and self._flush(backend):
                    self._pump_client()
                    self._read_client_tls_rest()
                if mask & READ and self.backend is backend:
                    self._read_backend()
                    if backend.tls:
                        self._read_backend_tls_rest()
            if self.phase != DONE:
                self._push()
        except _Broken as e:
            self._on_broken(e.side, e.error)
        except OSError as e:
            self._on_broken("backend", e)
        self._update_interest()

    def _backend_handshake_step(self) -> None:
        backend = self.backend
        assert backend is not None
        try:
            wants = backend.handshake()
        except ssl.SSLCertVerificationError as e:
            self._count_backend_tls_failure()
            self._fail(
                502,
                f"TLS to backend {self.current_target.name} failed: certificate verify failed: "
                f"{e.verify_message} (check --backend-ca, --backend-sni)",
            )
            return
        except ssl.SSLError as e:
            self._count_backend_tls_failure()
            sock = backend.sock
            if isinstance(sock, TlsSocket) and sock.first_bytes.startswith(b"HTTP/"):
                # OpenSSL says "wrong version number"; what happened is simpler.
                reason = "it answered in plain HTTP (should it be http://, not https://?)"
            else:
                reason = _tls_reason(e)
            self._fail(
                502, f"TLS handshake with backend {self.current_target.name} failed: {reason}"
            )
            return
        except OSError as e:
            # A reset (or another socket error) before the handshake completed: the backend
            # refused this connection; its next address, if any, is tried.
            self._count_backend_tls_failure()
            self._connect_failed(f"{e.strerror or e} during the TLS handshake", e.errno)
            return
        if wants:
            self.backend_state = wants
            return
        self._backend_ready()

    def _count_backend_tls_failure(self) -> None:
        metrics = self.server.metrics
        metrics.tls_handshake_failures["backend"] += 1
        metrics.backend_connect_errors["tls"] += 1

    def _send_request_head(self) -> None:
        self.phase = EXCHANGE
        self.progress = self.loop.now
        self._arm(self.config.response_timeout, self._on_timeout)
        sent = self.backend_request
        if isinstance(sent, SimpleRequest):
            assert self.backend is not None
            self.backend.queue((_request_head(sent),))
            return
        assert sent is not None
        self._to_backend(sent)
        if self.request_done:
            # A retry on a fresh connection of a request that had no body (see _backend_lost).
            self._to_backend(h11.EndOfMessage())
        self._pump_client()

    def _client_machine(self) -> h11.Connection:
        """The h11 machine of the client connection, made on first use (see __init__)."""
        machine = self.client_h11
        if machine is None:
            machine = self.client_h11 = h11.Connection(
                h11.SERVER, max_incomplete_event_size=self.config.max_header_size
            )
        return machine

    def _backend_machine(self) -> h11.Connection:
        """The h11 machine of the backend connection, made on first use: an exchange on the
        fast path never needs it (and a WebSocket handshake's connection is a tunnel next)."""
        machine = self.backend_h11
        if machine is None:
            machine = self.backend_h11 = h11.Connection(
                h11.CLIENT, max_incomplete_event_size=self.config.max_header_size
            )
        return machine

    def _to_backend(self, event: h11.Event) -> None:
        assert self.backend is not None
        self.backend.queue(self._backend_machine().send_with_data_passthrough(event) or ())

    def _read_backend(self) -> None:
        backend = self.backend
        assert backend is not None
        data = backend.receive()
        if data is None:
            return
        if self.phase != EXCHANGE:
            # An idle kept-alive backend connection closed, or sent bytes nobody asked for.
            log.debug(
                "%s idle backend connection %s",
                self.peer,
                "closed" if not data else "sent unexpected bytes; dropped",
            )
            self._drop_backend()
            return
        self.progress = self.loop.now
        if self.fast_head is not None:
            self._relay_simple_response(data)
            return
        self._backend_machine().receive_data(data)  # type: ignore[arg-type]
        self._pump_backend()

    def _pump_backend(self) -> None:
        """Relay what h11 holds of the backend's answer, until it needs more bytes, the client
        cannot take more (backpressure) or the exchange is over; a body's Data go on as one
        and PUMP_BUDGET bounds the events of a turn, as in _pump_client."""
        backend_h11 = self.backend_h11
        assert backend_h11 is not None
        body: list[bytes] = []
        gathered = 0
        budget = PUMP_BUDGET
        try:
            while self.phase == EXCHANGE:
                if gathered >= COALESCE_LIMIT:
                    self._body_to_client(body)
                    gathered = 0
                if self.client.backlog is not None:
                    return
                if not budget:
                    self._pump_next_turn()
                    return
                budget -= 1
                try:
                    event = backend_h11.next_event()
                except h11.RemoteProtocolError as e:
                    _drop_traceback(e)
                    if body:
                        self._body_to_client(body)  # what came before the fault goes first
                    if not self.response_started and backend_h11.trailing_data == (b"", True):
                        self._backend_lost("closed the connection before answering")
                    else:
                        self._backend_invalid(str(e))
                    return
                if _chunk_too_large(backend_h11, event):
                    if body:
                        self._body_to_client(body)
                    self._backend_invalid(HUGE_CHUNK)
                    return
                if event in _NO_MORE:
                    if _stuck_on_bare_lf(backend_h11):
                        if body:
                            self._body_to_client(body)
                        self._backend_invalid(BARE_LF_CHUNK_LINE)
                    return
                if isinstance(event, h11.Data):
                    body.append(event.data)
                    gathered += len(event.data)
                    continue
                if body:
                    self._body_to_client(body)
                    gathered = 0
                try:
                    if not self._relay_response_event(event):
                        return
                except h11.LocalProtocolError as e:
                    _drop_traceback(e)
                    # h11 refuses to send on what it parsed (a header it cannot write back).
                    self._backend_invalid(str(e))
                    return
        finally:
            if body and self.phase == EXCHANGE:
                self._body_to_client(body)

    def _body_to_client(self, body: list[bytes]) -> None:
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.response_bytes += len(data)
        self._to_client(h11.Data(data=data))

    def _relay_response_event(self, event: object) -> bool:
        """Relay one event of the backend's answer; False when the exchange is over."""
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            problem = self._head_over_limit(event) or length_error(event.headers)
            if problem is not None:
                self._backend_invalid(problem)
                return False
        if isinstance(event, h11.Data):
            self._body_to_client([event.data])
        elif isinstance(event, h11.Response):
            self._on_response(event)
        elif isinstance(event, h11.EndOfMessage):
            trailers = event.headers
            if trailers:
                problem = trailer_error(trailers.raw_items(), self.config.max_header_size)
                if problem is not None:
                    self._backend_invalid(problem)
                    return False
            # An HTTP/1.0 client gets the body without its chunked framing, so without the
            # trailer fields, which a recipient may drop (RFC 9112 7.1.2): h11 would refuse
            # to send them, and the whole answer was lost.
            self._to_client(
                h11.EndOfMessage(headers=forwarded_trailers(trailers.raw_items()))
                if trailers and not self._client_speaks_1_0()
                else h11.EndOfMessage()
            )
            self._exchange_done()
            return False
        elif isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                self._switch(event)
                return False
            # 100 Continue, 103 Early Hints: passed on, the real answer follows; never to an
            # HTTP/1.0 client, which would take one for the answer (RFC 9110 15.2).
            if not self._client_speaks_1_0():
                headers = client_response_headers(
                    event.headers.raw_items(), False, event.status_code
                )
                self._to_client(
                    h11.InformationalResponse(
                        status_code=event.status_code, headers=headers, reason=event.reason
                    )
                )
        elif isinstance(event, h11.ConnectionClosed):
            self._backend_lost("closed the connection before answering")
            return False
        return True

    def _head_over_limit(self, head: h11.Response | h11.InformationalResponse) -> str | None:
        """Why a response head is refused for its size, or None. h11 bounds only a head that
        arrives in pieces (max_incomplete_event_size); one that arrives whole in one read
        was taken whatever its size, so the limit depended on how the bytes were cut."""
        # "HTTP/1.1 200 " and the line's CRLF, then the fields
        size = len(head.reason) + 15 + fields_size(head.headers.raw_items())
        limit = self.config.max_header_size
        if size <= limit:
            return None
        return f"response head of {size} bytes is over the limit of {limit} (--max-header-size)"

    def _client_speaks_1_0(self) -> bool:
        version = self._client_machine().their_http_version
        return version is not None and version < b"1.1"

    def _on_response(self, response: h11.Response) -> None:
        self.server.metrics.observe_head_latency(self.loop.now - self.request_at)
        self.response_started = True
        self.response_status = response.status_code
        # Both framings: h11 reads the body by Transfer-Encoding, and the client gets no
        # Content-Length (client_response_headers), but a backend that sends both may frame
        # its body by the other one, and what it sent past our reading of the end would be
        # read as the answer to the next request. Its connection is closed after this answer
        # (RFC 9112 6.3 calls such a message an error; Apache's mod_proxy closes it too).
        names = [name for name, _ in response.headers]  # h11 gives them in lower case
        self.backend_framing_doubtful = b"transfer-encoding" in names and b"content-length" in names
        headers = self._response_headers(response.headers.raw_items(), response.status_code)
        self._to_client(
            h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)
        )

    def _response_headers(
        self, raw: Iterable[tuple[bytes, bytes]], status: int
    ) -> list[tuple[bytes, bytes]]:
        """The headers of a backend's (non-101) answer as the client gets them."""
        request = self.request
        headers = client_response_headers(
            raw, False, status, request is None or request.http_version != b"1.0"
        )
        # Most answers carry nothing to rewrite: build the rule only when one could apply.
        if not REWRITTEN_HEADERS.isdisjoint([name.lower() for name, _ in headers]):
            rule = self._response_rewrite()
            if rule is not None:
                headers = rewrite_response_headers(headers, rule)
        if self.draining or not self.request_done:
            # The proxy stops after this answer: it drains, or the answer came before the
            # end of the request's body (a 401 or 413 to an upload), which is not read on.
            headers.append((b"Connection", b"close"))
        return headers

    def _response_rewrite(self) -> ResponseRewrite | None:
        """How this exchange's answer is rewritten for the client (ProxyPassReverse), if at all."""
        config = self.config
        if not config.rewrite_location and not config.cookie_domains and not config.cookie_paths:
            return None
        request, route, target = self.request, self.route, self.target
        assert request is not None
        assert route is not None
        assert target is not None
        client_host = _header(request, b"host")
        sent = self.backend_request
        origins = [target.origin]
        if sent is not None:
            sent_host = _header(sent, b"host")
            if sent_host is not None:
                # The Host it was sent names the backend under its own scheme, and under the
                # client's, which the forwarded headers told it (an app behind TLS that honours
                # X-Forwarded-Proto writes https://HOST/...).
                for scheme in {target.origin[0], self.scheme}:
                    named = origin_of_host(scheme, sent_host)
                    if named is not None and named not in origins:
                        origins.append(named)
        # Without a Host (HTTP/1.0) the backend's URLs become paths on the proxy: left as
        # they were, they handed the client the backend's internal address.
        return ResponseRewrite(
            backend_origins=tuple(origins),
            client_origin=f"{self.scheme}://{client_host.decode('ascii', 'replace')}"
            if client_host
            else "",
            backend_path=route.backend.path,
            route_prefix=route.prefix,
            cookie_domains=config.cookie_domains,
            cookie_paths=config.cookie_paths,
            locations=config.rewrite_location,
            routes=self.runtime.routes,
            backend=route.backend.endpoint,
        )

    def _backend_invalid(self, detail: str) -> None:
        if self.response_started:
            self._report(
                self.response_status,
                f"backend {self.current_target.name} sent an invalid response body: {detail}; "
                "connection closed",
            )
            self._close(reset=True)
            return
        self._fail(502, f"backend {self.current_target.name} sent an invalid response: {detail}")

    def _backend_lost(self, detail: str) -> None:
        """The backend connection failed or closed in the middle of an exchange."""
        backend = self.backend
        if backend is not None:
            sock = backend.sock
            if isinstance(sock, TlsSocket) and sock.refused_renegotiation:
                detail += (
                    " after it asked for a TLS renegotiation, which rawproxy refuses (a "
                    "client certificate must be asked for in the first handshake)"
                )
        if self.phase == CONNECTING:
            # Still being set up (a PROXY header or TLS handshake under way): a failed
            # connection, answered now, not when --connect-timeout runs out.
            self._connect_failed(detail)
            return
        if self.phase != EXCHANGE:
            self._drop_backend()
            return
        # h11 decides on a retry (and writes it, on a new connection).
        if self.fast_head is not None and not self.response_started and not self._leave_fast_path():
            return
        request = self.request
        if (
            self.backend_reused
            and not self.response_started
            and self.request_done
            and self.body_sent == 0
            and request is not None
            and request.method in IDEMPOTENT_METHODS
        ):
            # A kept-alive connection the backend closed just as we reused it: most likely
            # its idle timeout and our request crossed, but the application may have seen
            # the request. An idempotent one without a body may be sent again (as nginx and
            # HAProxy do); a POST or PATCH may not: the client gets 502 and decides.
            log.debug(
                "%s reused backend connection %s; retrying on a new one", self._describe(), detail
            )
            self._drop_backend()
            self.phase = CONNECTING
            self._connect()
            return
        if self.response_started:
            # The client got a status and part of a body: the access line says so, with the
            # bytes it got (nginx logs the same), and the connection is reset, so that the
            # client cannot take the truncated body for a whole one.
            self._report(
                self.response_status,
                f"backend {self.current_target.name} {detail} in the middle of the response; "
                "connection closed",
            )
            self._close(reset=True)
            return
        self._fail(502, f"backend {self.current_target.name} {detail}")

    def _keep_tls_session(self) -> None:
        """Keep the backend connection's TLS 1.3 session for the next connection to its
        backend. Called once the backend has answered: the session ticket comes after the
        handshake, and by the time an answer was read it has been read too. (A TLS 1.2
        session was kept when the handshake ended: asking the ssl module for a session
        costs as much as a resumed handshake, it decodes the session with its certificate.)"""
        backend = self.backend
        if (
            backend is not None
            and self.backend_state == _READY
            and isinstance(backend.sock, TlsSocket)
            and self.target is not None
            and backend.sock.version() == "TLSv1.3"
            and self.target.wants_tls_session(self.backend_offered, backend.sock.session_reused)
        ):
            self.target.keep_tls_session(backend.sock.session)

    def _drop_backend(self) -> None:
        self._keep_tls_session()
        if self.backend is not None:
            self.backend.close()
            self.backend = None
            self.backend_h11 = None
            self.backend_state = _TCP_CONNECTING
            self.backend_reused = False

    # -- end of an exchange ----------------------------------------------------------------

    def _report(self, status: int, detail: str, level: int = logging.WARNING, own: int = 0) -> None:
        """An answer the proxy gives itself, or one cut short: one line on stderr, whatever
        the access log does. With the access log on stderr that line is the access line with
        the reason (at `level`); with --access-log FILE the request goes there and the reason
        to stderr. `own`: the body bytes of our own answer (its access line shows them, as
        Apache and nginx count their own error pages)."""
        if self.request is None:
            self.server.metrics.count_request(status)
            # A head that never completed may still have a complete request line: name it.
            line = request_line_of(self.head_bytes) if self.head_bytes else None
            if self.server.access.to_file:
                described = self.peer if line is None else _described(self.peer, *line)
                log.log(level, "%s -> %d: %s", described, status, detail)
            self.server.access.unparsed(
                client=self.client_ip,
                status=status,
                duration=self.loop.now - self.exchange_start,
                error=detail,
                line=line,
                size=own,
                level=level,
            )
            return
        if self.server.access.to_file:
            log.log(level, "%s -> %d: %s", self._describe(), status, detail)
        self._log_access(status, detail, level, own)

    def _log_access(
        self, status: int, error: str | None = None, level: int | None = None, own: int = 0
    ) -> None:
        """The access line of an exchange, and its counts. `own`: body bytes of an answer of
        our own, in the line's size but not in bytes_backend_to_client."""
        metrics = self.server.metrics
        metrics.count_request(status)
        metrics.bytes_backend_to_client += self.response_bytes
        metrics.bytes_client_to_backend += self.body_sent
        access = self.server.access
        request = self.request
        if request is None or (error is None and not access.enabled()):
            return
        referer, user_agent = _referer_and_agent(request)
        access.request(
            client=self.client_ip,
            method=request.method.decode("latin-1"),
            target=request.target.decode("latin-1"),
            version=request.http_version.decode("latin-1"),
            status=status,
            size=self.response_bytes + own,
            referer=referer,
            user_agent=user_agent,
            duration=self.loop.now - self.exchange_start,
            backend=self.target.name if self.target is not None else None,
            error=error,
            level=level,
        )

    def _exchange_done(self) -> None:
        self._log_access(self.response_status)
        backend_h11 = self.backend_h11
        assert backend_h11 is not None
        if (
            backend_h11.our_state is h11.DONE
            and backend_h11.their_state is h11.DONE
            and not backend_h11.trailing_data[0]
            and not self.backend_framing_doubtful
        ):
            backend_h11.start_next_cycle()
        else:
            # Bytes after the end of the answer belong to no request: on a reused connection
            # they would be read as the answer to the next client's request.
            if self.backend_framing_doubtful:
                log.debug(
                    "%s backend %s answered with both Content-Length and Transfer-Encoding; "
                    "its connection is not reused",
                    self.peer,
                    self.current_target.name,
                )
            self._drop_backend()
        self._client_cycle_done()

    def _client_cycle_done(self) -> None:
        """The answer to the client is complete: keep the connection for the next request,
        or close it (the client asked to, spoke HTTP/1.0, is still sending a body nobody
        waited for, or the proxy is draining)."""
        client_h11 = self._client_machine()
        self.request = None
        if (
            client_h11.our_state is not h11.DONE
            or client_h11.their_state is not h11.DONE
            or self.draining
        ):
            self._close_gracefully()
            return
        client_h11.start_next_cycle()
        self._next_request()

    def _next_request(self) -> None:
        pending, closed = self._client_machine().trailing_data
        if pending and pending[0] in _EMPTY_LINE:
            # Empty lines before the next request (old clients end a body with an extra CRLF).
            # h11 refuses them and its buffer cannot be edited: a fresh machine (equal to one
            # between requests) gets what follows them.
            pending = pending.lstrip(b"\r\n")
            self.client_h11 = None
            machine = self._client_machine()
            if pending:
                machine.receive_data(pending)
            if closed:
                machine.receive_data(b"")  # h11's end of input
        self._await_request(pending, closed)

    def _await_request(self, pending: bytes, closed: bool) -> None:
        """Between exchanges: `pending` is what the client sent after its last request,
        `closed` whether it ended its side."""
        self.exchange_start = self.loop.now
        # What an error before the next request is parsed must not read as this exchange's.
        self.response_started = False
        self.request = None
        if pending:
            # A pipelined request is already here. Its checks (head_error) look at its head
            # only, and one within the limit is in the first --max-header-size bytes: a copy
            # of all that followed it (up to a whole read) made a read of small pipelined
            # requests cost the square of its size. A head that is longer gets 431 from h11
            # before any more bytes are read (it bounds the incomplete head in its buffer).
            self.phase = HEAD
            head = self.head_bytes = bytearray(pending[: self.config.max_header_size + 3])
            self.head_lines = head.count(b"\n")
            self._arm(self.config.header_timeout, self._on_timeout)
            if not self._too_many_fields(head):
                # In the next turn, not from here: an answer of our own (404) ends inside the
                # client's pump, and pumping again from it, answer after answer, went as deep
                # as the client pipelined (a RecursionError some 140 requests down).
                self._pump_next_turn()
            return
        answered = self._push_client()  # the last answer, queued by this event, goes now
        if closed and answered:
            self._close()  # the client ended its side and its answers are out
            return
        # (Closed by the client: its end is read again once its answers are out.)
        self.phase = IDLE
        if answered:
            self._arm(self.config.idle_timeout, self._on_timeout)
        else:
            # The answer is still going out: the client's silence is watched until it is
            # (_on_timeout); the idle wait starts after (_client_drained).
            self._arm(self.config.response_timeout, self._on_timeout)
        self.server.became_idle(self)
        self._read_client_soon()

    def _push_client(self) -> bool:
        try:
            return self.client.push()
        except OSError as e:
            raise _Broken("client", e) from e

    def _read_client_soon(self) -> None:
        """What the client's SSL object holds raises no readiness event: bytes decrypted with
        the request, or its close_notify (read with the request, when both came in one
        flight). Read them in the next turn, as a readiness event would."""
        if self.client.pending():
            self.loop.call_later(0, self._read_pending_client)

    def _read_pending_client(self) -> None:
        if self.phase in (IDLE, HEAD) and self.client.pending() and self._client_wants_read():
            self._on_client(READ)

    def _refuse_switch(self, headers: Iterable[Header]) -> bool:
        """Answer 502 (and say True) if the backend's 101 names a protocol not offered."""
        decision = self.decision
        assert decision is not None
        assert decision.upgrade is not None
        problem = switch_error(decision.upgrade, headers)
        if problem is None:
            return False
        self._fail(502, f"backend {self.current_target.name} {problem}")
        return True

    def _switch(self, answer: h11.InformationalResponse) -> None:
        """The backend said 101: write its head to the client and become a tunnel."""
        decision = self.decision
        if decision is None or not decision.is_upgrade:
            self._fail(502, f"backend {self.current_target.name} switched protocols unasked")
            return
        if self._refuse_switch(answer.headers.raw_items()):
            return
        # MIGHT_SWITCH_PROTOCOL is a documented h11 state, just missing from its __all__.
        client_h11 = self._client_machine()
        if client_h11.their_state is not h11.MIGHT_SWITCH_PROTOCOL:  # type: ignore[attr-defined]
            self._fail(
                502,
                f"backend {self.current_target.name} switched protocols before the "
                "request body was complete",
            )
            return
        backend_h11 = self.backend_h11
        assert backend_h11 is not None
        head = client_h11.send(
            h11.InformationalResponse(
                status_code=101,
                headers=client_response_headers(answer.headers.raw_items(), True),
                reason=answer.reason,
            )
        )
        assert head is not None
        client_rest, client_eof = client_h11.trailing_data
        backend_rest, backend_eof = backend_h11.trailing_data
        self._become_tunnel(head, client_rest, client_eof, backend_rest, backend_eof)

    def _switch_simple(self, answer: SimpleResponse, data: bytes) -> None:
        """A simple 101 (to an upgrade on the fast path; `data` is the head and what came
        after it): write its head to the client and become a tunnel."""
        if answer.plain:
            head = plain_switch_head(data, answer)
        else:
            headers = client_response_headers(answer.raw, True)
            head = write_head(b"HTTP/1.1 101 %s\r\n" % answer.reason, headers)
        client_rest = bytes(self.fast_pending or b"")
        client_eof = self.fast_client_eof
        self.fast_head = None
        self.fast_pending = None
        self._become_tunnel(head, client_rest, client_eof, data[answer.head_size :], False)

    def _become_tunnel(
        self,
        head: bytes,
        client_rest: bytes,
        client_eof: bool,
        backend_rest: bytes,
        backend_eof: bool,
    ) -> None:
        """Hand both sockets to a tunnel: the 101 `head` and what the backend sent after it
        go to the client first, what the client sent after its request to the backend."""
        client_leg = self.client
        backend = self.backend
        assert backend is not None
        if client_leg.queued is not None or backend.queued is not None:
            self._push()  # anything queued goes before the 101 and the tunnel's first bytes
        if client_leg.backlog is not None:
            head = bytes(client_leg.backlog) + head
        to_client = head + backend_rest if backend_rest else head
        request_rest = b""
        to_backend = client_rest
        if backend.backlog is not None:
            request_rest = bytes(backend.backlog)
            to_backend = request_rest + client_rest
        request = self.request
        assert request is not None
        # What the tunnel's access line needs, as a few strings: an open tunnel must not keep
        # the whole request (its headers are kilobytes; thousands of WebSockets stay open).
        # Nothing when there is no access log at the start of the tunnel. The line goes to
        # the access log of its end (a reload may have opened another and closed this one),
        # with the time from the request's first byte, the handshake's as well.
        line = None
        handshake = self.loop.now - self.exchange_start
        if self.server.access.enabled():
            line = (
                self.client_ip,
                request.method.decode("latin-1"),
                request.target.decode("latin-1"),
                request.http_version.decode("latin-1"),
                *_referer_and_agent(request),
                self.current_target.name,
            )
        metrics = self.server.metrics
        metrics.tunnels_total += 1
        metrics.count_request(101)

        def closed(tunnel: Tunnel, how: str, duration: float) -> None:
            server.forget(tunnel)
            metrics.bytes_client_to_backend += tunnel.c2b.moved
            metrics.bytes_backend_to_client += tunnel.b2c.moved
            if line is None:
                return
            client, method, target, version, referer, user_agent, backend_name = line
            server.access.tunnel(
                client=client,
                method=method,
                target=target,
                version=version,
                referer=referer,
                user_agent=user_agent,
                duration=handshake + duration,
                to_backend=tunnel.c2b.moved,
                to_client=tunnel.b2c.moved,
                ended=how,
                backend=backend_name,
            )

        if self.timer is not None:
            self.timer.cancel()
        if backend.tls:
            self._keep_tls_session()  # the backend connection is the tunnel's from now on
        self.phase = DONE
        self.deadline_callback = _no_deadline  # a bound method: no cycle left behind
        client_sock, client_interest = self.client.hand_over()
        backend_sock, backend_interest = backend.hand_over()
        self.backend = None
        server = self.server
        tunnel = Tunnel(
            self.loop,
            server.pipes,
            client_sock,
            backend_sock,
            to_backend,
            to_client,
            (len(request_rest), len(head)),
            client_eof,
            backend_eof,
            registered=(client_interest, backend_interest),
            splice=server.splice and not self.client.tls and not backend.tls,
            idle_timeout=self.config.tunnel_idle_timeout,
            keepalive=self.config.tcp_keepalive,
            on_close=closed,
            later_keepalive=server.later_keepalive,
        )
        # The tunnel is counted before the session is let go: a drain whose last connection
        # was this handshake would otherwise find none left and stop, cutting the tunnel
        # right after its 101 (the README promises it --drain-timeout).
        server.remember(tunnel)
        server.forget(self)
        tunnel.start()

    # -- errors, timeouts and closing ------------------------------------------------------

    def _fail(self, status: int, detail: str, level: int = logging.WARNING) -> None:
        """Answer `status` ourselves (one log line, at `level`), then close the client
        connection."""
        detail = shortened(detail)
        if self.response_started:
            self._report(status, detail, level)
            self._close(reset=True)
            return
        body = error_body(status, detail)
        head = closing_error_head(status, len(body))
        if self.request is not None and self.request.method == b"HEAD":
            body = b""
        self._report(status, detail, level, own=len(body))
        self._drop_backend()
        try:
            self.client.send(head + body)
        except OSError:
            self._close(reset=True)
            return
        self._close_gracefully()

    def _close_gracefully(self) -> None:
        self.fast_head = None  # the exchange is over, whichever path it was on
        self._drop_backend()
        try:
            self.client.push()
        except OSError:
            self._close(reset=True)
            return
        self.phase = CLOSING
        self._arm(LINGER_SECONDS, self._close)
        if self.client.backlog is None:
            self._shutdown_client()

    def _shutdown_client(self) -> None:
        try:
            self.client.shutdown_write()
        except OSError:
            self._close()

    def _on_timeout(self) -> None:
        phase = self.phase
        config = self.config
        if phase == PROXY_HEADER:
            self.server.metrics.proxy_protocol_errors += 1
            log.warning(
                "%s no complete PROXY header within %gs (--header-timeout); closed",
                self.peer,
                config.header_timeout,
            )
            self._close(reset=True)
        elif phase == HANDSHAKE:
            sock = self.client.sock
            if isinstance(sock, TlsSocket) and not sock.first_bytes:
                # Connected and silent (a port check, a spare connection): closed with a
                # FIN, as on a plain listener; a handshake begun and stalled is reset.
                log.debug("%s closed: no TLS within %gs", self.peer, config.header_timeout)
                self._close()
                return
            log.info(
                "%s TLS handshake not complete within %gs (--header-timeout); closed",
                self.peer,
                config.header_timeout,
            )
            self._close(reset=True)
        elif phase in (HEAD, IDLE) and self.client.backlog is not None:
            # Answers still going out (the next request waits for them, or none came yet):
            # cut only when the client took none of them for --response-timeout.
            if self._not_silent_yet(self.client):
                return
            log.info(
                "%s took none of its answers for %gs (--response-timeout); connection reset "
                "with %d bytes undelivered",
                self.peer,
                config.response_timeout,
                len(self.client.backlog),
            )
            self._close()
        elif phase == HEAD:
            if self.head_bytes:
                self._fail(
                    408,
                    f"request head not complete within {config.header_timeout:g}s "
                    "(--header-timeout)",
                )
            else:
                log.debug("%s closed: no request within %gs", self.peer, config.header_timeout)
                self._close()
        elif phase == IDLE:
            log.debug(
                "%s kept-alive connection idle for %gs; closed", self.peer, config.idle_timeout
            )
            self._close()
        elif phase == CONNECTING:
            name = self.current_target.name
            within = f"within {config.connect_timeout:g}s (--connect-timeout)"
            if self.backend is not None and self.backend_state not in (_TCP_CONNECTING, _READY):
                # TCP is done, the TLS handshake is not: a port that is not TLS, most often.
                reason = f"accepted the TCP connection but completed no TLS handshake {within}"
                alone = (
                    f"backend {name} accepted the TCP connection but did not complete the TLS "
                    f"handshake {within}; is that port really TLS?"
                )
            else:
                reason = f"did not accept the connection {within}"
                alone = f"backend {name} {reason}"
            self._connect_failed(reason, errno.ETIMEDOUT, alone)  # counted as "timeout"
        elif phase == EXCHANGE:
            # Whose silence stops the exchange: the client's, which takes none of the answer,
            # or the backend's, which takes none of the body (the other side is not read
            # meanwhile: backpressure). Either may be reading slowly all along.
            waiting = None
            if self.response_started and self.client.backlog is not None:
                waiting = self.client
            elif not self.request_done and self.backend is not None and self.backend.backlog:
                waiting = self.backend
            if self._not_silent_yet(waiting):
                return
            if self.response_started:
                # One line, in the access log too: the status, the bytes the client got, why,
                # and whose silence it was (the backend is not read while the client has not
                # taken what came before: backpressure).
                who = (
                    "the client took none of it"
                    if self.client.backlog is not None
                    else "the backend sent no more"
                )
                self._report(
                    self.response_status,
                    f"no progress for {config.response_timeout:g}s while relaying the response "
                    f"({who}; --response-timeout); connection closed",
                )
                self._close(reset=True)
            elif not self.request_done and self.backend is not None and self.backend.backlog:
                # The body waits for the backend, which took none of it: the client is not
                # read meanwhile (backpressure), so it is not the one that stopped.
                self._fail(
                    504,
                    f"backend {self.current_target.name} took no request body bytes for "
                    f"{config.response_timeout:g}s (--response-timeout)",
                )
            elif (
                not self.request_done
                # A client that asked for 100 Continue may wait for it (RFC 9110 10.1.1):
                # then the silence is the backend's (504, below).
                and not self._client_machine().they_are_waiting_for_100_continue
            ):
                self._fail(
                    408, f"client sent no request body bytes for {config.response_timeout:g}s"
                )
            else:
                self._fail(
                    504,
                    f"backend {self.current_target.name} sent no response within "
                    f"{config.response_timeout:g}s (--response-timeout)",
                )
        elif phase == REJECT:
            quiet = self.loop.now - self.progress
            if quiet < config.response_timeout:
                self._arm(config.response_timeout - quiet, self._on_timeout)
                return
            self._fail(408, f"client sent no request body bytes for {config.response_timeout:g}s")
        elif phase == CLOSING:
            self._close()
        self._update_interest()

    def abort(self) -> None:
        self._close(reset=True)

    def drain(self) -> None:
        """The proxy is stopping: a request under way is finished, then the connection
        closes; an idle one closes now."""
        self.draining = True
        if (
            self.is_idle()
            or self.phase == HANDSHAKE
            or (self.phase == HEAD and not self.head_bytes)
        ):
            self._close()

    def reclaim(self) -> None:
        """Closed while idle, for a new client (--max-connections): see may_make_room."""
        log.debug(
            "%s %s: --max-connections reached and a new client waited",
            self.peer,
            "kept-alive connection closed while idle"
            if self.phase == IDLE
            else "connection closed before it sent a request",
        )
        self._close()

    def may_make_room(self) -> bool:
        """Whether closing this connection for a new client at --max-connections loses
        nothing: idle between requests with the last answer flushed, or connected without a
        byte of a request yet (TLS up or not begun; a browser's spare connection, as nginx
        counts it), and no byte waiting unread (a request on its way that the loop has not
        read yet: the connection is busy, not idle). A handshake under way is never in the
        register: its first byte took it out."""
        phase = self.phase
        client = self.client
        if phase == IDLE:
            if client.backlog is not None:
                return False
        elif phase in (HEAD, HANDSHAKE):
            if self.request is not None or self.head_bytes or client.backlog is not None:
                return False
        else:
            return False
        sock = client.sock
        if isinstance(sock, TlsSocket):
            if sock.pending():
                return False  # bytes read from the kernel already, not yet taken
            sock = sock.raw
        try:
            return not sock.recv(1, socket.MSG_PEEK)  # b"": it closed; closing it is right
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return True  # broken: its close is due anyway

    def is_idle(self) -> bool:
        """Between requests with nothing left to send: a connection that may be closed now.
        The phase is IDLE as soon as the last answer is queued; the end of a large answer to a
        slow reader may still wait in the client's backlog (closed then, it was cut short).
        Such a connection is closed once it is flushed when the proxy drains
        (_client_drained)."""
        return self.phase == IDLE and self.client.backlog is None

    def shutdown(self) -> None:
        """The proxy is stopping now (the drain time is over, or a second signal): an exchange
        still under way is cut, and its access line says so."""
        if self.request is not None and self.phase in (CONNECTING, EXCHANGE):
            status = self.response_status if self.response_started else 502
            self._report(status, "cut short: the proxy stopped before the answer was complete")
            self._close(reset=True)
            return
        self._close()

    def _close(self, reset: bool = False) -> None:
        if self.phase == DONE:
            return
        self.phase = DONE
        self.fast_head = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.deadline_callback = _no_deadline  # a bound method: no cycle left behind
        self._drop_backend()
        self.client.close(reset=reset)
        self.server.forget(self)
