"""After a 101 the proxy is an opaque byte tunnel: bulk data both ways (checked by SHA-256),
bytes that arrive together with the heads, half-close, resets, the idle timeout, and memory
held flat when one side does not read."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import select
import socket
import threading
import time

import pytest
from peers import (
    BLOB_SIZE,
    RESPONSE_101,
    ProxyProcess,
    ScriptedBackend,
    ScriptedConn,
    connect,
    read_to_eof,
    recv_exact,
    recv_until,
    reset_close,
    send_blob,
    sha256,
    tunnel_request,
    wait_closed,
)

MiB = 1024 * 1024


@dataclasses.dataclass
class Tunnel:
    sock: socket.socket
    buf: bytearray  # bytes the client received after the 101 head
    backend: ScriptedBackend
    proxy: ProxyProcess

    def recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n, self.buf)

    def read_to_eof(self) -> tuple[int, str]:
        return read_to_eof(self.sock, self.buf)

    def read_all(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        while chunk := self.sock.recv(65536):
            data += chunk
        return data


@pytest.fixture(params=["splice", "copy"])
def open_tunnel(request, scripted_backend, start_proxy, sockets):
    """`open_tunnel(script, *proxy_flags, early=b"")`: a scripted backend running `script`, a
    proxy in front of it, and a client whose upgrade request (plus `early` bytes, in the same
    send) got the backend's 101. Every test runs twice: bytes moved by splice(2), and copied
    through a buffer (--no-splice), the two pumps of a plain tunnel."""
    pump_flags = ("--no-splice",) if request.param == "copy" else ()

    def open_(script, *flags: str, early: bytes = b"", timeout: float = 10.0) -> Tunnel:
        backend = scripted_backend(script)
        proxy = start_proxy(backend.port, *pump_flags, *flags)
        sock = connect(proxy.port, timeout)
        sockets.append(sock)
        sock.sendall(tunnel_request() + early)
        buf = bytearray()
        head = recv_until(sock, buf, b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.1 101 ", head), head
        return Tunnel(sock, buf, backend, proxy)

    return open_


# --- bulk data ------------------------------------------------------------------------------


def test_64mib_client_to_backend(open_tunnel, blob, blob_sha):
    def sink(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        n, digest = sc.read_to_eof()
        # the client half-closed; this side can still answer
        sc.sock.sendall(f"{n} {digest}".encode())
        return n, digest

    t = open_tunnel(sink)
    send_blob(t.sock, blob)
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result(30) == (BLOB_SIZE, blob_sha)
    assert t.read_all() == f"{BLOB_SIZE} {blob_sha}".encode()


def test_64mib_backend_to_client(open_tunnel, blob, blob_sha):
    def source(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        send_blob(sc.sock, blob)
        sc.sock.shutdown(socket.SHUT_WR)
        return sc.read_to_eof()

    t = open_tunnel(source)
    assert t.read_to_eof() == (BLOB_SIZE, blob_sha)
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result(30) == (0, sha256(b""))


def test_64mib_both_ways_at_once(open_tunnel, background, blob, blob_sha):
    def both(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)

        def send():
            send_blob(sc.sock, blob)
            sc.sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            return sc.read_to_eof()
        finally:
            sender.join(30)

    t = open_tunnel(both)

    def client_send():
        send_blob(t.sock, blob)
        t.sock.shutdown(socket.SHUT_WR)

    sender = background(client_send)
    assert t.read_to_eof() == (BLOB_SIZE, blob_sha)
    sender.join()
    assert t.backend.result(30) == (BLOB_SIZE, blob_sha)


# --- bytes that came with the heads ---------------------------------------------------------


@pytest.mark.parametrize(
    "early",
    [
        b"CLIENT-EARLY-BYTES",
        b"GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        bytes(range(256)) * 4,
    ],
    ids=["text", "looks-like-http", "binary"],
)
def test_leftover_bytes_forwarded_first_and_in_order(open_tunnel, early):
    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101 + b"BACKEND-EARLY")  # one send: head and data together
        got = sc.recv_exact(len(early) + len(b"CLIENT-LATER"))
        sc.sock.sendall(b"BACKEND-LATER")
        return got

    t = open_tunnel(script, early=early)
    assert t.recv_exact(len(b"BACKEND-EARLY")) == b"BACKEND-EARLY"
    t.sock.sendall(b"CLIENT-LATER")
    assert t.recv_exact(len(b"BACKEND-LATER")) == b"BACKEND-LATER"
    assert t.backend.result() == early + b"CLIENT-LATER"


# --- half-close -----------------------------------------------------------------------------


def test_half_close_from_client(open_tunnel):
    answer = b"still talking after your EOF\n" * 5000

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        n, digest = sc.read_to_eof()
        sc.sock.sendall(answer)
        return n, digest

    t = open_tunnel(script)
    t.sock.sendall(b"request data")
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result() == (len(b"request data"), sha256(b"request data"))
    assert t.read_to_eof() == (len(answer), sha256(answer))


def test_half_close_from_backend(open_tunnel):
    late = b"client keeps sending after the backend's EOF\n" * 5000

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101 + b"all I have to say")
        sc.sock.shutdown(socket.SHUT_WR)
        return sc.read_to_eof()

    t = open_tunnel(script)
    assert t.read_to_eof() == (len(b"all I have to say"), sha256(b"all I have to say"))
    t.sock.sendall(late)
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result() == (len(late), sha256(late))


# --- resets ---------------------------------------------------------------------------------


def test_backend_reset_closes_client(open_tunnel):
    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        sc.recv_exact(1)
        reset_close(sc.sock)

    t = open_tunnel(script)
    t.sock.sendall(b"x")
    kind, _ = wait_closed(t.sock, timeout=5)
    assert kind in ("eof", "reset")


def test_client_reset_closes_backend(open_tunnel):
    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        return wait_closed(sc.sock, timeout=5)

    t = open_tunnel(script)
    reset_close(t.sock)
    kind, _ = t.backend.result()
    assert kind in ("eof", "reset")


def test_client_reset_while_backend_streams(open_tunnel, blob):
    """The backend is busy writing when the client resets: its writes start failing (or it
    sees EOF) within a few seconds instead of blocking forever."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        sc.sock.settimeout(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                sc.sock.sendall(blob[: 1 * MiB])
            except (BrokenPipeError, ConnectionResetError):
                return "closed"
        return "still open"

    t = open_tunnel(script)
    t.recv_exact(1 * MiB)
    reset_close(t.sock)
    assert t.backend.result(15) == "closed"


