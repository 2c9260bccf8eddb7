"""The fast path (rawproxy/session.py `_take_simple_request`), end to end.

A bodiless HTTP/1.1 request whose head arrives whole in one read (CRLF line ends, visible
ASCII, see rawproxy.http.parse_simple_request) is forwarded without h11, and a simple
Content-Length answer to it (or a 101 to an upgrade) is relayed without h11; anything else
leaves the fast path and goes on by the h11 path. Since bf00ff9 that holds for the first
request of a connection too (its backend connection is opened for it); at 21ad3bf only for
requests on a kept-alive backend connection. An exchange is made to go by h11 by sending the
same request with bare LF line ends (`lf_only`), with its head in two pieces, or with a
Connection header naming another header (`not_simple`). Against the real proxy process:

- what the backend receives and what the client receives are byte for byte the same on both
  paths (forwarded headers, hop-by-hop headers dropped, header case and order, Host first,
  route prefixes, --backend-host-header, Location and Set-Cookie rewriting, TLS legs,
  WebSocket handshakes), and so are the access log lines and the metrics;
- a request the fast path refuses is treated as request 2 exactly as when it comes first;
- every answer the fast path does not take (chunked, 204, 304, 1xx, Connection: close or
  naming a header, HTTP/1.0, close-delimited, a head in pieces, a HEAD request) reaches the
  client right and the connection goes on; a backend connection that was to close is not
  used again;
- a backend that sends bytes after its answer never gets its connection reused (they would
  be read as the answer to the next request);
- a large body keeps its backpressure; a backend closing mid-body, closing as the request
  arrives (retried), or silent (504); pipelined requests, requests sent while one waits, a
  client that half-closes or leaves; another route's backend; a drain (SIGTERM).

Nothing tells from outside which path an exchange took: each test was checked to fail when
the behaviour it names was broken in a scratch copy of the proxy. Two older bugs these tests
found are fixed by c5b70c2 (see the comments naming it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from peers import (
    HttpClient,
    Metrics,
    ProxyProcess,
    Response,
    ScriptedBackend,
    ScriptedConn,
    pattern_bytes,
    recv_exact,
    recv_until,
    request_bytes,
    reset_close,
    simple_get,
    websocket_request,
)
from tls_peers import Pki

# A bound on every wait of a client in these tests: a proxy that hangs fails fast.
CLIENT_TIMEOUT = 4.0

# What a backend does after an answer (see Exchanges).
KEEP = "keep"  # read the next request on the connection
CLOSE = "close"  # close the connection at once
LINGER = "linger"  # wait for the proxy to close it; any byte it sends first is a violation

Answer = Callable[[socket.socket], str]  # sends an answer, says what comes next


def reply(data: bytes, then: str = KEEP) -> Answer:
    """An answer sent in one send(), then `then`."""

    def answer(sock: socket.socket) -> str:
        sock.sendall(data)
        return then

    return answer


def hang_up(sock: socket.socket) -> str:
    """No answer: the connection is closed (FIN) right after the request head was read."""
    return CLOSE


def reset(sock: socket.socket) -> str:
    """No answer: the connection is reset (RST) right after the request head was read."""
    reset_close(sock)
    return CLOSE


def ok(body: bytes, *extra: bytes) -> bytes:
    """A simple answer, the kind the fast path relays: 200, Content-Length, `body`."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in extra)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def lf_only(request: bytes) -> bytes:
    """`request` with bare LF line ends: h11 reads it (the fast path takes CRLF only) and the
    proxy forwards it with CRLF; so it goes by the h11 path whatever came before it."""
    return request.replace(b"\r\n", b"\n")


class Exchanges:
    """The script of a ScriptedBackend that keeps its connections alive: the request numbered
    i (counted over every connection, from 0) is answered by `answers[i]` (bytes: sent as
    they are in one send(), then KEEP). Every raw request head is recorded with the number of
    the connection it came on (0 for the first connection, ...). A request beyond `answers`
    is recorded in `unexpected` (and its connection closed); bytes the proxy sends on a
    connection after an answer saying LINGER (`Connection: close`, HTTP/1.0) are recorded in
    `after_close`."""

    def __init__(self, *answers: Answer | bytes) -> None:
        self.answers: list[Answer] = [reply(a) if isinstance(a, bytes) else a for a in answers]
        self.heads: list[tuple[int, bytes]] = []
        self.unexpected: list[bytes] = []
        self.after_close: list[bytes] = []
        self.ended = 0  # connections whose script returned
        self._changed = threading.Condition()
        self._connections = itertools.count()

    def __call__(self, sc: ScriptedConn) -> None:
        try:
            self._serve(sc)
        finally:
            with self._changed:
                self.ended += 1
                self._changed.notify_all()

    def _serve(self, sc: ScriptedConn) -> None:
        conn = next(self._connections)
        head = sc.head
        while True:
            with self._changed:
                index = len(self.heads)
                self.heads.append((conn, head))
                self._changed.notify_all()
            if index >= len(self.answers):
                self.unexpected.append(head)
                return
            then = self.answers[index](sc.sock)
            if then == LINGER:
                try:
                    late = bytes(sc.extra) + sc.sock.recv(65536)
                except OSError:
                    return
                if late:
                    self.after_close.append(late)
                return
            if then == CLOSE:
                return
            try:
                head = recv_until(sc.sock, sc.extra, b"\r\n\r\n")
            except (EOFError, OSError):
                return

    def wait_closed(self, n: int, timeout: float = CLIENT_TIMEOUT) -> None:
        """Once n connections have ended (the script returned: answered with CLOSE, or the
        proxy closed the connection)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.ended >= n, timeout):
                raise TimeoutError(f"{self.ended} of {n} backend connections ended")

    def wait_heads(self, n: int, timeout: float = CLIENT_TIMEOUT) -> list[tuple[int, bytes]]:
        """The recorded (connection, head) pairs, once there are at least n."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.heads) >= n, timeout):
                raise TimeoutError(f"the backend got {len(self.heads)} of {n} requests")
            return list(self.heads)

    def connections(self) -> list[int]:
        """The connection each request came on, in order."""
        with self._changed:
            return [conn for conn, _ in self.heads]

    def targets(self) -> list[bytes]:
        with self._changed:
            return [head.split(b" ", 2)[1] for _, head in self.heads]

    def check(self) -> None:
        assert not self.unexpected, f"requests the test did not expect: {self.unexpected}"
        assert not self.after_close, (
            f"sent on a connection the backend had said it would close: {self.after_close}"
        )


@pytest.fixture
def backend() -> Iterator[Callable[..., tuple[Exchanges, ScriptedBackend]]]:
    """`backend(*answers, ssl_context=None)`: a ScriptedBackend running Exchanges(*answers)
    (TLS with a server-side `ssl_context`); at teardown each is stopped, then its `check()`
    must pass."""
    made: list[tuple[Exchanges, ScriptedBackend]] = []

    def start(
        *answers: Answer | bytes, ssl_context: ssl.SSLContext | None = None
    ) -> tuple[Exchanges, ScriptedBackend]:
        exchanges = Exchanges(*answers)
        server = ScriptedBackend(exchanges, ssl_context=ssl_context)
        made.append((exchanges, server))
        return exchanges, server

    yield start
    for _, server in made:
        server.stop()
    for exchanges, _ in made:
        exchanges.check()


