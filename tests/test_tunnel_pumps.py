"""Which pump a tunnel direction uses: small messages are copied through the loop's buffer,
bulk goes by splice, and a direction switches back and forth without losing, duplicating or
reordering a byte. A real Tunnel on a real Loop, between TCP sockets on loopback, driven turn
by turn in this process (the end-to-end tunnel tests run both pumps through a proxy process;
this one watches the switch itself)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme

from rawproxy import tunnel as tunnel_module
from rawproxy.loop import Loop
from rawproxy.transport import TlsSocket
from rawproxy.tunnel import PipePool, Tunnel

pytestmark = pytest.mark.timeout(60)


def bare_tunnel(
    loop: Loop, pipes: PipePool, client: Any, backend: Any, splice: bool, closed: list[str]
) -> Tunnel:
    """A started tunnel with nothing read past the heads, no timeout and no keepalive;
    how it closes is appended to `closed`."""
    tunnel = Tunnel(
        loop,
        pipes,
        client,
        backend,
        b"",
        b"",
        (0, 0),
        False,
        False,
        splice=splice,
        idle_timeout=None,
        keepalive=0,
        on_close=lambda _t, how, _d: closed.append(how),
    )
    tunnel.start()
    return tunnel


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


class Rig:
    """client_peer <-> [client | Tunnel | backend] <-> backend_peer"""

    def __init__(self, splice: bool, small_backend_buffers: bool = False) -> None:
        self.loop = Loop()
        self.pipes = PipePool()
        self.client_peer, client = tcp_pair()
        backend, self.backend_peer = tcp_pair()
        if small_backend_buffers:
            # So that a backend peer that does not read stops the tunnel within a few pipes.
            self.backend_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            backend.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        for s in (client, backend, self.client_peer, self.backend_peer):
            s.setblocking(False)
        self.closed: list[str] = []
        self.tunnel = bare_tunnel(self.loop, self.pipes, client, backend, splice, self.closed)
        # The directions' pumps as seen after each turn in which bytes moved.
        self.seen: set[bool] = set()

    def turn(self) -> None:
        self.loop.run_once(0.01)
        self.seen.add(self.tunnel.c2b.bulk)

    def move(self, data: bytes, received: bytearray) -> None:
        """Send `data` from the client's peer and turn the loop until the backend's peer has
        it all, reading as it arrives (so that backpressure, not buffers, paces it)."""
        view = memoryview(data)
        want = len(received) + len(data)
        deadline = time.monotonic() + 20
        while len(received) < want:
            assert time.monotonic() < deadline, f"{len(received)} of {want} bytes arrived"
            if view:
                with contextlib.suppress(BlockingIOError):
                    view = view[self.client_peer.send(view) :]
            self.turn()
            try:
                while chunk := self.backend_peer.recv(1 << 20):
                    received += chunk
            except BlockingIOError:
                pass

    def exchange(
        self,
        up: bytes,
        down: bytes,
        got_up: bytearray,
        got_down: bytearray,
        until: float = 20.0,
        read_backend: bool = True,
    ) -> None:
        """Both peers send (`up` from the client's, `down` from the backend's) and read what
        arrives, turn after turn, until everything arrived or `until` seconds passed (then
        only if `read_backend` is off, which stops the client->backend direction)."""
        views = [memoryview(up), memoryview(down)]
        deadline = time.monotonic() + until
        while len(got_up) < len(up) or len(got_down) < len(down):
            if time.monotonic() > deadline:
                assert not read_backend, f"{len(got_up)}/{len(up)}, {len(got_down)}/{len(down)}"
                return
            for i, sock in enumerate((self.client_peer, self.backend_peer)):
                if views[i]:
                    with contextlib.suppress(BlockingIOError):
                        views[i] = views[i][sock.send(views[i]) :]
            self.turn()
            for sock, got, on in (
                (self.backend_peer, got_up, read_backend),
                (self.client_peer, got_down, True),
            ):
                with contextlib.suppress(BlockingIOError):
                    while on and (chunk := sock.recv(1 << 20)):
                        got += chunk

    def close(self) -> None:
        self.tunnel.close("test over")
        for s in (self.client_peer, self.backend_peer):
            s.close()
        self.pipes.close()
        self.loop.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(splice=True)
    yield r
    r.close()


def pattern(n: int, seed: int) -> bytes:
    block = hashlib.sha256(b"%d" % seed).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def test_small_messages_are_copied_and_bulk_is_spliced_in_order(rig: Rig) -> None:
    """Small, bulk, small, bulk, small: the direction copies, splices, copies again; every
    byte arrives once and in order."""
    sent = bytearray()
    received = bytearray()
    bulk = 3 * 1024 * 1024  # several loop buffers: the first full read switches to splice
    for step, size in enumerate([64, 100, bulk, 64, 64, 2000, bulk + 1, 64]):
        data = pattern(size, step)
        rig.move(data, received)
        sent += data
        if size < tunnel_module.BULK_BYTES:
            assert not rig.tunnel.c2b.bulk, f"step {step}: a {size}-byte message left it on splice"
    assert received == sent
    assert rig.seen == {False, True}, "the direction never switched pumps"
    assert rig.tunnel.c2b.pipe is None, "an idle direction holds no pipe"
    assert rig.closed == []


def test_a_bulk_burst_is_spliced_not_copied(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the read that fills the loop's buffer, the rest of a bulk burst goes by splice:
    the copy pump reads only a few buffers' worth of 8 MiB."""
    copied = 0
    real = tunnel_module.receive_into

    def counting(sock: socket.socket, view: memoryview) -> int:
        nonlocal copied
        n = real(sock, view)
        copied += max(n, 0)
        return n

    monkeypatch.setattr(tunnel_module, "receive_into", counting)
    received = bytearray()
    data = pattern(8 * 1024 * 1024, 7)
    rig.move(data, received)
    assert received == data
    assert copied <= len(data) // 4, f"{copied} of {len(data)} bytes went through Python"


