"""Unit tests of the sans-IO rules in rawproxy.http: no sockets, no clock."""

from __future__ import annotations

import dataclasses
import pathlib

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rawproxy import http
from rawproxy.config import parse_route
from rawproxy.http import (
    ClientSide,
    RequestRefused,
    ResponseRewrite,
    backend_request_headers,
    client_response_headers,
    client_scheme,
    closing_error_head,
    comma_tokens,
    decide_upgrade,
    decided_upgrade,
    error_body,
    error_response,
    framing_error,
    head_error,
    length_error,
    map_back,
    origin,
    request_line_of,
    resolve_request,
    rewrite_response_headers,
    rewrite_set_cookie,
    rewrite_url,
    select_route,
    shortened,
    switch_error,
    trailer_error,
)

HANDSHAKES = pathlib.Path(__file__).resolve().parent / "data" / "handshakes"


CLIENT = ClientSide("192.0.2.7", "http", 8080, trusted=False)


def H(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [k.lower() for k, _ in headers]


def value(headers: list[tuple[bytes, bytes]], name: str) -> bytes | None:
    found = [v for k, v in headers if k.lower() == name.encode()]
    assert len(found) <= 1, found
    return found[0] if found else None


# -- the upgrade rule -------------------------------------------------------------------------

UPGRADES = [
    # Chrome
    H(("Connection", "Upgrade"), ("Upgrade", "websocket")),
    # Firefox for years
    H(("Connection", "keep-alive, Upgrade"), ("Upgrade", "websocket")),
    # curl --http1.1 with h2c fallback shape, plus a websocket we keep
    H(("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "websocket")),
    # Connection split over two lines
    H(("Connection", "keep-alive"), ("Upgrade", "websocket"), ("Connection", "Upgrade")),
    # any case, stray whitespace and empty elements
    H(("connection", " ,UPGRADE ,"), ("upgrade", "WebSocket")),
    H(("CONNECTION", "close,\tuPgRaDe"), ("UPGRADE", "WEBSOCKET")),
    # any protocol, not only websocket
    H(("Connection", "Upgrade"), ("Upgrade", "TLS/1.2")),
    H(("Connection", "Upgrade"), ("Upgrade", "my-proto/2, websocket")),
]


@pytest.mark.parametrize("headers", UPGRADES)
def test_upgrade_detected(headers: list[tuple[bytes, bytes]]) -> None:
    decision = decide_upgrade(headers)
    assert decision.is_upgrade
    assert decision.considered
    # The value forwarded is the client's own, not normalised.
    upgrade_values = [v for k, v in headers if k.lower() == b"upgrade"]
    assert decision.upgrade == b", ".join(upgrade_values).replace(b" ,", b",")


NOT_UPGRADES = [
    ("no headers", H()),
    ("upgrade without connection token", H(("Upgrade", "websocket"))),
    ("connection keep-alive only", H(("Connection", "keep-alive"), ("Upgrade", "websocket"))),
    ("token without upgrade header", H(("Connection", "Upgrade"))),
    ("token as substring", H(("Connection", "upgrades, x-upgrade"), ("Upgrade", "websocket"))),
    ("h2c only", H(("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"))),
    ("h2 only", H(("Connection", "Upgrade"), ("Upgrade", "H2"))),
    ("h2c with version", H(("Connection", "Upgrade"), ("Upgrade", "h2c/1.0, h2"))),
    ("empty upgrade", H(("Connection", "Upgrade"), ("Upgrade", " , "))),
]


@pytest.mark.parametrize(("why", "headers"), NOT_UPGRADES, ids=[n for n, _ in NOT_UPGRADES])
def test_not_an_upgrade(why: str, headers: list[tuple[bytes, bytes]]) -> None:
    decision = decide_upgrade(headers)
    assert not decision.is_upgrade, why
    assert decision.upgrade is None


@pytest.mark.parametrize("headers", UPGRADES)
def test_an_http10_request_is_never_an_upgrade(headers: list[tuple[bytes, bytes]]) -> None:
    decision = decide_upgrade(headers, b"1.0")
    assert decision.upgrade is None
    assert "HTTP/1.0" in decision.reason
    assert decide_upgrade(headers, b"1.1").is_upgrade


def test_h2c_dropped_but_other_protocols_kept() -> None:
    decision = decide_upgrade(H(("Connection", "Upgrade"), ("Upgrade", "h2c, websocket")))
    assert decision.upgrade == b"websocket"


def test_decision_reason_names_the_deciding_values() -> None:
    decision = decide_upgrade(H(("Connection", "keep-alive, Upgrade"), ("Upgrade", "websocket")))
    assert "'keep-alive, Upgrade'" in decision.reason
    assert "'websocket'" in decision.reason
    refused = decide_upgrade(H(("Connection", "keep-alive"), ("Upgrade", "websocket")))
    assert "does not list 'upgrade'" in refused.reason
    assert not decide_upgrade(H(("Accept", "*/*"))).considered


@pytest.mark.parametrize(
    "headers", [h for _, h in NOT_UPGRADES] + UPGRADES, ids=lambda h: repr(h)[:60]
)
@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
def test_remembered_decision_is_the_rule_s(
    headers: list[tuple[bytes, bytes]], version: bytes
) -> None:
    fields = [(n, v) for n, v in headers if n.lower() in (b"connection", b"upgrade")]
    expected = decide_upgrade(headers, version)
    assert decided_upgrade(fields, version) == expected  # decided, maybe remembered
    assert decided_upgrade(fields, version) == expected  # remembered


def test_decision_memo_stays_bounded() -> None:
    http._DECIDED.clear()
    for i in range(3 * http.DECIDED_MAX):
        fields = [(b"Connection", b"Upgrade"), (b"Upgrade", b"proto%d" % i)]
        assert decided_upgrade(fields).upgrade == b"proto%d" % i
        assert len(http._DECIDED) <= http.DECIDED_MAX
    # Long lines are decided every time, never kept.
    http._DECIDED.clear()
    long_fields = [(b"Connection", b"Upgrade"), (b"Upgrade", b"w" * (http.DECIDED_LINES_MAX + 1))]
    assert decided_upgrade(long_fields).upgrade == b"w" * (http.DECIDED_LINES_MAX + 1)
    assert not http._DECIDED


def _handshake(name: str) -> list[tuple[bytes, bytes]]:
    text = (HANDSHAKES / name).read_text()
    lines = text.strip("\n").split("\n")[1:]
    return [tuple(part.encode() for part in line.split(": ", 1)) for line in lines]  # type: ignore[misc]


@pytest.mark.parametrize(
    "name", ["chromium-156.txt", "firefox-esr-153.txt", "firefox-128-legacy.txt"]
)
def test_captured_browser_handshakes_upgrade(name: str) -> None:
    headers = _handshake(name)
    decision = decide_upgrade(headers)
    assert decision.upgrade == b"websocket"
    out = backend_request_headers(headers, decision, CLIENT, default_host=b"backend")
    # Every end-to-end header the browser sent reaches the backend, byte for byte, in order.
    end_to_end = [(k, v) for k, v in headers if k.lower() not in (b"connection", b"upgrade")]
    assert [(k, v) for k, v in out if (k, v) in end_to_end] == end_to_end
    assert value(out, "connection") == b"upgrade"
    assert value(out, "upgrade") == b"websocket"


@given(
    st.lists(
        st.sampled_from(["keep-alive", "Upgrade", "upgrade", "close", "HTTP2-Settings", "x", ""]),
        max_size=6,
    ),
    st.booleans(),
    st.booleans(),
)
def test_upgrade_rule_property(tokens: list[str], with_upgrade: bool, split: bool) -> None:
    """However the tokens are spread over lines, the answer depends on the token being
    there and an Upgrade header being present, nothing else."""
    if split and len(tokens) > 1:
        headers = H(("Connection", ", ".join(tokens[:1])), ("Connection", ", ".join(tokens[1:])))
    else:
        headers = H(("Connection", ", ".join(tokens)))
    if with_upgrade:
        headers += H(("Upgrade", "websocket"))
    expected = with_upgrade and any(t.lower() == "upgrade" for t in tokens)
    assert decide_upgrade(headers).is_upgrade == expected


@given(
    st.lists(
        st.tuples(st.sampled_from([b"connection", b"upgrade", b"x"]), st.binary(max_size=30)),
        max_size=6,
    )
)
def test_upgrade_rule_never_crashes(headers: list[tuple[bytes, bytes]]) -> None:
    decision = decide_upgrade(headers)
    if decision.upgrade is not None:
        assert decision.upgrade
        assert b"h2c" not in [t.lower() for t in comma_tokens([(b"u", decision.upgrade)], b"u")]


# -- headers toward the backend ----------------------------------------------------------------


def test_hop_by_hop_stripped_and_forwarded_headers_added() -> None:
    headers = H(
        ("Host", "example.org:8080"),
        ("Connection", "keep-alive, X-Secret, Content-Length, Host"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "websocket"),
        ("X-Secret", "1"),
        ("Content-Length", "3"),
        ("Cookie", "a=b"),
        ("X-Forwarded-For", "203.0.113.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil"),
        ("Forwarded", "for=6.6.6.6"),
    )
    decision = decide_upgrade(headers)
    assert not decision.is_upgrade
    out = backend_request_headers(headers, decision, CLIENT, default_host=b"backend")
    assert names(out) == [
        b"host",
        b"trailer",  # end to end (RFC 9110 6.6.2)
        b"content-length",
        b"cookie",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
    ]
    assert value(out, "host") == b"example.org:8080"
    assert value(out, "content-length") == b"3"  # framing headers are never nominated away
    # An untrusted client's forwarded headers are dropped, not extended.
    assert value(out, "x-forwarded-for") == b"192.0.2.7"
    assert value(out, "x-forwarded-proto") == b"http"
    assert value(out, "x-forwarded-host") == b"example.org:8080"
    assert value(out, "x-forwarded-port") == b"8080"


FORGED = H(
    ("Host", "front.test"),
    ("X-Forwarded-For", "203.0.113.1"),
    ("x-forwarded-for", " 10.0.0.1 "),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "first.test"),
    ("X-Forwarded-Port", "443"),
    ("Forwarded", 'for=203.0.113.1;proto=https;host="first.test:443"'),
)


def test_trusted_proxy_headers_are_extended() -> None:
    trusted = ClientSide("10.0.0.2", "http", 80, trusted=True)
    out = backend_request_headers(
        FORGED, decide_upgrade([]), trusted, forwarded="both", default_host=b"b"
    )
    assert value(out, "x-forwarded-for") == b"203.0.113.1, 10.0.0.1, 10.0.0.2"
    assert value(out, "x-forwarded-proto") == b"https"  # the first proxy saw the client
    assert value(out, "x-forwarded-host") == b"first.test"
    assert value(out, "x-forwarded-port") == b"443"
    assert value(out, "forwarded") == (
        b'for=203.0.113.1;proto=https;host="first.test:443", for=10.0.0.2;proto=http;'
        b"host=front.test"
    )


@pytest.mark.parametrize(
    ("sent", "port"),
    [
        ([("X-Forwarded-Proto", "https")], b"443"),
        ([("X-Forwarded-Proto", "HTTP")], b"80"),
        ([("X-Forwarded-Proto", "https, http")], b"443"),  # the first proxy's
        ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "first.test:8443")], b"8443"),
        ([("X-Forwarded-Host", "[2001:db8::1]:8443, second.test:81")], b"8443"),
        ([("X-Forwarded-Host", "[2001:db8::1]")], b"8080"),  # no port said: ours
        ([("X-Forwarded-Host", "first.test")], b"8080"),
        ([("X-Forwarded-Proto", "gopher")], b"8080"),
        ([("X-Forwarded-For", "203.0.113.1")], b"8080"),
        ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Port", "4443")], b"4443"),
    ],
)
def test_a_trusted_proxy_that_names_no_port_implies_it(
    sent: list[tuple[str, str]], port: bytes
) -> None:
    """The port a trusted proxy's client reached it on, when that proxy sent no
    X-Forwarded-Port: the port of the Host it passed on, else the default port of the scheme
    it passed on; ours (8080 here) only when it said neither. Sending ours next to its Proto
    would tell the backend to build links to https://host:8080/."""
    trusted = ClientSide("10.0.0.2", "http", 8080, trusted=True)
    out = backend_request_headers(
        H(("Host", "front.test:8080"), *sent), decide_upgrade([]), trusted, default_host=b"b"
    )
    assert value(out, "x-forwarded-port") == port


