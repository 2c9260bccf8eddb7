"""Response rewriting, end to end: redirects (`Location`, `Content-Location`, `URI`, like
Apache's ProxyPassReverse) and `Set-Cookie` (`--cookie-domain`, `--cookie-path`).

- an absolute URL pointing at the backend's own origin (the route's scheme://host:port, or the
  Host the backend was sent, with the backend's scheme; default ports equal to none; host in
  any case) becomes the client's origin: the listener's scheme + the client's Host; path,
  query and fragment kept;
- relative URLs, foreign origins, other schemes, other ports and look-alike hosts are left
  alone; so are other headers carrying URLs (`Link`, `Refresh`);
- a TLS listener in front of a plain backend: `http://<client host>/x` -> `https://...`; one
  proxy with a plain and a TLS listener rewrites to the scheme of the listener used;
- a TLS backend (`https://localhost:PORT`);
- routes that replace their prefix map the backend's path back (`/v2/x` -> `/api/x`);
- `--no-rewrite-location` turns it all off;
- `Set-Cookie` untouched by default; `Domain=FROM` (any case, leading dot) and `Path` starting
  with FROM rewritten, every other attribute and the cookie's own value untouched.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator

import pytest
from peers import (
    HttpBackend,
    HttpClient,
    redirect_target,
    respond_target,
    simple_get,
)
from tls_peers import Pki

HOST = "app.test"
URL_HEADERS = ("Location", "Content-Location", "URI")

# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-rewrite"))


@pytest.fixture
def make_backend() -> Iterator[Callable[..., HttpBackend]]:
    made: list[HttpBackend] = []

    def make(ssl_context: ssl.SSLContext | None = None) -> HttpBackend:
        backend = HttpBackend(ssl_context=ssl_context)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.gate.set()
        backend.stop()
    for backend in made:
        bad = [e for e in backend.protocol_errors if not e.startswith("incomplete:")]
        assert not bad, f"the backend received malformed HTTP from the proxy: {bad}"


def url_headers_seen(c: HttpClient, path: str, value: str, host: str) -> dict[str, list[str]]:
    """Ask the backend (at `path`, which must end in /respond) to answer with `value` in each
    of Location, Content-Location and URI (and in Link and X-Other-Url, which must stay as
    they are); returns what the client got in each of the five."""
    headers = [(name, value) for name in URL_HEADERS]
    headers += [("Link", f"<{value}>; rel=next"), ("X-Other-Url", value)]
    resp = c.request(simple_get(respond_target(path, headers, status=201), host))
    assert resp.status == 201, resp
    return {
        name: [v.decode() for v in resp.values(name)]
        for name in (*URL_HEADERS, "Link", "X-Other-Url")
    }


def check_urls(
    c: HttpClient, cases: list[tuple[str, str]], host: str = HOST, path: str = "/respond"
) -> None:
    """For each (backend's value, value the client must see) in `cases`: the client sees the
    expected value in Location, Content-Location and URI, and the backend's value unchanged
    in Link and X-Other-Url. Every case is run before failing, and all failures are shown."""
    wrong = []
    for sent, want in cases:
        seen = url_headers_seen(c, path, sent, host)
        expect = {name: [want] for name in URL_HEADERS}
        expect["Link"] = [f"<{sent}>; rel=next"]
        expect["X-Other-Url"] = [sent]
        for name, values in expect.items():
            if seen[name] != values:
                wrong.append(
                    f"{name}: backend sent {sent!r}, client got {seen[name]!r}, want {values!r}"
                )
    assert not wrong, "\n".join(wrong)


def check_redirect(
    c: HttpClient, sent: str, want: str, host: str = HOST, path: str = "/redirect"
) -> None:
    resp = c.request(simple_get(redirect_target(sent, path), host))
    assert resp.status == 302, resp
    assert resp.values("location") == [want.encode()], (sent, resp.headers)


# --- redirects: which URLs are the backend's ------------------------------------------------


def test_backend_origin_with_port_rewritten(launch, make_backend, client):
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch("--backend", f"http://{b}")
    c = client(proxy.port)
    client_host = "App.Test:8080"  # the client's Host, used as it was sent
    check_urls(
        c,
        [
            (f"http://{b}/x?y=1#frag", f"http://{client_host}/x?y=1#frag"),
            (f"http://{b}/", f"http://{client_host}/"),
            (f"http://{b}/a/b/c.html", f"http://{client_host}/a/b/c.html"),
            (f"http://{b}/p?next=http://{b}/q", f"http://{client_host}/p?next=http://{b}/q"),
            # the Host the backend was sent (the client's, passed through), any case
            ("http://app.test:8080/h", f"http://{client_host}/h"),
            ("http://APP.TEST:8080/h2?x", f"http://{client_host}/h2?x"),
        ],
        host=client_host,
    )
    check_redirect(c, f"http://{b}/moved", f"http://{client_host}/moved", host=client_host)


def test_other_urls_left_alone(launch, make_backend, client):
    backend = make_backend()
    port = backend.port
    proxy = launch("--backend", f"http://127.0.0.1:{port}")
    c = client(proxy.port)
    untouched = [
        "/x?y=1",
        "x/y",
        "../up",
        "?only=query",
        "http://elsewhere.test/x",
        f"http://elsewhere.test:{port}/x",
        "http://127.0.0.1/x",  # port 80, not the backend's
        f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/x",
        f"https://127.0.0.1:{port}/x",  # not the backend's scheme
        "https://app.test:8080/x",  # the client's Host but https: not the backend's origin
        "http://app.test/x",  # the client's host, but port 80, not 8080
        "http://app.test.evil.test:8080/x",  # a look-alike host
        "http://evil.test/?http://app.test:8080/",
        "mailto:someone@app.test",
    ]
    check_urls(c, [(u, u) for u in untouched], host="app.test:8080")
    check_redirect(c, "/relative", "/relative", host="app.test:8080")


def test_default_ports_equal_no_port(launch, make_backend, client):
    """The Host the backend was sent has no port: `http://app.test/` and
    `http://app.test:80/` are both the backend's origin; other ports are not."""
    backend = make_backend()
    proxy = launch("--backend", f"http://127.0.0.1:{backend.port}")
    c = client(proxy.port)
    check_urls(
        c,
        [
            ("http://app.test/x", "http://app.test/x"),
            ("http://app.test:80/x", "http://app.test/x"),
            ("http://APP.test:80/y?z", "http://app.test/y?z"),
            ("http://app.test:8080/x", "http://app.test:8080/x"),
            ("http://app.test:443/x", "http://app.test:443/x"),
            ("http://app.test.evil.test/x", "http://app.test.evil.test/x"),
        ],
        host="app.test",
    )


@pytest.mark.parametrize("spelling", ["http://127.0.0.1", "http://127.0.0.1:80", "127.0.0.1:80"])
def test_backend_origin_without_a_port(launch, port80_backend, client, spelling):
    proxy = launch("--backend", spelling)
    c = client(proxy.port)
    check_urls(
        c,
        [
            ("http://127.0.0.1/x", "http://app.test/x"),
            ("http://127.0.0.1:80/y?z", "http://app.test/y?z"),
            ("http://127.0.0.1:8080/x", "http://127.0.0.1:8080/x"),
            ("https://127.0.0.1/x", "https://127.0.0.1/x"),
        ],
    )


def test_tls_listener_in_front_of_a_plain_backend(launch, make_backend, client, pki):
    """The classic case: the app behind the proxy thinks it is served over http and redirects
    to http://<its public name>/...; the browser must be sent to https://."""
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch(
        "--backend", f"http://{b}", "--cert", str(pki.server.cert), "--key", str(pki.server.key)
    )
    public = f"localhost:{proxy.port}"
    c = client(proxy.port, ssl_context=pki.client_context())
    check_urls(
        c,
        [
            (f"http://{public}/x?y=1", f"https://{public}/x?y=1"),
            (f"http://LOCALHOST:{proxy.port}/x", f"https://{public}/x"),
            (f"http://{b}/from-backend", f"https://{public}/from-backend"),
            (f"https://{public}/already", f"https://{public}/already"),
            ("/relative", "/relative"),
            ("http://elsewhere.test/x", "http://elsewhere.test/x"),
        ],
        host=public,
    )
    check_redirect(c, f"http://{public}/login", f"https://{public}/login", host=public)

    # no port in the client's Host
    check_urls(
        c,
        [
            ("http://localhost/x", "https://localhost/x"),
            ("http://localhost:80/x", "https://localhost/x"),
            (f"http://{b}/y", "https://localhost/y"),
        ],
        host="localhost",
    )


def test_scheme_of_the_listener_used(launch, make_backend, client, pki):
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch(
        "--backend",
        f"http://{b}",
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
        listen=["tcp://127.0.0.1:0", "tls://127.0.0.1:0"],
    )
    plain_port, tls_port = proxy.ports
    plain = client(plain_port)
    tls = client(tls_port, ssl_context=pki.client_context())
    check_redirect(plain, f"http://{b}/p", "http://app.test/p")
    check_redirect(tls, f"http://{b}/t", "https://app.test/t")
    check_redirect(plain, "http://app.test/p2", "http://app.test/p2")
    check_redirect(tls, "http://app.test/t2", "https://app.test/t2")


def test_tls_backend(launch, make_backend, client, pki):
    backend = make_backend(ssl_context=pki.server_context())
    b = f"localhost:{backend.port}"
    proxy = launch("--backend", f"https://{b}", "--backend-ca", str(pki.ca_file))
    c = client(proxy.port)
    check_urls(
        c,
        [
            (f"https://{b}/x", "http://app.test/x"),
            (f"https://LocalHost:{backend.port}/y", "http://app.test/y"),
            ("https://app.test/z", "http://app.test/z"),  # the Host sent, https's default port
            ("https://app.test:443/z", "http://app.test/z"),
            (f"http://{b}/x", f"http://{b}/x"),  # not the backend's scheme
            ("http://app.test:443/z", "http://app.test:443/z"),
            (f"https://127.0.0.1:{backend.port}/x", f"https://127.0.0.1:{backend.port}/x"),
        ],
    )


def test_no_rewrite_location(launch, make_backend, client, pki):
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch(
        "--backend",
        f"http://{b}",
        "--no-rewrite-location",
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
    )
    public = f"localhost:{proxy.port}"
    c = client(proxy.port, ssl_context=pki.client_context())
    same = [f"http://{b}/x", f"http://{public}/y", "http://localhost/z", "/rel"]
    check_urls(c, [(u, u) for u in same], host=public)
    check_redirect(c, f"http://{b}/moved", f"http://{b}/moved", host=public)


# --- redirects through routes that replace their prefix -------------------------------------


def test_path_mapping_undone_when_the_flags_decide_the_backend_scheme(launch, make_backend, client):
    """--no-backend-tls with https:// routes (or --backend-tls with http:// ones) makes the
    backend's origin another scheme than its routes spell. Its URLs are still mapped back
    through its routes: routes count as the same backend by how they name it, as they share
    one connection target."""
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch("--no-backend-tls", "--route", f"/api/=https://{b}/v2/")
    c = client(proxy.port)
    check_redirect(c, f"http://{b}/v2/x", "http://app.test/api/x", path="/api/redirect")


def test_route_prefix_mapped_back(launch, make_backend, client):
    api, versioned, plain = make_backend(), make_backend(), make_backend()
    a, v, p = (f"127.0.0.1:{x.port}" for x in (api, versioned, plain))
    proxy = launch(
        "--route",
        f"/api/=http://{a}/",
        "--route",
        f"/v/=http://{v}/v2/",
        "--route",
        f"/=http://{p}",
    )
    c = client(proxy.port)
    # /api/ -> /
    check_redirect(c, f"http://{a}/next?x=1", "http://app.test/api/next?x=1", path="/api/redirect")
    check_redirect(c, f"http://{a}/", "http://app.test/api/", path="/api/redirect")
    check_redirect(
        c, "http://app.test/by-host", "http://app.test/api/by-host", path="/api/redirect"
    )
    check_redirect(c, "/relative", "/relative", path="/api/redirect")
    check_redirect(c, "http://elsewhere.test/x", "http://elsewhere.test/x", path="/api/redirect")
    # /v/ -> /v2/
    check_redirect(c, f"http://{v}/v2/next#f", "http://app.test/v/next#f", path="/v/redirect")
    check_redirect(c, f"http://{v}/v2/", "http://app.test/v/", path="/v/redirect")
    check_redirect(c, "http://APP.test/v2/a/b?c", "http://app.test/v/a/b?c", path="/v/redirect")
    check_urls(c, [(f"http://{v}/v2/cl", "http://app.test/v/cl")], path="/v/respond")
    # / (no path in the route): only the origin changes
    check_redirect(c, f"http://{p}/other/x", "http://app.test/other/x", path="/redirect")
    # ... but not for a path of its that the /api/ route shadows: http://app.test/api/x would
    # lead to the other backend (it was rewritten so until session 23); no route leads there,
    # so it stays as it was, as nginx leaves a URL its proxy_redirect does not cover.
    check_redirect(c, f"http://{p}/api/x", f"http://{p}/api/x", path="/redirect")
    assert [r.target.split(b"?")[0] for r in versioned.requests] == [b"/v2/redirect"] * 3 + [
        b"/v2/respond"
    ]


def test_backend_with_a_path_mapped_back(launch, make_backend, client):
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch("--backend", f"http://{b}/app/")
    c = client(proxy.port)
    check_redirect(c, f"http://{b}/app/login?next=/app/x", "http://app.test/login?next=/app/x")
    check_redirect(c, "http://app.test/app/", "http://app.test/")
    assert [r.target.split(b"?")[0] for r in backend.requests] == [b"/app/redirect"] * 2


# --- Set-Cookie -----------------------------------------------------------------------------

COOKIES = [
    "sid=abc; Path=/app/x; Domain=backend.internal; HttpOnly; Secure; SameSite=Lax",
    "a=1; Domain=.backend.internal",
    "c=3; Domain=legacy.internal; Path=/oldstuff",
    "d=4; Domain=other.test; Path=/other",
    "e=Domain=backend.internal; Path=/else",  # the cookie's value, not an attribute
    "f=5; Expires=Wed, 21 Oct 2099 07:28:00 GMT; Domain=backend.internal; Max-Age=60",
    "g=6; Domain=sub.backend.internal",  # not the same domain
    "h=7; Path=/x/app/",  # /app/ not at the start
    "i=8",
]

COOKIES_REWRITTEN = [
    "sid=abc; Path=/x; Domain=example.com; HttpOnly; Secure; SameSite=Lax",
    "a=1; Domain=example.com",
    "c=3; Domain=legacy.example; Path=/newstuff",
    "d=4; Domain=other.test; Path=/other",
    "e=Domain=backend.internal; Path=/else",
    "f=5; Expires=Wed, 21 Oct 2099 07:28:00 GMT; Domain=example.com; Max-Age=60",
    "g=6; Domain=sub.backend.internal",
    "h=7; Path=/x/app/",
    "i=8",
]

COOKIE_FLAGS = [
    "--cookie-domain",
    "backend.internal=example.com",
    "--cookie-domain",
    "legacy.internal=legacy.example",
    "--cookie-path",
    "/app/=/",
    "--cookie-path",
    "/old=/new",
]


def cookies_seen(c: HttpClient, cookies: list[str]) -> list[str]:
    resp = c.request(
        simple_get(respond_target("/respond", [("Set-Cookie", v) for v in cookies]), HOST)
    )
    assert resp.status == 200, resp
    return [v.decode() for v in resp.values("set-cookie")]


def attributes(cookie: str) -> tuple[str, dict[str, str]]:
    """(name=value, {attribute name lower-cased: value})."""
    first, *rest = [part.strip() for part in cookie.split(";")]
    attrs = {}
    for part in rest:
        name, _, value = part.partition("=")
        attrs[name.strip().lower()] = value.strip()
    return first, attrs


def test_set_cookie_untouched_by_default(launch, make_backend, client):
    backend = make_backend()
    proxy = launch("--backend", f"http://127.0.0.1:{backend.port}")
    c = client(proxy.port)
    assert cookies_seen(c, COOKIES) == COOKIES


def test_set_cookie_domain_and_path_rewritten(launch, make_backend, client):
    backend = make_backend()
    proxy = launch("--backend", f"http://127.0.0.1:{backend.port}", *COOKIE_FLAGS)
    c = client(proxy.port)
    assert cookies_seen(c, COOKIES) == COOKIES_REWRITTEN


CASE_VARIANTS = [
    ("b=2; domain=BACKEND.Internal; path=/app/", "example.com", "/"),
    ("b=2; DOMAIN=.Backend.INTERNAL; PATH=/app/deep/er", "example.com", "/deep/er"),
    ("b=2;Domain=backend.internal;Path=/app/z", "example.com", "/z"),
]


def test_set_cookie_attribute_names_in_any_case(launch, make_backend, client):
    backend = make_backend()
    proxy = launch("--backend", f"http://127.0.0.1:{backend.port}", *COOKIE_FLAGS)
    c = client(proxy.port)
    for cookie, domain, path in CASE_VARIANTS:
        [got] = cookies_seen(c, [cookie])
        first, attrs = attributes(got)
        assert first == "b=2", (cookie, got)
        assert attrs == {"domain": domain, "path": path}, (cookie, got)


def test_set_cookie_rewritten_through_a_route(launch, make_backend, client):
    """Cookie rewriting applies to every route; the Location of the same answer is mapped
    back too."""
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch("--route", f"/app/=http://{b}/", *COOKIE_FLAGS)
    c = client(proxy.port)
    resp = c.request(
        simple_get(
            respond_target(
                "/app/respond",
                [
                    ("Set-Cookie", "s=1; Path=/; Domain=backend.internal"),
                    ("Location", f"http://{b}/home"),
                ],
                status=302,
            ),
            HOST,
        )
    )
    assert resp.status == 302, resp
    assert resp.values("set-cookie") == [b"s=1; Path=/; Domain=example.com"]
    assert resp.values("location") == [b"http://app.test/app/home"]
    [req] = backend.wait_for_requests(1)
    assert req.path == "/respond"


def test_rewriting_keeps_the_connection_and_body(launch, make_backend, client):
    """A rewritten response is still a well-framed response: its body arrives whole and the
    next request on the connection works (the body here is the request target echoed)."""
    backend = make_backend()
    b = f"127.0.0.1:{backend.port}"
    proxy = launch("--backend", f"http://{b}", *COOKIE_FLAGS)
    c = client(proxy.port)
    for i in range(3):
        target = respond_target(
            "/respond",
            [("Location", f"http://{b}/{i}"), ("Set-Cookie", "k=v; Domain=backend.internal")],
        )
        resp = c.request(simple_get(target, HOST))
        assert resp.status == 200
        assert resp.body == b"GET " + target.encode()
        assert resp.values("location") == [f"http://app.test/{i}".encode()]
        assert resp.values("set-cookie") == [b"k=v; Domain=example.com"]


def test_a_request_without_host_gets_a_path_only_location(launch, make_backend, client):
    """HTTP/1.0 has no Host: the backend's own URL was left in Location then, handing the
    client the backend's internal address. It becomes a path on the proxy (as nginx's
    proxy_redirect default makes it)."""
    api = make_backend()
    a = f"127.0.0.1:{api.port}"
    proxy = launch("--route", f"/api/=http://{a}/")
    c = client(proxy.port)
    target = redirect_target(f"http://{a}/next?x=1", "/api/redirect")
    c.send(f"GET {target} HTTP/1.0\r\n\r\n".encode())
    resp = c.read_response()
    assert resp.status == 302, resp
    assert resp.values("location") == [b"/api/next?x=1"]
