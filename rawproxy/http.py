"""The HTTP rules of the proxy, without I/O.

Everything here takes header lists or bytes and returns values: which request is an upgrade,
which headers go to the backend and back to the client, which framing is refused, and the
bytes of the error responses the proxy writes itself. The I/O layer (session.py) asks these
functions and never decides policy on its own.

Header lists are h11's: `(name, value)` pairs of bytes. Functions that produce headers for
the other side take the raw (case-preserving) items so that end-to-end headers travel exactly
as the client or backend wrote them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from rawproxy.config import Route

Header = tuple[bytes, bytes]
# A Host, the forwarded headers that follow a `plain` request with it, and their lines.
ForwardedLines = tuple[bytes, list[Header], bytes]

# Headers that describe one hop and never travel on, whatever Connection says (RFC 9110 7.6.1),
# plus Proxy-Connection, which old clients send and which has no meaning to a backend. Trailer
# is not one (RFC 2616 listed it, RFC 9110 does not): it announces the trailer fields, which
# travel on, and HAProxy keeps it too.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"})
# Headers that a Connection token must never remove: they decide framing and routing, and
# removing them on a client's say-so is how a proxy and a backend come to disagree on where a
# message ends.
NEVER_NOMINATED = frozenset({b"content-length", b"transfer-encoding", b"host"})
# Upgrade protocols we refuse to tunnel: cleartext HTTP/2 behind our back would let a client
# send requests the proxy never sees (HAProxy, Envoy and Traefik drop them too).
REFUSED_UPGRADE_PROTOCOLS = frozenset({b"h2c", b"h2"})

# Methods whose effect is the same however often a request is repeated (RFC 9110 9.2.2): only
# these may be sent again when a kept-alive backend connection fails under them.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

FORWARDED_FOR = b"x-forwarded-for"
FORWARDED_PROTO = b"x-forwarded-proto"
FORWARDED_HOST = b"x-forwarded-host"
FORWARDED_PORT = b"x-forwarded-port"
FORWARDED = b"forwarded"
FORWARDED_HEADERS = frozenset(
    {FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST, FORWARDED_PORT, FORWARDED}
)
_CANONICAL = {
    FORWARDED_FOR: b"X-Forwarded-For",
    FORWARDED_PROTO: b"X-Forwarded-Proto",
    FORWARDED_HOST: b"X-Forwarded-Host",
    FORWARDED_PORT: b"X-Forwarded-Port",
}


def comma_tokens(headers: Iterable[Header], name: bytes) -> list[bytes]:
    """Every comma-separated element of every `name` header line, trimmed, empty ones dropped.

    `name` must be lower case; header names are compared case-insensitively.
    """
    tokens: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            tokens += _split_tokens(value)
    return tokens


@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeDecision:
    """Whether a request asks to switch protocols, and why (for the debug log).

    `upgrade` is the Upgrade value to send to the backend (refused protocols removed) when
    the request is an upgrade, else None. `reason` is written only when asked for (the debug
    log): `why`, and the Connection and Upgrade values it was decided on.
    """

    upgrade: bytes | None
    why: str
    considered: bool = True  # False for requests with neither Upgrade nor the Connection token
    connection: tuple[bytes, ...] | None = None
    upgrade_lines: tuple[bytes, ...] = ()

    @property
    def is_upgrade(self) -> bool:
        return self.upgrade is not None

    @property
    def reason(self) -> str:
        if self.connection is None:
            return self.why
        shown = f"Connection: {_show(self.connection)}; Upgrade: {_show(self.upgrade_lines)}"
        return f"{self.why} ({shown})"


def decide_upgrade(headers: Iterable[Header], http_version: bytes = b"1.1") -> UpgradeDecision:
    """The upgrade rule, in one place.

    A request is an upgrade when any Connection header line lists the token `upgrade`
    (comma-separated, trimmed, any case) and an Upgrade header is present. The protocols h2c
    and h2 are removed from Upgrade; if none is left, it is not an upgrade. Nothing else
    matters: not the protocol's name or case, not the other Connection tokens (Firefox's
    `keep-alive, Upgrade`), not how many lines the headers were split over. Except the
    request's `http_version`: an HTTP/1.0 request is never an upgrade, as a server must
    ignore its Upgrade (RFC 9110 7.8) and must not answer it with a 1xx such as the 101
    (RFC 9110 15.2); forwarded as HTTP/1.1 with our `Connection: upgrade`, it would be one.
    """
    connection: list[bytes] = []
    upgrade_lines: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower == b"connection":
            connection.append(value)
        elif lower == b"upgrade":
            upgrade_lines.append(value)
    has_token = False
    for line in connection:
        lowered = line.lower()
        if b"upgrade" in lowered and b"upgrade" in _split_tokens(lowered):
            has_token = True
            break
    seen = (tuple(connection), tuple(upgrade_lines))
    if not upgrade_lines:
        if has_token:
            return UpgradeDecision(None, "not an upgrade: no Upgrade header", True, *seen)
        return UpgradeDecision(None, "not an upgrade", False, *seen)
    if not has_token:
        return UpgradeDecision(
            None, "not an upgrade: Connection does not list 'upgrade', Upgrade dropped", True, *seen
        )
    kept = [
        p
        for line in upgrade_lines
        for p in _split_tokens(line)
        if p.split(b"/", 1)[0].strip().lower() not in REFUSED_UPGRADE_PROTOCOLS
    ]
    if not kept:
        return UpgradeDecision(
            None, "not an upgrade: only refused protocols (h2c, h2) offered", True, *seen
        )
    if http_version < b"1.1":
        version = http_version.decode("latin-1")
        return UpgradeDecision(
            None, f"not an upgrade: an HTTP/{version} request, Upgrade dropped", True, *seen
        )
    value = b", ".join(kept)
    return UpgradeDecision(value, f"upgrade to {_token_text(value)}", True, *seen)


# decided_upgrade's memo: the decisions made, by the lines they were made on. Browsers send a
# handful of spellings (`Connection: Upgrade` with `Upgrade: websocket`; Firefox's
# `keep-alive, Upgrade`), and a decision is a frozen value that any request may share. Only
# short lines are remembered and the memo is emptied when full, so a client that invents
# lines cannot grow it.
_DECIDED: dict[tuple[tuple[Header, ...], bytes], UpgradeDecision] = {}
DECIDED_MAX = 256
DECIDED_LINES_MAX = 256  # bytes of names and values


def decided_upgrade(fields: Sequence[Header], http_version: bytes = b"1.1") -> UpgradeDecision:
    """decide_upgrade(fields, http_version), remembered: the same decision without deciding
    again for the lines seen last (about 2 us a WebSocket handshake, of a few dozen)."""
    key = (tuple(fields), http_version)
    decision = _DECIDED.get(key)
    if decision is None:
        decision = decide_upgrade(fields, http_version)
        if fields_size(fields) <= DECIDED_LINES_MAX:
            if len(_DECIDED) >= DECIDED_MAX:
                _DECIDED.clear()
            _DECIDED[key] = decision
    return decision


def switch_error(offered: bytes, response_headers: Iterable[Header]) -> str | None:
    """Why a 101 must not become a tunnel, or None. `offered`: the Upgrade value sent to the
    backend (UpgradeDecision.upgrade). A server may only switch to a protocol the client
    listed (RFC 9110 7.8), and names it in the 101's Upgrade: one it was not offered (h2c
    for a WebSocket request, say) is refused, as a tunnel would carry a protocol the client
    never asked for, and never one we drop from requests. Protocols are compared by name
    in any case (`websocket`, `WebSocket`). A 101 without Upgrade is refused too: it must
    say what it switches to (RFC 9110 15.2.2), and a browser fails such a handshake."""
    names = _protocol_names(offered)
    named = False
    for name, value in response_headers:
        if name.lower() != b"upgrade":
            continue
        if value.lower() in names:  # the usual 101: the one protocol offered, by name
            named = True
            continue
        for protocol in _split_tokens(value):
            named = True
            if protocol.split(b"/", 1)[0].strip().lower() not in names:
                chosen = protocol.decode("latin-1")
                asked = offered.decode("latin-1")
                return f"switched to {chosen!r}, which the request did not offer ({asked!r})"
    if not named:
        return "switched protocols without naming the protocol (no Upgrade header in its 101)"
    return None


@functools.lru_cache(maxsize=64)
def _protocol_names(offered: bytes) -> frozenset[bytes]:
    """The protocol names (lower case, without a version) of an Upgrade value we sent; the
    same few values come with every handshake."""
    return frozenset(p.split(b"/", 1)[0].strip().lower() for p in _split_tokens(offered))


# Fields a trailer must not carry on (RFC 9110 6.5.1): framing and routing are decided by the
# header section, and a recipient that merged one of these from a trailer would frame or route
# the message otherwise than the proxy did; hop-by-hop fields never travel on.
_NOT_IN_TRAILERS = HOP_BY_HOP | NEVER_NOMINATED | {b"trailer"}


def fields_size(fields: Iterable[Header]) -> int:
    """The bytes of `fields` as they are sent on: one `Name: value` line (CRLF) each."""
    size = 0
    for name, value in fields:
        size += len(name) + len(value) + 4
    return size


def trailer_error(
    trailers: Sequence[Header], max_size: int, max_fields: int | None = None
) -> str | None:
    """Why the trailer section of a chunked message is refused for its size, or None.

    h11 bounds a trailer section only when it arrives in pieces (max_incomplete_event_size),
    as it does heads: one that arrives whole in one read is taken at any size, so the limit
    depended on how the bytes were cut. The head's limits apply to it: at most `max_size`
    bytes (counted as `Name: value` lines, as sent on) and, when given, `max_fields` fields.
    """
    if max_fields is not None and len(trailers) > max_fields:
        return f"trailer section with more than {max_fields} fields (--max-header-count)"
    size = fields_size(trailers) + 2  # and the empty line that ends it
    if size > max_size:
        return (
            f"trailer section of {size} bytes is over the limit of {max_size} (--max-header-size)"
        )
    return None


# A chunk-size line (hex size, optional whitespace and extensions) ended by a bare LF: its
# first LF has no CR right before it. The extension may hold a CR (h11 takes `5;a\rb\r\n`)
# but not a LF, so h11 can never end such a line.
_BARE_LF_CHUNK_LINE = re.compile(rb"[0-9A-Fa-f]+[ \t]*(?:;[^\n]*)?(?<!\r)\n")


def bare_lf_chunk_line(pending: bytes) -> bool:
    """Whether the bytes h11 holds unparsed of a chunked body, while it asks for more, start
    with a chunk-size line ended by a bare LF.

    h11 ends a chunk-size line only at CRLF (RFC 9112 7.1), and waits for one: behind such a
    line (from a peer that ends every line with LF) it would wait for the end of the body
    until a timeout ran out, with the head already relayed. It is bad framing, refused now.
    Nothing else h11 may hold in a body starts so: chunk data is never held, and a trailer
    line starts with a field name followed by a colon. Call only in h11's SEND_BODY state.
    """
    return _BARE_LF_CHUNK_LINE.match(pending) is not None


def forwarded_trailers(trailers: Iterable[Header]) -> list[Header]:
    """The trailer fields of a chunked message that are passed on (either direction). Claims
    about the client (X-Forwarded-*, Forwarded, X-Real-IP, in any spelling) are dropped too:
    the header section drops them from an untrusted client, and a backend that merges
    trailers must not get them this way."""
    kept = []
    for name, value in trailers:
        lower = name.lower()
        if lower in _NOT_IN_TRAILERS:
            continue
        dashed = lower.replace(b"_", b"-")
        if dashed in FORWARDED_HEADERS or _is_client_claim(dashed):
            continue
        kept.append((name, value))
    return kept


def _split_tokens(line: bytes) -> list[bytes]:
    """The comma-separated elements of one header line, trimmed, empty ones dropped."""
    if b"," not in line:
        line = line.strip(b" \t")
        return [line] if line else []
    return [t for t in (e.strip(b" \t") for e in line.split(b",")) if t]


# How much of one header value a debug line shows.
SHOWN_VALUE_LIMIT = 200


def _show(values: tuple[bytes, ...]) -> str:
    """Header values for a log line: quoted, controls escaped, each cut to a bound."""
    if not values:
        return "(absent)"
    return " | ".join(_quoted_value(v) for v in values)


def _quoted_value(value: bytes) -> str:
    shown = repr(value[:SHOWN_VALUE_LIMIT].decode("latin-1"))
    return shown if len(value) <= SHOWN_VALUE_LIMIT else shown + "..."


def _token_text(value: bytes) -> str:
    """Tokens as they are when they are plain printable ASCII (the usual `websocket`), else
    quoted like _show: a log line never carries a client's control bytes raw."""
    if len(value) <= SHOWN_VALUE_LIMIT and value.isascii() and value.decode().isprintable():
        return value.decode()
    return _quoted_value(value)


