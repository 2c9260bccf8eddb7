"""Differential framing tests against real HTTP implementations.

The promise under test: the backend never frames a request differently from the proxy
(request smuggling), and a connection never becomes a tunnel after an answer that is not a
101. Earlier tests checked the proxy against h11 and hand-written stubs; here real servers
sit on the other side:

A. client -> rawproxy -> nginx (the backend, answering every request with one line that
   names it): ambiguous requests are sent pipelined on one connection, followed by an
   ordinary request. The requests nginx logged must be exactly those rawproxy logged as
   forwarded, in order, and the client must get one answer per request rawproxy read,
   each the answer to that request.
B. client -> nginx / HAProxy (front) -> rawproxy -> tests/peers.HttpBackend: the requests
   the front proxy forwarded must be the requests rawproxy forwarded and the backend read.
C. client -> rawproxy -> nginx, which answers 101 (proxying to a WebSocket peer) on some
   paths and 200/400/426 on others, with bytes pipelined right after the upgrade request:
   no tunnel after a non-101, and those bytes reach nginx only as a request rawproxy parsed
   and logged.

Every server is started here with a generated config in a temporary directory, on loopback
ports, as one process (nginx `master_process off`, HAProxy `nbthread 1`), and stopped by its
PID at teardown; a test is skipped when its server binary is not installed.

The whole table (88 ambiguous inputs, each through three set-ups, about 8 minutes) runs with
RAWPROXY_DIFFERENTIAL=full; by default every sixth input and one delivery of the upgrade
cases run (about a minute), so that the suite stays within CI's time. They came from a
review (session 22) that found no mismatch with nginx 1.22 or HAProxy 2.6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import peers
import pytest

LOOPBACK = "127.0.0.1"
WAIT = 3.0  # how long a client waits for bytes that should come
SETTLE = 0.4  # how long to look for bytes that should NOT come (an extra request, say)


def _binary(name: str) -> str | None:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


NGINX = _binary("nginx")
HAPROXY = _binary("haproxy")

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


# --- servers ---------------------------------------------------------------------------------


class Daemon:
    """A server process started from a generated config, stopped by its PID."""

    def __init__(self, name: str, argv: list[str], workdir: Path, port: int) -> None:
        self.name = name
        self.workdir = workdir
        self.port = port
        self.output = open(workdir / f"{name}.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                self.output.flush()
                text = (workdir / f"{name}.out").read_text(errors="replace")
                raise RuntimeError(f"{name} exited at start ({self.proc.returncode}): {text}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not listen on {port} within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.output.close()


# One JSON object per request: what nginx read of it.
NGINX_LOG_FORMAT = (
    'log_format diff escape=json \'{"request":"$request","uri":"$request_uri",'
    '"status":$status,"length":$request_length,"conn":$connection,'
    '"n":$connection_requests,"cl":"$content_length","te":"$http_transfer_encoding"}\';'
)


def nginx_backend_config(
    d: Path, port: int, ws_port: int | None = None, keepalive_requests: int = 10000
) -> str:
    """nginx as the origin: every request answered 200 with `METHOD URI CL` (its body, if
    any, read and dropped); /ws/ proxied as a WebSocket to `ws_port`; /status/NNN/ that
    status."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(exist_ok=True)
    ws = ""
    if ws_port is not None:
        ws = f"""
        location /ws/ {{
            proxy_pass http://127.0.0.1:{ws_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 30s;
        }}"""
    return f"""\
master_process off;
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    {NGINX_LOG_FORMAT}
    access_log {d}/access.log diff;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests {keepalive_requests};
    keepalive_timeout 30s;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "$request_method $request_uri $content_length\\n"; }}
        location /status/400/ {{ return 400 "no\\n"; }}
        location /status/426/ {{ add_header Upgrade websocket; return 426 "no\\n"; }}
        location /status/200/ {{ return 200 "no\\n"; }}{ws}
    }}
}}
"""


def start_nginx(workdir: Path, config_of: Callable[[Path, int], str]) -> Daemon:
    assert NGINX is not None
    port = peers.free_port()
    path = workdir / "nginx.conf"
    path.write_text(config_of(workdir, port))
    argv = [NGINX, "-p", f"{workdir}/", "-c", str(path), "-e", f"{workdir}/error.log"]
    return Daemon("nginx", argv, workdir, port)


def read_nginx_log(workdir: Path) -> list[dict]:
    path = workdir / "access.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def read_rawproxy_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def forwarded_lines(lines: list[dict]) -> list[dict]:
    """rawproxy's access lines of requests it forwarded (not answered itself)."""
    return [x for x in lines if "error" not in x and x.get("method") is not None]


# --- a tolerant client -----------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    head: bytes
    body: bytes


