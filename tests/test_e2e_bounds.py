"""The bounds rawproxy promises: memory that does not grow with a slow peer,
a timeout on every wait that cuts only what is really stuck, descriptor exhaustion that
degrades without spinning, and other clients served meanwhile.

Every process is started here (peers.ProxyProcess, the conftest fixtures, or threads of this
process) and stopped by its own handle; every load loop is bounded in count and in time.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable

import peers
import pytest
from peers import (
    RESPONSE_101,
    ProxyProcess,
    ScriptedBackend,
    assert_serves,
    connect,
    proxy_args,
    recv_until,
    simple_get,
    tunnel_request,
    wait_closed,
)

from rawproxy.session import LINGER_SECONDS

MiB = 1024 * 1024
KiB = 1024


# --- helpers -----------------------------------------------------------------------------------


def nofile_launcher(soft: int, hard: int) -> list[str]:
    """A command that execs the rest of its arguments with RLIMIT_NOFILE (soft, hard) and
    without CAP_SYS_RESOURCE (dropped from the bounding set; harmless when not root), so the
    proxy cannot raise its hard limit (as tests/test_e2e_limits.py does)."""
    return [
        sys.executable,
        "-c",
        "import os, resource, sys, ctypes; "
        "ctypes.CDLL(None, use_errno=True).prctl(24, 24, 0, 0, 0); "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    ]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_used(proxy: ProxyProcess, seconds: float) -> float:
    before = proxy.cpu_seconds()
    time.sleep(seconds)  # the sampling period, not a wait for an event
    return proxy.cpu_seconds() - before


def get_latency(port: int, timeout: float = 5.0) -> float:
    """Seconds for a fresh client to get a 200 to a simple GET through the proxy."""
    start = time.monotonic()
    with peers.HttpClient(port, timeout=timeout) as c:
        resp = c.request(simple_get("/latency"))
    assert resp.status == 200, resp
    return time.monotonic() - start


Handler = Callable[[socket.socket, bytes, bytearray], object]


@pytest.fixture
def raw_backend(make_backend) -> Callable[[Handler], ScriptedBackend]:
    """`raw_backend(handle)`: a backend that runs `handle(sock, head, bytes after the head)`
    for each connection, in its own thread, after reading the request head."""

    def make(handle: Handler) -> ScriptedBackend:
        return make_backend(ScriptedBackend, lambda sc: handle(sc.sock, sc.head, sc.extra))

    return make


class SelectorTunnelBackend:
    """A backend for thousands of tunnels in one thread: answers every request head with a
    101, then echoes; counts the tunnels it opened and the ones whose client side ended."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.upgraded = 0
        self.ended = 0
        self.open: dict[socket.socket, bytearray | None] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.sel.select(0.1):
                if key.fileobj is self.listener:
                    for _ in range(256):
                        try:
                            conn, _ = self.listener.accept()
                        except (BlockingIOError, OSError):
                            break
                        conn.setblocking(False)
                        self.open[conn] = bytearray()
                        self.sel.register(conn, selectors.EVENT_READ, None)
                    continue
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(conn)
                    del self.open[conn]
                    conn.close()
                    self.ended += 1
                    continue
                head = self.open[conn]
                if head is None:
                    with contextlib.suppress(OSError):
                        conn.send(data)  # echo (small messages only)
                    continue
                head += data
                if b"\r\n\r\n" in head:
                    self.open[conn] = None
                    conn.send(RESPONSE_101)
                    self.upgraded += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in list(self.open):
            conn.close()
        self.sel.close()
        self.listener.close()


def tunnel_echo(sock: socket.socket, head: bytes, buf: bytearray) -> None:
    """Answer 101, then echo until the end (a raw_backend handler)."""
    sock.sendall(RESPONSE_101)
    if buf:
        sock.sendall(bytes(buf))
    while data := sock.recv(65536):
        sock.sendall(data)