@pytest.mark.parametrize("mode", ["x-forwarded", "rfc7239", "both", "none"])
def test_untrusted_forwarded_headers_never_pass(mode: str) -> None:
    out = backend_request_headers(
        FORGED, decide_upgrade([]), CLIENT, forwarded=mode, default_host=b"b"
    )
    assert b"203.0.113.1" not in b"".join(v for _, v in out)
    families = {n for n in names(out) if n.startswith(b"x-forwarded") or n == b"forwarded"}
    expected = {
        "x-forwarded": {
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-forwarded-host",
            b"x-forwarded-port",
        },
        "rfc7239": {b"forwarded"},
        "both": {
            b"x-forwarded-for",
            b"x-forwarded-proto",
            b"x-forwarded-host",
            b"x-forwarded-port",
            b"forwarded",
        },
        "none": set(),
    }[mode]
    assert families == expected


UNDERSCORED = H(
    ("Host", "front.test"),
    ("X_Forwarded_For", "203.0.113.1"),
    ("x_forwarded-proto", "https"),
    ("X_REAL_IP", "203.0.113.1"),
    ("X_Forwarded_Prefix", "/evil"),
    ("Forwarded_", "for=203.0.113.1"),
    ("X_Custom_Header", "kept"),
)


@pytest.mark.parametrize("trusted", [False, True], ids=["untrusted", "trusted"])
def test_underscore_spellings_of_forwarded_headers_are_dropped(trusted: bool) -> None:
    """CGI, WSGI and PHP map X_Forwarded_For and X-Forwarded-For to the same variable: the
    underscore spelling must not smuggle a client address past the filter. From a trusted
    proxy, the claims outside the forwarded families (X-Real-IP, X-Forwarded-Prefix) pass
    under either spelling, as they do with dashes."""
    client = ClientSide("10.0.0.2", "http", 80, trusted=trusted)
    out = backend_request_headers(UNDERSCORED, decide_upgrade([]), client, default_host=b"b")
    assert value(out, "x-forwarded-for") == b"10.0.0.2"
    assert value(out, "x-forwarded-proto") == b"http"
    assert b"x_forwarded_for" not in names(out)
    assert b"x_forwarded-proto" not in names(out)
    assert value(out, "x_custom_header") == b"kept"
    claims = {b"x_real_ip", b"x_forwarded_prefix"} & set(names(out))
    assert claims == ({b"x_real_ip", b"x_forwarded_prefix"} if trusted else set())
    assert b"forwarded_" in names(out)  # "Forwarded-" is no header of ours: kept