@dataclasses.dataclass
class Setup:
    exchanges: Exchanges
    proxy: ProxyProcess
    client: HttpClient


@pytest.fixture
def setup(backend, start_proxy, client) -> Callable[..., Setup]:
    """`setup(*answers, flags=())`: a scripted backend answering with `answers` (see
    Exchanges), a proxy in front of it started with `flags`, and one client connection."""

    def start(*answers: Answer | bytes, flags: tuple[str, ...] = ()) -> Setup:
        exchanges, server = backend(*answers)
        proxy = start_proxy(server.port, *flags)
        return Setup(exchanges, proxy, client(proxy.port, timeout=CLIENT_TIMEOUT))

    return start


def raw(resp: Response) -> bytes:
    """A response exactly as the client got it: head and (de-framed) body."""
    return resp.raw_head + resp.body


def nothing_more(c: HttpClient) -> None:
    """The proxy sent nothing beyond the responses read so far."""
    assert c.buf == b"", bytes(c.buf)
    c.sock.settimeout(0.05)
    try:
        extra = c.sock.recv(65536)
    except TimeoutError:
        extra = None
    finally:
        c.sock.settimeout(CLIENT_TIMEOUT)
    assert extra is None, f"unexpected bytes (or EOF) from the proxy: {extra!r}"


FIRST = ok(b"first")
SECOND = ok(b"second")
THIRD = ok(b"third")

# --- 1. requests reach the backend identically on both paths ----------------------------------

