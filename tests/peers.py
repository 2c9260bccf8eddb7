"""The peers of the proxy in the end-to-end tests, all on real loopback sockets:

- clients: `HttpClient` (any bytes out, a strict response parser in), `WsClient` (WebSocket
  framing after a handshake the test sent itself), and socket helpers;
- backends: `HttpBackend` (h11, records requests), `WsBackend` (wsproto echo, records
  handshakes), `ScriptedBackend` (runs a test's script after the request head),
  `BlackholeBackend` (connects hang) and `refused_port()`;
- `ProxyProcess`: `python -m rawproxy` as a user runs it, with its stderr collected (in a
  given environment, or behind a launcher such as `socket_activate_launcher()`);
- the production side: `admin_get()` and `Metrics` (a parsed /metrics scrape), and
  `NotifySocket` (systemd's end of sd_notify, with each sender's PID).

Every backend takes `ssl_context=` (a server-side context) to serve TLS instead, and
`HttpClient` takes one (client side) to connect with TLS; both then use a
`tls_peers.TlsStream` where they used the socket.

Backends listen on 127.0.0.1, port 0 (the kernel picks; read back with `.port`), and run an
accept thread plus one daemon thread per connection. `stop()` shuts every socket down, which
unblocks every thread, and joins them; the conftest fixtures call it at teardown.

Nothing here raises from a thread: what a peer saw (requests, errors) is recorded and read by
the test in the main thread.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import queue
import random
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h11
from tls_peers import TlsStream, tls_wait_closed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsFrameConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0
HEAD_LIMIT = 1024 * 1024
BLOB_SIZE = 64 * 1024 * 1024  # the random data the tunnel tests move
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Header = tuple[bytes, bytes]


# --- small socket helpers (used by backends and clients alike) ------------------------------


def connect(
    port: int, timeout: float = DEFAULT_TIMEOUT, source: str | None = None
) -> socket.socket:
    """A connection to 127.0.0.1:port, from the loopback address `source` if given (any of
    127.0.0.0/8 works on Linux: a client the proxy can tell from 127.0.0.1)."""
    sock = socket.create_connection(
        (LOOPBACK, port), timeout=timeout, source_address=(source, 0) if source else None
    )
    sock.settimeout(timeout)
    return sock


def assert_refused(port: int, within: float = 3.0) -> None:
    """Connecting to `port` is refused, at the latest `within` seconds from now (a proxy
    that drains or stops closes its listeners). A connection queued on a listener in the
    moment it closed is reset by the kernel: that one asks again, as a closed listener
    refuses."""
    deadline = time.monotonic() + within
    while True:
        try:
            connect(port, timeout=2).close()
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass
        assert time.monotonic() < deadline, f"port {port} still accepts connections"
        time.sleep(0.02)


def recv_exact(sock: socket.socket, n: int, buf: bytearray | None = None) -> bytes:
    """Exactly n bytes, taking first from `buf` (consumed) and then the socket."""
    out = bytearray()
    if buf:
        take = min(n, len(buf))
        out += buf[:take]
        del buf[:take]
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def recv_until(
    sock: socket.socket, buf: bytearray, marker: bytes, limit: int = HEAD_LIMIT
) -> bytes:
    """Everything up to and including `marker`; what follows stays in `buf`."""
    start = 0
    while True:
        idx = buf.find(marker, start)
        if idx >= 0:
            end = idx + len(marker)
            out = bytes(buf[:end])
            del buf[:end]
            return out
        if len(buf) > limit:
            raise ValueError(f"no {marker!r} within {limit} bytes")
        start = max(0, len(buf) - len(marker) + 1)
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"EOF before {marker!r}; got {bytes(buf[:200])!r}")
        buf += chunk


def read_to_eof(sock: socket.socket, buf: bytearray | None = None) -> tuple[int, str]:
    """Read until EOF; return (byte count, sha256 hex). A reset raises."""
    hasher = hashlib.sha256()
    total = 0
    if buf:
        hasher.update(buf)
        total += len(buf)
        buf.clear()
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    while True:
        n = sock.recv_into(view)
        if n == 0:
            return total, hasher.hexdigest()
        hasher.update(view[:n])
        total += n


def send_blob(sock: socket.socket, data: bytes | memoryview, chunk: int = 256 * 1024) -> None:
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        sock.sendall(view[start : start + chunk])


def reset_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def wait_closed(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """Wait until the peer closes: ("eof" | "reset", bytes received meanwhile).

    Raises TimeoutError if the socket is still open after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    got = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"socket still open after {timeout} s (got {bytes(got[:200])!r})")
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return "reset", bytes(got)
        if not chunk:
            return "eof", bytes(got)
        got += chunk


def stream_ended(stream: TlsStream | socket.socket, timeout: float) -> str:
    """How the peer ended `stream` ("eof", "reset", "close_notify", "error"), bytes ignored."""
    if isinstance(stream, TlsStream):
        return tls_wait_closed(stream, timeout)[0]
    return wait_closed(stream, timeout)[0]


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern_bytes(n: int) -> bytes:
    """n deterministic pseudo-random bytes (the same n gives the same bytes everywhere).

    The repeated block has an odd length so repeats never line up with buffer sizes."""
    block = _pattern_block()
    reps = n // len(block) + 1
    return (block * reps)[:n]


