"""`--workers N|auto`: worker processes sharing the listening sockets, supervised by the main
process, end to end:

- N workers, children of the main process, serve the requests (every client connection is
  held by a worker, none by the main process; with enough connections, both workers);
- a worker killed with SIGKILL is replaced (`restarting` in the log) and requests keep being
  served, before and while it comes back;
- SIGHUP reaches every worker (each reloads: new connections see the new config file);
- SIGTERM to the main process drains every worker (the listener closes at once, an open
  tunnel keeps working until it ends), then everything exits 0;
- `auto` is one worker per CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from peers import (
    REPO,
    HttpBackend,
    HttpClient,
    Metrics,
    NotifySocket,
    ProxyProcess,
    admin_get,
    assert_refused,
    free_port,
    has,
    notify_env,
    open_websocket,
    proxy_args,
    run_rawproxy,
    simple_get,
    start_activated,
)

PROMPT = 3.0


def _has_workers_flag() -> bool:
    done = run_rawproxy("--help")
    return "--workers" in done.stdout


pytestmark = pytest.mark.skipif(
    not _has_workers_flag(), reason="rawproxy has no --workers flag (not implemented yet)"
)


def children(pid: int) -> set[int]:
    """The live child processes of `pid`."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "children").read_text()
        except FileNotFoundError:
            continue
        out |= {int(p) for p in text.split()}
    return {p for p in out if _alive(p)}


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return state is not None and state.group(1) != "Z"


def wait_for_children(
    pid: int, count: int, exclude: frozenset[int] = frozenset(), timeout: float = 10.0
) -> set[int]:
    """Once `pid` has `count` live children, none of them in `exclude`: their PIDs."""
    deadline = time.monotonic() + timeout
    while True:
        found = children(pid)
        if len(found) == count and not found & exclude:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"children of {pid}: {found}, wanted {count} not in {exclude}")
        time.sleep(0.05)


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            out.add(int(m.group(1)))
    return out


