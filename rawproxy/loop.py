"""The event loop: one epoll set, one timer heap, signal wake-ups, nothing else.

Every file descriptor is registered with a callback taking the ready mask (READ, WRITE). The
loop owns one shared read buffer that every reader uses for `recv_into`: bytes leave it before
the next callback runs, so no connection holds a buffer of its own while it is idle.

It drives `select.epoll` itself rather than through `selectors.EpollSelector`, which is the
same system calls plus a SelectorKey (a namedtuple, rebuilt on every modify) per registration
and a translation of every event. Without them, and with closed sockets leaving the epoll set
by themselves (`forget`), `benchmarks/inprocess.py` measured a WebSocket handshake about 8 %
cheaper and a kept-alive request about 3 %. rawproxy is Linux-only anyway (splice,
TCP_NOTSENT_LOWAT, systemd).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

log = logging.getLogger("rawproxy")

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
# Reported whatever the interest: the owner sees both READ and WRITE and finds the error (or
# the end) in its next read or write, as with selectors.
ERROR = select.EPOLLERR | select.EPOLLHUP
BOTH = READ | WRITE

READ_BUFFER_SIZE = 256 * 1024
# The timer heap is first checked for cancelled entries at this size.
PRUNE_MIN = 1024
# The longest single wait in epoll. A timer further away (--idle-timeout 720h: durations are
# not bounded) is reached in several waits: epoll_wait takes at most INT_MAX milliseconds
# (24.8 days), and a longer timeout is an OverflowError that stopped the whole proxy.
MAX_WAIT = 3600.0

Callback = Callable[[int], None]


class Timer:
    """A pending call; `cancel()` is idempotent and O(1) (the heap entry is dropped lazily)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        # A cancelled timer may wait in the heap until its time: it must not keep its owner
        # (a closed connection, its sockets and buffers) alive until then.
        self.callback = _nothing


def _nothing() -> None:
    """What a cancelled timer would call (it is never called)."""