_BLOCK: list[bytes] = []


def _pattern_block() -> bytes:
    if not _BLOCK:
        _BLOCK.append(random.Random(20240611).randbytes((1 << 20) + 7))
    return _BLOCK[0]


class Background:
    """Run `fn(*args)` in a daemon thread; `join()` returns its result or raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "background") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self.result = fn(*args)
        except BaseException as exc:  # handed to join(), never raised in the thread
            self.error = exc

    def join(self, timeout: float = 30.0) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"{self.thread.name} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result


# --- header helpers -------------------------------------------------------------------------


def header_values(headers: Iterable[Header], name: str | bytes) -> list[bytes]:
    """The values of every line named `name` (case-insensitive), in order."""
    lname = (name.encode() if isinstance(name, str) else name).lower()
    return [v for k, v in headers if k.lower() == lname]


def header_value(headers: Iterable[Header], name: str | bytes) -> bytes | None:
    values = header_values(headers, name)
    return values[0] if values else None


def header_tokens(headers: Iterable[Header], name: str | bytes) -> list[bytes]:
    """Comma-separated elements of every `name` line, trimmed and lower-cased."""
    tokens: list[bytes] = []
    for value in header_values(headers, name):
        tokens += [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]
    return tokens


def parse_head(head: bytes) -> tuple[bytes, list[Header]]:
    """(start line, [(raw name, value)]) from a raw head ending in CRLF CRLF; names keep their
    case, values are stripped of surrounding whitespace."""
    lines = head.split(b"\r\n")
    start, headers = lines[0], []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"bad header line {line!r}")
        headers.append((name, value.strip(b" \t")))
    return start, headers


def request_bytes(
    method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    """A request exactly as given: nothing is added (not even Host or Content-Length)."""
    lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def simple_get(target: str = "/", host: str = "backend.test", *extra: tuple[str, str]) -> bytes:
    return request_bytes("GET", target, [("Host", host), *extra])


# --- HTTP client ----------------------------------------------------------------------------


@dataclasses.dataclass
class Response:
    status: int
    reason: bytes
    headers: list[Header]
    body: bytes
    raw_head: bytes
    trailers: list[Header] = dataclasses.field(default_factory=list)
    chunked: bool = False

    def header(self, name: str) -> bytes | None:
        return header_value(self.headers, name)

    def values(self, name: str) -> list[bytes]:
        return header_values(self.headers, name)


class HttpClient:
    """A raw client connection: send any bytes, read responses with a strict parser.

    With `ssl_context`, the connection is TLS (`sock` is then a `tls_peers.TlsStream`, its
    handshake done, for `server_hostname`)."""

    def __init__(
        self,
        port: int,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = "localhost",
        source: str | None = None,
    ) -> None:
        self.sock: Any
        if ssl_context is None:
            self.sock = connect(port, timeout, source)
        else:
            self.sock = TlsStream.connect(port, ssl_context, server_hostname, timeout)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, data: bytes, method: str = "GET") -> Response:
        self.send(data)
        return self.read_response(method)

    def read_head(self) -> tuple[int, bytes, list[Header], bytes]:
        raw = recv_until(self.sock, self.buf, b"\r\n\r\n")
        start, headers = parse_head(raw)
        m = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: (.*))?", start)
        assert m, f"bad status line {start!r}"
        return int(m.group(1)), m.group(2) or b"", headers, raw

    def read_response(self, method: str = "GET", allow_informational: bool = False) -> Response:
        """One response. 1xx responses are skipped unless `allow_informational`."""
        while True:
            status, reason, headers, raw = self.read_head()
            if 100 <= status < 200 and status != 101:
                if allow_informational:
                    return Response(status, reason, headers, b"", raw)
                continue
            break
        resp = Response(status, reason, headers, b"", raw)
        if method == "HEAD" or status in (101, 204, 304):
            return resp
        te = header_tokens(headers, "transfer-encoding")
        if te:
            assert te[-1] == b"chunked", f"unexpected Transfer-Encoding {te}"
            assert not header_values(headers, "content-length"), "both CL and TE in a response"
            resp.chunked = True
            resp.body, resp.trailers = self._read_chunked()
        elif cl := header_values(headers, "content-length"):
            assert len(set(cl)) == 1, f"conflicting Content-Length {cl}"
            resp.body = recv_exact(self.sock, int(cl[0]), self.buf)
        else:
            data = bytes(self.buf)
            self.buf.clear()
            while chunk := self.sock.recv(65536):
                data += chunk
            resp.body = data
        return resp

    def _read_chunked(self) -> tuple[bytes, list[Header]]:
        body = bytearray()
        while True:
            line = recv_until(self.sock, self.buf, b"\r\n", limit=4096)
            size_text = line[:-2].split(b";", 1)[0].strip()
            assert re.fullmatch(rb"[0-9a-fA-F]+", size_text), f"bad chunk size line {line!r}"
            size = int(size_text, 16)
            if size == 0:
                break
            body += recv_exact(self.sock, size, self.buf)
            assert recv_exact(self.sock, 2, self.buf) == b"\r\n", "chunk not followed by CRLF"
        trailers: list[Header] = []
        while (line := recv_until(self.sock, self.buf, b"\r\n", limit=65536)) != b"\r\n":
            name, _, value = line[:-2].partition(b":")
            trailers.append((name, value.strip()))
        return bytes(body), trailers

    def wait_closed(self, timeout: float = 5.0) -> tuple[str, bytes]:
        """("eof" | "reset", leftover bytes) once the proxy closes this connection."""
        kind, got = wait_closed(self.sock, timeout)
        return kind, bytes(self.buf) + got


# --- WebSocket client (after a raw handshake) -----------------------------------------------


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def ws_accept(key: str | bytes) -> bytes:
    key = key.encode() if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


class WsClient:
    """The framing half of a WebSocket client, used after the test did the handshake itself
    (so that it can send exactly the bytes a browser sends)."""

    def __init__(self, sock: socket.socket, leftover: bytes = b"") -> None:
        self.sock = sock
        self.conn = WsFrameConnection(ConnectionType.CLIENT, extensions=[], trailing_data=leftover)

    def send(self, message: str | bytes) -> None:
        event: Message[Any] = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        self.sock.sendall(self.conn.send(event))

    def recv(self) -> str | bytes | CloseConnection:
        parts: list[Any] = []
        while True:
            for event in self.conn.events():
                if isinstance(event, Ping):
                    self.sock.sendall(self.conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    return event
                elif isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)
            data = self.sock.recv(1 << 20)
            self.conn.receive_data(data or None)

    def close(self) -> CloseConnection:
        self.sock.sendall(self.conn.send(CloseConnection(code=1000, reason="bye")))
        while True:
            got = self.recv()
            if isinstance(got, CloseConnection):
                return got


# --- backends -------------------------------------------------------------------------------


@dataclasses.dataclass
class TlsSeen:
    """What a TLS backend learnt in one handshake."""

    conn_id: int
    version: str | None
    peer_cert: bytes | None  # the client's certificate (DER), if it sent one


class Server:
    """A loopback listener with an accept thread and one daemon thread per connection.

    With `ssl_context` (server side), every accepted connection is TLS: the handshake runs in
    the connection's thread and `handle` gets a `tls_peers.TlsStream` instead of the socket.
    Handshakes are recorded in `tls_seen`, the names clients sent as SNI in `sni_names` (this
    sets the context's sni_callback), and failed handshakes in `errors`."""

    name = "server"

    def __init__(
        self, backlog: int = 128, ssl_context: ssl.SSLContext | None = None, port: int = 0
    ) -> None:
        self.ssl_context = ssl_context
        self.tls_seen: list[TlsSeen] = []
        self.sni_names: list[str | None] = []
        if ssl_context is not None:
            ssl_context.sni_callback = self._on_sni
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind((LOOPBACK, port))  # port 0: the kernel picks
            self.listener.listen(backlog)
        except OSError:
            self.listener.close()
            raise
        self.port: int = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.accepts = 0
        self.errors: list[str] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept", daemon=True
        )
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.stopping.is_set():
                    conn.close()
                    return
                self.accepts += 1
                conn_id = self.accepts
                self._conns.add(conn)
                thread = threading.Thread(
                    target=self._run_conn,
                    args=(conn, conn_id),
                    name=f"{self.name}-conn{conn_id}",
                    daemon=True,
                )
                self._threads.append(thread)
            thread.start()

    def _on_sni(self, _obj: object, name: str | None, _ctx: ssl.SSLContext) -> None:
        with self.lock:
            self.sni_names.append(name)

    def _run_conn(self, conn: socket.socket, conn_id: int) -> None:
        try:
            conn.settimeout(None)
            if self.ssl_context is None:
                self.handle(conn, conn_id)
            else:
                stream = TlsStream(conn, self.ssl_context, server_side=True)
                try:
                    stream.handshake()
                except (ssl.SSLError, OSError) as exc:
                    if not self.stopping.is_set():
                        with self.lock:
                            self.errors.append(f"conn {conn_id}: TLS handshake: {exc!r}")
                    return
                with self.lock:
                    self.tls_seen.append(TlsSeen(conn_id, stream.version(), stream.peer_cert_der()))
                self.handle(stream, conn_id)  # type: ignore[arg-type]
        except Exception as exc:  # recorded, never raised from a thread
            if not self.stopping.is_set():
                with self.lock:
                    self.errors.append(f"conn {conn_id}: {exc!r}")
        finally:
            with self.lock:
                self._conns.discard(conn)
            conn.close()

    def handle(self, conn: socket.socket, conn_id: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        self._accept_thread.join(5)
        self.listener.close()
        with self.lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(5)
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, f"{self.name} threads did not stop: {stuck}"


@dataclasses.dataclass
class ReceivedRequest:
    conn_id: int
    method: bytes
    target: bytes
    headers: list[Header]  # raw names as received, in order
    body: bytes = b""
    complete: bool = False

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target.decode()).path

    def header(self, name: str) -> bytes | None:
        return header_value(self.headers, name)

    def values(self, name: str) -> list[bytes]:
        return header_values(self.headers, name)


