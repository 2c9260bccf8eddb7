"""Stress probes of the upgraded-connection tunnel, end to end over real loopback sockets, on
every kind of leg: plain TCP (splice), plain with --no-splice (copy), TLS on the client leg,
TLS on the backend leg, and TLS on both.

- seeded random interleavings of writes of 1 byte to 300 KiB both ways at once, with short
  pauses, checked by SHA-256 at both ends and against the access log's byte counts;
- half-close in each order (client first, backend first, both at once) while the other
  direction is still moving megabytes, the end arriving in the same segment as the last data;
- the backend's data and end right behind its 101 head, the client's data and end right
  behind its upgrade request (before the 101), and more than a head's worth of the client's
  bytes waiting for the 101;
- a side that stops reading on TLS legs: the proxy's memory stays flat, then all arrives;
- resets in mid-transfer in each direction;
- 200 short tunnels at once, each checked, and no socket left behind in the proxy;
- --tunnel-idle-timeout: one-way traffic and traffic after a half-close keep a tunnel, silence
  (also after a half-close) ends it; the HTTP timeouts do not reach into a tunnel;
- unusual heads around the switch (a 101 in pieces, after a 103, with bare LF line ends or a
  Content-Length; an upgrade request with a body, or pipelined behind a GET);
- resets after a half-close; 160 tunnels ending every way, leaving no socket or open count
  behind; 8 bulk tunnels at once with room for only 4 splice pipes;
- a TLS leg whose peer's close_notify was read before the proxy sent its own: the end is
  still reported once the bytes before it are out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from peers import (
    RESPONSE_101,
    Metrics,
    ProxyProcess,
    ScriptedBackend,
    ScriptedConn,
    connect,
    proxy_args,
    read_to_eof,
    recv_exact,
    recv_until,
    reset_close,
    send_blob,
    sha256,
    stream_ended,
    tunnel_request,
)
from tls_peers import Pki, TlsStream, raw_socket

MiB = 1024 * 1024
KiB = 1024

MODES = ["plain", "copy", "tls-client", "tls-backend", "tls-both"]


# --- the rig --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("stress-pki"))


def end_with_last_data(stream: Any, data: bytes) -> None:
    """Send `data` and end the direction so that the end leaves in the same TCP segment as
    the last bytes (TCP_CORK holds them; the FIN of shutdown() goes out with them), and on TLS
    the close_notify record too."""
    raw = raw_socket(stream)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    if data:
        stream.sendall(data)
    stream.shutdown(socket.SHUT_WR)  # close_notify + FIN on TLS


@dataclasses.dataclass
class Client:
    stream: Any
    buf: bytearray  # what came after the 101 head

    def recv_exact(self, n: int) -> bytes:
        return recv_exact(self.stream, n, self.buf)

    def read_to_eof(self) -> tuple[int, str]:
        return read_to_eof(self.stream, self.buf)


@dataclasses.dataclass
class Rig:
    mode: str
    backend: ScriptedBackend
    proxy: ProxyProcess
    pki: Pki
    sockets: list[Any]

    @property
    def client_tls(self) -> bool:
        return self.mode in ("tls-client", "tls-both")

    def connect(self, timeout: float = 20.0) -> Any:
        stream: Any
        if self.client_tls:
            stream = TlsStream.connect(self.proxy.port, self.pki.client_context(), timeout=timeout)
        else:
            stream = connect(self.proxy.port, timeout)
        self.sockets.append(stream)
        return stream

    def read_101(self, stream: Any) -> Client:
        buf = bytearray()
        head = recv_until(stream, buf, b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.1 101 ", head), head
        return Client(stream, buf)

    def open(self, early: bytes = b"", timeout: float = 20.0) -> Client:
        stream = self.connect(timeout)
        stream.sendall(tunnel_request() + early)
        return self.read_101(stream)

    def access_line(self, timeout: float = 5.0) -> tuple[int, int, str]:
        """(client->backend, backend->client, ended) from the first tunnel access line."""
        line = self.proxy.wait_for_log(r"client->backend=\d+ backend->client=\d+", 0, timeout)
        m = re.search(r'client->backend=(\d+) backend->client=(\d+) ended="([^"]*)"', line)
        assert m, line
        return int(m[1]), int(m[2]), m[3]


@pytest.fixture
def make_rig(make_backend, start_proxy, sockets, pki) -> Callable[..., Rig]:
    """`make_rig(mode, script, *flags)`: a scripted backend (TLS for tls-backend and tls-both)
    running `script`, and a proxy in front of it with the legs of `mode`."""

    def make(mode: str, script: Callable[[ScriptedConn], Any], *flags: str) -> Rig:
        backend_tls = mode in ("tls-backend", "tls-both")
        backend = make_backend(
            ScriptedBackend, script, ssl_context=pki.server_context() if backend_tls else None
        )
        args: list[str] = []
        url = None
        if mode in ("tls-client", "tls-both"):
            args += ["--cert", str(pki.server.cert), "--key", str(pki.server.key)]
        if backend_tls:
            args += ["--backend-ca", str(pki.ca_file)]
            url = f"https://localhost:{backend.port}"
        if mode == "copy":
            args.append("--no-splice")
        proxy = start_proxy(backend.port, *args, *flags, backend=url)
        return Rig(mode, backend, proxy, pki, sockets)

    return make


# --- random traffic -------------------------------------------------------------------------


def random_sizes(rng: random.Random, total: int) -> list[int]:
    """Write sizes adding up to `total`: many tiny, many medium, some up to 300 KiB."""
    sizes = []
    left = total
    while left:
        r = rng.random()
        if r < 0.4:
            size = rng.randint(1, 64)
        elif r < 0.75:
            size = rng.randint(65, 16 * KiB)
        else:
            size = rng.randint(16 * KiB, 300 * KiB)
        size = min(size, left)
        sizes.append(size)
        left -= size
    return sizes


def chatter(stream: Any, data: bytes, seed: int, first: int = 0) -> None:
    """Send `data` from offset `first` in writes of random sizes with random short pauses
    (the pattern of the traffic, not a wait for anything), then end the direction."""
    rng = random.Random(seed)
    view = memoryview(data)
    pos = first
    for size in random_sizes(rng, len(data) - first):
        stream.sendall(view[pos : pos + size])
        pos += size
        if rng.random() < 0.08:
            time.sleep(rng.uniform(0, 0.004))
    stream.shutdown(socket.SHUT_WR)


def jittery_read(stream: Any, buf: bytearray, seed: int) -> tuple[int, str]:
    """Read to the end in reads of random sizes, with random short pauses (a reader that
    keeps falling behind): the byte count and SHA-256 of what came, `buf` first."""
    rng = random.Random(seed)
    hasher = hashlib.sha256(buf)
    total = len(buf)
    buf.clear()
    while chunk := stream.recv(rng.choice([1, 7, 100, 1500, 4096, 65536, 1 << 20])):
        hasher.update(chunk)
        total += len(chunk)
        if rng.random() < 0.02:
            time.sleep(rng.uniform(0, 0.003))
    return total, hasher.hexdigest()


RANDOM_TOTAL = 4 * MiB


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", MODES)
def test_random_interleaving_both_ways(make_rig, background, mode, seed):
    """Both sides write random-sized pieces at once, with pauses, and read in random sizes
    with pauses; each ends its direction when done. Both get the other's stream whole and in
    order, and the access log counts exactly the tunnelled bytes. Odd seeds send the first
    piece in the same write as the upgrade request (h11's path) and the backend its first
    piece with its 101 head; even seeds send the request alone (the fast path) and start
    streaming before the 101 came back."""
    rng = random.Random(seed)
    up = rng.randbytes(RANDOM_TOTAL + seed)
    down = rng.randbytes(RANDOM_TOTAL - seed)
    together = seed % 2 == 1
    early_up = rng.randint(1, 3000) if together else 0
    early_down = rng.randint(1, 3000) if together else 0

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101 + down[:early_down])
        sender = threading.Thread(
            target=chatter, args=(sc.sock, down, seed * 1000 + 1, early_down), daemon=True
        )
        sender.start()
        try:
            return jittery_read(sc.sock, sc.extra, seed * 1000 + 3)
        finally:
            sender.join(30)

    rig = make_rig(mode, script)
    stream = rig.connect()
    stream.sendall(tunnel_request() + up[:early_up])
    sender = background(chatter, stream, up, seed * 1000 + 2, early_up)
    client = rig.read_101(stream)
    assert jittery_read(client.stream, client.buf, seed * 1000 + 4) == (len(down), sha256(down))
    sender.join(30)
    assert rig.backend.result(30) == (len(up), sha256(up))
    to_backend, to_client, _ = rig.access_line()
    assert (to_backend, to_client) == (len(up), len(down))


# --- half-close while the other direction carries bulk -------------------------------------

BULK = 6 * MiB


def bulk_data(seed: int) -> bytes:
    return random.Random(seed).randbytes(BULK)


@pytest.mark.parametrize("mode", MODES)
def test_client_ends_first_mid_bulk_with_its_last_bytes(make_rig, mode):
    """The backend streams 6 MiB; after the first MiB the client sends its last words and its
    end in one segment. The backend gets the words and the end while still streaming; the
    client gets everything."""
    data = bulk_data(11)
    words = b"my last words" * 100

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(sc.read_to_eof()), daemon=True)
        reader.start()
        send_blob(sc.sock, data, 64 * KiB)
        reader.join(30)
        sc.sock.shutdown(socket.SHUT_WR)
        return got[0] if got else "no end from the client"

    rig = make_rig(mode, script)
    client = rig.open()
    first = client.recv_exact(MiB)
    end_with_last_data(client.stream, words)
    n, digest = client.read_to_eof()
    assert (MiB + n, sha256(first)) == (BULK, sha256(data[:MiB]))
    assert digest == sha256(data[MiB:])
    assert rig.backend.result(30) == (len(words), sha256(words))


@pytest.mark.parametrize("mode", MODES)
def test_backend_ends_first_mid_bulk_with_its_last_bytes(make_rig, background, mode):
    """The client streams 6 MiB; after the first MiB the backend sends its last words and its
    end in one segment. The client gets them while still streaming; the backend gets
    everything."""
    data = bulk_data(12)
    words = b"backend's last words" * 100

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        first = sc.recv_exact(MiB)
        end_with_last_data(sc.sock, words)
        n, digest = sc.read_to_eof()
        return MiB + n, sha256(first), digest

    rig = make_rig(mode, script)
    client = rig.open()

    def send() -> None:
        send_blob(client.stream, data, 64 * KiB)
        client.stream.shutdown(socket.SHUT_WR)

    sender = background(send)
    assert client.read_to_eof() == (len(words), sha256(words))
    sender.join(30)
    assert rig.backend.result(30) == (BULK, sha256(data[:MiB]), sha256(data[MiB:]))


@pytest.mark.parametrize("mode", MODES)
def test_both_end_at_once_after_bulk_both_ways(make_rig, background, mode):
    """Both sides stream 6 MiB and end at the same moment (a barrier), each end in the same
    segment as the last bytes."""
    up, down = bulk_data(13), bulk_data(14)
    barrier = threading.Barrier(2, timeout=30)

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(sc.read_to_eof()), daemon=True)
        reader.start()
        send_blob(sc.sock, down[:-100], 128 * KiB)
        barrier.wait()
        end_with_last_data(sc.sock, down[-100:])
        reader.join(30)
        return got[0] if got else "no end from the client"

    rig = make_rig(mode, script)
    client = rig.open()

    def send() -> None:
        send_blob(client.stream, up[:-100], 128 * KiB)
        barrier.wait()
        end_with_last_data(client.stream, up[-100:])

    sender = background(send)
    assert client.read_to_eof() == (len(down), sha256(down))
    sender.join(30)
    assert rig.backend.result(30) == (len(up), sha256(up))


# --- bytes right behind the heads -----------------------------------------------------------


@pytest.mark.parametrize("path", ["h11", "fast"])
@pytest.mark.parametrize("mode", MODES)
def test_backend_data_and_end_right_behind_its_101(make_rig, mode, path):
    """The backend's 101 head, 200 KiB and its end leave in one segment burst. The client gets
    the data and the end; then it sends 3 MiB and ends, and the backend gets all of it. `h11`:
    the client's request came with bytes behind it (h11's path); `fast`: alone."""
    said = random.Random(21).randbytes(200 * KiB)
    late = random.Random(22).randbytes(3 * MiB)
    early = b"EARLY" * 10 if path == "h11" else b""

    def script(sc: ScriptedConn):
        end_with_last_data(sc.sock, RESPONSE_101 + said)
        return sc.read_to_eof()

    rig = make_rig(mode, script)
    client = rig.open(early)
    assert client.read_to_eof() == (len(said), sha256(said))
    send_blob(client.stream, late)
    client.stream.shutdown(socket.SHUT_WR)
    assert rig.backend.result(30) == (len(early + late), sha256(early + late))


def tcp_entry(local_port: int, remote_port: int) -> tuple[str, int, int] | None:
    """(state, send queue, receive queue) of this host's TCP socket with these ports, from
    /proc/net/tcp (state "01" ESTABLISHED, "08" CLOSE_WAIT, ...); None if there is none."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if (local, remote) == (local_port, remote_port) and fields[3] != "06":  # TIME_WAIT
                tx_queue, rx_queue = (int(x, 16) for x in fields[4].split(":"))
                return fields[3], tx_queue, rx_queue
    return None


