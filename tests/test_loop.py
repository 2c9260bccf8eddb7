"""The event loop: its events and registrations, its timer heap, and the batch that sets
keepalive on long-lived tunnels."""

from __future__ import annotations

import os
import socket
import time
import weakref
from collections.abc import Iterator

import pytest

from rawproxy import loop as loop_module
from rawproxy.loop import READ, WRITE, Loop, Timer
from rawproxy.tunnel import LaterKeepalive

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


def _readable_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.send(b"x")
    return a, b


def test_an_event_of_a_closed_fd_never_reaches_the_socket_that_reuses_its_number(
    loop: Loop,
) -> None:
    """Two fds ready in one round: the first callback closes the other and opens a socket that
    gets the freed number. The round's event for that number was the old socket's."""
    first, first_peer = _readable_pair()
    second, second_peer = _readable_pair()
    calls: list[str] = []
    opened: list[socket.socket] = []

    def on_ready(name: str, mine: socket.socket, other: socket.socket) -> None:
        calls.append(name)
        mine.recv(1)
        if len(calls) > 1:
            return
        number = other.fileno()
        loop.forget(number)
        other.close()
        new, new_peer = socket.socketpair()  # nothing to read on it
        opened.extend((new, new_peer))
        assert new.fileno() == number, "the kernel gives out the lowest free fd"
        loop.add(number, READ, lambda _mask: calls.append("new owner"))

    loop.add(first.fileno(), READ, lambda _m: on_ready("first", first, second))
    loop.add(second.fileno(), READ, lambda _m: on_ready("second", second, first))
    loop.run_once(1.0)
    loop.run_once(0.05)
    assert calls in (["first"], ["second"])
    for s in (first, second, first_peer, second_peer, *opened):
        s.close()


def test_a_socket_handed_to_a_new_callback_gets_its_events_from_the_next_round(
    loop: Loop,
) -> None:
    a, a_peer = _readable_pair()
    b, b_peer = _readable_pair()
    calls: list[str] = []

    def new_owner(_mask: int) -> None:
        calls.append("new")
        a.recv(1)
        loop.remove(a.fileno())

    def on_b(_mask: int) -> None:
        calls.append("b")
        b.recv(1)
        loop.remove(b.fileno())
        loop.modify(a.fileno(), READ, new_owner)  # a hand-over, as session -> tunnel

    def on_a(_mask: int) -> None:
        calls.append("a")
        a.recv(1)
        loop.remove(a.fileno())
        loop.modify(b.fileno(), READ, new_owner)

    loop.add(a.fileno(), READ, on_a)
    loop.add(b.fileno(), READ, on_b)
    loop.run_once(1.0)
    assert len(calls) == 1, "the handed-over fd's event of the same round was held back"
    loop.run_once(1.0)
    assert calls[1] == "new"
    for s in (a, a_peer, b, b_peer):
        s.close()


def test_forget_needs_no_unregister_when_the_fd_is_closed(loop: Loop) -> None:
    a, a_peer = _readable_pair()
    number = a.fileno()
    loop.add(number, READ, lambda _mask: None)
    loop.forget(number)
    a.close()  # the kernel takes the closed description out of the epoll set
    c, c_peer = _readable_pair()
    assert c.fileno() == number
    got: list[int] = []
    loop.add(number, READ, got.append)  # no "already registered"
    loop.run_once(1.0)
    assert got
    assert got[0] & READ
    for s in (a_peer, c, c_peer):
        s.close()


def test_a_forgotten_fd_that_stayed_open_is_unregistered_not_polled_forever(loop: Loop) -> None:
    a, a_peer = _readable_pair()
    got: list[int] = []
    loop.add(a.fileno(), READ, got.append)
    loop.forget(a.fileno())  # a misuse: the socket is not closed
    loop.run_once(0.5)
    assert got == []
    assert loop.epoll.poll(0) == [], "the readable fd is still in the epoll set"
    for s in (a, a_peer):
        s.close()


def test_a_hang_up_alone_reaches_a_reader_as_read_and_write(loop: Loop) -> None:
    """An empty pipe whose writer closed reports EPOLLHUP without EPOLLIN: an owner that only
    looks at READ must still be called with it, or it would never read the end (and the loop
    would spin on the level-triggered hang-up)."""
    r, w = os.pipe()
    os.close(w)
    got: list[int] = []
    loop.add(r, READ, got.append)
    loop.run_once(1.0)
    loop.remove(r)
    os.close(r)
    assert got
    assert got[0] & READ
    assert got[0] & WRITE


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
