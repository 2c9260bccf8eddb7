"""Review: how tunnels end, and how that is reported (access log, metrics, PROXY protocol).

From a review in session 23. A docstring starting "Fixed:" describes, in the present tense
of the review, a fault of the code as it was and what is expected now (each was red before
its fix: in the same session, or for the torn lines of workers, in session 24).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from peers import (
    REPO,
    RESPONSE_101,
    Background,
    HttpClient,
    Metrics,
    ProxyProcess,
    ScriptedBackend,
    ScriptedConn,
    connect,
    open_websocket,
    proxy_args,
    read_to_eof,
    recv_exact,
    recv_until,
    request_bytes,
    reset_close,
    stream_ended,
    tunnel_request,
    wait_closed,
    websocket_request,
)
from tls_peers import Pki, TlsStream, raw_socket

MODES = ["plain", "copy", "tls-client", "tls-backend", "tls-both"]

TUNNEL_LINE = re.compile(
    r"tunnel (?P<duration>\d+\.\d{3})s client->backend=(?P<up>\d+) "
    r'backend->client=(?P<down>\d+) ended="(?P<ended>[^"]*)"'
)


def tunnel_lines(proxy: ProxyProcess, since: int = 0) -> list[re.Match[str]]:
    out = []
    for line in proxy.logs_matching(r" tunnel \d+\.\d{3}s client->backend=", since):
        m = TUNNEL_LINE.search(line)
        assert m, line
        out.append(m)
    return out


def exit_code(proxy: ProxyProcess, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while (code := proxy.proc.poll()) is None:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return code


# --- drain ------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_upgrade_answered_during_drain_gets_the_drain_time(run_proxy, scripted_backend, sockets):
    """Fixed: a WebSocket handshake under way when SIGTERM arrives is a request under way:
    README ("Stop"): "requests under way finish, WebSockets get --drain-timeout (30 s) to end
    on their own". When it is the only connection and the backend's 101 comes during the
    drain, Session._become_tunnel calls server.forget(session) BEFORE server.remember(tunnel):
    forget() sees an empty registry while draining, logs "drained: every connection ended"
    and stops the loop, so the new tunnel is closed right after its 101 (ended="proxy
    shutting down") and the proxy exits, instead of the tunnel running for --drain-timeout.
    Expected: the tunnel echoes bytes during the drain, the proxy does not claim "drained"
    while it is open, and exits only once the tunnel ends."""
    go, have_head = threading.Event(), threading.Event()

    def script(sc: ScriptedConn) -> bytes:
        have_head.set()
        go.wait(10)
        sc.sock.sendall(RESPONSE_101)
        got = recv_exact(sc.sock, 5, sc.extra)
        sc.sock.sendall(got.upper())
        return got

    backend = scripted_backend(script)
    proxy = run_proxy(
        *proxy_args(backend.port),
        "--drain-timeout",
        "20",
    )
    sock = connect(proxy.port, 10)
    sockets.append(sock)
    sock.sendall(tunnel_request())
    assert have_head.wait(5)  # the request is under way: the backend has its head
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"draining", since=mark)
    go.set()
    buf = bytearray()
    head = recv_until(sock, buf, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    time.sleep(0.5)
    try:
        sock.sendall(b"hello")
        echoed = recv_exact(sock, 5, buf)
    except (OSError, EOFError) as e:
        echoed = repr(e).encode()
    assert echoed == b"HELLO", (echoed, proxy.log_text(mark))
    assert not proxy.logs_matching(r"drained: every connection ended", mark), proxy.log_text(mark)
    assert proxy.proc.poll() is None, "the proxy exited with a tunnel open:\n" + proxy.log_text(
        mark
    )
    sock.shutdown(socket.SHUT_WR)
    assert wait_closed(sock, 5)[0] == "eof"
    assert exit_code(proxy, 5) == 0


# --- a rig: every kind of leg, with the admin endpoint --------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("review-pki"))


@dataclasses.dataclass
class Rig:
    mode: str
    backend: ScriptedBackend
    proxy: ProxyProcess
    pki: Pki
    sockets: list[Any]

    def open(self, timeout: float = 10.0) -> tuple[Any, bytearray]:
        stream: Any
        if self.mode in ("tls-client", "tls-both"):
            stream = TlsStream.connect(self.proxy.port, self.pki.client_context(), timeout=timeout)
        else:
            stream = connect(self.proxy.port, timeout)
        self.sockets.append(stream)
        stream.sendall(tunnel_request())
        buf = bytearray()
        head = recv_until(stream, buf, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return stream, buf

    def metrics(self) -> Metrics:
        assert self.proxy.admin_port is not None
        return Metrics(self.proxy.admin_port)

    def settled_metrics(self, timeout: float = 5.0) -> Metrics:
        """Metrics once no tunnel is open (or the last scrape, after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m("rawproxy_tunnels_open") == 0 or time.monotonic() > deadline:
                return m
            time.sleep(0.05)  # polling the proxy's own count


@pytest.fixture
def make_rig(make_backend, run_proxy, sockets, pki) -> Callable[..., Rig]:
    """`make_rig(mode, script, *flags)`: a scripted backend (TLS for tls-backend and
    tls-both) running `script`, a proxy with an admin listener in front of it."""

    def make(mode: str, script: Callable[[ScriptedConn], Any], *flags: str) -> Rig:
        backend_tls = mode in ("tls-backend", "tls-both")
        backend = make_backend(
            ScriptedBackend, script, ssl_context=pki.server_context() if backend_tls else None
        )
        args = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
        if mode in ("tls-client", "tls-both"):
            args += ["--cert", str(pki.server.cert), "--key", str(pki.server.key)]
        if backend_tls:
            args += [
                "--backend-ca",
                str(pki.ca_file),
                "--backend",
                f"https://localhost:{backend.port}",
            ]
        else:
            args += ["--backend", f"127.0.0.1:{backend.port}"]
        if mode == "copy":
            args.append("--no-splice")
        proxy = run_proxy(*args, *flags)
        return Rig(mode, backend, proxy, pki, sockets)

    return make


UP = 300_001
DOWN = 200_003


def payload(n: int, seed: int) -> bytes:
    return bytes((i * seed + i // 251) & 0xFF for i in range(n))


UP_DATA = payload(UP, 7)
DOWN_DATA = payload(DOWN, 13)


def exchange_script(then: Callable[[ScriptedConn], Any]) -> Callable[[ScriptedConn], Any]:
    """The backend's side: 101, read UP bytes, send DOWN bytes, then `then`."""

    def script(sc: ScriptedConn) -> Any:
        sc.sock.sendall(RESPONSE_101)
        got = sc.recv_exact(UP)
        assert got == UP_DATA
        sc.sock.sendall(DOWN_DATA)
        return then(sc)

    return script


def client_exchange(stream: Any, buf: bytearray) -> None:
    stream.sendall(UP_DATA)
    assert recv_exact(stream, DOWN, buf) == DOWN_DATA


def check_one_line(rig: Rig, ended: str, up: int, down: int, timeout: float = 5.0) -> float:
    """Exactly one tunnel line, with `ended` (a regex), the byte counts; its duration."""
    rig.proxy.wait_for_log(r" tunnel \d+\.\d{3}s client->backend=", timeout=timeout)
    time.sleep(0.2)  # room for a second line, if any were to come
    lines = tunnel_lines(rig.proxy)
    assert len(lines) == 1, [m.string for m in lines]
    m = lines[0]
    assert re.fullmatch(ended, m["ended"]), m.string
    assert (int(m["up"]), int(m["down"])) == (up, down), m.string
    return float(m["duration"])


def check_metrics_settled(rig: Rig, before: Metrics, up: int, down: int) -> None:
    m = rig.settled_metrics()
    assert m("rawproxy_tunnels_open") == 0
    assert m("rawproxy_connections_open") == 0
    assert m("rawproxy_tunnels_total") - before("rawproxy_tunnels_total") == 1
    for cls in ("1xx", "2xx", "3xx", "4xx", "5xx"):
        moved = m("rawproxy_requests_total", code_class=cls) - before(
            "rawproxy_requests_total", code_class=cls
        )
        assert moved == (1 if cls == "1xx" else 0), (cls, m.text)
    got = (
        m("rawproxy_bytes_total", direction="client_to_backend")
        - before("rawproxy_bytes_total", direction="client_to_backend"),
        m("rawproxy_bytes_total", direction="backend_to_client")
        - before("rawproxy_bytes_total", direction="backend_to_client"),
    )
    assert got == (up, down)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("mode", MODES)
def test_half_close_client_first_backend_streams_on(make_rig, mode):
    """Not covered elsewhere as a whole: the client ends its side, the backend goes on
    sending for 0.6 s more, then ends. Every byte arrives, exactly one access line comes,
    after both ended (duration >= 0.6 s), with ended="client closed" and the exact byte
    counts, and /metrics agrees (tunnels_open back to 0, one 1xx, bytes equal the line's)."""

    def then(sc: ScriptedConn) -> Any:
        assert sc.read_to_eof()[0] == 0
        for _ in range(6):
            sc.sock.sendall(DOWN_DATA[:1000])
            time.sleep(0.1)  # the backend keeps talking for a while
        sc.sock.shutdown(socket.SHUT_WR)
        return True

    rig = make_rig(mode, exchange_script(then))
    before = rig.metrics()
    stream, buf = rig.open()
    client_exchange(stream, buf)
    stream.shutdown(socket.SHUT_WR)
    total, _ = read_to_eof(stream, buf)
    assert total == 6000
    assert rig.backend.result() is True
    duration = check_one_line(rig, "client closed", UP, DOWN + 6000)
    assert duration >= 0.55
    check_metrics_settled(rig, before, UP, DOWN + 6000)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("mode", MODES)
def test_backend_ends_first_then_client(make_rig, mode):
    """New ground: the metrics after each ending, on every kind of leg (the stress tests
    check the line, or the gauges once in bulk). The backend ends its side first; the
    client then sends more and ends: one line, ended="backend closed", exact counts, and
    /metrics: gauges at 0, one tunnel, one 1xx, byte counters equal to the line's."""

    def then(sc: ScriptedConn) -> Any:
        sc.sock.shutdown(socket.SHUT_WR)
        return sc.read_to_eof()[0]

    rig = make_rig(mode, exchange_script(then))
    before = rig.metrics()
    stream, buf = rig.open()
    client_exchange(stream, buf)
    assert read_to_eof(stream, buf)[0] == 0
    stream.sendall(b"x" * 5000)
    stream.shutdown(socket.SHUT_WR)
    assert rig.backend.result() == 5000
    check_one_line(rig, "backend closed", UP + 5000, DOWN)
    check_metrics_settled(rig, before, UP + 5000, DOWN)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("mode", MODES)
def test_client_reset_after_exchange(make_rig, mode):
    """New ground as above (metrics per ending, every kind of leg): the client resets
    (RST) once everything was delivered: one line, ended="client reset", exact counts,
    the backend leg ended, /metrics settled and equal to the line."""

    def then(sc: ScriptedConn) -> Any:
        return stream_ended(sc.sock, 10)

    rig = make_rig(mode, exchange_script(then))
    before = rig.metrics()
    stream, buf = rig.open()
    client_exchange(stream, buf)
    time.sleep(0.1)
    reset_close(raw_socket(stream))
    assert rig.backend.result() in ("eof", "reset", "error", "close_notify")
    check_one_line(rig, "client reset", UP, DOWN)
    check_metrics_settled(rig, before, UP, DOWN)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("mode", MODES)
def test_backend_reset_after_exchange(make_rig, mode):
    """New ground as above: the backend resets once everything was delivered: one line,
    ended="backend reset", exact counts, the client leg ended, /metrics settled and equal
    to the line."""

    def then(sc: ScriptedConn) -> Any:
        time.sleep(0.2)
        reset_close(raw_socket(sc.sock))
        return True

    rig = make_rig(mode, exchange_script(then))
    before = rig.metrics()
    stream, buf = rig.open()
    client_exchange(stream, buf)
    assert rig.backend.result() is True
    assert stream_ended(stream, 10) in ("eof", "reset", "error", "close_notify")
    check_one_line(rig, "backend reset", UP, DOWN)
    check_metrics_settled(rig, before, UP, DOWN)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_after_exchange(make_rig, mode):
    """New ground as above: --tunnel-idle-timeout ends a silent tunnel after traffic: one
    line naming the idle timeout, exact counts, a duration of at least the timeout, both
    legs ended in order (FIN / close_notify), /metrics settled and equal to the line."""

    def then(sc: ScriptedConn) -> Any:
        return stream_ended(sc.sock, 10)

    rig = make_rig(mode, exchange_script(then), "--tunnel-idle-timeout", "1")
    before = rig.metrics()
    stream, buf = rig.open()
    client_exchange(stream, buf)
    assert stream_ended(stream, 10) in ("eof", "close_notify")
    assert rig.backend.result() in ("eof", "close_notify")
    duration = check_one_line(rig, r"idle for 1s .*", UP, DOWN)
    assert duration >= 0.95
    check_metrics_settled(rig, before, UP, DOWN)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("mode", MODES)
def test_drain_timeout_cuts_the_tunnel_with_one_line(make_rig, mode):
    """Not covered elsewhere (the drain tests check the sockets, not the log, and use plain
    legs): SIGTERM with a tunnel open and --drain-timeout 1, on every kind of leg: the
    tunnel is ended in order at the deadline, with exactly one access line (exact counts,
    ended="proxy shutting down", duration >= the drain time) before the process exits 0."""

    def then(sc: ScriptedConn) -> Any:
        return stream_ended(sc.sock, 10)

    rig = make_rig(mode, exchange_script(then), "--drain-timeout", "1")
    stream, buf = rig.open()
    client_exchange(stream, buf)
    rig.proxy.proc.send_signal(signal.SIGTERM)
    assert stream_ended(stream, 10) in ("eof", "close_notify")
    assert rig.backend.result() in ("eof", "close_notify")
    assert exit_code(rig.proxy, 10) == 0
    lines = tunnel_lines(rig.proxy)
    assert len(lines) == 1, [m.string for m in lines]
    assert (int(lines[0]["up"]), int(lines[0]["down"])) == (UP, DOWN)
    assert lines[0]["ended"] == "proxy shutting down"
    assert float(lines[0]["duration"]) >= 0.9


# --- duration ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_tunnel_duration_counts_from_the_request_first_byte(run_proxy, scripted_backend, sockets):
    """Fixed: a tunnel's access line is the line of its request ("GET /ws HTTP/1.1" 101),
    and README ("Access log") says "A request's duration runs from its first byte". The
    tunnel's duration starts in Tunnel.__init__ (tunnel.py, `self.started =
    time.monotonic()`), after the backend's 101, so a WebSocket handshake the backend took
    1.5 s to answer is logged as lasting 0.3 s: the wait is in no line. nginx logs the same
    exchange with $request_time=1.501 (measured: nginx 1.22, proxy_pass with Upgrade), as
    it counts from the request's first byte to the end of the upgraded connection.
    Expected: duration >= 1.5 s."""

    def script(sc: ScriptedConn) -> Any:
        time.sleep(1.5)  # the backend is slow to accept the upgrade
        sc.sock.sendall(RESPONSE_101)
        time.sleep(0.3)
        sc.sock.shutdown(socket.SHUT_WR)
        return sc.read_to_eof()[0]

    backend = scripted_backend(script)
    proxy = run_proxy("--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.port}")
    sock = connect(proxy.port, 10)
    sockets.append(sock)
    sock.sendall(tunnel_request())
    buf = bytearray()
    assert recv_until(sock, buf, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
    assert read_to_eof(sock, buf)[0] == 0
    sock.shutdown(socket.SHUT_WR)
    assert backend.result() == 0
    proxy.wait_for_log(r" tunnel \d+\.\d{3}s ")
    (m,) = tunnel_lines(proxy)
    assert float(m["duration"]) >= 1.5, m.string


# --- PROXY protocol and tunnels ----------------------------------------------------------------


def pp_v1(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in src[0] else "TCP4"
    return f"PROXY {family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


def pp_v2(src: tuple[str, int], dst: tuple[str, int], tlvs: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    family = 0x11 if s.version == 4 else 0x21
    block = s.packed + d.packed + struct.pack("!HH", src[1], dst[1]) + tlvs
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


class RawBackend:
    """One connection: everything up to the end of the request head (a PROXY header
    included), then a 101, then an echo of 5 bytes upper-cased, then the end."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(10)
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            buf = bytearray()
            while (at := buf.find(b"GET ")) < 0 or b"\r\n\r\n" not in buf[at:]:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            self.seen = bytes(buf)
            conn.sendall(RESPONSE_101)
            conn.sendall(recv_exact(conn, 5).upper())
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("accept", ["v1", "v2"])
@pytest.mark.parametrize("client_ip", ["203.0.113.7", "2001:db8::7"], ids=["ipv4", "ipv6"])
def test_proxy_header_client_is_the_tunnel_client(run_proxy, sockets, accept, client_ip):
    """Not covered elsewhere (the PROXY tests use plain requests): behind a balancer's
    PROXY header (v1, or v2 with TLVs to skip), sent in three pieces with the upgrade
    request in the same segment as its last piece, the tunnel's access line names the
    header's client, the upgrade request carries it in X-Forwarded-For and RFC 7239
    Forwarded (IPv6 quoted and bracketed, RFC 7239 section 6), and the PROXY header sent on
    (--send-proxy-protocol, the other version) names it with the balancer's destination."""
    backend = RawBackend()
    send = "v2" if accept == "v1" else "v1"
    try:
        proxy = run_proxy(
            *proxy_args(backend.port),
            "--accept-proxy-protocol",
            "--trusted-proxy",
            "127.0.0.1/32",
            "--forwarded",
            "both",
            "--send-proxy-protocol",
            send,
        )
        src = (client_ip, 51000)
        dst = ("2001:db8::1", 8443) if ":" in client_ip else ("198.51.100.1", 8443)
        # v2: a NOOP TLV (0x04) and an AUTHORITY TLV (0x02), which are skipped.
        tlvs = b"\x04\x00\x03abc" + b"\x02\x00\x08app.test"
        header = pp_v1(src, dst) if accept == "v1" else pp_v2(src, dst, tlvs)
        sock = connect(proxy.port, 10)
        sockets.append(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (header[:5], header[5:-3]):
            sock.sendall(piece)
            time.sleep(0.05)  # separate segments
        sock.sendall(header[-3:] + tunnel_request())
        buf = bytearray()
        assert recv_until(sock, buf, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        sock.sendall(b"hello")
        assert recv_exact(sock, 5, buf) == b"HELLO"
        assert read_to_eof(sock, buf)[0] == 0
        sock.shutdown(socket.SHUT_WR)
        line = proxy.wait_for_log(r" tunnel \d+\.\d{3}s ")
    finally:
        backend.close()
    assert f"INFO {client_ip} - - [" in line, line
    assert "client->backend=5 backend->client=5" in line, line
    seen = backend.seen
    at = seen.index(b"GET ")
    sent_header = seen[:at]
    expected = pp_v2(src, dst) if send == "v2" else pp_v1(src, dst)
    assert sent_header == expected, sent_header
    head = seen[at:].decode()
    assert f"\r\nX-Forwarded-For: {client_ip}\r\n" in head, head
    shown = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    assert f"\r\nForwarded: for={shown};proto=http;host=tunnel.test\r\n" in head, head
    assert "\r\nX-Forwarded-Port: 8443\r\n" in head, head


# --- workers: whole access lines on stderr -----------------------------------------------------


@pytest.mark.timeout(90)
def test_workers_do_not_tear_access_lines_on_stderr(http_backend):
    """Fixed: with --workers 2 and the access log on stderr (the default, for journald),
    both workers write to one inherited stderr pipe, each line with a plain blocking write
    (logging.StreamHandler). A line longer than PIPE_BUF (4096 bytes: README allows each of
    target, Referer and User-Agent 2,048 characters "so that a line stays under journald's
    48 KiB line limit") is not written atomically to a pipe, so when the reader lags (a
    busy journald, a container runtime's log pipe) the two workers' lines interleave
    mid-line: here a slow reader sees lines cut in two with another worker's line spliced
    in, so neither parses. Now a worker whose stderr is a pipe keeps each line under
    PIPE_BUF (the wire values cut shorter, marked): every access line arrives whole."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rawproxy",
            *proxy_args(http_backend.port),
            "--workers",
            "2",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stderr is not None
    chunks: list[bytes] = []
    try:
        port = None
        while True:
            line = proc.stderr.readline().decode()
            assert line, "the proxy ended before it was ready"
            chunks.append(line.encode())
            if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
            if re.search(r"\bready\b", line):
                break
        assert port is not None

        def slow_reader() -> None:
            fd = proc.stderr.fileno()  # type: ignore[union-attr]
            while data := os.read(fd, 1000):
                chunks.append(data)
                time.sleep(0.001)  # a reader that lags behind the writers

        reader = threading.Thread(target=slow_reader, daemon=True)
        reader.start()

        def client(k: int) -> None:
            for i in range(30):
                with HttpClient(port, 10) as c:
                    req = request_bytes(
                        "GET",
                        f"/{k}-{i}",
                        [("Host", "a"), ("Referer", "r" * 3000), ("User-Agent", "ABCD"[k] * 3000)],
                    )
                    assert c.request(req).status == 200

        threads = [Background(client, k) for k in range(4)]
        for t in threads:
            t.join(60)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()
    text = b"".join(chunks).decode("utf-8", "replace")
    whole = re.compile(
        r'"GET /(\d)-\d+ HTTP/1\.1" 200 \d+ "(r{1024,})\.\.\.\[cut\]" '
        r'"([A-D])\3*\.\.\.\[cut\]"$'
    )

    def is_whole(line: str) -> bool:
        m = whole.search(line)
        return bool(m) and line.count('"GET /') == 1 and len(line.encode()) < select.PIPE_BUF

    access = [line for line in text.splitlines() if '"GET /' in line or "[cut]" in line]
    torn = [line for line in access if not is_whole(line)]
    whole_lines = len(access) - len(torn)
    assert not torn, f"{len(torn)} torn access lines ({whole_lines} whole), e.g. {torn[0][:300]!r}"
    assert whole_lines == 120


# --- reload -------------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_reload_applies_the_access_log_settings_of_the_config_file(
    run_proxy, ws_backend, http_backend, tmp_path
):
    """Fixed: README ("Reload"): "SIGHUP ... the config file and certificates are read anew
    for new connections". A reload whose config file names another `access-log` file and
    `access-log-format = "json"` logs "SIGHUP: reloaded configuration" but keeps writing
    combined lines to the old file: Server.reload only reopens self.access (same path, same
    format) and never builds a new AccessLog from the new Config, and says nothing about
    the keys it ignored (as it does for listeners with --workers). nginx applies a changed
    access_log path/format on reload. A tunnel open across the reload may keep the old
    file (it started there), but a request made after it must be logged as configured.
    Expected: after the reload, new lines in the new file, in JSON; or a warning that
    these keys need a restart."""
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    config = tmp_path / "rawproxy.toml"
    config.write_text(f'access-log = "{first}"\n')
    proxy = run_proxy(
        "--listen",
        "127.0.0.1:0",
        "--route",
        f"/ws=http://127.0.0.1:{ws_backend.port}",
        "--route",
        f"/=http://127.0.0.1:{http_backend.port}",
        "--config",
        str(config),
    )
    with HttpClient(proxy.port, 5) as c:
        assert c.request(request_bytes("GET", "/before", [("Host", "a")])).status == 200
    ws_client = HttpClient(proxy.port, 5)
    try:
        ws = open_websocket(ws_client)  # open across the reload
        config.write_text(f'access-log = "{second}"\naccess-log-format = "json"\n')
        mark = proxy.mark()
        proxy.proc.send_signal(signal.SIGHUP)
        said = proxy.wait_for_log(r"SIGHUP: (reloaded|keeping)", since=mark)
        assert "reloaded" in said, said
        with HttpClient(proxy.port, 5) as c:
            assert c.request(request_bytes("GET", "/after", [("Host", "a")])).status == 200
        ws.send("still here")
        assert ws.recv() == "still here"
        ws.close()
        assert ws_client.wait_closed(5)[0] == "eof"
    finally:
        ws_client.close()
    time.sleep(0.3)
    both = first.read_text() + (second.read_text() if second.exists() else "")
    # One line for the tunnel, in the log of its end (combined or JSON as that one is).
    assert len(re.findall(r'GET /ws HTTP/1\.1|"target":"/ws"', both)) == 1, both
    warned = proxy.logs_matching(r"access.log.*restart|restart.*access.log", mark)
    after_in_second = second.exists() and '"target":"/after"' in second.read_text()
    assert after_in_second or warned, (
        f"first.log:\n{first.read_text()}\nsecond.log exists: {second.exists()}\n"
        f"log:\n{proxy.log_text(mark)}"
    )


# --- --max-connections ----------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_tunnels_at_max_connections_hold_their_places_and_end_once(run_proxy, ws_backend, sockets):
    """Not covered elsewhere (the limit tests use HTTP or the descriptor limit): at
    --max-connections 2 with two tunnels open, a third client's upgrade waits (tunnels are
    never closed to make room: README), no idle-reclaim is counted; when one tunnel ends, it
    has exactly one access line, the third client gets its 101, and once all end the open
    gauges are back to 0 with three tunnels and three 1xx counted."""
    proxy = run_proxy(
        *proxy_args(ws_backend.port),
        "--max-connections",
        "2",
        "--admin-listen",
        "127.0.0.1:0",
    )
    assert proxy.admin_port is not None
    clients = [HttpClient(proxy.port, 10) for _ in range(2)]
    try:
        tunnels = [open_websocket(c) for c in clients]
        third = HttpClient(proxy.port, 10)
        clients.append(third)
        third.send(websocket_request())
        readable, _, _ = select.select([third.sock], [], [], 1.0)
        assert not readable, "a third client was served at --max-connections 2"
        m = Metrics(proxy.admin_port)
        assert m("rawproxy_tunnels_open") == 2
        assert m("rawproxy_idle_connections_reclaimed_total") == 0
        for ws in tunnels:
            ws.send("alive")
            assert ws.recv() == "alive"
        tunnels[0].close()
        assert clients[0].wait_closed(5)[0] == "eof"
        clients[0].sock.shutdown(socket.SHUT_WR)
        status, _, _, _ = third.read_head()
        assert status == 101
        lines = tunnel_lines(proxy)
        assert len(lines) == 1, [x.string for x in lines]
        assert lines[0]["ended"] == "backend closed"
        tunnels[1].close()
        assert clients[1].wait_closed(5)[0] == "eof"
        clients[1].sock.shutdown(socket.SHUT_WR)
        third.sock.shutdown(socket.SHUT_WR)
        assert third.wait_closed(5)[0] == "eof"
    finally:
        for c in clients:
            c.close()
    deadline = time.monotonic() + 5
    while (m := Metrics(proxy.admin_port))("rawproxy_tunnels_open") and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the proxy's own count
    assert (m("rawproxy_tunnels_open"), m("rawproxy_connections_open")) == (0, 0)
    assert m("rawproxy_tunnels_total") == 3
    assert m("rawproxy_requests_total", code_class="1xx") == 3
    proxy.wait_for_logs(r" tunnel \d+\.\d{3}s ", 3)
    assert len(tunnel_lines(proxy)) == 3
