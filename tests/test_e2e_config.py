"""The config file, end to end: `--config FILE.toml` and `--check-config FILE`.

- parity: the same settings from a file and from flags give the same behaviour (routes with a
  path, forwarded headers, trusted proxies, Host, cookie and redirect rewriting);
- flags override the file, and a repeatable flag on the command line replaces the file's list
  (--listen, --route, --trusted-proxy, --cookie-domain), while the file's other keys apply;
- durations ("500ms", numbers) and sizes ("2KiB") from a file take effect; booleans
  (`rewrite-location = false`, `backend-host-header = true`); `[[certificate]]` tables and
  top-level `cert`/`key` lists give TLS listeners with SNI;
- `--check-config`: exit 0, the effective configuration as TOML on stdout (every setting,
  defaults included), which is itself a valid config file giving the same output;
- bad files (syntax errors, unknown keys, wrong types, bad values, bad routes, missing file,
  nothing to forward to): exit non-zero, one line on stderr naming the file and the key (the
  line for syntax errors), no traceback; the same line at a normal start-up with --config.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import (
    REPO,
    HttpBackend,
    HttpClient,
    ProxyProcess,
    request_bytes,
    respond_target,
    run_rawproxy,
    simple_get,
)
from tls_peers import Pki

# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-config"))


@pytest.fixture
def launch() -> Iterator[Callable[..., ProxyProcess]]:
    """`launch(*args)`: `python -m rawproxy ARGS` exactly (nothing added); every proxy is
    stopped at teardown, and a traceback in its log fails the test."""
    procs: list[ProxyProcess] = []

    def start(*args: str) -> ProxyProcess:
        proc = ProxyProcess(list(args))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.log_text(), proc.log_text()


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    def write_file(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write_file


def toml_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def routes_toml(*routes: tuple[str, str]) -> str:
    return "".join(
        f"\n[[route]]\nprefix = {toml_str(p)}\nbackend = {toml_str(b)}\n" for p, b in routes
    )


def as_seconds(value: Any) -> float:
    """A duration as --check-config may print it: a number of seconds or a string with a unit."""
    if isinstance(value, bool):
        raise AssertionError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", str(value), re.IGNORECASE)
    assert m, f"{value!r} is not a duration"
    unit = (m.group(2) or "s").lower()
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def as_bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise AssertionError(f"{value!r} is not a size")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*(k|kb|kib|m|mb|mib)?\s*", str(value), re.IGNORECASE)
    assert m, f"{value!r} is not a size"
    unit = (m.group(2) or "").lower()
    return int(m.group(1)) * (1024 if unit.startswith("k") else 1 << 20 if unit else 1)


def run_concurrently(
    *arglists: list[str], timeout: float = 15.0
) -> list[subprocess.CompletedProcess[str]]:
    """Run `python -m rawproxy ARGS` for every list at once; a process still running after
    `timeout` (it did not reject its configuration) is killed and fails the test."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rawproxy", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for args in arglists
    ]
    done = []
    deadline = time.monotonic() + timeout
    for proc, args in zip(procs, arglists, strict=True):
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            for other in procs:
                if other.poll() is None:
                    other.kill()
                    other.communicate()
            raise AssertionError(
                f"rawproxy {' '.join(args)} was still running after {timeout} s (it accepted "
                f"the configuration); stderr:\n{err}"
            ) from None
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start prints (asserting that it is one line, no traceback)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"exit 0 for a bad configuration; stderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{done.stderr}"
    assert lines[0].startswith("rawproxy: error:"), lines[0]
    return lines[0]


def check_config(path: Path) -> dict[str, Any]:
    done = run_rawproxy("--check-config", str(path))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    try:
        return tomllib.loads(done.stdout)
    except tomllib.TOMLDecodeError as e:
        raise AssertionError(f"--check-config did not print TOML ({e}):\n{done.stdout}") from e


def route_map(effective: dict[str, Any]) -> dict[str, urllib.parse.SplitResult]:
    """prefix -> backend URL, from a --check-config output's routes (as [[route]] tables or as
    "PREFIX=URL" strings; `backend` counts as the route "/")."""
    out: dict[str, urllib.parse.SplitResult] = {}
    for entry in effective.get("route", []):
        if isinstance(entry, dict):
            prefix, backend = entry["prefix"], entry["backend"]
        else:
            prefix, _, backend = str(entry).partition("=")
        out[prefix] = urllib.parse.urlsplit(backend)
    if effective.get("backend"):
        out.setdefault("/", urllib.parse.urlsplit(effective["backend"]))
    return out


