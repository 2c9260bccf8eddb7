"""Routes and backend selection, from a review (session 23) that wrote tests to find bugs.

A docstring starting "Fixed:" says what was wrong before its fix, what is expected and the
evidence. The others cover ground no other test file covers:

- a backend name that resolves to several addresses (IPv6 first, as `localhost` does on most
  systems): here the resolver is replaced, in the proxy process only, by a `sitecustomize`
  module put on its PYTHONPATH, which answers `dual.test` with `::1` then `127.0.0.1`;
  everything after resolution is the real code;
- Location rewriting with several routes to the same backend, and behind a TLS listener;
- route prefixes that no request can reach, and prefixes that match the same requests;
- one keep-alive client connection whose pipelined requests alternate between a plain route,
  a TLS route (verified with --backend-ca) and a WebSocket route.

Observations quoted below were made on this machine with nginx 1.22.1 (a temporary
`master_process off` instance on loopback, as tests/test_differential_peers.py runs it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import (
    HttpClient,
    WsBackend,
    WsClient,
    header_values,
    redirect_target,
    refused_port,
    request_bytes,
    run_rawproxy,
    simple_get,
    websocket_request,
    ws_accept,
    ws_key,
)
from tls_peers import Pki

HOST = "app.test"
DUAL = "dual.test"  # resolved to ::1, then 127.0.0.1, by the sitecustomize below

SITECUSTOMIZE = '''\
"""Test-only resolver: names in RAWPROXY_TEST_HOSTS (NAME=ADDR,ADDR;...) resolve to those
addresses, in that order; every other name as usual."""
import os
import socket

_real = socket.getaddrinfo
_names = {}
for _item in os.environ.get("RAWPROXY_TEST_HOSTS", "").split(";"):
    if _item:
        _name, _, _addrs = _item.partition("=")
        _names[_name] = _addrs.split(",")


def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    if host not in _names:
        return _real(host, port, family, type, proto, flags)
    out = []
    for address in _names[host]:
        if ":" in address:
            out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0)))
        else:
            out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port))))
    return out


socket.getaddrinfo = getaddrinfo
'''


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-review-routes"))


@pytest.fixture
def dual_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which the proxy resolves `dual.test` to ::1 first, then 127.0.0.1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{site}{os.pathsep}{path}" if path else str(site),
        "RAWPROXY_TEST_HOSTS": f"{DUAL}=::1,127.0.0.1",
    }


@pytest.fixture
def ipv6_sockets() -> Iterator[list[socket.socket]]:
    """Sockets on ::1 (skipped where there is no IPv6 loopback); closed at teardown."""
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def bind_v6(socks: list[socket.socket], port: int) -> socket.socket:
    """A socket bound to [::1]:port (not listening: a connection to it is refused)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    socks.append(sock)
    try:
        sock.bind(("::1", port))
    except OSError as e:
        pytest.skip(f"[::1]:{port} is taken: {e}")
    return sock


def blackhole_v6(socks: list[socket.socket], port: int) -> None:
    """[::1]:port where connecting hangs: a listener with a full accept queue (backlog 0 and
    connections never accepted), so that the kernel drops further SYNs."""
    listener = bind_v6(socks, port)
    listener.listen(0)
    for _ in range(3):
        filler = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        socks.append(filler)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("::1", port))
    probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    probe.settimeout(0.3)
    try:
        probe.connect(("::1", port))
    except TimeoutError:
        return
    except OSError:
        pass
    finally:
        probe.close()
    pytest.skip("cannot make a connect to [::1] hang here")


def route(
    prefix: str, backend: Any, path: str = "", scheme: str = "http", host: str = ""
) -> list[str]:
    return ["--route", f"{prefix}={scheme}://{host or '127.0.0.1'}:{backend.port}{path}"]


def location_of(c: HttpClient, path: str, to: str, host: str = HOST) -> str:
    """The Location the client gets for a backend redirect to `to`, asked at `path`."""
    resp = c.request(simple_get(redirect_target(to, path), host))
    assert resp.status == 302, resp
    location = resp.header("location")
    assert location is not None, resp.headers
    return location.decode()