def test_without_splice_everything_is_copied() -> None:
    """--no-splice (or a TLS leg): the direction never leaves the copy pump."""
    r = Rig(splice=False)
    try:
        received = bytearray()
        data = pattern(2 * 1024 * 1024, 3)
        r.move(data, received)
        assert received == data
        assert r.seen == {False}
    finally:
        r.close()


def test_no_pipe_for_splice_means_copying_not_a_broken_tunnel(rig: Rig) -> None:
    """Out of file descriptors, pipe2() fails with EMFILE when bulk starts: the tunnel copies
    instead (a speed-up is not worth a working connection), and every byte arrives."""
    received = bytearray()
    first = pattern(100, 5)
    rig.move(first, received)

    def no_pipe() -> tuple[int, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    rig.pipes.take = no_pipe  # type: ignore[method-assign]
    data = pattern(4 * 1024 * 1024, 6)
    rig.move(data, received)
    assert received == first + data
    assert rig.closed == []
    assert rig.tunnel.splice is False  # and it does not ask for a pipe again
    assert rig.seen == {False}


def test_a_direction_refused_splice_leaves_the_other_ones_pipe_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernel refuses splice (EINVAL) to the backend->client direction while the
    client->backend one has bytes in its pipe (its backend peer is not reading): the first
    copies from then on, the second still delivers its pipe first. Both streams arrive whole
    and in order."""
    r = Rig(splice=True, small_backend_buffers=True)
    try:
        real_splice = os.splice
        backend_fd = r.tunnel.backend_fd

        def splice(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
            if src == backend_fd:
                raise OSError(errno.EINVAL, "this socket does not splice")
            return real_splice(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(tunnel_module.os, "splice", splice)
        up, down = pattern(4 * 1024 * 1024, 1), pattern(2 * 1024 * 1024, 2)
        got_up, got_down = bytearray(), bytearray()
        # The backend peer reads by fits: the client->backend direction goes to splice and
        # is caught with bytes in its pipe, stopped by a backend peer that stopped reading.
        sent = memoryview(up)
        for _ in range(200):
            with contextlib.suppress(BlockingIOError):
                sent = sent[r.client_peer.send(sent) :]
            r.turn()
            if r.tunnel.c2b.in_pipe and not r.tunnel.c2b.backlog:
                break
            with contextlib.suppress(BlockingIOError):
                got_up += r.backend_peer.recv(32 * 1024)
        assert r.tunnel.c2b.bulk
        assert r.tunnel.c2b.in_pipe > 0, "the test needs bytes waiting in the pipe"
        r.turn()
        assert r.tunnel.c2b.in_pipe > 0, "the backend peer's buffer should be full"
        up_rest = bytes(sent)
        # The backend answers with bulk: its direction tries splice, is refused, copies.
        r.exchange(b"", down, bytearray(), got_down, until=1.0, read_backend=False)
        assert got_down == down
        assert not r.tunnel.splice
        # The backend reads again: what waited in the pipe comes first, then the rest.
        rest = memoryview(up_rest)
        deadline = time.monotonic() + 20
        while len(got_up) < len(up):
            assert time.monotonic() < deadline, f"{len(got_up)} of {len(up)} bytes arrived"
            if rest:
                with contextlib.suppress(BlockingIOError):
                    rest = rest[r.client_peer.send(rest) :]
            r.turn()
            with contextlib.suppress(BlockingIOError):
                while chunk := r.backend_peer.recv(1 << 20):
                    got_up += chunk
        assert got_up == up
        assert r.closed == []
    finally:
        r.close()


def notsent_lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)


def test_one_way_bulk_keeps_the_unsent_queue_short_bulk_both_ways_does_not(rig: Rig) -> None:
    """Bulk one way: the destination socket queues at most NOTSENT_LOWAT unsent bytes (the
    rest waits in the pipe), the other socket keeps the system's default. Bulk both ways at
    once: neither socket keeps the limit. Bulk one way again, the other way this time: the
    limit is back, on the socket that now receives the bulk. Bytes arrive whole throughout."""
    client, backend = rig.tunnel.client, rig.tunnel.backend
    assert isinstance(client, socket.socket)
    assert isinstance(backend, socket.socket)
    received = bytearray()
    data = pattern(4 * 1024 * 1024, 1)
    rig.move(data, received)
    assert received == data
    assert notsent_lowat(backend) == tunnel_module.NOTSENT_LOWAT
    assert notsent_lowat(client) == 0

    # Both ways, watched turn by turn.
    both_bulk: list[tuple[int, int]] = []
    turn = rig.turn

    def watched_turn() -> None:
        turn()
        if rig.tunnel.c2b.bulk and rig.tunnel.b2c.bulk:
            both_bulk.append((notsent_lowat(client), notsent_lowat(backend)))

    rig.turn = watched_turn  # type: ignore[method-assign]
    up, down = pattern(16 * 1024 * 1024, 2), pattern(16 * 1024 * 1024, 3)
    got_up, got_down = bytearray(), bytearray()
    rig.exchange(up, down, got_up, got_down)
    assert got_up == up
    assert got_down == down
    assert both_bulk, "the two directions never carried bulk at the same time"
    assert (0, 0) in both_bulk, f"bulk both ways, the limits stayed: {set(both_bulk)}"
    rig.turn = turn  # type: ignore[method-assign]

    # A small message each way ends both bursts; then bulk backend -> client only.
    rig.exchange(b"x", b"y", bytearray(), bytearray())
    got_down = bytearray()
    down = pattern(4 * 1024 * 1024, 4)
    rig.exchange(b"", down, bytearray(), got_down)
    assert got_down == down
    assert notsent_lowat(client) == tunnel_module.NOTSENT_LOWAT


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_traffic_both_ways_arrives_whole_and_in_order(seed: int) -> None:
    """Messages of random sizes (1 byte to 700 KiB, so both pumps and the switches between
    them run) both ways at once, each peer pausing its reads now and then (backpressure on
    either direction, with bytes in a pipe or a backlog): every byte arrives once and in
    order, and an idle tunnel ends holding no pipe."""
    rng = random.Random(seed)
    r = Rig(splice=True, small_backend_buffers=seed % 2 == 0)
    try:
        sizes = [rng.choice([1, 64, 200, 4096, 70_000, 300_000, 700_000]) for _ in range(40)]
        up = b"".join(pattern(n, 100 + i) for i, n in enumerate(sizes))
        down = b"".join(pattern(n, 200 + i) for i, n in enumerate(reversed(sizes)))
        got_up, got_down = bytearray(), bytearray()
        views = [memoryview(up), memoryview(down)]
        readers = [(r.backend_peer, got_up), (r.client_peer, got_down)]
        deadline = time.monotonic() + 40
        while len(got_up) < len(up) or len(got_down) < len(down):
            assert time.monotonic() < deadline, f"{len(got_up)}/{len(up)} {len(got_down)}"
            for i, sock in enumerate((r.client_peer, r.backend_peer)):
                if views[i]:
                    piece = views[i][: rng.choice([1, 100, 65536, 1 << 20])]
                    with contextlib.suppress(BlockingIOError):
                        views[i] = views[i][sock.send(piece) :]
            r.turn()
            for sock, got in readers:
                if rng.random() < 0.3:
                    continue  # this peer does not read this turn
                with contextlib.suppress(BlockingIOError):
                    got += sock.recv(rng.choice([100, 65536, 1 << 20]))
        assert got_up == up
        assert got_down == down
        for _ in range(3):
            r.turn()
        assert r.tunnel.c2b.pipe is None
        assert r.tunnel.b2c.pipe is None
        assert r.closed == []
    finally:
        r.close()


class FullOnce:
    """The raw socket under the tunnel's TLS client leg: its next send after `fill()` finds
    the kernel's send buffer full (EAGAIN), as a send right after one that filled it does."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.full = False

    def fill(self) -> None:
        self.full = True

    def send(self, data: bytes) -> int:
        if self.full:
            self.full = False
            raise BlockingIOError(errno.EAGAIN, "send buffer full")
        return self.sock.send(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


class TlsClientRig:
    """A tunnel whose client leg is TLS (trustme), with a TLS peer on it: `peer` and its raw
    socket `peer_raw`; the backend leg plain, its peer `backend_peer`. `wrap` may stand in
    for the raw socket under the tunnel's TLS leg."""

    def __init__(self, wrap: Callable[[socket.socket], object] = lambda s: s) -> None:
        ca = trustme.CA()
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("client-leg.test").configure_cert(server_context)
        client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(client_context)
        self.loop, self.pipes = Loop(), PipePool()
        self.peer_raw, leg_raw = tcp_pair()
        backend, self.backend_peer = tcp_pair()
        for s in (self.peer_raw, leg_raw, backend, self.backend_peer):
            s.setblocking(False)
        self.peer = TlsSocket(self.peer_raw, client_context, "client-leg.test")
        leg = TlsSocket(wrap(leg_raw), server_context, None)  # type: ignore[arg-type]
        done = [False, False]
        deadline = time.monotonic() + 10
        while not all(done):
            assert time.monotonic() < deadline, "TLS handshake did not finish"
            for i, side in enumerate((self.peer, leg)):
                if not done[i]:
                    with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        side.do_handshake()
                        done[i] = True
        self.closed: list[str] = []
        self.tunnel = bare_tunnel(self.loop, self.pipes, leg, backend, False, self.closed)

    def close(self) -> None:
        self.tunnel.close("test over")
        for s in (self.peer_raw, self.backend_peer):
            s.close()
        self.pipes.close()
        self.loop.close()


def test_a_close_notify_the_kernel_did_not_take_is_sent_when_writable() -> None:
    """The backend ends its direction and the client's TLS leg cannot take the close_notify
    at that moment: the alert and the FIN go once the socket is writable. (They were dropped:
    the client got every byte but never the end, while its own direction went on.)"""
    full: list[FullOnce] = []
    r = TlsClientRig(lambda s: full.append(FullOnce(s)) or full[0])
    view = memoryview(bytearray(64 * 1024))

    def read_peer(until: float, want: int = -1) -> tuple[bytes, bool]:
        """What the client's peer gets until its end of stream, `want` bytes, or `until`
        seconds; and whether the end came."""
        got = bytearray()
        deadline = time.monotonic() + until
        while time.monotonic() < deadline and len(got) != want:
            r.loop.run_once(0.01)
            while True:
                try:
                    n = r.peer.recv_into(view)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                if n == 0:
                    return bytes(got), True
                got += view[:n]
        return bytes(got), False

    try:
        r.backend_peer.sendall(b"last words")
        got, _ = read_peer(10.0, len(b"last words"))
        assert got == b"last words"
        full[0].fill()
        r.backend_peer.shutdown(socket.SHUT_WR)
        got, ended = read_peer(10.0)
        assert (got, ended) == (b"", True), "the backend's end never reached the client"
        # The client's direction still works, and ends the tunnel.
        r.peer.send(b"still here")
        r.peer.close_notify()
        r.peer_raw.shutdown(socket.SHUT_WR)
        assert read_backend_peer(r, 10.0) == (b"still here", True)
        assert r.closed == ["backend closed"]
    finally:
        r.close()


def read_backend_peer(r: TlsClientRig, until: float) -> tuple[bytes, bool]:
    """Turn the loop and read what the backend's peer gets, until its end of stream or
    `until` seconds: (the bytes, whether the end came)."""
    got = bytearray()
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        r.loop.run_once(0.01)
        with contextlib.suppress(BlockingIOError):
            while chunk := r.backend_peer.recv(1 << 16):
                got += chunk
            return bytes(got), True
    return bytes(got), False


def test_a_close_notify_read_in_the_last_round_still_ends_the_direction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client sends a message and its close_notify (no FIN: its TCP side stays open),
    and the tunnel's read that decrypts both is the last of a readiness event's rounds: the
    end of stream waits inside the TLS object, where no readiness event announces it, and is
    still carried over. (It was not: the backend got the message but never the end.)"""
    monkeypatch.setattr(tunnel_module, "ROUNDS", 1)  # a read that fills the rounds at once
    r = TlsClientRig()
    try:
        r.peer.send(b"goodbye")
        assert r.peer.close_notify()
        assert read_backend_peer(r, 10.0) == (b"goodbye", True), "the client's end was lost"
    finally:
        r.close()