def test_client_reset_while_the_backend_does_not_read(open_tunnel, blob):
    """The client fills a backend that does not read, then resets. Neither direction reads
    the client now (one waits to write to the backend, the other for the backend's bytes),
    yet the reset reaches the backend at once: it is not left holding a tunnel until it
    happens to read or write."""

    stalled = threading.Event()

    def script(sc: ScriptedConn):
        sc.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sc.sock.sendall(RESPONSE_101)
        stalled.wait(10)
        # Watch for the proxy's end without reading: a read would unblock the tunnel, which
        # would then find the reset by itself.
        started = time.monotonic()
        poller = select.poll()
        poller.register(sc.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        ended = poller.poll(8000)
        return bool(ended), time.monotonic() - started

    t = open_tunnel(script)
    t.sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + 10
    while time.monotonic() < deadline:  # until the proxy and the backend hold all they take
        try:
            sent += t.sock.send(blob[: 1 * MiB])
        except BlockingIOError:
            if select.select([], [t.sock], [], 0.5)[1] == []:
                break
    assert sent > 0
    reset_close(t.sock)
    stalled.set()
    ended, waited = t.backend.result(15)
    assert ended, "the backend leg was still open 8 s after the client's reset"
    assert waited < 3, f"the backend leg was closed {waited:.1f} s after the client's reset"


def test_client_reset_after_its_half_close(open_tunnel):
    """The client half-closes (its direction is over), the backend says nothing, then the
    client resets: the backend leg is closed too, not held until the backend speaks."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        assert sc.read_to_eof() == (5, sha256(b"hello"))
        started = time.monotonic()
        poller = select.poll()  # the end of our reading side was read: wait for a reset
        poller.register(sc.sock, select.POLLHUP | select.POLLERR)
        ended = poller.poll(8000)
        return bool(ended), time.monotonic() - started

    t = open_tunnel(script)
    t.sock.sendall(b"hello")
    t.sock.shutdown(socket.SHUT_WR)
    time.sleep(0.5)  # the backend has read the EOF and waits
    reset_close(t.sock)
    ended, waited = t.backend.result(15)
    assert ended, "the backend leg was still open 8 s after the client's reset"
    assert waited < 3, f"the backend leg was reset {waited:.1f} s after the client's reset"
    t.proxy.wait_for_log(r'ended="client reset"')


def test_client_end_while_its_bytes_wait_for_the_backend(open_tunnel, blob):
    """The backend has ended its direction (the proxy shut the client's receiving side), and
    the client sends 4 MiB and its end while the backend does not read: the client socket is
    then hung up with bytes still to move. The proxy neither spins on that hang-up nor loses
    the bytes: all arrive once the backend reads."""
    data = blob[: 4 * MiB]
    reading = threading.Event()

    def script(sc: ScriptedConn):
        sc.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sc.sock.sendall(RESPONSE_101)
        sc.sock.shutdown(socket.SHUT_WR)
        reading.wait(10)
        return sc.read_to_eof()

    t = open_tunnel(script)
    assert t.read_to_eof() == (0, sha256(b""))
    sender = threading.Thread(target=lambda: (t.sock.sendall(data), t.sock.shutdown(1)))
    sender.start()
    time.sleep(0.5)
    busy = t.proxy.cpu_seconds()
    time.sleep(1.0)
    busy = t.proxy.cpu_seconds() - busy
    reading.set()
    assert t.backend.result(15) == (len(data), sha256(data))
    sender.join(10)
    assert busy < 0.3, f"the proxy used {busy:.2f} s of CPU in 1 s while waiting"


def test_client_reset_before_the_101(scripted_backend, start_proxy, sockets):
    """The client asks to upgrade and resets while the backend is still deciding; the
    backend's 101 (with data behind it) then has nowhere to go: the backend's connection is
    closed within a few seconds."""
    head_seen = threading.Event()
    client_gone = threading.Event()

    def script(sc: ScriptedConn):
        head_seen.set()
        if not client_gone.wait(10):
            raise TimeoutError("the client never reset")
        try:
            sc.sock.sendall(RESPONSE_101 + b"data behind the 101" * 1000)
        except (BrokenPipeError, ConnectionResetError):
            return "reset", b""
        return wait_closed(sc.sock, timeout=5)

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port)
    sock = connect(proxy.port)
    sockets.append(sock)
    sock.sendall(tunnel_request())
    assert head_seen.wait(5), "the request never reached the backend"
    reset_close(sock)
    client_gone.set()
    kind, _ = backend.result(10)
    assert kind in ("eof", "reset")


# --- idle timeout ---------------------------------------------------------------------------


def echo(sc: ScriptedConn):
    sc.sock.sendall(RESPONSE_101)
    if sc.extra:
        sc.sock.sendall(bytes(sc.extra))
    while data := sc.sock.recv(65536):
        sc.sock.sendall(data)
    return "eof"


def test_tunnel_idle_timeout_closes_idle_tunnel(open_tunnel):
    t = open_tunnel(echo, "--tunnel-idle-timeout", "1")
    t.sock.sendall(b"ping")
    assert t.recv_exact(4) == b"ping"
    start = time.monotonic()
    kind, _ = wait_closed(t.sock, timeout=5)
    elapsed = time.monotonic() - start
    assert kind in ("eof", "reset")
    assert 0.8 <= elapsed <= 3.5, f"closed after {elapsed:.2f} s with --tunnel-idle-timeout 1"
    assert t.backend.result(5) == "eof"


def test_a_tunnel_cut_with_bytes_undelivered_resets_the_client(open_tunnel):
    """--tunnel-idle-timeout cuts a tunnel whose client stopped reading while the proxy
    still holds bytes of the backend's (in its pipe or buffer: the kernel queues are full).
    The client must see a reset once it reads what reached it, not an orderly end after
    fewer bytes than were sent: a silent truncation."""
    total = 32 * 1024 * 1024

    def push(sc: ScriptedConn) -> str:
        sc.sock.sendall(RESPONSE_101)
        sc.sock.settimeout(10)
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < total:
                sent += sc.sock.send(chunk)
        except OSError as e:
            return type(e).__name__  # the proxy closed its end while we were blocked
        return "all sent"

    t = open_tunnel(push, "--tunnel-idle-timeout", "1")
    line = t.proxy.wait_for_log(r"ended=.*idle for 1s", timeout=10)
    kind, got = wait_closed(t.sock, timeout=10)
    assert len(t.buf) + len(got) < total, line
    assert kind == "reset", f"an orderly end after {len(t.buf) + len(got)} of {total} bytes"
    assert t.backend.result(10) != "all sent"


def test_tunnel_idle_timeout_spares_active_tunnel(open_tunnel):
    t = open_tunnel(echo, "--tunnel-idle-timeout", "1")
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < 2.5:
        # wait 0.3 s on the socket: nothing may arrive (no close, no stray bytes)
        readable, _, _ = select.select([t.sock], [], [], 0.3)
        assert not readable, "the tunnel closed (or sent something) while in use"
        message = f"ping {i}".encode()
        t.sock.sendall(message)
        assert t.recv_exact(len(message)) == message
        i += 1
    kind, _ = wait_closed(t.sock, timeout=5)
    assert kind in ("eof", "reset")


# --- TCP keepalive --------------------------------------------------------------------------


def tcp_timers() -> dict[tuple[int, int], tuple[int, int]]:
    """(local port, remote port) -> (timer kind, seconds to expiry) of every established TCP
    connection on this host, from /proc/net/tcp{,6}. Kind 2 is the keepalive timer, 0 no
    timer. (Connections of earlier tests may linger in TIME_WAIT on the same ports: they are
    left out.)"""
    found = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "01":  # ESTABLISHED
                    continue
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                kind, when = fields[5].split(":")
                found[(local, remote)] = (int(kind, 16), int(when, 16) // 100)
    return found


@pytest.mark.parametrize("idle", [45, 0])
def test_both_legs_of_a_lasting_tunnel_get_the_keepalive_asked_for(open_tunnel, idle):
    """--tcp-keepalive: the client leg inherits it from the listening socket, the backend leg
    gets it once the tunnel has lasted a second. Seen from the kernel's side: the socket's
    keepalive timer, due in at most `idle` seconds (not the system's two hours)."""

    def hold(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        return sc.read_to_eof()

    t = open_tunnel(hold, "--tcp-keepalive", str(idle))
    client_port = t.sock.getsockname()[1]

    def legs():
        timers = tcp_timers()
        client_leg = timers.get((t.proxy.port, client_port))
        backend_leg = [v for (_, remote), v in timers.items() if remote == t.backend.port]
        return client_leg, backend_leg

    deadline = time.monotonic() + (5 if idle else 1.5)
    while True:
        client_leg, backend_leg = legs()
        done = client_leg and backend_leg and client_leg[0] == 2 and backend_leg[0][0] == 2
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert client_leg is not None
    assert len(backend_leg) == 1  # the proxy's one connection to the backend
    if idle:
        assert client_leg[0] == 2, client_leg
        assert backend_leg[0][0] == 2, backend_leg
        assert 0 < client_leg[1] <= idle
        assert 0 < backend_leg[0][1] <= idle
    else:
        assert client_leg[0] == 0, client_leg
        assert backend_leg[0][0] == 0, backend_leg
    t.sock.shutdown(socket.SHUT_WR)
    assert t.backend.result(10) == (0, sha256(b""))


# --- a side that does not read --------------------------------------------------------------

SLOW_TOTAL = 256 * MiB
STALL_SECONDS = 3.0
RSS_LIMIT_KIB = 32 * 1024


def test_slow_client_reader_keeps_proxy_memory_flat(open_tunnel, blob):
    """The backend writes 256 MiB as fast as it can; the client reads nothing for 3 s. The
    proxy must stop reading from the backend instead of buffering: RSS stays within 32 MiB of
    where it started. Then the client reads everything, intact."""
    progress = {"sent": 0}

    def source(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        sc.recv_exact(1)  # the client's go
        hasher = hashlib.sha256()
        for i in range(SLOW_TOTAL // MiB):
            piece = blob[(i % 64) * MiB : (i % 64 + 1) * MiB]
            sc.sock.sendall(piece)
            hasher.update(piece)
            progress["sent"] += MiB
        sc.sock.shutdown(socket.SHUT_WR)
        return SLOW_TOTAL, hasher.hexdigest()

    t = open_tunnel(source, timeout=20)
    baseline = t.proxy.rss_kib()
    t.sock.sendall(b"g")
    peak = t.proxy.peak_rss_kib(STALL_SECONDS)
    stalled_at = progress["sent"]
    assert peak - baseline <= RSS_LIMIT_KIB, (
        f"proxy RSS grew by {(peak - baseline) / 1024:.1f} MiB while the client did not read "
        f"(backend had sent {stalled_at / MiB:.0f} MiB)"
    )
    assert stalled_at < SLOW_TOTAL, "the backend could send everything: nothing held it back"
    got = t.read_to_eof()
    assert got == t.backend.result(30)


def test_slow_backend_reader_keeps_proxy_memory_flat(open_tunnel, background, blob):
    """The mirror image: the client writes 256 MiB, the backend reads nothing for 3 s."""
    go = threading.Event()

    def sink(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        if not go.wait(20):
            raise TimeoutError("never told to read")
        return sc.read_to_eof()

    t = open_tunnel(sink, timeout=20)
    baseline = t.proxy.rss_kib()
    progress = {"sent": 0}

    def client_send():
        hasher = hashlib.sha256()
        for i in range(SLOW_TOTAL // MiB):
            piece = blob[(i % 64) * MiB : (i % 64 + 1) * MiB]
            t.sock.sendall(piece)
            hasher.update(piece)
            progress["sent"] += MiB
        t.sock.shutdown(socket.SHUT_WR)
        return SLOW_TOTAL, hasher.hexdigest()

    sender = background(client_send)
    try:
        peak = t.proxy.peak_rss_kib(STALL_SECONDS)
        stalled_at = progress["sent"]
    finally:
        go.set()
    assert peak - baseline <= RSS_LIMIT_KIB, (
        f"proxy RSS grew by {(peak - baseline) / 1024:.1f} MiB while the backend did not read "
        f"(client had sent {stalled_at / MiB:.0f} MiB)"
    )
    assert stalled_at < SLOW_TOTAL, "the client could send everything: nothing held it back"
    expected = sender.join(30)
    assert t.backend.result(30) == expected