# --- the same behaviour from a file as from flags -------------------------------------------


def scenario(port: int, api: HttpBackend, root: HttpBackend) -> list[Any]:
    """Requests through the proxy at `port`; what the client and the backends saw, with the
    ports of this run replaced by names."""
    names = {str(port): "PROXY", str(api.port): "API", str(root.port): "ROOT"}

    def norm(value: bytes | str | None) -> str | None:
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else value
        for number, name in names.items():
            text = text.replace(number, name)
        return text

    seen: list[Any] = []
    with HttpClient(port) as c:
        target = respond_target(
            "/api/respond",
            [
                ("Location", f"http://127.0.0.1:{api.port}/next"),
                ("Set-Cookie", "s=1; Domain=backend.internal; Path=/app/x"),
            ],
            status=302,
        )
        resp = c.request(
            request_bytes(
                "GET",
                target,
                [
                    ("Host", "app.test"),
                    ("X-Forwarded-For", "203.0.113.7"),
                    ("Forwarded", "for=203.0.113.7"),
                ],
            )
        )
        seen.append((resp.status, norm(resp.header("location")), norm(resp.header("set-cookie"))))
        resp = c.request(simple_get("/page", "app.test"))
        seen.append((resp.status, resp.body))
    for backend in (api, root):
        for req in backend.wait_for_requests(1):
            seen.append(
                {
                    "backend": norm(str(backend.port)),
                    "target": norm(req.target),
                    **{
                        name: [norm(v) for v in req.values(name)]
                        for name in (
                            "host",
                            "x-forwarded-for",
                            "x-forwarded-proto",
                            "x-forwarded-host",
                            "x-forwarded-port",
                            "forwarded",
                        )
                    },
                }
            )
    return seen


PARITY_FLAGS = [
    "--header-timeout",
    "5",
    "--forwarded",
    "both",
    "--trusted-proxy",
    "127.0.0.1/32",
    "--backend-host-header",
    "--cookie-domain",
    "backend.internal=example.com",
    "--cookie-path",
    "/app/=/",
]

PARITY_TOML = """\
listen = ["127.0.0.1:0"]
header-timeout = 5
forwarded = "both"
trusted-proxy = ["127.0.0.1/32"]
backend-host-header = true
cookie-domain = ["backend.internal=example.com"]
cookie-path = ["/app/=/"]
"""


def test_file_gives_the_same_behaviour_as_flags(launch, make_backend, write):
    api1, root1, api2, root2 = (make_backend() for _ in range(4))
    by_flags = launch(
        "--listen",
        "127.0.0.1:0",
        "--route",
        f"/api/=http://127.0.0.1:{api1.port}/",
        "--route",
        f"/=http://127.0.0.1:{root1.port}",
        *PARITY_FLAGS,
    )
    path = write(
        "parity.toml",
        PARITY_TOML
        + routes_toml(
            ("/api/", f"http://127.0.0.1:{api2.port}/"), ("/", f"http://127.0.0.1:{root2.port}")
        ),
    )
    by_file = launch("--config", str(path))
    from_flags = scenario(by_flags.port, api1, root1)
    # what the flags must give, so that the comparison is not between two wrong answers
    assert from_flags[0] == (302, "http://app.test/api/next", "s=1; Domain=example.com; Path=/x")
    assert from_flags[1] == (200, b"GET /page")
    api_seen, root_seen = from_flags[2], from_flags[3]
    assert api_seen["target"].startswith("/respond?"), api_seen
    assert api_seen["host"] == ["127.0.0.1:API"]
    assert api_seen["x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert api_seen["forwarded"][0].startswith("for=203.0.113.7, "), api_seen
    assert root_seen["target"] == "/page"
    assert root_seen["host"] == ["127.0.0.1:ROOT"]
    assert root_seen["x-forwarded-host"] == ["app.test"]
    assert root_seen["x-forwarded-port"] == ["PROXY"]

    assert scenario(by_file.port, api2, root2) == from_flags


def test_flags_override_the_file(launch, make_backend, write, sockets):
    in_file, on_command_line = make_backend(), make_backend()
    busy = socket.socket()
    sockets.append(busy)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)  # the file's listener cannot be opened: --listen must replace it
    path = write(
        "override.toml",
        f"""\
listen = ["127.0.0.1:{busy.getsockname()[1]}"]
forwarded = "rfc7239"
trusted-proxy = ["127.0.0.1/32"]
cookie-domain = ["backend.internal=file.example"]
rewrite-location = false
backend-host-header = true
header-timeout = 30
"""
        + routes_toml(("/", f"http://127.0.0.1:{in_file.port}")),
    )
    proxy = launch(
        "--config",
        str(path),
        "--listen",
        "127.0.0.1:0",
        "--route",
        f"/=http://127.0.0.1:{on_command_line.port}",
        "--forwarded",
        "x-forwarded",
        "--trusted-proxy",
        "10.0.0.0/8",
        "--cookie-domain",
        "backend.internal=flag.example",
    )
    with HttpClient(proxy.port) as c:
        target = respond_target(
            "/respond",
            [
                ("Set-Cookie", "s=1; Domain=backend.internal"),
                ("Location", f"http://127.0.0.1:{on_command_line.port}/x"),
            ],
        )
        resp = c.request(
            request_bytes("GET", target, [("Host", "app.test"), ("X-Forwarded-For", "6.6.6.6")])
        )
    assert resp.status == 200
    assert resp.values("set-cookie") == [b"s=1; Domain=flag.example"]
    # the file's rewrite-location = false still applies
    assert resp.values("location") == [f"http://127.0.0.1:{on_command_line.port}/x".encode()]
    [req] = on_command_line.wait_for_requests(1)
    assert in_file.heads == [], "the file's route was used"
    assert req.values("x-forwarded-for") == [b"127.0.0.1"], "the file's trusted-proxy was used"
    assert req.values("forwarded") == [], "the file's forwarded mode was used"
    assert req.values("x-forwarded-port") == [str(proxy.port).encode()]
    # the file's backend-host-header = true still applies
    assert req.values("host") == [f"127.0.0.1:{on_command_line.port}".encode()]
    assert req.values("x-forwarded-host") == [b"app.test"]


