"""The event loop's timer heap, and the batch that sets keepalive on long-lived tunnels."""

from __future__ import annotations

import socket
import time
import weakref
from collections.abc import Iterator

import pytest

from rawproxy import loop as loop_module
from rawproxy.loop import Loop, Timer
from rawproxy.tunnel import LaterKeepalive

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


def test_timers_fire_in_deadline_order_and_cancelled_ones_never(loop: Loop) -> None:
    fired: list[str] = []
    loop.call_later(0.03, lambda: fired.append("c"))
    loop.call_later(0.01, lambda: fired.append("a"))
    loop.call_later(0.02, lambda: fired.append("b"))
    loop.call_later(0.015, lambda: fired.append("cancelled")).cancel()
    time.sleep(0.05)
    loop._run_timers()
    assert fired == ["a", "b", "c"]


def test_cancelled_timers_do_not_pile_up(loop: Loop) -> None:
    """Every request cancels a timer long before it is due: the heap must not grow with
    traffic."""
    keep = [loop.call_later(3600, lambda: None) for _ in range(10)]
    for _ in range(50):
        for timer in [loop.call_later(3600, lambda: None) for _ in range(1000)]:
            timer.cancel()
        loop._run_timers()
        assert len(loop._timers) <= 2 * loop_module.PRUNE_MIN + 1000
    assert not any(t.cancelled for t in keep)


def test_many_live_timers_are_not_scanned_on_every_turn(
    loop: Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of idle connections each hold a live timer; a loop turn must not cost a pass
    over all of them (it did: every turn rebuilt a list of the heap once it passed 1024)."""
    looks = 0

    class CountingTimer(Timer):
        __slots__ = ("_cancelled",)

        @property  # type: ignore[override]
        def cancelled(self) -> bool:
            nonlocal looks
            looks += 1
            return self._cancelled

        @cancelled.setter
        def cancelled(self, value: bool) -> None:
            self._cancelled = value

    monkeypatch.setattr(loop_module, "Timer", CountingTimer)
    for _ in range(5000):
        loop.call_later(3600, lambda: None)
    loop._run_timers()  # may look once at all of them
    looks = 0
    for _ in range(200):
        loop._run_timers()
    assert looks < 1000, f"200 turns looked at timers {looks} times"


def tcp_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    return listener, a, b


def keepalive_on(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0


def test_later_keepalive_sets_it_on_sockets_that_stay_open(loop: Loop) -> None:
    """Driven by hand (loop.now set, the batch run directly): no sleeping, no timing luck."""
    listener, early, peer = tcp_pair()
    listener2, late, peer2 = tcp_pair()
    gone = socket.socket()
    batch = LaterKeepalive(loop, delay=10)
    try:
        loop.now = 1000.0
        batch.add(early, 30)
        timer = batch.timer
        assert timer is not None
        batch.add(gone, 30)
        assert batch.timer is timer  # one timer for the batch, not one per socket
        gone.close()  # closed before its time: skipped, no error
        loop.now = 1005.0
        batch.add(late, 30)
        loop.now = 1009.9
        batch._run()
        assert not keepalive_on(early)  # not before its 10 s
        assert batch.timer is not None
        loop.now = 1010.0
        batch._run()
        assert keepalive_on(early)
        assert early.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert early.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert early.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert not keepalive_on(late)  # its turn is at 1015
        assert batch.timer is not None  # and a timer waits for it
        loop.now = 1015.0
        batch._run()
        assert keepalive_on(late)
        assert batch.timer is None
        assert not batch.waiting
    finally:
        batch.close()
        for s in (listener, early, peer, listener2, late, peer2):
            s.close()


def test_a_cancelled_timer_lets_go_of_its_callback(loop: Loop) -> None:
    """A cancelled timer waits in the heap until its time (an hour, for an idle timeout): it
    must not keep what it would have called, a closed connection with its buffers, alive."""

    class Owner:
        def fire(self) -> None:
            raise AssertionError("a cancelled timer fired")

    owner = Owner()
    gone = weakref.ref(owner)
    loop.call_later(3600, owner.fire).cancel()
    del owner
    assert gone() is None