def _headers_of(head: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            out.append((name.strip().lower(), value.strip()))
    return out


def parse_answers(data: bytes, closed: bool) -> tuple[list[Answer], bytes, list[Answer]]:
    """The complete final answers in `data` (every request here is a GET or POST, never a
    HEAD), the bytes left over, and the interim (1xx) answers met on the way."""
    answers: list[Answer] = []
    interim: list[Answer] = []
    rest = data
    for _ in range(1000):
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            break
        head = rest[: end + 4]
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            break
        after = rest[end + 4 :]
        headers = _headers_of(head)
        if 100 <= status < 200:
            interim.append(Answer(status, head, b""))
            rest = after
            if status == 101:
                break
            continue
        te = [v for k, v in headers if k == b"transfer-encoding"]
        cl = [v for k, v in headers if k == b"content-length"]
        if te:
            body = bytearray()
            pos = 0
            done = False
            for _ in range(10000):
                line_end = after.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size = int(after[pos:line_end].split(b";")[0], 16)
                if size == 0:
                    trailer_end = after.find(b"\r\n\r\n", line_end)
                    if after[line_end : line_end + 4] == b"\r\n\r\n":
                        trailer_end = line_end
                    if trailer_end < 0:
                        break
                    pos = trailer_end + 4
                    done = True
                    break
                if len(after) < line_end + 2 + size + 2:
                    break
                body += after[line_end + 2 : line_end + 2 + size]
                pos = line_end + 2 + size + 2
            if not done:
                break
            answers.append(Answer(status, head, bytes(body)))
            rest = after[pos:]
        elif cl:
            size = int(cl[0])
            if len(after) < size:
                break
            answers.append(Answer(status, head, after[:size]))
            rest = after[size:]
        elif status in (204, 304):
            answers.append(Answer(status, head, b""))
            rest = after
        else:
            if not closed:
                break
            answers.append(Answer(status, head, after))
            rest = b""
    return answers, rest, interim


@dataclasses.dataclass
class Exchange:
    answers: list[Answer]
    interim: list[Answer]
    leftover: bytes
    closed: bool


def exchange(
    port: int, data: bytes | list[bytes], expect: int, gap: float = 0.05, wait: float = WAIT
) -> Exchange:
    """Send `data` (a list: pieces with `gap` between them) on one connection, and read until
    `expect` final answers came, the connection closed, or nothing came for `wait` s."""
    pieces = [data] if isinstance(data, bytes) else data
    sock = socket.create_connection((LOOPBACK, port), WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    closed = False
    try:
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(gap)
            with contextlib.suppress(OSError):
                sock.sendall(piece)
        sock.settimeout(wait)
        for _ in range(10000):
            answers, _, _ = parse_answers(bytes(buf), False)
            if len(answers) >= expect:
                # Anything more (an answer nobody asked for) would show within SETTLE.
                sock.settimeout(SETTLE)
            try:
                more = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not more:
                closed = True
                break
            buf += more
    finally:
        sock.close()
    answers, rest, interim = parse_answers(bytes(buf), closed)
    return Exchange(answers, interim, rest, closed)


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- rig A: client -> rawproxy -> nginx --------------------------------------------------------


@dataclasses.dataclass
class RigA:
    proxy: peers.ProxyProcess
    nginx: Daemon
    access: Path
    workdir: Path

    def nginx_log(self) -> list[dict]:
        return read_nginx_log(self.workdir)

    def proxy_log(self) -> list[dict]:
        return read_rawproxy_log(self.access)


@pytest.fixture
def rig_a(tmp_path: Path, start_proxy: Callable[..., peers.ProxyProcess]) -> Iterator[RigA]:
    if NGINX is None:
        pytest.skip("nginx is not installed")
    nginx = start_nginx(tmp_path, nginx_backend_config)
    access = tmp_path / "rawproxy-access.log"
    try:
        proxy = start_proxy(
            nginx.port,
            "--access-log",
            str(access),
            "--access-log-format",
            "json",
            "--header-timeout",
            "2",
            "--response-timeout",
            "5",
        )
        yield RigA(proxy, nginx, access, tmp_path)
    finally:
        nginx.stop()


def _path_of(target: str) -> str:
    if target.startswith("/"):
        return target
    after = target.split("://", 1)[-1]
    return "/" + after.split("/", 1)[1] if "/" in after else "/"


def nginx_path(entry: dict) -> str:
    """The path nginx read (from its request line when it refused the request)."""
    if entry["uri"]:
        return entry["uri"]
    parts = entry["request"].split(" ")
    return _path_of(parts[1]) if len(parts) > 1 else entry["request"]


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def assert_same_requests(seen: list[dict], lines: list[dict]) -> None:
    """The differential invariant: every request the backend (nginx) read is one rawproxy
    read and logged, in the same order (a request rawproxy refused in the middle of its
    body, after forwarding its head, may be there or not), and every request rawproxy
    forwarded and completed was read by the backend."""
    theirs = [nginx_path(x) for x in seen]
    ours_all = [_path_of(x["target"]) for x in lines if may_have_reached_backend(x)]
    ours_done = [_path_of(x["target"]) for x in forwarded_lines(lines)]
    why = (
        "the backend framed the forwarded bytes into other requests than rawproxy read "
        f"(request smuggling):\n backend: {seen}\n rawproxy: {lines}"
    )
    assert is_subsequence(theirs, ours_all), why
    assert is_subsequence(ours_done, theirs), why


def may_have_reached_backend(line: dict) -> bool:
    """An access line of a request whose head rawproxy sent on: answered by the backend, or
    refused for its body once the head was out, or cut by a backend failure; not one refused
    on its head (framing, syntax, limits: answered before anything went on)."""
    if not line.get("target"):
        return False
    error = line.get("error")
    if error is None:
        return True
    return error.startswith(("malformed request body", "client sent no request body")) or line[
        "status"
    ] in (502, 504)


def check_a(r: RigA, data: bytes | list[bytes], sent: int) -> tuple[Exchange, list, list]:
    """Run one differential case through rig A and check the invariants; returns what each
    party made of it for more specific assertions."""
    ex = exchange(r.proxy.port, data, sent)
    # rawproxy has written a line for every answer it sent (including its own errors).
    wait_for(lambda: len(r.proxy_log()) >= len(ex.answers), 3.0)
    forwarded = forwarded_lines(r.proxy_log())
    wait_for(lambda: len(r.nginx_log()) >= len(forwarded), 3.0)
    time.sleep(SETTLE)  # an extra (smuggled) request would be logged by now
    seen = r.nginx_log()
    lines = r.proxy_log()
    assert_same_requests(seen, lines)
    # One answer per request rawproxy read, in order; each forwarded request's answer is
    # nginx's answer to that request (nginx names it in its body).
    assert len(ex.answers) == len(lines), (
        f"client got {len(ex.answers)} answers for {len(lines)} logged requests:\n"
        f" answers: {ex.answers}\n log: {lines}"
    )
    for answer, line in zip(ex.answers, lines, strict=True):
        assert answer.status == line["status"], (answer, line)
        if "error" not in line and answer.status == 200:
            assert answer.body.split(b" ")[:2] == [
                line["method"].encode(),
                _path_of(line["target"]).encode(),
            ], (answer, line)
    assert not ex.leftover, f"bytes after the last whole answer: {ex.leftover!r}"
    return ex, seen, lines


def req(method: str, target: str, *headers: str, body: bytes = b"", version: str = "1.1") -> bytes:
    head = f"{method} {target} HTTP/{version}\r\n" + "".join(h + "\r\n" for h in headers)
    return head.encode("latin-1") + b"\r\n" + body


def after(tag: str) -> bytes:
    return req("GET", f"/{tag}/after", "Host: a.test")


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n"
# A chunked body whose chunk, read as something else, is a request of its own.
CHUNK_OF_SMUGGLED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)

# Ambiguous (or merely unusual) requests, each followed on the same connection by an
# ordinary GET: (name, bytes of the request, how many requests the client means to send).
AMBIGUOUS: list[tuple[str, bytes]] = [
    (
        "cl-dup-same",
        req("POST", "/t", "Host: a", "Content-Length: 5", "Content-Length: 5", body=b"hello"),
    ),
    (
        "cl-dup-differ",
        req(
            "POST",
            "/t",
            "Host: a",
            "Content-Length: 5",
            "Content-Length: 41",
            body=b"hello" + SMUGGLED[:36],
        ),
    ),
    ("cl-list", req("POST", "/t", "Host: a", "Content-Length: 5, 5", body=b"hello")),
    (
        "cl-list-differ",
        req("POST", "/t", "Host: a", "Content-Length: 5, 41", body=b"hello" + SMUGGLED[:36]),
    ),
    ("cl-plus", req("POST", "/t", "Host: a", "Content-Length: +5", body=b"hello")),
    ("cl-leading-zero", req("POST", "/t", "Host: a", "Content-Length: 005", body=b"hello")),
    ("cl-space-inside", req("POST", "/t", "Host: a", "Content-Length: 5 5", body=b"hello")),
    ("cl-hex", req("POST", "/t", "Host: a", "Content-Length: 0x5", body=b"hello")),
    ("cl-empty", req("POST", "/t", "Host: a", "Content-Length: ", body=SMUGGLED)),
    ("cl-zero-then-bytes", req("POST", "/t", "Host: a", "Content-Length: 0", body=SMUGGLED)),
    (
        "cl-te",
        req(
            "POST",
            "/t",
            "Host: a",
            "Content-Length: 4",
            "Transfer-Encoding: chunked",
            body=CHUNK_OF_SMUGGLED,
        ),
    ),
    (
        "te-cl",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            "Content-Length: 4",
            body=CHUNK_OF_SMUGGLED,
        ),
    ),
    (
        "te-chunked-identity",
        req(
            "POST", "/t", "Host: a", "Transfer-Encoding: chunked, identity", body=CHUNK_OF_SMUGGLED
        ),
    ),
    (
        "te-identity-chunked",
        req(
            "POST", "/t", "Host: a", "Transfer-Encoding: identity, chunked", body=CHUNK_OF_SMUGGLED
        ),
    ),
    (
        "te-gzip-chunked",
        req("POST", "/t", "Host: a", "Transfer-Encoding: gzip, chunked", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-identity",
        req("POST", "/t", "Host: a", "Transfer-Encoding: identity", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-Chunked",
        req("POST", "/t", "Host: a", "Transfer-Encoding: Chunked", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-CHUNKED",
        req("POST", "/t", "Host: a", "Transfer-Encoding: CHUNKED", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-space-chunked",
        req("POST", "/t", "Host: a", "Transfer-Encoding:  chunked", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-tab-chunked",
        req("POST", "/t", "Host: a", "Transfer-Encoding:\tchunked\t", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-chunked-vt",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked\x0b", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-chunked-ff",
        req("POST", "/t", "Host: a", "Transfer-Encoding: \x0cchunked", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-chunked-nul",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked\x00", body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-quoted",
        req("POST", "/t", "Host: a", 'Transfer-Encoding: "chunked"', body=CHUNK_OF_SMUGGLED),
    ),
    (
        "te-twice",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: chunked",
            body=CHUNK_OF_SMUGGLED,
        ),
    ),
    (
        "te-twice-identity",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: identity",
            body=CHUNK_OF_SMUGGLED,
        ),
    ),
    (
        "te-http10",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=CHUNK_OF_SMUGGLED,
            version="1.0",
        ),
    ),
    (
        "te-http10-keepalive",
        req(
            "POST",
            "/t",
            "Host: a",
            "Connection: keep-alive",
            "Transfer-Encoding: chunked",
            body=CHUNK_OF_SMUGGLED,
            version="1.0",
        ),
    ),
    (
        "te-space-before-colon",
        req("POST", "/t", "Host: a", "Transfer-Encoding : chunked", body=CHUNK_OF_SMUGGLED),
    ),
    ("cl-space-before-colon", req("POST", "/t", "Host: a", "Content-Length : 41", body=SMUGGLED)),
    (
        "te-underscore",
        req("POST", "/t", "Host: a", "Transfer_Encoding: chunked", body=CHUNK_OF_SMUGGLED),
    ),
    ("cl-underscore", req("POST", "/t", "Host: a", "Content_Length: 41", body=SMUGGLED)),
    (
        "te-obs-fold",
        req(
            "POST",
            "/t",
            "Host: a",
            "X-A: b",
            "Transfer-Encoding: identity",
            " chunked",
            body=CHUNK_OF_SMUGGLED,
        ),
    ),
    ("cl-obs-fold", req("POST", "/t", "Host: a", "Content-Length:", " 41", body=SMUGGLED)),
    (
        "te-name-odd",
        req("POST", "/t", "Host: a", "Transfer-Encoding\x0b: chunked", body=CHUNK_OF_SMUGGLED),
    ),
    ("te-name-nul", req("POST", "/t", "Host: a", "X-A\x00B: 1", body=b"")),
    ("header-no-colon", req("GET", "/t", "Host: a", "Just-A-Name", body=b"")),
    ("header-empty-name", req("GET", "/t", "Host: a", ": value", body=b"")),
    (
        "chunk-leading-zeros",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b"0005\r\nhello\r\n0000\r\n\r\n",
        ),
    ),
    (
        "chunk-upper-hex",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b"A\r\n0123456789\r\n0\r\n\r\n",
        ),
    ),
    (
        "chunk-extension",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b'5;a=b;c="d;e"\r\nhello\r\n0;x\r\n\r\n',
        ),
    ),
    (
        "chunk-extension-lf",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"5;a\nhello\r\n0\r\n\r\n"),
    ),
    (
        "chunk-extension-cr",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b"5;a\rb\r\nhello\r\n0\r\n\r\n",
        ),
    ),
    (
        "chunk-space-after-size",
        req(
            "POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"5 \r\nhello\r\n0\r\n\r\n"
        ),
    ),
    (
        "chunk-space-before-size",
        req(
            "POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b" 5\r\nhello\r\n0\r\n\r\n"
        ),
    ),
    (
        "chunk-0x",
        req(
            "POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"0x5\r\nhello\r\n0\r\n\r\n"
        ),
    ),
    (
        "chunk-plus",
        req(
            "POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"+5\r\nhello\r\n0\r\n\r\n"
        ),
    ),
    (
        "chunk-minus",
        req(
            "POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"-5\r\nhello\r\n0\r\n\r\n"
        ),
    ),
    (
        "chunk-huge",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b"10000000000000005\r\nhello\r\n0\r\n\r\n",
        ),
    ),
    (
        "chunk-64bit-wrap",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b"ffffffffffffffff5\r\nhello\r\n0\r\n\r\n",
        ),
    ),
    (
        "chunk-lf-only",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"5\nhello\n0\n\n"),
    ),
    (
        "chunk-data-lf-end",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"5\r\nhello\n0\r\n\r\n"),
    ),
    (
        "chunk-data-too-long",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"3\r\nhello\r\n0\r\n\r\n"),
    ),
    (
        "chunk-last-lf",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\n\r\n"),
    ),
    (
        "chunk-trailers",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b"5\r\nhello\r\n0\r\nContent-Length: 41\r\nX-T: 1\r\n\r\n",
        ),
    ),
    (
        "chunk-trailer-fold",
        req(
            "POST",
            "/t",
            "Host: a",
            "Transfer-Encoding: chunked",
            body=b"5\r\nhello\r\n0\r\nX-T: 1\r\n folded\r\n\r\n",
        ),
    ),
    (
        "chunk-no-last",
        req("POST", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n")
        + SMUGGLED,
    ),
    ("obs-fold-plain", req("GET", "/t", "Host: a", "X-A: b", " c")),
    ("obs-fold-tab", req("GET", "/t", "Host: a", "X-A: b", "\tc")),
    ("header-bare-cr", req("GET", "/t", "Host: a", "X-A: b\rc")),
    ("head-lf-only", b"GET /t HTTP/1.1\nHost: a\nX-A: b\n\n"),
    ("head-mixed-lf", b"GET /t HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n"),
    ("head-lf-then-crlf-end", b"GET /t HTTP/1.1\nHost: a\n\r\n"),
    ("absolute-form", req("GET", "http://a.test/t?q=1", "Host: other.test")),
    ("absolute-form-https", req("GET", "https://a.test/t", "Host: a.test")),
    ("absolute-form-no-host", req("GET", "http://a.test/t", version="1.1")),
    ("get-with-body", req("GET", "/t", "Host: a", "Content-Length: 5", body=b"hello")),
    (
        "get-with-chunked-body",
        req("GET", "/t", "Host: a", "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
    ),
    ("head-with-body", req("OPTIONS", "/t", "Host: a", "Content-Length: 5", body=b"hello")),
    (
        "expect-100",
        req("POST", "/t", "Host: a", "Expect: 100-continue", "Content-Length: 5", body=b"hello"),
    ),
    (
        "expect-100-chunked",
        req(
            "POST",
            "/t",
            "Host: a",
            "Expect: 100-continue",
            "Transfer-Encoding: chunked",
            body=b"5\r\nhello\r\n0\r\n\r\n",
        ),
    ),
    (
        "expect-other",
        req("POST", "/t", "Host: a", "Expect: something-else", "Content-Length: 5", body=b"hello"),
    ),
    (
        "upgrade-with-cl-body",
        req(
            "GET",
            "/t",
            "Host: a",
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Content-Length: 41",
            body=SMUGGLED,
        ),
    ),
    (
        "upgrade-with-chunked-body",
        req(
            "GET",
            "/t",
            "Host: a",
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Transfer-Encoding: chunked",
            body=CHUNK_OF_SMUGGLED,
        ),
    ),
    (
        "upgrade-h2c-with-body",
        req(
            "POST",
            "/t",
            "Host: a",
            "Connection: Upgrade, HTTP2-Settings",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            "Content-Length: 41",
            body=SMUGGLED,
        ),
    ),
    (
        "connection-nominates-cl",
        req(
            "POST",
            "/t",
            "Host: a",
            "Connection: Content-Length",
            "Content-Length: 41",
            body=SMUGGLED,
        ),
    ),
    (
        "connection-nominates-te",
        req(
            "POST",
            "/t",
            "Host: a",
            "Connection: Transfer-Encoding",
            "Transfer-Encoding: chunked",
            body=CHUNK_OF_SMUGGLED,
        ),
    ),
    ("connection-close-then-more", req("GET", "/t", "Host: a", "Connection: close")),
    (
        "http10-cl-keepalive",
        req(
            "POST",
            "/t",
            "Host: a",
            "Connection: keep-alive",
            "Content-Length: 5",
            body=b"hello",
            version="1.0",
        ),
    ),
    ("http10-no-host", req("GET", "/t", version="1.0")),
    ("two-hosts", req("GET", "/t", "Host: a", "Host: b")),
    ("host-with-space", req("GET", "/t", "Host: a b")),
    ("method-lowercase", req("get", "/t", "Host: a")),
    ("target-with-space", b"GET /t x HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("version-1.2", req("GET", "/t", "Host: a", version="1.2")),
    ("version-2.0", req("GET", "/t", "Host: a", version="2.0")),
    ("leading-crlf", b"\r\n\r\n" + req("GET", "/t", "Host: a")),
    ("body-crlf-extra", req("POST", "/t", "Host: a", "Content-Length: 5", body=b"hello\r\n")),
]


def case_bytes(name: str, data: bytes) -> tuple[bytes, int]:
    """The case's request and the ordinary GET after it (each test has its own nginx and
    rawproxy, so no tag is needed); how many requests the client means to send."""
    stream = data + after("x")
    return stream, stream.count(b" HTTP/")


FULL = os.environ.get("RAWPROXY_DIFFERENTIAL") == "full"
# By default a spread sample of the table (see the module's docstring).
AMBIGUOUS_RUN = AMBIGUOUS if FULL else AMBIGUOUS[::6]


@needs_nginx
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "data"), AMBIGUOUS_RUN, ids=[n for n, _ in AMBIGUOUS_RUN])
def test_nginx_backend_frames_what_rawproxy_forwarded(rig_a: RigA, name: str, data: bytes):
    """A: an ambiguous request and an ordinary GET, pipelined in one write: nginx (the
    backend) reads exactly the requests rawproxy logged as forwarded, and the client gets one
    answer per request rawproxy read, each the answer to that request."""
    stream, sent = case_bytes(name, data)
    check_a(rig_a, stream, sent)


