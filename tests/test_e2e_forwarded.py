"""Forwarded headers and Host, end to end: `--forwarded x-forwarded|rfc7239|both|none`,
`--trusted-proxy CIDR`, `--backend-host-header`.

- each mode adds exactly its headers: X-Forwarded-For/-Proto/-Host/-Port, or one RFC 7239
  `Forwarded: for=IP;proto=...;host=HOST` (host quoted when it holds a colon), or both, or none;
  X-Forwarded-Port and -Proto follow the listener the client used;
- from an untrusted client, incoming X-Forwarded-* and Forwarded headers (any case, several
  lines) never reach the backend, in every mode; upgrade requests are treated the same;
- from a client in --trusted-proxy: X-Forwarded-For and Forwarded are extended, the incoming
  X-Forwarded-Proto/-Host/-Port kept (ours added only where absent); with `none`, passed on;
- two rawproxy processes chained (A with TLS to the client, B plain, B trusting A or not),
  in every mode, with a forged header sent to A;
- Host passed through by default; `--backend-host-header` sends each route's backend
  host:port, while X-Forwarded-Host / Forwarded host= keep the client's Host;
- bad --forwarded and --trusted-proxy values: one line, exit 2.
"""

from __future__ import annotations

from typing import Any

import pytest
from peers import (
    Header,
    ProxyProcess,
    WsBackend,
    header_values,
    parse_head,
    redirect_target,
    request_bytes,
    run_rawproxy,
    simple_get,
    ws_accept,
    ws_key,
)
from tls_peers import Pki

MODES = ["x-forwarded", "rfc7239", "both", "none"]
X_FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port")

# What a client that is not trusted might send; none of it may reach the backend.
FORGED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("x-forwarded-for", "7.7.7.7, 8.8.8.8"),
    ("X-Forwarded-Proto", "gopher"),
    ("X-FORWARDED-HOST", "evil.test"),
    ("X-Forwarded-Port", "1"),
    ("Forwarded", 'for=6.6.6.6;proto=gopher;host="evil.test:1"'),
    ("forwarded", "for=9.9.9.9"),
]
FORGED_VALUES = [b"6.6.6.6", b"7.7.7.7", b"8.8.8.8", b"9.9.9.9", b"gopher", b"evil.test"]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-forwarded"))


def split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted, escaped = [], "", False, False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\" and quoted:
            current += ch
            escaped = True
        elif ch == '"':
            current += ch
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def parse_forwarded(values: list[bytes]) -> list[dict[str, tuple[str, bool]]]:
    """Every element of every Forwarded line, in order: {param lower-cased: (value unquoted,
    whether it was quoted)}."""
    elements = []
    for line in values:
        for element in split_outside_quotes(line.decode("latin-1"), ","):
            params: dict[str, tuple[str, bool]] = {}
            for pair in split_outside_quotes(element.strip(), ";"):
                name, eq, value = pair.strip().partition("=")
                assert eq, f"not a name=value pair: {pair!r} in {line!r}"
                value = value.strip()
                quoted = len(value) >= 2 and value[0] == value[-1] == '"'
                if quoted:
                    value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
                params[name.strip().lower()] = (value, quoted)
            elements.append(params)
    return elements


def element(for_: str, proto: str, host: str) -> dict[str, str]:
    return {"for": for_, "proto": proto, "host": host}


def plain(elements: list[dict[str, tuple[str, bool]]]) -> list[dict[str, str]]:
    return [{k: v for k, (v, _) in e.items()} for e in elements]


def assert_quoting(elements: list[dict[str, tuple[str, bool]]]) -> None:
    """A host (or for) holding a colon must be a quoted-string (RFC 7239, section 4)."""
    for e in elements:
        for name, (value, quoted) in e.items():
            if ":" in value or "[" in value:
                assert quoted, f"{name}={value} must be quoted: {e}"


