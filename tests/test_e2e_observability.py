"""What the proxy tells about its traffic, end to end:

- the access log: one line per request (answered by the backend or by the proxy itself: 404
  for no route, 502 for a refused backend) and one per tunnel when it closes; Apache's
  combined format by default (on stderr through logging, with its timestamp and INFO prefix;
  in `--access-log FILE` as bare lines), tunnel lines with the duration, the bytes each way
  (exactly what went through) and who ended it; `--access-log-format json`, one object per
  line with the documented keys;
- the admin listener (`--admin-listen`): /healthz, and /metrics in the Prometheus text format,
  whose values move with the traffic: requests by status class (2xx, 3xx, 4xx for no route,
  5xx for a refused backend, 1xx for an upgrade), backend connection errors by cause, bytes
  both ways (counted while a tunnel is still open, and exactly once), tunnels and connections
  open and in total, TLS handshake failures on each side, the latency histograms.
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from peers import (
    RESPONSE_101,
    HttpBackend,
    HttpClient,
    Metrics,
    ProxyProcess,
    ScriptedBackend,
    ScriptedConn,
    Server,
    admin_get,
    connect,
    recv_exact,
    recv_until,
    redirect_target,
    refused_port,
    request_bytes,
    reset_close,
    tunnel_request,
)
from tls_peers import Pki

UP, DOWN = 1000, 2345  # tunnel bytes: client -> backend, backend -> client


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-observability"))


@pytest.fixture
def refused() -> Iterator[int]:
    sock, port = refused_port()
    yield port
    sock.close()


def tunnel_script(up: int = UP, down: int = DOWN) -> Callable[[ScriptedConn], tuple[int, bytes]]:
    """A backend that answers 101, sends `down` bytes, reads `up` bytes and then the client's
    end of stream, and closes."""

    def script(conn: ScriptedConn) -> tuple[int, bytes]:
        conn.sock.sendall(RESPONSE_101 + b"d" * down)
        got = conn.recv_exact(up)
        rest, _ = conn.read_to_eof()
        return rest, got

    return script


def run_tunnel(port: int, user_agent: str = "tunnel-agent/2") -> None:
    """Upgrade, receive DOWN bytes, send UP bytes, close our side first, read to EOF."""
    with connect(port) as sock:
        head = tunnel_request().replace(
            b"\r\n\r\n", f"\r\nUser-Agent: {user_agent}\r\n\r\n".encode(), 1
        )
        sock.sendall(head)
        buf = bytearray()
        answer = recv_until(sock, buf, b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        assert recv_exact(sock, DOWN, buf) == b"d" * DOWN
        sock.sendall(b"u" * UP)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass


@dataclass
class Scene:
    """A proxy with routes for every kind of answer, and the backends behind it."""

    proxy: ProxyProcess
    http: HttpBackend
    tunnel: ScriptedBackend
    refused_port: int

    def request(self, raw: bytes, method: str = "GET") -> tuple[int, bytes]:
        with HttpClient(self.proxy.port, timeout=5) as c:
            resp = c.request(raw, method)
        return resp.status, resp.body


@pytest.fixture
def scene(run_proxy, http_backend, scripted_backend, refused) -> Callable[..., Scene]:
    """`scene(*flags)`: routes /app/ (the HTTP backend), /tunnel (a scripted 101), /down/ (a
    refused port); nothing for other paths (404)."""

    def start(*flags: str) -> Scene:
        tunnel = scripted_backend(tunnel_script())
        proxy = run_proxy(
            "--listen",
            "127.0.0.1:0",
            "--route",
            f"/app/=http://127.0.0.1:{http_backend.port}/",
            "--route",
            f"/tunnel=http://127.0.0.1:{tunnel.port}",
            "--route",
            f"/down/=http://127.0.0.1:{refused}",
            *flags,
        )
        return Scene(proxy, http_backend, tunnel, refused)

    return start


def traffic(s: Scene) -> dict[str, int]:
    """The same requests for every access log test; returns the body sizes of the answers
    the proxy wrote itself, by target."""
    ok = request_bytes(
        "GET",
        "/app/page?q=1",
        [
            ("Host", "app.test"),
            ("Referer", "https://app.test/start"),
            ("User-Agent", 'probe "quoted" \\ agent'),
        ],
    )
    assert s.request(ok) == (200, b"GET /page?q=1")  # the route maps /app/ to /
    assert s.request(request_bytes("GET", "/app/status/204", [("Host", "a")]))[0] == 204
    body = b"x" * 5000
    post = request_bytes(
        "POST", "/app/echo", [("Host", "a"), ("Content-Length", str(len(body)))], body
    )
    assert s.request(post) == (200, body)
    own = {}
    for target, status in (("/nowhere", 404), ("/down/x", 502)):
        answer = s.request(request_bytes("GET", target, [("Host", "a")]))
        assert answer[0] == status
        own[target] = len(answer[1])
    run_tunnel(s.proxy.port)
    assert s.tunnel.result() == (0, b"u" * UP)
    return own


CLF = re.compile(
    r"(?P<client>\S+) - - \[(?P<time>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] "
    r'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<size>\d+|-) '
    r'"(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"'
    r"(?P<rest>.*)"
)
TUNNEL_REST = re.compile(
    r" tunnel (?P<duration>\d+\.\d{3})s client->backend=(?P<up>\d+) "
    r'backend->client=(?P<down>\d+) ended="(?P<ended>[^"]*)" backend="(?P<backend>[^"]*)"'
)
STDERR_PREFIX = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) ")


def parse_clf(lines: list[str]) -> dict[str, dict[str, str]]:
    """Combined lines by request target (each target once)."""
    out: dict[str, dict[str, str]] = {}
    for line in lines:
        m = CLF.fullmatch(line)
        assert m, f"not a combined log line: {line!r}"
        fields = m.groupdict()
        target = fields["request"].split(" ")[1]
        assert target not in out, f"two lines for {target}: {lines}"
        out[target] = fields
    return out


def check_combined(lines: list[str], s: Scene) -> None:
    by_target = parse_clf(lines)
    assert set(by_target) == {
        "/app/page?q=1",
        "/app/status/204",
        "/app/echo",
        "/nowhere",
        "/down/x",
        "/tunnel",
    }, lines
    for fields in by_target.values():
        assert fields["client"] == "127.0.0.1", fields
        stamp = time.strptime(fields["time"], "%d/%b/%Y:%H:%M:%S %z")
        assert abs(time.mktime(stamp) - time.time()) < 24 * 3600
    page = by_target["/app/page?q=1"]
    assert page["request"] == "GET /app/page?q=1 HTTP/1.1"
    assert (page["status"], page["size"]) == ("200", str(len("GET /page?q=1")))
    assert page["referer"] == "https://app.test/start"
    assert page["agent"] == r"probe \"quoted\" \\ agent"
    assert page["rest"] == ""
    assert (by_target["/app/status/204"]["status"], by_target["/app/status/204"]["size"]) == (
        "204",
        "-",
    )
    echo = by_target["/app/echo"]
    assert (echo["request"], echo["status"], echo["size"]) == (
        "POST /app/echo HTTP/1.1",
        "200",
        "5000",
    )
    assert by_target["/nowhere"]["status"] == "404"
    assert by_target["/down/x"]["status"] == "502"
    for target in ("/app/echo", "/nowhere", "/down/x"):
        assert (by_target[target]["referer"], by_target[target]["agent"]) == ("-", "-")
    # Answered by the backend: the combined format and nothing more. Answered by the proxy:
    # it may say why, in one more quoted field.
    for target in ("/app/page?q=1", "/app/status/204", "/app/echo"):
        assert by_target[target]["rest"] == "", by_target[target]
    for target in ("/nowhere", "/down/x"):
        assert re.fullmatch(r'( error="(?:[^"\\]|\\.)*")?', by_target[target]["rest"]), by_target[
            target
        ]

    tunnel = by_target["/tunnel"]
    assert (tunnel["status"], tunnel["size"]) == ("101", str(DOWN))
    assert tunnel["agent"] == "tunnel-agent/2"
    m = TUNNEL_REST.fullmatch(tunnel["rest"])
    assert m, tunnel["rest"]
    assert (int(m["up"]), int(m["down"])) == (UP, DOWN)
    assert m["ended"] == "client closed"
    assert m["backend"] == f"http://127.0.0.1:{s.tunnel.port}"
    assert 0 <= float(m["duration"]) < 10


def access_lines_on_stderr(proxy: ProxyProcess) -> list[str]:
    """The access lines in the proxy's stderr, without their logging prefix, once the tunnel's
    line (the last of `traffic()`) is there."""
    proxy.wait_for_log(r'"GET /tunnel HTTP/1\.1" 101 ')
    out = []
    for line in proxy.logs_matching(r'"[A-Z]+ \S+ HTTP/1\.1" \d{3} '):
        m = STDERR_PREFIX.match(line)
        assert m, f"no timestamp and level prefix: {line!r}"
        rest = line[m.end() :]
        # INFO, but for an answer the proxy made itself (404 no route, 502): that line is also
        # the error's one log line, at WARNING, saying why.
        if m["level"] != "INFO":
            assert m["level"] == "WARNING", line
            assert re.search(r'" (404|502) .* error="[^"]+"$', rest), line
        out.append(rest)
    return out


def test_access_log_combined_on_stderr(scene):
    s = scene()
    traffic(s)
    check_combined(access_lines_on_stderr(s.proxy), s)


def read_file_lines(path: Path, timeout: float = 5.0) -> list[str]:
    """The file's lines once the tunnel's (the last of `traffic()`) is there."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if any("/tunnel" in line for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_access_log_combined_in_a_file(scene, tmp_path: Path):
    path = tmp_path / "access.log"
    s = scene("--access-log", str(path))
    traffic(s)
    lines = read_file_lines(path)
    check_combined(lines, s)  # bare lines: the combined format from the first character
    assert not s.proxy.logs_matching(r'"GET /app/page\?q=1 HTTP/1\.1"')


