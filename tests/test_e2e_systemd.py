"""systemd integration, end to end, without systemd as PID 1:

- sd_notify: the proxy started with $NOTIFY_SOCKET pointing at our own datagram socket (a
  file, or `@name` in the abstract namespace) sends READY=1 (with STATUS= and MAINPID=) once
  its listeners are up, RELOADING=1 (with MONOTONIC_USEC=) then READY=1 around a SIGHUP,
  STOPPING=1 at SIGTERM, a STATUS= line every 10 s, and WATCHDOG=1 every WATCHDOG_USEC/2
  when WATCHDOG_PID is absent or its own PID (never for another PID);
- socket activation: Debian's `systemd-socket-activate` passes listening sockets (it execs
  the proxy, so LISTEN_PID matches); FileDescriptorName picks TLS (`tls...`) or plain
  (`tcp...`, `plain...`, `http...`), anything else TLS exactly when certificates are given;
  the first connection, which arrived before the proxy ran, is served;
- unit files: contrib/systemd/rawproxy.service and rawproxy.socket pass
  `systemd-analyze verify`, and say what the proxy does (Type=notify, reload by SIGHUP, a
  stop timeout longer than the drain, a watchdog, a TLS socket by name).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import (
    REPO,
    Background,
    HttpClient,
    NotifySocket,
    ProxyProcess,
    free_port,
    has,
    notify_env,
    proxy_args,
    simple_get,
    socket_activate_launcher,
)
from tls_peers import Pki

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is missing (Debian: apt-get install -y systemd)",
)
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is missing (Debian: apt-get install -y systemd)",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-systemd"))


# --- sd_notify ---------------------------------------------------------------------------------


# `sh -c '... exec "$0" "$@"'`: sets WATCHDOG_PID to the PID that the proxy keeps after exec.
OWN_WATCHDOG_PID = ("sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"')


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_notify_ready_reload_status_stopping(run_proxy, http_backend, client, tmp_path: Path):
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    try:
        started = time.monotonic()
        proxy = run_proxy(
            *proxy_args(http_backend.port),
            env=notify_env(address),
        )
        ready = notify.wait_for(has("READY", "1"))
        message = notify.messages[ready]
        assert message.get("MAINPID") == str(proxy.pid), message
        assert "STATUS" in message, message
        # READY came once the listener was up: the proxy serves.
        with HttpClient(proxy.port, timeout=5) as c:
            assert c.request(simple_get("/ready")).status == 200

        # SIGHUP: RELOADING=1 with the monotonic clock of the moment, then READY=1.
        mark = len(notify.messages)
        before = monotonic_usec()
        proxy.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(has("RELOADING", "1"), since=mark)
        after = monotonic_usec()
        usec = int(notify.messages[reloading]["MONOTONIC_USEC"])
        assert before <= usec <= after, (before, usec, after)
        notify.wait_for(has("READY", "1"), since=reloading + 1)
        proxy.wait_for_log(r"reloaded")
        # A broken reload is still bracketed, so systemd does not wait for READY forever.
        proxy.proc.send_signal(signal.SIGHUP)  # (no config file: the flags again)
        again = notify.wait_for(has("RELOADING", "1"), since=reloading + 1)
        notify.wait_for(has("READY", "1"), since=again + 1)

        # STATUS= lines on their own, every 10 s (the first one 10 s after the start).
        status_at = notify.wait_for(
            lambda m: "STATUS" in m and "READY" not in m and "STOPPING" not in m,
            since=again + 1,
            timeout=max(0.1, 10 + 3 - (time.monotonic() - started)),
        )
        assert time.monotonic() - started >= 9, "a STATUS line before 10 s"
        assert re.search(r"\d", notify.messages[status_at]["STATUS"]), notify.messages[status_at]

        # SIGTERM with a connection open: STOPPING=1 (with a STATUS).
        kept = client(proxy.port)
        assert kept.request(simple_get("/kept")).status == 200
        mark = len(notify.messages)
        proxy.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for(has("STOPPING", "1"), since=mark)
        assert "STATUS" in notify.messages[stopping], notify.messages[stopping]
        kept.wait_closed(3)
        kept.close()
        assert proxy.proc.wait(5) == 0
        assert not any("WATCHDOG" in m for m in notify.messages), notify.messages
        assert set(notify.senders) == {proxy.pid}  # what NotifyAccess=main accepts
    finally:
        notify.close()


def test_watchdog_pings_every_half_period(run_proxy, http_backend, tmp_path: Path):
    """WATCHDOG_USEC=300000: WATCHDOG=1 every 0.15 s, for as long as the proxy runs, when
    WATCHDOG_PID is the proxy's PID; never when it names another process."""
    own, other = str(tmp_path / "notify"), str(tmp_path / "notify-other")
    notify, bystander_notify = NotifySocket(own), NotifySocket(other)
    try:
        proxy = run_proxy(
            *proxy_args(http_backend.port),
            env=notify_env(own, WATCHDOG_USEC="300000"),
            launcher=OWN_WATCHDOG_PID,
        )
        bystander = run_proxy(
            *proxy_args(http_backend.port),
            env=notify_env(other, WATCHDOG_USEC="100000", WATCHDOG_PID="1"),
        )
        ready = notify.wait_for(has("READY", "1"))
        assert notify.messages[ready]["MAINPID"] == str(proxy.pid)
        first_ping = notify.wait_for(has("WATCHDOG", "1"))
        notify.collect(1.2)
        pings = [
            notify.arrived[i]
            for i in range(first_ping, len(notify.messages))
            if notify.messages[i].get("WATCHDOG") == "1"
        ]
        # 1.2 s at one ping per 0.15 s: about 8 (a loaded machine may delay some).
        assert 5 <= len(pings) <= 12, pings
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.3, gaps  # never the whole period without a ping
        assert set(notify.senders) == {proxy.pid}

        bystander_notify.wait_for(has("READY", "1"))
        bystander_notify.collect(0.1)
        assert not any("WATCHDOG" in m for m in bystander_notify.messages), (
            bystander_notify.messages
        )
        assert bystander.proc.poll() is None
    finally:
        notify.close()
        bystander_notify.close()


