"""The fast path's parsers against h11: whatever parse_simple_request / parse_simple_response
accept, h11 must accept with the same meaning (method, target, header items, status, reason,
body length), and write_head must write the bytes h11 would. A head they refuse goes to h11,
so refusing too much costs speed only; accepting what h11 reads differently would be a
request the proxy frames one way and the backend another. Sans-IO: no sockets."""

from __future__ import annotations

import pathlib

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rawproxy.http import (
    REWRITTEN_HEADERS,
    ClientSide,
    SimpleRequest,
    SimpleResponse,
    backend_request_headers,
    client_response_headers,
    decide_upgrade,
    decided_upgrade,
    forwarded_headers,
    header_lines,
    parse_simple_request,
    parse_simple_response,
    plain_request_head,
    plain_request_headers,
    plain_switch_head,
    without_cuts,
    write_head,
)

HANDSHAKES = pathlib.Path(__file__).resolve().parent / "data" / "handshakes"
LIMIT = 64 * 1024

# -- what h11 makes of the same bytes --------------------------------------------------------


def h11_request(data: bytes) -> tuple[h11.Request, list[object]] | None:
    """h11's reading of `data` as a request and the events up to its end, or None when h11
    refuses it or needs more bytes."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    try:
        request = conn.next_event()
        if not isinstance(request, h11.Request):
            return None
        rest = [conn.next_event()]
    except h11.RemoteProtocolError:
        return None
    return request, rest


def h11_response(method: bytes, data: bytes) -> list[object] | None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "b")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    events: list[object] = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return events
            events.append(event)
            if isinstance(event, h11.EndOfMessage):
                return events
    except h11.RemoteProtocolError:
        return None


def h11_writes_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    out = conn.send(h11.Request(method=method, target=target, headers=headers))
    assert out is not None
    return out


def h11_writes_response(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
    conn.next_event()
    conn.next_event()
    out = conn.send(h11.Response(status_code=status, reason=reason, headers=headers))
    assert out is not None
    return out


def check_request(data: bytes) -> SimpleRequest | None:
    """The property: an accepted request is h11's request, bodiless, written back alike."""
    simple = parse_simple_request(data, LIMIT)
    if simple is None:
        return None
    seen = h11_request(data)
    assert seen is not None, f"fast path accepted what h11 refuses: {data!r}"
    request, rest = seen
    assert request.method == simple.method
    assert request.target == simple.target
    assert request.http_version == b"1.1"
    assert list(request.headers.raw_items()) == simple.raw
    assert isinstance(rest[0], h11.EndOfMessage), "a simple request has no body"
    # The session decides on the Connection and Upgrade headers alone: the same decision.
    assert decide_upgrade(simple.upgrade_fields) == decide_upgrade(simple.raw)
    start = b"%s %s HTTP/1.1\r\n" % (simple.method, simple.target)
    assert write_head(start, simple.raw) == h11_writes_request(
        simple.method, simple.target, simple.raw
    )
    if simple.plain:
        check_plain_request(data, simple)
    return simple


CLIENTS = [
    ClientSide("192.0.2.7", "http", 80, trusted=False),
    ClientSide("2001:db8::1", "https", 443, trusted=True),
]


def check_plain_request(data: bytes, simple: SimpleRequest) -> None:
    """A `plain` request's head for the backend, the client's lines, our forwarded ones and
    for an upgrade our Connection and Upgrade, is byte for byte what backend_request_headers
    and write_head make of it, in every forwarded mode, for trusted and untrusted clients,
    under any target a route maps to."""
    assert simple.raw[0][0].lower() == b"host"
    decision = decide_upgrade(simple.raw)
    # The session decides on the Connection and Upgrade lines alone, and remembers.
    assert decided_upgrade(simple.upgrade_fields) == decision
    assert decided_upgrade(simple.upgrade_fields) == decision
    for client in CLIENTS:
        for mode in ("x-forwarded", "rfc7239", "both", "none"):
            expected = backend_request_headers(
                simple.raw, decision, client, forwarded=mode, default_host=b"b"
            )
            added = forwarded_headers(client, simple.raw[0][1], mode)
            upgrade = decision.upgrade
            assert plain_request_headers(simple, added, upgrade) == expected
            for target in (simple.target, b"/mapped/x?y"):
                start = b"%s %s HTTP/1.1\r\n" % (simple.method, target)
                head = plain_request_head(data, simple, target, header_lines(added), upgrade)
                assert head == write_head(start, expected)