def test_access_log_file_has_a_line_for_every_answer(start_proxy, scripted_backend, tmp_path):
    """What the access log file says when no response, or only part of one, was delivered:
    a head that never parsed (400, request "-"), a body the backend cut short (its status,
    the bytes the client got, why), a client that left mid-response (likewise)."""

    def script(sc: ScriptedConn):
        if b"/cut" in sc.head:
            sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n123456789")
            return "cut"
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(2000):
                sc.sock.sendall(b"x" * 65536)
        return "streamed"

    backend = scripted_backend(script)
    path = tmp_path / "access.log"
    proxy = start_proxy(backend.port, "--access-log", str(path))
    garbage = connect(proxy.port)
    garbage.sendall(b"GARBAGE\r\n\r\n")
    answer = bytearray()
    while chunk := garbage.recv(4096):  # the proxy closes after its 400
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    garbage.close()
    cut = connect(proxy.port)
    cut.sendall(request_bytes("GET", "/cut", [("Host", "a")]))
    buf = bytearray()
    recv_until(cut, buf, b"123456789")
    cut.close()
    leaver = connect(proxy.port)
    leaver.sendall(request_bytes("GET", "/stream", [("Host", "a")]))
    recv_exact(leaver, 200_000, bytearray())
    reset_close(leaver)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= 3:
            break
        time.sleep(0.05)
    assert len(lines) == 3, lines
    fields = [CLF.fullmatch(line) for line in lines]
    assert all(fields), lines
    by_request = {f["request"]: f for f in fields if f}
    unparsed = by_request["-"]
    page = len(answer) - answer.index(b"\r\n\r\n") - 4
    assert (unparsed["status"], unparsed["size"]) == ("400", str(page)), unparsed
    assert "error=" in unparsed["rest"]
    truncated = by_request["GET /cut HTTP/1.1"]
    assert (truncated["status"], truncated["size"]) == ("200", "9")
    assert "in the middle of the response" in truncated["rest"]
    left = by_request["GET /stream HTTP/1.1"]
    assert left["status"] == "200"
    assert 200_000 <= int(left["size"]) < 100_000_000
    assert "client went away" in left["rest"]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "h11"])