def framing_error(headers: Iterable[Header], http_version: bytes = b"1.1") -> str | None:
    """Why a request's body framing is ambiguous, or None when it is not.

    h11 already refuses differing Content-Length values, bad Content-Length syntax and any
    Transfer-Encoding but `chunked`. It accepts a message with both Content-Length and
    Transfer-Encoding (RFC 9112 lets a server choose chunked), but a backend that chooses
    Content-Length would then see a second, smuggled request: we refuse it. h11 also reads
    chunked framing in an HTTP/1.0 request, where HTTP/1.0 has no Transfer-Encoding: RFC
    9112 6.1 says such framing is faulty (a recipient of HTTP/1.0 reads no body there, and
    takes the chunks for the next request), so we refuse that too, as nginx does.
    """
    headers = list(headers)
    names = {key.lower() for key, _ in headers}
    if b"transfer-encoding" in names:
        if b"content-length" in names:
            return "both Content-Length and Transfer-Encoding"
        if http_version < b"1.1":
            return f"Transfer-Encoding in an HTTP/{http_version.decode('latin-1')} request"
    elif b"content-length" in names:
        return length_error(headers)
    return None


# The largest Content-Length passed on: a signed 64-bit length (nginx's off_t limit). h11
# takes up to 20 digits, beyond 2**64; a peer that holds the length in 64 bits without an
# overflow check would wrap it (2**64 + 1 read as 1) and take the rest of the body for the
# next message (RFC 9110 8.6 asks recipients to guard against such overflow).
MAX_CONTENT_LENGTH = 2**63 - 1


def length_error(headers: Iterable[Header]) -> str | None:
    """Why a message's Content-Length (as h11 let it through: digits, one value) is not
    passed on, or None."""
    for key, value in headers:
        if key.lower() == b"content-length" and int(value.split(b",")[0]) > MAX_CONTENT_LENGTH:
            return f"Content-Length over {MAX_CONTENT_LENGTH} (2**63 - 1)"
    return None


# The start of a request line: a method (an upper-case token; M-SEARCH, VERSION-CONTROL) and
# a space. A TLS record starts with its content type: 0x16 for a ClientHello.
_REQUEST_LINE_START = re.compile(rb"[A-Z][A-Z0-9_-]{0,19} ")


def looks_like_plain_http(start: bytes | bytearray) -> bool:
    """Whether the first bytes a client sent to a TLS port are a plain HTTP request (any
    method: nginx too looks at the first bytes, not at a list of methods as OpenSSL does)."""
    return _REQUEST_LINE_START.match(start) is not None


_EMPTY_LINES = re.compile(rb"[\r\n]*")
_OBS_FOLD = re.compile(rb"\n[ \t]")
# --max-header-count's default, as Apache's LimitRequestFields.
MAX_HEADER_FIELDS = 100