def test_listen_and_route_from_the_file_backend_from_flags(launch, make_backend, write):
    """A file may hold part of the configuration; --backend on the command line completes it."""
    backend = make_backend()
    path = write("partial.toml", 'listen = ["127.0.0.1:0"]\nheader-timeout = "2s"\n')
    proxy = launch("--config", str(path), "--backend", f"127.0.0.1:{backend.port}")
    with HttpClient(proxy.port) as c:
        assert c.request(simple_get("/p")).body == b"GET /p"


# --- values from a file take effect ---------------------------------------------------------


def test_durations_and_sizes_from_the_file(launch, make_backend, write):
    backend = make_backend()
    path = write(
        "units.toml",
        f"""\
listen = ["127.0.0.1:0"]
backend = "http://127.0.0.1:{backend.port}"
header-timeout = "500ms"
max-header-size = "2KiB"
""",
    )
    proxy = launch("--config", str(path))
    with HttpClient(proxy.port) as c:
        assert c.request(simple_get("/ok", "b.test", ("X-Pad", "p" * 1000))).status == 200
    with HttpClient(proxy.port) as c:
        resp = c.request(simple_get("/big", "b.test", ("X-Pad", "p" * 3000)))
        assert resp.status == 431, resp
    with HttpClient(proxy.port) as c:
        start = time.monotonic()
        c.send(b"GET /slow-head HTTP/1.1\r\nHost: b.test\r\n")
        _, got = c.wait_closed(timeout=5)
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed <= 2.5, f"closed after {elapsed:.2f} s with header-timeout = 500ms"
    if got:
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert [r.target for r in backend.heads] == [b"/ok"]


def tls_client(port: int, pki: Pki, name: str) -> HttpClient:
    return HttpClient(port, ssl_context=pki.client_context(), server_hostname=name)


