"""Routes, end to end: `--route PREFIX=URL` (repeatable) and `--backend URL` (= `--route /=URL`).

- the longest matching prefix wins, whatever the order on the command line; a prefix is a
  plain string prefix of the request path (the query does not take part);
- a route URL without a path forwards the request target unchanged; with a path, the route
  prefix is replaced by that path (`/api/x?q=1` -> `/x?q=1` or `/v2/x?q=1`); `--backend` may
  carry a path too;
- a request that matches no route gets 404 (one log line), nothing reaches a backend, and the
  connection goes on (after a GET, a POST with a body, an upgrade request);
- keep-alive (and pipelining) across routes: each request on one client connection reaches
  its own route's backend;
- WebSockets on two routes reach two different WsBackends (one of them stripping its prefix),
  including an upgrade after a plain request to another route on the same connection;
- bad --route values and a command line with neither --backend nor --route: one line, exit 2.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from peers import (
    HttpBackend,
    HttpClient,
    ProxyProcess,
    WsBackend,
    WsClient,
    header_tokens,
    header_values,
    parse_head,
    request_bytes,
    run_rawproxy,
    simple_get,
    ws_accept,
    ws_key,
)
from wsproto.events import CloseConnection

HOST = "app.test"

# --- fixtures and helpers -------------------------------------------------------------------


def url(backend: Any, path: str = "", scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{backend.port}{path}"


def route(prefix: str, backend: Any, path: str = "", scheme: str = "http") -> list[str]:
    return ["--route", f"{prefix}={url(backend, path, scheme)}"]


def targets(backend: HttpBackend) -> list[bytes]:
    return [r.target for r in backend.requests]


def get(c: HttpClient, target: str, host: str = HOST) -> bytes:
    """GET `target`; returns the body, which every HttpBackend path used here makes
    "GET <target as the backend received it>"."""
    resp = c.request(simple_get(target, host))
    assert resp.status == 200, (target, resp)
    return resp.body


def status_pattern(status: int) -> str:
    return rf"(?<![\w.]){status}(?![\w.])"


def assert_logged_once(proxy: ProxyProcess, since: int, status: int, after: str) -> None:
    """Exactly one log line since `since` names `status`, not counting the lines about the
    request to `after` (whose access line is awaited first, so that every earlier line of
    the proxy has been read)."""
    proxy.wait_for_log(re.escape(after), since=since)
    lines = [ln for ln in proxy.logs_matching(status_pattern(status), since) if after not in ln]
    assert len(lines) == 1, f"expected one line naming {status}:\n{proxy.log_text(since)}"


def websocket_head(path: str, host: str = HOST) -> tuple[bytes, str]:
    key = ws_key()
    head = request_bytes(
        "GET",
        path,
        [
            ("Host", host),
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
            ("Origin", f"http://{host}"),
        ],
    )
    return head, key


def open_websocket(c: HttpClient, path: str) -> WsClient:
    head, key = websocket_head(path)
    c.send(head)
    status, _, headers, raw = c.read_head()
    assert status == 101, raw
    assert header_values(headers, "sec-websocket-accept") == [ws_accept(key)], raw
    leftover = bytes(c.buf)
    c.buf.clear()
    return WsClient(c.sock, leftover)


def assert_echoes(ws: WsClient, tag: str) -> None:
    for message in [f"hello {tag}", f"ünïcödé {tag}".encode(), "x" * 70_000]:
        ws.send(message)
        assert ws.recv() == message


def handshake_target(head: bytes) -> bytes:
    start, _ = parse_head(head)
    method, target, _version = start.split(b" ")
    assert method == b"GET"
    return target


# --- matching -------------------------------------------------------------------------------


def test_longest_prefix_wins_whatever_the_order(launch, make_backend, client):
    root, api, v2 = make_backend(), make_backend(), make_backend()
    proxy = launch(*route("/", root), *route("/api/v2/", v2), *route("/api/", api))
    c = client(proxy.port)
    sent = {
        "/api/x": api,
        "/api/v2/x?q=1": v2,
        "/api/v2/": v2,
        "/api/v2": api,  # "/api/v2" does not start with "/api/v2/"
        "/api/": api,
        "/api": root,
        "/apix": root,
        "/": root,
        "/other?next=/api/x": root,  # the query takes no part in matching
    }
    for target in sent:
        assert get(c, target) == b"GET " + target.encode()
    for backend in (root, api, v2):
        want = [t.encode() for t, b in sent.items() if b is backend]
        assert targets(backend) == want, f"backend {backend.port} got {targets(backend)}"


def test_prefix_is_a_plain_string_prefix(launch, make_backend, client):
    static, rest = make_backend(), make_backend()
    proxy = launch(*route("/static", static), *route("/", rest))
    c = client(proxy.port)
    for target in [
        "/static",
        "/static.css",
        "/static/app.js",
        "/staticky?x",
        "/stat",
        "/x",
        "/STATIC/app.js",  # a string prefix: case matters
    ]:
        get(c, target)
    assert targets(static) == [b"/static", b"/static.css", b"/static/app.js", b"/staticky?x"]
    assert targets(rest) == [b"/stat", b"/x", b"/STATIC/app.js"]


def test_absolute_form_is_routed_by_its_path(launch, make_backend, client):
    """A request target in absolute form (RFC 9112, 3.2.2) is matched on its path and sent in
    origin form, its authority as Host (a server ignores Host beside an absolute target: the
    backend must not see two hosts), as nginx does."""
    strip, plain = make_backend(), make_backend()
    proxy = launch(*route("/api/", strip, "/"), *route("/", plain))
    c = client(proxy.port)
    assert get(c, "http://app.test/api/x?q=1", "other.test") == b"GET /x?q=1"
    assert get(c, "HTTP://App.Test:8080/other", "other.test") == b"GET /other"
    assert targets(strip) == [b"/x?q=1"]
    assert targets(plain) == [b"/other"]
    hosts = [header_values(r.headers, "host") for r in strip.requests + plain.requests]
    assert hosts == [[b"app.test"], [b"App.Test:8080"]]
    forwarded = [header_values(r.headers, "x-forwarded-host") for r in plain.requests]
    assert forwarded == [[b"App.Test:8080"]]


def test_routes_match_the_path_as_the_backend_reads_it(launch, make_backend, client):
    """A prefix is matched after percent-encoded unreserved characters and slashes are decoded
    and runs of slashes merged, as nginx matches a location: `/%61dmin/`, `//admin/` and
    `/admin%2F` are /admin/ to backends, so they must not slip past an /admin/ route (an
    auth proxy, say) to the / one. The target goes on as the client wrote it; with a mapped
    prefix, what follows the prefix does."""
    admin, api, root = make_backend(), make_backend(), make_backend()
    proxy = launch(*route("/admin/", admin), *route("/api/", api, "/v2/"), *route("/", root))
    c = client(proxy.port)
    sent = {
        "/%61dmin/x": (admin, b"/%61dmin/x"),
        "/%61%64min/": (admin, b"/%61%64min/"),
        "//admin/x?a=b": (admin, b"//admin/x?a=b"),
        "/admin//x": (admin, b"/admin//x"),
        "/%61pi/x%2Fy?q=%61": (api, b"/v2/x%2Fy?q=%61"),
        "///api/x": (api, b"/v2/x"),
        # An encoded slash is a slash to many backends (WSGI's PATH_INFO) and to nginx: the
        # /api/ route's, and its mapping is nginx's too (what follows the decoded prefix).
        "/api%2Fx": (api, b"/v2/x"),
        "/admin%2fx": (admin, b"/admin%2fx"),
        "/admin/%2F%2Fx": (admin, b"/admin/%2F%2Fx"),
        # Read so by some backends, not by nginx: a backslash is a slash (IIS), and a
        # segment's ;parameters are no part of its name (Tomcat reads /admin;x/y as /admin/y).
        "/admin\\x": (admin, b"/admin\\x"),
        "/admin%5cx": (admin, b"/admin%5cx"),
        "/admin;jsessionid=1/y": (admin, b"/admin;jsessionid=1/y"),
        "/api;v=1/x": (api, b"/v2/x"),
        "/adminx;/": (root, b"/adminx;/"),
        "/%41dmin/": (root, b"/%41dmin/"),  # %41 is "A": case matters
        "/adm%20in/": (root, b"/adm%20in/"),
    }
    for target, (_backend, want) in sent.items():
        assert get(c, target) == b"GET " + want, target
    for backend in (admin, api, root):
        assert targets(backend) == [want for b, want in sent.values() if b is backend]


@pytest.mark.parametrize(
    "target",
    ["/static/../admin", "/static/%2e%2E/admin", "/static/./../admin", "/static/x/../../admin"],
)
def test_dot_segments_cannot_climb_out_of_a_route(launch, make_backend, client, target):
    """`..` is resolved before the route is chosen (nginx, Apache): /static/../admin is /admin,
    routed and sent as such; the mapped /files/ prefix is never climbed out of."""
    files, rest = make_backend(), make_backend()
    proxy = launch(*route("/static/", files, "/files/"), *route("/", rest))
    c = client(proxy.port)
    assert get(c, target) == b"GET /admin"
    assert get(c, "/static/a/./b/../c.css?p=/../x") == b"GET /files/a/c.css?p=/../x"
    assert targets(files) == [b"/files/a/c.css?p=/../x"]
    assert targets(rest) == [b"/admin"]


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/static/../../etc/passwd", b"climbs above the root"),
        ("/static/..%2F..%2Fetc/passwd", b"disguised dot segment"),
        ("/static/..;/admin", b"disguised dot segment"),
        ("/static/..\\admin", b"disguised dot segment"),
    ],
)
def test_dot_segments_that_climb_out_are_refused(launch, make_backend, client, target, why):
    """Above the root, or disguised (an encoded slash, a backslash, a `;` parameter) so that
    a backend decoding them would climb out of the route's /files/: 400, nothing forwarded."""
    files = make_backend()
    proxy = launch(*route("/static/", files, "/files/"))
    c = client(proxy.port)
    resp = c.request(simple_get(target))
    assert resp.status == 400
    assert why in resp.body
    assert targets(files) == []