def head_error(
    data: bytes | bytearray, max_size: int, max_fields: int = MAX_HEADER_FIELDS
) -> tuple[int, str] | None:
    """Why the raw bytes of a request head are refused, as (status, reason), or None.

    `data` starts where the request starts and holds the whole head (what follows it is
    ignored), or the start of one that has not ended yet: then what is there is judged. Three
    checks h11 does not make:
    - size: h11 limits only heads that arrive in pieces; one that arrives whole in a single
      read is parsed whatever its size. Any head over `max_size` gets 431.
    - field count: more than `max_fields` header lines get 431 (HAProxy refuses more than
      101, Apache more than 100): each costs parsing and forwarding, in h11 and the backend.
    - obsolete line folding (a header line starting with a space or tab): h11 unfolds it
      silently, a backend may instead read the folded line as a header of its own, so a proxy
      must refuse it (RFC 9112 5.2).
    """
    # Empty lines before a request are allowed. Nothing here looks further than the head's
    # end: what follows it (a body, pipelined requests) may be a whole read.
    match = _EMPTY_LINES.match(data)
    start = match.end() if match is not None else 0
    crlf = data.find(b"\n\r\n", start)
    bare = data.find(b"\n\n", start, crlf + 1 if crlf >= 0 else len(data))
    if bare >= 0 and (crlf < 0 or bare < crlf):
        end = bare + 2
    else:
        end = len(data) if crlf < 0 else crlf + 3
    if end - start > max_size:
        return 431, (
            f"request head of {end - start} bytes is over the limit of {max_size} "
            "(--max-header-size)"
        )
    # The request line's LF, and the empty line's once the head is complete, are no fields.
    fields = data.count(b"\n", start, end) - (1 if bare < 0 and crlf < 0 else 2)
    if fields > max_fields:
        return 431, (f"request head with more than {max_fields} header fields (--max-header-count)")
    if _OBS_FOLD.search(data, start, end):
        return 400, "obsolete line folding in a header"
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSide:
    """What the proxy knows of the client end of an exchange, for the forwarded headers."""

    ip: str  # the client's address as we saw it
    scheme: str  # "http" or "https": how the client reached us
    port: int  # the port of our listener
    trusted: bool  # the client is a proxy we trust to tell us about its own client


def client_scheme(tls_listener: bool, balancer_says_tls: bool = False) -> str:
    """How the client reached us, "https" or "http": the scheme of ClientSide (the
    forwarded headers, X-Forwarded-Proto and Forwarded proto=) and of Location rewriting.

    https when the client spoke TLS to our listener, or when the trusted balancer in front
    (--accept-proxy-protocol) says in its PROXY v2 header that the client spoke TLS to it
    (the SSL TLV with PP2_CLIENT_SSL: ProxyHeader.client_tls). Behind a balancer that ends
    TLS and passes the connection on over plain TCP, that header is the only witness: the
    client it names is not a trusted proxy, so forwarded headers in the requests count as
    that client's claims and are not believed, whoever wrote them.
    """
    return "https" if tls_listener or balancer_says_tls else "http"


def _forwarded_node(ip: str) -> bytes:
    return f'"[{ip}]"'.encode() if ":" in ip else ip.encode("ascii")