@needs_nginx
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "data"), AMBIGUOUS_RUN, ids=[n for n, _ in AMBIGUOUS_RUN])
def test_nginx_backend_frames_what_rawproxy_forwarded_in_pieces(
    rig_a: RigA, name: str, data: bytes
):
    """A, the same cases with the head and the rest written apart (the fast path takes a
    whole head read alone; the rest then comes as a pipelined read)."""
    stream, sent = case_bytes(name, data)
    cut = stream.find(b"\n\r\n")
    cut = cut + 3 if cut >= 0 else stream.find(b"\n\n") + 2
    check_a(rig_a, [stream[:cut], stream[cut:]], sent)


def test_the_invariant_catches_a_smuggled_request():
    """The check itself can fail: a request the backend read that rawproxy never logged, a
    forwarded one the backend never read, or two in another order."""
    ours = [
        {"method": "POST", "target": "/t", "status": 200},
        {"method": "GET", "target": "/x/after", "status": 200},
    ]
    ok = [{"uri": "/t", "request": "POST /t HTTP/1.1"}, {"uri": "/x/after", "request": ""}]
    assert_same_requests(ok, ours)
    smuggled = [ok[0], {"uri": "/smuggled", "request": "GET /smuggled HTTP/1.1"}, ok[1]]
    with pytest.raises(AssertionError):
        assert_same_requests(smuggled, ours)
    with pytest.raises(AssertionError):
        assert_same_requests(ok[:1], ours)
    with pytest.raises(AssertionError):
        assert_same_requests(ok[::-1], ours)
    # a request rawproxy refused on its head must not reach the backend at all
    refused = [
        {
            "method": "POST",
            "target": "/t",
            "status": 400,
            "error": "both Content-Length and Transfer-Encoding",
        },
        ours[1],
    ]
    assert_same_requests(ok[1:], refused)
    with pytest.raises(AssertionError):
        assert_same_requests(ok, refused)