def test_bytes_above_ascii_are_escaped_in_the_access_log(start_proxy, http_backend, tmp_path, fast):
    """A header value may carry any byte from 0x80 on (obs-text). Written as they came (one
    Latin-1 character each, then UTF-8), 0x85 is NEL, a line break to every reader that splits
    on Unicode line breaks (the forged line below was a second entry), and 0x9B is CSI to a
    terminal: they are escaped as \\xHH, as Apache does, so the file holds one line per
    request whatever reads it."""
    path = tmp_path / "access.log"
    proxy = start_proxy(http_backend.port, "--access-log", str(path))
    agent = b'evil\x85127.0.0.1 - - [x] "GET /admin HTTP/1.1" 200 1\x9b2J caf\xc3\xa9\x7f'
    extra = b"" if fast else b"Transfer-Encoding: chunked\r\n"  # the h11 path
    body = b"" if fast else b"0\r\n\r\n"
    with HttpClient(proxy.port, timeout=5) as c:
        head = b"POST /ua HTTP/1.1\r\nHost: a\r\nUser-Agent: " + agent + b"\r\n" + extra
        assert c.request(head + b"\r\n" + body).status == 200
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline and not text.endswith("\n"):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        time.sleep(0.05)
    lines = text.splitlines()  # str.splitlines: every Unicode line break
    assert len(lines) == 1, lines
    m = CLF.fullmatch(lines[0])
    assert m, lines
    assert m["agent"] == (
        r"evil\x85127.0.0.1 - - [x] \"GET /admin HTTP/1.1\" 200 1\x9b2J caf\xc3\xa9\x7f"
    ), lines
    assert text.isascii(), text