def test_backend_is_shorthand_for_the_root_route(launch, make_backend, client):
    root, api = make_backend(), make_backend()
    proxy = launch("--backend", url(root), *route("/api/", api))
    c = client(proxy.port)
    for target in ["/api/a", "/b", "/api", "/api/c?d=e"]:
        get(c, target)
    assert targets(api) == [b"/api/a", b"/api/c?d=e"]
    assert targets(root) == [b"/b", b"/api"]


def test_start_up_route_line_brackets_ipv6_addresses(launch):
    """Fixed (session 24): the start-up line naming a route's addresses wrote an IPv6 one
    bare, `::1:9`, which reads as no address at all; it is bracketed as everywhere else."""
    proxy = launch("--backend", "http://[::1]:9", "--route", "/v4/=http://127.0.0.1:9")
    proxy.wait_for_log(re.escape("route / -> http://[::1]:9 ([::1]:9)"))
    proxy.wait_for_log(re.escape("route /v4/ -> http://127.0.0.1:9 (127.0.0.1:9)"))


# --- rewriting the request target -----------------------------------------------------------


def test_route_with_a_path_replaces_the_prefix(launch, make_backend, client):
    strip, versioned, plain = make_backend(), make_backend(), make_backend()
    proxy = launch(
        *route("/api/", strip, "/"),
        *route("/v/", versioned, "/v2/"),
        *route("/", plain),
    )
    c = client(proxy.port)
    cases = [
        ("/api/x?q=1", strip, b"/x?q=1"),
        ("/api/", strip, b"/"),
        ("/api/a/b/c?x=/api/", strip, b"/a/b/c?x=/api/"),
        ("/v/x?q=1", versioned, b"/v2/x?q=1"),
        ("/v/", versioned, b"/v2/"),
        ("/v/deep/er", versioned, b"/v2/deep/er"),
        ("/api", plain, b"/api"),  # matches only "/": forwarded unchanged
        ("/y?z=1", plain, b"/y?z=1"),
    ]
    for target, _backend, want in cases:
        assert get(c, target) == b"GET " + want, target
    for backend in (strip, versioned, plain):
        assert targets(backend) == [want for _, b, want in cases if b is backend]