def proxy_side_inode(proxy_port: int, client_port: int) -> int:
    """The inode of the proxy's end of the loopback connection from `client_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == proxy_port and int(remote.split(":")[1], 16) == (
            client_port
        ):
            return inode
    raise AssertionError(f"no connection {proxy_port} <- {client_port} in /proc/net/tcp")


def owners(pids: set[int], inode: int) -> list[int]:
    return [pid for pid in pids if inode in socket_inodes(pid)]


def get_ok(port: int, target: str = "/w") -> None:
    with HttpClient(port, timeout=5) as c:
        resp = c.request(simple_get(target))
    assert (resp.status, resp.body) == (200, b"GET " + target.encode()), resp


def start_workers(
    run_proxy, backend_port: int, *flags: str, workers: str = "2", env=None
) -> ProxyProcess:
    return run_proxy(
        "--listen",
        "127.0.0.1:0",
        "--backend",
        f"127.0.0.1:{backend_port}",
        "--workers",
        workers,
        *flags,
        env=env,
    )


def test_workers_serve_the_connections(run_proxy, http_backend):
    proxy = start_workers(run_proxy, http_backend.port)
    workers = wait_for_children(proxy.pid, 2)
    # The supervisor says ready once it has forked; a worker still starting leaves every
    # connection to the other until it serves (the kernel queues them meanwhile).
    proxy.wait_for_logs(r"worker \d+ \(pid \d+\) serving", 2, timeout=10)
    for pid in workers:
        ppid = re.search(r"^PPid:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert ppid is not None
        assert int(ppid.group(1)) == proxy.pid

    # Held connections: each one is a worker's, never the main process's; both take some.
    # Both workers wait on the one listening socket and the first to accept wins: with the
    # machine busy (the whole suite running) one can win 40 times in a row, so up to 200.
    held: list[HttpClient] = []
    seen: dict[int, int] = dict.fromkeys(workers, 0)
    try:
        for i in range(200):
            c = HttpClient(proxy.port, timeout=5)
            held.append(c)
            assert c.request(simple_get(f"/held-{i}")).status == 200
            inode = proxy_side_inode(proxy.port, c.sock.getsockname()[1])
            owner = owners({*workers, proxy.pid}, inode)
            assert len(owner) == 1, owner
            assert owner[0] in workers, "the main process holds a client connection"
            seen[owner[0]] += 1
            if i >= 7 and all(seen.values()):
                break
        assert all(seen.values()), f"one worker served every connection: {seen}"
    finally:
        for c in held:
            c.close()
    assert proxy.stop() == 0
    assert not any(_alive(pid) for pid in workers), "a worker outlived the main process"


def test_ready_only_once_every_worker_serves(run_proxy, http_backend):
    """The supervisor says ready (the log line, and READY=1 to systemd with it) once every
    worker serves, not as soon as it has forked them: a service that says ready takes
    connections on all its workers."""
    proxy = start_workers(run_proxy, http_backend.port, workers="3")
    lines = proxy.log_text().splitlines()
    ready = [i for i, line in enumerate(lines) if re.search(r"\bready: 3 workers", line)]
    serving = [
        i for i, line in enumerate(lines) if re.search(r"worker \d \(pid \d+\) serving", line)
    ]
    assert len(ready) == 1, lines
    assert len(serving) == 3, lines
    assert max(serving) < ready[0], lines
    assert proxy.stop() == 0


def test_ready_to_systemd_only_once_every_worker_serves(http_backend, tmp_path: Path):
    """READY=1 itself (not only the log line) waits for every worker: the moment it arrives,
    the three "serving" lines are in the log. The log is a file here, written by each process
    before it tells the supervisor (a pipe read by a thread could lag behind the datagram)."""
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    log_path = tmp_path / "stderr.log"
    with log_path.open("ab") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rawproxy",
                *proxy_args(http_backend.port),
                "--workers",
                "3",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=REPO,
            env=notify_env(address),
        )
    try:
        ready = notify.wait_for(has("READY", "1"), timeout=15)
        logged = log_path.read_text()  # what was written before READY=1 arrived
        serving = re.findall(r"worker \d \(pid \d+\) serving", logged)
        assert len(serving) == 3, logged
        assert notify.messages[ready].get("MAINPID") == str(proc.pid)
        assert not any("READY" in m for m in notify.messages[:ready])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()


def test_killed_worker_is_restarted_and_service_goes_on(run_proxy, http_backend):
    proxy = start_workers(run_proxy, http_backend.port)
    workers = wait_for_children(proxy.pid, 2)
    for i in range(5):
        get_ok(proxy.port, f"/before-{i}")
    victim = min(workers)
    mark = proxy.mark()
    os.kill(victim, signal.SIGKILL)
    # Served throughout: right after the kill, while the worker comes back, and after.
    deadline = time.monotonic() + 2
    served = 0
    while time.monotonic() < deadline:
        get_ok(proxy.port, f"/during-{served}")
        served += 1
    assert served >= 5
    proxy.wait_for_log(r"restarting", since=mark)
    line = proxy.logs_matching(r"restarting", since=mark)[0]
    assert str(victim) in line, line
    new = wait_for_children(proxy.pid, 2, exclude=frozenset({victim}))
    assert len(new - workers) == 1, (workers, new)
    for i in range(10):
        get_ok(proxy.port, f"/after-{i}")
    assert proxy.stop() == 0


def test_sighup_reaches_every_worker(run_proxy, backends, tmp_path: Path):
    a, b = backends["a"], backends["b"]
    config = tmp_path / "rawproxy.toml"

    def write(backend: HttpBackend) -> None:
        config.write_text(
            f'listen = ["127.0.0.1:0"]\n\n[[route]]\nprefix = "/"\n'
            f'backend = "http://127.0.0.1:{backend.port}"\n'
        )

    write(a)
    proxy = run_proxy("--config", str(config), "--workers", "2")
    workers = wait_for_children(proxy.pid, 2)
    for i in range(6):
        get_ok(proxy.port, f"/a-{i}")
    assert len(a.heads) == 6
    write(b)
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_logs(r"reloaded", 2, since=mark)  # one per worker
    for i in range(12):
        get_ok(proxy.port, f"/b-{i}")
    assert len(a.heads) == 6, "a worker still uses the old configuration"
    assert len(b.heads) == 12
    assert children(proxy.pid) == workers, "a reload restarted workers"


def test_a_worker_restarted_after_a_reload_runs_the_reloaded_config(
    run_proxy, backends, tmp_path: Path
):
    """A worker that dies after a SIGHUP comes back with the configuration the others run,
    not the one of start-up (which would split traffic between the old and new backend)."""
    a, b = backends["a"], backends["b"]
    config = tmp_path / "rawproxy.toml"
    route = '\n\n[[route]]\nprefix = "/"\nbackend = "http://127.0.0.1:{}"\n'
    config.write_text('listen = ["127.0.0.1:0"]' + route.format(a.port))
    proxy = run_proxy("--config", str(config), "--workers", "2")
    workers = wait_for_children(proxy.pid, 2)
    config.write_text('listen = ["127.0.0.1:0"]' + route.format(b.port))
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_logs(r"reloaded", 2, since=mark)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_for_children(proxy.pid, 2, exclude=frozenset({victim}))
    proxy.wait_for_log(r"worker \d+ started", since=mark)
    for i in range(12):
        get_ok(proxy.port, f"/b-{i}")
    assert len(a.heads) == 0, "a restarted worker runs the configuration of start-up"
    assert len(b.heads) == 12


def test_workers_end_when_the_supervisor_is_killed(run_proxy, http_backend):
    """Outside systemd nothing else cleans up: a SIGKILLed supervisor must not leave workers
    serving the port (a new rawproxy would find it in use)."""
    proxy = start_workers(run_proxy, http_backend.port)
    workers = wait_for_children(proxy.pid, 2)
    os.kill(proxy.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived their supervisor"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", proxy.port))  # the port is free again


def test_sighup_right_after_ready_kills_no_worker(run_proxy, http_backend):
    """systemd may reload as soon as READY=1: a worker that has not installed its signal
    handlers yet must not die of the SIGHUP passed on to it (SIGHUP's default action). The
    window is a few milliseconds after the fork, so the start is tried a few times."""
    for _ in range(4):
        proxy = start_workers(run_proxy, http_backend.port)
        proxy.proc.send_signal(signal.SIGHUP)  # at once: `ready` was just logged
        workers = wait_for_children(proxy.pid, 2)
        time.sleep(0.5)
        assert not proxy.logs_matching(r"restarting|killed"), proxy.log_text()
        assert children(proxy.pid) == workers
        get_ok(proxy.port)
        assert proxy.stop() == 0


def test_sigterm_drains_every_worker(run_proxy, ws_backend, client):
    proxy = start_workers(run_proxy, ws_backend.port)
    workers = wait_for_children(proxy.pid, 2)
    ws_client = client(proxy.port)
    ws = open_websocket(ws_client)
    ws.send("before")
    assert ws.recv() == "before"

    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"drain", since=mark)
    assert_refused(proxy.port, PROMPT)  # the listener closes at once, in every process
    time.sleep(0.5)
    assert proxy.proc.poll() is None, proxy.log_text()
    ws.send("while draining")
    assert ws.recv() == "while draining"
    ws.close()
    ws_client.close()
    assert proxy.proc.wait(PROMPT + 2) == 0
    # The supervisor's last line says the stop was orderly, after each worker's own.
    proxy.wait_for_log(rf"rawproxy \(pid {proxy.pid}\) stopped: every worker ended", mark)
    assert len(proxy.logs_matching(r"worker \d+ \(pid \d+\) stopped", mark)) == 2
    assert not any(_alive(pid) for pid in workers)


def test_workers_auto_is_one_per_cpu(run_proxy, http_backend):
    proxy = start_workers(run_proxy, http_backend.port, workers="auto")
    cpus = {os.cpu_count(), len(os.sched_getaffinity(0))}
    found = children(proxy.pid)
    deadline = time.monotonic() + 10
    while len(found) not in cpus and time.monotonic() < deadline:
        time.sleep(0.05)
        found = children(proxy.pid)
    assert len(found) in cpus, (found, cpus)
    get_ok(proxy.port)


def test_only_the_main_process_speaks_to_systemd(run_proxy, http_backend, tmp_path: Path):
    """With NotifyAccess=main, systemd listens to the main PID only: READY, RELOADING,
    STOPPING and the watchdog must all come from it (SCM_CREDENTIALS tell the sender)."""
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    try:
        proxy = start_workers(
            run_proxy,
            http_backend.port,
            env=notify_env(address, WATCHDOG_USEC="400000"),
        )
        workers = wait_for_children(proxy.pid, 2)
        ready = notify.wait_for(has("READY", "1"))
        assert notify.messages[ready].get("MAINPID") == str(proxy.pid), notify.messages[ready]
        notify.wait_for(has("WATCHDOG", "1"), since=ready)
        get_ok(proxy.port)
        mark = len(notify.messages)
        proxy.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(has("RELOADING", "1"), since=mark)
        notify.wait_for(has("READY", "1"), since=reloading + 1)
        proxy.wait_for_logs(r"reloaded", 2)
        get_ok(proxy.port)
        mark = len(notify.messages)
        proxy.proc.send_signal(signal.SIGTERM)
        notify.wait_for(has("STOPPING", "1"), since=mark)
        assert proxy.proc.wait(PROMPT + 2) == 0
        notify.collect(0.1)
        assert set(notify.senders) == {proxy.pid}, (notify.senders, workers)
    finally:
        notify.close()


@pytest.mark.timeout(60)
def test_status_line_sums_what_the_workers_carry(run_proxy, ws_backend, client, tmp_path: Path):
    """With --workers, `systemctl status` showed "2 workers" and nothing of the traffic, where
    a single process shows its open connections and tunnels. Each worker now reports its
    counts to the supervisor from its loop, and the STATUS= line, every 10 s, is their sum
    (here a tunnel and two connections that sent nothing yet, wherever the kernel put them)."""
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    try:
        # The watchdog makes the workers report every 0.5 s: the first STATUS is then current.
        proxy = start_workers(
            run_proxy, ws_backend.port, env=notify_env(address, WATCHDOG_USEC="1000000")
        )
        ready = notify.wait_for(has("READY", "1"))
        ws_client = client(proxy.port)
        ws = open_websocket(ws_client)
        kept = [client(proxy.port) for _ in range(2)]  # nothing sent yet: HTTP connections
        wanted = "2 workers: 2 HTTP connections, 1 tunnels"
        notify.wait_for(lambda m: m.get("STATUS") == wanted, since=ready + 1, timeout=25)
        ws.close()
        ws_client.close()
        for c in kept:
            c.close()
        at = notify.wait_for(
            lambda m: m.get("STATUS") == "2 workers: 0 HTTP connections, 0 tunnels",
            since=ready + 1,
            timeout=25,
        )
        statuses = [m["STATUS"] for m in notify.messages[ready + 1 : at] if "STATUS" in m]
        assert all(s.startswith("2 workers: ") for s in statuses), statuses
    finally:
        notify.close()


def test_sighup_while_the_workers_drain_tells_systemd_nothing(
    run_proxy, ws_backend, client, tmp_path: Path
):
    """After STOPPING=1, a SIGHUP (logrotate's) is passed to the draining workers, but the
    supervisor does not tell systemd RELOADING=1 and READY=1 as if it served again."""
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    try:
        proxy = start_workers(run_proxy, ws_backend.port, env=notify_env(address))
        notify.wait_for(has("READY", "1"))
        ws_client = client(proxy.port)
        ws = open_websocket(ws_client)  # keeps one worker draining
        mark = proxy.mark()
        proxy.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for(has("STOPPING", "1"))
        proxy.wait_for_log(r"stopped", since=mark)  # the worker without the WebSocket
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for_log(r"SIGHUP received", since=mark)
        proxy.wait_for_log(r"SIGHUP received while draining", since=mark)  # the other worker
        notify.collect(0.3)
        after = notify.messages[stopping + 1 :]
        assert not any("READY" in m or "RELOADING" in m for m in after), notify.messages
        ws.send("still here")
        assert ws.recv() == "still here"
        ws.close()
        ws_client.close()
        assert proxy.proc.wait(PROMPT) == 0
    finally:
        notify.close()


def test_a_worker_that_cannot_start_stops_rawproxy(http_backend, sockets):
    """A start-up problem met by a worker (here worker 1's admin port, --admin-listen's + 1, is
    in use) stops rawproxy with a non-zero exit code, as it stops a single process; it was
    a restart every second for ever, the service never ready and never failed."""
    admin = 0
    for _ in range(50):
        port = free_port()
        blocker = socket.socket()
        sockets.append(blocker)
        try:
            blocker.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        blocker.listen(1)
        admin = port
        break
    assert admin, "no pair of free ports"
    args = ("--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{http_backend.port}")
    try:
        done = run_rawproxy(
            *args, "--workers", "2", "--admin-listen", f"127.0.0.1:{admin}", timeout=10
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"still running after 10 s:\n{e.stderr}") from None
    assert done.returncode == 1, done.stderr
    assert re.search(
        rf"worker 1 cannot start: cannot listen on 127\.0\.0\.1:{admin + 1}", done.stderr
    )
    assert done.stderr.splitlines()[-1].endswith("stopped: a worker could not start"), done.stderr
    assert not re.search(r"restarting", done.stderr), done.stderr


@pytest.mark.parametrize("problem", ["certificate", "backend name"])
def test_workers_refuse_a_bad_configuration_in_one_line(problem, tmp_path):
    """What a single process refuses before it listens is refused by the supervisor too, once,
    on the `rawproxy: error:` line, before any worker forks: it was two per-worker lines and
    a "worker could not start", with no error line (the lifecycle review, session 22)."""
    if problem == "certificate":
        bad = tmp_path / "bad.pem"
        bad.write_text("not a certificate\n")
        args = ("--backend", "127.0.0.1:9", "--cert", str(bad), "--key", str(bad))
        expected = "holds no PEM certificate"
    else:
        args = ("--backend", "no-such-host.invalid:80")
        expected = "cannot resolve the backend host 'no-such-host.invalid'"
    done = run_rawproxy("--listen", "127.0.0.1:0", *args, "--workers", "2", timeout=20)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("rawproxy: error:")]
    assert len(errors) == 1, done.stderr
    assert expected in errors[0], done.stderr
    assert not re.search(r"listening on|worker \d+ (started|cannot start)", done.stderr), (
        done.stderr
    )


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="no systemd-socket-activate (apt: systemd)")
def test_workers_share_sockets_from_systemd(run_proxy, http_backend):
    proxy, port = start_activated(
        run_proxy, "http", "--backend", f"127.0.0.1:{http_backend.port}", "--workers", "2"
    )
    workers = wait_for_children(proxy.pid, 2)
    for i in range(10):
        get_ok(port, f"/activated-{i}")
    assert children(proxy.pid) == workers
    assert proxy.stop() == 0


def test_each_worker_has_its_own_admin_listener(run_proxy, http_backend):
    """--admin-listen 127.0.0.1:0: each worker serves /metrics of its own on a port of its
    own; the counters of all workers add up to the traffic."""
    proxy = start_workers(run_proxy, http_backend.port, "--admin-listen", "127.0.0.1:0")
    workers = wait_for_children(proxy.pid, 2)
    lines = proxy.wait_for_logs(r"admin on 127\.0\.0\.1:\d+", 2)
    ports = {int(re.search(r"admin on 127\.0\.0\.1:(\d+)", line).group(1)) for line in lines}
    assert len(ports) == 2, lines
    # Each admin port belongs to one worker.
    holders = set()
    for port in ports:
        inode = listening_inode(port)
        owner = owners(workers | {proxy.pid}, inode)
        assert len(owner) == 1, owner
        assert owner[0] in workers
        holders.add(owner[0])
    assert holders == workers
    before = {port: Metrics(port) for port in ports}
    for i in range(20):
        get_ok(proxy.port, f"/counted-{i}")
    after = {port: Metrics(port) for port in ports}

    def total(name: str, **labels: str) -> float:
        return sum(after[p](name, **labels) - before[p](name, **labels) for p in ports)

    assert total("rawproxy_requests_total", code_class="2xx") == 20
    assert total("rawproxy_connections_total") == 20
    for port in ports:
        assert admin_get(port, "/healthz").status == 200


def listening_inode(port: int) -> int:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            return int(fields[9])
    raise AssertionError(f"nothing listens on {port}")


def test_no_worker_is_started_once_the_drain_began(run_proxy, ws_backend, client):
    """A worker that dies right after its start is restarted after a pause (QUICK_DEATH); a
    SIGTERM during that pause cancels the restart: no worker is forked onto the listeners
    the drain closed (it failed with a traceback, as if the service had a new problem)."""
    proxy = start_workers(run_proxy, ws_backend.port)
    ws_client = client(proxy.port)
    ws = open_websocket(ws_client)
    inode = proxy_side_inode(proxy.port, ws_client.sock.getsockname()[1])
    holder = owners(wait_for_children(proxy.pid, 2), inode)[0]
    other = next(iter(wait_for_children(proxy.pid, 2) - {holder}))
    time.sleep(1.2)  # past QUICK_DEATH: this first death is restarted at once
    mark = proxy.mark()
    os.kill(other, signal.SIGKILL)
    started = proxy.wait_for_log(r"worker \d+ started \(pid \d+\)", since=mark)
    young = re.search(r"pid (\d+)", started)
    assert young is not None
    os.kill(int(young.group(1)), signal.SIGKILL)  # dies young: restarted after the pause
    proxy.wait_for_log(rf"pid {young.group(1)}\) ended", since=mark)

    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"the workers drain", since=mark)
    time.sleep(2.0)  # twice the pause: the restart would have come
    ws.send("still here")
    assert ws.recv() == "still here"
    text = proxy.log_text(mark)
    assert not re.search(r"worker \d+ (started|failed|cannot start)", text), text
    ws.close()
    ws_client.close()
    assert proxy.proc.wait(PROMPT) == 0