def test_plain_http_to_a_tls_port_has_its_access_line(start_proxy, http_backend, pki, tmp_path):
    """The 400 a client gets for plain HTTP on a TLS port is an answer like any other 400 of
    the proxy's: a line in the access log file and a count in requests_total (it had only
    the stderr line and the handshake failure counter: the file and the counters said
    nothing had been answered)."""
    path = tmp_path / "access.log"
    proxy = start_proxy(
        http_backend.port,
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
        "--access-log",
        str(path),
        "--admin-listen",
        "127.0.0.1:0",
    )
    assert proxy.admin_port is not None
    before = Metrics(proxy.admin_port)
    sock = connect(proxy.port)
    sock.sendall(request_bytes("GET", "/x", [("Host", "a")]))
    sock.settimeout(5)
    head = recv_until(sock, bytearray(), b"\r\n\r\n")
    sock.close()
    assert head.startswith(b"HTTP/1.1 400 "), head
    proxy.wait_for_log(r"TLS handshake failed: the client spoke plain HTTP")
    deadline = time.monotonic() + 5
    lines: list[str] = []
    while time.monotonic() < deadline and not lines:
        lines = path.read_text().splitlines() if path.exists() else []
        time.sleep(0.05)
    assert len(lines) == 1, lines
    fields = CLF.fullmatch(lines[0])
    assert fields, lines
    assert (fields["request"], fields["status"], fields["size"]) == ("GET /x HTTP/1.1", "400", "-")
    assert 'error="the client spoke plain HTTP to a TLS port"' in fields["rest"], lines
    after = Metrics(proxy.admin_port)
    for name, labels in [
        ("rawproxy_requests_total", {"code_class": "4xx"}),
        ("rawproxy_tls_handshake_failures_total", {"side": "client"}),
    ]:
        assert after(name, **labels) - before(name, **labels) == 1, (name, after.text)