def check_response(data: bytes, body: bytes = b"") -> bool:
    response = parse_simple_response(data)
    if response is None:
        return False
    events = h11_response(b"GET", data[: response.head_size] + body)
    assert events is not None, f"fast path accepted a response h11 refuses: {data!r}"
    head = events[0]
    assert isinstance(head, h11.Response)
    assert head.status_code == response.status
    assert head.reason == response.reason
    assert list(head.headers.raw_items()) == response.raw
    # h11 frames the body by the same Content-Length.
    got = b"".join(bytes(e.data) for e in events[1:] if isinstance(e, h11.Data))
    assert got == body[: response.content_length]
    if len(body) >= response.content_length:
        assert isinstance(events[-1], h11.EndOfMessage)
    start = b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason)
    assert write_head(start, response.raw) == h11_writes_response(
        response.status, response.reason, response.raw
    )
    if response.plain:
        # Sent as the backend wrote it: what the h11 path's rules would write, and nothing a
        # ResponseRewrite could change.
        assert without_cuts(data, 0, response.head_size, response.cuts) == write_head(
            start, client_response_headers(response.raw, False)
        )
        assert REWRITTEN_HEADERS.isdisjoint(name.lower() for name, _ in response.raw)
    return True


# -- examples: what must and must not take the fast path -------------------------------------

SIMPLE_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nhost: a:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, keep-alive\r\n\r\n",
    b"DELETE /r HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:a\r\nX-Empty:\r\nX-Spaces:  a  b\t \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Empty: \r\nX-Spaces: a  b\t c\r\n\r\n",
    b"GET /x.y/a.b HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
    b"GET /%E2%9C%93/%2Fx HTTP/1.1\r\nHost: a\r\n\r\n",  # encoded, no dot segment
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
]

NOT_SIMPLE_REQUESTS = [
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",  # HTTP/1.0: keep-alive rules differ
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Hosts
    b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: a\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # leading empty line
    b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n",  # obs-fold
    b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n",  # obs-text
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX : 1\r\n\r\n",  # space before colon
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n",  # a body
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 00\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",  # h11 switches protocols on CONNECT
    b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # pipelined
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nX",  # bytes after the head
    b"GET / HTTP/1.1\r\nHost: a\r\n",  # incomplete
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"G\xc3T / HTTP/1.1\r\nHost: a\r\n\r\n",
    # the target and Host as resolve_request reads them: h11's path resolves or refuses
    b"GET http://a/p HTTP/1.1\r\nHost: a\r\n\r\n",  # absolute-form: its authority is Host
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a/../b HTTP/1.1\r\nHost: a\r\n\r\n",  # dot segments
    b"GET /a/%2E%2e/b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a/%2e./b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",  # no host[:port]
    b"GET / HTTP/1.1\r\nHost: a/b@c\r\n\r\n",
]


@pytest.mark.parametrize("data", SIMPLE_REQUESTS)
def test_simple_requests_are_h11s(data: bytes) -> None:
    assert check_request(data) is not None


@pytest.mark.parametrize("data", NOT_SIMPLE_REQUESTS)
def test_not_simple_requests_go_to_h11(data: bytes) -> None:
    assert parse_simple_request(data, LIMIT) is None


def test_a_head_over_the_limit_goes_to_h11() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 100 + b"\r\n\r\n"
    assert parse_simple_request(data, len(data)) is not None
    assert parse_simple_request(data, len(data) - 1) is None


