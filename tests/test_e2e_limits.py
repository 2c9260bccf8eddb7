"""Running out of file descriptors degrades, never spins: accepting pauses, the loop stays idle,
and service comes back as soon as descriptors are free again."""

from __future__ import annotations

import resource
import time

from peers import assert_serves, connect


def test_fd_exhaustion_pauses_accepting_without_spinning(start_proxy, http_backend, sockets):
    proxy = start_proxy(http_backend.port)
    mark = proxy.mark()
    # A small descriptor budget for the running proxy: far fewer than the clients below.
    _, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (32, hard))
    for _ in range(48):
        sockets.append(connect(proxy.port, timeout=5))
    line = proxy.wait_for_log(r"cannot accept", since=mark, timeout=5)
    assert "pausing accepts" in line
    before = proxy.cpu_seconds()
    time.sleep(1.5)
    used = proxy.cpu_seconds() - before
    assert used < 0.5, f"the proxy used {used:.2f} s of CPU in 1.5 s while out of descriptors"
    # One line about it, not one per pause.
    assert len(proxy.logs_matching(r"cannot accept", since=mark)) == 1
    for sock in sockets:
        sock.close()
    sockets.clear()
    resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (1024, hard))
    deadline = time.monotonic() + 10
    while True:
        try:
            assert_serves(proxy, http_backend)
            break
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
