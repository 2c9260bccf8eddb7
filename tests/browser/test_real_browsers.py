"""Real browsers through the proxy: headless Chromium and Firefox ESR (Debian packages), one
launch per (browser, listener, backend) combination, plain and TLS on each leg.

The proxy is started as a user starts it (`python -m rawproxy --listen 127.0.0.1:0 --backend
...`, with `--cert/--key` for the TLS listener and `--backend https://localhost:PORT
--backend-ca` for the TLS backend, `--log-level debug` for its upgrade decisions). The browser
opens `/start` on the proxy and the page (`page.html`, served by `browser_site.BrowserSite`)
runs every check in one go:

- the page itself, reached by a 302 (`/start` -> `/page`), a POST through `fetch()` echoed
  back (300 kB), a `fetch()` that follows a same-origin 302, and a form POST navigation whose
  answer runs a script that POSTs back a token only that answer carried;
- two WebSockets to the same origin on different paths, each asking for subprotocols
  (`chat.v1, chat.v0` and `data.v2`); the site accepts permessage-deflate on one and no
  extension on the other; text and binary messages of 0 B to 1 MiB, all sent at once and
  every echo compared byte for byte in the page;
- one WebSocket straight to a reference server (no proxy), so that the test knows exactly
  which headers this browser sends.

The page reports to the site with a `fetch()` POST. The test then checks what the site
received: every message's SHA-256 against what `browser_site.expected_message` says the page
must send, the handshake heads (Sec-WebSocket-* and every other end-to-end header, in order, as the
browser sent them to the reference server, but Sec-Fetch-Site; `Connection: upgrade`, as the
proxy always sends it; the Upgrade value unchanged; X-Forwarded-*), and the browser's own
Connection/Upgrade values from the proxy's debug log. What each browser sent is printed (see
it with `pytest -rA` or `-s`).

The byte-for-byte replay of older Firefox's `Connection: keep-alive, Upgrade` is in
tests/test_e2e_upgrade.py (tests/data/handshakes/firefox-128-legacy.txt); it is not repeated
here, since no browser installed here sends it.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from browser_site import (
    ALPHABET,
    BrowserSite,
    MessageSpec,
    MiB,
    SeenRequest,
    WsSeen,
    binary_message,
    expected_message,
)
from browsers import RunningBrowser
from peers import Header, ProxyProcess, header_values
from tls_peers import Pki

pytestmark = pytest.mark.browser

RESULT_TIMEOUT = 40.0  # the page's report, from the browser's start
DONE_TIMEOUT = 15.0  # the form POST's answer, after the report
POST_SIZE = 300_000
FORM_NOTE = "grüße & más = 1 ✓"


def messages(base_seed: int, plan: list[tuple[str, int]]) -> list[MessageSpec]:
    return [MessageSpec(kind, size, base_seed + 7919 * i) for i, (kind, size) in enumerate(plan)]


SOCKETS: list[dict[str, Any]] = [
    {
        "name": "chat",
        "path": "/ws/chat?room=1",
        "protocols": ["chat.v1", "chat.v0"],
        "deflate": True,
        "messages": messages(
            11,
            [
                ("text", 0),
                ("binary", 1),
                ("text", 1),
                ("text", 125),
                ("binary", 126),
                ("text", 126),
                ("binary", 65535),
                ("text", 65536),
                ("binary", 65536),
                ("text", MiB),
                ("binary", MiB),
            ],
        ),
    },
    {
        "name": "data",
        "path": "/ws/data",
        "protocols": ["data.v2"],
        "deflate": False,
        "messages": messages(
            23,
            [
                ("binary", 0),
                ("binary", 2),
                ("text", 3),
                ("binary", 127),
                ("text", 4097),
                ("binary", 65537),
                ("binary", MiB),
                ("text", MiB),
            ],
        ),
    },
]
DEFLATE_PATHS = tuple(urllib.parse.urlsplit(s["path"]).path for s in SOCKETS if s["deflate"])

# compared with what the browser sent to the reference server: every header but these
NOT_COMPARED = {
    b"host",
    b"origin",
    b"sec-websocket-key",
    b"connection",  # the proxy sends `Connection: upgrade` (its own hop-by-hop header)
    b"upgrade",  # hop-by-hop too: the proxy sends the value on, after the end-to-end headers
    b"sec-fetch-site",  # same-origin through the proxy, same-site to the reference server
}
ADDED_BY_PROXY = (b"x-forwarded-", b"forwarded")  # checked on their own
DECISION = re.compile(
    r'"GET (?P<target>\S+) HTTP/1\.1" upgrade decision: upgrade to (?P<to>\S+) '
    r"\(Connection: (?P<connection>.*); Upgrade: (?P<upgrade>.*)\)$"
)

COMBINATIONS = [
    pytest.param(browser, listener, backend, id=f"{browser}-{listener}-listener-{backend}-backend")
    for browser in ("chromium", "firefox")
    for listener in ("plain", "tls")
    for backend in ("plain", "tls")
]


def page_config(run: str, ref_url: str) -> dict[str, Any]:
    return {
        "run": run,
        "alphabet": ALPHABET,
        "refUrl": ref_url,
        "postSize": POST_SIZE,
        "note": FORM_NOTE,
        "sockets": [{**s, "messages": [m.as_json() for m in s["messages"]]} for s in SOCKETS],
    }


def start_route(
    start_proxy: Callable[..., ProxyProcess],
    site: BrowserSite,
    pki: Pki,
    listener: str,
    backend: str,
) -> tuple[ProxyProcess, str]:
    """The proxy in front of `site`, as a user starts it; returns it and the page's origin."""
    flags = ["--log-level", "debug"]
    if listener == "tls":
        flags += ["--cert", str(pki.server.cert), "--key", str(pki.server.key)]
    backend_url = None
    if backend == "tls":
        backend_url = f"https://localhost:{site.port}"
        flags += ["--backend-ca", str(pki.ca_file)]
    proxy = start_proxy(site.port, *flags, backend=backend_url)
    kind = "(tls)" if listener == "tls" else "(plain)"
    assert proxy.logs_matching(rf"listening on 127\.0\.0\.1:{proxy.port} {re.escape(kind)}"), (
        proxy.log_text()
    )
    if listener == "tls":
        return proxy, f"https://localhost:{proxy.port}"
    return proxy, f"http://127.0.0.1:{proxy.port}"