def forwarded_view(headers: list[Header]) -> dict[str, Any]:
    """The forwarding headers a backend saw: each X-Forwarded-* header's lines, and the parsed
    Forwarded elements."""
    view: dict[str, Any] = {name: header_values(headers, name) for name in X_FORWARDED}
    fwd = header_values(headers, "forwarded")
    view["forwarded"] = parse_forwarded(fwd)
    assert len(fwd) <= 1, f"more than one Forwarded line: {fwd}"
    assert_quoting(view["forwarded"])
    return view


def expected_view(
    mode: str, xff: bytes, proto: bytes, host: bytes, port: int, elements: list[dict[str, str]]
) -> dict[str, Any]:
    x = mode in ("x-forwarded", "both")
    r = mode in ("rfc7239", "both")
    return {
        "x-forwarded-for": [xff] if x else [],
        "x-forwarded-proto": [proto] if x else [],
        "x-forwarded-host": [host] if x else [],
        "x-forwarded-port": [str(port).encode()] if x else [],
        "forwarded": elements if r else [],
    }


def assert_nothing_forged(headers: list[Header]) -> None:
    for name, value in headers:
        for forged in FORGED_VALUES:
            assert forged not in value, f"forged {forged!r} reached the backend in {name!r}"


def seen(view: dict[str, Any]) -> dict[str, Any]:
    out = dict(view)
    out["forwarded"] = plain(view["forwarded"])
    return out


# --- modes, untrusted clients ---------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_adds_its_headers_and_drops_forged_ones(launch, make_backend, client, mode):
    backend = make_backend()
    proxy = launch("--backend", f"127.0.0.1:{backend.port}", f"--forwarded={mode}")
    c = client(proxy.port)
    resp = c.request(request_bytes("GET", "/f", [("Host", "app.test:8080"), *FORGED]))
    assert resp.status == 200
    resp = c.request(simple_get("/g", "plain.test"))
    assert resp.status == 200
    first, second = backend.wait_for_requests(2)
    assert_nothing_forged(first.headers)
    assert seen(forwarded_view(first.headers)) == expected_view(
        mode,
        b"127.0.0.1",
        b"http",
        b"app.test:8080",
        proxy.port,
        [element("127.0.0.1", "http", "app.test:8080")],
    )
    assert seen(forwarded_view(second.headers)) == expected_view(
        mode,
        b"127.0.0.1",
        b"http",
        b"plain.test",
        proxy.port,
        [element("127.0.0.1", "http", "plain.test")],
    )
    assert first.values("host") == [b"app.test:8080"]


def test_default_mode_is_x_forwarded(launch, make_backend, client):
    backend = make_backend()
    proxy = launch("--backend", f"127.0.0.1:{backend.port}")
    c = client(proxy.port)
    assert c.request(request_bytes("GET", "/", [("Host", "app.test"), *FORGED])).status == 200
    [req] = backend.wait_for_requests(1)
    assert_nothing_forged(req.headers)
    assert seen(forwarded_view(req.headers)) == expected_view(
        "x-forwarded", b"127.0.0.1", b"http", b"app.test", proxy.port, []
    )


def test_other_x_forwarded_headers_from_untrusted_clients_dropped(launch, make_backend, client):
    """`X-Forwarded-*` means every such header (apps build URLs from X-Forwarded-Prefix,
    X-Forwarded-Server, X-Forwarded-Ssl...)."""
    backend = make_backend()
    proxy = launch("--backend", f"127.0.0.1:{backend.port}")
    c = client(proxy.port)
    forged = [
        ("X-Forwarded-Prefix", "/evil"),
        ("X-Forwarded-Server", "evil.test"),
        ("X-Forwarded-Ssl", "on"),
    ]
    assert c.request(request_bytes("GET", "/", [("Host", "app.test"), *forged])).status == 200
    [req] = backend.wait_for_requests(1)
    names = {k.lower() for k, _ in req.headers}
    leaked = {k.lower().encode() for k, _ in forged} & names
    assert not leaked, f"reached the backend: {leaked} in {req.headers}"


