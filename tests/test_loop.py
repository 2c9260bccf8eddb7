"""The event loop's timer heap."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from rawproxy import loop as loop_module
from rawproxy.loop import Loop, Timer

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