def open_tunnel(
    port: int, timeout: float = 10.0, leftover: bytearray | None = None
) -> socket.socket:
    """A tunnel through the proxy; what came right behind the 101 goes to `leftover` (none may
    when it is None)."""
    sock = connect(port, timeout)
    sock.sendall(tunnel_request())
    buf = bytearray()
    head = recv_until(sock, buf, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    if leftover is None:
        assert not buf
    else:
        leftover += buf
    return sock


def echo_round_trip(sock: socket.socket, message: bytes = b"ping") -> None:
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        assert chunk, f"tunnel ended; got {got!r}"
        got += chunk
    assert got == message


# --- 1. a slow but steady reader is progress, not silence ---------------------------------------


def serve_tail(sock: socket.socket, head: bytes, buf: bytearray) -> None:
    """Answer GET /tail/N with N bytes (a raw_backend handler), then wait for the end."""
    size = int(re.search(rb"/tail/(\d+) ", head).group(1))
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    sock.sendall(b"t" * size)
    while sock.recv(65536):
        pass


def slow_client(port: int, target: str, timeout: float | None = None) -> socket.socket:
    """A client with a 4 KiB receive buffer (the kernel holds little for it) that has sent
    GET `target` to the proxy on `port` and reads nothing yet."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.sendall(simple_get(target))
    return sock


def queued_for_a_silent_client(proxy: ProxyProcess, prefix: str) -> int:
    """How much the proxy queues at once for a client that reads nothing (the kernel's share,
    a few MiB on loopback, and its backlog): the bytes of an 8 MiB answer (from a backend
    that answers `prefix` + size) relayed to such a client by the time it leaves, as its
    access line counts them. Answers of about that size complete at once from the backend,
    some with their last piece left in the proxy for the client."""
    mark = proxy.mark()
    probe = slow_client(proxy.port, f"{prefix}{8 * MiB}")
    time.sleep(0.5)
    probe.close()
    line = proxy.wait_for_log(rf"GET {re.escape(prefix)}\d+ .*client went away", since=mark)
    return int(re.search(r'" 200 (\d+) ', line).group(1))


def serve_large(framing: str) -> Callable[[socket.socket, bytes, bytearray], None]:
    """A handler answering 64 MiB as fast as the proxy takes it, with Content-Length (the fast
    path) or chunked (h11's path)."""

    def handle(sock: socket.socket, head: bytes, buf: bytearray) -> None:
        block = b"x" * (256 * KiB)
        if framing == "content-length":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (256 * len(block)))
            for _ in range(256):
                sock.sendall(block)
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"%x\r\n%s\r\n" % (len(block), block)
            for _ in range(256):
                sock.sendall(piece)
            sock.sendall(b"0\r\n\r\n")

    return handle


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.timeout(40)
def test_a_slow_but_steady_reader_is_not_cut_by_the_response_timeout(
    start_proxy, raw_backend, framing
):
    """--response-timeout is the longest silence while a body streams, and a client reading
    steadily at ~160 KB/s is not silent. It counted only reads from the backend, which is not
    read while the client's backlog waits: such a download was cut after the timeout and the
    line blamed the client. Now what a peer takes counts, as nginx's send_timeout counts
    writes; and since a large send buffer turns writable only once a third of it is free
    (seconds at this pace), the kernel's send queue is looked at before a peer is called
    silent."""
    backend = raw_backend(serve_large(framing))
    proxy = start_proxy(backend.port, "--response-timeout", "2")
    mark = proxy.mark()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", proxy.port))
    try:
        sock.sendall(simple_get("/large"))
        got = 0
        start = time.monotonic()
        ended = None
        # 8 KiB every 50 ms (about 160 KB/s) for three times the timeout.
        while time.monotonic() - start < 6.0:
            try:
                chunk = sock.recv(8 * KiB)
            except ConnectionResetError:
                ended = "reset"
                break
            if not chunk:
                ended = "eof"
                break
            got += len(chunk)
            time.sleep(0.05)  # the reader's pace
        elapsed = time.monotonic() - start
    finally:
        sock.close()
    assert ended is None, (
        f"the answer was cut ({ended}) after {elapsed:.1f} s and {got} bytes, although the "
        f"client read steadily all along; log:\n{proxy.log_text(mark)}"
    )


@pytest.mark.timeout(40)
def test_a_backend_reading_an_upload_slowly_but_steadily_is_not_cut(start_proxy, raw_backend):
    """The mirror image for uploads: a backend reading a body at ~160 KB/s got a 504 "took no
    request body bytes" after --response-timeout."""
    result: dict[str, object] = {}

    def slow_reader(sock: socket.socket, head: bytes, buf: bytearray) -> None:
        got = len(buf)
        start = time.monotonic()
        try:
            while time.monotonic() - start < 6.0:
                data = sock.recv(8 * KiB)
                if not data:
                    result["end"] = "eof"
                    break
                got += len(data)
                time.sleep(0.05)  # the backend's pace
        except OSError as e:
            result["end"] = repr(e)
        result["got"] = got
        result["elapsed"] = time.monotonic() - start

    backend = raw_backend(slow_reader)
    proxy = start_proxy(backend.port, "--response-timeout", "2")
    mark = proxy.mark()
    sock = connect(proxy.port, timeout=10)
    try:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: up.test\r\nContent-Length: %d\r\n\r\n" % (64 * MiB)
        )
        block = b"y" * (64 * KiB)
        start = time.monotonic()
        sock.settimeout(0.5)
        with contextlib.suppress(OSError):
            while time.monotonic() - start < 7.0:
                with contextlib.suppress(TimeoutError):
                    sock.send(block)
    finally:
        sock.close()
    deadline = time.monotonic() + 5
    while "elapsed" not in result and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "end" not in result, (
        f"the upload was cut ({result}) although the backend read steadily; log:\n"
        f"{proxy.log_text(mark)}"
    )