# A browser-like GET: mixed-case names, Host not first, inner spaces and a tab in values,
# trailing spaces, hop-by-hop headers (dropped), forwarded headers from an untrusted client
# (dropped), a Content-Length of 0 (still a bodiless request).
BROWSER_HEADERS = [
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    ("Host", "App.Test:8080"),
    ("accept", "text/html,application/xhtml+xml;q=0.9,  */*;q=0.8"),
    ("Accept-Language", "en-US,en;q=0.5"),
    ("X-MiXeD-CaSe", "inner  spaces\tand a tab"),
    ("X-Trailing", "value   "),
    ("Connection", "keep-alive"),
    ("Keep-Alive", "300"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Real-IP", "203.0.113.9"),
    ("Cookie", "a=1; b=2"),
    ("Content-Length", "0"),
]


def browser_get(target: str) -> bytes:
    return request_bytes("GET", target, BROWSER_HEADERS)


def expected_default_head(target: str, proxy_port: int) -> bytes:
    """What the backend must receive for browser_get(target) with the default flags."""
    return (
        b"GET %s HTTP/1.1\r\n"
        b"Host: App.Test:8080\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
        b"accept: text/html,application/xhtml+xml;q=0.9,  */*;q=0.8\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\n"
        b"X-MiXeD-CaSe: inner  spaces\tand a tab\r\n"
        b"X-Trailing: value\r\n"
        b"Cookie: a=1; b=2\r\n"
        b"Content-Length: 0\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: App.Test:8080\r\n"
        b"X-Forwarded-Port: %d\r\n"
        b"\r\n"
    ) % (target.encode(), proxy_port)


def test_request_heads_identical_on_both_paths(setup):
    """The same GET five times on one connection: 1 (fast path, opening the backend
    connection; h11 before bf00ff9), 2 (fast path on the kept-alive backend connection),
    3 with bare LF line ends and 4 with its head sent in two pieces (h11 both), 5 (fast path
    again). The backend gets the same bytes each time, exactly what the forwarding rules
    say."""
    s = setup(*(ok(b"%d" % n) for n in range(1, 6)))
    target = "/page?q=a%20b"
    request = browser_get(target)
    assert s.client.request(request).body == b"1"
    assert s.client.request(request).body == b"2"
    assert s.client.request(lf_only(request)).body == b"3"
    s.client.send(request[:40])
    time.sleep(0.05)  # two reads, most likely: the head does not arrive whole
    s.client.send(request[40:])
    assert s.client.read_response().body == b"4"
    assert s.client.request(request).body == b"5"
    heads = s.exchanges.wait_heads(5)
    assert [conn for conn, _ in heads] == [0] * 5
    want = expected_default_head(target, s.proxy.port)
    for number, (_, head) in enumerate(heads, 1):
        assert head == want, f"request {number}:\n{head!r}\nwant\n{want!r}"


CHROMIUM_GET = request_bytes(
    "GET",
    "/tests/42",
    [
        ("Host", "App.Test:8080"),
        ("Connection", "keep-alive"),
        ("sec-ch-ua", '"Chromium";v="156", "Not)A;Brand";v="99"'),
        ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0"),
        ("Accept", "text/html,*/*;q=0.8"),
        ("Accept-Encoding", "gzip, deflate, br, zstd"),
        ("Cookie", "mojolicious=eyJhIjoxfQ--abc; other=1"),
    ],
)


def test_a_plain_request_reaches_the_backend_as_the_client_wrote_it(setup):
    """A head of `Name: value` lines without forwarded headers (what Chromium sends) goes to
    the backend as it came, less its Connection line, plus our forwarded headers: the same
    bytes by the fast path (requests 1, 2, 4) and by h11 (3, bare LF)."""
    s = setup(*(ok(b"%d" % n) for n in range(1, 5)))
    for n, request in enumerate([CHROMIUM_GET, CHROMIUM_GET, lf_only(CHROMIUM_GET)], 1):
        assert s.client.request(request).body == b"%d" % n
    assert s.client.request(CHROMIUM_GET).body == b"4"
    heads = s.exchanges.wait_heads(4)
    want = (
        b"GET /tests/42 HTTP/1.1\r\nHost: App.Test:8080\r\n"
        b'sec-ch-ua: "Chromium";v="156", "Not)A;Brand";v="99"\r\n'
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/156.0\r\n"
        b"Accept: text/html,*/*;q=0.8\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
        b"Cookie: mojolicious=eyJhIjoxfQ--abc; other=1\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: App.Test:8080\r\nX-Forwarded-Port: %d\r\n\r\n"
    ) % s.proxy.port
    for number, (_, head) in enumerate(heads, 1):
        assert head == want, f"request {number}:\n{head!r}\nwant\n{want!r}"


@pytest.mark.parametrize(
    ("flags", "target", "must_contain"),
    [
        pytest.param(
            ("--forwarded", "both", "--trusted-proxy", "127.0.0.1/32"),
            "/p",
            [
                b"\r\nX-Forwarded-For: 203.0.113.9, 127.0.0.1\r\n",
                b"\r\nX-Real-IP: 203.0.113.9\r\n",
                b'\r\nForwarded: for=127.0.0.1;proto=http;host="App.Test:8080"\r\n',
            ],
            id="rfc7239-and-trusted-proxy",
        ),
        pytest.param(
            ("--forwarded", "none"),
            "/p",
            [b"GET /p HTTP/1.1\r\nHost: App.Test:8080\r\nUser-Agent: "],
            id="forwarded-none",
        ),
        pytest.param(
            ("--backend-host-header",),
            "/p",
            [b"GET /p HTTP/1.1\r\nHost: 127.0.0.1:{backend}\r\n"],
            id="backend-host-header",
        ),
        pytest.param(
            ("--route", "/api/=http://127.0.0.1:{backend}/v2/"),
            "/api/items?x=1",
            [b"GET /v2/items?x=1 HTTP/1.1\r\n"],
            id="route-prefix-replaced",
        ),
    ],
)
def test_request_heads_identical_with_other_settings(
    backend, start_proxy, client, flags, target, must_contain
):
    exchanges, server = backend(FIRST, SECOND, THIRD)
    port = str(server.port)
    proxy = start_proxy(server.port, *(f.replace("{backend}", port) for f in flags))
    c = client(proxy.port, timeout=CLIENT_TIMEOUT)
    request = browser_get(target)
    for body, sent in [(b"first", lf_only(request)), (b"second", request), (b"third", request)]:
        assert c.request(sent).body == body
    heads = exchanges.wait_heads(3)
    assert [conn for conn, _ in heads] == [0, 0, 0]
    first = heads[0][1]  # h11's
    assert heads[1][1] == first, f"fast path:\n{heads[1][1]!r}\nh11:\n{first!r}"
    assert heads[2][1] == first
    for part in must_contain:
        assert part.replace(b"{backend}", port.encode()) in first, first
    if "none" in flags:
        assert b"forwarded" not in first.lower(), first


# Requests out of the ordinary, most of which the fast path refuses, each with the status the
# proxy answers itself (None: forwarded). Each must be treated as request 2 exactly as when it
# comes first on a connection, and (forwarded ones) as when it is made to go by h11.
UNUSUAL_REQUESTS: dict[str, tuple[bytes, int | None]] = {
    "over-max-header-size": (
        request_bytes("GET", "/big", [("Host", "b.test"), ("X-Pad", "p" * 2000)]),
        431,
    ),
    "obsolete-line-folding": (
        b"GET /fold HTTP/1.1\r\nHost: b.test\r\nX-Folded: a\r\n b\r\n\r\n",
        400,
    ),
    "space-before-colon": (b"GET /sp HTTP/1.1\r\nHost : b.test\r\n\r\n", 400),
    "no-host": (b"GET /nohost HTTP/1.1\r\nAccept: */*\r\n\r\n", 400),
    "two-hosts": (b"GET /hosts HTTP/1.1\r\nHost: b.test\r\nHost: c.test\r\n\r\n", 400),
    "bare-lf": (b"GET /lf HTTP/1.1\nHost: b.test\nAccept: */*\n\n", None),
    "http-1.0": (b"GET /old HTTP/1.0\r\nHost: b.test\r\n\r\n", None),
    "connection-names-a-header": (
        request_bytes(
            "GET",
            "/named",
            [("Host", "b.test"), ("Connection", "keep-alive, X-Secret"), ("X-Secret", "s")],
        ),
        None,
    ),
    "expect-100-continue": (
        request_bytes("GET", "/expect", [("Host", "b.test"), ("Expect", "100-continue")]),
        None,
    ),
    "absolute-form": (simple_get("http://b.test/absolute", "b.test"), None),
    "obs-text-value": (b"GET /text HTTP/1.1\r\nHost: b.test\r\nX-Name: caf\xe9\r\n\r\n", None),
    "two-content-length-0": (
        request_bytes(
            "GET", "/cl", [("Host", "b.test"), ("Content-Length", "0"), ("Content-Length", "0")]
        ),
        None,
    ),
}


def exchange(c: HttpClient, request: bytes) -> tuple[bytes, bool]:
    """The raw response to `request`, and whether the proxy then closed the connection."""
    c.send(request)
    resp = c.read_response()
    try:
        c.sock.settimeout(0.2)
        closed = c.sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        closed = True
    finally:
        c.sock.settimeout(CLIENT_TIMEOUT)
    return raw(resp), closed


# A request h11 itself refuses as request 2 on a kept-alive connection got a reset instead of
# its 400 before c5b70c2 (stale Session.response_started, older than the fast path).
@pytest.mark.parametrize("case", list(UNUSUAL_REQUESTS))
def test_unusual_request_treated_alike_first_and_second(backend, start_proxy, client, case):
    """The same request as the first on a connection and as the second on a kept-alive one:
    the same answer (refused with the status due, or forwarded), the same bytes at the
    backend; a forwarded one also as when made to go by h11 (bare LF line ends)."""
    request, refused = UNUSUAL_REQUESTS[case]
    exchanges, server = backend(*[ok(b"x")] * 4)
    proxy = start_proxy(server.port, "--max-header-size", "1k")
    alone = client(proxy.port, timeout=CLIENT_TIMEOUT)
    first_answer = exchange(alone, request)
    kept = client(proxy.port, timeout=CLIENT_TIMEOUT)
    assert kept.request(simple_get("/1")).body == b"x"
    second_answer = exchange(kept, request)
    assert second_answer == first_answer
    if refused is not None:
        assert first_answer == (first_answer[0], True), "the connection was kept"
        assert first_answer[0].startswith(b"HTTP/1.1 %d " % refused), first_answer
        assert exchanges.targets() == [b"/1"]
        return
    assert first_answer[0].endswith(b"\r\n\r\nx"), first_answer
    by_h11 = client(proxy.port, timeout=CLIENT_TIMEOUT)
    assert exchange(by_h11, lf_only(request)) == first_answer
    heads = exchanges.wait_heads(4)
    assert [conn for conn, _ in heads] == [0, 1, 1, 2]
    assert heads[2][1] == heads[0][1]
    assert heads[3][1] == heads[0][1]


# --- 2. responses reach the client identically on both paths ----------------------------------

BROWSER_RESPONSE = (
    b"HTTP/1.1 200 Fine, Thanks\r\n"
    b"Date: Sat, 21 Nov 2026 17:00:00 GMT\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"X-BaCkEnD-CaSe: MiXeD\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"Set-Cookie: sid=abc123; Path=/; HttpOnly\r\n"
    b"Set-Cookie: theme=dark;  Max-Age=60\r\n"
    b"Connection: keep-alive\r\n"
    b"X-Spaces: inner  spaces\tand a tab   \r\n"
    b"Content-Length: 11\r\n"
    b"\r\n"
    b"hello world"
)
# What the client must get: Keep-Alive and Connection dropped, trailing spaces trimmed.
BROWSER_RESPONSE_RELAYED = (
    b"HTTP/1.1 200 Fine, Thanks\r\n"
    b"Date: Sat, 21 Nov 2026 17:00:00 GMT\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"X-BaCkEnD-CaSe: MiXeD\r\n"
    b"Set-Cookie: sid=abc123; Path=/; HttpOnly\r\n"
    b"Set-Cookie: theme=dark;  Max-Age=60\r\n"
    b"X-Spaces: inner  spaces\tand a tab\r\n"
    b"Content-Length: 11\r\n"
    b"\r\n"
    b"hello world"
)


@pytest.mark.parametrize(
    ("answer", "want"),
    [
        pytest.param(BROWSER_RESPONSE, BROWSER_RESPONSE_RELAYED, id="browser-like"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nX-Powered-By: Express\r\n"
            b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-Powered-By: Express\r\nContent-Length: 2\r\n\r\nok",
            id="node-like-hop-by-hop-cut",
        ),
        pytest.param(
            b"HTTP/1.1 404 \r\nContent-Length: 9\r\n\r\nnot found",
            b"HTTP/1.1 404 \r\nContent-Length: 9\r\n\r\nnot found",
            id="empty-reason-404",
        ),
        pytest.param(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
            id="empty-body-503",
        ),
        pytest.param(
            ok(pattern_bytes(300_000)), ok(pattern_bytes(300_000)), id="body-over-several-reads"
        ),
    ],
)
def test_responses_identical_on_both_paths(setup, answer, want):
    """The same answer to requests 1 and 2 (fast path), 3 (bare LF: h11) and 4 (fast path):
    the client gets the same bytes each time."""
    s = setup(answer, answer, answer, answer)
    requests = [simple_get("/1"), simple_get("/2"), lf_only(simple_get("/3")), simple_get("/4")]
    got = [raw(s.client.request(r)) for r in requests]
    assert got[2] == want, f"h11:\n{got[2][:2000]!r}"
    for n in (0, 1, 3):
        assert got[n] == want, f"request {n + 1} (fast path):\n{got[n][:2000]!r}"
    assert s.exchanges.connections() == [0, 0, 0, 0]
    nothing_more(s.client)


# --- TLS legs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-fastpath"))


@pytest.mark.parametrize(
    ("client_tls", "backend_tls"),
    [(True, False), (False, True), (True, True)],
    ids=["tls-client", "tls-backend", "tls-both"],
)
def test_both_paths_alike_over_tls(backend, start_proxy, client, pki, client_tls, backend_tls):
    """Requests and answers byte for byte alike on both paths over TLS legs, and a 2 MiB
    fast-path body whose last records arrive with nothing after them."""
    big = pattern_bytes(2 * 1024 * 1024 + 7)
    exchanges, server = backend(
        *[BROWSER_RESPONSE] * 3,
        ok(big),
        ok(b"after"),
        ssl_context=pki.server_context() if backend_tls else None,
    )
    flags: list[str] = []
    url = None
    if client_tls:
        flags += ["--cert", str(pki.server.cert), "--key", str(pki.server.key)]
    if backend_tls:
        flags += ["--backend-ca", str(pki.ca_file)]
        url = f"https://localhost:{server.port}"
    proxy = start_proxy(server.port, *flags, backend=url)
    c = client(
        proxy.port, timeout=CLIENT_TIMEOUT, ssl_context=pki.client_context() if client_tls else None
    )
    target = "/tls?x=1"
    request = browser_get(target)
    got = [raw(c.request(r)) for r in (request, request, lf_only(request))]
    assert got == [BROWSER_RESPONSE_RELAYED] * 3
    resp = c.request(simple_get("/big"))
    assert (resp.status, len(resp.body)) == (200, len(big))
    assert resp.body == big
    assert c.request(simple_get("/after")).body == b"after"
    heads = exchanges.wait_heads(5)
    assert [conn for conn, _ in heads] == [0] * 5
    want = expected_default_head(target, proxy.port)
    if client_tls:
        want = want.replace(b"X-Forwarded-Proto: http\r\n", b"X-Forwarded-Proto: https\r\n")
    assert [head for _, head in heads[:3]] == [want] * 3


# --- 3. answers the fast path does not take ----------------------------------------------------


def split_head(sock: socket.socket) -> str:
    """A simple answer whose head arrives in two pieces (the fast path's first read of it has
    no complete head)."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-")
    time.sleep(0.05)
    sock.sendall(b"Length: 5\r\n\r\nsplit")
    return KEEP


def expect(status: int, body: bytes, *, absent: tuple[str, ...] = (), chunked: bool = False):
    def check(c: HttpClient) -> None:
        resp = c.read_response()
        assert (resp.status, resp.body, resp.chunked) == (status, body, chunked), resp
        for name in absent:
            assert resp.header(name) is None, resp.raw_head

    return check


def expect_informational(status: int, header: str) -> Callable[[HttpClient], None]:
    def check(c: HttpClient) -> None:
        info = c.read_response(allow_informational=True)
        assert info.status == status, info
        assert info.header(header) is not None, info.raw_head
        resp = c.read_response()
        assert (resp.status, resp.body) == (200, b"hints"), resp

    return check


def expect_head_only(status: int, **headers: bytes) -> Callable[[HttpClient], None]:
    def check(c: HttpClient) -> None:
        resp = c.read_response("HEAD")
        assert resp.status == status, resp
        for name, value in headers.items():
            assert resp.header(name.replace("_", "-")) == value, resp.raw_head

    return check


@dataclasses.dataclass
class Fallback:
    answer: Answer | bytes
    check: Callable[[HttpClient], None]
    third_on: int  # the backend connection request 3 comes on (1: a new one)
    method: str = "GET"


FALLBACKS = {
    "chunked": Fallback(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"7\r\nchunked\r\n5\r\n body\r\n0\r\n\r\n",
        expect(200, b"chunked body", chunked=True),
        third_on=0,
    ),
    "204": Fallback(
        b"HTTP/1.1 204 No Content\r\nX-Empty: yes\r\n\r\n",
        expect_head_only(204, X_Empty=b"yes"),
        third_on=0,
    ),
    "304-with-content-length": Fallback(
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
        expect_head_only(304, ETag=b'"v1"'),
        third_on=0,
    ),
    "100-continue-then-200": Fallback(
        b"HTTP/1.1 100 Continue\r\nX-Info: 1\r\n\r\n" + ok(b"hints"),
        expect_informational(100, "X-Info"),
        third_on=0,
    ),
    "103-early-hints-then-200": Fallback(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n" + ok(b"hints"),
        expect_informational(103, "Link"),
        third_on=0,
    ),
    "connection-close": Fallback(
        reply(ok(b"closing", b"Connection: close"), LINGER),
        expect(200, b"closing", absent=("Connection",)),
        third_on=1,
    ),
    "connection-close-among-tokens": Fallback(
        reply(ok(b"closing", b"Connection: keep-alive, close"), LINGER),
        expect(200, b"closing", absent=("Connection",)),
        third_on=1,
    ),
    "connection-names-a-header": Fallback(
        ok(b"hop", b"Connection: keep-alive, X-Hop", b"X-Hop: secret"),
        expect(200, b"hop", absent=("X-Hop", "Connection")),
        third_on=0,
    ),
    "http-1.0": Fallback(
        reply(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nold!", LINGER),
        expect(200, b"old!"),
        third_on=1,
    ),
    "close-delimited": Fallback(
        reply(b"HTTP/1.1 200 OK\r\nX-Framing: none\r\n\r\nuntil the end", CLOSE),
        expect(200, b"until the end", chunked=True),
        third_on=1,
    ),
    "two-equal-content-lengths": Fallback(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\ntwo",
        expect(200, b"two"),
        third_on=0,
    ),
    "obs-text-in-a-value": Fallback(
        ok(b"caf", b"X-Name: caf\xe9"), expect(200, b"caf"), third_on=0
    ),
    "head-in-two-pieces": Fallback(split_head, expect(200, b"split"), third_on=0),
    "HEAD-request": Fallback(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1234\r\n\r\n",
        expect_head_only(200, Content_Length=b"1234"),
        third_on=0,
        method="HEAD",
    ),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_answers_leaving_the_fast_path(setup, case):
    """Request 2 (a fast-path request) gets an answer the fast path hands to h11: the client
    gets it right, request 3 on the same client connection is answered too, and a backend
    connection that was to close is not used again."""
    fallback = FALLBACKS[case]
    s = setup(FIRST, fallback.answer, THIRD)
    assert s.client.request(simple_get("/1")).body == b"first"
    s.client.send(request_bytes(fallback.method, "/2", [("Host", "backend.test")]))
    fallback.check(s.client)
    resp = s.client.request(simple_get("/3"))
    assert (resp.status, resp.body) == (200, b"third"), resp
    assert s.exchanges.connections() == [0, 0, fallback.third_on]
    assert s.exchanges.targets() == [b"/1", b"/2", b"/3"]
    nothing_more(s.client)
    s.exchanges.check()


# --- 4. bytes after an answer: the backend connection is not reused ----------------------------

EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"
CHUNKED_SECOND = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\n"


def not_simple(target: str) -> bytes:
    """A request the fast path refuses (its Connection names a header): h11 forwards it, on
    the backend connection kept alive."""
    return request_bytes("GET", target, [("Host", "backend.test"), ("Connection", "X-Foo")])


@pytest.mark.parametrize(
    ("answers", "requests", "connections"),
    [
        pytest.param(
            [FIRST + EVIL, SECOND],
            [not_simple("/1"), simple_get("/2")],
            [0, 1],
            id="after-h11-answer-then-fast-path-request",
        ),
        pytest.param(
            [FIRST + EVIL, SECOND],
            [not_simple("/1"), not_simple("/2")],
            [0, 1],
            id="after-h11-answer-then-h11-request",
        ),
        pytest.param(
            [FIRST + EVIL, SECOND],
            [simple_get("/1"), simple_get("/2")],
            [0, 1],
            id="after-answer-to-request-1",
        ),
        pytest.param(
            [FIRST, SECOND + EVIL, THIRD],
            [simple_get("/1"), simple_get("/2"), simple_get("/3")],
            [0, 0, 1],
            id="after-fast-path-answer",
        ),
        pytest.param(
            [FIRST, SECOND + EVIL, THIRD],
            [simple_get("/1"), simple_get("/2"), not_simple("/3")],
            [0, 0, 1],
            id="after-fast-path-answer-then-h11-request",
        ),
        pytest.param(
            [FIRST, CHUNKED_SECOND + EVIL, THIRD],
            [simple_get("/1"), simple_get("/2"), simple_get("/3")],
            [0, 0, 1],
            id="after-chunked-answer-to-fast-path-request",
        ),
    ],
)
def test_bytes_after_an_answer_are_never_an_answer(setup, answers, requests, connections):
    """The backend sends a complete extra response right after its answer, in the same
    send(): the next request is answered by a new backend connection, never by those bytes."""
    s = setup(*answers)
    bodies = [s.client.request(r).body for r in requests]
    assert bodies == [b"first", b"second", b"third"][: len(requests)]
    assert s.exchanges.connections() == connections
    nothing_more(s.client)


# --- 5. a large body on the fast path ---------------------------------------------------------

BIG = 16 * 1024 * 1024
PIECE = 64 * 1024


class SmallWindowClient(HttpClient):
    """An HttpClient whose socket has a small receive buffer (set before connecting, so that
    the window stays small): a client that reads nothing holds up little in the kernel."""

    def __init__(self, port: int) -> None:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.settimeout(CLIENT_TIMEOUT)
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.buf = bytearray()


def big_answer(data: bytes, sent: list[int], small_buffer: bool = True) -> Answer:
    """`data` as a Content-Length body in 64 KiB writes (from a small send buffer, unless
    `small_buffer` is False); `sent[0]` counts the bytes written so far."""

    def answer(sock: socket.socket) -> str:
        if small_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIECE)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data))
        view = memoryview(data)
        for start in range(0, len(data), PIECE):
            sock.sendall(view[start : start + PIECE])
            sent[0] = min(start + PIECE, len(data))
        return KEEP

    return answer


def wait_stalled(sent: list[int]) -> int:
    """Once the backend's writes made no progress for 0.3 s: how far they got."""
    last, still = -1, 0
    deadline = time.monotonic() + 5
    while still < 3:
        assert time.monotonic() < deadline, "the backend's writes never stalled"
        time.sleep(0.1)
        now = sent[0]
        still = still + 1 if now == last else 0
        last = now
    return last


def read_body_slowly(
    c: HttpClient, data: bytes, pauses: int = 6, at_pause: Callable[[], None] | None = None
) -> None:
    """Read an answer whose body must be `data`, pausing `pauses` times on the way (and
    calling `at_pause` then)."""
    status, _, headers, _ = c.read_head()
    assert status == 200
    assert [v for k, v in headers if k.lower() == b"content-length"] == [b"%d" % len(data)]
    digest = hashlib.sha256(c.buf)
    got = len(c.buf)
    c.buf.clear()
    paused = 0
    while got < len(data):
        chunk = c.sock.recv(min(len(data) - got, 256 * 1024))
        assert chunk, f"EOF after {got} of {len(data)} bytes"
        digest.update(chunk)
        got += len(chunk)
        if paused < pauses and got > (paused + 1) * len(data) // (pauses + 2):
            paused += 1
            time.sleep(0.02)  # a slow reader now and then
            if at_pause is not None:
                at_pause()
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_large_body_slow_reader(setup):
    """16 MiB in 64 KiB writes to a fast-path request, read slowly. While the client reads
    nothing the proxy stops reading the backend: the backend's writes stall well before the
    end, and the proxy's memory does not grow. The body then arrives intact, and the
    connection serves the next request."""
    data = pattern_bytes(BIG)
    sent = [0]
    s = setup(FIRST, big_answer(data, sent), THIRD)
    with SmallWindowClient(s.proxy.port) as c:
        assert c.request(simple_get("/1")).body == b"first"
        rss_before = s.proxy.rss_kib()
        c.send(simple_get("/big"))
        stalled_at = wait_stalled(sent)
        grown = s.proxy.rss_kib() - rss_before
        assert stalled_at <= BIG * 3 // 4, f"{stalled_at} bytes left the backend, none were read"
        assert grown < 4 * 1024, f"the proxy grew by {grown} KiB while the client read nothing"
        read_body_slowly(c, data)
        assert c.request(simple_get("/3")).body == b"third"
        nothing_more(c)
    assert s.exchanges.connections() == [0, 0, 0]


# Before c5b70c2, with a TLS backend, Session._on_backend read again while the SSL object held
# bytes, checking only client.backlog; what it had relayed was only queued (pushed after the
# loop), so with a slow client the proxy read the backend's answer into memory (the h11 path
# too; older than the fast path).
def test_large_body_slow_reader_tls_backend(backend, start_proxy, pki):
    """As test_large_body_slow_reader, from a TLS backend. To be sure the kernel holds
    megabytes of the backend's bytes when the proxy reads them, the proxy is stopped
    (SIGSTOP) while the backend writes, and a first large answer has let the proxy's
    receive buffer grow."""
    warm = pattern_bytes(8 * 1024 * 1024)
    data = pattern_bytes(2 * BIG)
    sent = [0]
    gate = threading.Event()
    big = big_answer(data, sent, small_buffer=False)

    def big_after_gate(sock: socket.socket) -> str:
        gate.wait(CLIENT_TIMEOUT)
        return big(sock)

    exchanges, server = backend(ok(warm), big_after_gate, THIRD, ssl_context=pki.server_context())
    proxy = start_proxy(
        server.port, "--backend-ca", str(pki.ca_file), backend=f"https://localhost:{server.port}"
    )
    with SmallWindowClient(proxy.port) as c:
        assert c.request(simple_get("/warm")).body == warm
        c.send(simple_get("/big"))
        exchanges.wait_heads(2)
        rss_before = proxy.rss_kib()
        os.kill(proxy.pid, signal.SIGSTOP)
        try:
            gate.set()
            wait_stalled(sent)
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
        wait_stalled(sent)
        # Before c5b70c2 most runs failed here; the proxy's loop could stop early by chance (the
        # SSL object empty at the end of a read), so its memory is watched during the read too.
        grown = [proxy.rss_kib() - rss_before]
        read_body_slowly(c, data, 30, lambda: grown.append(proxy.rss_kib() - rss_before))
        assert max(grown) < 2 * 1024, f"the proxy grew by up to {max(grown)} KiB: {grown}"
        assert c.request(simple_get("/3")).body == b"third"
    assert exchanges.connections() == [0, 0, 0]


# --- 6. the backend closes in the middle of a fast-path body ----------------------------------


def test_backend_closing_mid_body_closes_the_client(setup):
    def half(sock: socket.socket) -> str:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        return CLOSE

    s = setup(FIRST, half, ok(b"after"))
    assert s.client.request(simple_get("/1")).body == b"first"
    mark = s.proxy.mark()
    s.client.send(simple_get("/2"))
    start = time.monotonic()
    kind, got = s.client.wait_closed(CLIENT_TIMEOUT)
    assert time.monotonic() - start < 2, "the client waited for the rest of the body"
    assert kind in ("eof", "reset")
    assert len(got) < 100000, "the client got a whole body"
    if got:
        assert got.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nxxx"), got[:200]
    s.proxy.wait_for_log(r"/2 HTTP/1\.1.*in the middle of the response", since=mark)
    with HttpClient(s.proxy.port, CLIENT_TIMEOUT) as other:
        assert other.request(simple_get("/after")).body == b"after"
    assert s.exchanges.connections() == [0, 0, 1]


# --- 7. the backend closes its kept-alive connection as request 2 arrives ----------------------


@pytest.mark.parametrize("how", [hang_up, reset], ids=["fin", "reset"])
def test_fast_path_request_retried_when_the_backend_closes(setup, how):
    s = setup(FIRST, how, SECOND, THIRD, flags=("--log-level", "debug"))
    assert s.client.request(simple_get("/1")).body == b"first"
    mark = s.proxy.mark()
    resp = s.client.request(simple_get("/2", "backend.test", ("Accept", "*/*")))
    assert (resp.status, resp.body) == (200, b"second"), resp
    s.proxy.wait_for_log(r"/2 HTTP/1\.1.*retrying on a new one", since=mark)
    assert s.client.request(simple_get("/3")).body == b"third"
    heads = s.exchanges.wait_heads(4)
    assert [conn for conn, _ in heads] == [0, 0, 1, 1]
    # The retry (written by h11) is the request the fast path wrote, byte for byte.
    assert heads[2][1] == heads[1][1]
    assert heads[1][1].startswith(b"GET /2 HTTP/1.1\r\nHost: backend.test\r\nAccept: */*\r\n")


# --- 8. no answer to a fast-path request: 504 ------------------------------------------------


def test_fast_path_request_gets_504_after_response_timeout(setup):
    def silent(sock: socket.socket) -> str:
        sock.recv(1)  # until the proxy gives up and closes
        return CLOSE

    s = setup(FIRST, silent, ok(b"after"), flags=("--response-timeout", "1"))
    assert s.client.request(simple_get("/1")).body == b"first"
    mark = s.proxy.mark()
    start = time.monotonic()
    resp = s.client.request(simple_get("/2"))
    elapsed = time.monotonic() - start
    assert resp.status == 504, resp
    assert 0.8 <= elapsed <= 3, f"504 after {elapsed:.2f} s with --response-timeout 1"
    assert s.client.wait_closed(CLIENT_TIMEOUT)[1] == b""
    with HttpClient(s.proxy.port, CLIENT_TIMEOUT) as other:
        assert other.request(simple_get("/after")).body == b"after"
    # The access line of /after comes after any line about /2.
    s.proxy.wait_for_log(r'"GET /after HTTP/1\.1"', since=mark)
    lines = s.proxy.logs_matching(r"(?<![\w.])504(?![\w.])|/2\b", mark)
    assert len(lines) == 1, s.proxy.log_text(mark)
    assert '"GET /2 HTTP/1.1" 504' in lines[0], lines[0]
    assert "--response-timeout" in lines[0], lines[0]


# --- 9. Location and Set-Cookie rewriting on the fast path -----------------------------------


def test_location_rewritten_on_the_fast_path(backend, start_proxy, client):
    exchanges, server = backend()
    b = f"127.0.0.1:{server.port}".encode()
    answer = (
        b"HTTP/1.1 302 Found\r\n"
        b"Location: http://" + b + b"/x?y=1\r\n"
        b"Content-Location: http://app.test:8080/same-host\r\n"
        b"Link: <http://" + b + b"/untouched>; rel=next\r\n"
        b"Set-Cookie: sid=1; Domain=backend.internal; Path=/app/x\r\n"
        b"Content-Length: 5\r\n\r\nmoved"
    )
    exchanges.answers += [reply(answer)] * 3
    proxy = start_proxy(
        server.port, "--cookie-domain", "backend.internal=app.test", "--cookie-path", "/app/=/"
    )
    c = client(proxy.port, timeout=CLIENT_TIMEOUT)
    requests = [simple_get(f"/{n}", "app.test:8080") for n in (1, 2, 3)]
    requests[2] = lf_only(requests[2])  # h11
    got = [c.request(r) for r in requests]
    for resp in got:
        assert resp.status == 302
        assert resp.header("location") == b"http://app.test:8080/x?y=1", resp.raw_head
        assert resp.header("content-location") == b"http://app.test:8080/same-host"
        assert resp.header("link") == b"<http://" + b + b"/untouched>; rel=next"
        assert resp.header("set-cookie") == b"sid=1; Domain=app.test; Path=/x"
    assert raw(got[1]) == raw(got[0])
    assert raw(got[2]) == raw(got[0])
    assert exchanges.connections() == [0, 0, 0]


# --- 10. pipelined requests after request 1 ---------------------------------------------------


def test_pipelined_requests_after_the_first(setup):
    """Requests 2 and 3 in one send(): answered in order (and the connection goes on)."""
    s = setup(FIRST, SECOND, THIRD, ok(b"fourth"))
    assert s.client.request(simple_get("/1")).body == b"first"
    s.client.send(simple_get("/2") + simple_get("/3"))
    assert s.client.read_response().body == b"second"
    assert s.client.read_response().body == b"third"
    assert s.client.request(simple_get("/4")).body == b"fourth"
    assert s.exchanges.targets() == [b"/1", b"/2", b"/3", b"/4"]
    assert s.exchanges.connections() == [0, 0, 0, 0]
    nothing_more(s.client)


# Answers to request 2 for the tests of the client side: one the fast path relays, and one
# it hands to h11 (with what the client sent meanwhile).
SECOND_ANSWERS = [
    pytest.param(SECOND, id="simple-answer"),
    pytest.param(CHUNKED_SECOND, id="chunked-answer"),
]


@pytest.mark.parametrize("answer", SECOND_ANSWERS)
@pytest.mark.parametrize("later", [simple_get, not_simple], ids=["simple", "not-simple"])
def test_requests_sent_while_fast_path_request_2_waits(setup, answer, later):
    """Requests 3 and 4 arrive, each on its own, while request 2 (fast path) waits for its
    answer: neither is lost nor answered out of turn."""
    gate, after_gate = held_answer(answer, KEEP)

    s = setup(FIRST, after_gate, THIRD, ok(b"fourth"))
    try:
        assert s.client.request(simple_get("/1")).body == b"first"
        s.client.send(simple_get("/2"))
        s.exchanges.wait_heads(2)
        s.client.send(later("/3"))
        time.sleep(0.05)  # apart: two reads (nothing to wait on)
        s.client.send(later("/4"))
        time.sleep(0.05)
    finally:
        gate.set()
    assert s.client.read_response().body == b"second"
    assert s.client.read_response().body == b"third"
    assert s.client.read_response().body == b"fourth"
    assert s.exchanges.targets() == [b"/1", b"/2", b"/3", b"/4"]
    assert s.exchanges.connections() == [0, 0, 0, 0]
    nothing_more(s.client)


# --- the client side of a fast-path exchange ---------------------------------------------------


def held_answer(answer: bytes, then: str) -> tuple[threading.Event, Answer]:
    """A backend step that holds `answer` until the returned gate is set, then sends it and
    does `then` (KEEP, LINGER, ...)."""
    gate = threading.Event()

    def after_gate(sock: socket.socket) -> str:
        gate.wait(CLIENT_TIMEOUT)
        sock.sendall(answer)
        return then

    return gate, after_gate


@pytest.mark.parametrize("answer", SECOND_ANSWERS)
def test_client_half_close_after_a_fast_path_request(setup, answer):
    """A client that sends request 2 and then shuts its side down still gets the answer, then
    the proxy closes the connection (and the backend connection). While the answer is
    awaited the proxy does not spin on the client's end of stream."""
    gate, after_gate = held_answer(answer, LINGER)

    s = setup(FIRST, after_gate)
    try:
        assert s.client.request(simple_get("/1")).body == b"first"
        s.client.send(simple_get("/2"))
        s.exchanges.wait_heads(2)
        s.client.sock.shutdown(socket.SHUT_WR)
        busy = s.proxy.cpu_seconds()
        time.sleep(0.5)  # the answer is awaited (no event to wait for: nothing must happen)
        busy = s.proxy.cpu_seconds() - busy
        assert busy < 0.2, f"the proxy used {busy:.2f} s of CPU in 0.5 s of waiting"
    finally:
        gate.set()
    assert s.client.read_response().body == b"second"
    assert s.client.wait_closed(CLIENT_TIMEOUT) == ("eof", b"")
    s.exchanges.wait_closed(1)


@pytest.mark.parametrize("answer", SECOND_ANSWERS)
def test_client_gone_while_a_fast_path_request_waits(setup, answer):
    """The client closes while request 2 waits: the answer goes nowhere, the backend
    connection is closed (not kept for anyone), and the proxy serves the next client."""
    gate, after_gate = held_answer(answer, LINGER)

    s = setup(FIRST, after_gate, ok(b"next"))
    try:
        assert s.client.request(simple_get("/1")).body == b"first"
        s.client.send(simple_get("/2"))
        s.exchanges.wait_heads(2)
        s.client.close()
    finally:
        gate.set()
    with HttpClient(s.proxy.port, CLIENT_TIMEOUT) as other:
        assert other.request(simple_get("/next")).body == b"next"
    assert s.exchanges.connections() == [0, 0, 1]
    s.exchanges.wait_closed(1)


# --- WebSocket handshakes (on the fast path since bf00ff9) --------------------------------------

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
WS_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"X-BaCkEnD: MiXeD\r\n"
    b"\r\n"
)
GREETING = b"greeting from the backend|"


