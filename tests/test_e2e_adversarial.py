"""Adversarial framing probes, end to end over real sockets: request smuggling and response
splitting shapes against the real proxy process, with a raw backend that records exactly
the bytes it receives and frames them strictly (RFC 9112), so that a test can say what the
backend made of them.

The invariant checked throughout: the backend never frames a request differently from how
the proxy framed it, the client never gets an answer framed differently from what the
proxy believes, bad input gets a clear answer and a closed connection, a refused upgrade
leaves the connection HTTP, and a 101 leaves the bytes after it untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from peers import (
    HttpClient,
    ProxyProcess,
    header_tokens,
    header_values,
    parse_head,
    recv_exact,
    recv_until,
    request_bytes,
    simple_get,
    wait_closed,
)

TIMEOUT = 4.0  # every wait of a client or the backend in this file

# --- a raw backend ---------------------------------------------------------------------------


@dataclasses.dataclass
class Seen:
    """One request as the backend framed it."""

    conn: int
    head: bytes
    body: bytes = b""
    complete: bool = False

    @property
    def target(self) -> bytes:
        return self.head.split(b" ", 2)[1]

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return parse_head(self.head)[1]

    def values(self, name: str) -> list[bytes]:
        return header_values(self.headers, name)


class Framing(Exception):
    """What the backend received cannot be framed unambiguously (RFC 9112 6.3)."""


class TooLong(Exception):
    """A Content-Length this backend cannot hold (answered 400 and closed, as nginx does)."""


# An answer: given the request and the socket, send something and say whether to go on
# reading this connection (True) or close it (False).
Answer = Callable[[Seen, socket.socket], bool]


def echo(seen: Seen, sock: socket.socket) -> bool:
    """200 with `METHOD TARGET BODY` as its body."""
    method = seen.head.split(b" ", 1)[0]
    body = method + b" " + seen.target + (b" " + seen.body if seen.body else b"")
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return True


def ok(body: bytes, *lines: bytes, status: bytes = b"200 OK") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


class RawBackend:
    """A loopback backend that records every byte each connection brings (`raw`), frames
    requests strictly (one Content-Length, or Transfer-Encoding exactly `chunked` with
    CRLF-terminated chunk lines; both, or anything else, is a framing error, recorded), and
    answers each with `answer(seen, sock)` (by default: per target in `answers`, else echo)."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or self._by_target
        self.answers: dict[bytes, Answer] = {}
        # Called when a head arrived, before its body is read: False ends the connection.
        self.on_head: Answer | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Condition()
        self.raw: list[bytearray] = []
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self.socks: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.accept_thread = threading.Thread(target=self._accept, daemon=True)
        self.accept_thread.start()

    def _by_target(self, seen: Seen, sock: socket.socket) -> bool:
        path = seen.target.split(b"?", 1)[0]
        return self.answers.get(path, echo)(seen, sock)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.stopping:
                    sock.close()
                    return
                conn = len(self.raw)
                self.raw.append(bytearray())
                self.socks.append(sock)
                thread = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
                self.threads.append(thread)
            thread.start()

    def _recv(self, sock: socket.socket, conn: int, buf: bytearray) -> None:
        data = sock.recv(65536)
        if not data:
            raise EOFError
        with self.lock:
            self.raw[conn] += data
            self.lock.notify_all()
        buf += data

    def _line(self, sock: socket.socket, conn: int, buf: bytearray) -> bytes:
        while (end := buf.find(b"\r\n")) < 0:
            if b"\n" in buf:
                raise Framing(f"bare LF in {bytes(buf[:80])!r}")
            self._recv(sock, conn, buf)
        line = bytes(buf[:end])
        del buf[: end + 2]
        return line

    def _exact(self, sock: socket.socket, conn: int, buf: bytearray, n: int) -> bytes:
        while len(buf) < n:
            self._recv(sock, conn, buf)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def _serve(self, sock: socket.socket, conn: int) -> None:
        buf = bytearray()
        sock.settimeout(TIMEOUT * 3)
        try:
            while True:
                while (end := buf.find(b"\r\n\r\n")) < 0:
                    self._recv(sock, conn, buf)
                head = bytes(buf[: end + 4])
                del buf[: end + 4]
                seen = Seen(conn, head)
                with self.lock:
                    self.seen.append(seen)
                    self.lock.notify_all()
                if self.on_head is not None and not self.on_head(seen, sock):
                    return
                seen.body = self._body(sock, conn, buf, seen)
                with self.lock:
                    seen.complete = True
                    self.lock.notify_all()
                if not self.answer(seen, sock):
                    return
        except Framing as e:
            with self.lock:
                self.errors.append(f"conn {conn}: {e}")
        except TooLong:
            with contextlib.suppress(OSError):
                sock.sendall(ok(b"", b"Connection: close", status=b"400 Bad Request"))
        except (EOFError, OSError):
            pass
        finally:
            sock.close()

    def _body(self, sock: socket.socket, conn: int, buf: bytearray, seen: Seen) -> bytes:
        lengths = seen.values("content-length")
        codings = header_tokens(seen.headers, "transfer-encoding")
        if lengths and codings:
            raise Framing(f"both Content-Length and Transfer-Encoding: {seen.head!r}")
        if codings:
            if codings != [b"chunked"] or len(seen.values("transfer-encoding")) != 1:
                raise Framing(f"Transfer-Encoding {codings}")
            body = bytearray()
            while True:
                line = self._line(sock, conn, buf)
                if re.fullmatch(rb"[0-9a-fA-F]{1,16}", line) is None:
                    raise Framing(f"chunk line {line!r}")
                size = int(line, 16)
                if size == 0:
                    while self._line(sock, conn, buf):
                        pass  # trailer fields
                    return bytes(body)
                body += self._exact(sock, conn, buf, size)
                if self._exact(sock, conn, buf, 2) != b"\r\n":
                    raise Framing("chunk data not followed by CRLF")
        if lengths:
            if len(lengths) != 1 or re.fullmatch(rb"[0-9]+", lengths[0]) is None:
                raise Framing(f"Content-Length {lengths}")
            if len(lengths[0]) > 18:
                raise TooLong
            return self._exact(sock, conn, buf, int(lengths[0]))
        return b""

    # what tests read

    def wait_seen(self, n: int, timeout: float = TIMEOUT) -> list[Seen]:
        """The requests whose heads arrived, once there are n (complete or not)."""
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.seen) >= n, timeout):
                raise TimeoutError(f"the backend saw {len(self.seen)} of {n}: {self.seen}")
            return list(self.seen)

    def all_raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(r) for r in self.raw)

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            socks = list(self.socks)
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.accept_thread.join(5)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def raw_backend() -> Iterator[Callable[..., RawBackend]]:
    """`raw_backend(answer=None)`: a RawBackend; at teardown it is stopped, and a framing
    error it met fails the test."""
    made: list[RawBackend] = []

    def make(answer: Answer | None = None) -> RawBackend:
        backend = RawBackend(answer)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()
    for backend in made:
        assert not backend.errors, f"the backend could not frame what it got: {backend.errors}"