def test_port_and_proto_follow_the_listener(launch, make_backend, client, pki):
    backend = make_backend()
    proxy = launch(
        "--backend",
        f"127.0.0.1:{backend.port}",
        "--forwarded=both",
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
        listen=["tcp://127.0.0.1:0", "tls://127.0.0.1:0"],
    )
    plain_port, tls_port = proxy.ports
    assert client(plain_port).request(simple_get("/p", "app.test")).status == 200
    tls = client(tls_port, ssl_context=pki.client_context())
    assert tls.request(simple_get("/t", f"localhost:{tls_port}")).status == 200
    by_target = {r.target: r for r in backend.wait_for_requests(2)}
    assert seen(forwarded_view(by_target[b"/p"].headers)) == expected_view(
        "both",
        b"127.0.0.1",
        b"http",
        b"app.test",
        plain_port,
        [element("127.0.0.1", "http", "app.test")],
    )
    public = f"localhost:{tls_port}"
    assert seen(forwarded_view(by_target[b"/t"].headers)) == expected_view(
        "both",
        b"127.0.0.1",
        b"https",
        public.encode(),
        tls_port,
        [element("127.0.0.1", "https", public)],
    )


def test_upgrade_requests_get_the_same_treatment(launch, make_backend, client):
    ws = make_backend(WsBackend)
    proxy = launch("--backend", f"127.0.0.1:{ws.port}", "--forwarded=both")
    c = client(proxy.port)
    key = ws_key()
    c.send(
        request_bytes(
            "GET",
            "/chat",
            [
                ("Host", "app.test"),
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", key),
                ("Sec-WebSocket-Version", "13"),
                *FORGED,
            ],
        )
    )
    status, _, headers, raw = c.read_head()
    assert status == 101, raw
    assert header_values(headers, "sec-websocket-accept") == [ws_accept(key)]
    [head] = ws.wait_handshakes(1)
    _, got = parse_head(head)
    assert_nothing_forged(got)
    assert seen(forwarded_view(got)) == expected_view(
        "both",
        b"127.0.0.1",
        b"http",
        b"app.test",
        proxy.port,
        [element("127.0.0.1", "http", "app.test")],
    )


@pytest.mark.parametrize(
    "host", ["app.test", "app.test:8080", "127.0.0.1:8080", "[::1]:8080", "[::1]", "APP.Test"]
)
def test_rfc7239_host_quoting(launch, make_backend, client, host):
    backend = make_backend()
    proxy = launch("--backend", f"127.0.0.1:{backend.port}", "--forwarded=rfc7239")
    c = client(proxy.port)
    assert c.request(simple_get("/", host)).status == 200
    [req] = backend.wait_for_requests(1)
    [line] = req.values("forwarded")
    elements = forwarded_view(req.headers)["forwarded"]  # checks the quoting
    assert plain(elements) == [element("127.0.0.1", "http", host)], line
    if ":" in host:
        assert f'host="{host}"'.encode() in line, line


# --- trusted clients ------------------------------------------------------------------------

INCOMING_XF = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "public.test"),
    ("X-Forwarded-Port", "443"),
]
INCOMING_FWD = ("Forwarded", 'for=203.0.113.7;proto=https;host="public.test:443"')


def trusted_proxy(launch, backend, mode: str, *cidrs: str) -> ProxyProcess:
    flags = [a for cidr in cidrs for a in ("--trusted-proxy", cidr)]
    return launch("--backend", f"127.0.0.1:{backend.port}", f"--forwarded={mode}", *flags)