def test_trusted_headers_pass_unchanged_in_the_other_family() -> None:
    trusted = ClientSide("10.0.0.2", "http", 80, trusted=True)
    out = backend_request_headers(
        FORGED, decide_upgrade([]), trusted, forwarded="rfc7239", default_host=b"b"
    )
    assert value(out, "x-forwarded-for") == b"203.0.113.1, 10.0.0.1"
    none = backend_request_headers(
        FORGED, decide_upgrade([]), trusted, forwarded="none", default_host=b"b"
    )
    assert value(none, "forwarded") == b'for=203.0.113.1;proto=https;host="first.test:443"'


def test_forwarded_element_quotes_ipv6_and_ports() -> None:
    six = ClientSide("2001:db8::1", "https", 443, trusted=False)
    out = backend_request_headers(
        H(("Host", "h.test:8443")), decide_upgrade([]), six, forwarded="rfc7239", default_host=b"b"
    )
    assert value(out, "forwarded") == b'for="[2001:db8::1]";proto=https;host="h.test:8443"'


def test_client_scheme() -> None:
    """https when the client spoke TLS to us, or to the balancer whose PROXY v2 header says
    so (its SSL TLV); the scheme then reaches the forwarded headers like any other."""
    assert client_scheme(tls_listener=False) == "http"
    assert client_scheme(tls_listener=True) == "https"
    assert client_scheme(False, balancer_says_tls=True) == "https"
    assert client_scheme(True, balancer_says_tls=True) == "https"
    relayed = ClientSide("203.0.113.7", client_scheme(False, True), 80, trusted=False)
    out = backend_request_headers(
        H(("Host", "h.test"), ("X-Forwarded-Proto", "http")),
        decide_upgrade([]),
        relayed,
        forwarded="both",
        default_host=b"b",
    )
    assert value(out, "x-forwarded-proto") == b"https"
    assert value(out, "forwarded") == b"for=203.0.113.7;proto=https;host=h.test"