# --- C: upgrades against nginx -----------------------------------------------------------------

# A masked WebSocket text frame "hi" (mask 0): what an optimistic client sends at once.
WS_FRAME = b"\x81\x82\x00\x00\x00\x00hi"


def upgrade_req(target: str, key: str = "dGhlIHNhbXBsZSBub25jZQ==") -> bytes:
    return req(
        "GET",
        target,
        "Host: a.test",
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {key}",
    )


@dataclasses.dataclass
class RigC(RigA):
    ws: peers.WsBackend | None = None


@pytest.fixture
def rig_c(tmp_path: Path, start_proxy: Callable[..., peers.ProxyProcess]) -> Iterator[RigC]:
    if NGINX is None:
        pytest.skip("nginx is not installed")
    ws = peers.WsBackend()
    nginx = None
    try:
        nginx = start_nginx(tmp_path, lambda d, port: nginx_backend_config(d, port, ws.port))
        access = tmp_path / "rawproxy-access.log"
        proxy = start_proxy(
            nginx.port,
            "--access-log",
            str(access),
            "--access-log-format",
            "json",
            "--header-timeout",
            "2",
        )
        yield RigC(proxy, nginx, access, tmp_path, ws)
    finally:
        if nginx is not None:
            nginx.stop()
        ws.stop()