def test_trusted_x_forwarded_extended_and_kept(launch, make_backend, client):
    backend = make_backend()
    proxy = trusted_proxy(launch, backend, "x-forwarded", "127.0.0.1/32")
    c = client(proxy.port)
    assert c.request(request_bytes("GET", "/", [("Host", "app.test"), *INCOMING_XF])).status == 200
    [req] = backend.wait_for_requests(1)
    assert seen(forwarded_view(req.headers)) == {
        "x-forwarded-for": [b"203.0.113.7, 127.0.0.1"],
        "x-forwarded-proto": [b"https"],
        "x-forwarded-host": [b"public.test"],
        "x-forwarded-port": [b"443"],
        "forwarded": [],
    }
    assert req.values("host") == [b"app.test"]


def test_trusted_x_forwarded_ours_added_where_absent(launch, make_backend, client):
    """The trusted proxy sent For and Proto only: Host is ours, and the port is the one its
    https implies, not our listener's (links would point at https://app.test:OURS/)."""
    backend = make_backend()
    proxy = trusted_proxy(launch, backend, "x-forwarded", "127.0.0.1/32")
    c = client(proxy.port)
    only = [("X-Forwarded-For", "203.0.113.7, 198.51.100.2"), ("X-Forwarded-Proto", "https")]
    assert c.request(request_bytes("GET", "/", [("Host", "app.test"), *only])).status == 200
    [req] = backend.wait_for_requests(1)
    assert seen(forwarded_view(req.headers)) == {
        "x-forwarded-for": [b"203.0.113.7, 198.51.100.2, 127.0.0.1"],
        "x-forwarded-proto": [b"https"],
        "x-forwarded-host": [b"app.test"],
        "x-forwarded-port": [b"443"],
        "forwarded": [],
    }


def test_trusted_rfc7239_extended(launch, make_backend, client):
    backend = make_backend()
    proxy = trusted_proxy(launch, backend, "rfc7239", "127.0.0.1/32")
    c = client(proxy.port)
    sent = [("Host", "app.test:8080"), INCOMING_FWD]
    assert c.request(request_bytes("GET", "/", sent)).status == 200
    [req] = backend.wait_for_requests(1)
    [line] = req.values("forwarded")
    assert line.startswith(INCOMING_FWD[1].encode() + b", "), line
    view = forwarded_view(req.headers)
    assert plain(view["forwarded"]) == [
        element("203.0.113.7", "https", "public.test:443"),
        element("127.0.0.1", "http", "app.test:8080"),
    ]
    assert [req.values(name) for name in X_FORWARDED] == [[]] * 4


def test_trusted_both_extended(launch, make_backend, client):
    backend = make_backend()
    proxy = trusted_proxy(launch, backend, "both", "127.0.0.1/32")
    c = client(proxy.port)
    sent = [("Host", "app.test"), *INCOMING_XF, INCOMING_FWD]
    assert c.request(request_bytes("GET", "/", sent)).status == 200
    [req] = backend.wait_for_requests(1)
    assert seen(forwarded_view(req.headers)) == {
        "x-forwarded-for": [b"203.0.113.7, 127.0.0.1"],
        "x-forwarded-proto": [b"https"],
        "x-forwarded-host": [b"public.test"],
        "x-forwarded-port": [b"443"],
        "forwarded": [
            element("203.0.113.7", "https", "public.test:443"),
            element("127.0.0.1", "http", "app.test"),
        ],
    }


def test_trusted_none_passes_incoming_on(launch, make_backend, client):
    backend = make_backend()
    proxy = trusted_proxy(launch, backend, "none", "127.0.0.1/32")
    c = client(proxy.port)
    sent = [("Host", "app.test"), *INCOMING_XF, INCOMING_FWD]
    assert c.request(request_bytes("GET", "/", sent)).status == 200
    [req] = backend.wait_for_requests(1)
    for name, value in [*INCOMING_XF, INCOMING_FWD]:
        assert req.values(name) == [value.encode()], (name, req.headers)