def test_a_head_with_too_many_fields_goes_to_h11() -> None:
    """Past --max-header-count (default 100) the fast path takes no head; h11's path answers
    431. Up to it, the fast path reads it as h11 does."""
    lines = [b"GET / HTTP/1.1", b"Host: a"] + [b"X-F%d: v" % i for i in range(100)]
    hundred = b"\r\n".join(lines[:-1]) + b"\r\n\r\n"
    simple = check_request(hundred)
    assert simple is not None
    assert len(simple.raw) == 100
    assert parse_simple_request(b"\r\n".join(lines) + b"\r\n\r\n", LIMIT) is None
    assert parse_simple_request(hundred, LIMIT, 100) is not None
    assert parse_simple_request(hundred, LIMIT, 99) is None
    spaced = hundred.replace(b": v", b":  v")  # the second, spaced reading: counted alike
    assert parse_simple_request(spaced, LIMIT, 100) is not None
    assert parse_simple_request(spaced, LIMIT, 99) is None


def test_browser_handshakes_take_the_fast_path() -> None:
    """The captured Chromium and Firefox handshakes are simple requests, read as h11 reads
    them, and decide_upgrade (the one rule, on either path) finds them upgrades."""
    files = sorted(HANDSHAKES.glob("*.txt"))
    assert files
    seen = 0
    for path in files:
        text = path.read_text().strip("\n")
        if not text.startswith("GET"):
            continue  # the directory's README
        text = text.format(
            path="/ws", host="app.test", origin="http://app.test", key="dGhlIHNhbXBsZSBub25jZQ=="
        )
        head = text.replace("\n", "\r\n").encode() + b"\r\n\r\n"
        simple = check_request(head)
        assert simple is not None, path.name
        assert simple.upgrade_fields
        assert simple.plain, path.name  # the backend gets the browser's lines as they came
        assert decide_upgrade(simple.raw).upgrade == b"websocket", path.name
        seen += 1
    assert seen >= 2


def test_a_browser_get_takes_the_fast_path() -> None:
    data = (
        b"GET /tests/42 HTTP/1.1\r\nHost: openqa.example\r\nConnection: keep-alive\r\n"
        b'sec-ch-ua: "Chromium";v="156", "Not)A;Brand";v="99"\r\nsec-ch-ua-mobile: ?0\r\n'
        b"Upgrade-Insecure-Requests: 1\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n"
        b"Accept: text/html,application/xhtml+xml,*/*;q=0.8\r\nSec-Fetch-Site: none\r\n"
        b"Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-US,en;q=0.9\r\n"
        b"Cookie: mojolicious=eyJhIjoxfQ--abc; other=1\r\n\r\n"
    )
    simple = check_request(data)
    assert simple is not None
    assert simple.header(b"cookie") == b"mojolicious=eyJhIjoxfQ--abc; other=1"
    assert simple.header(b"referer") is None


PLAIN_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    # Hop-by-hop lines are cut out of the head.
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: 5\r\nTE: trailers\r\nX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\nProxy-Connection: keep-alive\r\n\r\n",
    b"GET /x?y=1 HTTP/1.1\r\nhost: a:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n",
    b"DELETE /r HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-Forwarded: 1\r\n\r\n",
    # Upgrades and would-be upgrades: Connection and Upgrade are cut, ours follow if any.
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: upgrade\r\n"
    b"Upgrade: websocket\r\nUpgrade: foo/2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c, websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: \r\n\r\n",
]
NOT_PLAIN_REQUESTS = [
    b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: a\r\n\r\n",  # h11 writes Host first
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-prefix: /p\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=1.2.3.4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Real-IP: 1.2.3.4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection:upgrade\r\nUpgrade: websocket\r\n\r\n",
    # Spacing other than `Name: value`: simple (h11's rules, without h11), never plain.
    b"GET / HTTP/1.1\r\nHost:a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX:  1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX:\t1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: 1 \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX:\r\n\r\n",
]


@pytest.mark.parametrize("data", PLAIN_REQUESTS)
def test_plain_requests_go_as_they_came(data: bytes) -> None:
    simple = check_request(data)
    assert simple is not None
    assert simple.plain