def follow(c: HttpClient, location: str, origin: str) -> bytes:
    """GET the path of `location` (which starts with `origin`) through the proxy; the body
    HttpBackend answers is "GET <target it received>"."""
    assert location.startswith(origin), (location, origin)
    resp = c.request(simple_get(location[len(origin) :] or "/", HOST))
    assert resp.status == 200, resp
    return resp.body


def one_line_error(done: Any) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.stderr}"
    return lines[0]


# --- a backend name with several addresses --------------------------------------------------


@pytest.mark.timeout(30)
def test_refused_first_address_falls_back_to_the_next(
    run_proxy, make_backend, client, dual_env, ipv6_sockets
):
    """Not covered elsewhere: a backend name resolving to [::1, 127.0.0.1] where only
    127.0.0.1 listens ([::1] refuses): every request reaches the backend through the second
    address, with no error answer and no warning, on fresh and kept-alive client connections
    and after a request to another route."""
    backend, other = make_backend(), make_backend()
    bind_v6(ipv6_sockets, backend.port)  # [::1]:port refuses
    proxy = run_proxy(
        "--listen",
        "127.0.0.1:0",
        *route("/d/", backend, "/", host=DUAL),
        *route("/", other),
        env=dual_env,
    )
    mark = proxy.mark()
    c = client(proxy.port)
    for target, body in [("/d/1", b"GET /1"), ("/o", b"GET /o"), ("/d/2", b"GET /2")]:
        resp = c.request(simple_get(target, HOST))
        assert (resp.status, resp.body) == (200, body), resp
    resp = client(proxy.port).request(simple_get("/d/3", HOST))
    assert (resp.status, resp.body) == (200, b"GET /3"), resp
    assert [r.target for r in backend.requests] == [b"/1", b"/2", b"/3"]
    assert not proxy.logs_matching(r"WARNING|ERROR", since=mark), proxy.log_text(mark)


@pytest.mark.timeout(30)
def test_connect_timeout_on_one_address_tries_the_next(
    run_proxy, make_backend, client, dual_env, ipv6_sockets
):
    """Fixed: a backend name resolving to [::1, 127.0.0.1] whose first address does not
    answer (SYNs dropped: a firewall DROP rule, an unrouted IPv6 network) got 502 after
    --connect-timeout on every request, although 127.0.0.1 serves: a connect timeout ended
    the attempt where a refused connect went on to the next address. Now the next address
    is tried, as for a refusal. Evidence: nginx with the same two addresses as
    upstream servers (what it makes of a name with several addresses) and
    `proxy_connect_timeout 1s`, [::1] blackholed the same way, answered 200 after 1 s and
    logged "upstream timed out (110: Connection timed out) while connecting to upstream ...
    upstream: "http://[::1]:PORT/x"" before using 127.0.0.1."""
    backend = make_backend()
    blackhole_v6(ipv6_sockets, backend.port)
    proxy = run_proxy(
        "--listen",
        "127.0.0.1:0",
        "--connect-timeout",
        "1",
        *route("/", backend, host=DUAL),
        env=dual_env,
    )
    c = client(proxy.port, timeout=10)
    started = time.monotonic()
    resp = c.request(simple_get("/x", HOST))
    took = time.monotonic() - started
    assert (resp.status, resp.body) == (200, b"GET /x"), (
        f"{resp.status} after {took:.1f}s; 127.0.0.1 was never tried:\n{proxy.log_text()}"
    )
    assert [r.target for r in backend.requests] == [b"/x"]


@pytest.mark.timeout(30)
def test_connect_failure_log_names_the_addresses_tried(run_proxy, client, dual_env, ipv6_sockets):
    """Fixed (diagnostics): when every address of a backend name refused, the 502's one log
    line said `cannot connect to backend http://dual.test:PORT: Connection refused`: the
    reason of the last address only, and neither address, so an admin could not tell that
    [::1] was tried (the usual surprise with `localhost`) nor which address refused. The
    line now names each address tried with what it answered. Evidence: nginx names the
    address in its error line (`connect() failed (111: Connection refused) while connecting
    to upstream, ... upstream: "http://[::1]:PORT/..."`, observed here), HAProxy the server
    it tried."""
    holder, port = refused_port()  # 127.0.0.1:port refuses
    try:
        bind_v6(ipv6_sockets, port)  # and so does [::1]:port
        proxy = run_proxy(
            "--listen", "127.0.0.1:0", "--backend", f"http://{DUAL}:{port}", env=dual_env
        )
        mark = proxy.mark()
        resp = client(proxy.port).request(simple_get("/x", HOST))
        assert resp.status == 502, resp
        line = proxy.wait_for_log(r"\b502\b", since=mark)
    finally:
        holder.close()
    assert "::1" in line, f"[::1] not named: {line}"
    assert "127.0.0.1" in line, f"127.0.0.1 not named: {line}"