REFUSING_PATHS = {
    "426": "/status/426/x",
    "400": "/status/400/x",
    "200": "/status/200/x",
    "origin-200": "/plain",  # nginx as an origin ignores Upgrade: an ordinary 200
}
FOLLOWERS = {
    "request": req("GET", "/after", "Host: a.test"),
    "upgrade-again": upgrade_req("/status/426/again"),
    "frame": WS_FRAME,
    "frame-then-lines": WS_FRAME + b"\r\n\r\n",
    "request-in-frame-clothes": b"GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
}


@needs_nginx
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "delivery", ["one-write", "head-alone-first"] if FULL else ["head-alone-first"]
)
@pytest.mark.parametrize("follow", list(FOLLOWERS))
@pytest.mark.parametrize("refusal", list(REFUSING_PATHS))
def test_a_refused_upgrade_never_tunnels_what_was_pipelined(
    rig_c: RigC, refusal: str, follow: str, delivery: str
):
    """C: an upgrade request that nginx answers with something other than a 101, with more
    bytes right behind it (a request, or WebSocket frames of an optimistic client). No
    tunnel: the bytes are HTTP to rawproxy, and reach nginx only as requests rawproxy read
    and logged (a frame is a 400 from rawproxy itself and never reaches nginx)."""
    first = upgrade_req(REFUSING_PATHS[refusal])
    more = FOLLOWERS[follow]
    data: bytes | list[bytes] = first + more if delivery == "one-write" else [first, more]
    ex = exchange(rig_c.proxy.port, data, 2)
    assert not [a for a in ex.interim if a.status == 101], ex.interim
    assert ex.answers, ex
    status = {"426": 426, "400": 400}.get(refusal, 200)
    assert ex.answers[0].status == status, ex.answers
    wait_for(lambda: len(rig_c.proxy_log()) >= len(ex.answers), 3.0)
    lines = rig_c.proxy_log()
    wait_for(lambda: len(rig_c.nginx_log()) >= len(forwarded_lines(lines)), 3.0)
    time.sleep(SETTLE)
    seen = rig_c.nginx_log()
    assert_same_requests(seen, lines)
    assert len(ex.answers) == len(lines), (ex, lines)
    assert not any(x["status"] == 101 for x in seen), seen
    if follow.startswith("frame"):
        # a frame without a line end is an unfinished head: 408 at --header-timeout
        assert [a.status for a in ex.answers] in ([status, 400], [status, 408]), ex.answers
        assert len(seen) == 1, seen
    elif status == 400 and len(ex.answers) == 1:
        pass  # nginx closed after its 400: the follower is not answered (rawproxy closes too)
    else:
        assert len(ex.answers) == 2, ex
        assert ex.answers[1].status in (200, 426), ex.answers
        assert len(seen) == 2, seen
        if follow == "upgrade-again":
            assert ex.answers[1].status == 426