def test_backend_host_header_override() -> None:
    out = backend_request_headers(
        H(("Host", "front.test")),
        decide_upgrade([]),
        CLIENT,
        default_host=b"app:9000",
        host_override=b"app:9000",
    )
    assert value(out, "host") == b"app:9000"
    assert value(out, "x-forwarded-host") == b"front.test"


def test_upgrade_request_headers() -> None:
    headers = H(
        ("Host", "h"),
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "WebSocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Protocol", "chat.v1, chat.v0"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Origin", "http://h"),
    )
    out = backend_request_headers(headers, decide_upgrade(headers), CLIENT, default_host=b"b")
    assert value(out, "connection") == b"upgrade"
    assert value(out, "upgrade") == b"WebSocket"
    for header in headers[3:]:
        assert header in out


def test_missing_host_gets_the_backend_authority() -> None:
    out = backend_request_headers(
        H(("Accept", "*/*")), decide_upgrade([]), CLIENT, default_host=b"app:9000"
    )
    assert out[0] == (b"Host", b"app:9000")
    assert value(out, "x-forwarded-host") is None
    # h11 accepts what we produce
    h11.Request(method=b"GET", target=b"/", headers=out)


# -- routes --------------------------------------------------------------------------------

ROUTES = [
    parse_route("/=http://root"),
    parse_route("/api/=http://api:9001/"),
    parse_route("/api/v2/=http://v2/new/"),
    parse_route("/static=http://static"),
]


@pytest.mark.parametrize(
    ("target", "prefix", "sent"),
    [
        (b"/", "/", b"/"),
        (b"/x?q=1", "/", b"/x?q=1"),
        (b"/api/x?q=1", "/api/", b"/x?q=1"),
        (b"/api/v2/y", "/api/v2/", b"/new/y"),
        (b"/api", "/", b"/api"),
        (b"/staticfile", "/static", b"/staticfile"),
        (b"*", "/", b"*"),
        (b"http://front/api/z", "/api/", b"/z"),
    ],
)
def test_longest_prefix_wins(target: bytes, prefix: str, sent: bytes) -> None:
    chosen = select_route(ROUTES, target)
    assert chosen is not None
    assert chosen[0].prefix == prefix
    assert chosen[1] == sent