def test_trusted_several_incoming_lines(launch, make_backend, client):
    """Several X-Forwarded-For or Forwarded lines from a trusted proxy are one list each; ours
    goes last."""
    backend = make_backend()
    proxy = trusted_proxy(launch, backend, "both", "127.0.0.1/32")
    c = client(proxy.port)
    sent = [
        ("Host", "app.test"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "198.51.100.2"),
        ("Forwarded", "for=203.0.113.7;proto=https"),
        ("Forwarded", 'for="[2001:db8::1]:4711";host=public.test'),
    ]
    assert c.request(request_bytes("GET", "/", sent)).status == 200
    [req] = backend.wait_for_requests(1)
    xff = [t for v in req.values("x-forwarded-for") for t in v.replace(b" ", b"").split(b",")]
    assert xff == [b"203.0.113.7", b"198.51.100.2", b"127.0.0.1"], req.headers
    elements = parse_forwarded(req.values("forwarded"))
    assert plain(elements) == [
        {"for": "203.0.113.7", "proto": "https"},
        {"for": "[2001:db8::1]:4711", "host": "public.test"},
        element("127.0.0.1", "http", "app.test"),
    ], req.headers


@pytest.mark.parametrize(
    ("cidrs", "trusted"),
    [
        (["10.0.0.0/8"], False),
        (["::1/128"], False),
        (["127.0.0.2/32", "192.168.0.0/16"], False),
        (["10.0.0.0/8", "127.0.0.0/8"], True),  # the second of two
        (["::1/128", "127.0.0.1/32"], True),
    ],
)
def test_trusted_proxy_cidrs(launch, make_backend, client, cidrs, trusted):
    backend = make_backend()
    proxy = trusted_proxy(launch, backend, "x-forwarded", *cidrs)
    c = client(proxy.port)
    sent = [("Host", "app.test"), ("X-Forwarded-For", "203.0.113.7")]
    assert c.request(request_bytes("GET", "/", sent)).status == 200
    [req] = backend.wait_for_requests(1)
    want = b"203.0.113.7, 127.0.0.1" if trusted else b"127.0.0.1"
    assert req.values("x-forwarded-for") == [want]


# --- two proxies chained --------------------------------------------------------------------


@pytest.mark.parametrize("b_trusts_a", [True, False], ids=["B-trusts-A", "B-trusts-nobody"])
@pytest.mark.parametrize("mode", MODES)
def test_chain_of_two_proxies(launch, make_backend, client, pki, mode, b_trusts_a):
    """client -TLS-> A -plain-> B -> backend. A trusts nobody, so the client's forged headers
    stop at A; B extends A's headers only when it trusts 127.0.0.1 (A's address)."""
    backend = make_backend()
    trust = ["--trusted-proxy", "127.0.0.1/32"] if b_trusts_a else []
    b = launch("--backend", f"http://127.0.0.1:{backend.port}", f"--forwarded={mode}", *trust)
    a = launch(
        "--backend",
        f"http://127.0.0.1:{b.port}",
        f"--forwarded={mode}",
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
    )
    c = client(a.port, ssl_context=pki.client_context())
    resp = c.request(request_bytes("GET", "/chained", [("Host", "app.test"), *FORGED]))
    assert (resp.status, resp.body) == (200, b"GET /chained")
    [req] = backend.wait_for_requests(1)
    assert_nothing_forged(req.headers)
    assert req.values("host") == [b"app.test"]
    at_a = element("127.0.0.1", "https", "app.test")
    at_b = element("127.0.0.1", "http", "app.test")
    if b_trusts_a:
        want = expected_view(
            mode, b"127.0.0.1, 127.0.0.1", b"https", b"app.test", a.port, [at_a, at_b]
        )
    else:
        want = expected_view(mode, b"127.0.0.1", b"http", b"app.test", b.port, [at_b])
    assert seen(forwarded_view(req.headers)) == want


# --- Host -----------------------------------------------------------------------------------