# --- Location rewriting through several routes ----------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("page", ["/login", "/app2"], ids=["other-page", "base-without-slash"])
def test_location_outside_the_route_mapping_is_not_sent_to_another_backend(
    launch, make_backend, client, page
):
    """Fixed: routes /app/ -> http://A/app2/, /c/ -> http://A/ and / -> http://B. A request
    on /app/ is redirected by A to `http://A/login` (a page of A outside /app2/). rawproxy
    rewrote it to `http://app.test/login`, which the proxy routes to B: the client was sent
    to another application. The route's mapping cannot be undone for a path outside its
    backend path (http.py `rewrite_url` changed the origin whether or not the path started
    with `backend_path`; now http.map_back tries every route to A). Expected: the URL is
    mapped back through a route that reaches A at /login (here /c/:
    `http://app.test/c/login`), or left as it was. Evidence: nginx with the
    same locations and `proxy_redirect default` leaves `http://A/login` unchanged (observed
    here); Apache's ProxyPassReverse rewrites only URLs that start with a configured backend
    URL, trying each ProxyPassReverse line. The same goes for `http://A/app2`, the route's
    backend path without its slash (an app's redirect to its own base URL): it becomes
    `http://app.test/app2`, which B got."""
    a, b = make_backend(), make_backend()
    proxy = launch(*route("/app/", a, "/app2/"), *route("/c/", a, "/"), *route("/", b))
    c = client(proxy.port)
    backend_url = f"http://127.0.0.1:{a.port}{page}"
    location = location_of(c, "/app/redirect", backend_url)
    if location != backend_url:
        follow(c, location, f"http://{HOST}")
        assert a.requests[-1].target == page.encode(), (
            f"Location {location!r} does not lead to A's {page}"
        )
    assert b.requests == [], f"B was reached: {[r.target for r in b.requests]}"


@pytest.mark.timeout(30)
def test_location_mapped_back_through_the_most_specific_route(launch, make_backend, client):
    """Fixed: routes / -> http://A and /api/ -> http://A/api/v2/. A page served through /
    redirects to A's own `http://A/api/v2/x`. rawproxy undid only the mapping of the route
    the request took (/ : none) and sent `http://app.test/api/v2/x`, which the proxy itself
    maps to A's `/api/v2/v2/x`: a different resource (a 404 or worse). Expected: the
    Location leads back to A's /api/v2/x through the proxy, i.e. it is mapped back through
    the most specific route whose backend URL covers it: `http://app.test/api/x`. Evidence:
    the proxy's own forward mapping (GET /api/x reaches A as /api/v2/x, checked below);
    Apache's ProxyPassReverse applies every configured mapping, not only the one of the
    location that served the request. (nginx's `proxy_redirect default` is per location and
    does as rawproxy does here, so this is the weaker of the two Location findings.) The
    fault is in session.py `_response_rewrite`, which builds the rule from `self.route`
    alone."""
    a = make_backend()
    proxy = launch(*route("/", a), *route("/api/", a, "/api/v2/"))
    c = client(proxy.port)
    assert follow(c, f"http://{HOST}/api/x", f"http://{HOST}") == b"GET /api/v2/x"
    location = location_of(c, "/redirect", f"http://127.0.0.1:{a.port}/api/v2/x")
    assert follow(c, location, f"http://{HOST}") == b"GET /api/v2/x", (
        f"Location {location!r} leads elsewhere"
    )