def test_backend_with_a_path(launch, make_backend, client):
    app = make_backend()
    proxy = launch("--backend", url(app, "/app/"))
    c = client(proxy.port)
    for target in ["/x", "/x?q=1", "/", "/a/b"]:
        get(c, target)
    assert targets(app) == [b"/app/x", b"/app/x?q=1", b"/app/", b"/app/a/b"]


def test_route_path_with_a_post_body(launch, make_backend, client):
    api = make_backend()
    proxy = launch(*route("/api/", api, "/"))
    c = client(proxy.port)
    body = b"0123456789" * 10_000
    resp = c.request(
        request_bytes(
            "POST", "/api/echo", [("Host", HOST), ("Content-Length", str(len(body)))], body
        ),
        "POST",
    )
    assert (resp.status, resp.body) == (200, body)
    [req] = api.wait_for_requests(1)
    assert (req.method, req.target, req.body) == (b"POST", b"/echo", body)


# --- no route: 404, and the connection goes on ----------------------------------------------


@pytest.fixture
def api_only(launch, make_backend) -> tuple[ProxyProcess, HttpBackend]:
    api = make_backend()
    return launch(*route("/api/", api)), api


def test_no_route_is_404_and_the_connection_goes_on(api_only, client):
    proxy, api = api_only
    mark = proxy.mark()
    c = client(proxy.port)
    resp = c.request(simple_get("/nowhere?x=1", HOST))
    assert resp.status == 404, resp
    assert get(c, "/api/ok") == b"GET /api/ok"
    resp = c.request(simple_get("/api", HOST))  # "/api" is not under "/api/"
    assert resp.status == 404, resp
    assert get(c, "/api/again") == b"GET /api/again"
    assert targets(api) == [b"/api/ok", b"/api/again"], "a 404'd request reached the backend"
    proxy.wait_for_log(re.escape("/api/again"), since=mark)
    lines = [ln for ln in proxy.logs_matching(status_pattern(404), mark) if "/api/ok" not in ln]
    lines = [ln for ln in lines if "/api/again" not in ln]
    assert len(lines) == 2, f"expected one line per 404:\n{proxy.log_text(mark)}"