def test_host_passed_through_by_default(launch, make_backend, client):
    one, two = make_backend(), make_backend()
    proxy = launch(
        "--route", f"/one/=http://127.0.0.1:{one.port}", "--route", f"/=http://localhost:{two.port}"
    )
    c = client(proxy.port)
    for target, host in [("/one/a", "App.Test:8443"), ("/b", "other.test")]:
        assert c.request(simple_get(target, host)).status == 200
    [r1] = one.wait_for_requests(1)
    [r2] = two.wait_for_requests(1)
    assert r1.values("host") == [b"App.Test:8443"]
    assert r2.values("host") == [b"other.test"]


def test_backend_host_header(launch, make_backend, client):
    one, two = make_backend(), make_backend()
    ws = make_backend(WsBackend)
    proxy = launch(
        "--route",
        f"/one/=http://127.0.0.1:{one.port}",
        "--route",
        f"/ws/=ws://127.0.0.1:{ws.port}",
        "--route",
        f"/=http://localhost:{two.port}/base/",
        "--backend-host-header",
        "--forwarded=both",
    )
    c = client(proxy.port)
    assert c.request(simple_get("/one/a", "App.Test:8443")).status == 200
    assert c.request(simple_get("/b", "public.test")).status == 200
    [r1] = one.wait_for_requests(1)
    [r2] = two.wait_for_requests(1)
    assert r1.values("host") == [f"127.0.0.1:{one.port}".encode()]
    assert r1.values("x-forwarded-host") == [b"App.Test:8443"]
    assert plain(forwarded_view(r1.headers)["forwarded"]) == [
        element("127.0.0.1", "http", "App.Test:8443")
    ]
    assert r2.values("host") == [f"localhost:{two.port}".encode()]
    assert r2.values("x-forwarded-host") == [b"public.test"]
    assert r2.target == b"/base/b"

    key = ws_key()
    c.send(
        request_bytes(
            "GET",
            "/ws/chat",
            [
                ("Host", "public.test"),
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Key", key),
                ("Sec-WebSocket-Version", "13"),
            ],
        )
    )
    status, _, _, raw = c.read_head()
    assert status == 101, raw
    [head] = ws.wait_handshakes(1)
    _, got = parse_head(head)
    assert header_values(got, "host") == [f"127.0.0.1:{ws.port}".encode()]
    assert header_values(got, "x-forwarded-host") == [b"public.test"]


@pytest.mark.parametrize("spelling", ["http://127.0.0.1", "http://127.0.0.1:80", "127.0.0.1:80"])
def test_backend_host_header_omits_the_default_port(launch, port80_backend, client, spelling):
    proxy = launch("--backend", spelling, "--backend-host-header")
    c = client(proxy.port)
    assert c.request(simple_get("/", "app.test:8080")).status == 200
    [req] = port80_backend.wait_for_requests(1)
    assert req.values("host") == [b"127.0.0.1"]
    assert req.values("x-forwarded-host") == [b"app.test:8080"]


def test_backend_host_header_and_redirects(launch, make_backend, client):
    """The backend, sent its own host:port, redirects to it: the client sees its own Host."""
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch("--backend", f"http://{b}", "--backend-host-header")
    c = client(proxy.port)
    resp = c.request(simple_get(redirect_target(f"http://{b}/next"), "app.test"))
    assert resp.status == 302
    assert resp.values("location") == [b"http://app.test/next"]


# --- bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--forwarded", "sometimes"],
        ["--forwarded", ""],
        ["--trusted-proxy", "10.0.0.0/33"],
        ["--trusted-proxy", "300.1.1.1/8"],
        ["--trusted-proxy", "localhost"],
        ["--trusted-proxy", "::1/129"],
    ],
)
def test_bad_values_are_one_line(flags):
    done = run_rawproxy("--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", *flags)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert flags[0] in lines[0], lines[0]