def test_notify_to_an_abstract_socket(run_proxy, http_backend):
    name = f"rawproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    notify = NotifySocket(b"\0" + name.encode())
    try:
        proxy = run_proxy(
            *proxy_args(http_backend.port),
            env=notify_env(f"@{name}"),
        )
        ready = notify.wait_for(has("READY", "1"))
        assert notify.messages[ready]["MAINPID"] == str(proxy.pid)
        # No watchdog asked for: none sent.
        notify.collect(0.3)
        assert not any("WATCHDOG" in m for m in notify.messages), notify.messages
    finally:
        notify.close()


def test_without_notify_socket_nothing_breaks(run_proxy, http_backend):
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    env["WATCHDOG_USEC"] = "100000"  # a watchdog without a socket to tell: harmless
    proxy = run_proxy(
        "--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{http_backend.port}", env=env
    )
    time.sleep(0.3)
    with HttpClient(proxy.port, timeout=5) as c:
        assert c.request(simple_get("/x")).status == 200
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded")
    assert proxy.stop() == 0


# --- socket activation -------------------------------------------------------------------------


def first_connection(port: int, target: str, context=None) -> tuple[int, bytes]:
    """Connect as soon as `port` listens (retrying while it is refused), send one request and
    return (status, body). systemd-socket-activate starts the proxy at this connection."""
    deadline = time.monotonic() + 10
    while True:
        try:
            c = HttpClient(port, timeout=10, ssl_context=context)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with c:
        resp = c.request(simple_get(target))
    return resp.status, resp.body