def test_no_route_for_a_request_with_a_body(api_only, client):
    """The 404'd request's body is not taken for the next request: it is read and dropped."""
    proxy, api = api_only
    mark = proxy.mark()
    c = client(proxy.port)
    body = b"GET /api/smuggled HTTP/1.1\r\nHost: app.test\r\n\r\n"
    resp = c.request(
        request_bytes(
            "POST", "/nowhere", [("Host", HOST), ("Content-Length", str(len(body)))], body
        ),
        "POST",
    )
    assert resp.status == 404, resp
    assert get(c, "/api/after") == b"GET /api/after"
    assert targets(api) == [b"/api/after"], "the 404'd body reached the backend as a request"
    assert_logged_once(proxy, mark, 404, "/api/after")


@pytest.mark.parametrize("body", [b"", b"sent-at-once"], ids=["no-body", "body-not-waited"])
def test_no_route_with_expect_100_continue_goes_on_when_nothing_waits(api_only, client, body):
    """Expect: 100-continue with no body, or with the body sent without waiting for the 100:
    the 404 goes as for any request, and the connection goes on. (A client that does wait
    for the 100 gets the 404 at once and a closed connection; test_e2e_adversarial.)"""
    proxy, api = api_only
    c = client(proxy.port)
    headers = [("Host", HOST), ("Expect", "100-continue"), ("Content-Length", str(len(body)))]
    resp = c.request(request_bytes("POST", "/nowhere", headers, body), "POST")
    assert resp.status == 404, resp
    assert header_tokens(resp.headers, "connection") != [b"close"], resp
    assert get(c, "/api/after") == b"GET /api/after"
    assert targets(api) == [b"/api/after"]


def test_no_route_for_an_upgrade_request(api_only, client):
    proxy, api = api_only
    mark = proxy.mark()
    c = client(proxy.port)
    head, _ = websocket_head("/ws/chat")
    resp = c.request(head)
    assert resp.status == 404, resp
    assert get(c, "/api/after-upgrade") == b"GET /api/after-upgrade"
    assert targets(api) == [b"/api/after-upgrade"]
    assert_logged_once(proxy, mark, 404, "/api/after-upgrade")