@dataclasses.dataclass
class Rig:
    backend: RawBackend
    proxy: ProxyProcess

    def client(self) -> HttpClient:
        return HttpClient(self.proxy.port, TIMEOUT)


@pytest.fixture
def rig(raw_backend, start_proxy) -> Callable[..., Rig]:
    def make(*flags: str, answer: Answer | None = None) -> Rig:
        backend = raw_backend(answer)
        return Rig(backend, start_proxy(backend.port, *flags))

    return make


def sends(data: bytes) -> Answer:
    """An answer for RawBackend.answers: `data` as it is, and the connection read on."""

    def answer(_seen: Seen, sock: socket.socket) -> bool:
        sock.sendall(data)
        return True

    return answer


def get_on(request_path: str, target: str) -> bytes:
    """A GET the fast path takes (`fast`), or one with bare LF line ends that goes to h11."""
    request = simple_get(target)
    return request if request_path == "fast" else request.replace(b"\r\n", b"\n")


def refused_then_closed(c: HttpClient, status: int = 400, method: str = "POST") -> None:
    """The proxy answers `status` itself, says it closes, and closes with nothing after."""
    resp = c.read_response(method)
    assert resp.status == status, resp
    assert header_tokens(resp.headers, "connection") == [b"close"], resp.raw_head
    _, rest = c.wait_closed(TIMEOUT)
    assert rest == b"", f"bytes after the error answer: {rest[:200]!r}"


def nothing_reached(r: Rig) -> None:
    """No byte of the refused request reached the backend: a fresh request is answered, and
    it is the only thing the backend ever got."""
    with r.client() as c:
        resp = c.request(simple_get("/probe"))
    assert (resp.status, resp.body) == (200, b"GET /probe")
    seen = r.backend.wait_seen(1)
    assert [s.target for s in seen] == [b"/probe"], seen
    assert r.backend.all_raw().count(b" HTTP/1.1\r\n") == 1, r.backend.all_raw()


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: b.test\r\n\r\n"


def refused_outright(r: Rig, request: bytes) -> None:
    """`request` gets the proxy's own 400 and a closed connection, and none of it (the
    request behind it included) reaches the backend."""
    with r.client() as c:
        c.send(request)
        refused_then_closed(c)
    nothing_reached(r)


def post(headers: list[tuple[str, str]], body: bytes = b"", target: str = "/p") -> bytes:
    return request_bytes("POST", target, [("Host", "b.test"), *headers], body)


# --- 1. request framing the proxy must refuse --------------------------------------------------

CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"

REFUSED_TRANSFER_ENCODINGS = {
    "chunked-twice-in-one-line": "chunked, chunked",
    "identity": "identity",
    "identity-then-chunked": "identity, chunked",
    "chunked-then-identity": "chunked, identity",
    "gzip-then-chunked": "gzip, chunked",
    "chunked-with-parameter": "chunked;q=1",
    "empty": "",
    "comma-only": ",",
    "vertical-tab-before": "\x0bchunked",
    "form-feed-after": "chunked\x0c",
    "nbsp-after": "chunked\xa0",
}


@pytest.mark.parametrize(
    "value", list(REFUSED_TRANSFER_ENCODINGS.values()), ids=list(REFUSED_TRANSFER_ENCODINGS)
)
def test_transfer_encoding_other_than_one_chunked_is_refused(rig, value):
    refused_outright(rig(), post([("Transfer-Encoding", value)], CHUNKED_BODY + SMUGGLED))


@pytest.mark.parametrize(
    "lines",
    [
        [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "chunked"), ("transfer-encoding", "identity")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "0")],
        [("Content-Length", "0"), ("Transfer-Encoding", "Chunked")],
        [("Transfer-Encoding", "chunked"), ("Content-Length", "5"), ("Content-Length", "5")],
    ],
    ids=["two-te-lines", "te-chunked-then-identity", "te-then-cl-0", "cl-0-then-te", "te-two-cl"],
)
def test_conflicting_framing_lines_are_refused(rig, lines):
    refused_outright(rig(), post(lines, CHUNKED_BODY + SMUGGLED))


REFUSED_CONTENT_LENGTHS = {
    "plus-sign": "+5",
    "hex": "0x5",
    "decimal-point": "5.0",
    "exponent": "5e0",
    "minus-zero": "-0",
    "inner-space": "5 5",
    "empty": "",
    "trailing-comma": "5,",
    "leading-comma": ",5",
    "differing-list": "5, 50",
    "unicode-digit-utf8": "\xd9\xa5",  # U+0665 ARABIC-INDIC DIGIT FIVE as UTF-8
    "twenty-one-digits": "1" + "0" * 20,
    "nbsp-after": "5\xa0",
}


@pytest.mark.parametrize(
    "value", list(REFUSED_CONTENT_LENGTHS.values()), ids=list(REFUSED_CONTENT_LENGTHS)
)
def test_malformed_content_length_is_refused(rig, value):
    refused_outright(rig(), post([("Content-Length", value)], b"hello" + SMUGGLED))


