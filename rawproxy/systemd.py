"""The two systemd protocols rawproxy speaks, written out (they are a few lines each).

- Notify (sd_notify(3)): datagrams like `READY=1` to the AF_UNIX socket named by
  $NOTIFY_SOCKET (a leading `@` is the abstract namespace). Used for Type=notify start-up,
  reload and stop, STATUS= lines, and the watchdog.
- Socket activation (sd_listen_fds(3)): listening sockets passed from fd 3 on, counted by
  $LISTEN_FDS, meant for us when $LISTEN_PID is our PID, named by $LISTEN_FDNAMES.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time

# How long a state change (READY, RELOADING, STOPPING) waits for room in systemd's queue of
# notifications (net.unix.max_dgram_qlen), at most: a busy boot fills it for a moment.
STATE_WAIT = 3.0


class Notifier:
    """Sends sd_notify messages; does nothing when not started by systemd with a notify
    socket. Errors are swallowed: telling systemd is never worth failing a request for."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if address.startswith("@"):
            self.address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self.address = address
        self.sock: socket.socket | None = None
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Half the period, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval = int(usec) / 2_000_000

    def send(self, *lines: str, wait: float = 0.0) -> None:
        """Best effort (STATUS, WATCHDOG): dropped when systemd's queue is full. A state
        change (`wait` > 0) waits that long for room: lost, READY=1 would have systemd kill
        the service at TimeoutStartSec= and start it again, as libsystemd's blocking send
        avoids."""
        if self.sock is None or self.address is None:
            return
        with contextlib.suppress(OSError):
            if wait:
                self.sock.settimeout(wait)
            try:
                self.sock.sendto("\n".join(lines).encode(), self.address)
            finally:
                if wait:
                    self.sock.setblocking(False)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}", wait=STATE_WAIT)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets Type=notify-reload units match the reload to the signal.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", wait=STATE_WAIT)

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}", wait=STATE_WAIT)

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def forget_in_child(self) -> None:
        """In a forked worker: only the supervisor speaks to systemd."""
        self.close()
        self.address = None
        self.watchdog_interval = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


LISTEN_FDS_START = 3


class ActivationError(Exception):
    """A descriptor systemd passed (or a wrapper said it passed) cannot be a listener."""


def listen_fds(environ: dict[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed us, with their names, and the variables removed so that no
    child takes them for its own. Empty when we were not socket-activated. Each descriptor
    is checked as sd_listen_fds(3) asks (sd_is_socket): a listening stream socket, else
    ActivationError. Taken as it was, a UDP socket or one that is not listening made the
    loop spin on an accept() that always failed."""
    env = os.environ if environ is None else environ
    pid = env.get("LISTEN_PID", "")
    count = env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    labels = names.split(":") if names else []
    out = []
    for index in range(int(count)):
        label = labels[index] if index < len(labels) else "unknown"
        out.append((label, _listening_socket(LISTEN_FDS_START + index, count, label)))
    return out


def _listening_socket(fd: int, count: str, label: str) -> socket.socket:
    where = f"LISTEN_FDS={count}: descriptor {fd} ({label!r})"
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise ActivationError(
            f"{where} is not open; check the socket unit, or the program that set LISTEN_FDS"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{where} is not a socket")
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        raise ActivationError(
            f"{where} is not a stream socket (ListenDatagram=?); rawproxy needs ListenStream="
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(
            f"{where} is not listening (a socket unit with Accept=yes passes connections, "
            "not listeners; rawproxy needs Accept=no)"
        )
    sock.setblocking(False)
    return sock


def activated() -> bool:
    """Whether systemd passed us sockets (before listen_fds() consumed the variables).
    LISTEN_FDS=0 is none: sd_listen_fds(3) returns 0, not activated."""
    count = os.environ.get("LISTEN_FDS", "")
    return os.environ.get("LISTEN_PID") == str(os.getpid()) and count.isdigit() and int(count) > 0