@pytest.mark.parametrize("spelling", ["certificate-tables", "cert-key-lists"])
def test_certificates_from_the_file(launch, make_backend, write, pki, spelling):
    backend = make_backend()
    if spelling == "certificate-tables":
        certs = "".join(
            f"\n[[certificate]]\ncert = {toml_str(c.cert)}\nkey = {toml_str(c.key)}\n"
            for c in (pki.server, pki.a)
        )
    else:
        certs = (
            f"cert = [{toml_str(pki.server.cert)}, {toml_str(pki.a.cert)}]\n"
            f"key = [{toml_str(pki.server.key)}, {toml_str(pki.a.key)}]\n"
        )
    top, tables = (certs, "") if spelling == "cert-key-lists" else ("", certs)
    path = write(
        "tls.toml",
        f'listen = ["tls://127.0.0.1:0"]\nbackend = "http://127.0.0.1:{backend.port}"\n'
        + top
        + tables,
    )
    proxy = launch("--config", str(path))
    for name, cert in [("localhost", pki.server), ("a.test", pki.a)]:
        with tls_client(proxy.port, pki, name) as c:
            assert c.sock.peer_cert_der() == cert.der, f"wrong certificate for SNI {name}"
            resp = c.request(simple_get("/tls", name))
            assert (resp.status, resp.body) == (200, b"GET /tls")
    for req in backend.wait_for_requests(2):
        assert req.values("x-forwarded-proto") == [b"https"]


# --- --check-config -------------------------------------------------------------------------

EXAMPLE = """\
listen = ["127.0.0.1:8080"]
header-timeout = 5
forwarded = "both"
trusted-proxy = ["127.0.0.1/32"]
[[route]]
prefix = "/api/"
backend = "http://127.0.0.1:9001/"
[[route]]
prefix = "/"
backend = "http://127.0.0.1:9002"
"""

EVERY_SETTING = [
    "listen",
    "header-timeout",
    "connect-timeout",
    "response-timeout",
    "idle-timeout",
    "tcp-keepalive",
    "max-header-size",
    "max-header-count",
    "max-connections",
    "log-level",
    "splice",
    "forwarded",
    "trusted-proxy",
    "rewrite-location",
    "backend-host-header",
    "backend-insecure",
    "cookie-domain",
    "cookie-path",
]


def test_check_config_prints_the_effective_configuration(write):
    path = write("example.toml", EXAMPLE)
    effective = check_config(path)
    missing = [key for key in EVERY_SETTING if key not in effective]
    assert not missing, f"--check-config does not print {missing}:\n{effective}"
    assert not any(k.startswith("-") or "_" in k for k in effective), effective.keys()
    # what the file says
    assert [str(x) for x in effective["listen"]] in (
        ["127.0.0.1:8080"],
        ["tcp://127.0.0.1:8080"],
    ), effective["listen"]
    assert as_seconds(effective["header-timeout"]) == 5
    assert effective["forwarded"] == "both"
    assert effective["trusted-proxy"] == ["127.0.0.1/32"]
    routes = route_map(effective)
    assert set(routes) == {"/api/", "/"}, routes
    api, root = routes["/api/"], routes["/"]
    assert (api.scheme, api.hostname, api.port, api.path) == ("http", "127.0.0.1", 9001, "/")
    assert (root.scheme, root.hostname, root.port) == ("http", "127.0.0.1", 9002)
    assert root.path in ("", "/"), root  # both forward "/x" as "/x"
    # the defaults
    assert as_seconds(effective["connect-timeout"]) == 5
    assert as_seconds(effective["response-timeout"]) == 60
    assert as_seconds(effective["idle-timeout"]) == 60
    assert as_seconds(effective["tcp-keepalive"]) == 60
    assert as_bytes(effective["max-header-size"]) == 64 * 1024
    assert effective["max-connections"] == 10000
    assert effective["log-level"] == "info"
    assert effective["splice"] is True
    assert effective["rewrite-location"] is True
    assert effective["backend-host-header"] is False
    assert effective["backend-insecure"] is False
    assert effective["cookie-domain"] == []
    assert effective["cookie-path"] == []


def test_check_config_output_is_a_config_file(write):
    """What --check-config prints, read back with --check-config, prints the same."""
    first = run_rawproxy("--check-config", str(write("example.toml", EXAMPLE)))
    assert first.returncode == 0, first.stderr
    again = run_rawproxy("--check-config", str(write("effective.toml", first.stdout)))
    assert again.returncode == 0, f"its own output is not a valid file: {again.stderr}"
    assert again.stdout == first.stdout