@pytest.mark.parametrize(
    "value",
    ["18446744073709551617", "99999999999999999999"],
    ids=["two-to-the-64-plus-1", "twenty-nines"],
)
def test_content_length_beyond_64_bits_is_refused(rig, value):
    refused_outright(rig(), post([("Content-Length", value)], b"h" + SMUGGLED))


BAD_HEADS = {
    "double-space-after-method": b"GET  / HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "double-space-before-version": b"GET /  HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "tab-separators": b"GET\t/\tHTTP/1.1\r\nHost: b.test\r\n\r\n",
    "leading-space": b" GET / HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "trailing-space": b"GET / HTTP/1.1 \r\nHost: b.test\r\n\r\n",
    "lower-case-version": b"GET / http/1.1\r\nHost: b.test\r\n\r\n",
    "version-without-minor": b"GET / HTTP/1\r\nHost: b.test\r\n\r\n",
    "version-two-digit-minor": b"GET / HTTP/1.10\r\nHost: b.test\r\n\r\n",
    "nul-in-target": b"GET /a\x00b HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "del-in-target": b"GET /a\x7fb HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "high-byte-in-target": b"GET /a\xffb HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "cr-in-request-line": b"GET /a\rb HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "tab-before-colon": b"GET / HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding\t: chunked\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\nHost: b.test\r\nTransfer Encoding: chunked\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\nHost: b.test\r\nX\x00Y: a\r\n\r\n",
    "high-byte-in-name": b"GET / HTTP/1.1\r\nHost: b.test\r\nX\xffY: a\r\n\r\n",
    "cr-in-name": b"GET / HTTP/1.1\r\nHost: b.test\r\nX\rY: a\r\n\r\n",
    "empty-name": b"GET / HTTP/1.1\r\nHost: b.test\r\n: a\r\n\r\n",
    "vertical-tab-in-value": b"GET / HTTP/1.1\r\nHost: b.test\r\nX-A: a\x0bb\r\n\r\n",
    "bare-cr-line-end": b"GET / HTTP/1.1\r\nHost: b.test\rX-A: b\r\n\r\n",
    "fold-at-first-header": b"GET / HTTP/1.1\r\n Host: b.test\r\n\r\n",
    "fold-after-bare-lf": b"GET / HTTP/1.1\nHost: b.test\nX-A: a\n b\n\n",
    "fold-of-content-length": b"POST /p HTTP/1.1\r\nHost: b.test\r\nContent-Length: 5\r\n 0\r\n\r\n"
    + b"hello"
    + SMUGGLED,
    "fold-hides-transfer-encoding-after-host": b"POST /p HTTP/1.1\r\nHost: b.test\r\n"
    b" Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: b.test\r\nHost: b.test\r\n\r\n",
    "two-hosts-differing": b"GET / HTTP/1.1\r\nHost: b.test\r\nHost: evil.test\r\n\r\n",
    "host-list": b"GET / HTTP/1.1\r\nHost: b.test, evil.test\r\n\r\n",
    "absolute-form-without-host": b"GET http://b.test/ HTTP/1.1\r\n\r\n",
    "absolute-form-bad-port": b"GET http://b.test:80x/ HTTP/1.1\r\nHost: b.test\r\n\r\n",
    "target-without-slash": b"GET index.html HTTP/1.1\r\nHost: b.test\r\n\r\n",
}