@pytest.mark.parametrize(
    "body",
    [b"Content-Length: 1000\r\n\r\nabc", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel"],
    ids=["content-length", "chunked"],
)
def test_no_route_for_a_body_that_stalls(launch, make_backend, body):
    """The rest of a 404'd request's body is read before the answer, and nothing timed that
    wait: a client that stopped sending in the middle of it held its connection for as long
    as it liked (still open after 8 s with every timeout at 1-2 s). It gets the same 408 as
    a proxied request's body that stalls, after --response-timeout without a byte."""
    api = make_backend()
    proxy = launch(*route("/api/", api), "--header-timeout", "1", "--response-timeout", "1")
    mark = proxy.mark()
    c = HttpClient(proxy.port, timeout=10)
    try:
        c.send(b"POST /nowhere HTTP/1.1\r\nHost: app.test\r\n" + body)
        resp = c.read_response("POST")
    finally:
        c.close()
    assert resp.status == 408, resp
    line = proxy.wait_for_log(status_pattern(408), since=mark)
    assert "/nowhere" in line
    assert "request body" in line
    assert not api.heads


def test_no_route_keeps_other_clients_served(api_only, client):
    proxy, _api = api_only
    first, second = client(proxy.port), client(proxy.port)
    assert first.request(simple_get("/x", HOST)).status == 404
    assert get(second, "/api/y") == b"GET /api/y"
    assert get(first, "/api/z") == b"GET /api/z"


def test_many_pipelined_requests_without_a_route(api_only, client):
    """Each 404 used to answer the next pipelined request from inside its own handling (the
    answer, the next request, its answer, ...): about 140 pipelined 404s deep, Python's
    recursion limit aborted the connection with a RecursionError traceback in the log, and
    the client lost the rest of its answers. Now each is answered in turn."""
    proxy, api = api_only
    mark = proxy.mark()
    c = client(proxy.port, timeout=10)
    count = 500
    c.send(simple_get("/nowhere", HOST) * count + simple_get("/api/after", HOST))
    statuses = [c.read_response().status for _ in range(count)]
    assert statuses == [404] * count
    assert c.read_response().body == b"GET /api/after"
    assert get(c, "/api/again") == b"GET /api/again"
    assert targets(api) == [b"/api/after", b"/api/again"]
    proxy.wait_for_log(re.escape("/api/again"), since=mark)
    assert "Traceback" not in proxy.log_text(mark)


# --- keep-alive across routes ---------------------------------------------------------------


@pytest.fixture
def two_routes(launch, make_backend) -> tuple[ProxyProcess, HttpBackend, HttpBackend]:
    a, b = make_backend(), make_backend()
    return launch(*route("/a/", a, "/"), *route("/b/", b)), a, b


def test_keep_alive_across_routes(two_routes, client):
    proxy, a, b = two_routes
    c = client(proxy.port)
    assert get(c, "/a/1") == b"GET /1"
    assert get(c, "/b/2") == b"GET /b/2"
    assert get(c, "/a/3") == b"GET /3"
    assert get(c, "/b/4") == b"GET /b/4"
    body = b"payload"
    resp = c.request(
        request_bytes("POST", "/a/echo", [("Host", HOST), ("Content-Length", "7")], body), "POST"
    )
    assert (resp.status, resp.body) == (200, body)
    assert get(c, "/b/5") == b"GET /b/5"
    assert targets(a) == [b"/1", b"/3", b"/echo"]
    assert targets(b) == [b"/b/2", b"/b/4", b"/b/5"]


def test_pipelined_requests_across_routes(two_routes, client):
    proxy, a, b = two_routes
    c = client(proxy.port)
    sent = ["/a/1", "/b/2", "/b/3", "/a/4", "/a/5", "/b/6"]
    c.send(b"".join(simple_get(t, HOST) for t in sent))
    bodies = [c.read_response().body for _ in sent]
    assert bodies == [b"GET /1", b"GET /b/2", b"GET /b/3", b"GET /4", b"GET /5", b"GET /b/6"]
    assert targets(a) == [b"/1", b"/4", b"/5"]
    assert targets(b) == [b"/b/2", b"/b/3", b"/b/6"]


def test_keep_alive_across_routes_with_connection_close_on_one(two_routes, client):
    """A backend closing after its answer does not end the client's connection."""
    proxy, a, b = two_routes
    c = client(proxy.port)
    assert get(c, "/b/1") == b"GET /b/1"
    resp = c.request(simple_get("/a/close", HOST))  # reaches a as /close
    assert (resp.status, resp.body) == (200, b"closing")
    assert get(c, "/b/2") == b"GET /b/2"
    assert get(c, "/a/3") == b"GET /3"
    assert targets(a) == [b"/close", b"/3"]
    assert targets(b) == [b"/b/1", b"/b/2"]


# --- WebSockets on two routes ---------------------------------------------------------------


def test_websockets_on_two_routes_reach_two_backends(launch, make_backend, client):
    ws_a, ws_b, http = make_backend(WsBackend), make_backend(WsBackend), make_backend()
    proxy = launch(
        *route("/ws/a/", ws_a, scheme="ws"),
        *route("/ws/b/", ws_b, "/", scheme="http"),
        *route("/", http),
    )
    # an upgrade after a plain request to another route, on the same connection
    first = client(proxy.port)
    assert get(first, "/page") == b"GET /page"
    sock_a = open_websocket(first, "/ws/a/chat?room=1")
    second = client(proxy.port)
    sock_b = open_websocket(second, "/ws/b/chat?room=2")
    assert_echoes(sock_a, "a")
    assert_echoes(sock_b, "b")
    assert_echoes(sock_a, "a again")
    for ws in (sock_a, sock_b):
        closing = ws.close()
        assert isinstance(closing, CloseConnection)
        assert closing.code == 1000
    [head_a] = ws_a.wait_handshakes(1)
    [head_b] = ws_b.wait_handshakes(1)
    assert handshake_target(head_a) == b"/ws/a/chat?room=1"
    assert handshake_target(head_b) == b"/chat?room=2"
    for head in (head_a, head_b):
        _, headers = parse_head(head)
        assert header_tokens(headers, "connection") == [b"upgrade"], head
        assert header_values(headers, "upgrade") == [b"websocket"], head
        assert header_values(headers, "host") == [HOST.encode()], head
    assert targets(http) == [b"/page"]


def test_plain_request_after_a_refused_upgrade_on_another_route(launch, make_backend, client):
    """Upgrade detection on a route whose backend refuses: the answer reaches the client and
    the connection goes on as HTTP, to another route."""
    refusing, other = make_backend(), make_backend()
    proxy = launch(*route("/r/", refusing, "/"), *route("/", other))
    c = client(proxy.port)
    head, _ = websocket_head("/r/refuse/426")
    resp = c.request(head)
    assert (resp.status, resp.body) == (426, b"upgrade refused")
    assert get(c, "/next") == b"GET /next"
    [refused] = refusing.wait_for_requests(1)
    assert refused.target == b"/refuse/426"
    assert refused.values("upgrade") == [b"websocket"]
    assert targets(other) == [b"/next"]


# --- bad command lines ----------------------------------------------------------------------


def assert_one_line_error(done, *mentions: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"exit 0 for a bad start-up; stderr: {done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{done.stderr}"
    for word in mentions:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


@pytest.mark.parametrize(
    "value",
    [
        "/api/",  # no URL
        "api/=http://127.0.0.1:9",  # the prefix must start with "/"
        "/api/=ftp://127.0.0.1:21",  # unknown scheme
        "/api/=http://",  # no host
        "/api/=http://127.0.0.1:99999",  # bad port
    ],
)
def test_bad_route_is_one_line(value):
    done = run_rawproxy("--listen", "127.0.0.1:0", "--route", value)
    assert_one_line_error(done, "--route")
    assert done.returncode == 2


def test_neither_backend_nor_route_is_one_line():
    done = run_rawproxy("--listen", "127.0.0.1:0")
    assert_one_line_error(done)
    assert "--backend" in done.stderr or "--route" in done.stderr, done.stderr
    assert done.returncode == 2