@needs_nginx
@pytest.mark.timeout(60)
@pytest.mark.parametrize("delivery", ["one-write", "head-alone-first"])
def test_an_accepted_upgrade_tunnels_the_pipelined_frame(rig_c: RigC, delivery: str):
    """C: nginx answers 101 (proxying to a WebSocket echo peer); a frame sent with the
    upgrade request goes through the tunnel and is echoed back; nginx logged one request."""
    key = peers.ws_key()
    first = upgrade_req("/ws/echo", key)
    sock = socket.create_connection((LOOPBACK, rig_c.proxy.port), WAIT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if delivery == "one-write":
            sock.sendall(first + WS_FRAME)
        else:
            sock.sendall(first)
            time.sleep(0.05)
            sock.sendall(WS_FRAME)
        buf = bytearray()
        head = peers.recv_until(sock, buf, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert peers.ws_accept(key) in head
        # The echo: an unmasked text frame "hi".
        assert peers.recv_exact(sock, 4, buf) == b"\x81\x02hi"
        sock.sendall(b"\x88\x82\x00\x00\x00\x00\x03\xe8")  # close 1000
        peers.recv_exact(sock, 4, buf)
    finally:
        sock.close()
    assert wait_for(lambda: len(rig_c.nginx_log()) >= 1, 5.0)
    time.sleep(SETTLE)
    seen = rig_c.nginx_log()
    assert [(x["uri"], x["status"]) for x in seen] == [("/ws/echo", 101)], seen


# --- B: a real front proxy -> rawproxy -> HttpBackend ------------------------------------------


def nginx_front_config(d: Path, port: int, upstream: int, buffered: bool) -> str:
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / sub).mkdir(exist_ok=True)
    buffering = "" if buffered else "proxy_request_buffering off;"
    return f"""\
master_process off;
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format front escape=json '{{"request":"$request","uri":"$request_uri",'
        '"status":$status,"upstream":"$upstream_status"}}';
    access_log {d}/access.log front;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream rp {{ server 127.0.0.1:{upstream}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://rp;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
            {buffering}
        }}
    }}
}}
"""


def haproxy_front_config(port: int, upstream: int) -> str:
    return f"""\
global
    nbthread 1
    log stdout format raw local0

defaults
    mode http
    log global
    log-format "DIFF %ST %s %{{+Q}}r"
    option http-keep-alive
    option dontlognull
    timeout connect 5s
    timeout client 10s
    timeout server 10s
    timeout http-request 5s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server rp 127.0.0.1:{upstream}
"""


@dataclasses.dataclass
class RigB:
    front: Daemon
    kind: str
    proxy: peers.ProxyProcess
    backend: peers.HttpBackend
    access: Path
    workdir: Path

    def proxy_log(self) -> list[dict]:
        return read_rawproxy_log(self.access)

    def front_log(self) -> list[dict]:
        """What the front proxy did with each request: its path, status, and whether it
        forwarded it."""
        out = []
        if self.kind.startswith("nginx"):
            for x in read_nginx_log(self.workdir):
                path = nginx_path(x)
                out.append(
                    {
                        "path": path,
                        "status": x["status"],
                        "forwarded": x["upstream"] not in ("", "-"),
                    }
                )
        else:
            text = (self.workdir / "haproxy.out").read_text(errors="replace")
            for line in text.splitlines():
                if not line.startswith("DIFF "):
                    continue
                _, status, server, request = line.split(" ", 3)
                parts = request.strip('"').split(" ")
                path = _path_of(parts[1]) if len(parts) > 1 else request
                out.append(
                    {
                        "path": path,
                        "status": int(status),
                        "forwarded": server not in ("<NOSRV>", "-"),
                    }
                )
        return out


FRONTS = ["nginx", "nginx-unbuffered", "haproxy"]


@pytest.fixture(params=FRONTS)
def rig_b(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_proxy: Callable[..., peers.ProxyProcess],
    make_backend: Callable[..., peers.HttpBackend],
) -> Iterator[RigB]:
    kind = request.param
    if kind.startswith("nginx") and NGINX is None:
        pytest.skip("nginx is not installed")
    if kind == "haproxy" and HAPROXY is None:
        pytest.skip("haproxy is not installed")
    backend = make_backend()
    access = tmp_path / "rawproxy-access.log"
    proxy = start_proxy(
        backend.port,
        "--access-log",
        str(access),
        "--access-log-format",
        "json",
        "--header-timeout",
        "2",
        "--response-timeout",
        "5",
    )
    port = peers.free_port()
    if kind == "haproxy":
        assert HAPROXY is not None
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(haproxy_front_config(port, proxy.port))
        front = Daemon("haproxy", [HAPROXY, "-f", str(cfg), "-db"], tmp_path, port)
    else:
        assert NGINX is not None
        cfg = tmp_path / "nginx.conf"
        cfg.write_text(nginx_front_config(tmp_path, port, proxy.port, kind == "nginx"))
        argv = [NGINX, "-p", f"{tmp_path}/", "-c", str(cfg), "-e", f"{tmp_path}/error.log"]
        front = Daemon("nginx", argv, tmp_path, port)
    try:
        yield RigB(front, kind, proxy, backend, access, tmp_path)
    finally:
        front.stop()


def check_b(r: RigB, data: bytes | list[bytes], sent: int) -> Exchange:
    ex = exchange(r.front.port, data, sent)
    wait_for(lambda: len(r.front_log()) >= len(ex.answers), 3.0)
    front = r.front_log()
    wait_for(lambda: len(r.proxy_log()) >= sum(x["forwarded"] for x in front), 3.0)
    time.sleep(SETTLE)
    front = r.front_log()
    lines = r.proxy_log()
    # rawproxy reads exactly the requests the front proxy forwarded, in order: one access
    # line each (a request it refused included), none more.
    sent_on = [x["path"] for x in front if x["forwarded"]]
    ours = [_path_of(x["target"]) if x.get("target") else None for x in lines]
    why = (
        f"{r.kind} forwarded other requests than rawproxy read (request smuggling):\n"
        f" {r.kind}: {front}\n rawproxy: {lines}"
    )
    assert len(ours) == len(sent_on), why
    assert all(o is None or o == f for o, f in zip(ours, sent_on, strict=True)), why
    # The backend reads exactly what rawproxy forwarded.
    seen = [{"uri": h.target.decode("latin-1"), "request": ""} for h in r.backend.heads]
    assert_same_requests(seen, lines)
    # The client gets one answer per request the front proxy logged.
    assert [a.status for a in ex.answers] == [x["status"] for x in front], (ex.answers, front)
    return ex


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("name", "data"), AMBIGUOUS_RUN, ids=[n for n, _ in AMBIGUOUS_RUN])
def test_rawproxy_behind_a_real_front_reads_what_the_front_forwarded(
    rig_b: RigB, name: str, data: bytes
):
    """B: an ambiguous request and an ordinary GET sent to nginx or HAProxy in front of
    rawproxy: whatever the front proxy forwarded, rawproxy frames the same requests (its
    access log has one line per forwarded request, none more), and the backend behind it
    reads what rawproxy forwarded."""
    stream, sent = case_bytes(name, data)
    check_b(rig_b, stream, sent)