def test_check_config_values_in_every_spelling(write):
    path = write(
        "spellings.toml",
        """\
listen = ["127.0.0.1:0", "tcp://127.0.0.1:0"]
backend = "http://127.0.0.1:9000/app/"
header-timeout = "500ms"
connect-timeout = 2.5
response-timeout = "1m"
idle-timeout = 7
max-header-size = "32KiB"
max-connections = 50
log-level = "warning"
splice = false
rewrite-location = false
backend-host-header = true
forwarded = "none"
trusted-proxy = ["10.0.0.0/8", "::1/128"]
cookie-domain = ["a.internal=a.example", "b.internal=b.example"]
cookie-path = ["/app/=/"]
""",
    )
    effective = check_config(path)
    assert len(effective["listen"]) == 2
    assert as_seconds(effective["header-timeout"]) == 0.5
    assert as_seconds(effective["connect-timeout"]) == 2.5
    assert as_seconds(effective["response-timeout"]) == 60
    assert as_seconds(effective["idle-timeout"]) == 7
    assert as_bytes(effective["max-header-size"]) == 32 * 1024
    assert effective["max-connections"] == 50
    assert effective["log-level"] == "warning"
    assert effective["splice"] is False
    assert effective["rewrite-location"] is False
    assert effective["backend-host-header"] is True
    assert effective["forwarded"] == "none"
    assert effective["trusted-proxy"] == ["10.0.0.0/8", "::1/128"]
    assert effective["cookie-domain"] == ["a.internal=a.example", "b.internal=b.example"]
    assert effective["cookie-path"] == ["/app/=/"]
    root = route_map(effective)["/"]
    assert (root.hostname, root.port, root.path) == ("127.0.0.1", 9000, "/app/")


def test_check_config_with_flags(write):
    """--check-config shows the configuration the same flags would run with: flags override
    the file, and a repeatable flag replaces the file's list."""
    path = write("example.toml", EXAMPLE)
    done = run_rawproxy(
        "--check-config",
        str(path),
        "--forwarded",
        "none",
        "--trusted-proxy",
        "10.0.0.0/8",
        "--trusted-proxy",
        "192.168.0.0/16",
        "--header-timeout",
        "7",
    )
    assert done.returncode == 0, done.stderr
    effective = tomllib.loads(done.stdout)
    assert effective["forwarded"] == "none"
    assert effective["trusted-proxy"] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert as_seconds(effective["header-timeout"]) == 7
    assert set(route_map(effective)) == {"/api/", "/"}  # from the file


# --- bad files ------------------------------------------------------------------------------

LISTEN = 'listen = ["127.0.0.1:0"]\n'
ROUTE = routes_toml(("/", "http://127.0.0.1:9"))