class Loop:
    def __init__(self) -> None:
        self.epoll = select.epoll()
        # fd -> the callback and the interest registered now.
        self.callbacks: dict[int, Callback] = {}
        self.interest: dict[int, int] = {}
        # The fds whose owner changed since the last poll (removed, closed, or rebound to
        # another callback): their events in the current round belong to the old owner.
        self._stale: set[int] = set()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        # The heap size at which _run_timers next looks for cancelled entries to drop.
        self._prune_at = PRUNE_MIN
        self.running = False
        self.read_buffer = bytearray(READ_BUFFER_SIZE)
        self.read_view = memoryview(self.read_buffer)
        self.now = time.monotonic()
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None

    # -- file descriptors -------------------------------------------------------------------

    def add(self, fd: int, events: int, callback: Callback) -> None:
        self.epoll.register(fd, events)
        self.callbacks[fd] = callback
        self.interest[fd] = events

    def modify(self, fd: int, events: int, callback: Callback) -> None:
        """Change the interest or the callback (or both); a system call only for the first."""
        if self.interest[fd] != events:
            self.epoll.modify(fd, events)
            self.interest[fd] = events
        if self.callbacks[fd] is not callback:
            self.callbacks[fd] = callback
            self._stale.add(fd)

    def remove(self, fd: int) -> None:
        """Unregister an fd that stays open (or may be shared with another process)."""
        self.epoll.unregister(fd)
        self.forget(fd)

    def forget(self, fd: int) -> None:
        """Drop the registration of an fd that its owner closes right after, without a system
        call: closing the last reference to a file description takes it out of the epoll set.
        Only for sockets the proxy opened or accepted itself and never shares (no dup, no fork
        while it is open): a shared description would stay registered under this number."""
        del self.callbacks[fd]
        del self.interest[fd]
        self._stale.add(fd)

    # -- timers ----------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def _run_timers(self) -> None:
        now = self.now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            timer.cancelled = True
            self._guarded(timer.callback)
        # Cancelled timers are normally popped when due; when many are cancelled early (every
        # finished request cancels one) rebuild the heap so it does not grow with traffic.
        # Looked at only when the heap has doubled since the last look: with thousands of live
        # timers (idle connections) a look on every turn would cost the whole heap each time.
        if len(timers) > self._prune_at:
            live = [entry for entry in timers if not entry[2].cancelled]
            if len(live) < len(timers) // 2:
                heapq.heapify(live)
                self._timers = live
            self._prune_at = max(PRUNE_MIN, 2 * len(live))

    def _next_timeout(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if not timers:
            return None
        return min(MAX_WAIT, max(0.0, timers[0][0] - time.monotonic()))

    # -- signals ---------------------------------------------------------------------------

    def add_signal_handler(self, signum: int, handler: Callable[[int], None]) -> None:
        """Run `handler(signum)` from the loop (not from the signal handler) when it arrives."""
        if self._wakeup_r is None:
            self._wakeup_r, self._wakeup_w = socket.socketpair()
            self._wakeup_r.setblocking(False)
            self._wakeup_w.setblocking(False)
            signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
            self.add(self._wakeup_r.fileno(), READ, self._on_wakeup)
        self._signal_handlers[signum] = handler
        signal.signal(signum, lambda _signum, _frame: None)

    def _on_wakeup(self, _mask: int) -> None:
        assert self._wakeup_r is not None
        try:
            data = self._wakeup_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # -- running ---------------------------------------------------------------------------

    def _guarded(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            _abort_owner(callback)

    def run(self) -> None:
        self.running = True
        while self.running:
            self.run_once(self._next_timeout())

    def run_once(self, timeout: float | None) -> None:
        """Wait up to `timeout` seconds (None: until something happens), run the callbacks of
        the ready fds, then the timers that are due."""
        stale = self._stale
        stale.clear()
        events = self.epoll.poll(-1 if timeout is None else timeout)
        self.now = time.monotonic()
        callbacks = self.callbacks
        for fd, mask in events:
            # An earlier callback of this round may have closed this fd, and even opened a new
            # socket that got the same number, or handed the socket to a new owner: the event
            # belongs to the old owner. Level-triggered, the next poll reports what is still
            # true for the new one.
            if fd in stale:
                continue
            callback = callbacks.get(fd)
            if callback is None:
                # Registered without an owner: forget() on a descriptor that stayed open.
                # Unregister it, or level-triggered epoll would report it on every round.
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)
                continue
            if mask & ERROR:
                mask |= BOTH
            try:
                callback(mask)
            except Exception:
                _abort_owner(callback)
        if self._timers:
            self._run_timers()

    def stop(self) -> None:
        self.running = False

    def forget_in_child(self) -> None:
        """In a forked child: drop the parent's loop (selector, signal wake-up) so that the
        child builds its own. Nothing here touches the parent's copies."""
        if self._wakeup_r is not None:
            signal.set_wakeup_fd(-1)
            for signum in self._signal_handlers:
                signal.signal(signum, signal.SIG_DFL)
            self._wakeup_r.close()
            assert self._wakeup_w is not None
            self._wakeup_w.close()
            self._wakeup_r = self._wakeup_w = None
        self._signal_handlers.clear()
        self.epoll.close()

    def close(self) -> None:
        if self._wakeup_r is not None:
            signal.set_wakeup_fd(-1)
            self.remove(self._wakeup_r.fileno())
            self._wakeup_r.close()
            assert self._wakeup_w is not None
            self._wakeup_w.close()
        self.epoll.close()


# Young-generation collections after this many net allocations (CPython's default is 700).
# Nothing on the hot paths makes reference cycles (tests/test_no_cycles.py), so collections
# find nothing to free there; at the default they ran about every 30 WebSocket handshakes.
GC_THRESHOLD = (5000, 20, 20)


def settle_gc() -> None:
    """Before serving: collect once, move what start-up made (modules, settings, contexts) to
    the permanent generation so that no collection walks it again (gc.freeze), and collect
    the young generation less often. Measured under 50 handshakes in flight: the collector's
    time went from about 5 % of the proxy's to under 0.5 %, the full collections (10 ms
    each) from 7 in 5 s to none."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _abort_owner(callback: Callable[..., None]) -> None:
    """A bug in one connection's handling must not take the proxy down with it: log it with its
    traceback (nothing is hidden) and abort the object whose method raised."""
    log.exception("internal error; closing the affected connection")
    abort = getattr(getattr(callback, "__self__", None), "abort", None)
    if abort is not None:
        try:
            abort()
        except Exception:
            log.exception("internal error while closing a connection")


def close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