def tunnel(gate: threading.Event | None = None) -> Answer:
    """A 101 followed at once (same send) by GREETING, then every byte echoed until EOF; with
    `gate`, the 101 waits for it."""

    def answer(sock: socket.socket) -> str:
        if gate is not None:
            gate.wait(CLIENT_TIMEOUT)
        sock.sendall(WS_101 + GREETING)
        while data := sock.recv(65536):
            sock.sendall(data)
        return CLOSE

    return answer


def read_exactly(c: HttpClient, want: bytes) -> None:
    got = recv_exact(c.sock, len(want), c.buf)
    assert got == want


def test_websocket_handshakes_alike_on_both_paths(backend, start_proxy, client):
    """A WebSocket handshake as request 1 (fast path: the backend connection is opened for it),
    as request 2 after a plain one (fast path, kept-alive backend connection), with bare LF
    line ends (h11), and with client bytes sent before the 101 arrived: the backend gets the
    same handshake, the client the same 101, then the tunnel moves bytes both ways in order."""
    gate = threading.Event()
    exchanges, server = backend(tunnel(), FIRST, tunnel(), tunnel(), tunnel(gate))
    proxy = start_proxy(server.port)
    handshake = websocket_request("/ws?room=1", "App.Test", WS_KEY)
    heads_101 = []

    def upgraded(c: HttpClient) -> None:
        status, _, _, head = c.read_head()
        assert status == 101, head
        heads_101.append(head)
        read_exactly(c, GREETING)
        c.send(b"ping|")
        read_exactly(c, b"ping|")

    first = client(proxy.port, timeout=CLIENT_TIMEOUT)
    first.send(handshake)
    upgraded(first)
    second = client(proxy.port, timeout=CLIENT_TIMEOUT)
    assert second.request(simple_get("/1")).body == b"first"
    second.send(handshake)
    upgraded(second)
    third = client(proxy.port, timeout=CLIENT_TIMEOUT)
    third.send(lf_only(handshake))
    upgraded(third)
    early = client(proxy.port, timeout=CLIENT_TIMEOUT)
    try:
        early.send(handshake)
        exchanges.wait_heads(5)
        early.send(b"early|")  # before the 101: held, then the tunnel's first bytes
        time.sleep(0.05)  # the proxy reads it (nothing to wait on)
    finally:
        gate.set()
    status, _, _, head = early.read_head()
    assert status == 101, head
    heads_101.append(head)
    read_exactly(early, GREETING + b"early|")
    # Connection: Upgrade dropped with the other hop-by-hop headers, `Connection: upgrade` added.
    want_101 = (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"X-BaCkEnD: MiXeD\r\n"
        b"Connection: upgrade\r\n"
        b"\r\n"
    )
    assert heads_101[2] == want_101, heads_101[2]  # h11's
    assert heads_101 == [want_101] * 4, heads_101
    heads = exchanges.wait_heads(5)
    assert [conn for conn, _ in heads] == [0, 1, 1, 2, 3]
    handshakes = [head for n, (_, head) in enumerate(heads) if n != 1]
    assert handshakes == [handshakes[2]] * 4, handshakes  # [2] is h11's
    assert b"\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n" in handshakes[2]