def _forwarded_value(value: bytes) -> bytes:
    """An RFC 7239 value: a token as is, anything else quoted."""
    if value and all(c in _TCHAR for c in value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def backend_request_headers(
    raw_headers: Iterable[Header],
    decision: UpgradeDecision,
    client: ClientSide,
    *,
    forwarded: str = "x-forwarded",
    default_host: bytes,
    host_override: bytes | None = None,
) -> list[Header]:
    """The headers to send to the backend for a client's request.

    Hop-by-hop headers and those the client's Connection header names are removed (never the
    framing headers or Host). Forwarded headers (`forwarded`: x-forwarded, rfc7239, both or
    none) say who the client is and what it asked for; what a client sent of them is dropped,
    unless it is a trusted proxy, whose headers are extended (For/Forwarded appended to, the
    first proxy's Proto, Host and Port kept). For an upgrade, `Connection: upgrade` and the
    kept Upgrade protocols are sent. Everything else, Host and the Sec-WebSocket-* headers
    included, is passed on unchanged and in order. `host_override` replaces Host (the
    backend's own name); a request without Host (HTTP/1.0) gets `default_host`.
    """
    raw_headers = list(raw_headers)
    lowers = [name.lower() for name, _ in raw_headers]
    nominated: set[bytes] = set()
    if b"connection" in lowers:
        nominated = {t.lower() for t in comma_tokens(raw_headers, b"connection")}
        nominated -= NEVER_NOMINATED
    out: list[Header] = []
    incoming: dict[bytes, list[bytes]] = {}
    host: bytes | None = None
    for lower, (name, value) in zip(lowers, raw_headers, strict=True):
        if lower in HOP_BY_HOP or lower in nominated:
            continue
        if b"_" in lower:
            # CGI, WSGI, PHP and Rack read X_Forwarded_For as X-Forwarded-For (both become
            # HTTP_X_FORWARDED_FOR): a claim under that spelling is treated as the claim.
            dashed = lower.replace(b"_", b"-")
            if dashed in FORWARDED_HEADERS or _is_client_claim(dashed):
                if client.trusted and dashed not in FORWARDED_HEADERS:
                    out.append((name, value))
                continue
        if lower in FORWARDED_HEADERS:
            if client.trusted:
                incoming.setdefault(lower, []).append(value.strip())
            continue
        if _is_client_claim(lower):
            # Other claims about the client (X-Forwarded-Prefix, -Ssl, -Server, X-Real-IP):
            # passed on from a trusted proxy, dropped from anyone else.
            if client.trusted:
                out.append((name, value))
            continue
        if lower == b"host":
            host = value
            if host_override is not None:
                value = host_override
        out.append((name, value))
    if host is None:
        out.insert(0, (b"Host", host_override or default_host))
    # What a trusted proxy said, per header, joined; empty in the usual case (an untrusted
    # client, whose claims were dropped).
    joined: dict[bytes, bytes] = {}
    for key, claims in incoming.items():
        nonempty = [v for v in claims if v]
        if nonempty:
            joined[key] = b", ".join(nonempty)
    out += forwarded_headers(client, host, forwarded, joined)
    if decision.upgrade is not None:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", decision.upgrade))
    return out


def _is_client_claim(lower: bytes) -> bool:
    """A header (lower-case name) that tells the backend about the client but is none of
    FORWARDED_HEADERS: X-Forwarded-Prefix, -Ssl, -Server, X-Real-IP."""
    return lower.startswith(b"x-forwarded-") or lower == b"x-real-ip"


def forwarded_headers(
    client: ClientSide,
    host: bytes | None,
    forwarded: str = "x-forwarded",
    passed_on: dict[bytes, bytes] | None = None,
) -> list[Header]:
    """The forwarded headers that end a request to the backend (backend_request_headers):
    `host` is the Host the client sent, `passed_on` what a trusted proxy sent of these
    headers (lower-case name -> the values joined)."""
    scheme = client.scheme.encode("ascii")
    port = str(client.port).encode("ascii")
    ip = client.ip.encode("ascii")
    kept = (passed_on or {}).get
    out: list[Header] = []
    # Each family of forwarded headers is either ours in this mode (extended, or created) or
    # passed on as a trusted proxy sent it (and dropped for anyone else: `passed_on` is empty).
    if forwarded in ("x-forwarded", "both"):
        chain = kept(FORWARDED_FOR)
        out.append((b"X-Forwarded-For", chain + b", " + ip if chain else ip))
        out.append((b"X-Forwarded-Proto", kept(FORWARDED_PROTO) or scheme))
        shown_host = kept(FORWARDED_HOST) or host
        if shown_host is not None:
            out.append((b"X-Forwarded-Host", shown_host))
        shown_port = kept(FORWARDED_PORT) or _implied_port(
            kept(FORWARDED_HOST), kept(FORWARDED_PROTO)
        )
        out.append((b"X-Forwarded-Port", shown_port or port))
    else:
        for name in (FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST, FORWARDED_PORT):
            value = kept(name)
            if value is not None:
                out.append((_CANONICAL[name], value))
    chain = kept(FORWARDED)
    if forwarded in ("rfc7239", "both"):
        element = b"for=" + _forwarded_node(client.ip) + b";proto=" + scheme
        if host is not None:
            element += b";host=" + _forwarded_value(host)
        out.append((b"Forwarded", chain + b", " + element if chain else element))
    elif chain is not None:
        out.append((b"Forwarded", chain))
    return out


_HOST_PORT = re.compile(rb"(?:\[[^\]]*\]|[^:\[\]]*):([0-9]{1,5})")
_DEFAULT_PORTS = {b"https": b"443", b"wss": b"443", b"http": b"80", b"ws": b"80"}


def _implied_port(passed_host: bytes | None, passed_proto: bytes | None) -> bytes | None:
    """The port the first proxy's client reached it on, when that trusted proxy passed on a
    Host or a Proto but no Port: the port in its Host, else its scheme's default. Ours
    would be wrong next to its Proto (https://host:8080/ links behind a TLS front on 443)."""
    if passed_host:
        m = _HOST_PORT.fullmatch(passed_host.split(b",", 1)[0].strip())
        if m:
            return m.group(1)
    if passed_proto:
        return _DEFAULT_PORTS.get(passed_proto.split(b",", 1)[0].strip().lower())
    return None


def client_response_headers(
    raw_headers: Iterable[Header], switching: bool, status: int = 200, trailers: bool = True
) -> list[Header]:
    """The headers to send to the client for a backend's response.

    Hop-by-hop headers and those the backend's Connection header names are removed; h11 adds
    the Connection header the client side needs. With Transfer-Encoding present a
    Content-Length is dropped (h11 frames by Transfer-Encoding; the client must not see both).
    A 1xx or 204 `status` has no body and gets neither (RFC 9110 8.6, RFC 9112 6.1: they
    must not be sent there; a client could wait for a body that never comes). A switching
    answer is a 101 whatever `status` says: the bytes after its head are the tunnel's, and
    a client that framed them by its Content-Length would eat the first of them.
    For a 101 the backend's Upgrade value is kept and `Connection: upgrade` is sent.
    Without `trailers` (an HTTP/1.0 client, which gets no chunked body) the Trailer header,
    which announces trailer fields, is dropped with them.
    """
    raw_headers = list(raw_headers)
    lowers = [name.lower() for name, _ in raw_headers]
    nominated: set[bytes] = set()
    if b"connection" in lowers:
        nominated = {t.lower() for t in comma_tokens(raw_headers, b"connection")}
        nominated -= NEVER_NOMINATED
    chunked = b"transfer-encoding" in lowers
    bodiless = switching or status < 200 or status == 204
    out: list[Header] = []
    for lower, (name, value) in zip(lowers, raw_headers, strict=True):
        if switching and lower == b"upgrade":
            out.append((name, value))
            continue
        if lower in HOP_BY_HOP or lower in nominated:
            continue
        if (chunked or bodiless) and lower == b"content-length":
            continue
        if bodiless and lower == b"transfer-encoding":
            continue
        if not trailers and lower == b"trailer":
            continue
        out.append((name, value))
    if switching:
        out.append((b"Connection", b"upgrade"))
    return out


# -- the common case without h11 -----------------------------------------------------------
#
# Most exchanges are a bodiless request answered with a Content-Length body or, for a
# WebSocket, a 101. For those the proxy need not run four h11 passes (parse the request,
# re-validate it on the way out, the same for the response): `parse_simple_request` and
# `parse_simple_response` accept a strict SUBSET of what h11 accepts, and return None for
# anything else, which then goes to h11 as before. The subset is chosen so that framing cannot
# be in doubt: HTTP/1.1 only, CRLF line ends only, header values of visible ASCII, no
# Transfer-Encoding, no Expect, a Connection header only of `keep-alive` and `upgrade` tokens,
# exactly one Host, no CONNECT; a request has no body (no Content-Length, or one `0`); a
# response has exactly one decimal Content-Length and a status that carries a body (not 1xx,
# 204 or 304), or is a 101 to a request that decide_upgrade found to be an upgrade. Whether a
# request is an upgrade is still decided by decide_upgrade alone. tests/test_simple_heads.py
# checks with hypothesis that whatever these accept, h11 accepts with the same meaning, and
# that `write_head` writes what h11 would write.

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE = rb"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?"
_SIMPLE_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1\r\n")
_SIMPLE_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\x21-\x7e \t]*)\r\n")
# A header line in the form nearly every client and server writes, and h11 writes: `Name:
# value`, one space after the colon, none around the value. Such a line is len(name) +
# len(value) + 4 bytes long, which is how the parsers check that the lines findall() found
# are all there is (no byte between or around them that no line took) without a second pass.
# A line starts after a newline (the lookbehind): findall() tries every position, and without
# it a long run of token characters not followed by a colon (60 KB of "a" and a NUL) was
# tried from each of its bytes, each try running to its end: 20 s of CPU for one request.
_SIMPLE_HEADER_LINE = re.compile(rb"(?<=\n)(" + _TOKEN + rb"): (" + _VALUE + rb")\r\n")
# Any header line of the subset: optional whitespace around the value (h11 strips it). Read
# only when a head is not all `Name: value` lines; such a head is never `plain`.
_SPACED_HEADER_LINE = re.compile(rb"(?<=\n)((" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*\r\n)")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_ANY_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])\r?\n")


def request_line_of(head: bytes | bytearray) -> tuple[str, str, str] | None:
    """Method, target and version of the request line that starts an unfinished head, when
    that line is complete and well formed (visible ASCII, safe to log), as text: what the log
    line of an answer to a head that never completed (408, 431) names, as nginx does."""
    match = _ANY_REQUEST_LINE.match(head)
    if match is None:
        return None
    method, target, version = (part.decode("ascii") for part in match.groups())
    return method, target, version


# Request headers that send a request to h11: chunked framing and 100-continue are its job.
_NOT_SIMPLE_REQUEST = frozenset({b"transfer-encoding", b"expect"})
_KEEP_ALIVE = frozenset({b"keep-alive"})
_KEEP_ALIVE_OR_UPGRADE = frozenset({b"keep-alive", b"upgrade"})
# Request headers that backend_request_headers removes or replaces (the x-forwarded-* family
# is matched by prefix, below): a request with none of them reaches the backend as the client
# wrote it, followed by our forwarded headers.
_NOT_PLAIN_REQUEST = HOP_BY_HOP | FORWARDED_HEADERS | {b"x-real-ip"}
# A client's claim that backend_request_headers drops and that _NOT_PLAIN_REQUEST does not
# name: any other X-Forwarded-*, and the underscore spellings (X_Forwarded_For, X_Real_IP).
_X_FORWARDED = re.compile(rb"\nx[-_](?:forwarded[-_]|real[-_]ip)", re.IGNORECASE)
# Every request header _request_fields does something with; it passes the others as they are.
_REQUEST_FIELDS_READ = _NOT_SIMPLE_REQUEST | _NOT_PLAIN_REQUEST | {b"host", b"content-length"}