class Activated:
    def __init__(self, proxy: ProxyProcess, ports: dict[str, int], first: tuple[int, bytes]):
        self.proxy = proxy
        self.ports = ports
        self.first = first


@pytest.fixture
def activate(run_proxy) -> Callable[..., Activated]:
    """`activate(names, *args)`: the proxy started by systemd-socket-activate with one
    listening socket per name (FileDescriptorName), on ports chosen here (another process may
    take one in between: the start is tried twice). The first name's socket gets the first
    connection (over TLS when `first_tls` is a client context)."""

    def start(names: list[str], *args: str, first_tls=None) -> Activated:
        for attempt in range(2):
            ports = {name: free_port() for name in names}
            launcher = socket_activate_launcher(ports.values(), names)
            first = Background(first_connection, ports[names[0]], "/first", first_tls)
            try:
                proxy = run_proxy(*args, launcher=launcher)
            except RuntimeError:
                # Most likely a port taken in between: systemd-socket-activate could not bind.
                with contextlib.suppress(Exception):
                    first.join(15)
                if attempt == 0:
                    continue
                raise
            return Activated(proxy, ports, first.join(15))
        raise AssertionError("unreachable")

    return start


@needs_socket_activate
def test_socket_activated_plain_listener_needs_no_listen(activate, http_backend):
    started = activate(["http"], "--backend", f"127.0.0.1:{http_backend.port}")
    proxy, port = started.proxy, started.ports["http"]
    assert started.first == (200, b"GET /first")
    assert proxy.port == port
    assert proxy.logs_matching(rf"listening on 127\.0\.0\.1:{port} \(plain\)"), proxy.log_text()
    with HttpClient(port, timeout=5) as c:
        assert c.request(simple_get("/again")).status == 200
        assert c.request(simple_get("/and-again")).status == 200
    assert proxy.stop() == 0


@needs_socket_activate
def test_socket_activated_listeners_by_name(activate, http_backend, pki):
    names = ["tls", "tcp", "plain", "http-alt", "tls-admin", "web"]
    tls_kind = {"tls": True, "tcp": False, "plain": False, "http-alt": False}
    tls_kind |= {"tls-admin": True, "web": True}  # "web": TLS because certificates are given
    started = activate(
        names,
        "--listen",
        "tcp://127.0.0.1:0",  # one of its own as well
        "--backend",
        f"127.0.0.1:{http_backend.port}",
        "--cert",
        str(pki.server.cert),
        "--key",
        str(pki.server.key),
        first_tls=pki.client_context(),
    )
    proxy = started.proxy
    assert started.first == (200, b"GET /first")
    context = pki.client_context()
    for name, port in started.ports.items():
        kind = "tls" if tls_kind[name] else "plain"
        assert proxy.logs_matching(rf"listening on 127\.0\.0\.1:{port} \({kind}\)"), (
            name,
            proxy.log_text(),
        )
        with HttpClient(port, timeout=5, ssl_context=context if tls_kind[name] else None) as c:
            resp = c.request(simple_get(f"/{name}"))
        assert (resp.status, resp.body) == (200, f"GET /{name}".encode()), name
    own = [p for p in proxy.ports if p not in started.ports.values()]
    assert len(own) == 1, proxy.ports
    with HttpClient(own[0], timeout=5) as c:
        assert c.request(simple_get("/own")).status == 200
    assert proxy.stop() == 0


@needs_socket_activate
def test_socket_activated_other_name_is_plain_without_certificates(activate, http_backend):
    started = activate(["web"], "--backend", f"127.0.0.1:{http_backend.port}")
    port = started.ports["web"]
    assert started.first == (200, b"GET /first")
    assert started.proxy.logs_matching(rf"listening on 127\.0\.0\.1:{port} \(plain\)")