# --- another route's backend, no route ---------------------------------------------------------


def test_request_for_another_backend_leaves_the_fast_path(backend, launch, client):
    """The fast path only uses the backend connection the route names: request 2 for another
    route goes to that route's backend; an unrouted request gets 404 and the next one, for
    the route before it, reuses its connection."""
    a, backend_a = backend(ok(b"a1"), ok(b"a2"))
    b, backend_b = backend(ok(b"b1"), ok(b"b2"))
    proxy = launch(
        "--route",
        f"/a/=http://127.0.0.1:{backend_a.port}",
        "--route",
        f"/b/=http://127.0.0.1:{backend_b.port}/v2/",
    )
    c = client(proxy.port, timeout=CLIENT_TIMEOUT)
    assert c.request(simple_get("/a/1")).body == b"a1"
    assert c.request(simple_get("/b/2")).body == b"b1"
    assert c.request(simple_get("/nowhere")).status == 404
    assert c.request(simple_get("/b/4")).body == b"b2"
    assert c.request(simple_get("/a/5")).body == b"a2"
    assert a.targets() == [b"/a/1", b"/a/5"]
    assert b.targets() == [b"/v2/2", b"/v2/4"]
    assert a.connections() == [0, 1]
    assert b.connections() == [0, 0]


# --- 11. drain while a fast-path request waits --------------------------------------------------