@dataclasses.dataclass(slots=True)
class SimpleRequest:
    """A request head accepted by `parse_simple_request`: the fields the proxy uses of an
    h11.Request, with the header items as the client wrote them (case kept)."""

    method: bytes
    target: bytes
    raw: list[Header]
    http_version: bytes = b"1.1"
    # The Connection and Upgrade headers in order: all of the head that decide_upgrade reads
    # (empty: it has nothing to decide).
    upgrade_fields: list[Header] = dataclasses.field(default_factory=list)
    # Every header line is `Name: value`, Host is the first, and no header is one the proxy
    # rewrites or adds to (forwarded headers): the backend gets the header lines as they are,
    # from offset `lines` to the empty line, except the hop-by-hop ones (Connection and Upgrade
    # among them) at the offsets `cuts` (start, end, start, end, ...), followed by our
    # forwarded headers and, for an upgrade, ours; see plain_request_head.
    plain: bool = False
    lines: int = 0
    cuts: list[int] = dataclasses.field(default_factory=list)
    # The head for the backend, when the fast path made it before the backend was connected.
    head: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), or None."""
        for key, value in self.raw:
            if key.lower() == name:
                return value
        return None


@dataclasses.dataclass(slots=True)
class SimpleResponse:
    """A response head accepted by `parse_simple_response`."""

    status: int
    reason: bytes
    raw: list[Header]
    head_size: int  # bytes of the head, where the body starts
    content_length: int
    # Every header line is `Name: value` and none is one the proxy may rewrite for the
    # client: the client gets the head as the backend wrote it, without the hop-by-hop lines
    # at the offsets `cuts` (start, end, ...); for a 101, see plain_switch_head.
    plain: bool = False
    cuts: list[int] = dataclasses.field(default_factory=list)


def _only_tokens(value: bytes, allowed: frozenset[bytes]) -> bool:
    """Every token of a header value (any case) is in `allowed`; an empty value passes."""
    lowered = value.lower()
    if lowered in allowed:  # the usual single token
        return True
    return all(token in allowed for token in _split_tokens(lowered))


def _spaced_header_lines(data: bytes, start: int, end: int) -> list[Header] | None:
    """The header lines of data[start:end] with optional whitespace, or None if something
    there is not a header line of the subset."""
    found = _SPACED_HEADER_LINE.findall(data, start, end)
    if sum([len(line) for line, _, _ in found]) != end - start:
        return None
    return [(name, value) for _, name, value in found]


_Fields = TypeVar("_Fields", bound=tuple[Any, ...])


def _header_fields(
    data: bytes, start: int, end: int, fields_of: Callable[[list[Header], int], _Fields | None]
) -> tuple[list[Header], _Fields] | None:
    """The header lines of data[start:end] and what `fields_of` (_request_fields, ...) makes
    of them, or None. Read first as `Name: value` lines in one pass; when those do not cover
    the lines exactly (other spacing, or something that is no header line of the subset),
    read again with optional whitespace: such a head is never `plain`, and the peer then gets
    it as h11 would write it."""
    raw = _SIMPLE_HEADER_LINE.findall(data, start, end)
    fields = fields_of(raw, start)
    if fields is not None and fields[0] != end:
        spaced = _spaced_header_lines(data, start, end)
        if spaced is None:
            return None
        raw = spaced
        fields = fields_of(raw, -1)
    return None if fields is None else (raw, fields)


def parse_simple_request(
    data: bytes, max_size: int, max_fields: int = MAX_HEADER_FIELDS
) -> SimpleRequest | None:
    """`data` as one simple request head (all of `data`, nothing after it), or None. A head
    with more than `max_fields` header lines is none (h11's path answers it 431), counted
    before any line is parsed."""
    size = len(data)
    if size > max_size or not data.endswith(b"\r\n\r\n"):
        return None
    line = _SIMPLE_REQUEST_LINE.match(data)
    if line is None or line[1] == b"CONNECT":  # h11 treats CONNECT as a protocol switch
        return None
    if data.count(b"\n", line.end(), size - 2) > max_fields:
        return None
    target = line[2]
    if target[0] != 47 or _MAY_RESOLVE.search(target) is not None:
        return None  # what resolve_request may change or refuse: h11's path asks it
    lines = line.end()
    found = _header_fields(data, lines, size - 2, _request_fields)
    if found is None:
        return None
    raw, fields = found
    if fields[1] != 1:  # exactly one Host
        return None
    _, _, upgrade_fields, plain, cuts = fields
    if plain:
        plain = raw[0][0].lower() == b"host" and _X_FORWARDED.search(data, lines - 1) is None
    return SimpleRequest(
        line[1],
        line[2],
        raw,
        upgrade_fields=upgrade_fields,
        plain=plain,
        lines=lines,
        cuts=cuts,
    )


def _request_fields(
    raw: list[Header], at: int
) -> tuple[int, int, list[Header], bool, list[int]] | None:
    """For parse_simple_request: None if a header refuses the head, else (where the lines
    end if each is `Name: value` and the first starts at `at`, how many Host headers, the
    Upgrade and Connection headers, whether the head can be `plain`, the offsets of the lines
    the backend must not get). `at` < 0: the lines are not all `Name: value`."""
    hosts = 0
    lengths = 0
    upgrade_fields: list[Header] = []
    plain = at >= 0
    cuts: list[int] = []
    for name, value in raw:
        start = at
        at += len(name) + len(value) + 4
        lower = name.lower()
        if lower not in _REQUEST_FIELDS_READ:
            continue  # most headers: one look instead of four
        if lower == b"host":
            hosts += 1
            if value not in _VALID_HOSTS and not _remember_valid_host(value):
                return None  # h11's path refuses it with 400
        elif lower in _NOT_SIMPLE_REQUEST:
            return None
        elif lower == b"content-length":
            lengths += 1
            if value != b"0" or lengths > 1:  # h11 merges repeated values into one
                return None
        elif lower in _NOT_PLAIN_REQUEST:
            if lower == b"connection":
                if not _only_tokens(value, _KEEP_ALIVE_OR_UPGRADE):
                    return None
                upgrade_fields.append((name, value))
            elif lower == b"upgrade":
                upgrade_fields.append((name, value))
            if lower in HOP_BY_HOP:
                # backend_request_headers drops it (and sends its own Connection and Upgrade
                # for an upgrade; those only nominate the hop-by-hop Upgrade and Keep-Alive).
                # A range right after the last one extends it (Connection then Upgrade).
                if cuts and cuts[-1] == start:
                    cuts[-1] = at
                else:
                    cuts += (start, at)
            else:
                plain = False  # a forwarded header: ours replace or extend it
    return at, hosts, upgrade_fields, plain, cuts


def parse_simple_response(data: bytes, upgrade: bool = False) -> SimpleResponse | None:
    """The simple response head at the start of `data` (a body may follow), or None. A 101
    is simple only when `upgrade` (the request was one): its head is checked for syntax only,
    and what follows it belongs to the tunnel."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    line = _SIMPLE_STATUS_LINE.match(data, 0, end + 2)
    if line is None:
        return None
    status = int(line[1])
    if status in (204, 304) or (status < 200 and (status != 101 or not upgrade)):
        return None
    lines = line.end()
    if status == 101:
        switch = _header_fields(data, lines, end + 2, _switch_fields)
        if switch is None:
            return None
        raw, (_, plain, cuts) = switch
        return SimpleResponse(status, line[2], raw, end + 4, 0, plain, cuts)
    found = _header_fields(data, lines, end + 2, _response_fields)
    if found is None:
        return None
    raw, (_, length, plain, cuts) = found
    if length < 0:  # no Content-Length
        return None
    return SimpleResponse(status, line[2], raw, end + 4, length, plain, cuts)


def _response_fields(raw: list[Header], at: int) -> tuple[int, int, bool, list[int]] | None:
    """For parse_simple_response, as _request_fields: None, or (where the lines end, the
    Content-Length or -1, plain, the offsets of the lines the client must not get)."""
    length = -1
    plain = at >= 0
    cuts: list[int] = []
    for name, value in raw:
        start = at
        at += len(name) + len(value) + 4
        lower = name.lower()
        if lower == b"content-length":
            if length >= 0 or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
        elif lower in _NOT_PLAIN_RESPONSE:
            if lower == b"transfer-encoding" or (
                lower == b"connection" and not _only_tokens(value, _KEEP_ALIVE)
            ):
                return None
            if lower in HOP_BY_HOP:
                cuts += (start, at)  # client_response_headers drops it
            else:
                plain = False  # Host, or a header a ResponseRewrite may change
    return at, length, plain, cuts


# Headers of a 101 that send it to h11: a 101 has no body, and h11 merges or refuses
# repeated framing headers.
_NOT_SIMPLE_SWITCH = frozenset({b"content-length", b"transfer-encoding"})
# Headers of a 101 that client_response_headers removes (all hop-by-hop ones but Upgrade) or
# that write_head moves (Host, written first).
_NOT_PLAIN_SWITCH = (HOP_BY_HOP - {b"upgrade"}) | {b"host"} | _NOT_SIMPLE_SWITCH


def _switch_fields(raw: list[Header], at: int) -> tuple[int, bool, list[int]] | None:
    """For a 101 in parse_simple_response, as _request_fields: None, or (where the lines
    end, plain, the offsets of the lines the client must not get). As client_response_headers
    does for a 101: the Upgrade lines are kept, the other hop-by-hop ones dropped; a Connection
    token that nominates another header, or Host, leaves the head to that function."""
    plain = at >= 0
    cuts: list[int] = []
    for name, value in raw:
        start = at
        at += len(name) + len(value) + 4
        lower = name.lower()
        if lower in _NOT_PLAIN_SWITCH:
            if lower in _NOT_SIMPLE_SWITCH:
                return None
            if lower in HOP_BY_HOP:
                cuts += (start, at)
                if lower == b"connection" and not _only_tokens(value, _KEEP_ALIVE_OR_UPGRADE):
                    plain = False
            else:
                plain = False
    return at, plain, cuts


def plain_switch_head(data: bytes, response: SimpleResponse) -> bytes:
    """The head for the client of a `plain` 101: as the backend wrote it, less the
    hop-by-hop lines but Upgrade, then `Connection: upgrade`. The same bytes as write_head of
    client_response_headers (tests/test_simple_heads.py checks it)."""
    cuts = response.cuts
    if len(cuts) == 2:  # the usual 101: one Connection line
        return b"".join(
            (data[: cuts[0]], data[cuts[1] : response.head_size - 2], _CONNECTION_UPGRADE_END)
        )
    kept = without_cuts(data, 0, response.head_size - 2, cuts)
    return b"".join((kept, _CONNECTION_UPGRADE_END))


_CONNECTION_UPGRADE_END = b"Connection: upgrade\r\n\r\n"


def without_cuts(data: bytes, start: int, end: int, cuts: list[int]) -> bytes | memoryview:
    """data[start:end] without the ranges in `cuts` (start, end, start, end, ...)."""
    if not cuts:
        return memoryview(data)[start:end]
    if len(cuts) == 2:
        return data[start : cuts[0]] + data[cuts[1] : end]
    pieces = []
    for i in range(0, len(cuts), 2):
        pieces.append(data[start : cuts[i]])
        start = cuts[i + 1]
    pieces.append(data[start:end])
    return b"".join(pieces)


def plain_request_head(
    data: bytes, request: SimpleRequest, target: bytes, added: bytes, upgrade: bytes | None = None
) -> bytes:
    """The head for the backend of a `plain` request: the request line (with the target the
    route maps to), the client's header lines as they came less the hop-by-hop ones, then
    `added` (header_lines of forwarded_headers), then for an upgrade (`upgrade`: the value
    decide_upgrade kept) `Connection: upgrade` and that Upgrade. The same bytes as write_head
    of backend_request_headers (tests/test_simple_heads.py checks it)."""
    if upgrade is not None:
        added += b"Connection: upgrade\r\nUpgrade: %s\r\n" % upgrade
    return b"%s %s HTTP/1.1\r\n%s%s\r\n" % (
        request.method,
        target,
        without_cuts(data, request.lines, len(data) - 2, request.cuts),
        added,
    )


def plain_request_headers(
    request: SimpleRequest, added: list[Header], upgrade: bytes | None = None
) -> list[Header]:
    """The headers of plain_request_head, as backend_request_headers would return them."""
    raw = request.raw
    if request.cuts:
        raw = [header for header in raw if header[0].lower() not in HOP_BY_HOP]
    if upgrade is not None:
        return [*raw, *added, (b"Connection", b"upgrade"), (b"Upgrade", upgrade)]
    return raw + added


def header_lines(headers: Iterable[Header]) -> bytes:
    """Header lines as h11 writes them, in the order given."""
    return b"".join([b"%s: %s\r\n" % header for header in headers])


def write_head(start_line: bytes, headers: Iterable[Header]) -> bytes:
    """A head as h11 writes it: the start line (with its CRLF), Host first, then the other
    headers in order, then the empty line."""
    hosts = []
    lines = [start_line]
    for name, value in headers:
        if len(name) == 4 and name.lower() == b"host":
            hosts.append(b"%s: %s\r\n" % (name, value))
        else:
            lines.append(b"%s: %s\r\n" % (name, value))
    if hosts:
        lines[1:1] = hosts
    lines.append(b"\r\n")
    return b"".join(lines)


# -- the request's target and Host ---------------------------------------------------------

# RFC 3986 host (an IP literal in brackets, or a reg-name: IPv4 addresses and DNS names are
# reg-names too) and an optional port: what a Host header or an authority may hold.
_HOST_VALUE = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[-A-Za-z0-9._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)
_ABSOLUTE_FORM = re.compile(rb"(?i:https?)://([^/?#]*)([^#]*)")


class RequestRefused(Exception):
    """A request that is answered with `status` and never forwarded."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def valid_host(value: bytes) -> bool:
    """A Host value is host[:port] as RFC 3986 spells them (RFC 9112 3.2: else 400)."""
    return _HOST_VALUE.fullmatch(value) is not None


# Host values found valid lately: a keep-alive client sends the same one on every request,
# and a set lookup costs a fifth of the regex. Emptied when full (a client sending a new Host
# each time gains nothing from it, and loses nothing).
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_KEPT = 256


def _remember_valid_host(value: bytes) -> bool:
    if not valid_host(value):
        return False
    if len(_VALID_HOSTS) >= _VALID_HOSTS_KEPT:
        _VALID_HOSTS.clear()
    _VALID_HOSTS.add(value)
    return True


def resolve_request(
    target: bytes, http_version: bytes, headers: Sequence[Header], method: bytes = b"GET"
) -> tuple[bytes, list[Header] | None]:
    """The target and headers to route and forward a request by, as a server reads them:
    (target, None) when the headers stay as they are. Raises RequestRefused.

    - HTTP major version other than 1: 505 (h11 reads any digit).
    - CONNECT: 400. A reverse proxy opens no tunnels to hosts a client names (nginx refuses
      it too), and its only valid target, host:port (RFC 9112 3.2.3), routes nowhere. One
      with a path was sent on, and a 2xx from the backend switched both h11 machines to a
      tunnel that nothing pumps: the client was told it was connected, then nothing moved.
    - Every Host value must be host[:port]: 400 (RFC 9112 3.2).
    - An absolute-form target (`http://host/path?q`, what proxies send) becomes origin-form
      and its authority becomes the Host, which a server must then ignore (RFC 9112 3.2.2):
      the backend, the route and the forwarded headers see one host, not two.
    - Dot segments (`.`, `..`, also as %2e) are resolved (RFC 3986 5.2.4) before the route is
      chosen, as nginx and Apache do: `/static/../admin` is `/admin`, routed and sent as
      such, so no prefix mapping can be climbed out of. One that climbs above the root: 400.
    """
    if http_version[:1] != b"1":
        raise RequestRefused(505, f"HTTP/{http_version.decode('latin-1')} is not supported")
    if method == b"CONNECT":
        raise RequestRefused(400, "CONNECT is not supported: this proxy opens no tunnels")
    new_headers: list[Header] | None = None
    for name, value in headers:
        if name.lower() == b"host" and not valid_host(value):
            raise RequestRefused(400, f"invalid Host header {value.decode('latin-1')!r}")
    if target[:1] != b"/":
        if target == b"*":
            return target, None
        absolute = _ABSOLUTE_FORM.fullmatch(target)
        if absolute is None:
            raise RequestRefused(400, f"invalid request target {target[:200].decode('latin-1')!r}")
        authority = absolute[1]
        if not authority or b"@" in authority or not valid_host(authority):
            raise RequestRefused(
                400, f"invalid authority in the request target {target[:200].decode('latin-1')!r}"
            )
        target = absolute[2] or b"/"
        if target[:1] != b"/":  # "http://host?q"
            target = b"/" + target
        # Host first, where h11 writes it anyway.
        new_headers = [(b"Host", authority)]
        new_headers += [header for header in headers if header[0].lower() != b"host"]
    if b"#" in target:
        raise RequestRefused(400, "a request target has no fragment (#)")
    if _has_dot_segment(target):
        target = _without_dot_segments(target)
    if _disguised_dot_segment(target):
        # `..%2F`, `..\`, `..;/`: no dot segment to RFC 3986, but one to a backend that
        # decodes slashes, takes a backslash for one (IIS) or cuts path parameters (Tomcat).
        # Refused as Apache does (AllowEncodedSlashes Off), rather than guessed at.
        raise RequestRefused(400, "a disguised dot segment (encoded slash, backslash or ;)")
    return target, new_headers


def _has_dot_segment(target: bytes) -> bool:
    """A segment of the target starts with a dot, spelled or %2e (not only `.` and `..`:
    `.well-known` too; cheap, and _without_dot_segments leaves such names as they are).
    Percent-encoded UTF-8 paths (`/%E2%9C%93`) do not count."""
    return b"/." in target or b"/%2e" in target or b"/%2E" in target


# For the fast path, cheaply: an origin-form target that resolve_request may change or refuse
# (a dot or disguised dot segment, a fragment); errs towards a match. One search costs less
# than the substring tests it replaces.
_MAY_RESOLVE = re.compile(rb"/\.|\.\.|%2[eE]|[\\#]")


def _disguised_dot_segment(target: bytes) -> bool:
    """A `..` segment once %2e, %2f and %5c are decoded, a backslash is read as a slash and
    `;` path parameters are cut (what some backends do before resolving dot segments)."""
    path = target.split(b"?", 1)[0]
    if b"." not in path and b"%2" not in path.lower():
        return False
    decoded = (
        path.lower()
        .replace(b"%2e", b".")
        .replace(b"%2f", b"/")
        .replace(b"%5c", b"/")
        .replace(b"\\", b"/")
    )
    return any(segment.split(b";", 1)[0] == b".." for segment in decoded.split(b"/"))


def _without_dot_segments(target: bytes) -> bytes:
    """An origin-form target with the `.` and `..` segments of its path resolved."""
    path, question, query = target.partition(b"?")
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        dots = segment.lower().replace(b"%2e", b".") if b"%" in segment else segment
        if dots == b".":
            if i == last:
                out.append(b"")
        elif dots == b"..":
            if not out:
                raise RequestRefused(400, "request path climbs above the root")
            out.pop()
            if i == last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out) + question + query


# -- routes ---------------------------------------------------------------------------------


def target_path(target: bytes) -> bytes:
    """The path of a request target: origin-form `/p?q`, absolute-form `http://h/p?q`, `*`."""
    if not target.startswith(b"/"):
        scheme_end = target.find(b"://")
        if scheme_end < 0:
            return target  # "*" (OPTIONS) or authority-form: matches no path prefix but "*"
        slash = target.find(b"/", scheme_end + 3)
        target = b"/" if slash < 0 else target[slash:]
    return target.split(b"?", 1)[0]


_UNRESERVED = frozenset(b"-._~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_SLASHES = frozenset(b"/\\")  # a backslash is a slash to some backends


def _route_path(path: bytes, limit: int | None = None) -> tuple[bytes, list[int]]:
    """A path as routes are matched against it, and for each of its bytes the offset in
    `path` just after it: percent-encoded unreserved characters decoded (`/%61pi` is `/api`,
    RFC 3986 6.2.2.2), an encoded slash taken as a slash, and runs of slashes as one
    (`//api`, `/api%2F`), as nginx matches a location (and a backend reads the path: a WSGI
    app gets `%2F` decoded in PATH_INFO). Matched raw, `/%61dmin/`, `//admin/` and
    `/admin%2Fx` went past an `/admin/` route to the `/` one, whose backend read `/admin/`.
    Two more readings that some backends make are matched too, where nginx does not: a
    backslash is a slash (IIS, some Windows-hosted apps), and a segment's `;parameters` are
    left out (Tomcat and Jetty read `/admin;x/y` as `/admin/y`).
    Only the first `limit` + 1 bytes are made (no prefix is longer): a path may be 1 MiB."""
    out = bytearray()
    ends: list[int] = []
    i, size = 0, len(path)
    if limit is None:
        limit = size
    parameters = False  # within a segment's ;parameters
    while i < size and len(out) <= limit:
        byte = path[i]
        step = 1
        if byte == 0x25 and i + 2 < size and path[i + 1] in _HEX and path[i + 2] in _HEX:
            decoded = int(path[i + 1 : i + 3], 16)
            if decoded in _UNRESERVED or decoded in _SLASHES:
                byte, step = decoded, 3
        i += step
        if byte in _SLASHES:
            parameters = False
            if out and out[-1] == 0x2F:
                # A run of slashes is one; what follows the prefix keeps the rest of the run.
                continue
            byte = 0x2F
        elif parameters or byte == 0x3B:
            parameters = True
            continue
        out.append(byte)
        ends.append(i)
    return bytes(out), ends


@functools.lru_cache(maxsize=256)
def route_prefix(prefix: str) -> bytes:
    """A route's prefix as select_route matches it (_route_path: `/%7Eu/` is `/~u/`)."""
    return _route_path(prefix.encode())[0]


def select_route(routes: Sequence[Route], target: bytes) -> tuple[Route, bytes] | None:
    """The route for a request target, the longest prefix winning, and the target to send to
    its backend: unchanged when the backend has no path, else with the route's prefix replaced
    by that path (`/api/x?q` via `/api/=http://b/v2/` is `/v2/x?q`). None when no route fits.
    `*` (OPTIONS *) goes to the `/` route, unchanged. The prefix is matched against the path
    as a backend reads it (_route_path: `/%61pi/x` and `//api/x` are `/api/x`); what follows
    the prefix is sent as the client wrote it."""
    path = target_path(target)
    ends: list[int] | None = None
    matched = path
    if b"%" in path or b"//" in path or b";" in path or b"\\" in path:
        matched, ends = _route_path(path, max(len(route_prefix(r.prefix)) for r in routes))
    best: Route | None = None
    length = 0
    for route in routes:
        prefix = route_prefix(route.prefix)
        if (matched.startswith(prefix) or (path == b"*" and prefix == b"/")) and (
            best is None or len(prefix) > length
        ):
            best, length = route, len(prefix)
    if best is None:
        return None
    backend_path = best.backend.path
    if backend_path is None or path == b"*":
        return best, target
    start = target.find(path) if not target.startswith(b"/") else 0
    rest = target[start + (ends[length - 1] if ends is not None else length) :]
    new = backend_path.encode()
    if new.endswith(b"/") and rest.startswith(b"/"):
        rest = rest[1:]
    return best, new + rest


# -- rewriting what the backend says about itself -----------------------------------------

_SCHEME_ALIAS = {"ws": "http", "wss": "https"}
_DEFAULT_PORT = {"http": 80, "https": 443}


def origin(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    """A comparable origin: scheme (ws/wss as http/https), host in lower case, explicit port."""
    scheme = _SCHEME_ALIAS.get(scheme.lower(), scheme.lower())
    return scheme, host.lower().strip("[]"), port or _DEFAULT_PORT.get(scheme, 0)


def origin_of_host(scheme: str, host: bytes) -> tuple[str, str, int] | None:
    """The origin a Host header value names, under `scheme`; None if it is not host[:port]."""
    try:
        parts = urlsplit(f"{scheme}://{host.decode('ascii')}")
        return origin(scheme, parts.hostname or "", parts.port)
    except (UnicodeDecodeError, ValueError):
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseRewrite:
    """How a backend's answer is made to speak of the client's origin (ProxyPassReverse)."""

    backend_origins: tuple[tuple[str, str, int], ...]  # what counts as "the backend itself"
    client_origin: str  # scheme://host[:port] the client used
    backend_path: str | None = None  # with route_prefix: the path mapping to undo
    route_prefix: str = "/"
    cookie_domains: tuple[tuple[str, str], ...] = ()
    cookie_paths: tuple[tuple[str, str], ...] = ()
    locations: bool = True
    # Every route, and the backend as routes name it (Backend.endpoint): a URL is mapped back
    # through whichever route to this backend sends the client's request to that very URL,
    # the most specific one (Apache tries each ProxyPassReverse line). Without them, only the
    # route above counts.
    routes: Sequence[Route] = ()
    backend: tuple[str, str, int] | None = None


LOCATION_HEADERS = frozenset({b"location", b"content-location", b"uri"})
# Response headers a ResponseRewrite may change.
REWRITTEN_HEADERS = LOCATION_HEADERS | {b"set-cookie"}
# Response headers that client_response_headers removes or a ResponseRewrite may change (and
# Transfer-Encoding, which no simple response has): one of them, and the head is not `plain`.
# Host would be moved first by write_head, as h11 does.
_NOT_PLAIN_RESPONSE = HOP_BY_HOP | REWRITTEN_HEADERS | {b"host", b"transfer-encoding"}


def rewrite_url(value: bytes, rule: ResponseRewrite) -> bytes:
    """An absolute URL pointing at the backend's own origin, moved to the client's origin with
    the path a client asks the proxy for to reach it (map_back); anything else (relative,
    foreign, unparsable, or a path of the backend no route leads to) unchanged."""
    try:
        text = value.decode("ascii").strip()
        parts = urlsplit(text)
        if not parts.scheme or not parts.netloc:
            return value
        where = origin(parts.scheme, parts.hostname or "", parts.port)
    except (UnicodeDecodeError, ValueError):
        return value
    if where not in rule.backend_origins:
        return value
    path = map_back(parts.path or "/", rule)
    if path is None:
        return value  # as nginx's proxy_redirect: what cannot be mapped back stays
    out = rule.client_origin + path
    if parts.query:
        out += "?" + parts.query
    if parts.fragment:
        out += "#" + parts.fragment
    return out.encode("ascii")


def map_back(path: str, rule: ResponseRewrite) -> str | None:
    """The path through the proxy to the backend's `path`, or None when no route leads there.
    Each route to this backend is a candidate (the route the request took when `rule` has
    no routes): one without a backend path passes `path` as it is, one with a backend path
    that starts `path` swaps it for its prefix. A candidate counts only if the proxy would
    route that client path to this same backend and send it as `path` (a longer prefix to
    another backend may take it); of those, the one with the longest backend path wins.
    Mapped through the taken route alone, `http://A/login` from a route `/app/ ->
    http://A/app2/` became `/login`, which the `/` route sends to another backend; and
    `http://A/api/v2/x` from a route `/ -> http://A` stayed `/api/v2/x`, which a route
    `/api/ -> http://A/api/v2/` sends as `/api/v2/v2/x`."""
    if rule.backend is None or not rule.routes:
        candidates: Iterable[tuple[str, str | None]] = ((rule.route_prefix, rule.backend_path),)
    else:
        candidates = (
            (r.prefix, r.backend.path) for r in rule.routes if r.backend.endpoint == rule.backend
        )
    best: str | None = None
    specific = -1
    for prefix, backend_path in candidates:
        if backend_path is None:
            mapped, length = path, 0
        elif path.startswith(backend_path):
            mapped, length = prefix + path[len(backend_path) :], len(backend_path)
        else:
            continue
        if length <= specific:
            continue
        if rule.routes and rule.backend is not None:
            chosen = select_route(rule.routes, mapped.encode("ascii"))
            if chosen is None:
                continue
            route, sent = chosen
            if route.backend.endpoint != rule.backend or sent != path.encode("ascii"):
                continue
        best, specific = mapped, length
    return best


def rewrite_set_cookie(value: bytes, rule: ResponseRewrite) -> bytes:
    """Domain and Path attributes of a Set-Cookie value rewritten by the FROM=TO rules."""
    pieces = value.split(b";")
    changed = False
    for index in range(1, len(pieces)):
        name, eq, attr = pieces[index].partition(b"=")
        key = name.strip().lower()
        attr = attr.strip()
        new: bytes | None = None
        if eq and key == b"domain":
            bare = attr.lstrip(b".").lower()
            for old, to in rule.cookie_domains:
                if bare == old.lstrip(".").lower().encode():
                    new = to.encode()
                    break
        elif eq and key == b"path":
            for old, to in rule.cookie_paths:
                if attr.startswith(old.encode()):
                    new = to.encode() + attr[len(old.encode()) :]
                    break
        if new is not None:
            pieces[index] = b" " + name.strip() + b"=" + new
            changed = True
    return b";".join(pieces) if changed else value


def rewrite_response_headers(headers: list[Header], rule: ResponseRewrite) -> list[Header]:
    """Location, Content-Location and URI moved to the client's origin; Set-Cookie Domain and
    Path rewritten where rules say so. Other headers unchanged."""
    out = []
    for name, value in headers:
        lower = name.lower()
        if rule.locations and lower in LOCATION_HEADERS:
            value = rewrite_url(value, rule)
        elif lower == b"set-cookie" and (rule.cookie_domains or rule.cookie_paths):
            value = rewrite_set_cookie(value, rule)
        out.append((name, value))
    return out


REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


# What a 5xx answer the proxy writes itself says: the backend's name and address and what it
# sent are for the log, not for whoever asked (nginx and HAProxy answer with a page of their
# own, too).
_SERVER_ERROR_TEXT = {
    502: "the backend could not be reached or sent an invalid answer",
    503: "the service is not available",
    504: "the backend did not answer in time",
}
# A detail longer than this is cut (its end replaced by its length): an invalid header line
# quoted whole made a 60 KB request write 350 KB of logs.
DETAIL_LIMIT = 300


# h11 quotes what it refuses as Python writes bytes: "illegal header line: bytearray(b'X Y')",
# "Illegal header name b'X Y'". Logs and error pages show the quoted text alone: 'X Y'.
_BYTES_REPR = re.compile(
    r"""bytearray\(b('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\)"""
    r"""|(?<![\w'"])b('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
)


def shortened(detail: str) -> str:
    """`detail` as a log line and an error page carry it: at most about DETAIL_LIMIT long,
    with the bytes h11 quotes shown as text, not as Python objects."""
    detail = _BYTES_REPR.sub(lambda m: m.group(1) or m.group(2), detail)
    if len(detail) <= DETAIL_LIMIT:
        return detail
    return f"{detail[:DETAIL_LIMIT]}... ({len(detail)} characters)"


def error_body(status: int, detail: str) -> bytes:
    """The text of an answer the proxy writes itself; `detail` is a short text for humans,
    shown for a client's error (4xx: what was wrong with its request) and kept out of a
    server error's (5xx: it names the backend; the log has it)."""
    reason = REASONS.get(status, "Error")
    if status >= 500:
        detail = _SERVER_ERROR_TEXT.get(status, "the proxy could not answer")
    return f"{status} {reason}: {detail}\n".encode("latin-1", "replace")


def error_headers(length: int) -> list[Header]:
    return [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(length).encode("ascii")),
    ]


def closing_error_head(status: int, length: int) -> bytes:
    """The head of an error response of ours with a body of `length` bytes, closing the
    connection."""
    reason = REASONS.get(status, "Error")
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("ascii"))
    for name, value in error_headers(length):
        head += name + b": " + value + b"\r\n"
    return head + b"Connection: close\r\n\r\n"


def error_response(status: int, detail: str) -> bytes:
    """The complete bytes of an error response the proxy writes itself, closing the
    connection. `detail` is a short text for humans; it is the whole body."""
    body = error_body(status, detail)
    return closing_error_head(status, len(body)) + body