def assert_no_malformed_http(backend: HttpBackend) -> None:
    """What the proxy sent `backend` was well-formed HTTP (a request cut short at teardown
    does not count)."""
    bad = [e for e in backend.protocol_errors if not e.startswith("incomplete:")]
    assert not bad, f"the backend received malformed HTTP from the proxy: {bad}"


class HttpBackend(Server):
    """An HTTP/1.1 origin (h11, server role) that records what it receives.

    Routes (by path):
      /echo            200, the request body back (sends 100 Continue first when asked)
      /big?n=N[&cl=1]  N bytes of `pattern_bytes(N)`, chunked (or Content-Length with cl=1)
      /stream          chunked: "first-part", then waits for `gate`, then "second-part"
      /stream-in       answers after the whole body; `first_data` is set at its first piece
      /status/NNN      that status, no body (304 carries ETag and a Content-Length)
      /slow            never answers
      /close           200 with Connection: close, then closes
      /unrequested-101 a 101 Switching Protocols, whatever the request
      /refuse/NNN      NNN (e.g. 200, 426) with a body, whatever the request asked
      .../respond?status=NNN&h=NAME:VALUE&h=...
                       (any path ending in /respond, so that it is reached under a prefix
                       too) that status (default 200) with each `h` as a response header
                       line, in order, and body "METHOD TARGET"; see `respond_target()`
      .../redirect?to=URL[&status=NNN]
                       (any path ending in /redirect) that status (default 302) with
                       `Location: URL`
      anything else    200, body "METHOD TARGET"
    Every response carries `X-Backend-CaSe: MiXeD` plus the hop-by-hop headers `Keep-Alive`
    and `X-Backend-Hop` (named by Connection), which a proxy must not pass on.
    """

    name = "http-backend"

    def __init__(self, ssl_context: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.received: list[ReceivedRequest] = []
        self.protocol_errors: list[str] = []
        self.gate = threading.Event()
        self.first_data = threading.Event()
        self._changed = threading.Condition()
        super().__init__(ssl_context=ssl_context, port=port)

    # what tests read

    @property
    def requests(self) -> list[ReceivedRequest]:
        """Requests whose whole body arrived."""
        with self.lock:
            return [r for r in self.received if r.complete]

    @property
    def heads(self) -> list[ReceivedRequest]:
        """Every request whose head arrived, complete or not."""
        with self.lock:
            return list(self.received)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """The complete requests, once there are at least n."""
        self._wait(lambda: len(self.requests) >= n, f"{n} complete requests", timeout)
        return self.requests

    def wait_for_heads(self, n: int, timeout: float = 5.0) -> list[ReceivedRequest]:
        """The requests whose head arrived, once there are at least n."""
        self._wait(lambda: len(self.heads) >= n, f"{n} request heads", timeout)
        return self.heads

    def _wait(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise TimeoutError(f"the backend did not get {what}: {self.heads}")

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # serving

    def handle(self, conn: socket.socket, conn_id: int) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        while True:
            req = self._next_request(conn, conn_id, h)
            if req is None:
                return
            if not self._respond(conn, h, req):
                return
            if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                return
            try:
                h.start_next_cycle()
            except h11.ProtocolError:
                return

    def _event(self, conn: socket.socket, h: h11.Connection) -> Any:
        """The next h11 event, reading as needed; None after a protocol error (recorded)."""
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                # An error right after EOF is a message cut short (the proxy aborted it);
                # anything else is bad HTTP from the proxy.
                eof = getattr(h, "_test_eof", False)
                with self.lock:
                    self.protocol_errors.append(("incomplete: " if eof else "") + str(exc))
                return None
            if event is not h11.NEED_DATA:
                return event
            data = conn.recv(1 << 20)
            h._test_eof = not data  # type: ignore[attr-defined]
            h.receive_data(data)

    def _next_request(
        self, conn: socket.socket, conn_id: int, h: h11.Connection
    ) -> ReceivedRequest | None:
        event = self._event(conn, h)
        if not isinstance(event, h11.Request):
            return None
        req = ReceivedRequest(conn_id, event.method, event.target, list(event.headers.raw_items()))
        with self.lock:
            self.received.append(req)
        self._notify()
        if req.path == "/slow":
            self.stopping.wait()
            return None
        if req.path == "/echo" and h.they_are_waiting_for_100_continue:
            conn.sendall(
                h.send(
                    h11.InformationalResponse(
                        status_code=100, headers=[("X-Continue-From", "backend")]
                    )
                )
            )
        body = bytearray()
        while True:
            event = self._event(conn, h)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Data):
                body += event.data
                if req.path == "/stream-in":
                    self.first_data.set()
            elif isinstance(event, h11.EndOfMessage):
                break
        with self.lock:
            req.body = bytes(body)
            req.complete = True
        self._notify()
        return req

    def _respond(self, conn: socket.socket, h: h11.Connection, req: ReceivedRequest) -> bool:
        path = req.path
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.target.decode()).query)
        common = [
            ("X-Backend-CaSe", "MiXeD"),
            ("Keep-Alive", "timeout=30"),
            ("X-Backend-Hop", "secret"),
            ("Connection", "X-Backend-Hop"),
        ]

        def send(
            status: int,
            body: bytes = b"",
            headers: list[tuple[str, str]] | None = None,
            reason: str = "",
        ) -> None:
            hdrs = [*common, *(headers or [])]
            if status not in (204, 304) and not any(
                k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs
            ):
                hdrs.append(("Content-Length", str(len(body))))
            out = h.send(h11.Response(status_code=status, headers=hdrs, reason=reason or "OK"))
            if body and req.method != b"HEAD":
                out += h.send(h11.Data(data=body))
            out += h.send(h11.EndOfMessage())
            conn.sendall(out)

        if path == "/echo":
            send(200, req.body, [("Content-Type", "application/octet-stream")])
        elif path == "/big":
            n = int(query.get("n", ["0"])[0])
            data = pattern_bytes(n)
            if query.get("cl") == ["1"]:
                conn.sendall(
                    h.send(
                        h11.Response(status_code=200, headers=[*common, ("Content-Length", str(n))])
                    )
                )
            else:
                conn.sendall(
                    h.send(
                        h11.Response(
                            status_code=200, headers=[*common, ("Transfer-Encoding", "chunked")]
                        )
                    )
                )
            if req.method != b"HEAD":
                view = memoryview(data)
                for start in range(0, n, 256 * 1024):
                    conn.sendall(h.send(h11.Data(data=view[start : start + 256 * 1024])))
            conn.sendall(h.send(h11.EndOfMessage()))
        elif path == "/stream":
            conn.sendall(
                h.send(
                    h11.Response(
                        status_code=200, headers=[*common, ("Transfer-Encoding", "chunked")]
                    )
                )
                + h.send(h11.Data(data=b"first-part"))
            )
            if not self.gate.wait(DEFAULT_TIMEOUT):
                return False
            conn.sendall(h.send(h11.Data(data=b"second-part")) + h.send(h11.EndOfMessage()))
        elif path == "/stream-in":
            send(200, f"{len(req.body)} {sha256(req.body)}".encode())
        elif m := re.fullmatch(r"/status/(\d{3})", path):
            status = int(m.group(1))
            extra = [("ETag", '"v1"'), ("Content-Length", "1234")] if status == 304 else []
            send(status, b"", extra)
        elif path == "/close":
            send(200, b"closing", [("Connection", "close")])
            return False
        elif path == "/unrequested-101":
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\nraw-bytes-after-101"
            )
            while conn.recv(65536):
                pass
            return False
        elif m := re.fullmatch(r"/refuse/(\d{3})", path):
            status = int(m.group(1))
            extra = [("Upgrade", "websocket")] if status == 426 else []
            send(status, b"upgrade refused", extra)
        elif path == "/respond" or path.endswith("/respond"):
            status = int(query.get("status", ["200"])[0])
            lines = [h.partition(":") for h in query.get("h", [])]
            send(status, req.method + b" " + req.target, [(k, v) for k, _, v in lines])
        elif path == "/redirect" or path.endswith("/redirect"):
            status = int(query.get("status", ["302"])[0])
            send(status, b"", [("Location", query.get("to", ["/"])[0])])
        else:
            send(200, req.method + b" " + req.target, [("Content-Type", "text/plain")])
        return True