def proxy_has_read_everything(proxy_port: int, client_port: int) -> bool:
    """The proxy's socket for the client connection from `client_port` is in CLOSE_WAIT (the
    client's FIN arrived) with nothing left in its receive queue (the proxy read it all)."""
    entry = tcp_entry(proxy_port, client_port)
    return entry is not None and entry[0] == "08" and entry[2] == 0


@pytest.mark.parametrize("path", ["h11", "fast"])
@pytest.mark.parametrize("mode", MODES)
def test_client_data_and_end_before_the_101(make_rig, mode, path):
    """The client sends its upgrade request, data and its end before the 101 comes back: in
    one segment (`h11`: bytes behind the head take h11's path), or the request first and the
    data and end once the backend has the request (`fast`: the fast path holds them). Only
    then does the backend answer 101 (once the proxy has read the client's end): it gets the
    data and the end, and its answer and end reach the client after the 101."""
    data = random.Random(31).randbytes(20 * KiB)
    answer = random.Random(32).randbytes(500 * KiB)
    head_seen = threading.Event()
    go = threading.Event()

    def script(sc: ScriptedConn):
        head_seen.set()
        if not go.wait(15):
            raise TimeoutError("never told to answer")
        sc.sock.sendall(RESPONSE_101)
        got = sc.read_to_eof()
        sc.sock.sendall(answer)
        sc.sock.shutdown(socket.SHUT_WR)
        return got

    rig = make_rig(mode, script)
    stream = rig.connect()
    if path == "h11":
        end_with_last_data(stream, tunnel_request() + data)
        assert head_seen.wait(10)
    else:
        stream.sendall(tunnel_request())
        assert head_seen.wait(10)
        end_with_last_data(stream, data)
    client_port = raw_socket(stream).getsockname()[1]
    deadline = time.monotonic() + 5
    while not proxy_has_read_everything(rig.proxy.port, client_port):
        assert time.monotonic() < deadline, "the proxy did not read the client's bytes"
        time.sleep(0.01)  # polling the kernel's view of the socket
    go.set()
    client = rig.read_101(stream)
    assert client.read_to_eof() == (len(answer), sha256(answer))
    assert rig.backend.result(15) == (len(data), sha256(data))