def test_no_route() -> None:
    assert select_route([parse_route("/api/=http://a")], b"/other") is None


TARGETS = [b"/", b"/x?q=1", b"/api/x", b"*", b"http://front/api/z", b"front:443", b"x", b"//y"]


@pytest.mark.parametrize(
    "routes",
    [
        ["--backend", "127.0.0.1:9"],  # one route for every path: the shortcut
        ["--route", "/=127.0.0.1:9/base/"],  # one route with a path of its own: no shortcut
        ["--route", "/api/=127.0.0.1:9", "--route", "/=127.0.0.1:8"],
    ],
)
def test_the_runtime_chooses_what_select_route_says(routes: list[str]) -> None:
    """Runtime.choose answers the one-route set-up without select_route: the same answers."""
    from rawproxy.cli import build_parser, load_settings
    from rawproxy.server import Runtime

    config, _ = load_settings(build_parser().parse_args(["--listen", "127.0.0.1:0", *routes]))
    runtime = Runtime(config)
    assert (runtime.only_route is not None) == (routes[0] == "--backend")
    for target in TARGETS:
        chosen = runtime.choose(target)
        expected = select_route(runtime.routes, target)
        if expected is None:
            assert chosen is None, target
        else:
            assert chosen == (*expected, runtime.target_for(expected[0])), target


# -- rewriting the backend's answer ------------------------------------------------------

RULE = ResponseRewrite(
    backend_origins=(origin("http", "app.internal", 9001), origin("http", "front.test", None)),
    client_origin="https://front.test",
    backend_path="/",
    route_prefix="/api/",
    cookie_domains=(("app.internal", "front.test"),),
    cookie_paths=(("/", "/api/"),),
)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (b"http://app.internal:9001/x?y=1#f", b"https://front.test/api/x?y=1#f"),
        (b"HTTP://APP.INTERNAL:9001/", b"https://front.test/api/"),
        (b"http://front.test/login", b"https://front.test/api/login"),
        (b"http://front.test:80/login", b"https://front.test/api/login"),
        (b"http://app.internal/x", b"http://app.internal/x"),  # port 80 is another origin
        (b"https://front.test/x", b"https://front.test/x"),  # already the client's
        (b"/relative", b"/relative"),
        (b"relative", b"relative"),
        (b"http://elsewhere.test/x", b"http://elsewhere.test/x"),
        (b"http://[bad", b"http://[bad"),
    ],
)
def test_location_rewriting(location: bytes, expected: bytes) -> None:
    assert rewrite_url(location, RULE) == expected


MAPPED_ROUTES = tuple(
    parse_route(text)
    for text in (
        "/=http://a.internal",
        "/api/=http://a.internal/api/v2/",
        "/app/=http://a.internal/app2/",
        "/b/=http://b.internal/",
        "/shadow/=http://b.internal/",
    )
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/x", "/x"),  # through / unchanged
        ("/api/v2/x", "/api/x"),  # the most specific route, not / (which /api/ shadows)
        ("/api/v1/x", None),  # / would send /api/v1/x to /api/v2/v1/x: no way back
        ("/app2/y", "/app/y"),
        ("/app2", "/app2"),  # outside /app2/: / leads there as it is
        ("/shadow/z", None),  # b's route /shadow/ takes it: a.internal has no way back
    ],
)
def test_map_back_takes_the_route_that_leads_back(path: str, expected: str | None) -> None:
    """A backend's URL is mapped back through the route to that backend, the most specific
    one, that the proxy would send to that very path; None when none does (the URL stays)."""
    rule = dataclasses.replace(
        RULE, routes=MAPPED_ROUTES, backend=MAPPED_ROUTES[0].backend.endpoint
    )
    assert map_back(path, rule) == expected


def test_response_headers_rewritten() -> None:
    headers = H(
        ("Location", "http://app.internal:9001/a"),
        ("Content-Location", "http://app.internal:9001/b"),
        ("URI", "http://app.internal:9001/c"),
        ("Link", "<http://app.internal:9001/d>"),
        ("Set-Cookie", "sid=1; Path=/; Domain=.APP.internal; HttpOnly"),
        ("Set-Cookie", "other=2; Path=/x; Domain=foreign.test"),
    )
    out = rewrite_response_headers(headers, RULE)
    assert out == H(
        ("Location", "https://front.test/api/a"),
        ("Content-Location", "https://front.test/api/b"),
        ("URI", "https://front.test/api/c"),
        ("Link", "<http://app.internal:9001/d>"),
        ("Set-Cookie", "sid=1; Path=/api/; Domain=front.test; HttpOnly"),
        ("Set-Cookie", "other=2; Path=/api/x; Domain=foreign.test"),
    )


def test_location_rewriting_can_be_off() -> None:
    rule = dataclasses.replace(RULE, locations=False, cookie_domains=(), cookie_paths=())
    headers = H(("Location", "http://app.internal:9001/a"), ("Set-Cookie", "a=b; Path=/"))
    assert rewrite_response_headers(headers, rule) == headers