def test_a_408_names_the_request_line_it_had(start_proxy, http_backend, tmp_path, sockets):
    """A head that never completed gets 408; when its request line was complete, both log
    lines name that request (as nginx's does), where they said "-" (which request timed out
    was not to be found). A request line itself cut short still logs "-"."""
    path = tmp_path / "access.log"
    proxy = start_proxy(http_backend.port, "--header-timeout", "1", "--access-log", str(path))
    mark = proxy.mark()
    named = connect(proxy.port)
    named.sendall(b"POST /upload?id=7 HTTP/1.1\r\nHost: a\r\nX-Half: ")
    unnamed = connect(proxy.port)
    unnamed.sendall(b"POST /upl")
    sockets.extend([named, unnamed])
    for sock in (named, unnamed):
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 408 ")
    proxy.wait_for_log(r'"POST /upload\?id=7 HTTP/1\.1" -> 408: request head not complete', mark)
    deadline = time.monotonic() + 5
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= 2:
            break
        time.sleep(0.05)
    fields = [CLF.fullmatch(line) for line in lines]
    assert all(fields), lines
    assert sorted((f["request"], f["status"]) for f in fields if f) == [
        ("-", "408"),
        ("POST /upload?id=7 HTTP/1.1", "408"),
    ], lines


@pytest.mark.parametrize("path", ["fast", "h11"])
def test_a_client_that_resets_while_waiting_is_logged_499(
    start_proxy, scripted_backend, tmp_path, path
):
    """A client that resets while its request waits for the backend has left: 499 in the
    access log, and the backend's connection is dropped, on the fast path (which reads the
    client anyway) and on h11's (a request with a body goes there; the client is watched for
    a reset once its request is complete)."""
    gone = threading.Event()

    def script(sc: ScriptedConn):
        # Wait, not reading, until the proxy drops the connection (or 5 s).
        poller = select.poll()
        poller.register(sc.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        if poller.poll(5000):
            gone.set()
        return "done"

    backend = scripted_backend(script)
    path_log = tmp_path / "access.log"
    proxy = start_proxy(backend.port, "--access-log", str(path_log))
    c = connect(proxy.port)
    if path == "fast":
        c.sendall(request_bytes("GET", "/wait", [("Host", "a")]))
    else:
        c.sendall(request_bytes("POST", "/wait", [("Host", "a"), ("Content-Length", "4")], b"body"))
    time.sleep(0.3)
    reset_close(c)
    assert gone.wait(5), "the backend connection was kept after the client left"
    deadline = time.monotonic() + 5
    lines: list[str] = []
    while time.monotonic() < deadline and not lines:
        lines = path_log.read_text().splitlines() if path_log.exists() else []
        time.sleep(0.05)
    [line] = lines
    m = CLF.fullmatch(line)
    assert m, line
    assert m["status"] == "499", line
    assert "client went away" in m["rest"]


def test_a_client_half_closed_after_its_request_still_gets_the_answer(
    start_proxy, scripted_backend
):
    """The other side of the watch for a reset: a client that shuts its sending side after a
    request on h11's path (a body sends it there) has not left. The answer comes, and the
    proxy does not spin on the client's end of stream while it waits."""

    def script(sc: ScriptedConn):
        time.sleep(0.8)
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return "answered"

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    c = connect(proxy.port)
    c.sendall(request_bytes("POST", "/half", [("Host", "a"), ("Content-Length", "4")], b"body"))
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.1)
    busy = proxy.cpu_seconds()
    time.sleep(0.5)
    busy = proxy.cpu_seconds() - busy
    assert busy < 0.2, f"the proxy used {busy:.2f} s of CPU in 0.5 s of waiting"
    try:
        answer = recv_until(c, bytearray(), b"ok")
    finally:
        c.close()
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert backend.result() == "answered"


REQUEST_KEYS = {
    "type",
    "time",
    "client",
    "method",
    "target",
    "version",
    "status",
    "bytes",
    "referer",
    "user_agent",
    "duration",
    "backend",
}
TUNNEL_KEYS = (REQUEST_KEYS - {"bytes"}) | {
    "bytes_client_to_backend",
    "bytes_backend_to_client",
    "ended",
}