def respond_target(
    path: str = "/respond", headers: Iterable[tuple[str, str]] = (), status: int = 200
) -> str:
    """A request target for HttpBackend's `/respond`: the backend answers `status` with the
    given response header lines (names and values exactly as given, in order)."""
    query = [("status", str(status))] + [("h", f"{k}:{v}") for k, v in headers]
    return f"{path}?{urllib.parse.urlencode(query)}"


def redirect_target(to: str, path: str = "/redirect", status: int = 302) -> str:
    """A request target for HttpBackend's `/redirect`: `status` with `Location: to`."""
    return f"{path}?{urllib.parse.urlencode([('to', to), ('status', str(status))])}"


class WsBackend(Server):
    """A WebSocket echo server (wsproto, server role) that records each raw handshake head.

    It accepts the first offered subprotocol and no extensions, then echoes every text and
    binary message (fragment by fragment) and answers pings and closes."""

    name = "ws-backend"

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handshakes: list[bytes] = []
        self.handshake_seen = threading.Condition()
        super().__init__(ssl_context=ssl_context)

    def wait_handshakes(self, n: int = 1, timeout: float = 5.0) -> list[bytes]:
        with self.handshake_seen:
            if not self.handshake_seen.wait_for(lambda: len(self.handshakes) >= n, timeout):
                raise TimeoutError(f"ws backend saw {len(self.handshakes)} handshakes")
            return list(self.handshakes)

    def handle(self, conn: socket.socket, conn_id: int) -> None:
        buf = bytearray()
        head = recv_until(conn, buf, b"\r\n\r\n")
        with self.handshake_seen:
            self.handshakes.append(head)
            self.handshake_seen.notify_all()
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(head + bytes(buf))
        while True:
            for event in ws.events():
                if isinstance(event, Request):
                    proto = event.subprotocols[0] if event.subprotocols else None
                    conn.sendall(ws.send(AcceptConnection(subprotocol=proto)))
                elif isinstance(event, Message):
                    conn.sendall(
                        ws.send(
                            type(event)(data=event.data, message_finished=event.message_finished)
                        )
                    )
                elif isinstance(event, Ping):
                    conn.sendall(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state.name != "CLOSED":
                        conn.sendall(ws.send(event.response()))
                    return
                else:
                    with self.lock:
                        self.errors.append(f"conn {conn_id}: unexpected {event!r}")
                    return
            data = conn.recv(1 << 20)
            if not data:
                return
            ws.receive_data(data)


RESPONSE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: rawtest\r\n\r\n"
)