@pytest.mark.parametrize("mode", MODES)
def test_more_than_a_head_of_client_bytes_waits_for_the_101(make_rig, background, mode):
    """The client sends its request alone, then 2 MiB (far more than --max-header-size) and
    its end before the backend answers. Once the backend has said 101 it gets all of it, in
    order; the proxy had to stop reading the client meanwhile, not fail or drop anything."""
    data = random.Random(41).randbytes(2 * MiB)
    head_seen = threading.Event()
    go = threading.Event()

    def script(sc: ScriptedConn):
        head_seen.set()
        if not go.wait(15):
            raise TimeoutError("never told to answer")
        sc.sock.sendall(RESPONSE_101 + b"welcome")
        got = sc.read_to_eof()
        sc.sock.shutdown(socket.SHUT_WR)
        return got

    rig = make_rig(mode, script)
    stream = rig.connect()
    stream.sendall(tunnel_request())
    assert head_seen.wait(10)

    def send() -> None:
        send_blob(stream, data, 64 * KiB)
        stream.shutdown(socket.SHUT_WR)

    sender = background(send)
    # Until the client cannot send more: the proxy holds at most a head's worth.
    client_port = raw_socket(stream).getsockname()[1]
    deadline = time.monotonic() + 10
    while True:
        entry = tcp_entry(client_port, rig.proxy.port)
        if entry is not None and entry[1] > 0:
            break  # bytes wait in the client's send queue: everything downstream is full
        assert time.monotonic() < deadline, f"the client's bytes never backed up: {entry}"
        time.sleep(0.02)  # polling the kernel's view of the socket
    go.set()
    client = rig.read_101(stream)
    assert client.read_to_eof() == (7, sha256(b"welcome"))
    sender.join(30)
    assert rig.backend.result(30) == (len(data), sha256(data))


# --- a side that does not read: memory --------------------------------------------------------

OFFERED = 56 * MiB
STALL = 2.0
RSS_GROWTH_LIMIT_KIB = 8 * 1024


def stall(proxy: ProxyProcess, progress: dict[str, int]) -> tuple[int, int, int]:
    """Watch a stall of STALL seconds: the proxy's peak RSS, and the sender's progress at its
    middle and at its end. Held back, the sender moves nothing in the second half: the
    kernel's buffers on the way are full by then (how much they take depends on the
    machine's autotuning: tcp_rmem may allow 32 MiB per socket, so no fixed share of the
    offered bytes is a sound bound)."""
    first = proxy.peak_rss_kib(STALL / 2)
    middle = progress["sent"]
    return max(first, proxy.peak_rss_kib(STALL / 2)), middle, progress["sent"]


def piece(i: int) -> bytes:
    return random.Random(i % 8).randbytes(MiB)


