"""How a connection leg closes: with an orderly end (FIN) when the peer got everything it was
sent, with a reset when bytes are left undelivered, so that the peer never takes a cut answer
for a whole one. A real Leg on a real Loop, between TCP sockets on loopback, in this process."""

from __future__ import annotations

import socket

import pytest
from peers import wait_closed

from rawproxy.loop import Loop
from rawproxy.transport import Leg

pytestmark = pytest.mark.timeout(30)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    ours.setblocking(False)
    return ours, peer


def ignore(_mask: int) -> None:
    pass


def test_a_leg_closed_after_everything_was_taken_ends_in_order() -> None:
    ours, peer = tcp_pair()
    with peer:
        leg = Leg(Loop(), ours, ignore)
        leg.queue((b"the whole answer",))
        leg.close()
        assert wait_closed(peer, 5) == ("eof", b"the whole answer")


def test_a_leg_closed_with_bytes_left_resets_the_peer() -> None:
    """The peer reads nothing while we send until the kernel takes no more: the rest waits in
    the leg's backlog. Closed then (a timeout, the proxy stopping), the peer gets what reached
    it and then a reset, not an orderly end after fewer bytes than were sent."""
    ours, peer = tcp_pair()
    with peer:
        leg = Leg(Loop(), ours, ignore)
        chunk = b"x" * (1 << 20)
        sent = 0
        for _ in range(64):
            sent += len(chunk)
            if not leg.send(chunk):
                break
        assert leg.backlog is not None, "the kernel took 64 MiB without a reader"
        leg.close()
        kind, got = wait_closed(peer, 10)
        assert len(got) < sent
        assert kind == "reset", f"an orderly end after {len(got)} of {sent} bytes"
