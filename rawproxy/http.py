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
import re
from collections.abc import Iterable

Header = tuple[bytes, bytes]

# Headers that describe one hop and never travel on, whatever Connection says (RFC 9110 7.6.1),
# plus Proxy-Connection, which old clients send and which has no meaning to a backend.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
# Headers that a Connection token must never remove: they decide framing and routing, and
# removing them on a client's say-so is how a proxy and a backend come to disagree on where a
# message ends.
NEVER_NOMINATED = frozenset({b"content-length", b"transfer-encoding", b"host"})
# Upgrade protocols we refuse to tunnel: cleartext HTTP/2 behind our back would let a client
# send requests the proxy never sees (HAProxy, Envoy and Traefik drop them too).
REFUSED_UPGRADE_PROTOCOLS = frozenset({b"h2c", b"h2"})

FORWARDED_FOR = b"x-forwarded-for"
FORWARDED_PROTO = b"x-forwarded-proto"
FORWARDED_HOST = b"x-forwarded-host"


def comma_tokens(headers: Iterable[Header], name: bytes) -> list[bytes]:
    """Every comma-separated element of every `name` header line, trimmed, empty ones dropped.

    `name` must be lower case; header names are compared case-insensitively.
    """
    tokens: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            for element in value.split(b","):
                element = element.strip(b" \t")
                if element:
                    tokens.append(element)
    return tokens


def _header_values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


@dataclasses.dataclass(frozen=True, slots=True)
class UpgradeDecision:
    """Whether a request asks to switch protocols, and why (for the debug log).

    `upgrade` is the Upgrade value to send to the backend (refused protocols removed) when
    the request is an upgrade, else None.
    """

    upgrade: bytes | None
    reason: str
    considered: bool = True  # False for requests with neither Upgrade nor the Connection token

    @property
    def is_upgrade(self) -> bool:
        return self.upgrade is not None


def decide_upgrade(headers: Iterable[Header]) -> UpgradeDecision:
    """The upgrade rule, in one place.

    A request is an upgrade when any Connection header line lists the token `upgrade`
    (comma-separated, trimmed, any case) and an Upgrade header is present. The protocols h2c
    and h2 are removed from Upgrade; if none is left, it is not an upgrade. Nothing else
    matters: not the protocol's name or case, not the other Connection tokens (Firefox's
    `keep-alive, Upgrade`), not how many lines the headers were split over.
    """
    headers = list(headers)
    connection = _header_values(headers, b"connection")
    upgrade_lines = _header_values(headers, b"upgrade")
    shown = f"Connection: {_show(connection)}; Upgrade: {_show(upgrade_lines)}"
    has_token = any(token.lower() == b"upgrade" for token in comma_tokens(headers, b"connection"))
    if not upgrade_lines:
        if has_token:
            return UpgradeDecision(None, f"not an upgrade: no Upgrade header ({shown})")
        return UpgradeDecision(None, f"not an upgrade ({shown})", considered=False)
    if not has_token:
        return UpgradeDecision(
            None, f"not an upgrade: Connection does not list 'upgrade', Upgrade dropped ({shown})"
        )
    offered = comma_tokens(headers, b"upgrade")
    kept = [
        p for p in offered if p.split(b"/", 1)[0].strip().lower() not in REFUSED_UPGRADE_PROTOCOLS
    ]
    if not kept:
        return UpgradeDecision(
            None, f"not an upgrade: only refused protocols (h2c, h2) offered ({shown})"
        )
    value = b", ".join(kept)
    return UpgradeDecision(value, f"upgrade to {value.decode('latin-1')} ({shown})")


def _show(values: list[bytes]) -> str:
    if not values:
        return "(absent)"
    return " | ".join(repr(v.decode("latin-1")) for v in values)