def wait_or_fail(
    site: BrowserSite,
    browser: RunningBrowser,
    what: str,
    predicate: Callable[[BrowserSite], bool],
    timeout: float,
) -> None:
    def finished_or_broken(s: BrowserSite) -> bool:
        return predicate(s) or bool(s.errors)

    gone = None
    try:
        arrived = site.wait_for(finished_or_broken, timeout, browser.exited)
    except RuntimeError as exc:  # the browser is gone
        gone = str(exc)
    if gone is not None:
        pytest.fail(f"{gone}\nthe site saw: {describe(site)}", pytrace=False)
    if not arrived:
        pytest.fail(
            f"{what}: nothing within {timeout} s ({browser.name} is still running, pid "
            f"{browser.pid}).\nthe site saw: {describe(site)}\n{browser.name}'s output ends "
            f"with:\n{browser.log_tail()}",
            pytrace=False,
        )
    assert not site.snapshot()["errors"], describe(site)


def describe(site: BrowserSite) -> str:
    snap = site.snapshot()
    requests = [f"{r.method} {r.target} -> {r.status}" for r in snap["requests"]]
    sockets = [f"{w.target} ({len(w.messages)} messages)" for w in snap["websockets"]]
    return json.dumps(
        {"requests": requests, "websockets": sockets, "errors": snap["errors"]}, indent=1
    )


def show(headers: list[Header], name: str) -> str:
    values = header_values(headers, name)
    return " | ".join(v.decode("latin-1") for v in values) if values else "(absent)"


def compared(headers: list[Header]) -> list[Header]:
    return [
        (k, v)
        for k, v in headers
        if k.lower() not in NOT_COMPARED and not k.lower().startswith(ADDED_BY_PROXY)
    ]