@pytest.mark.timeout(40)
def test_a_backend_that_reads_none_of_an_upload_is_still_cut(start_proxy, raw_backend):
    """Silence is still cut: a backend that takes nothing of a body gets the exchange ended
    with 504 after --response-timeout and one look more at its send queue (a second)."""
    release = threading.Event()
    backend = raw_backend(lambda sock, head, buf: release.wait(10))
    proxy = start_proxy(backend.port, "--response-timeout", "2")
    mark = proxy.mark()
    sock = connect(proxy.port, timeout=10)
    try:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: up.test\r\nContent-Length: %d\r\n\r\n" % (64 * MiB)
        )
        start = time.monotonic()
        sock.settimeout(0.2)
        block = b"y" * (64 * KiB)
        with contextlib.suppress(TimeoutError):
            while time.monotonic() - start < 1.0:
                sock.send(block)
        line = proxy.wait_for_log(r"took no request body bytes", since=mark, timeout=8)
        elapsed = time.monotonic() - start
    finally:
        release.set()
        sock.close()
    assert " 504 " in line, line
    assert 2.0 <= elapsed < 5.0, f"cut after {elapsed:.1f} s (--response-timeout 2)"


# --- 2. out of descriptors at the backend connect -------------------------------------------------


def test_no_descriptor_for_the_backend_socket_is_a_quick_502(start_proxy, http_backend):
    """The client is accepted, but no descriptor is left for its backend socket (the limit
    lowered under the running proxy): a 502 comes at once, with one log line that says why,
    the proxy does not spin, and service is back once descriptors are."""
    proxy = start_proxy(http_backend.port)
    assert_serves(proxy, http_backend)  # one backend connection made and kept by that client
    time.sleep(0.2)
    _, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
    base = open_fds(proxy.pid)
    mark = proxy.mark()
    resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (base + 1, hard))
    try:
        start = time.monotonic()
        with peers.HttpClient(proxy.port, timeout=5) as c:
            resp = c.request(simple_get("/no-fd"))
        waited = time.monotonic() - start
        assert resp.status in (502, 503), resp
        assert waited < 2, f"the 502 took {waited:.1f} s"
        line = proxy.wait_for_log(r"\b50[23]\b", since=mark)
        assert "Too many open files" in line or "descriptor" in line, line
        assert len(proxy.logs_matching(r"\b50[23]\b", since=mark)) == 1, proxy.log_text(mark)
        used = cpu_used(proxy, 1.0)
        assert used < 0.3, f"the proxy used {used:.2f} s of CPU in 1 s"
    finally:
        resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (hard, hard))
    assert_serves(proxy, http_backend)
    assert not http_backend.heads or all(r.path != "/no-fd" for r in http_backend.heads)