def test_access_log_json(scene, tmp_path: Path):
    path = tmp_path / "access.json"
    s = scene("--access-log", str(path), "--access-log-format", "json")
    started = time.time()
    own = traffic(s)
    lines = read_file_lines(path)
    records: dict[str, dict[str, Any]] = {}
    for line in lines:
        record = json.loads(line)  # one object per line
        assert isinstance(record, dict), line
        records[record["target"]] = record
    assert len(records) == len(lines) == 6, lines
    app = f"http://127.0.0.1:{s.http.port}"
    for target, record in records.items():
        kind = "tunnel" if target == "/tunnel" else "request"
        assert record["type"] == kind, record
        assert set(record) >= (TUNNEL_KEYS if kind == "tunnel" else REQUEST_KEYS), record
        assert record["client"] == "127.0.0.1"
        assert record["version"] == "1.1"
        assert started - 1 <= record["time"] <= time.time() + 1, record
        assert 0 <= record["duration"] < 10, record

    page = records["/app/page?q=1"]
    assert (page["method"], page["status"], page["bytes"]) == ("GET", 200, 13)
    assert page["referer"] == "https://app.test/start"
    assert page["user_agent"] == 'probe "quoted" \\ agent'
    assert page["backend"] == app
    assert (records["/app/status/204"]["status"], records["/app/status/204"]["bytes"]) == (204, 0)
    echo = records["/app/echo"]
    assert (echo["method"], echo["status"], echo["bytes"]) == ("POST", 200, 5000)
    assert echo["referer"] is None
    assert echo["user_agent"] is None
    for target in ("/app/page?q=1", "/app/status/204", "/app/echo", "/tunnel"):
        assert "error" not in records[target], records[target]
    for target in ("/nowhere", "/down/x"):  # answered by the proxy: it may say why
        assert isinstance(records[target].get("error", ""), str), records[target]
    assert records["/nowhere"]["status"] == 404
    assert records["/nowhere"]["backend"] is None
    assert records["/down/x"]["status"] == 502
    # The pages the proxy wrote count as what the client got, as Apache and nginx count theirs.
    for target in ("/nowhere", "/down/x"):
        assert records[target]["bytes"] == own[target] > 0, (records[target], own)
    assert records["/down/x"]["backend"] == f"http://127.0.0.1:{s.refused_port}"

    tunnel = records["/tunnel"]
    assert tunnel["status"] == 101
    assert tunnel["method"] == "GET"
    assert tunnel["bytes_client_to_backend"] == UP
    assert tunnel["bytes_backend_to_client"] == DOWN
    assert tunnel["ended"] == "client closed"
    assert tunnel["user_agent"] == "tunnel-agent/2"
    assert tunnel["backend"] == f"http://127.0.0.1:{s.tunnel.port}"


# --- /metrics and /healthz -------------------------------------------------------------------


class NotTls(Server):
    """A backend that answers plain HTTP to anything: a TLS handshake with it fails."""

    name = "not-tls"

    def handle(self, conn: socket.socket, conn_id: int) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def not_tls() -> Iterator[NotTls]:
    backend = NotTls()
    yield backend
    backend.stop()


def delta(after: Metrics, before: Metrics, name: str, **labels: str) -> float:
    return after(name, **labels) - before(name, **labels)


CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def by_class(after: Metrics, before: Metrics) -> dict[str, float]:
    return {c: delta(after, before, "rawproxy_requests_total", code_class=c) for c in CLASSES}


FAMILIES = {
    "rawproxy_info": "gauge",
    "rawproxy_connections_open": "gauge",
    "rawproxy_tunnels_open": "gauge",
    "rawproxy_connections_total": "counter",
    "rawproxy_tunnels_total": "counter",
    "rawproxy_requests_total": "counter",
    "rawproxy_bytes_total": "counter",
    "rawproxy_backend_connect_errors_total": "counter",
    "rawproxy_tls_handshake_failures_total": "counter",
    "rawproxy_proxy_protocol_errors_total": "counter",
    "rawproxy_idle_connections_reclaimed_total": "counter",
    "rawproxy_request_head_latency_seconds": "histogram",
    "rawproxy_backend_connect_latency_seconds": "histogram",
    "rawproxy_gc_collections_total": "counter",
    "rawproxy_gc_frozen_objects": "gauge",
}