@pytest.mark.parametrize("data", NOT_PLAIN_REQUESTS)
def test_requests_the_proxy_changes_are_not_plain(data: bytes) -> None:
    simple = check_request(data)
    assert simple is not None
    assert not simple.plain


def test_a_browser_get_without_connection_is_plain() -> None:
    """What Chromium sends over HTTP/1.1 minus `Connection: keep-alive` (which the proxy
    removes, so that head is not plain): the usual request of a browser behind a proxy that
    does not send it, and of HTTP/1.1 load tools."""
    data = (
        b"GET /tests/42 HTTP/1.1\r\nHost: openqa.example\r\n"
        b'sec-ch-ua: "Chromium";v="156"\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n'
        b"Accept: text/html,*/*;q=0.8\r\nCookie: mojolicious=abc; other=1\r\n\r\n"
    )
    simple = check_request(data)
    assert simple is not None
    assert simple.plain


PLAIN_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nKeep-Alive: timeout=5\r\nX: y\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTrailer: X\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 \r\nx-CUSTOM: Value with  spaces\r\ncontent-length: 0\r\n\r\n",
]
NOT_PLAIN_RESPONSES = [
    b"HTTP/1.1 302 Found\r\nLocation: http://b/x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Domain=b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nHost: b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length:1\r\n\r\n",  # other spacing: simple, not plain
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nX:  a\r\n\r\n",
]


@pytest.mark.parametrize("data", PLAIN_RESPONSES)
def test_plain_responses_go_as_they_came(data: bytes) -> None:
    assert check_response(data, b"0123456789abcdef")
    response = parse_simple_response(data)
    assert response is not None
    assert response.plain


@pytest.mark.parametrize("data", NOT_PLAIN_RESPONSES)
def test_responses_the_proxy_changes_are_not_plain(data: bytes) -> None:
    assert check_response(data, b"0123456789abcdef")
    response = parse_simple_response(data)
    assert response is not None
    assert not response.plain


SIMPLE_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n",
    b"HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: http://b/x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
    b"Content-Length: 1\r\n\r\n",
    b"HTTP/1.1 503 Service Unavailable \t\r\nContent-Length: 2\r\n\r\n",
]

NOT_SIMPLE_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\n",  # read to close
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n",  # no reason: h11 takes it, we need not
    b"HTTP/1.1 200 OK\nContent-Length: 1\n\n",
    b"HTTP/1.1 200 OK\r\nX: \xff\r\nContent-Length: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n",
    b"HTTP/1.1 600 Odd\r\nContent-Length: 1\r\n\r\n",
]


@pytest.mark.parametrize("data", SIMPLE_RESPONSES)
def test_simple_responses_are_h11s(data: bytes) -> None:
    assert check_response(data, b"0123456789abcdef")


@pytest.mark.parametrize("data", NOT_SIMPLE_RESPONSES)
def test_not_simple_responses_go_to_h11(data: bytes) -> None:
    assert parse_simple_response(data + b"xyz") is None


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


@pytest.mark.parametrize("after", [b"", b"\x81\x05hello", b"HTTP/1.1 200 OK\r\n\r\n"])
def test_a_101_to_an_upgrade_is_simple_and_h11s(after: bytes) -> None:
    response = parse_simple_response(SWITCH + after, upgrade=True)
    assert response is not None
    assert response.status == 101
    assert response.head_size == len(SWITCH)
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(
            method="GET",
            target="/",
            headers=[("Host", "b"), ("Connection", "upgrade"), ("Upgrade", "websocket")],
        )
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(SWITCH + after)
    event = conn.next_event()
    assert isinstance(event, h11.InformationalResponse)
    assert event.status_code == 101
    assert event.reason == response.reason
    assert list(event.headers.raw_items()) == response.raw
    assert conn.trailing_data[0] == after  # the tunnel's first bytes, on both readings
    start = b"HTTP/1.1 101 %s\r\n" % response.reason
    assert write_head(start, response.raw) == SWITCH
    assert response.plain
    assert plain_switch_head(SWITCH + after, response) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nConnection: upgrade\r\n\r\n"
    )