def assert_forwarded(headers: list[Header], proto: bytes, host: bytes, port: int) -> None:
    """The proxy's X-Forwarded-* (its default `--forwarded x-forwarded`)."""
    assert header_values(headers, "x-forwarded-for") == [b"127.0.0.1"], headers
    assert header_values(headers, "x-forwarded-proto") == [proto], headers
    assert header_values(headers, "x-forwarded-host") == [host], headers
    assert header_values(headers, "x-forwarded-port") == [str(port).encode()], headers


def report_of(snap: dict[str, Any]) -> dict[str, Any]:
    return snap["reports"][0] if snap["reports"] else {}


def record(
    run: str,
    browser: RunningBrowser,
    report: dict[str, Any],
    ref_snap: dict[str, Any],
    snap: dict[str, Any],
    decisions: dict[str, re.Match[str]],
) -> None:
    """Print what this browser sent and what reached the backend (`pytest -rA` or `-s`)."""

    def indent(head: bytes) -> str:
        return head.decode("latin-1").rstrip("\r\n").replace("\r\n", "\n      ")

    lines = [f"\n[{run}] {browser.version}; {report.get('userAgent', '(no report)')}"]
    for ws in ref_snap["websockets"]:
        lines.append(f"  browser sent (reference server, no proxy):\n      {indent(ws.head)}")
    for target, m in sorted(decisions.items()):
        lines.append(
            f"  proxy read ({target}): Connection: {m['connection']}; Upgrade: {m['upgrade']}"
        )
    for ws in snap["websockets"]:
        lines.append(f"  backend got:\n      {indent(ws.head)}")
    print("\n".join(lines))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("browser_name", "listener", "backend"), COMBINATIONS)
