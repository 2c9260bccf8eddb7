"""Upgrades through the proxy: real browser handshakes replayed byte for byte, other clients'
header sets and spellings, and the requests that must NOT become tunnels."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from peers import (
    HttpClient,
    WsClient,
    header_tokens,
    header_values,
    parse_head,
    request_bytes,
    simple_get,
    ws_accept,
    ws_key,
)
from wsproto.events import CloseConnection

HANDSHAKES = Path(__file__).resolve().parent / "data" / "handshakes"
PATH = "/chat?room=1"
HOP_BY_HOP = {b"connection", b"upgrade", b"keep-alive", b"proxy-connection", b"te"}
FORWARDED = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port"}


def load_capture(name: str, **subs: str) -> bytes:
    """A captured handshake with its placeholders filled in and CRLF line ends."""
    text = (HANDSHAKES / name).read_text(encoding="utf-8")
    for key, value in subs.items():
        text = text.replace("{" + key + "}", value)
    assert "{" not in text, f"unfilled placeholder in {name}"
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fill(headers: list[tuple[str, str]], **subs: str) -> bytes:
    filled = [(k, v.format(**subs)) for k, v in headers]
    return request_bytes("GET", subs["path"], filled)


def handshake_subs(port: int) -> dict[str, str]:
    return {
        "path": PATH,
        "host": f"127.0.0.1:{port}",
        "origin": f"http://127.0.0.1:{port}",
        "key": ws_key(),
    }


def open_websocket(
    c: HttpClient, head: bytes, key: str
) -> tuple[list[tuple[bytes, bytes]], WsClient]:
    """Send `head`, expect a valid 101, return (response headers, WebSocket on the socket)."""
    c.send(head)
    status, _, headers, raw = c.read_head()
    assert status == 101, raw
    assert header_values(headers, "sec-websocket-accept") == [ws_accept(key)], raw
    assert header_tokens(headers, "upgrade") == [b"websocket"], raw
    assert b"upgrade" in header_tokens(headers, "connection"), raw
    leftover = bytes(c.buf)
    c.buf.clear()
    return headers, WsClient(c.sock, leftover)


def assert_echoes(ws: WsClient) -> None:
    for message in ["hello", "ünïcödé ✓", b"\x00\x01\xffbinary", "", os.urandom(300_000)]:
        ws.send(message)
        assert ws.recv() == message
    closing = ws.close()
    assert isinstance(closing, CloseConnection)
    assert closing.code == 1000


def assert_backend_saw(head_at_backend: bytes, sent: bytes, upgrade: bytes, host: str) -> None:
    """The backend got the client's request line and end-to-end headers unchanged (names, case,
    values), `Connection: upgrade`, the given Upgrade value, and the X-Forwarded-* headers."""
    start, got = parse_head(head_at_backend)
    sent_start, sent_headers = parse_head(sent)
    assert start == sent_start
    assert header_values(got, "upgrade") == [upgrade]
    assert [v.lower() for v in header_values(got, "connection")] == [b"upgrade"]
    dropped = HOP_BY_HOP | set(header_tokens(sent_headers, "connection"))
    e2e_sent = sorted((k, v) for k, v in sent_headers if k.lower() not in dropped)
    e2e_got = sorted((k, v) for k, v in got if k.lower() not in dropped | FORWARDED)
    assert e2e_got == e2e_sent
    assert header_values(got, "x-forwarded-for") == [b"127.0.0.1"]
    assert header_values(got, "x-forwarded-proto") == [b"http"]
    assert header_values(got, "x-forwarded-host") == [host.encode()]


@pytest.fixture
def ws_proxy(start_proxy, ws_backend):
    return start_proxy(ws_backend.port)


# --- real browsers, byte for byte -----------------------------------------------------------


@pytest.mark.parametrize(
    "capture", ["chromium-156.txt", "firefox-esr-153.txt", "firefox-128-legacy.txt"]
)
def test_captured_browser_handshake(ws_proxy, ws_backend, client, capture):
    subs = handshake_subs(ws_proxy.port)
    head = load_capture(capture, **subs)
    c = client(ws_proxy.port)
    headers, ws = open_websocket(c, head, subs["key"])
    assert header_values(headers, "sec-websocket-protocol") == [b"chat.v1"]
    [at_backend] = ws_backend.wait_handshakes(1)
    assert_backend_saw(at_backend, head, b"websocket", subs["host"])
    assert_echoes(ws)


# --- other clients and spellings ------------------------------------------------------------

SAFARI = [
    ("Host", "{host}"),
    ("Accept", "*/*"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Origin", "{origin}"),
    ("Pragma", "no-cache"),
    ("Cache-Control", "no-cache"),
    ("Accept-Language", "en-GB,en;q=0.9"),
    (
        "User-Agent",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/18.3 Safari/605.1.15",
    ),
    ("Sec-WebSocket-Key", "{key}"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ("Accept-Encoding", "gzip, deflate"),
]
CURL = [
    ("Host", "{host}"),
    ("User-Agent", "curl/8.14.1"),
    ("Accept", "*/*"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "{key}"),
    ("Connection", "Upgrade"),
]
NODE_WS = [
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "{key}"),
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ("Host", "{host}"),
]
PYTHON_WEBSOCKETS = [
    ("Host", "{host}"),
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "{key}"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
    ("User-Agent", "Python/3.11 websockets/17.4"),
]
MINIMAL = [("Host", "{host}"), ("Sec-WebSocket-Key", "{key}"), ("Sec-WebSocket-Version", "13")]

VARIANTS = {
    "safari": (SAFARI, b"websocket"),
    "curl": (CURL, b"websocket"),
    "node-ws": (NODE_WS, b"websocket"),
    "python-websockets": (PYTHON_WEBSOCKETS, b"websocket"),
    "connection-http2-settings": (
        [
            *MINIMAL,
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("Upgrade", "websocket"),
        ],
        b"websocket",
    ),
    "connection-split-over-two-lines": (
        [
            *MINIMAL,
            ("Connection", "keep-alive"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
        ],
        b"websocket",
    ),
    "upgrade-mixed-case": (
        [*MINIMAL, ("Connection", "Upgrade"), ("upgrade", "WebSocket")],
        b"WebSocket",
    ),
    "all-caps-names-and-token": (
        [*MINIMAL, ("CONNECTION", "keep-alive,UPGRADE"), ("UPGRADE", "websocket")],
        b"websocket",
    ),
    "lower-case-everything": (
        [*MINIMAL, ("connection", "upgrade"), ("upgrade", "websocket")],
        b"websocket",
    ),
    "token-with-spaces": (
        [*MINIMAL, ("Connection", "keep-alive ,  Upgrade"), ("Upgrade", "websocket")],
        b"websocket",
    ),
    "token-first-of-three": (
        [
            *MINIMAL,
            ("Connection", "Upgrade, keep-alive, X-Whatever"),
            ("X-Whatever", "hop"),
            ("Upgrade", "websocket"),
        ],
        b"websocket",
    ),
    "h2c-offered-too": (
        [*MINIMAL, ("Connection", "Upgrade"), ("Upgrade", "h2c, websocket")],
        b"websocket",
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_handshake_variant(ws_proxy, ws_backend, client, variant):
    headers, upgrade = VARIANTS[variant]
    subs = handshake_subs(ws_proxy.port)
    head = fill(headers, **subs)
    c = client(ws_proxy.port)
    _, ws = open_websocket(c, head, subs["key"])
    [at_backend] = ws_backend.wait_handshakes(1)
    assert_backend_saw(at_backend, head, upgrade, subs["host"])
    assert_echoes(ws)


def test_many_websockets_at_once(ws_proxy, ws_backend, client):
    """The single-threaded proxy keeps many tunnels going, interleaved."""
    sockets = []
    for _ in range(16):
        subs = handshake_subs(ws_proxy.port)
        c = client(ws_proxy.port)
        _, ws = open_websocket(c, fill(CURL, **subs), subs["key"])
        sockets.append(ws)
    for round_ in range(3):
        for i, ws in enumerate(sockets):
            ws.send(f"ws {i} round {round_}")
        for i, ws in enumerate(sockets):
            assert ws.recv() == f"ws {i} round {round_}"
    for ws in sockets:
        ws.close()
    assert ws_backend.accepts == 16


# --- not upgrades ---------------------------------------------------------------------------

WS_HEADERS = [
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
    ("Origin", "http://b.test"),
]


def assert_plain_request(req, sent_upgrade: bool = True) -> None:
    assert req.values("upgrade") == [], f"Upgrade reached the backend: {req.headers}"
    assert b"upgrade" not in header_tokens(req.headers, "connection"), req.headers
    assert req.values("http2-settings") == []
    assert req.values("x-forwarded-for") == [b"127.0.0.1"]


@pytest.mark.parametrize(
    "connection",
    [None, "keep-alive", "Upgraded", "X-Upgrade"],
    ids=["no-connection-header", "keep-alive", "similar-token", "similar-token-2"],
)
def test_upgrade_without_connection_token_is_stripped(proxy, http_backend, client, connection):
    headers = [("Host", "b.test"), ("Upgrade", "websocket"), *WS_HEADERS]
    if connection:
        headers.append(("Connection", connection))
    c = client(proxy.port)
    resp = c.request(request_bytes("GET", "/plain", headers))
    assert (resp.status, resp.body) == (200, b"GET /plain")
    [req] = http_backend.wait_for_requests(1)
    assert_plain_request(req)
    assert req.values("sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    resp = c.request(simple_get("/next"))
    assert (resp.status, resp.body) == (200, b"GET /next")


@pytest.mark.parametrize("offer", ["h2c", "H2C", "h2c, h2"])
def test_h2c_upgrade_is_not_an_upgrade(proxy, http_backend, client, offer):
    c = client(proxy.port)
    resp = c.request(
        request_bytes(
            "GET",
            "/h2c",
            [
                ("Host", "b.test"),
                ("Connection", "Upgrade, HTTP2-Settings"),
                ("Upgrade", offer),
                ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ],
        )
    )
    assert (resp.status, resp.body) == (200, b"GET /h2c")
    resp = c.request(simple_get("/next"))
    assert (resp.status, resp.body) == (200, b"GET /next")
    first, _ = http_backend.wait_for_requests(2)
    assert_plain_request(first)


def test_connection_upgrade_without_upgrade_header(proxy, http_backend, client):
    c = client(proxy.port)
    resp = c.request(
        request_bytes("GET", "/no-upgrade-header", [("Host", "b.test"), ("Connection", "Upgrade")])
    )
    assert resp.status == 200
    resp = c.request(simple_get("/next"))
    assert (resp.status, resp.body) == (200, b"GET /next")
    first, _ = http_backend.wait_for_requests(2)
    assert_plain_request(first)


def test_an_http10_upgrade_request_is_not_an_upgrade(proxy, http_backend, client):
    """A server ignores Upgrade in an HTTP/1.0 request (RFC 9110 7.8) and must not answer one
    with a 101 (RFC 9110 15.2): the proxy, which forwards every request as HTTP/1.1, sent it
    on with its own `Connection: upgrade`, so a backend switched, and the HTTP/1.0 client
    got a 101 and a tunnel."""
    head = request_bytes(
        "GET",
        "/ws10",
        [("Host", "b.test"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), *WS_HEADERS],
    )
    c = client(proxy.port)
    resp = c.request(head.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1))
    assert (resp.status, resp.body) == (200, b"GET /ws10")
    [req] = http_backend.wait_for_requests(1)
    assert_plain_request(req)


@pytest.mark.parametrize("status", [200, 426])
@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_refused_upgrade_stays_http(proxy, http_backend, client, status, pipelined):
    """The backend answers an upgrade request with a normal response: that response reaches
    the client and the connection goes on as HTTP, parsed by the proxy (which the backend sees
    by the X-Forwarded-For the proxy adds), including bytes sent right after the request."""
    upgrade_request = request_bytes(
        "GET",
        f"/refuse/{status}",
        [("Host", "b.test"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), *WS_HEADERS],
    )
    follow_up = simple_get("/after-refusal")
    c = client(proxy.port)
    c.send(upgrade_request + (follow_up if pipelined else b""))
    resp = c.read_response()
    assert (resp.status, resp.body) == (status, b"upgrade refused")
    if not pipelined:
        c.send(follow_up)
    resp = c.read_response()
    assert (resp.status, resp.body) == (200, b"GET /after-refusal")
    refused, after = http_backend.wait_for_requests(2)
    assert refused.values("upgrade") == [b"websocket"]
    assert after.target == b"/after-refusal"
    assert after.values("x-forwarded-for") == [b"127.0.0.1"], "not parsed by the proxy"


@pytest.mark.parametrize("path", ["fast", "h11"])
def test_debug_log_names_the_request_and_the_deciding_headers(
    start_proxy, ws_backend, client, path
):
    """`--log-level debug` says, for each request with upgrade headers, which request it was
    and the header values that decided, on the fast path as on the h11 path (bare LF line
    ends, which h11 reads and the fast path leaves to it)."""
    proxy = start_proxy(ws_backend.port, "--log-level", "debug")
    subs = handshake_subs(proxy.port)
    head = load_capture("firefox-128-legacy.txt", **subs)
    if path == "h11":
        head = head.replace(b"\r\n", b"\n")
    c = client(proxy.port)
    c.send(head)
    _, _, _, raw = c.read_head()
    assert raw.startswith(b"HTTP/1.1 101 "), raw
    line = proxy.wait_for_log("upgrade decision")
    assert '"GET /chat?room=1 HTTP/1.1" upgrade decision: upgrade to websocket' in line, line
    assert "(Connection: 'keep-alive, Upgrade'; Upgrade: 'websocket')" in line, line