@pytest.mark.parametrize("head", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
def test_malformed_head_is_refused(rig, head):
    r = rig()
    with r.client() as c:
        c.send(head)
        refused_then_closed(c, method="GET")
    nothing_reached(r)


@pytest.mark.parametrize("head", list(BAD_HEADS.values()), ids=list(BAD_HEADS))
def test_malformed_head_after_a_kept_alive_request_is_refused(rig, head):
    """The same heads as the second request of a connection (h11's next cycle, and the fast
    path's held bytes when they come while the first waits)."""
    r = rig()
    with r.client() as c:
        assert c.request(simple_get("/first")).body == b"GET /first"
        c.send(head)
        refused_then_closed(c, method="GET")
    with r.client() as c:
        assert c.request(simple_get("/probe")).body == b"GET /probe"
    assert [s.target for s in r.backend.wait_seen(2)] == [b"/first", b"/probe"]


# --- 2. request framing the proxy accepts: the backend frames it as the proxy did ------------


def forwarded(seen: Seen) -> bool:
    """The proxy parsed this request and wrote it anew (it carries our forwarded headers)."""
    return seen.values("x-forwarded-for") == [b"127.0.0.1"]


ACCEPTED_FRAMINGS = {
    "te-capitalised": ([("Transfer-Encoding", "Chunked")], CHUNKED_BODY),
    "te-upper-case": ([("Transfer-Encoding", "CHUNKED")], CHUNKED_BODY),
    "te-extra-whitespace": ([("Transfer-Encoding", " \tchunked \t")], CHUNKED_BODY),
    "te-name-lower-case": ([("transfer-encoding", "chunked")], CHUNKED_BODY),
    "chunk-size-leading-zeros": (
        [("Transfer-Encoding", "chunked")],
        b"0005\r\nhello\r\n000\r\n\r\n",
    ),
    "chunk-size-twenty-hex-digits": (
        [("Transfer-Encoding", "chunked")],
        b"00000000000000000005\r\nhello\r\n0\r\n\r\n",
    ),
    "chunk-sizes-in-hex-letters": (
        [("Transfer-Encoding", "chunked")],
        b"3\r\nhel\r\nA\r\nlo-hello-h\r\nf\r\nello-hello-hell\r\n0\r\n\r\n",
        b"hello-hello-hello-hello-hell",
    ),
    "chunk-extensions": (
        [("Transfer-Encoding", "chunked")],
        b'5;a=b;c="d;e\\"f" ; g\r\nhello\r\n0;last=1\r\n\r\n',
    ),
    "chunk-size-trailing-space": (
        [("Transfer-Encoding", "chunked")],
        b"5 \t\r\nhello\r\n0\r\n\r\n",
    ),
    "trailers-with-framing-fields": (
        [("Transfer-Encoding", "chunked")],
        b"5\r\nhello\r\n0\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n"
        b"X-Kept: yes\r\n\r\n",
    ),
    "cl-repeated-in-a-list": ([("Content-Length", "5, 5")], b"hello"),
    "cl-repeated-in-two-lines": ([("Content-Length", "5"), ("content-length", "5")], b"hello"),
    "cl-with-whitespace": ([("Content-Length", " \t5\t ")], b"hello"),
    "cl-leading-zeros": ([("Content-Length", "0005")], b"hello"),
    "connection-names-content-length": (
        [("Connection", "Content-Length"), ("Content-Length", "5")],
        b"hello",
    ),
    "connection-names-transfer-encoding": (
        [("Connection", "transfer-encoding, host"), ("Transfer-Encoding", "chunked")],
        CHUNKED_BODY,
    ),
}


@pytest.mark.parametrize("case", list(ACCEPTED_FRAMINGS))
@pytest.mark.parametrize("second", ["pipelined", "later"])
def test_accepted_framing_reaches_the_backend_as_the_proxy_read_it(rig, case, second):
    """The body is `hello` to the proxy, and to the backend; what follows it is a request of
    its own, parsed by the proxy (our forwarded headers), never part of the first."""
    headers, body, *want = ACCEPTED_FRAMINGS[case]
    expected = want[0] if want else b"hello"
    r = rig()
    follow = simple_get("/second")
    with r.client() as c:
        first = post(headers, body)
        if second == "pipelined":
            c.send(first + follow)
            resp = c.read_response()
        else:
            resp = c.request(first)
        assert (resp.status, resp.body) == (200, b"POST /p " + expected), resp
        resp = c.request(follow) if second == "later" else c.read_response()
        assert (resp.status, resp.body) == (200, b"GET /second"), resp
    seen = r.backend.wait_seen(2)
    assert [s.target for s in seen] == [b"/p", b"/second"]
    assert all(forwarded(s) for s in seen), seen
    assert seen[0].body == expected
    framing = seen[0].values("content-length") + seen[0].values("transfer-encoding")
    assert len(framing) == 1, seen[0].head
    assert seen[0].values("host") == [b"b.test"], seen[0].head
    assert not seen[0].values("connection"), seen[0].head
    if case == "trailers-with-framing-fields":
        tail = bytes(r.backend.raw[0]).split(b"hello\r\n0\r\n", 1)[1]
        assert tail.startswith(b"X-Kept: yes\r\n\r\nGET /second "), tail


def test_a_get_with_content_length_zero_and_bytes_after_it(rig):
    """`Content-Length: 0` on the fast path: the bytes after the head are the next request."""
    r = rig()
    with r.client() as c:
        c.send(request_bytes("GET", "/a", [("Host", "b.test"), ("Content-Length", "0")]))
        assert c.read_response().body == b"GET /a"
        c.send(b"GET /b HTTP/1.1\r\nHost: b.test\r\n\r\n")
        assert c.read_response().body == b"GET /b"
    seen = r.backend.wait_seen(2)
    assert [(s.target, s.body) for s in seen] == [(b"/a", b""), (b"/b", b"")]


# --- 3. the request target and Host --------------------------------------------------------

ABSOLUTE_FORMS = {
    "host-mismatch": (b"http://Other.Test:81/p?q=1", b"/p?q=1", b"Other.Test:81"),
    "upper-case-scheme": (b"HTTP://other.test/p", b"/p", b"other.test"),
    "https-scheme": (b"https://other.test/p", b"/p", b"other.test"),
    "no-path": (b"http://other.test", b"/", b"other.test"),
    "query-without-path": (b"http://other.test?x=1", b"/?x=1", b"other.test"),
    "ipv6-literal": (b"http://[::1]:8080/p", b"/p", b"[::1]:8080"),
}


@pytest.mark.parametrize("case", list(ABSOLUTE_FORMS))
def test_absolute_form_target_becomes_the_only_host(rig, case):
    """RFC 9112 3.2.2: a server takes the authority of an absolute-form target as the host
    and ignores Host. The backend gets origin-form and one Host: the target's authority."""
    target, path, host = ABSOLUTE_FORMS[case]
    r = rig()
    with r.client() as c:
        c.send(b"GET %s HTTP/1.1\r\nHost: b.test\r\nX-A: 1\r\n\r\n" % target)
        assert c.read_response().body == b"GET " + path
        assert c.request(simple_get("/next")).body == b"GET /next"
    first, after = r.backend.wait_seen(2)
    assert first.target == path
    assert first.values("host") == [host], first.head
    assert first.values("x-forwarded-host") == [host], first.head
    assert b"b.test" not in first.head, first.head
    assert after.values("host") == [b"backend.test"]


# --- 4. the same bytes, cut anywhere ----------------------------------------------------------

PIPELINE = (
    simple_get("/a")
    + post([("Content-Length", "5")], b"hello", "/b")
    + request_bytes("GET", "/c", [("Host", "b.test"), ("Content-Length", "0")])
    + post([("Transfer-Encoding", "chunked")], b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", "/d")
    + simple_get("/e")
)
PIPELINE_ANSWERS = [b"GET /a", b"POST /b hello", b"GET /c", b"POST /d abcde", b"GET /e"]


def send_in_pieces(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    """`data` in pieces cut at `cuts`, each sent on its own after a pause (so that the proxy
    most likely reads each alone)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = 0
    for cut in [*cuts, len(data)]:
        sock.sendall(data[start:cut])
        start = cut
        time.sleep(0.002)


def test_pipelined_requests_cut_at_every_byte(rig):
    """Five pipelined requests (fast-path GETs, a body by length, a chunked body) sent in two
    pieces, cut at each byte in turn: every cut gives the same five answers, and the backend
    the same five requests with the same bodies, each parsed by the proxy."""
    r = rig()
    cuts = range(1, len(PIPELINE))
    for cut in cuts:
        with r.client() as c:
            send_in_pieces(c.sock, PIPELINE, [cut])
            got = [c.read_response().body for _ in PIPELINE_ANSWERS]
            assert got == PIPELINE_ANSWERS, f"cut at {cut}: {got}"
    seen = r.backend.wait_seen(len(cuts) * len(PIPELINE_ANSWERS))
    assert all(s.complete and forwarded(s) for s in seen)
    bodies = [(s.target, s.body) for s in seen]
    want = [(b"/a", b""), (b"/b", b"hello"), (b"/c", b""), (b"/d", b"abcde"), (b"/e", b"")]
    assert bodies == want * len(cuts)


def test_pipelined_requests_one_byte_at_a_time(rig):
    r = rig()
    with r.client() as c:
        send_in_pieces(c.sock, PIPELINE, list(range(1, len(PIPELINE))))
        got = [c.read_response().body for _ in PIPELINE_ANSWERS]
    assert got == PIPELINE_ANSWERS


SPLIT_ANSWERS = {
    "length": (ok(b"0123456789", b"X-A: b"), b"0123456789", False, b"b"),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;e=1\r\nabc\r\n000002\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
        b"abcde",
        True,
        None,
    ),
}


@pytest.mark.parametrize("framing", SPLIT_ANSWERS)
def test_an_answer_cut_at_every_byte(rig, framing):
    """The backend's answer in two sends, cut at each byte in turn (the fast path's first read
    then has no whole head, or a head without its body, or all of it; a chunked answer goes
    to h11): one client connection gets every answer whole, and the backend connection is
    kept throughout."""
    answer, body, chunked, x_a = SPLIT_ANSWERS[framing]
    cut = [0]

    def split(seen: Seen, sock: socket.socket) -> bool:
        send_in_pieces(sock, answer, [cut[0]])
        return True

    r = rig(answer=split)
    with r.client() as c:
        for at in range(1, len(answer)):
            cut[0] = at
            resp = c.request(simple_get(f"/{at}"))
            assert (resp.status, resp.body, resp.chunked) == (200, body, chunked), (at, resp)
            assert resp.header("x-a") == x_a, (at, resp.raw_head)
    seen = r.backend.wait_seen(len(answer) - 1)
    assert {s.conn for s in seen} == {0}


# --- 5. upgrades: refused ones stay HTTP, accepted ones tunnel untouched ---------------------

WS_LINES = [
    ("Host", "b.test"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]


def upgrade_request(path: str, target: str = "/ws") -> bytes:
    """A WebSocket handshake the fast path takes (`fast`) or leaves to h11 (`h11`: its
    Connection names another header too)."""
    connection = "Upgrade" if path == "fast" else "Upgrade, X-Other"
    return request_bytes("GET", target, [*WS_LINES[:1], ("Connection", connection), *WS_LINES[1:]])


# A masked WebSocket text frame ("hello"): what a client that does not wait for the 101 sends.
WS_FRAME = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"
FOLLOW_UPS = {
    "request": simple_get("/after"),
    "frame": WS_FRAME,  # no line end: an unfinished head, 408 at --header-timeout
    "frame-and-lines": WS_FRAME + b"\r\n\r\n",
    "request-like-frame": b"GET /smuggled HTTP/1.1\r\nHost: b.test\r\nUpgrade: websocket\r\n\r\n",
}
REFUSALS = {
    "200": ok(b"no", status=b"200 OK"),
    "400": ok(b"no", status=b"400 Bad Request"),
    "426": ok(b"no", b"Upgrade: websocket", b"Connection: Upgrade", status=b"426 Upgrade Required"),
    "426-chunked": b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n",
    "100-then-426": b"HTTP/1.1 100 Continue\r\n\r\n"
    + ok(b"no", b"Upgrade: websocket", status=b"426 Upgrade Required"),
    "103-then-200": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"no"),
}


@pytest.mark.parametrize(
    ("refusal", "follow"),
    [
        (refusal, follow)
        for refusal in REFUSALS
        for follow in FOLLOW_UPS
        # an unfinished head waits for --header-timeout: once per path is enough
        if follow != "frame" or refusal == "426"
    ],
)
@pytest.mark.parametrize("path", ["fast", "h11"])
def test_bytes_sent_while_an_upgrade_waits_stay_http_when_it_is_refused(rig, path, refusal, follow):
    """The client sends more right after its upgrade request, before the answer (a
    pipelined request, or WebSocket frames of an optimistic client); the backend refuses the
    upgrade. Those bytes are then HTTP: a request is parsed and forwarded as one (with our
    forwarded headers, on the kept backend connection), anything else is a 400 and the end
    of the connection; no byte of them reaches the backend as they came."""
    sent = threading.Event()

    def refuse(seen: Seen, sock: socket.socket) -> bool:
        if seen.target == b"/ws":
            sent.wait(TIMEOUT)
            time.sleep(0.05)  # the proxy has read (and holds) what was sent
            sock.sendall(REFUSALS[refusal])
            return True
        return echo(seen, sock)

    r = rig("--header-timeout", "1", answer=refuse)
    extra = FOLLOW_UPS[follow]
    status = int(refusal.split("-")[-1] if refusal[0] == "1" else refusal[:3])
    with r.client() as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.send(upgrade_request(path))
        time.sleep(0.05)  # the upgrade request is read alone
        c.send(extra)
        sent.set()
        resp = c.read_response()
        assert (resp.status, resp.body) == (status, b"no"), resp
        assert resp.header("upgrade") is None, resp.raw_head
        if follow == "request":
            resp = c.read_response()
            assert (resp.status, resp.body) == (200, b"GET /after"), resp
            c.send(simple_get("/third"))
            assert c.read_response().body == b"GET /third"
        elif follow == "request-like-frame":
            resp = c.read_response()
            assert (resp.status, resp.body) == (200, b"GET /smuggled"), resp
        else:
            refused_then_closed(c, 408 if follow == "frame" else 400, "GET")
    if follow.startswith("frame"):
        seen = r.backend.wait_seen(1)
        time.sleep(0.05)
        assert [s.target for s in r.backend.seen] == [b"/ws"]
        assert WS_FRAME not in r.backend.all_raw()
    else:
        seen = r.backend.wait_seen(2)
        assert seen[1].conn == seen[0].conn
        assert all(forwarded(s) for s in seen), seen
        assert extra not in r.backend.all_raw(), "the client's bytes reached the backend as sent"
        if follow == "request-like-frame":
            # Our own request for it: no Upgrade of the client's (no Connection token).
            assert seen[1].values("upgrade") == [], seen[1].head


def tunnel(r: Rig, got: list[bytes]) -> Answer:
    """A backend that answers /ws with a 101 and then echoes the tunnel's bytes, each read
    prefixed by `<`, recording them in `got`; other requests are echoed as HTTP."""

    def answer(seen: Seen, sock: socket.socket) -> bool:
        if seen.target != b"/ws":
            return echo(seen, sock)
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nFIRST"
        )
        while data := sock.recv(65536):
            got.append(data)
            sock.sendall(b"<" + data)
        return False

    return answer


TUNNEL_BYTES = {
    "frame": WS_FRAME,
    "http-request": simple_get("/not-http-any-more"),
    "junk": bytes(range(256)),
}


@pytest.mark.parametrize("what", list(TUNNEL_BYTES))
@pytest.mark.parametrize("when", ["with-the-request", "while-it-waits", "after-the-101"])
@pytest.mark.parametrize("path", ["fast", "h11"])
def test_bytes_after_an_accepted_upgrade_are_tunnelled_untouched(rig, path, when, what):
    got: list[bytes] = []
    r = rig()
    r.backend.answer = tunnel(r, got)
    data = TUNNEL_BYTES[what]
    with r.client() as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if when == "with-the-request":
            c.send(upgrade_request(path) + data)
        else:
            c.send(upgrade_request(path))
        if when == "while-it-waits":
            time.sleep(0.02)
            c.send(data)
        head = recv_until(c.sock, c.buf, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert b"content-length" not in head.lower()
        assert recv_exact(c.sock, 5, c.buf) == b"FIRST"
        if when == "after-the-101":
            c.send(data)
        c.sock.shutdown(socket.SHUT_WR)
        kind, rest = c.wait_closed(TIMEOUT)
        assert kind == "eof"
    assert b"".join(got) == data
    assert rest.replace(b"<", b"") == data.replace(b"<", b"")
    [seen] = r.backend.wait_seen(1)
    assert seen.values("upgrade") == [b"websocket"]


# --- 6. answers the proxy must not pass on -------------------------------------------------------

BAD_ANSWERS = {
    "differing-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n"
    b"\r\nhello!",
    "content-length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "content-length-plus": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "content-length-hex": b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
    "content-length-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
    "te-chunked-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "te-two-lines": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "te-identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nhello",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
    "cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rContent-Length: 0\r\nContent-Length: 5\r\n"
    b"\r\nhello",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\nContent-Length: 5\r\n"
    b"\r\nhello",
    "double-space-status-line": b"HTTP/1.1  200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "two-digit-status": b"HTTP/1.1 20 OK\r\nContent-Length: 5\r\n\r\nhello",
    "status-below-100": b"HTTP/1.1 099 Odd\r\nContent-Length: 5\r\n\r\nhello",
}


@pytest.mark.parametrize("answer", list(BAD_ANSWERS.values()), ids=list(BAD_ANSWERS))
@pytest.mark.parametrize("request_path", ["fast", "h11"])
def test_a_malformed_answer_is_a_502_and_never_relayed(rig, answer, request_path):
    r = rig()
    r.backend.answers[b"/bad"] = sends(answer)
    request = get_on(request_path, "/bad")
    with r.client() as c:
        assert c.request(simple_get("/first")).body == b"GET /first"
        c.send(request)
        got = c.read_response()
        assert got.status == 502, got
        assert b"hello" not in got.raw_head + got.body
        _, rest = c.wait_closed(TIMEOUT)
        assert rest == b""
    with r.client() as c:
        assert c.request(simple_get("/after")).body == b"GET /after"
    seen = r.backend.wait_seen(3)
    assert [s.conn for s in seen] == [0, 0, 1]


@pytest.mark.parametrize(
    "length", ["18446744073709551617", "99999999999999999999"], ids=["2**64+1", "20-nines"]
)
def test_an_answer_with_a_content_length_beyond_64_bits_is_a_502(rig, length):
    def huge(seen: Seen, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\nh" % length.encode())
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
        time.sleep(0.2)
        return False

    r = rig(answer=huge)
    with r.client() as c:
        c.send(simple_get("/huge"))
        head = recv_until(c.sock, c.buf, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 "), head


ACCEPTED_ANSWERS = {
    "equal-content-lengths-in-a-list": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
        [b"Content-Length: 5\r\n"],
    ),
    "content-length-leading-zeros": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 005\r\n\r\nhello",
        [b"Content-Length: 005\r\n"],
    ),
    "obs-fold": (
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\n\tc\r\nContent-Length: 5\r\n\r\nhello",
        [b"\r\nX-Folded: a b c\r\n"],
    ),
    "te-capitalised": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        [b"Transfer-Encoding: chunked\r\n"],
    ),
    "cl-and-te": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        [b"Transfer-Encoding: chunked\r\n"],
    ),
    "bare-lf-head": (
        b"HTTP/1.1 200 OK\nX-A: b\nContent-Length: 5\n\nhello",
        [b"HTTP/1.1 200 OK\r\nX-A: b\r\n"],
    ),
    "no-reason": (b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello", [b"HTTP/1.1 200 \r\n"]),
    "103-with-content-length": (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nContent-Length: 7\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n"],
    ),
    "several-interim-answers": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early"],
    ),
}


@pytest.mark.parametrize("case", list(ACCEPTED_ANSWERS))
@pytest.mark.parametrize("request_path", ["fast", "h11"])
def test_an_accepted_answer_reaches_the_client_framed_once(rig, case, request_path):
    """Odd but valid (or repairable) answers: the client gets `hello` under exactly one
    framing header, and the next request is answered on the same client connection."""
    answer, parts = ACCEPTED_ANSWERS[case]

    r = rig()
    r.backend.answers[b"/odd"] = sends(answer)
    request = get_on(request_path, "/odd")
    with r.client() as c:
        c.send(request)
        resp = c.read_response()
        while resp.status < 200:
            resp = c.read_response()
        assert (resp.status, resp.body) == (200, b"hello"), resp
        framing = resp.values("content-length") + resp.values("transfer-encoding")
        assert len(framing) == 1, resp.raw_head
        assert c.request(simple_get("/next")).body == b"GET /next"
    # What the client got, raw, for the parts that must be there: asked again on a new
    # connection and read to the end of the head of the final answer.
    with r.client() as c:
        c.send(request)
        got = bytearray()
        while not re.search(rb"HTTP/1\.1 200[^\n]*\n(?:[^\r\n][^\n]*\n)*\r\n", got):
            chunk = c.sock.recv(65536)
            assert chunk, bytes(got)
            got += chunk
        for part in parts:
            assert part in got, (part, bytes(got))


BODILESS = {
    "204-with-content-length-and-body": (
        "GET",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
        204,
    ),
    "204-with-chunked-body": (
        "GET",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        204,
    ),
    "304-with-body": (
        "GET",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello",
        304,
    ),
    "head-with-body": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200),
    "head-with-chunked-body": (
        "HEAD",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        200,
    ),
}


@pytest.mark.parametrize("case", list(BODILESS))
def test_a_body_where_none_may_be_is_never_an_answer(rig, case):
    """A backend sends a body after a head that has none (204, 304, an answer to HEAD): the
    client gets the head alone, and those bytes are never taken for the next answer (the
    backend connection is not used again)."""
    method, answer, status = BODILESS[case]

    r = rig()
    r.backend.answers[b"/x"] = sends(answer)
    with r.client() as c:
        c.send(request_bytes(method, "/x", [("Host", "b.test")]))
        resp = c.read_response(method)
        assert resp.status == status, resp
        if status == 204:
            assert resp.header("content-length") is None, resp.raw_head
            assert resp.header("transfer-encoding") is None, resp.raw_head
        resp = c.request(simple_get("/next"))
        assert (resp.status, resp.body) == (200, b"GET /next"), resp
    seen = r.backend.wait_seen(2)
    assert [s.conn for s in seen] == [0, 1]


CUT_ANSWERS = {
    "chunked-closed-mid-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    "chunked-closed-between-chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n",
    "chunked-closed-in-trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\nX-T: 1\r\n",
    "chunked-bad-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0x5\r\nworld\r\n0\r\n\r\n",
    "chunked-data-overruns": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhelloXX\r\n0\r\n\r\n",
    "length-closed-short": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
    "length-closed-short-h11-head": b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
    b"Content-Length: 10\r\n\r\nhello",
}


@pytest.mark.parametrize("case", list(CUT_ANSWERS))
@pytest.mark.parametrize("request_path", ["fast", "h11"])
def test_an_answer_cut_short_is_never_complete_to_the_client(rig, case, request_path):
    """The backend's answer breaks off (it closes, or its framing goes bad) after the head
    went to the client: the client's connection ends without a complete message (no last
    chunk, fewer bytes than the length), so it cannot take a truncated body for a whole one."""

    def cut(seen: Seen, sock: socket.socket) -> bool:
        sock.sendall(CUT_ANSWERS[case])
        time.sleep(0.05)
        return False

    r = rig(answer=cut)
    request = get_on(request_path, "/cut")
    with r.client() as c:
        c.send(request)
        start = time.monotonic()
        _, got = wait_closed(c.sock, TIMEOUT)  # "reset" may have cost the client what it had
        assert time.monotonic() - start < 2
    if not got:
        return
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), got
    _, headers = parse_head(head + b"\r\n\r\n")
    if header_values(headers, "transfer-encoding"):
        assert not rest.endswith(b"0\r\n\r\n"), rest
        assert b"world" not in rest, rest
        assert b"XX" not in rest, rest
    else:
        [length] = header_values(headers, "content-length")
        assert len(rest) < int(length), rest


# --- 7. a 101 nobody asked for -------------------------------------------------------------------

NOT_UPGRADES = {
    "h2c-only": request_bytes(
        "GET",
        "/x",
        [
            ("Host", "b.test"),
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    ),
    "http-1.0": b"GET /x HTTP/1.0\r\nHost: b.test\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\n\r\n",
    "upgrade-without-connection-token": request_bytes(
        "GET", "/x", [("Host", "b.test"), ("Upgrade", "websocket")]
    ),
    "connection-token-without-upgrade": request_bytes(
        "GET", "/x", [("Host", "b.test"), ("Connection", "Upgrade")]
    ),
    "post-with-body": post([("Content-Length", "5")], b"hello", "/x"),
}


@pytest.mark.parametrize("case", list(NOT_UPGRADES))
def test_a_101_to_a_request_that_is_no_upgrade_is_a_502(rig, case):
    """The proxy did not offer an upgrade (it dropped the client's Upgrade, or there was
    none): a 101 from the backend is refused, and nothing after it reaches the client."""

    def switch(seen: Seen, sock: socket.socket) -> bool:
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            b"\x00\x00\x12\x04\x00\x00\x00\x00\x00TUNNELLED"
        )
        time.sleep(0.2)
        return False

    r = rig(answer=switch)
    with r.client() as c:
        c.send(NOT_UPGRADES[case])
        _, got = wait_closed(c.sock, TIMEOUT)
    assert got.startswith(b"HTTP/1.1 502 "), got
    assert b"TUNNELLED" not in got, got
    assert b" 101 " not in got, got
    [seen] = r.backend.wait_seen(1)
    assert seen.values("upgrade") == [], seen.head


# --- 8. Expect: 100-continue ---------------------------------------------------------------------


def test_a_body_after_an_early_final_answer_is_never_a_request(rig):
    """The client asks for 100 Continue; the backend refuses at once (417, not reading the
    body). The proxy says it closes; a body the client sends anyway (here: a whole request)
    is never read as a request, neither by the proxy nor by the backend."""

    def refuse(seen: Seen, sock: socket.socket) -> bool:
        sock.sendall(ok(b"no", status=b"417 Expectation Failed"))
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                r.backend.raw[seen.conn] += data
        return False

    r = rig()
    r.backend.on_head = refuse
    body = SMUGGLED + SMUGGLED
    with r.client() as c:
        c.send(post([("Content-Length", str(len(body))), ("Expect", "100-continue")]))
        resp = c.read_response()
        assert (resp.status, resp.body) == (417, b"no"), resp
        assert header_tokens(resp.headers, "connection") == [b"close"], resp.raw_head
        with contextlib.suppress(OSError):
            c.send(body)
        _, rest = c.wait_closed(TIMEOUT)
        assert rest == b""
    time.sleep(0.05)
    assert [s.target for s in r.backend.seen] == [b"/p"]
    assert b"/smuggled" not in r.backend.all_raw()


def test_a_100_continue_then_the_body_keeps_the_connection(rig):
    """The backend says 100 Continue and then reads the body: the client gets the 100, sends
    the body, gets the answer, and the connection (and the backend's) goes on."""

    def proceed(seen: Seen, sock: socket.socket) -> bool:
        if seen.values("expect"):
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    r = rig()
    r.backend.on_head = proceed
    with r.client() as c:
        c.send(post([("Content-Length", "5"), ("Expect", "100-continue")]))
        interim = c.read_response(allow_informational=True)
        assert interim.status == 100, interim
        c.send(b"hello" + simple_get("/next"))
        assert c.read_response().body == b"POST /p hello"
        assert c.read_response().body == b"GET /next"
    seen = r.backend.wait_seen(2)
    assert [(s.conn, s.target, s.body) for s in seen] == [(0, b"/p", b"hello"), (0, b"/next", b"")]


def test_a_client_waiting_for_100_continue_on_a_path_without_route_is_answered_at_once(
    launch, raw_backend
):
    """RFC 9110 10.1.1: a server that gets `Expect: 100-continue` with a body to follow
    sends at once either a final answer it can tell from the head, or 100 Continue; the
    client may wait for one of them indefinitely. A path without a route is such an answer
    (404): the proxy must not sit waiting for the body and then blame the client (408)."""
    backend = raw_backend()
    proxy = launch("--route", f"/api/=http://127.0.0.1:{backend.port}", "--response-timeout", "2")
    with HttpClient(proxy.port, TIMEOUT) as c:
        c.send(post([("Content-Length", "5"), ("Expect", "100-continue")], target="/nowhere"))
        start = time.monotonic()
        resp = c.read_response("POST", allow_informational=True)
        waited = time.monotonic() - start
        if resp.status == 100:
            c.send(b"hello")
            resp = c.read_response("POST")
        assert resp.status == 404, resp
        assert waited < 1.5, f"answered {resp.status} only after {waited:.1f} s"
    assert not backend.seen


def test_request_trailers_are_passed_on_unfolded(rig):
    """A trailer section with an obsolete line fold: RFC 9112 5.2 lets a recipient replace
    the fold with a space; what reaches the backend has no line starting with whitespace."""
    r = rig()
    with r.client() as c:
        c.send(
            post(
                [("Transfer-Encoding", "chunked")],
                b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n" + simple_get("/next"),
            )
        )
        assert c.read_response().body == b"POST /p hello"
        assert c.read_response().body == b"GET /next"
    raw = bytes(r.backend.raw[0])
    section = raw.split(b"hello\r\n0\r\n", 1)[1].split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"\n[ \t]", section + b"\r\n"), section


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_an_upgrade_with_a_body_tunnels_what_follows_the_body(rig, framing):
    """An upgrade request with a body and tunnel bytes right behind it, in one send: the
    backend gets the body framed as the proxy read it, then, after its 101, the tunnel
    bytes exactly as the client sent them."""
    got: list[bytes] = []
    r = rig()
    r.backend.answer = tunnel(r, got)
    lines = [("Content-Length", "5")] if framing == "length" else [("Transfer-Encoding", "chunked")]
    body = b"hello" if framing == "length" else b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
    head = upgrade_request("h11").replace(b"\r\n\r\n", b"\r\n", 1)
    head += b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in lines) + b"\r\n"
    data = b"0\r\n\r\n" + SMUGGLED + WS_FRAME
    with r.client() as c:
        c.send(head + body + data)
        assert recv_until(c.sock, c.buf, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        assert recv_exact(c.sock, 5, c.buf) == b"FIRST"
        c.sock.shutdown(socket.SHUT_WR)
        kind, rest = c.wait_closed(TIMEOUT)
    assert kind == "eof"
    assert b"".join(got) == data
    assert rest.replace(b"<", b"") == data.replace(b"<", b"")
    [seen] = r.backend.wait_seen(1)
    assert seen.body == b"hello"


def test_a_101_cut_at_every_byte_tunnels_the_bytes_sent_while_it_waited(rig):
    """The 101 to a fast-path handshake arrives in two pieces, cut at each byte in turn (the
    fast path hands it to h11 when its head is not whole): the bytes the client sent while it
    waited, and those the backend sent after its 101, pass through the tunnel untouched."""
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nFIRST"
    )
    cut = [0]
    waited = threading.Event()

    def switch(seen: Seen, sock: socket.socket) -> bool:
        waited.wait(TIMEOUT)
        send_in_pieces(sock, answer, [cut[0]])
        data = b""
        while len(data) < len(WS_FRAME):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        sock.sendall(b"<" + data)
        return False

    r = rig(answer=switch)
    for at in range(1, len(answer)):
        cut[0] = at
        waited.clear()
        with r.client() as c:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.send(upgrade_request("fast"))
            time.sleep(0.005)
            c.send(WS_FRAME)
            waited.set()
            head = recv_until(c.sock, c.buf, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), (at, head)
            assert recv_exact(c.sock, 6 + len(WS_FRAME), c.buf) == b"FIRST<" + WS_FRAME, at