def check_switch(data: bytes) -> SimpleResponse | None:
    """The property for a 101 to an upgrade: accepted means h11 reads the same head, and a
    `plain` one goes to the client as client_response_headers and write_head make it."""
    response = parse_simple_response(data, upgrade=True)
    if response is None:
        return None
    conn = h11.Connection(h11.CLIENT)
    upgrade = [("Host", "b"), ("Connection", "upgrade"), ("Upgrade", "websocket")]
    conn.send(h11.Request(method="GET", target="/", headers=upgrade))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        head = conn.next_event()
    except h11.RemoteProtocolError:
        raise AssertionError(f"fast path accepted a 101 h11 refuses: {data!r}") from None
    assert isinstance(head, h11.InformationalResponse)
    assert conn.trailing_data[0] == data[response.head_size :]
    assert head.status_code == 101
    assert head.reason == response.reason
    assert list(head.headers.raw_items()) == response.raw
    start = b"HTTP/1.1 101 %s\r\n" % response.reason
    if response.plain:
        assert plain_switch_head(data, response) == write_head(
            start, client_response_headers(response.raw, True)
        )
    return response


PLAIN_SWITCHES = [
    SWITCH,
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nKeep-Alive: timeout=5\r\nX: y\r\n\r\n",
    b"HTTP/1.1 101 \r\nupgrade: WebSocket\r\nconnection: upgrade\r\nDate: today\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
]
NOT_PLAIN_SWITCHES = [
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, X\r\nX: 1\r\n"
    b"Upgrade: websocket\r\n\r\n",  # X is nominated
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nHost: b\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade:websocket\r\nConnection: upgrade\r\n\r\n",
]


NOT_SIMPLE_SWITCHES = [
    # A 101 has no body: framing headers on one are h11's to judge (it merges or refuses
    # repeated ones).
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nContent-Length: 0\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nContent-Length:0\r\n\r\n",
]


@pytest.mark.parametrize("data", NOT_SIMPLE_SWITCHES)
def test_101s_with_framing_headers_go_to_h11(data: bytes) -> None:
    assert parse_simple_response(data, upgrade=True) is None


@pytest.mark.parametrize("data", PLAIN_SWITCHES)
def test_plain_101s_go_as_they_came(data: bytes) -> None:
    response = check_switch(data)
    assert response is not None
    assert response.plain


@pytest.mark.parametrize("data", NOT_PLAIN_SWITCHES)
def test_101s_the_proxy_changes_are_not_plain(data: bytes) -> None:
    response = check_switch(data)
    assert response is not None
    assert not response.plain


def test_a_101_to_anything_else_goes_to_h11() -> None:
    assert parse_simple_response(SWITCH) is None
    assert parse_simple_response(SWITCH.replace(b"101", b"100"), upgrade=True) is None


def test_response_body_and_what_follows_are_not_head() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\n"
    response = parse_simple_response(data)
    assert response is not None
    assert data[response.head_size :].startswith(b"hello")
    assert response.content_length == 5


# -- the property over generated heads -------------------------------------------------------

# Pieces chosen to sit on both sides of the subset's border: mostly valid, so that many
# heads are accepted and compared, with a defect here and there.
VALID_NAMES = [
    b"Accept",
    b"user-agent",
    b"X-Forwarded-For",
    b"Cookie",
    b"Location",
    b"Content-Length",
    b"content-length",
    b"Connection",
    b"Keep-Alive",
    b"Set-Cookie",
    b"X-A",
    b"x!#$%&'*+.^_`|~",
]


def mostly(
    valid: st.SearchStrategy[bytes], *odd: st.SearchStrategy[bytes]
) -> st.SearchStrategy[bytes]:
    """`valid` nine times in ten, else one of `odd`."""
    return st.integers(0, 9).flatmap(lambda i: valid if i < 9 else st.one_of(*odd))