def framing_error(headers: Iterable[Header]) -> str | None:
    """Why a request's body framing is ambiguous, or None when it is not.

    h11 already refuses differing Content-Length values, bad Content-Length syntax and any
    Transfer-Encoding but `chunked`. It accepts a message with both Content-Length and
    Transfer-Encoding (RFC 9112 lets a server choose chunked), but a backend that chooses
    Content-Length would then see a second, smuggled request: we refuse it.
    """
    names = {key.lower() for key, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return "both Content-Length and Transfer-Encoding"
    return None


_OBS_FOLD = re.compile(rb"\n[ \t]")


def head_error(data: bytes | bytearray, max_size: int) -> tuple[int, str] | None:
    """Why the raw bytes of a request head are refused, as (status, reason), or None.

    `data` starts where the request starts and holds at least the whole head (what follows it
    is ignored). Two checks h11 does not make:
    - size: h11 limits only heads that arrive in pieces; one that arrives whole in a single
      read is parsed whatever its size. Any head over `max_size` gets 431.
    - obsolete line folding (a header line starting with a space or tab): h11 unfolds it
      silently, a backend may instead read the folded line as a header of its own, so a proxy
      must refuse it (RFC 9112 5.2).
    """
    start = len(data) - len(data.lstrip(b"\r\n"))  # empty lines before a request are allowed
    crlf = data.find(b"\n\r\n", start)
    bare = data.find(b"\n\n", start)
    if bare >= 0 and (crlf < 0 or bare < crlf):
        end = bare + 2
    else:
        end = len(data) if crlf < 0 else crlf + 3
    if end - start > max_size:
        return 431, f"request head of {end - start} bytes is over the limit of {max_size}"
    if _OBS_FOLD.search(data, start, end):
        return 400, "obsolete line folding in a header"
    return None


def backend_request_headers(
    raw_headers: Iterable[Header],
    decision: UpgradeDecision,
    client_ip: str,
    scheme: str,
    default_host: bytes,
) -> list[Header]:
    """The headers to send to the backend for a client's request.

    Hop-by-hop headers and those the client's Connection header names are removed (never the
    framing headers or Host), X-Forwarded-For gets the client address appended, and
    X-Forwarded-Proto and X-Forwarded-Host say what the client asked for. For an upgrade,
    `Connection: upgrade` and the kept Upgrade protocols are sent. Everything else, Host and
    the Sec-WebSocket-* headers included, is passed on unchanged and in order. A request
    without Host (HTTP/1.0) gets `default_host`, the backend's own, since HTTP/1.1 needs one.
    """
    raw_headers = list(raw_headers)
    nominated = {t.lower() for t in comma_tokens(raw_headers, b"connection")} - NEVER_NOMINATED
    out: list[Header] = []
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    for name, value in raw_headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in nominated:
            continue
        if lower == FORWARDED_FOR:
            forwarded_for.append(value.strip())
            continue
        if lower in (FORWARDED_PROTO, FORWARDED_HOST):
            continue
        if lower == b"host":
            host = value
        out.append((name, value))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"X-Forwarded-For", b", ".join(v for v in forwarded_for if v)))
    out.append((b"X-Forwarded-Proto", scheme.encode("ascii")))
    if host is None:
        out.insert(0, (b"Host", default_host))
    else:
        out.append((b"X-Forwarded-Host", host))
    if decision.upgrade is not None:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", decision.upgrade))
    return out


def client_response_headers(raw_headers: Iterable[Header], switching: bool) -> list[Header]:
    """The headers to send to the client for a backend's response.

    Hop-by-hop headers and those the backend's Connection header names are removed; h11 adds
    the Connection header the client side needs. With Transfer-Encoding present a
    Content-Length is dropped (h11 frames by Transfer-Encoding; the client must not see both).
    For a 101 the backend's Upgrade value is kept and `Connection: upgrade` is sent.
    """
    raw_headers = list(raw_headers)
    nominated = {t.lower() for t in comma_tokens(raw_headers, b"connection")} - NEVER_NOMINATED
    chunked = any(name.lower() == b"transfer-encoding" for name, _ in raw_headers)
    out: list[Header] = []
    for name, value in raw_headers:
        lower = name.lower()
        if switching and lower == b"upgrade":
            out.append((name, value))
            continue
        if lower in HOP_BY_HOP or lower in nominated:
            continue
        if chunked and lower == b"content-length":
            continue
        out.append((name, value))
    if switching:
        out.append((b"Connection", b"upgrade"))
    return out


REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def error_response(status: int, detail: str, head_only: bool = False) -> bytes:
    """The complete bytes of an error response the proxy writes itself, closing the
    connection. `detail` is a short text for humans; it is the whole body."""
    reason = REASONS.get(status, "Error")
    body = f"{status} {reason}: {detail}\n".encode("latin-1", "replace")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    return head if head_only else head + body
