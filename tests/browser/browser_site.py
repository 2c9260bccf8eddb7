"""The web app the browser tests load through the proxy, and the data its page exchanges.

`BrowserSite` is a real HTTP/1.1 + WebSocket origin on loopback (plain, or TLS with a
server-side context), built on `peers.Server` (one daemon thread per connection, all joined
by `stop()`). It serves `page.html` and records everything it receives:

    GET  /start?run=R     302 to /page?run=R (the browser's first navigation is a redirect)
    GET  /page?run=R      the test page, with the test's configuration (JSON) filled in
    POST /echo            200, the request body back
    GET  /redirect        302 to /redirected?from=fetch
    GET  /redirected      200, "GET /redirected?from=fetch"
    POST /result          the page's report (JSON), 204
    POST /form            the page's form submission (a POST navigation): an HTML page whose
                          script POSTs the token it carries to /done
    POST /done            204 (proof that the browser loaded and ran the POST's answer)
    GET  /ws/...          a WebSocket (any path under /ws/): the first offered subprotocol is
                          accepted, permessage-deflate too when the path is in `deflate_paths`;
                          every message is echoed whole, and recorded as (kind, size, sha256)
    anything else         404

The raw head of every WebSocket handshake is kept byte for byte (`WsSeen.head`): browsers
open a new connection for each WebSocket and the proxy a new backend connection for each
client connection, so a handshake is always the first request on its connection. An upgrade
on a reused connection is recorded as an error.

The messages the page sends are made from one pseudo-random block that the page and
`expected_message` both compute (xorshift32), so the test knows what must arrive without
trusting the page.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
from peers import Header, Server, header_tokens, header_values, parse_head, recv_until
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

PAGE = Path(__file__).resolve().parent / "page.html"
MiB = 1024 * 1024

# --- the messages (the page computes the same; see page.html) ------------------------------

BLOCK_SIZE = 65521  # prime, so repeats never line up with frame or buffer sizes
XORSHIFT_SEED = 2463534242
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789.,;é€✓😀"


@functools.cache
def _block() -> bytes:
    out = bytearray(BLOCK_SIZE)
    x = XORSHIFT_SEED
    for i in range(BLOCK_SIZE):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x & 0xFF
    return bytes(out)


def binary_message(size: int, seed: int) -> bytes:
    """`size` bytes: the block read cyclically from offset `seed`."""
    block = _block()
    start = seed % BLOCK_SIZE
    rotated = block[start:] + block[:start]
    return (rotated * (size // BLOCK_SIZE + 1))[:size]


def text_message(size: int, seed: int) -> str:
    """A string of exactly `size` UTF-8 bytes: characters of ALPHABET chosen by the block from
    offset `seed` ("a" where the chosen one would not fit)."""
    block = _block()
    alphabet = list(ALPHABET)
    widths = [len(ch.encode()) for ch in alphabet]
    out: list[str] = []
    left, i = size, seed
    while left > 0:
        k = block[i % BLOCK_SIZE] % len(alphabet)
        ch, width = (alphabet[k], widths[k]) if widths[k] <= left else ("a", 1)
        out.append(ch)
        left -= width
        i += 1
    return "".join(out)


@dataclasses.dataclass(frozen=True)
class MessageSpec:
    kind: str  # "text" | "binary"
    size: int  # bytes on the wire (UTF-8 for text)
    seed: int

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def expected_message(spec: MessageSpec) -> tuple[str, int, str]:
    """(kind, size, sha256) of the message the page sends for `spec`."""
    if spec.kind == "text":
        data = text_message(spec.size, spec.seed).encode()
    else:
        data = binary_message(spec.size, spec.seed)
    assert len(data) == spec.size
    return spec.kind, spec.size, hashlib.sha256(data).hexdigest()


# --- what the site records -------------------------------------------------------------------


@dataclasses.dataclass
class SeenRequest:
    conn_id: int
    method: str
    target: str
    headers: list[Header]
    body: bytes = b""
    status: int | None = None  # what the site answered

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    def values(self, name: str) -> list[bytes]:
        return header_values(self.headers, name)


@dataclasses.dataclass
class WsSeen:
    conn_id: int
    target: str
    head: bytes  # the handshake, byte for byte as received
    headers: list[Header]
    subprotocol: str | None = None  # what the site accepted
    deflate: bool = False
    messages: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    close_code: int | None = None

    def values(self, name: str) -> list[bytes]:
        return header_values(self.headers, name)


# --- the site -----------------------------------------------------------------------------------


class BrowserSite(Server):
    name = "browser-site"

    def __init__(
        self,
        page_config: dict[str, Any] | None = None,
        deflate_paths: tuple[str, ...] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.page_config = page_config or {}
        self.deflate_paths = deflate_paths
        self.requests: list[SeenRequest] = []
        self.websockets: list[WsSeen] = []
        self.reports: list[dict[str, Any]] = []
        self.tokens: list[str] = []  # issued with each /form answer
        self.done: list[str] = []  # bodies POSTed to /done
        self.changed = threading.Condition()
        super().__init__(ssl_context=ssl_context)

    # --- what tests read (all under `lock`, copies) ----------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": list(self.requests),
                "websockets": list(self.websockets),
                "reports": list(self.reports),
                "tokens": list(self.tokens),
                "done": list(self.done),
                "errors": list(self.errors),
            }

    def wait_for(
        self,
        predicate: Callable[[BrowserSite], bool],
        timeout: float,
        still_running: Callable[[], str | None] = lambda: None,
        poll: float = 0.5,
    ) -> bool:
        """Wait until `predicate(self)` holds (True) or `timeout` passes (False). Every `poll`
        seconds `still_running()` is asked whether to go on: a string it returns (why not) is
        raised as RuntimeError (e.g. the browser exited)."""
        end = time.monotonic() + timeout
        with self.changed:
            while True:
                if predicate(self):
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                if (why := still_running()) is not None:
                    raise RuntimeError(why)
                self.changed.wait(min(left, poll))

    def _record(self, fn: Callable[[], None]) -> None:
        with self.changed:
            with self.lock:
                fn()
            self.changed.notify_all()

    # --- serving ----------------------------------------------------------------------------

    def handle(self, conn: socket.socket, conn_id: int) -> None:
        buf = bytearray()
        try:
            head = recv_until(conn, buf, b"\r\n\r\n")
        except EOFError:
            return  # a connection opened in advance and closed unused (browsers do this)
        _, headers = parse_head(head)
        if b"websocket" in header_tokens(headers, "upgrade"):
            self._websocket(conn, conn_id, head, buf)
        else:
            self._http(conn, conn_id, head + bytes(buf))

    def _http(self, conn: socket.socket, conn_id: int, data: bytes) -> None:
        h = h11.Connection(h11.SERVER)
        h.receive_data(data)
        while True:
            event = self._next_event(conn, h)
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise RuntimeError(f"unexpected {event!r}")
            req = SeenRequest(
                conn_id,
                event.method.decode(),
                event.target.decode(),
                list(event.headers.raw_items()),
            )
            if b"websocket" in header_tokens(req.headers, "upgrade"):
                raise RuntimeError(f"a WebSocket handshake on a reused connection: {req}")
            body = bytearray()
            while not isinstance(event := self._next_event(conn, h), h11.EndOfMessage):
                if not isinstance(event, h11.Data):
                    raise RuntimeError(f"request body cut short: {event!r}")
                body += event.data
            req.body = bytes(body)
            status, headers, content = self._route(req)
            req.status = status
            self._record(lambda req=req: self.requests.append(req))
            headers = [
                *headers,
                ("Content-Length", str(len(content))),
                ("Cache-Control", "no-store"),
            ]
            out = h.send(h11.Response(status_code=status, headers=headers))
            if content:
                out += h.send(h11.Data(data=content))
            out += h.send(h11.EndOfMessage())
            conn.sendall(out)
            if h.our_state is h11.MUST_CLOSE:
                return
            h.start_next_cycle()

    @staticmethod
    def _next_event(conn: socket.socket, h: h11.Connection) -> Any:
        while True:
            event = h.next_event()
            if event is not h11.NEED_DATA:
                return event
            h.receive_data(conn.recv(1 << 20))

    def _route(self, req: SeenRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        path, query = req.path, urllib.parse.urlsplit(req.target).query
        if (req.method, path) == ("GET", "/start"):
            return 302, [("Location", "/page" + (f"?{query}" if query else ""))], b""
        if (req.method, path) == ("GET", "/page"):
            config = json.dumps(self.page_config).replace("</", "<\\/")
            html = PAGE.read_text(encoding="utf-8").replace("@CONFIG@", config)
            return 200, [("Content-Type", "text/html; charset=utf-8")], html.encode()
        if (req.method, path) == ("POST", "/echo"):
            return 200, [("Content-Type", "application/octet-stream")], req.body
        if (req.method, path) == ("GET", "/redirect"):
            return 302, [("Location", "/redirected?from=fetch")], b""
        if (req.method, path) == ("GET", "/redirected"):
            return 200, [("Content-Type", "text/plain")], f"GET {req.target}".encode()
        if (req.method, path) == ("POST", "/result"):
            report = json.loads(req.body)
            self._record(lambda: self.reports.append(report))
            return 204, [], b""
        if (req.method, path) == ("POST", "/form"):
            token = secrets.token_hex(8)
            self._record(lambda: self.tokens.append(token))
            html = (
                '<!doctype html><html lang="en"><meta charset="utf-8"><title>posted</title>'
                '<link rel="icon" href="data:,">'
                f"<p>form received</p><script>fetch('/done', {{method: 'POST', "
                f"headers: {{'Content-Type': 'text/plain'}}, body: '{token}'}});</script></html>"
            )
            return 200, [("Content-Type", "text/html; charset=utf-8")], html.encode()
        if (req.method, path) == ("POST", "/done"):
            text = req.body.decode()
            self._record(lambda: self.done.append(text))
            return 204, [], b""
        return 404, [("Content-Type", "text/plain")], b"not here"

    def _websocket(self, conn: socket.socket, conn_id: int, head: bytes, buf: bytearray) -> None:
        start, headers = parse_head(head)
        target = start.split(b" ")[1].decode()
        seen = WsSeen(conn_id, target, head, headers)
        self._record(lambda: self.websockets.append(seen))
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(head + bytes(buf))
        parts: list[Any] = []
        while True:
            for event in ws.events():
                if isinstance(event, Request):
                    protocol = event.subprotocols[0] if event.subprotocols else None
                    path = urllib.parse.urlsplit(target).path
                    extensions = [PerMessageDeflate()] if path in self.deflate_paths else []
                    conn.sendall(ws.send(AcceptConnection(protocol, extensions)))
                    with self.lock:
                        seen.subprotocol, seen.deflate = protocol, bool(extensions)
                elif isinstance(event, Message):
                    parts.append(event.data)
                    if event.message_finished:
                        self._echo(conn, ws, seen, event, parts)
                        parts = []
                elif isinstance(event, Ping):
                    conn.sendall(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self._record(lambda code=event.code: setattr(seen, "close_code", code))
                    if ws.state.name != "CLOSED":
                        conn.sendall(ws.send(event.response()))
                    return
                else:
                    raise RuntimeError(f"unexpected WebSocket event {event!r}")
            data = conn.recv(1 << 20)
            if not data:
                raise RuntimeError(f"{target}: the connection ended without a close frame")
            ws.receive_data(data)

    def _echo(
        self, conn: socket.socket, ws: WSConnection, seen: WsSeen, last: Message[Any], parts: list
    ) -> None:
        if isinstance(last, TextMessage):
            text = "".join(parts)
            raw = text.encode()
            reply: Message[Any] = TextMessage(data=text)
        else:
            raw = b"".join(parts)
            reply = BytesMessage(data=raw)
        kind = "text" if isinstance(last, TextMessage) else "binary"
        entry = (kind, len(raw), hashlib.sha256(raw).hexdigest())
        self._record(lambda: seen.messages.append(entry))
        conn.sendall(ws.send(reply))