NAME = mostly(
    st.sampled_from(VALID_NAMES),
    st.sampled_from([b"Transfer-Encoding", b"Upgrade", b"Expect", b"Host"]),
    st.sampled_from([b"X A", b"X:A", b"", b"X\x7f", b"\xc3\xa9", b" X", b"X(", b"\tX"]),
    st.binary(min_size=1, max_size=4),
)
VALID_VALUES = [
    b"",
    b"0",
    b"1",
    b"keep-alive",
    b"Keep-Alive, keep-alive",
    b"*/*",
    b"a b",
    b"a  \t b",
    b"text/html; q=0.9",
    b"x=1; Path=/; Domain=b",
    b"http://b:1/p?q#f",
]
VALUE = mostly(
    st.sampled_from(VALID_VALUES),
    st.sampled_from(
        [b"00", b"-1", b"1, 1", b"12345678901234567890", b"close", b"upgrade", b"chunked"]
    ),
    st.sampled_from([b"\xff", b"a\x00", b"a\rb", b"a\nb", b"a\r\n b", b"\x7f", b"a\x0bb"]),
    st.binary(min_size=0, max_size=6),
)
SEP = st.sampled_from([b": "] * 30 + [b":", b":\t", b":  ", b" :", b"", b"::"])
AFTER = st.sampled_from([b""] * 20 + [b" ", b"\t", b" \t"])
EOL = st.sampled_from([b"\r\n"] * 40 + [b"\n", b"\r", b" \r\n", b"\r\r\n", b"\r\n "])
HEADER = st.tuples(NAME, SEP, VALUE, AFTER, EOL).map(b"".join)
HEADERS = st.lists(HEADER, max_size=6).map(b"".join)
HOST_FIRST = st.sampled_from(
    [b"Host: a\r\n"] * 30 + [b"", b"host:a:1\r\n", b"Host: a\r\nHost: a\r\n"]
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    method = draw(
        st.sampled_from(
            [b"GET"] * 12
            + [b"DELETE"] * 6
            + [b"OPTIONS"] * 4
            + [b"POST", b"HEAD", b"M-X", b"G T", b"", b"\xc3"]
        )
    )
    target = draw(
        st.sampled_from(
            [b"/"] * 30
            + [b"/a?b"] * 10
            + [b"/a?b", b"*", b"http://h/p", b"/ x", b"", b"/\x7f", b"/\xff"]
        )
    )
    version = draw(st.sampled_from([b"HTTP/1.1"] * 30 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]))
    line = method + b" " + target + b" " + version + draw(EOL)
    end = draw(st.sampled_from([b"\r\n"] * 30 + [b"\n", b"\r\nX", b"", b"\r\n\r\n"]))
    host_last = draw(st.booleans())
    host = draw(HOST_FIRST)
    headers = draw(HEADERS)
    return line + (headers + host if host_last else host + headers) + end


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads())
@example(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n")
def test_accepted_requests_mean_the_same_to_h11(data: bytes) -> None:
    check_request(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_as_a_request(data: bytes) -> None:
    check_request(data)
    check_request(b"GET / HTTP/1.1\r\nHost: a\r\n" + data + b"\r\n\r\n")


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    status = draw(
        st.sampled_from(
            [b"200"] * 30 + [b"404"] * 5 + [b"204", b"304", b"101", b"100", b"404", b"999", b"20"]
        )
    )
    reason = draw(st.sampled_from([b" OK"] * 20 + [b" ", b"", b" Not Found", b" \xff", b" a\tb "]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 30 + [b"HTTP/1.0"]))
    line = version + b" " + status + reason + draw(EOL)
    length = draw(
        st.sampled_from(
            [b"Content-Length: 3\r\n"] * 20
            + [b"", b"content-length: 0\r\n", b"Content-Length: 12\r\n"]
        )
    )
    end = draw(st.sampled_from([b"\r\n"] * 30 + [b"\n", b""]))
    return line + length + draw(HEADERS) + end


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response_heads(), st.sampled_from([b"", b"abc", b"abcdefgh", b"a" * 100]))
def test_accepted_responses_mean_the_same_to_h11(data: bytes, body: bytes) -> None:
    check_response(data, body)


@given(st.lists(st.tuples(NAME, VALUE), max_size=5))
def test_write_head_is_h11s_for_any_valid_headers(pairs: list[tuple[bytes, bytes]]) -> None:
    """Whatever h11 would write for a header list, write_head writes byte for byte (h11
    itself validates; lists it refuses are skipped)."""
    headers = [(b"Host", b"a"), *pairs]
    lengths = [value for name, value in headers if name.lower() == b"content-length"]
    if len(lengths) > 1 or any(not value.isdigit() for value in lengths):
        # h11 merges repeated values and lists ("1, 1" is written "1"); the simple parsers
        # let through one Content-Length at most, of digits only.
        return
    try:
        expected = h11_writes_request(b"GET", b"/", headers)
    except h11.LocalProtocolError:
        return
    assert write_head(b"GET / HTTP/1.1\r\n", headers) == expected


# Heads around an upgrade: Connection and Upgrade lines in every combination a client or a
# backend writes (and some nobody should), mixed with the lines the proxy drops or rewrites.
UPGRADE_LINES = st.sampled_from(
    [
        b"Connection: Upgrade\r\n",
        b"Connection: upgrade\r\n",
        b"Connection: keep-alive, Upgrade\r\n",
        b"Connection: keep-alive\r\n",
        b"Connection: Upgrade, HTTP2-Settings\r\n",
        b"Connection: close\r\n",
        b"Connection: \r\n",
        b"Connection:Upgrade\r\n",
        b"Upgrade: websocket\r\n",
        b"Upgrade: WebSocket\r\n",
        b"Upgrade: h2c\r\n",
        b"Upgrade: h2c, websocket\r\n",
        b"Upgrade: foo/1, bar\r\n",
        b"Upgrade: \r\n",
        b"Keep-Alive: 5\r\n",
        b"Proxy-Connection: keep-alive\r\n",
        b"TE: trailers\r\n",
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        b"Sec-WebSocket-Version: 13\r\n",
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n",
        b"Origin: http://a\r\n",
        b"X-Forwarded-For: 1.2.3.4\r\n",
        b"Forwarded: for=1.2.3.4\r\n",
        b"Host: b\r\n",
        b"Content-Length: 0\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"X:  spaced \r\n",
    ]
)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(UPGRADE_LINES, max_size=7), st.booleans())
def test_upgrade_requests_mean_the_same_to_h11(lines: list[bytes], host_first: bool) -> None:
    body = b"".join(lines)
    head = b"Host: a\r\n" + body if host_first else body + b"Host: a\r\n"
    check_request(b"GET /ws HTTP/1.1\r\n" + head + b"\r\n")


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(UPGRADE_LINES, max_size=7),
    st.sampled_from([b"Switching Protocols", b"", b"OK then"]),
    st.sampled_from([b"", b"\x81\x05hello"]),
)
def test_101s_mean_the_same_to_h11(lines: list[bytes], reason: bytes, after: bytes) -> None:
    check_switch(b"HTTP/1.1 101 " + reason + b"\r\n" + b"".join(lines) + b"\r\n" + after)


@pytest.mark.parametrize(
    "line",
    [
        b"X-Big: " + b"a" * 60_000 + b"\x00",  # a token run that is no header name
        b"a" * 60_000,  # a line without a colon
        b"X-Big:   " + b"a " * 30_000 + b"\x00",  # the spaced reader's fallback
    ],
    ids=["value-then-nul", "no-colon", "spaced"],
)
def test_a_long_line_that_is_no_header_is_refused_in_linear_time(line: bytes) -> None:
    """findall() tries every position of a head: a header-line pattern that could start
    anywhere read a 60 KB run of token characters from each of its bytes (20 s of CPU, the
    whole proxy stalled, for one request). It may only start after a newline. The bound is
    a thousand times what the parsers take, and a hundredth of what the flaw took."""
    import time

    request = b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + line + b"\r\n\r\n"
    started = time.process_time()
    assert parse_simple_request(request, 1 << 20) is None
    assert parse_simple_response(response) is None
    assert time.process_time() - started < 0.2