BAD_FILES = {
    # name: (text, regexes the one line must match, besides the file's name)
    "syntax-missing-value": (
        LISTEN + 'forwarded = "both"\nheader-timeout = \n' + ROUTE,
        [r"\bline 3\b"],
    ),
    "syntax-unterminated-string": (LISTEN + 'forwarded = "both\n' + ROUTE, [r"\bline 2\b"]),
    "syntax-duplicate-key": (
        LISTEN + "header-timeout = 5\nheader-timeout = 6\n" + ROUTE,
        [r"\bline 3\b"],
    ),
    "unknown-key": (LISTEN + "header-timout = 5\n" + ROUTE, ["header-timout"]),
    "unknown-key-underscores": (LISTEN + "header_timeout = 5\n" + ROUTE, ["header_timeout"]),
    "unknown-key-in-route": (
        LISTEN + '[[route]]\nprefx = "/"\nbackend = "http://127.0.0.1:9"\n',
        ["prefx"],
    ),
    "duration-not-a-duration": (LISTEN + 'header-timeout = "soon"\n' + ROUTE, ["header-timeout"]),
    "duration-negative": (LISTEN + "header-timeout = -1\n" + ROUTE, ["header-timeout"]),
    "duration-boolean": (LISTEN + "idle-timeout = true\n" + ROUTE, ["idle-timeout"]),
    "count-boolean": (LISTEN + "max-connections = true\n" + ROUTE, ["max-connections"]),
    "count-string": (LISTEN + 'max-connections = "many"\n' + ROUTE, ["max-connections"]),
    "size-not-a-size": (LISTEN + 'max-header-size = "lots"\n' + ROUTE, ["max-header-size"]),
    "boolean-string": (LISTEN + 'backend-insecure = "yes"\n' + ROUTE, ["backend-insecure"]),
    "boolean-number": (LISTEN + "rewrite-location = 0\n" + ROUTE, ["rewrite-location"]),
    "list-number": (LISTEN + "trusted-proxy = 5\n" + ROUTE, ["trusted-proxy"]),
    "bad-cidr": (LISTEN + 'trusted-proxy = ["10.0.0.0/33"]\n' + ROUTE, ["trusted-proxy"]),
    "bad-forwarded": (LISTEN + 'forwarded = "sometimes"\n' + ROUTE, ["forwarded"]),
    "bad-log-level": (LISTEN + 'log-level = "chatty"\n' + ROUTE, ["log-level"]),
    "bad-listen": ('listen = ["nowhere"]\n' + ROUTE, ["listen"]),
    "bad-cookie-domain": (
        LISTEN + 'cookie-domain = ["no-equals-sign"]\n' + ROUTE,
        ["cookie-domain"],
    ),
    "route-prefix-without-slash": (
        LISTEN + routes_toml(("api/", "http://127.0.0.1:9")),
        [r"route|prefix"],
    ),
    "route-without-backend": (LISTEN + '[[route]]\nprefix = "/"\n', [r"route|backend"]),
    "route-without-prefix": (
        LISTEN + '[[route]]\nbackend = "http://127.0.0.1:9"\n',
        [r"route|prefix"],
    ),
    "route-bad-scheme": (LISTEN + routes_toml(("/", "ftp://127.0.0.1:21")), [r"route|backend"]),
    "route-bad-port": (LISTEN + routes_toml(("/", "http://127.0.0.1:99999")), [r"route|backend"]),
    "certificate-without-key": (
        LISTEN + ROUTE + '\n[[certificate]]\ncert = "server.pem"\n',
        [r"certificate|key"],
    ),
    "cert-without-key": (LISTEN + 'cert = ["server.pem"]\n' + ROUTE, [r"cert|key"]),
    "nothing-to-forward-to": (LISTEN, [r"route|backend"]),
    # a port meant, a host read (the resolver makes 9000 the address 0.0.35.40)
    "backend-a-number": (LISTEN + "backend = 9000\n", [r"127\.0\.0\.1:9000"]),
    "no-flag-as-key": (LISTEN + "no-backend-tls = true\n" + ROUTE, [r"backend-tls = false"]),
    "listen-twice": ('listen = ["127.0.0.1:18998", "127.0.0.1:18998"]\n' + ROUTE, ["twice"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_line(write, case):
    text, patterns = BAD_FILES[case]
    path = write(f"{case}.toml", text)
    checked, started = run_concurrently(["--check-config", str(path)], ["--config", str(path)])
    line = error_line(checked)
    assert checked.stdout == "", f"--check-config printed a configuration:\n{checked.stdout}"
    assert path.name in line, f"the file is not named: {line}"
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in: {line}"
    assert error_line(started) == line, "a normal start-up with --config says something else"


def test_a_file_without_listen_checks_with_a_note_and_starts_only_when_activated(write):
    """A config without listen is what a socket-activated service uses (rawproxy.socket brings
    the listeners): --check-config accepts it, with a note on stderr, where it once refused it
    (an ExecStartPre= check failed for a file that starts). Started without sockets from
    systemd, it is the one-line "--listen is required" error."""
    path = write("no-listener.toml", ROUTE)
    checked, started = run_concurrently(["--check-config", str(path)], ["--config", str(path)])
    assert checked.returncode == 0, checked.stderr
    assert "note: no listen address" in checked.stderr, checked.stderr
    line = error_line(started)
    assert path.name in line, line
    assert "listen" in line, line


def test_file_not_in_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n" + (LISTEN + ROUTE).encode())
    checked, started = run_concurrently(["--check-config", str(path)], ["--config", str(path)])
    line = error_line(checked)
    assert path.name in line
    assert "UTF-8" in line
    assert error_line(started) == line


def test_missing_file_is_one_line(tmp_path):
    path = tmp_path / "missing.toml"
    checked, started = run_concurrently(["--check-config", str(path)], ["--config", str(path)])
    for done in (checked, started):
        line = error_line(done)
        assert "missing.toml" in line, line
    assert checked.stdout == ""


def test_config_file_that_is_a_directory_is_one_line(tmp_path):
    checked, started = run_concurrently(
        ["--check-config", str(tmp_path)], ["--config", str(tmp_path)]
    )
    for done in (checked, started):
        assert str(tmp_path.name) in error_line(done)


def test_check_config_exit_codes(write):
    good = run_rawproxy("--check-config", str(write("good.toml", EXAMPLE)))
    assert good.returncode == 0, good.stderr
    bad = run_rawproxy("--check-config", str(write("bad.toml", "bogus = 1\n" + EXAMPLE)))
    assert bad.returncode != 0
    assert "bad.toml" in error_line(bad)