# --- 3. tunnels at the descriptor limit -----------------------------------------------------------


@pytest.mark.timeout(40)
def test_tunnels_filling_the_descriptor_limit_keep_working_and_others_wait(
    run_proxy, raw_backend, sockets
):
    """64 descriptors (soft and hard; the proxy cannot raise them): as many tunnels as fit
    are opened, some moving bulk (splice pipes are scarce), then 20 more clients ask for
    tunnels. They wait in the backlog: the proxy stays idle (no spinning), says so once, the
    open tunnels still echo, and each waiting client is let in as a tunnel ends."""
    backend = raw_backend(tunnel_echo)
    proxy = run_proxy(*proxy_args(backend.port), launcher=nofile_launcher(64, 64))
    warning = proxy.wait_for_log(r"at most (\d+) connections")
    fitting = int(re.search(r"at most (\d+) connections", warning).group(1))
    assert 4 <= fitting <= 20, warning
    tunnels = [open_tunnel(proxy.port) for _ in range(fitting)]
    sockets.extend(tunnels)
    # Bulk both ways on a few of them at once: they want pipes, which are few.
    blob = os.urandom(2 * MiB)

    def bulk(sock: socket.socket) -> bytes:
        got = bytearray()
        sender = threading.Thread(target=sock.sendall, args=(blob,), daemon=True)
        sender.start()
        while len(got) < len(blob):
            chunk = sock.recv(1 << 20)
            assert chunk
            got += chunk
        sender.join(10)
        return bytes(got)

    movers = [peers.Background(bulk, sock) for sock in tunnels[:4]]
    mark = proxy.mark()
    waiting = []
    for _ in range(20):
        sock = connect(proxy.port, timeout=10)
        sock.sendall(tunnel_request())
        waiting.append(sock)
    sockets.extend(waiting)
    for mover in movers:
        assert mover.join(20) == blob
    time.sleep(0.3)
    used = cpu_used(proxy, 1.5)
    assert used < 0.3, f"the proxy used {used:.2f} s of CPU in 1.5 s at its limit"
    for sock in tunnels:
        echo_round_trip(sock)
    for sock in waiting:
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # not let in yet
        sock.setblocking(True)
    said = proxy.logs_matching(r"connections open|cannot accept|Too many open files", mark)
    assert len(said) <= 1, proxy.log_text(mark)
    assert not proxy.logs_matching(r"cannot accept|Too many open files", mark), said
    # Tunnels end: the waiting clients come in, as many at a time as fit.
    for sock in tunnels:
        sock.close()
    for sock in waiting:
        buf = bytearray()
        head = recv_until(sock, buf, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        echo_round_trip(sock)
        sock.close()
    assert not proxy.logs_matching(r"Traceback|internal error")


# --- 4. many idle tunnels, all ending at once ----------------------------------------------------


@pytest.mark.timeout(40)
def test_two_thousand_idle_tunnels_ending_at_once(start_proxy, http_backend, sockets):
    """2000 idle tunnels, then every client closes at once: a GET meanwhile is answered
    quickly, every backend leg is ended within seconds, and the proxy is back to the
    descriptors it had before (no socket or pipe left behind)."""
    count = 2000
    backend = SelectorTunnelBackend()
    try:
        proxy = start_proxy(
            backend.port, "--route", f"/latency=http://127.0.0.1:{http_backend.port}"
        )
        base = open_fds(proxy.pid)
        clients = []
        deadline = time.monotonic() + 20
        for _ in range(count):
            assert time.monotonic() < deadline, f"only {len(clients)} tunnels opened in 20 s"
            sock = connect(proxy.port, timeout=10)
            sock.sendall(tunnel_request())
            clients.append(sock)
        sockets.extend(clients)
        for sock in clients:
            buf = bytearray()
            assert recv_until(sock, buf, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        assert backend.upgraded == count
        assert open_fds(proxy.pid) >= base + 2 * count
        idle_cpu = cpu_used(proxy, 1.0)
        assert idle_cpu < 0.2, f"{count} idle tunnels cost {idle_cpu:.2f} s of CPU a second"
        for sock in clients:
            sock.close()
        latency = get_latency(proxy.port)
        assert latency < 2.0, f"a GET took {latency:.2f} s while the tunnels ended"
        deadline = time.monotonic() + 10
        while backend.ended < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.ended == count, f"{count - backend.ended} backend legs still open"
        deadline = time.monotonic() + 5
        while open_fds(proxy.pid) > base + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds(proxy.pid) <= base + 2, (open_fds(proxy.pid), base)
        assert get_latency(proxy.port) < 1.0
    finally:
        backend.stop()


# --- 5. slowloris at a low --max-connections ------------------------------------------------------


@pytest.mark.timeout(40)
def test_trickled_heads_at_max_connections_delay_new_clients_at_most_the_header_timeout(
    start_proxy, http_backend, sockets
):
    """--max-connections 4, four clients trickling a head a byte every 100 ms (requests under
    way: never closed for a newcomer). A new client waits in the backlog, and is served
    within --header-timeout and the linger that follows a 408 (LINGER_SECONDS: the trickled
    connections are drained a moment so that the 408 is not destroyed by a reset); the
    proxy spins neither while they trickle nor while the newcomer waits."""
    proxy = start_proxy(http_backend.port, "--max-connections", "4", "--header-timeout", "2")
    mark = proxy.mark()
    head = b"GET /slow HTTP/1.1\r\nHost: slow.test\r\nX-Pad: " + b"a" * 200
    slow = [connect(proxy.port, timeout=10) for _ in range(4)]
    sockets.extend(slow)
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.is_set() and i < len(head):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(head[i : i + 1])
            i += 1
            stop.wait(0.1)

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(0.3)
        start = time.monotonic()
        with peers.HttpClient(proxy.port, timeout=10) as c:
            cpu_before = proxy.cpu_seconds()
            resp = c.request(simple_get("/newcomer"))
            cpu = proxy.cpu_seconds() - cpu_before
        waited = time.monotonic() - start
    finally:
        stop.set()
        trickler.join(5)
    assert resp.status == 200, resp
    bound = 2 + LINGER_SECONDS + 1.0
    assert waited < bound, f"the newcomer waited {waited:.1f} s with --header-timeout 2"
    assert cpu < 0.3 * max(waited, 1.0), f"{cpu:.2f} s of CPU in {waited:.1f} s"
    for sock in slow:
        _kind, got = wait_closed(sock, 3)
        if got:
            assert got.startswith(b"HTTP/1.1 408 "), got[:100]
    assert len(proxy.logs_matching(r"\b408\b", mark)) == 4, proxy.log_text(mark)


# --- 6. a tunnel stuck both ways -----------------------------------------------------------------


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
@pytest.mark.timeout(40)
def test_a_tunnel_stuck_both_ways_with_full_buffers_is_cut_by_the_idle_timeout(
    start_proxy, raw_backend, sockets, splice
):
    """Both peers flood and neither reads: every buffer on the way fills and nothing moves.
    The proxy's memory does not grow with what is offered, other clients are served quickly,
    and --tunnel-idle-timeout (no byte moved either way) ends the tunnel with resets."""
    offered = {"backend": 0}
    backend_end: dict[str, str] = {}

    def flood(sock: socket.socket, head: bytes, buf: bytearray) -> None:
        sock.sendall(RESPONSE_101)
        block = b"b" * (256 * KiB)
        sock.settimeout(8)
        try:
            for _ in range(400):  # at most 100 MiB
                sock.sendall(block)
                offered["backend"] += len(block)
        except TimeoutError:
            backend_end["how"] = "stuck"
            with contextlib.suppress(OSError):
                sock.settimeout(5)
                while sock.recv(1 << 20):
                    pass
        except OSError as e:
            backend_end["how"] = repr(e)

    backend = raw_backend(flood)
    flags = ["--tunnel-idle-timeout", "3"]
    proxy = start_proxy(backend.port, *flags, *([] if splice else ["--no-splice"]))
    mark = proxy.mark()
    sock = open_tunnel(proxy.port, leftover=bytearray())
    sockets.append(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    baseline = proxy.rss_kib()
    sock.settimeout(0.2)
    sent = 0
    start = time.monotonic()
    cut = None
    block = b"c" * (64 * KiB)
    while time.monotonic() - start < 8 and cut is None:
        try:
            sent += sock.send(block)
        except TimeoutError:
            time.sleep(0.05)
        except (ConnectionResetError, BrokenPipeError) as e:
            cut = (type(e).__name__, time.monotonic() - start)
    peak = proxy.rss_kib()
    assert cut is not None, (
        f"the stuck tunnel was not cut in 8 s with --tunnel-idle-timeout 3; log:\n"
        f"{proxy.log_text(mark)}"
    )
    assert 2.5 <= cut[1] <= 6.5, cut
    assert peak - baseline < 8 * 1024, f"the proxy grew by {(peak - baseline) / 1024:.1f} MiB"
    assert offered["backend"] < 32 * MiB, offered
    line = proxy.wait_for_log(r"tunnel|client->backend", since=mark)
    assert line


# --- 7. a flood does not slow other clients down --------------------------------------------------


@pytest.mark.timeout(40)
def test_other_clients_are_served_quickly_while_tunnels_flood_and_a_reader_crawls(
    start_proxy, http_backend, raw_backend, sockets
):
    """Two tunnels moving bulk both ways as fast as the machine allows, and a client reading
    a large answer at a few KB/s: simple GETs through the same proxy still take well under
    a quarter of a second, and its memory does not grow with the bytes moved."""

    def handle(sock: socket.socket, head: bytes, buf: bytearray) -> None:
        if head.startswith(b"GET /large"):
            serve_large("content-length")(sock, head, buf)
            return
        sock.sendall(RESPONSE_101)
        stop = time.monotonic() + 8
        block = b"d" * (256 * KiB)
        sender_error: list[BaseException] = []

        def send() -> None:
            try:
                while time.monotonic() < stop:
                    sock.sendall(block)
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                sender_error.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while sock.recv(1 << 20):
            pass
        sender.join(10)

    backend = raw_backend(handle)
    proxy = start_proxy(
        backend.port,
        "--route",
        f"/latency=http://127.0.0.1:{http_backend.port}",
        "--response-timeout",
        "30",
    )
    baseline = proxy.rss_kib()
    crawler = connect(proxy.port, timeout=10)
    crawler.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sockets.append(crawler)
    crawler.sendall(simple_get("/large"))
    stop = time.monotonic() + 8

    def flood(sock: socket.socket, moved: int) -> int:
        block = b"u" * (256 * KiB)

        def up() -> None:
            with contextlib.suppress(OSError):
                while time.monotonic() < stop:
                    sock.sendall(block)
                sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=up, daemon=True)
        sender.start()
        while chunk := sock.recv(1 << 20):
            moved += len(chunk)
        sender.join(10)
        return moved

    floods = []
    for _ in range(2):
        early = bytearray()
        sock = open_tunnel(proxy.port, timeout=20, leftover=early)
        sockets.append(sock)
        floods.append(peers.Background(flood, sock, len(early)))
    latencies = []
    peak = baseline
    for _ in range(20):
        if time.monotonic() > stop - 1:
            break
        latencies.append(get_latency(proxy.port))
        with contextlib.suppress(BlockingIOError):
            crawler.recv(4 * KiB, socket.MSG_DONTWAIT)  # a few KB/s
        peak = max(peak, proxy.rss_kib())
        time.sleep(0.2)
    moved = [f.join(30) for f in floods]
    assert len(latencies) >= 10, latencies
    assert all(m > 16 * MiB for m in moved), moved
    latencies.sort()
    assert latencies[len(latencies) * 9 // 10 - 1] < 0.25, latencies
    assert peak - baseline < 16 * 1024, f"the proxy grew by {(peak - baseline) / 1024:.1f} MiB"


# --- 8. the tail of an answer, queued for a slow reader -------------------------------------------


@pytest.mark.timeout(40)
def test_the_tail_of_a_relayed_answer_is_not_reset_while_the_client_reads_it(
    start_proxy, raw_backend
):
    """Once the backend's whole answer is read the connection waits for the next request,
    though the answer's end may still wait in the proxy for the client. --idle-timeout ran
    meanwhile and closed it with a reset: a client reading steadily lost megabytes of an
    answer the access log called complete, with no line at info. The idle wait now starts
    when the last answer is out; until then the client's silence is what counts."""

    backend = raw_backend(serve_tail)
    proxy = start_proxy(backend.port, "--idle-timeout", "2", "--response-timeout", "30")
    mark = proxy.mark()
    queued = queued_for_a_silent_client(proxy, "/tail/")
    mark = proxy.mark()
    # Answers of sizes around that, none read at first: those that fit complete at once,
    # some with their last piece left in the proxy's backlog.
    sizes = [queued - 384 * KiB + i * 16 * KiB for i in range(40)]
    clients: dict[int, socket.socket] = {}
    try:
        for size in sizes:
            clients[size] = slow_client(proxy.port, f"/tail/{size}", timeout=5)
        time.sleep(0.3)  # answers that fit are complete in milliseconds
        cut: dict[int, int] = {}

        def read_steadily(size: int) -> None:
            sock = clients[size]
            got = 0
            start = time.monotonic()
            while time.monotonic() - start < 4.0:  # 8 KiB every 50 ms
                try:
                    chunk = sock.recv(8 * KiB)
                except ConnectionResetError:
                    cut[size] = got
                    return
                if not chunk:
                    return
                got += len(chunk)
                time.sleep(0.05)

        readers = [threading.Thread(target=read_steadily, args=(s,)) for s in sizes]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(10)
        # The answers the access log calls complete: every byte relayed, no error.
        complete = {
            int(m.group(1))
            for line in proxy.logs_matching(r'"GET /tail/\d+ HTTP/1.1" 200 \d+ "-" "-"$', mark)
            if (m := re.search(r"/tail/(\d+) HTTP/1.1\" 200 \1 ", line))
        }
    finally:
        for sock in clients.values():
            sock.close()
    assert complete, f"no answer was complete; log:\n{proxy.log_text(mark)}"
    cut = {size: got for size, got in cut.items() if size in complete}
    assert not cut, (
        f"answers logged as complete 200s were reset while their clients read them steadily "
        f"(size: bytes received): {cut}; log:\n{proxy.log_text(mark)}"
    )


@pytest.mark.timeout(40)
def test_a_client_that_takes_none_of_its_answer_tail_is_cut(start_proxy, raw_backend):
    """The other side of the test above: a client that reads nothing of an answer whose end
    waits in the proxy is cut after --response-timeout and one look more at its send queue,
    with a reset (bytes were lost) and one line at info saying how many."""

    backend = raw_backend(serve_tail)
    proxy = start_proxy(backend.port, "--idle-timeout", "30", "--response-timeout", "2")
    mark = proxy.mark()
    queued = queued_for_a_silent_client(proxy, "/tail/")
    mark = proxy.mark()
    clients = []
    try:
        for i in range(40):
            clients.append(slow_client(proxy.port, f"/tail/{queued - 384 * KiB + i * 16 * KiB}"))
        start = time.monotonic()
        line = proxy.wait_for_log(r"took none of its answers for 2s", since=mark, timeout=8)
        elapsed = time.monotonic() - start
        assert 2.0 <= elapsed < 5.0, f"cut after {elapsed:.1f} s (--response-timeout 2)"
        assert re.search(r"connection reset with \d+ bytes undelivered", line), line
    finally:
        for sock in clients:
            sock.close()


@pytest.mark.timeout(60)
def test_the_idle_wait_after_a_drained_answer_lasts_the_idle_timeout(start_proxy, raw_backend):
    """When the last answer of a kept-alive connection has left the proxy's backlog, the wait
    for the next request starts and lasts --idle-timeout: not the header timeout, and not the
    --response-timeout that watched the backlog. "Left" means handed to the kernel, as nginx
    counts keepalive_timeout: megabytes may still wait in the socket buffers for the client,
    and the FIN queues behind them, so a client sees every byte and then the end. Clients
    read their answers slowly for longer than the idle timeout, then take the rest at once and
    send nothing: each gets all its bytes, then a FIN (never a reset), at most --idle-timeout
    after its last byte (sooner when its backlog drained long before). That the wait does not
    start while the backlog is still in the proxy is the test above."""
    idle = 2.0
    backend = raw_backend(serve_tail)
    proxy = start_proxy(
        backend.port,
        "--idle-timeout",
        str(idle),
        "--header-timeout",
        "9",
        "--response-timeout",
        "30",
    )
    queued = queued_for_a_silent_client(proxy, "/tail/")
    mark = proxy.mark()
    sizes = [queued - 384 * KiB + i * 48 * KiB for i in range(12)]
    clients: dict[int, socket.socket] = {}
    waited: dict[int, tuple[str, float]] = {}

    def read_then_wait(size: int) -> None:
        sock = clients[size]
        got = 0
        start = time.monotonic()
        try:
            while got < size and time.monotonic() - start < idle + 1.0:  # 8 KiB every 50 ms
                chunk = sock.recv(8 * KiB)
                if not chunk:
                    break
                got += len(chunk)
                time.sleep(0.05)
            while got < size:  # then the rest at once
                chunk = sock.recv(256 * KiB)
                if not chunk:
                    break
                got += len(chunk)
            last_byte = time.monotonic()
            if got < size:
                waited[size] = (f"cut after {got} bytes", 0.0)
                return
            how, _ = wait_closed(sock, idle + 6.0)
            waited[size] = (how, time.monotonic() - last_byte)
        except OSError as e:
            waited[size] = (f"{e!r} after {got} bytes", 0.0)

    try:
        for size in sizes:
            clients[size] = slow_client(proxy.port, f"/tail/{size}", timeout=10)
        time.sleep(0.3)  # answers that fit in the proxy and the kernel are complete by now
        readers = [threading.Thread(target=read_then_wait, args=(s,)) for s in sizes]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(20)
    finally:
        for sock in clients.values():
            sock.close()
    log = proxy.log_text(mark)
    assert len(waited) == len(sizes), f"readers unfinished: {waited}"
    wrong = {
        size: (how, round(after, 2))
        for size, (how, after) in waited.items()
        if how != "eof" or after > idle + 1.5
    }
    assert not wrong, (
        f"--idle-timeout {idle}: each connection should end with a FIN at most {idle} s after "
        f"its answer's last byte (size: how it ended, seconds after the last byte): {wrong}; "
        f"log:\n{log}"
    )