@needs_nginx
@pytest.mark.timeout(60)
@pytest.mark.parametrize("delivery", ["one-write", "one-by-one"])
def test_nginx_closing_after_its_keepalive_requests_loses_and_adds_nothing(
    tmp_path: Path, start_proxy: Callable[..., peers.ProxyProcess], delivery: str
):
    """A: nginx ends its connection every 2 requests (keepalive_requests 2, `Connection:
    close` on the second answer). Ten pipelined requests, GETs and POSTs with bodies: each is
    answered once, in order, and nginx read exactly the ten rawproxy forwarded."""
    nginx = start_nginx(tmp_path, lambda d, port: nginx_backend_config(d, port, None, 2))
    try:
        access = tmp_path / "rawproxy-access.log"
        proxy = start_proxy(nginx.port, "--access-log", str(access), "--access-log-format", "json")
        r = RigA(proxy, nginx, access, tmp_path)
        reqs = [
            req("GET", f"/k{i}", "Host: a.test")
            if i % 2
            else req("POST", f"/k{i}", "Host: a.test", "Content-Length: 3", body=b"abc")
            for i in range(10)
        ]
        data: bytes | list[bytes] = b"".join(reqs) if delivery == "one-write" else reqs
        ex, seen, _ = check_a(r, data, 10)
        assert [a.body.split(b" ")[1] for a in ex.answers] == [
            f"/k{i}".encode() for i in range(10)
        ], ex.answers
        assert len(seen) == 10, seen
    finally:
        nginx.stop()