@pytest.mark.parametrize("mode", MODES)
def test_client_that_stops_reading_holds_the_backend_back(make_rig, mode):
    """The backend offers 56 MiB; the client reads the first MiB and then nothing for 2 s.
    The proxy's RSS grows by less than 8 MiB meanwhile, the backend is held back, and once
    the client reads again it gets everything in order."""
    progress = {"sent": 0}

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        for i in range(OFFERED // MiB):
            sc.sock.sendall(piece(i))
            progress["sent"] += MiB
        sc.sock.shutdown(socket.SHUT_WR)
        return sc.read_to_eof()

    rig = make_rig(mode, script)
    client = rig.open()
    first = client.recv_exact(MiB)
    baseline = rig.proxy.rss_kib()
    peak, middle, stalled_at = stall(rig.proxy, progress)
    assert peak - baseline < RSS_GROWTH_LIMIT_KIB, (
        f"proxy RSS grew by {(peak - baseline) / 1024:.1f} MiB while the client did not read "
        f"(the backend had sent {stalled_at / MiB:.0f} MiB)"
    )
    assert stalled_at == middle < OFFERED, (
        f"the backend was not held back: {middle / MiB:.0f} MiB sent at mid-stall, "
        f"{stalled_at / MiB:.0f} MiB at its end, of {OFFERED / MiB:.0f}"
    )
    assert first == piece(0)
    assert client.read_to_eof() == (OFFERED - MiB, _digest_after_first(OFFERED))
    client.stream.shutdown(socket.SHUT_WR)
    assert rig.backend.result(30) == (0, sha256(b""))


def _digest_after_first(total: int) -> str:
    h = hashlib.sha256()
    for i in range(1, total // MiB):
        h.update(piece(i))
    return h.hexdigest()


@pytest.mark.parametrize("mode", MODES)
def test_backend_that_stops_reading_holds_the_client_back(make_rig, background, mode):
    """The mirror image: the client offers 56 MiB, the backend reads 1 MiB and then nothing
    for 2 s."""
    progress = {"sent": 0}
    go = threading.Event()

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        first = sc.recv_exact(MiB)
        if not go.wait(20):
            raise TimeoutError("never told to read")
        n, digest = sc.read_to_eof()
        return first == piece(0), MiB + n, digest

    rig = make_rig(mode, script)
    client = rig.open()

    def send() -> None:
        for i in range(OFFERED // MiB):
            client.stream.sendall(piece(i))
            progress["sent"] += MiB
        client.stream.shutdown(socket.SHUT_WR)

    baseline = rig.proxy.rss_kib()
    sender = background(send)
    try:
        peak, middle, stalled_at = stall(rig.proxy, progress)
    finally:
        go.set()
    assert peak - baseline < RSS_GROWTH_LIMIT_KIB, (
        f"proxy RSS grew by {(peak - baseline) / 1024:.1f} MiB while the backend did not read "
        f"(the client had sent {stalled_at / MiB:.0f} MiB)"
    )
    assert stalled_at == middle < OFFERED, (
        f"the client was not held back: {middle / MiB:.0f} MiB sent at mid-stall, "
        f"{stalled_at / MiB:.0f} MiB at its end, of {OFFERED / MiB:.0f}"
    )
    sender.join(30)
    assert rig.backend.result(30) == (True, OFFERED, _digest_after_first(OFFERED))


# --- resets in mid-transfer -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_client_reset_mid_transfer_both_ways_resets_backend(make_rig, background, mode):
    """Both directions stream when the client resets: the backend's leg ends (reset or EOF)
    within a few seconds, its writes fail instead of blocking, and the proxy logs a reset."""
    data = bulk_data(51)

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        sc.sock.settimeout(8)
        outcome: list[str] = []

        def read() -> None:
            try:
                while sc.sock.recv(1 << 20):
                    pass
                outcome.append("eof")
            except (ConnectionResetError, OSError) as e:
                outcome.append(type(e).__name__)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started = time.monotonic()
        try:
            for _ in range(200):
                send_blob(sc.sock, data[: 2 * MiB], 64 * KiB)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        reader.join(10)
        return time.monotonic() - started, outcome

    rig = make_rig(mode, script)
    client = rig.open()

    def send() -> None:
        with contextlib.suppress(OSError):
            send_blob(client.stream, data, 64 * KiB)

    background(send)
    client.recv_exact(2 * MiB)
    mark = rig.proxy.mark()
    reset_close(raw_socket(client.stream))
    elapsed, outcome = rig.backend.result(20)
    assert outcome, "the backend's reads never ended"
    assert elapsed < 15, f"the backend needed {elapsed:.1f} s to notice the client's reset"
    rig.proxy.wait_for_log(r'ended="client reset"', since=mark)


def stream_until_refused(
    background: Callable[..., Any], stream: Any, data: bytes
) -> tuple[Any, list[str]]:
    """Send `data` 20 times over in a background thread (a 10 s timeout per send) until a
    send fails: the thread, and the list that gets the failing error's name."""
    raw_socket(stream).settimeout(10)
    failed: list[str] = []

    def send() -> None:
        try:
            for _ in range(20):
                send_blob(stream, data, 64 * KiB)
        except OSError as e:
            failed.append(type(e).__name__)

    return background(send), failed


@pytest.mark.parametrize("mode", MODES)
def test_backend_reset_mid_transfer_resets_client(make_rig, background, mode):
    """The client streams into the backend, which resets after 2 MiB: the client's leg ends
    within a few seconds (its sends fail, its reads end) and the proxy logs a backend reset."""
    data = bulk_data(52)

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        sc.recv_exact(2 * MiB)
        reset_close(raw_socket(sc.sock))
        return "reset"

    rig = make_rig(mode, script)
    client = rig.open()
    mark = rig.proxy.mark()
    sender, sent_error = stream_until_refused(background, client.stream, data)
    assert rig.backend.result(15) == "reset"
    kind = stream_ended(client.stream, 10)
    assert kind in ("eof", "reset", "error"), kind
    sender.join(15)
    assert sent_error, "the client could send 120 MiB into a reset tunnel"
    rig.proxy.wait_for_log(r'ended="backend reset"', since=mark)


# --- many short tunnels at once -------------------------------------------------------------

MANY = 200


def proxy_socket_count(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
    return count


@pytest.mark.parametrize("mode", ["plain", "copy", "tls-both"])
def test_many_short_tunnels_at_once(make_rig, mode):
    """200 tunnels opened together; each then carries its own message (1 byte to 64 KiB) one
    way, the backend answers with its length, digest and id, and both ends close. Every
    answer is right, and afterwards the proxy holds no more sockets than before."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        n, digest = sc.read_to_eof()
        sc.sock.sendall(f"{n} {digest}".encode())
        sc.sock.shutdown(socket.SHUT_WR)
        return n, digest

    rig = make_rig(mode, script)
    before = proxy_socket_count(rig.proxy.pid)
    rng = random.Random(61)
    messages = [rng.randbytes(rng.choice([1, rng.randint(2, 64 * KiB)])) for _ in range(MANY)]
    streams = []
    for _ in range(MANY):
        stream = rig.connect(timeout=20)
        stream.sendall(tunnel_request())
        streams.append(stream)
    clients = [rig.read_101(stream) for stream in streams]
    for c, message in zip(clients, messages, strict=True):
        c.stream.sendall(message)
        c.stream.shutdown(socket.SHUT_WR)
    for c, message in zip(clients, messages, strict=True):
        answer = bytes(c.buf)
        c.buf.clear()
        while chunk := c.stream.recv(65536):
            answer += chunk
        assert answer == f"{len(message)} {sha256(message)}".encode()
        c.stream.close()
    results = sorted(rig.backend.result(20) for _ in range(MANY))
    assert results == sorted((len(m), sha256(m)) for m in messages)
    rig.proxy.wait_for_logs(r"client->backend=\d+", MANY, timeout=10)
    assert proxy_socket_count(rig.proxy.pid) <= before


# --- --tunnel-idle-timeout ------------------------------------------------------------------

IDLE_MODES = ["plain", "copy", "tls-both"]


def ticks_for(stream: Any, seconds: float, period: float = 0.3) -> int:
    """Send a small message every `period` s for `seconds`; the count sent."""
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        stream.sendall(b"tick")
        count += 1
        time.sleep(period)  # the traffic's pace
    return count


@pytest.mark.parametrize("mode", IDLE_MODES)
def test_idle_timeout_spares_one_way_traffic_from_the_backend(make_rig, mode):
    """--tunnel-idle-timeout 1: the backend ticks every 0.3 s for 2.5 s and the client never
    sends: the tunnel carries every tick and is not cut."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        n = ticks_for(sc.sock, 2.5)
        sc.sock.shutdown(socket.SHUT_WR)
        return n

    rig = make_rig(mode, script, "--tunnel-idle-timeout", "1")
    client = rig.open()
    n, digest = client.read_to_eof()
    sent = rig.backend.result(10)
    assert (n, digest) == (4 * sent, sha256(b"tick" * sent))
    assert not rig.proxy.logs_matching(r"idle for")


@pytest.mark.parametrize("mode", IDLE_MODES)
def test_idle_timeout_spares_one_way_traffic_from_the_client(make_rig, mode):
    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        return sc.read_to_eof()

    rig = make_rig(mode, script, "--tunnel-idle-timeout", "1")
    client = rig.open()
    sent = ticks_for(client.stream, 2.5)
    client.stream.shutdown(socket.SHUT_WR)
    assert rig.backend.result(10) == (4 * sent, sha256(b"tick" * sent))
    assert client.read_to_eof() == (0, sha256(b""))
    assert not rig.proxy.logs_matching(r"idle for")


@pytest.mark.parametrize("mode", IDLE_MODES)
def test_idle_timeout_spares_traffic_after_a_half_close(make_rig, mode):
    """The client ends its direction at once; the backend then ticks for 2.5 s (longer than
    the timeout): the half-closed tunnel is in use and is not cut."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        got = sc.read_to_eof()
        n = ticks_for(sc.sock, 2.5)
        sc.sock.shutdown(socket.SHUT_WR)
        return got, n

    rig = make_rig(mode, script, "--tunnel-idle-timeout", "1")
    client = rig.open()
    client.stream.shutdown(socket.SHUT_WR)
    n, digest = client.read_to_eof()
    got, sent = rig.backend.result(10)
    assert got == (0, sha256(b""))
    assert (n, digest) == (4 * sent, sha256(b"tick" * sent))
    assert not rig.proxy.logs_matching(r"idle for")


@pytest.mark.parametrize("mode", IDLE_MODES)
def test_idle_timeout_cuts_a_silent_half_closed_tunnel(make_rig, mode):
    """The backend ends its direction and then says nothing, nor does the client: the tunnel
    is closed about a second later, toward both."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101 + b"bye")
        sc.sock.shutdown(socket.SHUT_WR)
        started = time.monotonic()
        kind = stream_ended(sc.sock, 8)
        return kind, time.monotonic() - started

    rig = make_rig(mode, script, "--tunnel-idle-timeout", "1")
    client = rig.open()
    assert client.read_to_eof() == (3, sha256(b"bye"))
    started = time.monotonic()
    # the client's receiving side ended; its sending side is closed by the proxy: a write
    # fails or a wait for the proxy's reset/close ends
    kind, waited = rig.backend.result(10)
    assert kind in ("eof", "reset", "close_notify", "error"), kind
    assert 0.5 <= waited <= 4, f"cut after {waited:.2f} s with --tunnel-idle-timeout 1"
    rig.proxy.wait_for_log(r"idle for 1s")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("mode", ["tls-client", "tls-backend", "tls-both"])
def test_idle_timeout_cuts_a_silent_tls_tunnel(make_rig, mode):
    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        return stream_ended(sc.sock, 8)

    rig = make_rig(mode, script, "--tunnel-idle-timeout", "1")
    client = rig.open()
    started = time.monotonic()
    kind = stream_ended(client.stream, 8)
    waited = time.monotonic() - started
    assert kind in ("eof", "reset", "close_notify", "error"), kind
    assert 0.5 <= waited <= 4, f"cut after {waited:.2f} s with --tunnel-idle-timeout 1"
    assert rig.backend.result(10) in ("eof", "reset", "close_notify", "error")


# --- the heads around the switch ------------------------------------------------------------

HEAD_MODES = ["plain", "copy", "tls-both"]


def echo_after(sc: ScriptedConn) -> str:
    """Echo every byte (the script's extra bytes first) until the client's end."""
    if sc.extra:
        sc.sock.sendall(bytes(sc.extra))
        sc.extra.clear()
    while data := sc.sock.recv(65536):
        sc.sock.sendall(data)
    sc.sock.shutdown(socket.SHUT_WR)
    return "eof"


@pytest.mark.parametrize("mode", HEAD_MODES)
def test_101_head_in_pieces_then_data(make_rig, mode):
    """The backend writes its 101 head in three pieces (the head split across segments and
    reads), the last with data behind it: the client gets the 101, then the data, then the
    tunnel echoes."""
    pieces = [RESPONSE_101[:9], RESPONSE_101[9:40], RESPONSE_101[40:] + b"right behind"]

    def script(sc: ScriptedConn):
        for part in pieces:
            sc.sock.sendall(part)
            time.sleep(0.05)  # the segments' pace
        return echo_after(sc)

    rig = make_rig(mode, script)
    client = rig.open()
    assert client.recv_exact(12) == b"right behind"
    client.stream.sendall(b"echo me")
    assert client.recv_exact(7) == b"echo me"
    client.stream.shutdown(socket.SHUT_WR)
    assert client.read_to_eof() == (0, sha256(b""))
    assert rig.backend.result(10) == "eof"


@pytest.mark.parametrize("mode", HEAD_MODES)
def test_informational_answer_before_the_101(make_rig, mode):
    """A 103 Early Hints, then the 101 and data, all in one send: the tunnel starts at the 101
    and the data follows it unchanged."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            + RESPONSE_101
            + b"after the switch"
        )
        return echo_after(sc)

    rig = make_rig(mode, script)
    stream = rig.connect()
    stream.sendall(tunnel_request())
    buf = bytearray()
    head = recv_until(stream, buf, b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 103 "):
        head = recv_until(stream, buf, b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.1 101 ", head), head
    client = Client(stream, buf)
    assert client.recv_exact(16) == b"after the switch"
    stream.sendall(b"ping")
    assert client.recv_exact(4) == b"ping"
    stream.shutdown(socket.SHUT_WR)
    assert client.read_to_eof() == (0, sha256(b""))


@pytest.mark.parametrize("mode", HEAD_MODES)
def test_upgrade_request_with_a_body_then_tunnel_bytes(make_rig, mode):
    """An upgrade request with a 5-byte body (Content-Length), tunnel bytes right behind it in
    the same write: the backend gets the body, answers 101, and then gets the tunnel bytes."""
    request = (
        b"POST /tunnel HTTP/1.1\r\nHost: tunnel.test\r\nConnection: Upgrade\r\n"
        b"Upgrade: rawtest\r\nContent-Length: 5\r\n\r\nhello"
    )

    def script(sc: ScriptedConn):
        body = sc.recv_exact(5)
        sc.sock.sendall(RESPONSE_101)
        rest = sc.recv_exact(len(b"TUNNEL-BYTES"))
        sc.sock.sendall(rest[::-1])
        return body, rest, sc.read_to_eof()

    rig = make_rig(mode, script)
    stream = rig.connect()
    stream.sendall(request + b"TUNNEL-BYTES")
    client = rig.read_101(stream)
    assert client.recv_exact(12) == b"SETYB-LENNUT"
    stream.shutdown(socket.SHUT_WR)
    assert rig.backend.result(10) == (b"hello", b"TUNNEL-BYTES", (0, sha256(b"")))


@pytest.mark.parametrize("mode", HEAD_MODES)
def test_upgrade_pipelined_behind_a_get(make_rig, mode):
    """GET /first, then the upgrade request, then tunnel bytes, all in one write: the client
    gets the answer to the GET, then the 101, and the tunnel bytes reach the backend after
    the upgrade request (on whichever backend connection it went)."""

    def script(sc: ScriptedConn):
        head, buf = sc.head, sc.extra
        while b"Upgrade: rawtest" not in head:
            sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
            try:
                head = recv_until(sc.sock, buf, b"\r\n\r\n")
            except EOFError:
                return "no upgrade here"
        sc.sock.sendall(RESPONSE_101)
        got = recv_exact(sc.sock, 12, buf)
        sc.sock.sendall(got[::-1])
        return got

    rig = make_rig(mode, script)
    stream = rig.connect()
    first = b"GET /first HTTP/1.1\r\nHost: tunnel.test\r\n\r\n"
    stream.sendall(first + tunnel_request() + b"TUNNEL-BYTES")
    buf = bytearray()
    head = recv_until(stream, buf, b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert recv_exact(stream, 5, buf) == b"first"
    client = Client(stream, buf)
    head = recv_until(stream, buf, b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.1 101 ", head), head
    assert client.recv_exact(12) == b"SETYB-LENNUT"
    results = [rig.backend.result(10)]
    assert b"TUNNEL-BYTES" in results


@pytest.mark.parametrize("mode", HEAD_MODES)
def test_http_timeouts_do_not_reach_into_a_tunnel(make_rig, mode):
    """--header-timeout, --response-timeout and --idle-timeout of 1 s (and no
    --tunnel-idle-timeout): a tunnel silent for 2.5 s is still open, and still moves bytes."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        return echo_after(sc)

    rig = make_rig(
        mode,
        script,
        "--header-timeout",
        "1",
        "--response-timeout",
        "1",
        "--idle-timeout",
        "1",
    )
    client = rig.open()
    readable, _, _ = select.select([raw_socket(client.stream)], [], [], 2.5)
    assert not readable, "the proxy ended (or wrote to) a silent tunnel"
    client.stream.sendall(b"still here")
    assert client.recv_exact(10) == b"still here"
    client.stream.shutdown(socket.SHUT_WR)
    assert client.read_to_eof() == (0, sha256(b""))


# --- resets after a half-close --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_backend_reset_after_its_half_close_resets_client(make_rig, background, mode):
    """The backend ends its direction, the client goes on streaming into it, then the backend
    resets: the client's leg is ended within a few seconds (its sends fail)."""
    data = bulk_data(71)

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101 + b"done")
        sc.sock.shutdown(socket.SHUT_WR)
        sc.recv_exact(MiB)
        reset_close(raw_socket(sc.sock))
        return "reset"

    rig = make_rig(mode, script)
    client = rig.open()
    assert client.read_to_eof() == (4, sha256(b"done"))
    mark = rig.proxy.mark()
    sender, failed = stream_until_refused(background, client.stream, data)
    assert rig.backend.result(15) == "reset"
    sender.join(15)
    assert failed, "the client could send 120 MiB into a tunnel whose backend reset"
    rig.proxy.wait_for_log(r'ended="backend reset"', since=mark)


@pytest.mark.parametrize("mode", MODES)
def test_client_reset_after_its_half_close_reaches_a_silent_backend(make_rig, mode):
    """The client ends its direction and then resets while the backend, having read the end,
    neither reads nor writes: the backend's leg is reset within a few seconds."""
    ended = threading.Event()

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        assert sc.read_to_eof() == (5, sha256(b"hello"))
        ended.set()
        raw = raw_socket(sc.sock)
        poller = select.poll()
        poller.register(raw, select.POLLHUP | select.POLLERR)
        started = time.monotonic()
        got = poller.poll(8000)
        return bool(got), time.monotonic() - started

    rig = make_rig(mode, script)
    client = rig.open()
    end_with_last_data(client.stream, b"hello")
    assert ended.wait(10)
    reset_close(raw_socket(client.stream))
    seen, waited = rig.backend.result(15)
    assert seen, "the backend's leg was still open 8 s after the client's reset"
    assert waited < 3, f"the backend's leg ended {waited:.1f} s after the client's reset"


@pytest.mark.parametrize("mode", MODES)
def test_client_reset_after_the_backend_half_closed_reaches_a_silent_backend(make_rig, mode):
    """The backend ends its direction and waits without reading; the client, having read the
    end, resets: the backend's leg is reset within a few seconds."""
    watching = threading.Event()

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101 + b"bye")
        sc.sock.shutdown(socket.SHUT_WR)
        raw = raw_socket(sc.sock)
        poller = select.poll()
        poller.register(raw, select.POLLHUP | select.POLLERR | select.POLLRDHUP)
        watching.set()
        started = time.monotonic()
        got = poller.poll(8000)
        return bool(got), time.monotonic() - started

    rig = make_rig(mode, script)
    client = rig.open()
    assert client.read_to_eof() == (3, sha256(b"bye"))
    assert watching.wait(10)
    reset_close(raw_socket(client.stream))
    seen, waited = rig.backend.result(15)
    assert seen, "the backend's leg was still open 8 s after the client's reset"
    assert waited < 3, f"the backend's leg ended {waited:.1f} s after the client's reset"


# --- many tunnels ending every way ----------------------------------------------------------

ENDINGS = ["normal", "client-reset", "backend-reset", "backend-first"]


@pytest.mark.parametrize("mode", ["plain", "copy", "tls-both"])
def test_many_tunnels_ending_every_way_leave_nothing_behind(make_rig, mode):
    """160 tunnels open at once, then each ends one way: both sides ending in order, the
    client resetting, the backend resetting, the backend ending first. Each normal one carries
    its bytes intact; afterwards /metrics counts no open tunnel or connection and the proxy
    holds no more sockets than before."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        line = recv_until(sc.sock, sc.extra, b"\n")
        index, ending = line.decode().strip().split(":")
        if ending == "client-reset":
            return index, stream_ended(sc.sock, 10)
        if ending == "backend-reset":
            reset_close(raw_socket(sc.sock))
            return index, "reset"
        if ending == "backend-first":
            sc.sock.sendall(index.encode() * 1000)
            sc.sock.shutdown(socket.SHUT_WR)
            return index, sc.read_to_eof()
        got = sc.read_to_eof()
        sc.sock.sendall(f"{got[0]} {got[1]}".encode())
        sc.sock.shutdown(socket.SHUT_WR)
        return index, got

    rig = make_rig(mode, script, "--admin-listen", "127.0.0.1:0")
    assert rig.proxy.admin_port is not None
    before = proxy_socket_count(rig.proxy.pid)
    count = 160
    clients = []
    for i in range(count):
        stream = rig.connect(timeout=20)
        stream.sendall(tunnel_request() + f"{i}:{ENDINGS[i % 4]}\n".encode())
        clients.append(stream)
    clients = [rig.read_101(stream) for stream in clients]
    payload = {i: random.Random(i).randbytes(i * 97) for i in range(count)}
    for i, c in enumerate(clients):
        ending = ENDINGS[i % 4]
        if ending == "normal":
            c.stream.sendall(payload[i])
            c.stream.shutdown(socket.SHUT_WR)
        elif ending == "client-reset":
            reset_close(raw_socket(c.stream))
    for i, c in enumerate(clients):
        ending = ENDINGS[i % 4]
        if ending == "normal":
            n, digest = len(payload[i]), sha256(payload[i])
            assert c.read_to_eof() == (len(f"{n} {digest}"), sha256(f"{n} {digest}".encode()))
        elif ending == "backend-reset":
            assert stream_ended(c.stream, 10) in ("eof", "reset", "error")
        elif ending == "backend-first":
            said = str(i).encode() * 1000
            assert c.read_to_eof() == (len(said), sha256(said))
            c.stream.sendall(payload[i])
            c.stream.shutdown(socket.SHUT_WR)
    results = dict(rig.backend.result(20) for _ in range(count))
    for i in range(count):
        ending = ENDINGS[i % 4]
        if ending in ("normal", "backend-first"):
            assert results[str(i)] == (len(payload[i]), sha256(payload[i])), i
        elif ending == "client-reset":
            assert results[str(i)] in ("eof", "reset", "error"), (i, results[str(i)])
    for c in clients:
        c.stream.close()
    deadline = time.monotonic() + 10
    while True:
        m = Metrics(rig.proxy.admin_port)
        open_now = (m("rawproxy_tunnels_open"), m("rawproxy_connections_open"))
        if open_now == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling the proxy's own count
    assert open_now == (0, 0)
    assert m("rawproxy_tunnels_total") == count
    # the admin connection of the last scrape may still be closing
    assert proxy_socket_count(rig.proxy.pid) <= before + 1


# --- bulk on several tunnels at once, with few pipes -----------------------------------------


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_concurrent_bulk_tunnels_with_few_pipes(
    make_backend, run_proxy, sockets, background, splice
):
    """8 tunnels at once, each moving 2 MiB of random-sized writes both ways, through a proxy
    whose descriptor limit (74, --max-connections 16) leaves room for 4 splice pipes: the 16
    directions that want one share them or fall back to copying, and every stream arrives
    whole at both ends."""
    count = 8
    total = 2 * MiB

    def script(sc: ScriptedConn):
        sc.sock.sendall(RESPONSE_101)
        index = int(recv_until(sc.sock, sc.extra, b"\n").decode())
        down = random.Random(1000 + index).randbytes(total)
        sender = threading.Thread(target=chatter, args=(sc.sock, down, index), daemon=True)
        sender.start()
        try:
            return index, jittery_read(sc.sock, sc.extra, index)
        finally:
            sender.join(30)

    backend = make_backend(ScriptedBackend, script)
    flags = ["--max-connections", "16", *([] if splice else ["--no-splice"])]
    proxy = run_proxy(*proxy_args(backend.port, *flags), launcher=("prlimit", "--nofile=74:74"))
    ups = [random.Random(2000 + i).randbytes(total) for i in range(count)]
    streams = []
    for i in range(count):
        stream = connect(proxy.port, 20)
        sockets.append(stream)
        stream.sendall(tunnel_request() + f"{i}\n".encode())
        streams.append(stream)
    readers = []
    for i, stream in enumerate(streams):
        background(chatter, stream, ups[i], 3000 + i)
        buf = bytearray()
        head = recv_until(stream, buf, b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.1 101 ", head), head
        readers.append(background(jittery_read, stream, buf, 4000 + i))
    for i, reader in enumerate(readers):
        down = random.Random(1000 + i).randbytes(total)
        assert reader.join(30) == (total, sha256(down)), i
    results = dict(backend.result(30) for _ in range(count))
    assert results == {i: (total, sha256(ups[i])) for i in range(count)}


SWITCH_HEADS = {
    "crlf": RESPONSE_101,
    "bare-lf": b"HTTP/1.1 101 Switching Protocols\nConnection: Upgrade\nUpgrade: rawtest\n\n",
    "content-length": (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: rawtest\r\n"
        b"Content-Length: 5\r\n\r\n"
    ),
    "empty-reason": b"HTTP/1.1 101 \r\nconnection: upgrade\r\nupgrade: rawtest\r\n\r\n",
}
# Tunnel bytes that look like the end of a head, or like another response.
AFTER_SWITCH = b"0123456789\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc\n\n-end"


@pytest.mark.parametrize("head", list(SWITCH_HEADS))
@pytest.mark.parametrize("mode", HEAD_MODES)
def test_bytes_behind_unusual_101_heads_are_tunnel_bytes(make_rig, mode, head):
    """Whatever the 101 head looks like (bare LF line ends, a Content-Length, no reason,
    lower-case names), every byte after it, in the same send, is tunnel data, passed on
    exactly: none taken as a body, a head's end or another response."""

    def script(sc: ScriptedConn):
        sc.sock.sendall(SWITCH_HEADS[head] + AFTER_SWITCH)
        return echo_after(sc)

    rig = make_rig(mode, script)
    client = rig.open()
    assert client.recv_exact(len(AFTER_SWITCH)) == AFTER_SWITCH
    client.stream.sendall(b"and back")
    assert client.recv_exact(8) == b"and back"
    client.stream.shutdown(socket.SHUT_WR)
    assert client.read_to_eof() == (0, sha256(b""))
    assert rig.backend.result(10) == "eof"


# --- a peer's close_notify read together with our own ----------------------------------------


def tls_pair(pki: Pki, sockets: list[Any]) -> tuple[TlsStream, Any]:
    """A TLS connection over real loopback TCP: the peer (a TlsStream, blocking) and the
    proxy's end of it (rawproxy's TlsSocket, non-blocking, as a tunnel holds it)."""
    from rawproxy.transport import TlsSocket

    listener = socket.create_server(("127.0.0.1", 0))
    sockets.append(listener)
    raw_peer = socket.create_connection(listener.getsockname(), timeout=10)
    raw_ours, _ = listener.accept()
    sockets.extend((raw_peer, raw_ours))
    raw_ours.setblocking(False)
    peer = TlsStream(raw_peer, pki.client_context(), server_hostname="localhost")
    ours = TlsSocket(raw_ours, pki.server_context(), None)
    handshake = threading.Thread(target=peer.handshake, daemon=True)
    handshake.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            ours.do_handshake()
            break
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            assert time.monotonic() < deadline, "no TLS handshake"
            select.select([raw_ours], [], [], 0.05)
    handshake.join(10)
    return peer, ours


@pytest.mark.parametrize(
    "peer_end",
    [
        "close_notify",
        "close_notify+fin",
    ],
)
def test_tls_peer_end_read_before_our_close_notify_is_still_reported(pki, sockets, peer_end):
    """What a tunnel does to a TLS leg when the other direction ends first: it reads part of
    what the peer sent (a full read buffer; the rest, the peer's close_notify included, waits
    inside the TLS object), then sends its own close_notify on that leg (`_finish`), then goes
    on reading it. The reads must give the rest of the bytes and then the end of stream (0),
    whether or not a FIN followed the peer's close_notify."""
    from rawproxy.transport import receive_into, send_close_notify

    peer, ours = tls_pair(pki, sockets)
    data = random.Random(81).randbytes(3000)
    peer.sendall(data)
    if peer_end == "close_notify":
        peer.close_notify()  # the TCP connection stays open
    else:
        peer.shutdown(socket.SHUT_WR)
    assert select.select([ours.raw], [], [], 5)[0]
    time.sleep(0.05)  # the records (and the FIN) settle in the kernel's receive queue
    got = bytearray()
    view = memoryview(bytearray(1000))  # a read buffer the data overfills
    n = receive_into(ours, view)
    got += view[:n]
    assert 0 < n < len(data)
    assert send_close_notify(ours)  # the other direction of the tunnel has ended
    ends = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        n = receive_into(ours, view)
        if n == 0:
            ends.append("end")
            break
        if n > 0:
            got += view[:n]
        else:
            select.select([ours.raw], [], [], 0.1)
    assert bytes(got) == data
    assert ends == ["end"], "the peer's close_notify was read but its end never reported"