@given(st.binary(max_size=80))
def test_rewriters_never_crash(value: bytes) -> None:
    rewrite_url(value, RULE)
    rewrite_set_cookie(value, RULE)
    select_route(ROUTES, value)


# -- headers toward the client -----------------------------------------------------------------


def test_response_hop_by_hop_stripped() -> None:
    headers = H(
        ("Connection", "close, X-Internal"),
        ("Keep-Alive", "timeout=1"),
        ("X-Internal", "1"),
        ("Content-Length", "5"),
        ("Set-Cookie", "a=b"),
        ("Upgrade", "h2c"),
    )
    out = client_response_headers(headers, switching=False)
    assert out == H(("Content-Length", "5"), ("Set-Cookie", "a=b"))


def test_response_with_both_framings_loses_content_length() -> None:
    headers = H(("Content-Length", "5"), ("Transfer-Encoding", "chunked"))
    assert client_response_headers(headers, switching=False) == H(("Transfer-Encoding", "chunked"))


def test_switching_response_keeps_upgrade() -> None:
    headers = H(
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    )
    out = client_response_headers(headers, switching=True)
    assert out == H(
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ("Connection", "upgrade"),
    )


@pytest.mark.parametrize("framing", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")])
def test_switching_response_carries_no_framing_headers(framing: tuple[str, str]) -> None:
    headers = H(("Upgrade", "websocket"), ("Connection", "Upgrade"), framing)
    out = client_response_headers(headers, switching=True)
    assert out == H(("Upgrade", "websocket"), ("Connection", "upgrade"))


# -- framing and head checks -------------------------------------------------------------------


def test_content_length_with_transfer_encoding_refused() -> None:
    assert framing_error(H(("Content-Length", "5"), ("Transfer-Encoding", "chunked")))
    assert framing_error(H(("transfer-encoding", "chunked"), ("CONTENT-LENGTH", "0")))
    assert framing_error(H(("Content-Length", "5"))) is None
    assert framing_error(H(("Transfer-Encoding", "chunked"))) is None


def test_content_length_beyond_63_bits_refused() -> None:
    """h11 takes Content-Length up to 20 digits; past a signed 64-bit length a request is
    refused and an answer is a 502 (length_error), as nginx does: a peer keeping the length
    in 64 bits would wrap it and read the rest of the body as the next message."""
    largest = str(2**63 - 1)
    for value in ("0", "005", largest):
        assert framing_error(H(("Content-Length", value))) is None
        assert length_error(H(("content-length", value))) is None
    for value in (str(2**63), str(2**64 + 1), "9" * 20):
        assert framing_error(H(("Content-Length", value))) == length_error(
            H(("Content-Length", value))
        )
        assert length_error(H(("Content-Length", value))) is not None
    assert length_error(H(("X-Size", "9" * 20))) is None


def test_transfer_encoding_in_http10_refused() -> None:
    chunked = H(("Transfer-Encoding", "chunked"))
    assert framing_error(chunked, b"1.0") == "Transfer-Encoding in an HTTP/1.0 request"
    assert framing_error(chunked, b"1.1") is None
    assert framing_error(H(("Content-Length", "5")), b"1.0") is None


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tb\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\nX: a\n b\n\n",
        b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    ],
)
def test_obs_fold_refused(head: bytes) -> None:
    assert head_error(head, 1024) == (400, "obsolete line folding in a header")