def exit_code(proxy: ProxyProcess, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while (code := proxy.proc.poll()) is None:
        assert time.monotonic() < deadline, f"the proxy still runs:\n{proxy.log_text()}"
        time.sleep(0.02)
    return code


def test_drain_while_a_fast_path_request_waits(setup):
    gate, after_gate = held_answer(SECOND, KEEP)

    s = setup(FIRST, after_gate)
    try:
        assert s.client.request(simple_get("/1")).body == b"first"
        s.client.send(simple_get("/2"))
        s.exchanges.wait_heads(2)
        mark = s.proxy.mark()
        s.proxy.proc.send_signal(signal.SIGTERM)
        s.proxy.wait_for_log(r"SIGTERM.*draining", since=mark)
    finally:
        gate.set()
    resp = s.client.read_response()
    assert (resp.status, resp.body) == (200, b"second"), resp
    assert [v.lower() for v in resp.values("connection")] == [b"close"], resp.raw_head
    assert s.client.wait_closed(CLIENT_TIMEOUT) == ("eof", b"")
    s.client.close()
    assert exit_code(s.proxy) == 0
    s.proxy.wait_for_log(r"\bdrained\b", since=mark)


def test_drain_while_a_fast_path_body_streams(setup):
    """The head went out (without `Connection: close`) before the signal: the body is
    completed, then the connection closes and the proxy exits."""
    gate = threading.Event()
    body = pattern_bytes(100_000)

    def in_two_parts(sock: socket.socket) -> str:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
        gate.wait(CLIENT_TIMEOUT)
        sock.sendall(body[1000:])
        return KEEP

    s = setup(FIRST, in_two_parts)
    try:
        assert s.client.request(simple_get("/1")).body == b"first"
        s.client.send(simple_get("/2"))
        status, _, _, _ = s.client.read_head()
        assert status == 200
        mark = s.proxy.mark()
        s.proxy.proc.send_signal(signal.SIGTERM)
        s.proxy.wait_for_log(r"SIGTERM.*draining", since=mark)
    finally:
        gate.set()
    kind, rest = s.client.wait_closed(CLIENT_TIMEOUT)
    assert kind == "eof"
    assert rest == body, (len(rest), len(body))
    s.client.close()
    assert exit_code(s.proxy) == 0


# --- the access log and the metrics count a fast-path exchange as an h11 one -------------------


def test_access_lines_and_metrics_alike_on_both_paths(setup):
    body = b"twelve bytes"
    s = setup(
        ok(body),
        ok(body),
        ok(body),
        flags=("--access-log-format", "json", "--admin-listen", "127.0.0.1:0"),
    )
    mark = s.proxy.mark()
    request = simple_get(
        "/same?q=1", "app.test", ("Referer", "http://app.test/"), ("User-Agent", "ua/1")
    )
    for sent in (request, request, lf_only(request)):  # fast, fast, h11
        assert s.client.request(sent).body == body
    lines = s.proxy.wait_for_logs(r'"type":"request"', 3, since=mark)
    records = [json.loads(line[line.index("{") :]) for line in lines]
    for record in records:
        assert record.pop("time") > 0
        assert record.pop("duration") >= 0
    assert records[1] == records[0], lines
    assert records[2] == records[0], lines
    assert (records[0]["status"], records[0]["bytes"]) == (200, len(body))
    assert (records[0]["referer"], records[0]["user_agent"]) == ("http://app.test/", "ua/1")
    assert s.proxy.admin_port is not None
    metrics = Metrics(s.proxy.admin_port)
    assert metrics("rawproxy_requests_total", code_class="2xx") == 3
    assert metrics("rawproxy_bytes_total", direction="backend_to_client") == 3 * len(body)
    assert metrics("rawproxy_request_head_latency_seconds_count") == 3
    assert metrics("rawproxy_backend_connect_latency_seconds_count") == 1