def test_browser_through_proxy(
    make_site: Callable[..., BrowserSite],
    start_proxy: Callable[..., ProxyProcess],
    launch_browser: Callable[..., RunningBrowser],
    browser_pki: Pki,
    browser_name: str,
    listener: str,
    backend: str,
) -> None:
    pki = browser_pki
    run = f"{browser_name}-{listener}-{backend}"
    # the reference server: same scheme and host as the page (same site, other port)
    if listener == "tls":
        ref = make_site(deflate_paths=("/ws/ref",), ssl_context=pki.server_context())
        ref_url = f"wss://localhost:{ref.port}/ws/ref"
    else:
        ref = make_site(deflate_paths=("/ws/ref",))
        ref_url = f"ws://127.0.0.1:{ref.port}/ws/ref"
    site = make_site(
        page_config(run, ref_url),
        DEFLATE_PATHS,
        ssl_context=pki.server_context() if backend == "tls" else None,
    )
    proxy, origin = start_route(start_proxy, site, pki, listener, backend)

    started = time.monotonic()
    browser = launch_browser(browser_name, f"{origin}/start?run={run}", pki.ca_file)
    wait_or_fail(
        site, browser, "the page's report (POST /result)", lambda s: bool(s.reports), RESULT_TIMEOUT
    )
    reported = time.monotonic() - started
    # The site records /done's body while routing it, and the request itself just after:
    # wait for both, or the snapshot below may lack the request.
    wait_or_fail(
        site,
        browser,
        "the form POST's answer (POST /done)",
        lambda s: bool(s.done) and any(r.path == "/done" for r in s.requests),
        DONE_TIMEOUT,
    )
    finished = time.monotonic() - started
    snap = site.snapshot()
    ref_snap = ref.snapshot()
    decisions = {}
    for line in proxy.logs_matching("upgrade decision"):
        if m := DECISION.search(line):
            decisions[m["target"]] = m
    record(run, browser, report_of(snap), ref_snap, snap, decisions)

    # --- the page's own verdict ---------------------------------------------------------------
    [report] = snap["reports"]
    assert report["run"] == run
    assert report["ok"], f"the page reports failures:\n{json.dumps(report, indent=1)}"
    for spec in SOCKETS:
        got = report["sockets"][spec["name"]]
        assert got["protocol"] == spec["protocols"][0], got
        assert len(got["messages"]) == len(spec["messages"]), got
        assert all(m["ok"] for m in got["messages"]), got

    # --- plain HTTP through the proxy: page, redirects, POSTs -------------------------------
    requests: list[SeenRequest] = snap["requests"]
    seen = [(r.method, r.path, r.status) for r in requests if r.path != "/favicon.ico"]
    assert seen[:2] == [("GET", "/start", 302), ("GET", "/page", 200)], describe(site)
    assert sorted(seen[2:-3]) == sorted(  # the page's fetches run concurrently
        [("POST", "/echo", 200), ("GET", "/redirect", 302), ("GET", "/redirected", 200)]
    ), describe(site)
    assert seen[-3:] == [
        ("POST", "/result", 204),
        ("POST", "/form", 200),
        ("POST", "/done", 204),
    ], describe(site)
    by_path = {r.path: r for r in requests}
    assert by_path["/start"].target == f"/start?run={run}"
    assert by_path["/page"].target == f"/page?run={run}"
    assert by_path["/echo"].body == binary_message(POST_SIZE, 7)
    form = by_path["/form"]
    assert form.values("content-type") == [b"application/x-www-form-urlencoded"]
    assert urllib.parse.parse_qs(form.body.decode("ascii")) == {"run": [run], "note": [FORM_NOTE]}
    assert snap["done"] == snap["tokens"], (snap["done"], snap["tokens"])

    host = urllib.parse.urlsplit(origin).netloc.encode()
    proto = b"https" if listener == "tls" else b"http"
    user_agent = report["userAgent"].encode()
    for r in requests:
        assert r.values("host") == [host], r
        assert_forwarded(r.headers, proto, host, proxy.port)
        assert r.values("user-agent") == [user_agent], r
    if backend == "tls":
        assert site.tls_seen, "the site saw no TLS handshake"

    # --- WebSockets: the handshake heads ------------------------------------------------------
    [reference] = ref_snap["websockets"]
    assert not ref_snap["errors"], ref_snap["errors"]
    sockets: dict[str, WsSeen] = {w.target: w for w in snap["websockets"]}
    assert sorted(sockets) == sorted(s["path"] for s in SOCKETS), describe(site)
    assert reference.values("sec-websocket-protocol") == [b"chat.v1, chat.v0"]
    for spec in SOCKETS:
        ws = sockets[spec["path"]]
        head = ws.headers
        # the page's subprotocols, in its order, on one line as the browser sent them
        assert header_values(head, "sec-websocket-protocol") == [
            ", ".join(spec["protocols"]).encode()
        ], ws.head
        # everything else end to end exactly as this browser sends it (reference server),
        # in the same order: Sec-WebSocket-Version/-Extensions, Upgrade, User-Agent, ...
        expected = [
            (k, v) for k, v in compared(reference.headers) if k.lower() != b"sec-websocket-protocol"
        ]
        got = [(k, v) for k, v in compared(head) if k.lower() != b"sec-websocket-protocol"]
        assert got == expected, (ws.head, reference.head)
        assert header_values(head, "upgrade") == header_values(reference.headers, "upgrade")
        assert [v.lower() for v in header_values(head, "connection")] == [b"upgrade"], ws.head
        assert header_values(head, "origin") == [origin.encode()], ws.head
        assert header_values(head, "host") == [host], ws.head
        assert_forwarded(head, proto, host, proxy.port)
        [key] = header_values(head, "sec-websocket-key")  # the browser checked the accept
        assert len(key) == 24, ws.head
        # what the site accepted, and every message as the page must have sent it
        assert ws.subprotocol == spec["protocols"][0]
        assert ws.deflate == spec["deflate"]
        assert ws.messages == [expected_message(m) for m in spec["messages"]], spec["name"]
        assert ws.close_code == 1000

    # --- the browser's own Connection/Upgrade, as the proxy read them ----------------------
    own = {
        name: " | ".join(repr(v.decode("latin-1")) for v in header_values(reference.headers, name))
        for name in ("connection", "upgrade")
    }
    for spec in SOCKETS:
        decision = decisions.get(spec["path"])
        assert decision is not None, proxy.log_text()
        assert decision["to"] == "websocket", decision.string
        assert decision["connection"] == own["connection"], decision.string
        assert decision["upgrade"] == own["upgrade"], decision.string

    print(
        f"  {run}: {sum(len(s['messages']) for s in SOCKETS)} WebSocket messages echoed "
        f"intact; report after {reported:.1f} s, form POST answered after {finished:.1f} s"
    )