@needs_socket_activate
def test_socket_activated_tls_name_without_certificate_is_refused(http_backend):
    """A socket named tls... with no certificate configured cannot serve TLS: the proxy says
    so in one line and exits non-zero, rather than serving plain HTTP on a TLS port."""
    port = free_port()
    done = subprocess.Popen(
        [
            *socket_activate_launcher([port], ["tls"]),
            sys.executable,
            "-m",
            "rawproxy",
            "--backend",
            f"127.0.0.1:{http_backend.port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    trigger = threading.Thread(target=_poke, args=(port,), daemon=True)
    trigger.start()
    try:
        _, err = done.communicate(timeout=8)
    finally:
        if done.poll() is None:
            done.kill()
            done.communicate()
        trigger.join(15)
    assert done.returncode not in (0, None), err
    # systemd-socket-activate's own lines, then the proxy's: one line naming the problem.
    tool = ("Listening on ", "Communication attempt on ", "Execing ")
    lines = [line for line in err.splitlines() if not line.startswith(tool)]
    assert len(lines) == 1, err
    assert re.search(r"cert", lines[0], re.IGNORECASE), lines
    assert "tls" in lines[0], lines


def _poke(port: int) -> None:
    """Connect once (when the port listens) and close: starts a socket-activated service."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.settimeout(5)
                with contextlib.suppress(OSError):
                    s.recv(1)
            return
        except ConnectionRefusedError:
            time.sleep(0.02)


# --- unit files ----------------------------------------------------------------------------------

UNITS = REPO / "contrib" / "systemd"


def unit_settings(path: Path) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order, from a unit file."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def rawproxy_script() -> str:
    beside = Path(sys.executable).parent / "rawproxy"
    found = str(beside) if beside.exists() else shutil.which("rawproxy")
    assert found, "no rawproxy script installed (pip install -e .)"
    return found


@needs_systemd_analyze
def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path):
    for unit in ("rawproxy.service", "rawproxy.socket"):
        text = (UNITS / unit).read_text()
        # The unit names /usr/local/bin/rawproxy; verify checks that it exists: use ours.
        text = text.replace("/usr/local/bin/rawproxy", rawproxy_script())
        (tmp_path / unit).write_text(text)
    done = subprocess.run(
        [
            str(SYSTEMD_ANALYZE),
            "verify",
            "--man=no",
            str(tmp_path / "rawproxy.socket"),
            str(tmp_path / "rawproxy.service"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    assert output == "", f"systemd-analyze verify warned:\n{output}"


def test_unit_files_say_what_the_proxy_does():
    service = unit_settings(UNITS / "rawproxy.service")
    sock = unit_settings(UNITS / "rawproxy.socket")

    assert service[("Service", "Type")] == ["notify"]
    assert service[("Service", "NotifyAccess")][-1] in ("main", "all", "exec")
    exec_start = service[("Service", "ExecStart")][-1].split()
    assert exec_start[0].endswith("/rawproxy"), exec_start
    assert "--config" in exec_start, exec_start
    reload_cmd = service[("Service", "ExecReload")][-1]
    assert re.fullmatch(r"\S*kill -(HUP|SIGHUP|s HUP) \$MAINPID", reload_cmd), reload_cmd
    assert service.get(("Service", "KillSignal"), ["SIGTERM"])[-1] in ("SIGTERM", "TERM")
    # Stopping waits for the drain (30 s by default) and a little more.
    assert _seconds(service[("Service", "TimeoutStopSec")][-1]) > 30
    watchdog = _seconds(service[("Service", "WatchdogSec")][-1])
    assert watchdog >= 2, "the proxy pings every WatchdogSec/2: leave it room"

    assert sock[("Socket", "Service")] == ["rawproxy.service"]
    names = sock.get(("Socket", "FileDescriptorName"), [])
    listens = sock.get(("Socket", "ListenStream"), [])
    assert listens, sock
    for name in names:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,255}", name), name
    if listens[0].rsplit(":", 1)[-1] == "443":
        assert names, "a socket on 443 without FileDescriptorName"
        assert names[0].lower().startswith("tls"), names


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", text.strip())
    assert m, text
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)