@pytest.mark.timeout(30)
def test_tls_listener_maps_back_an_https_location_on_the_clients_host(
    launch, make_backend, client, pki
):
    """Fixed: behind a TLS listener, route /api/ -> http://A/ and / -> http://B. rawproxy
    tells A `X-Forwarded-Proto: https`; an app that honours it (Django's
    SECURE_PROXY_SSL_HEADER, Rails, Express `trust proxy`: the usual production set-up)
    redirects to `https://localhost/login` on the Host it was sent. rawproxy left that URL
    as it was, so the client landed on B's /login; the same app's `http://localhost/login`
    (not told the scheme) is mapped back to `https://localhost/api/login`. The Host the
    backend was sent counts as the backend's origin only under the backend's own scheme
    (session.py `_response_rewrite`: `origin_of_host(target.origin[0], sent_host)`), not
    under the scheme rawproxy itself announced. Expected: the README's "pointing ... at the
    Host it was sent ... rewritten ... with the route's path mapping undone" for both
    spellings: `https://localhost/api/login`."""
    a, b = make_backend(), make_backend()
    proxy = launch(
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
        *route("/api/", a, "/"),
        *route("/", b),
    )
    c = client(proxy.port, ssl_context=pki.client_context())
    host = "localhost"
    unaware = location_of(c, "/api/redirect", f"http://{host}/login", host=host)
    assert unaware == f"https://{host}/api/login"  # as documented: mapped back
    [told] = a.requests
    assert told.header("x-forwarded-proto") == b"https"
    aware = location_of(c, "/api/redirect", f"https://{host}/login", host=host)
    assert aware == f"https://{host}/api/login", (
        f"{aware!r}: the path mapping was not undone; followed, it reaches B"
    )


# --- route prefixes -------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_prefix_with_a_space_is_refused_or_matches_the_encoded_path(launch, make_backend, client):
    """Fixed: `--route "/my app/=URL"` was accepted (config.py `parse_route` checked only the
    leading slash), but no request can reach it: a request target has no spaces, and
    `/my%20app/x` is matched without decoding %20 (http.py `_route_path` decodes unreserved
    characters only), so it silently went to the / route. Now refused at start-up (one line,
    as the other bad --route values), with the hint to write it `/my%20app/`.
    Evidence: nginx's `location "/my app/"` takes `/my%20app/x` (it matches the decoded
    URI; observed here); rawproxy sent it to the / route's backend."""
    spaced, root = make_backend(), make_backend()
    args = [*route("/my app/", spaced), *route("/", root)]
    done = run_rawproxy("--listen", "127.0.0.1:0", "--check-config", "/dev/null", *args)
    if done.returncode != 0:
        assert "--route" in one_line_error(done)
        return
    proxy = launch(*args)
    resp = client(proxy.port).request(simple_get("/my%20app/x", HOST))
    assert resp.status == 200, resp
    assert [r.target for r in spaced.requests] == [b"/my%20app/x"], (
        f"accepted at start-up, yet the / route got it: {[r.target for r in root.requests]}"
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "prefix",
    ["/search?q/", "/page#top/", "/static/../admin/", "/a/./b/"],
    ids=["query", "fragment", "dot-dot", "dot"],
)
def test_prefix_no_request_can_match_is_refused(prefix):
    """Fixed: a route prefix holding `?` or `#` (never part of a request's path), or a
    `.`/`..` segment (resolved in every request before routing, http.py `resolve_request`),
    was accepted by --route (and [[route]], parsed by the same `parse_route`) and by
    --check-config (exit 0), and then never matched: the requests meant for it went to
    another route, silently. Now refused at start-up with one line naming --route (exit
    code 2; 1 under --check-config, which this test uses so that nothing is left running),
    as a prefix without its leading slash is (config.py `parse_route`)."""
    done = run_rawproxy(
        "--listen", "127.0.0.1:0", "--check-config", "/dev/null", "--route",
        f"{prefix}=http://127.0.0.1:9", "--route", "/=http://127.0.0.1:10",
    )  # fmt: skip
    assert done.returncode != 0, f"{prefix!r} accepted:\n{done.stdout}"
    assert "--route" in one_line_error(done)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("twin", ["/%61pi/", "//api/", "/api//"])