def test_head_check_ignores_the_body() -> None:
    assert head_error(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n\n \n ", 99) is None
    assert head_error(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 99) is None
    assert head_error(b"GET / HTTP/1.1\nHost: a\n\nGET /\n x", 99) is None
    # empty lines before the request line are not a fold, nor the end of the head
    assert head_error(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 99) is None
    assert head_error(b"\r\nGET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n", 99) is not None


def test_trailer_sections_are_held_to_the_head_limits() -> None:
    # "X-A: 12345\r\n" is 12 bytes, and the empty line that ends the section 2.
    fields = [(b"X-A", b"12345")] * 3
    assert trailer_error(fields, 38) is None
    assert trailer_error(fields, 37) == (
        "trailer section of 38 bytes is over the limit of 37 (--max-header-size)"
    )
    assert trailer_error(fields, 1000, max_fields=3) is None
    assert trailer_error(fields, 1000, max_fields=2) == (
        "trailer section with more than 2 fields (--max-header-count)"
    )
    assert trailer_error([], 2, max_fields=0) is None


def test_head_size_limit_counts_the_whole_head_only() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 100 + b"\r\n\r\n"
    assert head_error(head + b"body" * 1000, len(head)) is None
    refused = head_error(head, len(head) - 1)
    assert refused is not None
    assert refused[0] == 431


def fields_head(n: int, end: bytes = b"\r\n") -> bytes:
    """A GET head with `n` header fields (Host first), lines ending in `end`."""
    lines = [b"GET / HTTP/1.1", b"Host: a"] + [b"X-F%d: v" % i for i in range(n - 1)]
    return end.join(lines) + end + end


@pytest.mark.parametrize("end", [b"\r\n", b"\n"])
def test_head_field_count_limit(end: bytes) -> None:
    assert head_error(fields_head(100, end), 65536) is None  # the default: 100
    assert head_error(fields_head(101, end), 65536) == (
        431,
        "request head with more than 100 header fields (--max-header-count)",
    )
    assert head_error(fields_head(5, end), 65536, 5) is None
    assert head_error(fields_head(6, end), 65536, 5) is not None
    # Empty lines before the request line, and a body's lines, are no fields.
    assert head_error(end * 3 + fields_head(5, end) + b"\n" * 50, 65536, 5) is None


def test_head_field_count_of_a_head_not_ended_yet() -> None:
    """A head still arriving is judged by its complete lines so far."""
    head = fields_head(7)[:-2]  # its last field ends, the empty line has not come
    assert head_error(head, 65536, 7) is None
    assert head_error(head, 65536, 6) is not None
    assert head_error(head + b"X-More: part", 65536, 7) is None


@given(st.binary(max_size=200))
def test_head_check_never_crashes(data: bytes) -> None:
    result = head_error(data, 100)
    assert result is None or result[0] in (400, 431)
    result = head_error(data, 100, 2)
    assert result is None or result[0] in (400, 431)


# -- error answers -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 408, 431, 502, 504])
def test_error_response_is_valid_http(status: int) -> None:
    raw = error_response(status, "something precise")
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    assert (b"connection", b"close") in list(response.headers)
    body = conn.next_event()
    assert isinstance(body, h11.Data)
    # A client's error says what was wrong; a server error keeps it for the log (it names
    # the backend).
    assert (b"something precise" in body.data) == (status < 500)


def test_a_long_detail_is_shortened() -> None:
    assert shortened("x" * 300) == "x" * 300
    cut = shortened("x" * 60_000)
    assert cut.startswith("x" * 300)
    assert cut.endswith("... (60000 characters)")


def test_a_detail_shows_the_bytes_h11_quotes_as_text() -> None:
    assert shortened("illegal header line: bytearray(b'X Y')") == "illegal header line: 'X Y'"
    assert shortened("Illegal header name b'X Y'") == "Illegal header name 'X Y'"
    assert shortened('status line: bytearray(b"it\'s")') == 'status line: "it\'s"'
    assert shortened("the client's b'ad' request") == "the client's 'ad' request"
    cut = shortened("line: bytearray(b'" + "x" * 60_000 + "')")
    assert cut.startswith("line: '" + "x" * 200)
    assert "bytearray" not in cut


def test_error_response_for_head_has_no_body() -> None:
    """What a HEAD request gets (Session._fail): the head alone, with the Content-Length of
    the body a GET would get."""
    raw = closing_error_head(502, len(error_body(502, "x")))
    assert raw.endswith(b"\r\n\r\n")
    assert b"Content-Length: " in raw


# -- resolve_request: target and Host as a server reads them ------------------------------

RESOLVED = [
    # (target, Host, what is routed and sent, the Host sent or None when unchanged)
    (b"/a/b?c", b"x", b"/a/b?c", None),
    (b"/a/./b/../c", b"x", b"/a/c", None),
    (b"/a/b/..", b"x", b"/a/", None),
    (b"/a/.", b"x", b"/a/", None),
    (b"/a/%2E%2e/b", b"x", b"/b", None),
    (b"/a/.%2e/b", b"x", b"/b", None),
    (b"/a//../b", b"x", b"/a/b", None),
    (b"/a/..b/.c/c.", b"x", b"/a/..b/.c/c.", None),  # dots inside names are names
    (b"/x?next=/../y", b"x", b"/x?next=/../y", None),  # the query is not a path
    (b"*", b"x", b"*", None),
    (b"http://a.test/p?q", b"x", b"/p?q", b"a.test"),
    (b"HTTPS://A.test:8443", b"x", b"/", b"A.test:8443"),
    (b"http://a.test?q=1", b"x", b"/?q=1", b"a.test"),
    (b"http://[::1]:80/../p", b"x", None, None),  # refused: above the root
    (b"/", b"[2001:db8::1]:8080", b"/", None),
    (b"/", b"", b"/", None),  # empty Host is valid (RFC 9110 7.2)
    # disguised dot segments, refused: a backend may decode or split them into `..`
    (b"/api/..%2Fadmin", b"x", None, None),
    (b"/api/%2e%2e%2fadmin", b"x", None, None),
    (b"/api/..;/admin", b"x", None, None),
    (b"/api/..\\admin", b"x", None, None),
    (b"/api/x%5C..%5Cadmin", b"x", None, None),
    (b"/public#/../admin", b"x", None, None),  # no fragment in a request target
    # ... but dots, encoded slashes and queries that hide none are left alone
    (b"/file..txt", b"x", b"/file..txt", None),
    (b"/a%2Fb/c", b"x", b"/a%2Fb/c", None),
    (b"/x?next=..%2F..%2F", b"x", b"/x?next=..%2F..%2F", None),
]


@pytest.mark.parametrize(("target", "host", "sent", "sent_host"), RESOLVED)
def test_resolve_request(
    target: bytes, host: bytes, sent: bytes | None, sent_host: bytes | None
) -> None:
    headers = [(b"Host", host), (b"Accept", b"*/*")]
    if sent is None:
        with pytest.raises(RequestRefused) as refused:
            resolve_request(target, b"1.1", headers)
        assert refused.value.status == 400
        return
    new_target, new_headers = resolve_request(target, b"1.1", headers)
    assert new_target == sent
    if sent_host is None:
        assert new_headers is None
    else:
        assert new_headers == [(b"Host", sent_host), (b"Accept", b"*/*")]


@pytest.mark.parametrize("target", [b"/x", b"b.test:22", b"http://b.test/"])
def test_connect_refused(target: bytes) -> None:
    with pytest.raises(RequestRefused) as refused:
        resolve_request(target, b"1.1", [(b"Host", b"b.test")], b"CONNECT")
    assert refused.value.status == 400
    assert "CONNECT" in refused.value.reason


def test_absolute_form_without_host_gets_one() -> None:
    target, headers = resolve_request(b"http://a.test/p", b"1.0", [(b"Accept", b"*/*")])
    assert (target, headers) == (b"/p", [(b"Host", b"a.test"), (b"Accept", b"*/*")])


@pytest.mark.parametrize(
    "host", [b"a b", b"a/b", b"a@b", b"a\\b", b"a:b:c", b"[::1", b"a\tb", b"a%zz", b"a:80x"]
)
def test_invalid_host_refused(host: bytes) -> None:
    with pytest.raises(RequestRefused) as refused:
        resolve_request(b"/", b"1.1", [(b"Host", host)])
    assert refused.value.status == 400


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"%2e", b"", b"b.c"]), max_size=8))
def test_resolved_paths_have_no_dot_segments(segments: list[bytes]) -> None:
    """Whatever the mix of segments, the resolved path starts with / and has no . or .."""
    target = b"/" + b"/".join(segments)
    try:
        resolved, _ = resolve_request(target, b"1.1", [(b"Host", b"x")])
    except RequestRefused:
        return
    assert resolved.startswith(b"/")
    for segment in resolved.split(b"/"):
        assert segment.lower().replace(b"%2e", b".") not in (b".", b"..")


