"""Process lifecycle under systemd (socket activation edge cases, the watchdog with
--workers, sd_notify delivery, signals and drain as systemd really sends them, start-up
errors). Every test runs the real `python -m rawproxy` as a subprocess.

They came from a review (session 22). A docstring starting "Fixed:" describes what was wrong
before its fix (the watchdog with --workers one was an open strict xfail until session 23);
the others cover ground no other test file covers.

Socket activation is simulated without systemd: a small launcher (LAUNCHER below) moves the
sockets the test made to descriptors 3, 4, ... exactly as systemd does, sets LISTEN_PID to
its own PID (or to another one) and execs the proxy, so the PID is kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import (
    REPO,
    HttpBackend,
    HttpClient,
    NotifySocket,
    WsClient,
    cpu_seconds,
    free_port,
    has,
    notify_env,
    open_websocket,
    proxy_args,
    simple_get,
)

# argv: SOURCE_FDS (comma separated) PID_MODE (self|other) COMMAND...
# Each source descriptor goes to 3, 4, ... (through high numbers first, so that no source is
# overwritten before it is moved); LISTEN_PID is this process's PID, which the exec keeps.
LAUNCHER = """
import os, sys
sources = [int(x) for x in sys.argv[1].split(",") if x]
parked = [os.dup2(fd, 200 + i) for i, fd in enumerate(sources)]
for i in range(len(sources)):
    os.dup2(200 + i, 3 + i, inheritable=True)
    os.close(200 + i)