def test_prefixes_that_match_the_same_paths_are_duplicates(twin):
    """Fixed: `/api/` and `/%61pi/` (or `//api/`, `/api//`) are matched as the same prefix
    (http.py `route_prefix` normalises a prefix as it does a path), yet start-up took them
    as two routes, and one of them silently never got a request. The duplicate check
    (cli.py `build_config`, "more than one route for ...") compared the prefixes as
    written; it now compares them as matched: refused like two literal `/api/` routes, in
    one line naming both."""
    done = run_rawproxy(
        "--listen", "127.0.0.1:0", "--route", "/api/=http://127.0.0.1:9",
        "--route", f"{twin}=http://127.0.0.1:10", "--check-config", "/dev/null",
    )  # fmt: skip
    assert done.returncode != 0, f"{twin!r} and '/api/' both accepted:\n{done.stdout}"
    assert "more than one route" in one_line_error(done)


# --- one client connection over plain, TLS and WebSocket routes -----------------------------


@pytest.mark.timeout(30)
def test_pipelined_requests_over_plain_tls_and_websocket_routes(launch, make_backend, client, pki):
    """Not covered elsewhere: one client connection pipelines, in one write each, requests
    alternating between a plain route (with a path mapping), a TLS route (verified with
    --backend-ca, for its own name), bodies in both framings and a HEAD, then a GET and a
    WebSocket upgrade on a third route. Each reaches its own backend, in order, with the
    answers in order; no backend connection is used for another route's request (the TLS
    backend sees one handshake per backend connection, the plain one its requests on the
    connections opened for them); the WebSocket echoes."""
    plain = make_backend()
    tls = make_backend(ssl_context=pki.server_context())
    ws = make_backend(WsBackend)
    proxy = launch(
        "--backend-ca",
        str(pki.ca_file),
        *route("/a/", plain, "/"),
        *route("/b/", tls, scheme="https", host="localhost"),
        *route("/ws/", ws, scheme="ws"),
    )
    c = client(proxy.port)
    requests = [
        ("GET", simple_get("/a/1", HOST), b"GET /1"),
        (
            "POST",
            request_bytes("POST", "/b/2", [("Host", HOST), ("Content-Length", "5")], b"hello"),
            b"POST /b/2",
        ),
        ("GET", simple_get("/a/3", HOST), b"GET /3"),
        (
            "POST",
            request_bytes(
                "POST", "/a/echo", [("Host", HOST), ("Transfer-Encoding", "chunked")],
                b"3\r\nabc\r\n0\r\n\r\n",
            ),
            b"abc",
        ),
        ("GET", simple_get("/b/5", HOST), b"GET /b/5"),
        ("HEAD", request_bytes("HEAD", "/a/6", [("Host", HOST)]), b""),
    ]  # fmt: skip
    c.send(b"".join(data for _, data, _ in requests))
    for method, _, body in requests:
        resp = c.read_response(method)
        assert (resp.status, resp.body) == (200, body), resp
    key = ws_key()
    c.send(simple_get("/b/7", HOST) + websocket_request("/ws/chat", HOST, key))
    assert c.read_response().body == b"GET /b/7"
    status, _, headers, raw = c.read_head()
    assert status == 101, raw
    assert header_values(headers, "sec-websocket-accept") == [ws_accept(key)], raw
    sock = WsClient(c.sock, bytes(c.buf))
    c.buf.clear()
    sock.send("across routes")
    assert sock.recv() == "across routes"
    assert [r.target for r in plain.requests] == [b"/1", b"/3", b"/echo", b"/6"]
    assert [r.body for r in tls.requests] == [b"hello", b"", b""]
    assert [r.target for r in tls.requests] == [b"/b/2", b"/b/5", b"/b/7"]
    # /a/3 and /a/echo came one after the other: one backend connection; every other
    # change of route opened a new one.
    assert [r.conn_id for r in plain.requests] == [1, 2, 2, 3]
    assert [r.conn_id for r in tls.requests] == [1, 2, 3]
    assert [seen.conn_id for seen in tls.tls_seen] == [1, 2, 3]
    [handshake] = ws.wait_handshakes(1)
    assert handshake.startswith(b"GET /ws/chat HTTP/1.1\r\n"), handshake