def tunnel_request(host: str = "tunnel.test", target: str = "/tunnel") -> bytes:
    return request_bytes(
        "GET", target, [("Host", host), ("Connection", "Upgrade"), ("Upgrade", "rawtest")]
    )


class ScriptedConn:
    """What a scripted backend's script works with: the socket, the request head it read, and
    the bytes that came after the head in the same reads (`extra`)."""

    def __init__(self, sock: socket.socket, head: bytes, extra: bytearray) -> None:
        self.sock = sock
        self.head = head
        self.extra = extra

    def recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n, self.extra)

    def read_to_eof(self) -> tuple[int, str]:
        return read_to_eof(self.sock, self.extra)


class ScriptedBackend(Server):
    """Accepts, reads one request head, then runs `script(ScriptedConn)` in the connection's
    thread. Each script's return value (or exception) is queued for `result()`."""

    name = "scripted-backend"

    def __init__(
        self, script: Callable[[ScriptedConn], Any], ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.script = script
        self.results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        super().__init__(ssl_context=ssl_context)

    def handle(self, conn: socket.socket, conn_id: int) -> None:
        buf = bytearray()
        try:
            head = recv_until(conn, buf, b"\r\n\r\n")
            result = self.script(ScriptedConn(conn, head, buf))
        except BaseException as exc:
            self.results.put((False, exc))
            return
        self.results.put((True, result))

    def result(self, timeout: float = DEFAULT_TIMEOUT) -> Any:
        try:
            ok, value = self.results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("the scripted backend produced no result") from None
        if not ok:
            raise value
        return value


class BlackholeBackend:
    """A port where connecting hangs: a listener with a full accept queue (backlog 0, one
    connection never accepted), so the kernel drops further SYNs."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            self.fillers.append(filler)
            with contextlib.suppress(BlockingIOError):
                filler.connect((LOOPBACK, self.port))

    def connect_hangs(self, timeout: float = 0.3) -> bool:
        probe = socket.socket()
        probe.settimeout(timeout)
        try:
            probe.connect((LOOPBACK, self.port))
        except TimeoutError:
            return True
        except OSError:
            return False
        finally:
            probe.close()
        return False

    def stop(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.listener.close()


def refused_port() -> tuple[socket.socket, int]:
    """A socket bound to a port but not listening: connecting to the port is refused (RST).
    Keep the socket open while the port is in use so that nobody else takes it."""
    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    return sock, sock.getsockname()[1]


# --- the proxy process -----------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProxyProcess:
    """A running `python -m rawproxy` with its stderr collected line by line.

    `env` replaces the environment (None: inherited); `launcher` is a command that execs the
    proxy, put in front of it (e.g. `systemd-socket-activate -l ...`: it execs, so `pid` stays
    the proxy's). `admin_port` is the port of a `--admin-listen` logged before `ready` (None
    without one)."""

    def __init__(
        self,
        args: list[str],
        *,
        env: dict[str, str] | None = None,
        launcher: Iterable[str] = (),
    ) -> None:
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "rawproxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read_stderr, name="proxy-stderr", daemon=True)
        self._reader.start()
        self.ports: list[int] = []
        try:
            ready = self.wait_for_log(r"\bready\b", timeout=START_TIMEOUT)
        except TimeoutError:
            self.stop(signal.SIGKILL)
            raise RuntimeError(
                f"rawproxy did not log 'ready' within {START_TIMEOUT} s; stderr:\n{self.log_text()}"
            ) from None
        with self._cond:
            before_ready = self.lines[: self.lines.index(ready)]
        self.admin_port: int | None = None
        for line in before_ready:
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                self.ports.append(int(m.group(1)))
            elif m := re.search(r"admin on 127\.0\.0\.1:(\d+)", line):
                self.admin_port = int(m.group(1))
        if not self.ports:
            self.stop(signal.SIGKILL)
            raise RuntimeError(
                f"no 'listening on 127.0.0.1:PORT' line before 'ready'; stderr:\n{self.log_text()}"
            )
        self.port = self.ports[0]

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # logs

    def mark(self) -> int:
        """A position in the log; pass it as `since` to look only at later lines."""
        with self._cond:
            return len(self.lines)

    def log_text(self, since: int = 0) -> str:
        with self._cond:
            return "\n".join(self.lines[since:])

    def logs_matching(self, pattern: str, since: int = 0) -> list[str]:
        rx = re.compile(pattern, re.IGNORECASE)
        with self._cond:
            return [line for line in self.lines[since:] if rx.search(line)]

    def wait_for_log(self, pattern: str, since: int = 0, timeout: float = 5.0) -> str:
        """The first line since `since` matching `pattern`, waiting for it if need be."""
        return self.wait_for_logs(pattern, 1, since, timeout)[0]

    def wait_for_logs(
        self, pattern: str, count: int, since: int = 0, timeout: float = 5.0
    ) -> list[str]:
        """Once at least `count` lines since `since` match `pattern`: those lines."""
        rx = re.compile(pattern, re.IGNORECASE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [line for line in self.lines[since:] if rx.search(line)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise TimeoutError(
                        f"{len(found)} of {count} log lines matching {pattern!r} within "
                        f"{timeout} s; log since mark:\n{self.log_text(since)}"
                    )
                self._cond.wait(left)

    # process

    def cpu_seconds(self) -> float:
        """The CPU time (user and system) the proxy process has used."""
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def peak_rss_kib(self, seconds: float) -> int:
        """The largest VmRSS (KiB) over the next `seconds` (a test's deliberate stall),
        sampled every 50 ms."""
        peak = self.rss_kib()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.05)  # the sampling period, not a wait for an event
            peak = max(peak, self.rss_kib())
        return peak

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Send `sig`, wait for the exit; returns the exit code, or None if it had to be killed."""
        code: int | None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            code = None
        self._reader.join(timeout)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def proxy_args(
    backend_port: int,
    *extra: str,
    listen: str | Iterable[str] = "127.0.0.1:0",
    backend: str | None = None,
) -> list[str]:
    """`--listen` (once per address when `listen` is a list), `--backend` (127.0.0.1:PORT,
    or `backend` as given, e.g. "https://localhost:PORT"), then `extra`."""
    listens = [listen] if isinstance(listen, str) else list(listen)
    args = [arg for where in listens for arg in ("--listen", where)]
    return [*args, "--backend", backend or f"127.0.0.1:{backend_port}", *extra]


def assert_serves(
    proxy: ProxyProcess, http_backend: HttpBackend | None = None, target: str = "/still-ok"
) -> None:
    """A fresh client gets a normal answer through `proxy` (other clients are unaffected)."""
    with HttpClient(proxy.port, timeout=5) as c:
        resp = c.request(simple_get(target))
    assert resp.status == 200, resp
    if http_backend is not None:
        assert resp.body == b"GET " + target.encode()


def served_by(port: int, backends: dict[str, HttpBackend], target: str = "/app/page") -> str:
    """Which of `backends` (by name) a new connection's request for `target` reaches."""
    before = {name: len(b.heads) for name, b in backends.items()}
    with HttpClient(port, timeout=5) as c:
        resp = c.request(simple_get(target))
    assert resp.status == 200, resp
    reached = [name for name, b in backends.items() if len(b.heads) > before[name]]
    assert len(reached) == 1, reached
    return reached[0]


def run_rawproxy(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m rawproxy ARGS` to completion (for flags that exit)."""
    return subprocess.run(
        [sys.executable, "-m", "rawproxy", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


# --- the admin listener (/metrics, /healthz) --------------------------------------------------

MetricKey = tuple[str, frozenset[tuple[str, str]]]
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def admin_get(port: int, path: str, timeout: float = 5.0) -> Response:
    """GET `path` from an admin listener (the answer ends with the connection)."""
    with HttpClient(port, timeout) as c:
        return c.request(simple_get(path, "admin.test"))


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """Samples of a Prometheus text page by (name, labels); HELP/TYPE lines are checked to
    come before their family's samples, and every line must parse."""
    samples: dict[MetricKey, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#"):
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, f"bad metrics line {line!r}"
        name, labels_text, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"sample before its TYPE line: {line!r}"
        labels = frozenset(_LABEL.findall(labels_text or ""))
        key = (name, labels)
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)
    return samples


class Metrics:
    """One scrape of /metrics: `m("rawproxy_requests_total", code_class="5xx")`."""

    def __init__(self, port: int) -> None:
        resp = admin_get(port, "/metrics")
        assert resp.status == 200, resp
        assert (resp.header("content-type") or b"").startswith(b"text/plain"), resp
        self.text = resp.body.decode()
        self.samples = parse_metrics(self.text)

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, f"no sample {name}{labels} in:\n{self.text}"
        return self.samples[key]


def free_port() -> int:
    """A port that was free a moment ago (for programs that cannot listen on port 0 and
    report it; another process may take it in between: retry on failure)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def websocket_request(target: str = "/ws", host: str = "app.test", key: str = "") -> bytes:
    """A browser-like WebSocket handshake request (Chrome's Connection/Upgrade spelling)."""
    return request_bytes(
        "GET",
        target,
        [
            ("Host", host),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", key or ws_key()),
            ("User-Agent", "peers-ws/1"),
        ],
    )


def open_websocket(c: HttpClient, target: str = "/ws", host: str = "app.test") -> WsClient:
    """Upgrade the client connection `c` (through the proxy to a WsBackend): the WebSocket."""
    key = ws_key()
    c.send(websocket_request(target, host, key))
    status, _, headers, raw = c.read_head()
    assert status == 101, raw
    assert header_values(headers, "sec-websocket-accept") == [ws_accept(key)], raw
    leftover = bytes(c.buf)
    c.buf.clear()
    return WsClient(c.sock, leftover)


# --- systemd's side of sd_notify -------------------------------------------------------------


class NotifySocket:
    """What systemd listens on for sd_notify: an AF_UNIX datagram socket (a path, or bytes
    starting with NUL for the abstract namespace). Each datagram is one message, parsed into
    its KEY=VALUE lines; `senders` holds each one's sender PID, from SCM_CREDENTIALS as
    systemd reads it (what NotifyAccess=main checks)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []
        self.senders: list[int | None] = []
        self.arrived: list[float] = []

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        except TimeoutError:
            return False
        sender = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                sender = struct.unpack("iII", payload[:12])[0]
        lines = data.decode().split("\n")
        assert all("=" in line for line in lines if line), data
        self.messages.append(dict(line.split("=", 1) for line in lines if line))
        self.senders.append(sender)
        self.arrived.append(time.monotonic())
        return True

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], since: int = 0, timeout: float = 5.0
    ) -> int:
        """The index of the first message from `since` on for which `predicate` holds."""
        deadline = time.monotonic() + timeout
        index = since
        while True:
            while index < len(self.messages):
                if predicate(self.messages[index]):
                    return index
                index += 1
            left = deadline - time.monotonic()
            if left <= 0 or (not self._receive(left) and time.monotonic() >= deadline):
                raise TimeoutError(f"no such notify message within {timeout} s: {self.messages}")

    def collect(self, seconds: float) -> None:
        """Receive whatever arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(left)


def has(key: str, value: str | None = None) -> Callable[[dict[str, str]], bool]:
    """A NotifySocket.wait_for predicate: the message has KEY (=value)."""
    return lambda m: key in m and (value is None or m[key] == value)


def notify_env(address: str, **extra: str) -> dict[str, str]:
    """This environment, for a proxy that notifies `address` (without any WATCHDOG_ or
    LISTEN_ variables of ours), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_", "LISTEN_"))}
    env["NOTIFY_SOCKET"] = address
    env.update(extra)
    return env


def socket_activate_launcher(ports: Iterable[int], names: Iterable[str]) -> list[str]:
    """A `ProxyProcess` launcher: Debian's `systemd-socket-activate` listening on 127.0.0.1
    at each port, the sockets named `names` (FileDescriptorName). It starts the proxy at the
    first connection to one of them, passing this environment on (but for systemd's own
    variables), and execs, so LISTEN_PID is the proxy's PID."""
    tool = shutil.which("systemd-socket-activate")
    assert tool, "systemd-socket-activate is missing (Debian: apt-get install -y systemd)"
    keep = [
        f"--setenv={name}={value}"
        for name, value in os.environ.items()
        if not name.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))
    ]
    return [
        tool,
        *(f"--listen=127.0.0.1:{port}" for port in ports),
        f"--fdname={':'.join(names)}",
        *keep,
    ]


def first_request(port: int, ssl_context: ssl.SSLContext | None = None) -> int:
    """`GET /first` once `port` listens (it starts a socket-activated proxy): the status."""
    deadline = time.monotonic() + 10
    while True:
        try:
            with HttpClient(port, timeout=10, ssl_context=ssl_context) as c:
                return c.request(simple_get("/first")).status
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def start_activated(
    start: Callable[..., ProxyProcess],
    name: str,
    *args: str,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[ProxyProcess, int]:
    """`start(*args)` behind socket_activate_launcher on a free port whose socket is named
    `name`, started by a first request, which must get 200; another port if that one was
    taken meanwhile. The proxy and its port."""
    for attempt in range(2):
        port = free_port()
        first = Background(first_request, port, ssl_context)
        try:
            proxy = start(*args, launcher=socket_activate_launcher([port], [name]))
        except RuntimeError:
            with contextlib.suppress(Exception):
                first.join(15)
            if attempt:
                raise
            continue
        assert first.join(15) == 200
        return proxy, port
    raise AssertionError("unreachable")