os.environ["LISTEN_PID"] = str(os.getpid()) if sys.argv[2] == "self" else "1"
os.execv(sys.argv[3], sys.argv[3:])
"""

UNIT = REPO / "contrib" / "systemd" / "rawproxy.service"


def run_to_exit(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m rawproxy ARGS` run to its exit (15 s at most), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "rawproxy", *args],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
    )


def _base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    env.update(extra)
    return env


@dataclass
class Outcome:
    code: int | None  # None: still running when we stopped looking (then stopped by us)
    stderr: str
    cpu_per_second: float  # while it was still running (0 when it had exited)


class Activated:
    """`python -m rawproxy ARGS` started with `socks` passed as systemd passes them."""

    def __init__(
        self,
        socks: list,
        *args: str,
        listen_fds: str | None = None,
        names: str | None = None,
        pid: str = "self",
        errfile: Path,
    ) -> None:
        fds = [s.fileno() for s in socks]
        env = _base_env(LISTEN_FDS=str(len(fds)) if listen_fds is None else listen_fds)
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        self.errfile = errfile
        self._err = open(errfile, "wb")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                ",".join(map(str, fds)),
                pid,
                sys.executable,
                "-m",
                "rawproxy",
                *args,
            ],
            pass_fds=fds,
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )

    def stderr(self) -> str:
        return self.errfile.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.stderr()):
                return True
            if self.proc.poll() is not None:
                return bool(re.search(pattern, self.stderr()))
            time.sleep(0.05)
        return False

    def finish(self, wait: float = 8.0) -> Outcome:
        """Wait up to `wait` s for the exit; if it still runs, sample its CPU use over 1 s
        and stop it (SIGTERM, then SIGKILL)."""
        try:
            code: int | None = self.proc.wait(wait)
            cpu = 0.0
        except subprocess.TimeoutExpired:
            code = None
            try:
                before = cpu_seconds(self.proc.pid)
                time.sleep(1.0)
                cpu = cpu_seconds(self.proc.pid) - before
            except OSError:
                cpu = 0.0
        self.stop()
        return Outcome(code, self.stderr(), cpu)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)  # the second signal: at once
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        self._err.close()


@pytest.fixture
def activated(tmp_path: Path) -> Iterator:
    made: list[Activated] = []

    def start(socks: list, *args: str, **kw) -> Activated:
        a = Activated(socks, *args, errfile=tmp_path / f"stderr-{len(made)}", **kw)
        made.append(a)
        return a

    yield start
    for a in made:
        a.stop()


@pytest.fixture
def owned() -> Iterator[list]:
    """Sockets and files the test passes to the proxy; closed at teardown."""
    things: list = []
    yield things
    for thing in things:
        thing.close()


def _one_line_error(outcome: Outcome) -> None:
    assert "Traceback" not in outcome.stderr, outcome.stderr


# --- socket activation with sockets that do not fit -------------------------------------------


@pytest.mark.timeout(40)
def test_activation_socket_bound_but_not_listening_is_refused(activated, owned):
    """Fixed: a socket passed by systemd that is bound but not listening (a socket unit
    with Accept= misconfigured, a wrapper passing the wrong descriptor) is taken as a
    listener: rawproxy logs "listening on 127.0.0.1:PORT", says ready, and its event loop
    spins at 100 % CPU (epoll reports EPOLLHUP for a TCP socket in CLOSE state on every round,
    accept() fails with EINVAL, the error is ignored). Nobody can connect.
    Expected: sd_listen_fds(3) says a daemon should check what it was passed
    (sd_is_socket_inet(fd, family, SOCK_STREAM, listening=1, port)); a socket that is not
    listening is a start-up error naming the descriptor (exit non-zero, one line)."""
    sock = socket.socket()
    owned.append(sock)
    sock.bind(("127.0.0.1", 0))
    proxy = activated([sock], "--backend", "127.0.0.1:9")
    outcome = proxy.finish(wait=6.0)
    assert outcome.code not in (None, 0), (
        f"still running after 6 s, using {outcome.cpu_per_second:.0%} of a CPU; "
        f"stderr:\n{outcome.stderr}"
    )
    _one_line_error(outcome)
    assert re.search(r"listen", outcome.stderr.splitlines()[-1], re.I), outcome.stderr


@pytest.mark.timeout(40)
def test_activation_udp_socket_is_refused(activated, owned):
    """Fixed: a UDP socket passed by systemd (ListenDatagram= in the socket unit) is taken
    as a listener: rawproxy logs "listening on 127.0.0.1:PORT (plain)" and says ready; the
    first datagram that arrives makes the event loop spin at 100 % CPU for ever (the socket
    stays readable, accept() fails with EOPNOTSUPP and is ignored).
    Expected: refuse at start-up with one line saying the socket is not a stream socket
    (sd_is_socket(fd, AF_UNSPEC, SOCK_STREAM, 1) in sd_listen_fds(3)'s terms); HAProxy binds
    only what its configuration names, and nginx's inherited sockets are checked with
    getsockopt(SO_TYPE)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    owned.append(udp)
    udp.bind(("127.0.0.1", 0))
    proxy = activated([udp], "--backend", "127.0.0.1:9")
    if proxy.wait_for_log(r"\bready\b", timeout=10):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", udp.getsockname())
    outcome = proxy.finish(wait=3.0)
    assert outcome.code not in (None, 0), (
        f"still running with a UDP socket as a listener, using {outcome.cpu_per_second:.0%} "
        f"of a CPU; stderr:\n{outcome.stderr}"
    )
    _one_line_error(outcome)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_activation_abstract_unix_socket_does_not_crash(activated, owned, workers):
    """Fixed: systemd passes AF_UNIX sockets too (ListenStream=/run/x.sock or @name), and
    rawproxy serves a path-named one; but an abstract one (@name) crashes it at start-up
    with a Python traceback: _shown() in rawproxy/server.py unpacks getsockname()'s bytes as
    (host, port) and `":" in host` raises TypeError (single process: after the listeners
    opened; --workers: in the supervisor).
    Expected: it serves on the socket (as it does on a path-named one), or at least a one-line
    start-up error; never a traceback."""
    backend = HttpBackend()
    try:
        name = f"rawproxy-review-{os.getpid()}-{time.monotonic_ns()}".encode()
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        owned.append(unix)
        unix.bind(b"\0" + name)
        unix.listen(16)
        proxy = activated([unix], "--backend", f"127.0.0.1:{backend.port}", *workers)
        served = None
        if proxy.wait_for_log(r"\bready\b", timeout=10):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                c.settimeout(5)
                c.connect(b"\0" + name)
                c.sendall(simple_get("/abstract"))
                served = c.recv(4096)
        outcome = proxy.finish(wait=0.1)
        assert "Traceback" not in outcome.stderr, outcome.stderr
        assert served is not None, outcome.stderr
        assert served.startswith(b"HTTP/1.1 200"), (served, outcome.stderr)
    finally:
        backend.stop()


@pytest.mark.timeout(40)
def test_activation_unix_socket_is_logged_by_its_path(activated, owned, tmp_path: Path):
    """Fixed: a path-named AF_UNIX socket from systemd is served, but logged as
    "listening on /:t (plain)" (the first two characters of the path, from _shown() in
    rawproxy/server.py treating the path as (host, port)). The admin reading the journal
    cannot tell which socket that is.
    Expected: the log line names the socket's path (e.g. "listening on unix:/run/x.sock")."""
    path = str(tmp_path / "proxy.sock")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    owned.append(unix)
    unix.bind(path)
    unix.listen(16)
    proxy = activated([unix], "--backend", "127.0.0.1:9")
    assert proxy.wait_for_log(r"\bready\b", timeout=10), proxy.stderr()
    outcome = proxy.finish(wait=0.1)
    lines = [line for line in outcome.stderr.splitlines() if "listening on" in line]
    assert lines, outcome.stderr
    assert path in lines[0], lines


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", ["fewer-fds-than-LISTEN_FDS", "regular-file"])
def test_activation_descriptors_that_are_not_sockets(activated, owned, case, tmp_path: Path):
    """Fixed: LISTEN_FDS counting more descriptors than are open (a wrapper script that
    forgot one, `LISTEN_FDS=2` with one socket), or a descriptor that is a file and not a
    socket, ends rawproxy with a Python traceback (OSError: [Errno 9] Bad file descriptor, or
    [Errno 88] Socket operation on non-socket, from systemd.listen_fds()).
    Expected (the README's promise for start-up errors): one line saying what is wrong
    ("LISTEN_FDS=2 but descriptor 4 is not open / not a socket") and a non-zero exit, no
    traceback."""
    if case == "regular-file":
        f = open(tmp_path / "not-a-socket", "w")  # noqa: SIM115 - closed by the fixture
        owned.append(f)
        proxy = activated([f], "--backend", "127.0.0.1:9")
    else:
        sock = socket.create_server(("127.0.0.1", 0))
        owned.append(sock)
        proxy = activated([sock], "--backend", "127.0.0.1:9", listen_fds="2")
    outcome = proxy.finish(wait=8.0)
    assert outcome.code not in (None, 0), outcome.stderr
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.stderr.strip().splitlines()[-1].startswith("rawproxy: error:"), outcome.stderr


@pytest.mark.timeout(30)
def test_activation_with_zero_sockets_and_no_listen_is_refused(activated):
    """Fixed: LISTEN_FDS=0 with LISTEN_PID matching (sd_listen_fds() returns 0: not
    socket-activated after all) lets --listen be left out, and rawproxy then starts with no
    listener at all: "ready: 0 listener(s)", READY=1 to systemd, a service that can never
    serve. Expected: 0 passed sockets is the same as none; with no --listen either, the
    usual "--listen is required" error and a non-zero exit."""
    proxy = activated([], "--backend", "127.0.0.1:9", listen_fds="0")
    outcome = proxy.finish(wait=6.0)
    assert outcome.code not in (None, 0), outcome.stderr


def _dual_stack_listener() -> socket.socket:
    """What systemd opens for ListenStream=PORT (BindIPv6Only=default): [::]:PORT taking
    IPv4 too, listening."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        sock.listen(16)
    except OSError as e:
        sock.close()
        pytest.skip(f"no dual-stack socket here: {e}")
    return sock


@pytest.mark.timeout(40)
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["single", "workers"])
def test_listen_on_the_address_systemd_already_passed(
    activated, owned, tmp_path: Path, workers: list[str]
):
    """Fixed: the README's own five-command install enables rawproxy.socket
    (ListenStream=443, FileDescriptorName=tls) *and* installs examples/openqa.toml, which
    says listen = [":443"]. systemd passes [::]:443 and rawproxy then tries to bind :443 as
    well, and stops with "cannot listen on *:443: the address is already in use; stop the
    program holding it or choose another --listen port": the program holding it is systemd,
    holding it for rawproxy, and the advice sends the admin hunting for a foreign process.
    Reproduced here on a free port with the same shapes (a dual-stack socket passed, the
    same port in the config file).
    Expected: use the passed socket for a --listen/listen entry with the same address
    (daemon(7): a socket-activated daemon uses the sockets it is passed instead of opening
    its own), or an error that says systemd already passed that address and to remove it
    from listen = [...] (or not to enable rawproxy.socket)."""
    sock = _dual_stack_listener()
    owned.append(sock)
    port = sock.getsockname()[1]
    config = tmp_path / "rawproxy.toml"
    config.write_text(f'listen = [":{port}"]\nbackend = "http://127.0.0.1:9"\n')
    proxy = activated([sock], "--config", str(config), *workers, names="tcp")
    assert proxy.wait_for_log(r"\bready\b", timeout=10), proxy.stderr()
    # A reload reads the same listen address: still the passed socket's, not a new bind.
    proxy.proc.send_signal(signal.SIGHUP)
    assert proxy.wait_for_log(r"SIGHUP: reloaded", timeout=10), proxy.stderr()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(simple_get("/through-the-passed-socket"))
        answer = c.recv(100)
    outcome = proxy.finish(wait=0.1)
    assert outcome.code is None, outcome.stderr  # still running: it served
    assert answer.startswith(b"HTTP/1.1 502 "), (answer, outcome.stderr)  # no backend at :9
    assert re.search(rf"listen \*?:{port}: served by the socket systemd passed", outcome.stderr), (
        outcome.stderr
    )
    assert "keeping the current configuration" not in outcome.stderr, outcome.stderr


@pytest.mark.timeout(40)
def test_another_address_on_a_passed_port_names_socket_activation(activated, owned, tmp_path: Path):
    """A listen address with a host, on the port of a socket systemd passed (dual-stack, so
    it holds every address): not served by it, and start-up fails naming socket activation,
    not "the program holding it" (that program is systemd, on rawproxy's behalf)."""
    sock = _dual_stack_listener()
    owned.append(sock)
    port = sock.getsockname()[1]
    proxy = activated(
        [sock], "--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9", names="tcp"
    )
    outcome = proxy.finish(wait=8.0)
    assert outcome.code == 1, outcome.stderr
    last = outcome.stderr.strip().splitlines()[-1]
    assert last.startswith("rawproxy: error: cannot listen on 127.0.0.1:"), last
    assert "systemd already passed rawproxy a socket on this port" in last, last


@pytest.mark.timeout(30)
def test_check_config_accepts_a_file_meant_for_socket_activation(tmp_path: Path):
    """Fixed: with rawproxy.socket the README and the unit file say "leave
    listen out" of the config file; `rawproxy --check-config FILE` then refuses that very
    file ("--listen is required", exit 1). An ExecStartPre= check (HAProxy's unit runs
    `haproxy -c` there; nginx -t is the same habit) or a pre-deploy check fails for a file
    that starts fine. Expected: a file without listen is valid (perhaps with a note that it
    relies on socket activation); --check-config checks what it can without the sockets."""
    config = tmp_path / "rawproxy.toml"
    config.write_text('backend = "http://127.0.0.1:9"\n')
    done = run_to_exit("--check-config", str(config), env=_base_env())
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(40)
def test_listen_pid_of_another_process_leaves_the_sockets_alone(activated, owned, http_backend):
    """LISTEN_PID naming another process (the variables leaked from a parent): the passed
    descriptors are not ours (sd_listen_fds(3)); rawproxy must not accept on them, and,
    without --listen, must say --listen is required. With --listen it serves on its own."""
    stray = socket.create_server(("127.0.0.1", 0))
    owned.append(stray)
    proxy = activated([stray], "--backend", "127.0.0.1:9", pid="other")
    outcome = proxy.finish(wait=8.0)
    assert outcome.code == 2, outcome
    assert "--listen is required" in outcome.stderr, outcome.stderr

    port = free_port()
    proxy = activated(
        [stray],
        "--listen",
        f"127.0.0.1:{port}",
        "--backend",
        f"127.0.0.1:{http_backend.port}",
        pid="other",
    )
    assert proxy.wait_for_log(r"\bready\b", timeout=10), proxy.stderr()
    with HttpClient(port, timeout=5) as c:
        assert c.request(simple_get("/own")).status == 200
    # The stray socket is not served: a client to it waits in its backlog, unanswered.
    with socket.create_connection(stray.getsockname(), timeout=5) as c:
        c.sendall(simple_get("/stray"))
        c.settimeout(0.8)
        with pytest.raises(TimeoutError):
            c.recv(1)
    outcome = proxy.finish(wait=0.1)
    assert str(stray.getsockname()[1]) not in outcome.stderr, outcome.stderr


# --- sd_notify and the watchdog --------------------------------------------------------------


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _wait_children(pid: int, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _children(pid)
        if len(kids) >= count:
            return kids
        time.sleep(0.05)
    raise TimeoutError(f"{pid} has children {_children(pid)}, not {count}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("wedged", ["one", "every"])
def test_workers_watchdog_replaces_a_hung_worker(wedged, run_proxy, http_backend, tmp_path):
    """Fixed (review finding): with --workers the supervisor sent WATCHDOG=1 from its own
    idle loop whatever the workers did, so with every worker wedged (here SIGSTOP; in real
    life an endless loop, a deadlock, a blocking call) no request was answered and
    WatchdogSec= never fired. Now each worker sends a heartbeat from its loop and the
    supervisor aborts one silent for a whole period (SIGABRT, then SIGKILL: a stopped
    process takes only that) and starts another in its place: requests are answered again,
    a healthy worker keeps its PID, and the supervisor, alive, goes on pinging systemd."""
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    kids: list[int] = []
    try:
        proxy = run_proxy(
            *proxy_args(http_backend.port),
            "--workers",
            "2",
            env=notify_env(address, WATCHDOG_USEC="1000000"),
        )
        notify.wait_for(has("READY", "1"), timeout=10)
        kids = _wait_children(proxy.pid, 2)
        # Healthy workers, idle or busy, are never taken for hung: three periods of both.
        mark = proxy.mark()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with HttpClient(proxy.port, timeout=5) as c:
                assert c.request(simple_get("/healthy")).status == 200
            time.sleep(0.2)
        assert "hung" not in proxy.log_text(mark)
        assert sorted(_children(proxy.pid)) == sorted(kids)

        stopped = kids if wedged == "every" else kids[:1]
        mark = proxy.mark()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        for pid in stopped:
            proxy.wait_for_log(rf"\(pid {pid}\) hung: no heartbeat", since=mark, timeout=5)
            proxy.wait_for_log(
                rf"\(pid {pid}\) ended \(killed by SIGKILL\); restarting", since=mark, timeout=10
            )
        proxy.wait_for_logs(r"worker \d+ \(pid \d+\) serving", len(stopped), since=mark, timeout=10)
        now = _wait_children(proxy.pid, 2)
        assert not set(now) & set(stopped), (now, stopped)
        assert set(kids) - set(stopped) <= set(now), "a healthy worker was replaced"
        for _ in range(4):  # either worker may take each connection
            with HttpClient(proxy.port, timeout=5) as c:
                assert c.request(simple_get("/again")).status == 200
        notify.collect(0.2)  # what queued up meanwhile; then a fresh ping, one interval on
        notify.wait_for(has("WATCHDOG", "1"), timeout=2, since=len(notify.messages))
    finally:
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        notify.close()


def _fill_notify_queue(address: str) -> list[socket.socket]:
    """Fill the receive queue of the datagram socket at `address` (systemd busy, at boot):
    senders until a fresh one cannot send either (the receiver's queue, not a sender's own
    buffer, is full). Returns the senders (to close)."""
    senders: list[socket.socket] = []
    for _ in range(64):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.setblocking(False)
        senders.append(s)
        sent = 0
        for _ in range(5000):
            try:
                s.sendto(b"FILLER=1", address)
            except BlockingIOError:
                break
            sent += 1
        if sent == 0:
            return senders
    raise AssertionError("could not fill the notify socket's queue")


@pytest.mark.timeout(40)
def test_ready_is_not_lost_when_the_notify_queue_is_momentarily_full(
    run_proxy, http_backend, tmp_path
):
    """Fixed: the notify socket is non-blocking and every send error is swallowed,
    so READY=1 sent while systemd's notify queue is full (all units of a busy boot share it;
    net.unix.max_dgram_qlen is 10 by default, 512 with systemd's sysctl) is simply lost:
    systemd never learns the service started, and kills it at TimeoutStartSec= (90 s), then
    Restart=on-failure starts it again, in a loop. The same holds for RELOADING=1/READY=1
    (a `systemctl reload` that hangs) and STOPPING=1.
    Expected: state changes (READY, RELOADING, STOPPING) are delivered once systemd reads
    again, as sd_notify(3) does (libsystemd sends on a blocking socket); WATCHDOG/STATUS may
    stay best effort."""
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    senders = _fill_notify_queue(address)
    try:
        proxy = run_proxy(
            *proxy_args(http_backend.port),
            env=notify_env(address),
        )
        time.sleep(0.5)  # systemd busy a little longer after the proxy logged ready
        arrived = True
        try:
            notify.wait_for(has("READY", "1"), timeout=5)
        except TimeoutError:
            arrived = False
        assert arrived, (
            "READY=1 never arrived: sent while the notify queue was full, and dropped "
            f"(messages received: {[m for m in notify.messages if 'FILLER' not in m]})"
        )
        assert proxy.proc.poll() is None
    finally:
        for s in senders:
            s.close()
        notify.close()


@pytest.mark.timeout(30)
def test_start_up_failure_sends_no_ready(tmp_path):
    """A start-up failure (here one of two --listen ports in use) never says READY=1 (systemd
    must see a failed start, not a service that then exits), exits 1 with one line naming the
    busy address, and leaves the other --listen port free again; with --workers the same."""
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        for workers in ([], ["--workers", "2"]):
            address = str(tmp_path / f"notify{len(workers)}")
            notify = NotifySocket(address)
            try:
                other = free_port()
                done = run_to_exit(
                    "--listen",
                    f"127.0.0.1:{other}",
                    "--listen",
                    f"127.0.0.1:{busy.getsockname()[1]}",
                    "--backend",
                    "127.0.0.1:9",
                    *workers,
                    env=notify_env(address),
                )
                assert done.returncode == 1, done.stderr
                assert "Traceback" not in done.stderr, done.stderr
                last = done.stderr.strip().splitlines()[-1]
                assert last.startswith("rawproxy: error:"), done.stderr
                assert f"127.0.0.1:{busy.getsockname()[1]}" in last, last
                assert "in use" in last, last
                notify.collect(0.3)
                assert not any("READY" in m for m in notify.messages), notify.messages
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("127.0.0.1", other))  # released with the exit
            finally:
                notify.close()
    finally:
        busy.close()


# --- signals and drain -------------------------------------------------------------------------


def _kill_mode() -> str:
    mode = "control-group"  # systemd's default
    for line in UNIT.read_text().splitlines():
        if line.strip().startswith("KillMode="):
            mode = line.split("=", 1)[1].strip()
    return mode


def echo_tunnels(port: int, n: int, into: list[tuple[HttpClient, WsClient]]) -> None:
    """Open `n` WebSockets through the proxy on `port` to a WsBackend, each checked with one
    echo, appended to `into` as they open (the caller closes them)."""
    for i in range(n):
        c = HttpClient(port, timeout=5)
        into.append((c, open_websocket(c)))
        into[-1][1].send(f"hello {i}")
        assert into[-1][1].recv() == f"hello {i}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kill_mode", ["unit", "control-group"])
def test_systemctl_stop_with_workers_drains(run_proxy, ws_backend, kill_mode):
    """Fixed: `systemctl stop` with --workers cuts every open request and tunnel
    instead of draining them. The shipped contrib/systemd/rawproxy.service sets no
    KillMode=, so systemd's default KillMode=control-group sends SIGTERM to every process of
    the unit: each worker gets it once from systemd and once more from the supervisor, which
    passes its own SIGTERM on, and a second SIGTERM means "stop at once" (tunnels closed,
    log: "SIGTERM received while draining; stopping now"). The same happens with Ctrl-C in a
    terminal (SIGINT to the whole process group). Which workers are cut depends on timing;
    here the workers handle systemd's signal before the supervisor's arrives.
    Expected: one `systemctl stop` drains (README: "tunnels get --drain-timeout").
    HAProxy's unit file sets KillMode=mixed for its master-worker mode for this reason."""
    proxy = run_proxy(
        *proxy_args(ws_backend.port),
        "--workers",
        "2",
    )
    kids = _wait_children(proxy.pid, 2)
    proxy.wait_for_logs(r"worker \d+ \(pid \d+\) serving", 2)
    tunnels: list[tuple[HttpClient, WsClient]] = []
    try:
        echo_tunnels(proxy.port, 6, tunnels)
        mark = proxy.mark()
        mode = _kill_mode() if kill_mode == "unit" else kill_mode
        if mode == "control-group":  # or Ctrl-C in a terminal: the whole group
            for pid in kids:
                os.kill(pid, signal.SIGTERM)
            proxy.wait_for_logs(r"draining", 2, since=mark, timeout=5)
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for_log(r"the workers drain", since=mark, timeout=5)
        time.sleep(0.8)
        cut = []
        for i, (_c, ws) in enumerate(tunnels):
            try:
                ws.send(f"draining {i}")
                answer = ws.recv()
            except OSError as e:
                answer = repr(e)
            if answer != f"draining {i}":
                cut.append((i, answer))
        assert not cut, (
            f"{len(cut)} of {len(tunnels)} tunnels cut by one systemctl stop (KillMode="
            f"{mode}): {cut}\n{proxy.log_text(mark)}"
        )
    finally:
        for c, _ws in tunnels:
            c.close()
    assert proxy.proc.wait(10) == 0


@pytest.mark.timeout(60)
def test_second_sigterm_stops_workers_at_once(run_proxy, ws_backend):
    """With --workers, a second SIGTERM to the supervisor during the drain stops every worker
    at once: the open tunnels are closed promptly (not after --drain-timeout) and the exit
    code is still 0, with the supervisor's orderly last line."""
    proxy = run_proxy(
        *proxy_args(ws_backend.port),
        "--workers",
        "2",
        "--drain-timeout",
        "30",
    )
    proxy.wait_for_logs(r"worker \d+ \(pid \d+\) serving", 2)
    tunnels: list[tuple[HttpClient, WsClient]] = []
    try:
        echo_tunnels(proxy.port, 4, tunnels)
        mark = proxy.mark()
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for_log(r"the workers drain", since=mark)
        time.sleep(0.5)
        assert proxy.proc.poll() is None  # tunnels still open: draining
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        for c, _ws in tunnels:
            how, _ = c.wait_closed(5)
            assert how in ("eof", "reset"), how
        proxy.wait_for_log(r"stopped: every worker ended", since=mark)
    finally:
        for c, _ws in tunnels:
            c.close()


@pytest.mark.timeout(40)
def test_sigusr1_does_not_kill_the_proxy(run_proxy, http_backend):
    """Fixed: SIGUSR1 has Python's default action: the proxy dies at once (exit by
    signal, no drain, no log line, no STOPPING=1), cutting every connection. It is the
    signal logrotate configurations copied from nginx send to reopen the logs (nginx: USR1
    reopens the log files; HAProxy: USR1 is a graceful stop). SIGUSR2 does the same.
    Expected: SIGUSR1 is handled (reopen the access log like SIGHUP's logrotate part, or
    ignored with a log line); never an abrupt death."""
    proxy = run_proxy("--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{http_backend.port}")
    with HttpClient(proxy.port, timeout=5) as c:
        assert c.request(simple_get("/before")).status == 200
        proxy.proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert proxy.proc.poll() is None, (
            f"the proxy died of SIGUSR1 (exit {proxy.proc.returncode}); log:\n{proxy.log_text()}"
        )
        assert c.request(simple_get("/after")).status == 200


@pytest.mark.timeout(40)
def test_killed_worker_cuts_only_its_own_clients(run_proxy, http_backend):
    """A worker killed with SIGKILL in the middle of a response: its client sees the
    connection end (EOF or reset, promptly, not a hang), the supervisor logs the restart,
    other clients keep being served, and the supervisor still exits 0 at the stop."""
    proxy = run_proxy(
        *proxy_args(http_backend.port),
        "--workers",
        "2",
    )
    proxy.wait_for_logs(r"worker \d+ \(pid \d+\) serving", 2)
    c = HttpClient(proxy.port, timeout=5)
    try:
        c.send(simple_get("/stream"))  # head and first part, then waits for the gate
        status, _, _, _ = c.read_head()
        assert status == 200
        # The worker holding this client: found through /proc (its descriptor table).
        port = c.sock.getsockname()[1]
        owner = _owner_of_connection(_children(proxy.pid), port)
        mark = proxy.mark()
        os.kill(owner, signal.SIGKILL)
        how, _ = c.wait_closed(5)
        assert how in ("eof", "reset"), how
        proxy.wait_for_log(rf"\(pid {owner}\) ended \(killed by SIGKILL\); restarting", mark)
        for i in range(4):
            with HttpClient(proxy.port, timeout=5) as other:
                assert other.request(simple_get(f"/after-{i}")).status == 200
    finally:
        c.close()
        http_backend.gate.set()
    assert proxy.stop() == 0


def _owner_of_connection(pids: list[int], client_port: int) -> int:
    """The worker holding the proxy's end of the loopback connection from `client_port`."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].rpartition(":")[2], 16)
                if remote_port == client_port and fields[3] == "01":
                    inode = fields[9]
    assert inode is not None, f"no connection from port {client_port}"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    raise AssertionError(f"no worker holds socket inode {inode}")