def test_metrics_move_with_the_traffic(
    run_proxy, http_backend, scripted_backend, refused, not_tls, pki, sockets
):
    release = threading.Event()

    def held_tunnel(conn: ScriptedConn) -> bytes:
        conn.sock.sendall(RESPONSE_101)
        got = conn.recv_exact(10_000)
        conn.sock.sendall(b"b" * 20_000)
        release.wait(10)
        conn.read_to_eof()
        return got

    tunnel = scripted_backend(held_tunnel)
    proxy = run_proxy(
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
        "--route",
        f"/app/=http://127.0.0.1:{http_backend.port}/",
        "--route",
        f"/tunnel=http://127.0.0.1:{tunnel.port}",
        "--route",
        f"/down/=http://127.0.0.1:{refused}",
        "--route",
        f"/tlsdown/=https://127.0.0.1:{not_tls.port}",
        "--backend-ca",
        str(pki.ca_file),
        "--admin-listen",
        "127.0.0.1:0",
    )
    plain_port, tls_port = proxy.ports
    admin = proxy.admin_port
    assert admin is not None, proxy.log_text()

    health = admin_get(admin, "/healthz")
    assert (health.status, health.body.strip()) == (200, b"ok")
    assert admin_get(admin, "/nothing-here").status == 404

    m0 = Metrics(admin)
    for name, kind in FAMILIES.items():
        assert f"# TYPE {name} {kind}\n" in m0.text, name
        assert f"# HELP {name} " in m0.text, name
    assert all(name.startswith("rawproxy_") for name, _ in m0.samples), m0.text
    info = [labels for name, labels in m0.samples if name == "rawproxy_info"]
    assert len(info) == 1
    assert dict(info[0]).get("version"), info
    assert m0("rawproxy_tunnels_open") == 0
    # The serving process settled its garbage collector (rawproxy.loop.settle_gc).
    assert m0("rawproxy_gc_frozen_objects") > 1000
    assert m0("rawproxy_gc_collections_total", generation="2") <= 2

    # Plain requests: 3 x 2xx, a 3xx, a 4xx (no route), a 5xx (refused backend).
    body = b"p" * 5000
    with HttpClient(plain_port, timeout=5) as c:
        for i in range(2):
            assert c.request(request_bytes("GET", f"/app/{i}", [("Host", "a")])).status == 200
        post = request_bytes(
            "POST", "/app/echo", [("Host", "a"), ("Content-Length", str(len(body)))], body
        )
        assert c.request(post).body == body
        assert (
            c.request(
                request_bytes("GET", redirect_target("/x", "/app/redirect"), [("Host", "a")])
            ).status
            == 302
        )
        assert c.request(request_bytes("GET", "/missing", [("Host", "a")])).status == 404
    with HttpClient(plain_port, timeout=5) as c:
        assert c.request(request_bytes("GET", "/down/", [("Host", "a")])).status == 502
    m1 = Metrics(admin)
    assert by_class(m1, m0) == {"1xx": 0, "2xx": 3, "3xx": 1, "4xx": 1, "5xx": 1}
    assert delta(m1, m0, "rawproxy_backend_connect_errors_total", cause="refused") == 1
    assert delta(m1, m0, "rawproxy_connections_total") == 2
    assert delta(m1, m0, "rawproxy_bytes_total", direction="client_to_backend") >= len(body)
    assert delta(m1, m0, "rawproxy_bytes_total", direction="backend_to_client") >= len(body)
    assert delta(m1, m0, "rawproxy_request_head_latency_seconds_count") >= 4
    assert delta(m1, m0, "rawproxy_request_head_latency_seconds_sum") > 0
    head_inf = m1("rawproxy_request_head_latency_seconds_bucket", le="+Inf")
    assert head_inf == m1("rawproxy_request_head_latency_seconds_count")
    assert delta(m1, m0, "rawproxy_backend_connect_latency_seconds_count") >= 1
    assert m1("rawproxy_tunnels_open") == 0

    # A tunnel: open, bytes counted while it is open, then exactly once.
    tsock = connect(plain_port)
    sockets.append(tsock)
    tsock.sendall(tunnel_request())
    buf = bytearray()
    assert recv_until(tsock, buf, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
    tsock.sendall(b"a" * 10_000)
    assert recv_exact(tsock, 20_000, buf) == b"b" * 20_000
    m2 = Metrics(admin)
    assert m2("rawproxy_tunnels_open") == 1
    assert delta(m2, m1, "rawproxy_tunnels_total") == 1
    assert by_class(m2, m1) == {"1xx": 1, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    assert delta(m2, m1, "rawproxy_bytes_total", direction="client_to_backend") == 10_000
    assert delta(m2, m1, "rawproxy_bytes_total", direction="backend_to_client") == 20_000
    assert m2("rawproxy_connections_open") == 0  # the tunnel counts as a tunnel only
    release.set()
    tsock.shutdown(socket.SHUT_WR)
    while tsock.recv(65536):
        pass
    assert tunnel.result() == b"a" * 10_000
    deadline = time.monotonic() + 5
    while (m3 := Metrics(admin))("rawproxy_tunnels_open") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m3("rawproxy_tunnels_open") == 0
    assert delta(m3, m1, "rawproxy_bytes_total", direction="client_to_backend") == 10_000
    assert delta(m3, m1, "rawproxy_bytes_total", direction="backend_to_client") == 20_000

    # TLS: a client speaking plain HTTP to the TLS port, and a backend that is not TLS.
    with HttpClient(tls_port, timeout=5) as c:
        assert c.request(request_bytes("GET", "/app/x", [("Host", "a")])).status == 400
    with HttpClient(tls_port, timeout=5, ssl_context=pki.client_context()) as c:
        assert c.request(request_bytes("GET", "/app/ok", [("Host", "a")])).status == 200
        assert c.request(request_bytes("GET", "/tlsdown/x", [("Host", "a")])).status == 502
    m4 = Metrics(admin)
    assert delta(m4, m3, "rawproxy_tls_handshake_failures_total", side="client") == 1
    assert delta(m4, m3, "rawproxy_tls_handshake_failures_total", side="backend") == 1
    assert delta(m4, m3, "rawproxy_backend_connect_errors_total", cause="tls") == 1
    assert by_class(m4, m3)["5xx"] == 1
    assert by_class(m4, m3)["2xx"] == 1
    assert m4("rawproxy_proxy_protocol_errors_total") == 0

    # Open connections: two idle kept-alive clients.
    idle = [HttpClient(plain_port, timeout=5) for _ in range(2)]
    try:
        for c in idle:
            assert c.request(request_bytes("GET", "/app/idle", [("Host", "a")])).status == 200
        assert Metrics(admin)("rawproxy_connections_open") == 2
    finally:
        for c in idle:
            c.close()


def test_an_answer_stalled_mid_body_has_its_access_line(start_proxy, scripted_backend, tmp_path):
    """A backend that stops in the middle of a body: --response-timeout cuts the exchange,
    and the access log says so (status, the bytes the client got, why), as it does for a
    body the backend cut short. It used to say nothing: the request was missing there."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc")
        time.sleep(3)

    backend = scripted_backend(script)
    path = tmp_path / "access.log"
    proxy = start_proxy(backend.port, "--access-log", str(path), "--response-timeout", "1")
    c = connect(proxy.port)
    c.sendall(request_bytes("GET", "/stalled", [("Host", "a")]))
    recv_until(c, bytearray(), b"abc")
    deadline = time.monotonic() + 5
    lines: list[str] = []
    while time.monotonic() < deadline and not lines:
        lines = path.read_text().splitlines() if path.exists() else []
        time.sleep(0.05)
    c.close()
    assert len(lines) == 1, lines
    fields = CLF.fullmatch(lines[0])
    assert fields, lines
    assert fields["request"] == "GET /stalled HTTP/1.1"
    assert (fields["status"], fields["size"]) == ("200", "3")
    assert "--response-timeout" in fields["rest"]
    assert "the backend sent no more" in fields["rest"]
    assert len(proxy.logs_matching("no progress for 1s")) == 1