@pytest.mark.parametrize(
    ("offered", "answered", "refused"),
    [
        (b"websocket", [(b"Upgrade", b"websocket")], False),
        (b"websocket", [(b"upgrade", b"WebSocket")], False),
        (b"websocket", [], True),  # a 101 must say what it switches to
        (b"websocket", [(b"Upgrade", b"")], True),
        (b"websocket", [(b"Upgrade", b" , ")], True),
        (b"foo/2, websocket", [(b"Upgrade", b"foo")], False),
        (b"foo/2", [(b"Upgrade", b"foo/1")], False),  # the same protocol by name
        (b"websocket", [(b"Upgrade", b"h2c")], True),
        (b"websocket", [(b"Upgrade", b"websocket, h2c")], True),
        (b"websocket", [(b"Upgrade", b"websocket"), (b"Upgrade", b"tls/1.2")], True),
        (b"h2c, WebSocket", [(b"Upgrade", b"WEBSOCKET")], False),
        (b"websocket", [(b"Upgrade", b"websocket"), (b"Upgrade", b"h2c")], True),
        (b"websocket", [(b"Upgrade", b"h2c"), (b"Upgrade", b"websocket")], True),
    ],
)
def test_a_101_may_only_switch_to_an_offered_protocol(
    offered: bytes, answered: list[tuple[bytes, bytes]], refused: bool
) -> None:
    problem = switch_error(offered, answered)
    assert (problem is not None) == refused, problem


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n", ("GET", "/a?b=c", "1.1")),
        (b"POST /up HTTP/1.0\n", ("POST", "/up", "1.0")),
        (b"GET /a HTTP/1.1", None),  # the line itself is not complete
        (b"GET /a", None),
        (b"GET /a\x1b[31m HTTP/1.1\r\n", None),  # a control character: not for a log line
        (b"GET /a b HTTP/1.1\r\n", None),
        (b"G(T /a HTTP/1.1\r\n", None),
        (b"", None),
    ],
)
def test_request_line_of_an_unfinished_head(head, expected):
    assert request_line_of(head) == expected
