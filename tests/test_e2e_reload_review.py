"""A review of reload (SIGHUP, `systemctl reload`) under load, end to end.

README, "Running it in production": "Reload (SIGHUP, systemctl reload): the config file and
certificates are read anew for new connections; listeners are added or removed; open
connections and tunnels keep the settings they started with. A broken file keeps the old
configuration and says why." (Since session 24 a kept-alive connection follows a reload at
its next request; tunnels still keep theirs.)

From a review in session 23. A docstring starting "Fixed:" describes, in the present tense
of the review, a fault of the code as it was, and what is expected now (each test was red
before its fix, in the same session); the others cover ground the existing reload tests
(test_e2e_lifecycle, test_e2e_workers, test_e2e_tls, test_e2e_systemd) do not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peers import (
    Background,
    HttpBackend,
    HttpClient,
    Metrics,
    NotifySocket,
    ProxyProcess,
    assert_refused,
    free_port,
    has,
    notify_env,
    open_websocket,
    served_by,
    simple_get,
    start_activated,
)
from tls_peers import Pki

# --- helpers ----------------------------------------------------------------------------------


def q(value: object) -> str:
    """A TOML string."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml(
    listen: list[str] | None,
    routes: dict[str, str],
    *extra: str,
    certs: list[tuple[Path, Path]] | None = None,
) -> str:
    """A config file: listen, top-level `extra` lines (`key = value`), routes, certificates."""
    lines = [] if listen is None else [f"listen = [{', '.join(q(w) for w in listen)}]"]
    lines += list(extra)
    for prefix, url in routes.items():
        lines += ["", "[[route]]", f"prefix = {q(prefix)}", f"backend = {q(url)}"]
    for cert, key in certs or []:
        lines += ["", "[[certificate]]", f"cert = {q(cert)}", f"key = {q(key)}"]
    return "\n".join(lines) + "\n"


def start_on_a_free_port(
    proxies: Callable[..., ProxyProcess], config: Path, text: Callable[[int], str]
) -> tuple[ProxyProcess, int]:
    """A proxy run from `config`, written as `text(port)` for a free port (another one if
    that was taken before the proxy bound it). The proxy and the port."""
    for attempt in range(3):
        port = free_port()
        config.write_text(text(port))
        try:
            return proxies("--config", str(config)), port
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def url(backend: HttpBackend | int) -> str:
    port = backend if isinstance(backend, int) else backend.port
    return f"http://127.0.0.1:{port}"


def sighup(proxy: ProxyProcess, expect: str = r"SIGHUP: reloaded", count: int = 1) -> int:
    """Send SIGHUP and wait for `count` log lines matching `expect`; the log mark before."""
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_logs(expect, count, since=mark, timeout=10)
    return mark


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def listening_sockets(pid: int) -> list[str]:
    """The local addresses (ip:port, hex as in /proc/net/tcp) of `pid`'s listening TCP
    sockets, one entry per socket (duplicates show duplicate listeners)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    found.append(fields[1])
    return found


def port_bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
        except OSError:
            return False
    return True


def answered_within(sock: socket.socket, seconds: float) -> bytes:
    """What `sock` receives within `seconds` (b"" if nothing)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


@pytest.fixture
def proxies() -> Iterator[Callable[..., ProxyProcess]]:
    """`proxies(*args, env=None, launcher=())`: `python -m rawproxy ARGS`, stopped at teardown
    (SIGTERM, then a second one). Unlike conftest's run_proxy, a traceback in the log is left
    for the test to judge (a test about one fails on its own assertion)."""
    made: list[ProxyProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, launcher=()) -> ProxyProcess:
        proc = ProxyProcess(list(args), env=env, launcher=launcher)
        made.append(proc)
        return proc

    yield start
    for proc in made:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGTERM)
    for proc in made:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(5)
        proc.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki-review-reload"))


# --- limits changed by a reload -------------------------------------------------------------


@pytest.mark.timeout(40)
def test_raising_max_connections_by_reload_lets_waiting_clients_in(
    proxies, ws_backend, client, tmp_path: Path
):
    """Fixed: at --max-connections with no idle connection to close (here two open
    WebSockets at max-connections = 2), a new client waits in the listen backlog, as the
    README says, and the log tells the admin so. The admin raises max-connections in the
    file and reloads: the log says "reloaded", but the waiting client (and every client after
    it) still waits until one of the old connections ends, for as long as the WebSockets
    last. The reload applies the new limit to `Server.max_connections` but never puts the
    listeners back in the loop (`Server.reload` does not call `_accept_on`; they were taken
    out by `_accept` at the limit, and only a connection ending or going idle puts them back).
    Expected: after the reload that raises the limit, the waiting client is accepted and
    served at once (HAProxy and nginx apply a raised maxconn / worker_connections to new
    connections as soon as the reload is done)."""
    config = tmp_path / "rawproxy.toml"
    routes = {"/": url(ws_backend.port)}
    config.write_text(toml(["127.0.0.1:0"], routes, "max-connections = 2"))
    proxy = proxies("--config", str(config))
    tunnels = []
    for _ in range(2):
        c = client(proxy.port)
        ws = open_websocket(c)
        ws.send("hi")
        assert ws.recv() == "hi"
        tunnels.append(ws)
    waiting = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        waiting.sendall(simple_get("/waiting"))
        assert answered_within(waiting, 1.0) == b"", "the limit of 2 did not hold"
        proxy.wait_for_log(r"connections open \(--max-connections\)")
        config.write_text(toml(["127.0.0.1:0"], routes, "max-connections = 100"))
        sighup(proxy)
        got = answered_within(waiting, 3.0)
        assert got.startswith(b"HTTP/1.1 "), (
            "raised --max-connections by reload, yet the waiting client got no answer in 3 s "
            "(the two WebSockets are still open)"
        )
        with HttpClient(proxy.port, timeout=3) as c:
            c.send(simple_get("/after"))
            assert c.read_head()[0] != 0
    finally:
        waiting.close()
    for ws in tunnels:
        ws.send("still")
        assert ws.recv() == "still"


# --- listeners --------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_reload_turning_a_plain_listener_into_tls_on_the_same_port(
    proxies, backends, pki, tmp_path: Path
):
    """Fixed: a reload cannot change what a listener speaks while keeping its address:
    `tcp://127.0.0.1:P` -> `tls://127.0.0.1:P` (the admin turns TLS on, with the certificate
    already configured) is refused with "SIGHUP: keeping the current configuration and
    certificates: cannot listen on 127.0.0.1:P: the address is already in use". The proxy
    itself holds the port: `Server.reload` matches listeners by the whole `ListenAddress`
    (host, port *and* tls), so a changed scheme is "a new listener" that is opened (bind)
    before the old one is closed, and the bind fails. The same happens to a mere respelling
    (`127.0.0.1:P` -> `tcp://127.0.0.1:P`, identical without certificates).
    Expected: the listening socket is kept (matched by host and port) and new connections get
    the new scheme, as nginx does: checked on loopback, nginx 1.x with `listen 127.0.0.1:P`
    then `listen 127.0.0.1:P ssl` and SIGHUP answers https on P at once; or at least the old
    socket is closed before the new bind."""
    a, b = backends["a"], backends["b"]
    config = tmp_path / "rawproxy.toml"
    certs = [(pki.server.cert, pki.server.key)]
    proxy, port = start_on_a_free_port(
        proxies, config, lambda p: toml([f"tcp://127.0.0.1:{p}"], {"/": url(a)}, certs=certs)
    )
    assert served_by(port, backends) == "a"  # plain HTTP, certificates or not
    kept = HttpClient(port, timeout=5)  # a plain connection open across the reload
    try:
        assert kept.request(simple_get("/kept")).status == 200
        config.write_text(toml([f"tls://127.0.0.1:{port}"], {"/": url(b)}, certs=certs))
        mark = sighup(proxy, expect=r"SIGHUP: (reloaded|keeping)")
        assert not proxy.logs_matching(r"keeping", since=mark), proxy.log_text(mark)
        with HttpClient(port, timeout=5, ssl_context=pki.client_context()) as c:
            assert c.request(simple_get("/over-tls")).status == 200
        assert b.heads[-1].target == b"/over-tls"
        # The old connection stays plain; its next request follows the new routes.
        assert kept.request(simple_get("/kept-again")).status == 200
        assert b.heads[-1].target == b"/kept-again"
        assert a.heads[-1].target == b"/kept"
    finally:
        kept.close()


@pytest.mark.timeout(40)
def test_a_refused_reload_leaves_a_respelled_listener_as_it_was(
    proxies, backends, pki, tmp_path: Path, sockets
):
    """A reload is all or nothing: one that turns a listener's TLS on and also asks for a
    port that cannot be had is refused whole, and the listener still speaks plain HTTP (the
    respelling waits until every new listener is open)."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    certs = [(pki.server.cert, pki.server.key)]
    taken = socket.socket()
    sockets.append(taken)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    busy = taken.getsockname()[1]
    proxy, port = start_on_a_free_port(
        proxies, config, lambda p: toml([f"tcp://127.0.0.1:{p}"], {"/": url(a)}, certs=certs)
    )
    config.write_text(
        toml([f"tls://127.0.0.1:{port}", f"127.0.0.1:{busy}"], {"/": url(a)}, certs=certs)
    )
    mark = sighup(proxy, expect=r"SIGHUP: keeping the current configuration")
    assert not proxy.logs_matching(r"is now a", since=mark), proxy.log_text(mark)
    assert served_by(port, {"a": a}) == "a"  # plain HTTP still


# --- a broken file ------------------------------------------------------------------------------

# A backend host with a DNS label over 63 characters: Python's getaddrinfo encodes it with the
# idna codec first, which raises UnicodeError (not socket.gaierror). "a..b" does the same.
LONG_LABEL_HOST = "a" * 64 + ".example"


@pytest.mark.timeout(40)
def test_reload_with_a_backend_name_idna_refuses_is_one_line_and_keeps_serving(
    proxies, backends, tmp_path: Path
):
    """Fixed: a config file whose backend host has a label longer than 63 characters (or
    an empty one, `a..b`: a typo) is, on SIGHUP, not "a broken file [that] keeps the old
    configuration and says why": `resolve_backend` catches only socket.gaierror, and
    getaddrinfo raises UnicodeError from the idna codec, so the exception leaves
    `Server.reload` (which catches ConfigError and StartupError only) and reaches the loop's
    last-resort handler: a traceback under "ERROR internal error; closing the affected
    connection" (no connection is closed, none is at fault) and no "SIGHUP: keeping ..."
    line. `rawproxy --check-config` on the same file dies with a traceback too.
    Expected: one line, "SIGHUP: keeping the current configuration and certificates: cannot
    resolve the backend host ...", as for a name that does not resolve; fix in
    server.resolve_backend (catch UnicodeError, or validate labels in config.parse_backend)."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    config.write_text(toml(["127.0.0.1:0"], {"/": url(a)}))
    proxy = proxies("--config", str(config))
    assert served_by(proxy.port, backends) == "a"
    config.write_text(toml(["127.0.0.1:0"], {"/": f"http://{LONG_LABEL_HOST}:80"}))
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    with contextlib.suppress(TimeoutError):
        proxy.wait_for_log(r"SIGHUP: keeping|internal error", since=mark, timeout=10)
    time.sleep(0.2)  # the rest of a traceback, if any
    assert served_by(proxy.port, backends) == "a"
    log = proxy.log_text(mark)
    assert "Traceback" not in log, log
    assert len(proxy.logs_matching(r"SIGHUP: keeping the current configuration", mark)) == 1, log


@pytest.mark.timeout(40)
def test_workers_reload_with_a_backend_name_idna_refuses_tells_systemd_ready(
    proxies, backends, tmp_path: Path
):
    """Fixed: with --workers it is worse. The same file (a backend label over 63 characters)
    and SIGHUP to the supervisor. Its `reload` says RELOADING=1 to systemd, then reads and
    checks the file catching only ConfigError and StartupError; the UnicodeError from
    getaddrinfo escapes before `tell_workers` and before READY=1. So systemd never hears
    READY=1 after RELOADING=1 (`systemctl reload` hangs until its timeout and the unit is
    left "reloading"), the workers never get the SIGHUP (their access logs are not reopened:
    logrotate's postrotate goes unheard), and the supervisor logs a traceback as "internal
    error; closing the affected connection".
    Expected: RELOADING=1 then READY=1, the SIGHUP passed to every worker, and each says in
    one line that it keeps its configuration (workers.run_workers.reload: catch every
    exception of reread/check_config, and send READY=1 in a finally, as Server does)."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    config.write_text(toml(["127.0.0.1:0"], {"/": url(a)}))
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    try:
        proxy = proxies("--config", str(config), "--workers", "2", env=notify_env(address))
        notify.wait_for(has("READY", "1"))
        assert served_by(proxy.port, backends) == "a"
        config.write_text(toml(["127.0.0.1:0"], {"/": f"http://{LONG_LABEL_HOST}:80"}))
        mark = proxy.mark()
        since = len(notify.messages)
        proxy.proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for(has("RELOADING", "1"), since=since)
        with contextlib.suppress(TimeoutError):
            notify.wait_for(has("READY", "1"), since=reloading + 1, timeout=5)
        with contextlib.suppress(TimeoutError):
            proxy.wait_for_logs(r"SIGHUP: keeping", 2, since=mark, timeout=3)
        log = proxy.log_text(mark)
        assert any("READY" in m for m in notify.messages[reloading + 1 :]), (
            f"RELOADING=1 without READY=1: {notify.messages[since:]}\n{log}"
        )
        assert len(proxy.logs_matching(r"SIGHUP: keeping", mark)) == 2, log  # each worker
        assert "Traceback" not in log, log
        assert served_by(proxy.port, backends) == "a"
    finally:
        notify.close()


# --- settings a reload silently leaves as they were --------------------------------------------


def lines_of(path: Path, count: int, timeout: float = 3.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


@pytest.mark.timeout(40)
def test_reload_applies_a_changed_log_level(proxies, backends, tmp_path: Path):
    """log-level follows the file on reload: at "warning" the INFO lines (here the access
    lines on stderr) stop, back at "info" they come again. Before session 23 the level of
    start-up stayed."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    routes = {"/": url(a)}
    config.write_text(toml(["127.0.0.1:0"], routes, 'log-level = "info"'))
    proxy = proxies("--config", str(config))
    for level, target in (("warning", "/quiet"), ("info", "/heard")):
        config.write_text(toml(["127.0.0.1:0"], routes, f'log-level = "{level}"'))
        if level == "info":
            sighup(proxy)
        else:  # the reload's own lines are INFO: not shown at "warning"
            proxy.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
        with HttpClient(proxy.port, timeout=5) as c:
            assert c.request(simple_get(target)).status == 200
    proxy.wait_for_log(r'"GET /heard HTTP/1\.1" 200')
    assert not proxy.logs_matching(r"GET /quiet"), proxy.log_text()


@pytest.mark.timeout(40)
def test_reload_applies_a_changed_access_log_file_and_format(proxies, backends, tmp_path: Path):
    """Fixed: `access-log` and `access-log-format` changed in the config file are ignored by
    a reload that logs "SIGHUP: reloaded configuration and certificates": the Server builds
    its AccessLog once (`Server.__init__`) and `reload` only reopens it under the old name
    (`AccessLog.reopen` uses the path of start-up). Lines keep going to the old file in the
    old format, with nothing in the log to say the new settings wait for a restart (the same
    holds for `log-level` and `admin-listen`). The README promises "the config file [is] read
    anew for new connections" with no exception for these keys; nginx applies a changed
    `access_log` path and format on reload.
    Expected: requests after the reload are logged to the new file in the new format, or the
    reload says in its log line that these settings need a restart."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    routes = {"/": url(a)}
    config.write_text(toml(["127.0.0.1:0"], routes, f"access-log = {q(first)}"))
    proxy = proxies("--config", str(config))
    with HttpClient(proxy.port, timeout=5) as c:
        assert c.request(simple_get("/before")).status == 200
    assert len(lines_of(first, 1)) == 1
    config.write_text(
        toml(
            ["127.0.0.1:0"],
            routes,
            f"access-log = {q(second)}",
            'access-log-format = "json"',
        )
    )
    sighup(proxy)
    with HttpClient(proxy.port, timeout=5) as c:
        assert c.request(simple_get("/after")).status == 200
    new = lines_of(second, 1)
    old = lines_of(first, 2, timeout=0.5)
    assert len(old) == 1, f"a request after the reload went to the old file: {old}"
    assert len(new) == 1, new
    assert new[0].startswith("{"), new
    assert "/after" in new[0], new


# --- certificates -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    not os.path.exists("/usr/bin/systemd-socket-activate"), reason="no systemd-socket-activate"
)
def test_reload_without_certificates_keeps_a_systemd_tls_socket_tls(
    proxies, backends, pki, tmp_path: Path
):
    """Fixed: with rawproxy.socket passing a socket named `tls` (FileDescriptorName=tls, the
    README's set-up), start-up refuses a configuration without a certificate ("is a TLS
    listener, but no certificate is configured"), so as not to serve plain HTTP on a TLS
    port. A reload of the same configuration is accepted ("SIGHUP: reloaded"): `Server.reload`
    never checks the inherited listeners against the new certificates (only `build_config`'s
    check for tls:// listeners runs, and a systemd socket is not one), and `Server._accept`
    then hands new clients of the TLS socket a plain session (`runtime.client_tls` is None).
    Every browser's handshake on :443 fails from then on, and the reload said it went well.
    Expected: the reload is refused like any broken file ("SIGHUP: keeping the current
    configuration and certificates: ... TLS listener ... no certificate") and new
    connections still get TLS."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    routes = {"/": url(a)}
    certs = [(pki.server.cert, pki.server.key)]
    config.write_text(toml(None, routes, certs=certs))
    context = pki.client_context()
    proxy, port = start_activated(proxies, "tls", "--config", str(config), ssl_context=context)
    assert proxy.logs_matching(rf"listening on 127\.0\.0\.1:{port} \(tls\)"), proxy.log_text()
    config.write_text(toml(None, routes))  # the [[certificate]] table gone
    mark = sighup(proxy, expect=r"SIGHUP: (reloaded|keeping)")
    log = proxy.log_text(mark)
    try:
        with HttpClient(port, timeout=5, ssl_context=context) as c:
            status = c.request(simple_get("/after")).status
    except (ssl.SSLError, OSError) as e:
        raise AssertionError(f"no TLS on the tls socket after the reload ({e!r}):\n{log}") from e
    assert status == 200
    assert proxy.logs_matching(r"SIGHUP: keeping", mark), log


# --- kept-alive connections follow a reload at their next request; tunnels do not ------------


@pytest.mark.timeout(40)
def test_kept_alive_connection_follows_a_reload_at_its_next_request(
    proxies, backends, tmp_path: Path
):
    """Fixed (session 24): a kept-alive client connection opened before a reload that moves
    its route to another backend kept the old backend for as long as the client kept it
    busy: a browser polling every few seconds never saw the reload. nginx, HAProxy and Caddy
    all close kept-alive connections at a reload (idle ones at once, busy ones after their
    answer), so the next request meets the new configuration. Here the connection stays open
    and its next requests (also pipelined in one write) go to the new backend, over a new
    backend connection."""
    a, b = backends["a"], backends["b"]
    config = tmp_path / "rawproxy.toml"
    config.write_text(toml(["127.0.0.1:0"], {"/": url(a)}))
    proxy = proxies("--config", str(config))
    with HttpClient(proxy.port, timeout=5) as kept:
        assert kept.request(simple_get("/one")).status == 200
        config.write_text(toml(["127.0.0.1:0"], {"/": url(b)}))
        sighup(proxy)
        kept.send(simple_get("/p1") + simple_get("/p2") + simple_get("/p3"))
        for _ in range(3):
            assert kept.read_response().status == 200
        assert kept.request(simple_get("/last")).status == 200
    assert [r.target for r in a.heads] == [b"/one"]
    targets_b = [r.target for r in b.heads]
    assert targets_b == [b"/p1", b"/p2", b"/p3", b"/last"], targets_b
    assert len({r.conn_id for r in b.heads}) == 1  # one backend connection, kept alive


@pytest.mark.timeout(40)
def test_reloaded_timeouts_apply_to_new_connections_and_new_requests(
    proxies, backends, ws_backend, client, tmp_path: Path
):
    """Covers the timers (nothing else does): --idle-timeout and --tunnel-idle-timeout
    changed by a reload apply to connections accepted after it; a kept-alive connection
    waiting since before keeps the timer it was given, and takes the new value with its
    next request (session 24); a WebSocket from before keeps its own."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    routes = {"/": url(a), "/ws": url(ws_backend.port)}
    config.write_text(toml(["127.0.0.1:0"], routes, "idle-timeout = 30"))
    proxy = proxies("--config", str(config))
    old_http = client(proxy.port)
    assert old_http.request(simple_get("/old")).status == 200
    old_ws = open_websocket(client(proxy.port), "/ws")
    config.write_text(
        toml(["127.0.0.1:0"], routes, "idle-timeout = 1", 'tunnel-idle-timeout = "1s"')
    )
    sighup(proxy)
    new_http = client(proxy.port)
    assert new_http.request(simple_get("/new")).status == 200
    new_ws_client = client(proxy.port)
    open_websocket(new_ws_client, "/ws")
    started = time.monotonic()
    assert new_http.wait_closed(5)[0] == "eof"  # the new idle-timeout, 1 s
    assert new_ws_client.wait_closed(5)[0] in ("eof", "reset")  # the new tunnel one, 1 s
    assert time.monotonic() - started < 4
    time.sleep(max(0.0, 2.5 - (time.monotonic() - started)))
    # The old ones, idle as long, are still open under their own settings.
    assert old_http.request(simple_get("/old-later")).status == 200
    old_ws.send("still here")
    assert old_ws.recv() == "still here"
    # Its request took the new settings: idle again, it goes after 1 s, as a new one does.
    started = time.monotonic()
    assert old_http.wait_closed(5)[0] == "eof"
    assert time.monotonic() - started < 3


@pytest.mark.timeout(60)
def test_removed_listener_keeps_its_connections_frees_its_port_and_comes_back(
    proxies, backends, ws_backend, client, tmp_path: Path
):
    """Covers a listener removed by a reload while a kept-alive connection and a WebSocket
    accepted on it are open (the lifecycle test removes an idle one): both keep working until
    they end; the port is free at once for another program (it can bind and listen on it
    while those connections last); once that program is gone, a later reload adds the same
    port again, and the old connections still work."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    routes = {"/": url(a), "/ws": url(ws_backend.port)}
    proxy, extra = start_on_a_free_port(
        proxies, config, lambda p: toml(["127.0.0.1:0", f"127.0.0.1:{p}"], routes)
    )
    assert extra in proxy.ports
    kept = client(extra)
    assert kept.request(simple_get("/kept")).status == 200
    ws = open_websocket(client(extra), "/ws")
    config.write_text(toml(["127.0.0.1:0"], routes))
    mark = sighup(proxy)
    assert proxy.logs_matching(rf"no longer listening on 127\.0\.0\.1:{extra}", mark)
    assert_refused(extra)
    assert port_bindable(extra), "the removed listener's port is still held"
    assert kept.request(simple_get("/kept-after-removal")).status == 200
    ws.send("after removal")
    assert ws.recv() == "after removal"
    config.write_text(toml(["127.0.0.1:0", f"127.0.0.1:{extra}"], routes))
    mark = sighup(proxy)
    assert proxy.logs_matching(rf"listening on 127\.0\.0\.1:{extra}", mark)
    assert served_by(extra, backends) == "a"
    assert kept.request(simple_get("/kept-after-readding")).status == 200
    ws.send("after re-adding")
    assert ws.recv() == "after re-adding"
    assert len(listening_sockets(proxy.pid)) == 2


# --- many reloads under traffic (passing: not covered elsewhere) --------------------------------


@pytest.mark.timeout(90)
def test_ten_sighups_in_a_row_under_traffic(proxies, backends, ws_backend, pki, tmp_path: Path):
    """Covers reloads under load (nothing else does): ten SIGHUPs in a row, while clients
    make requests on new plain and TLS connections, a kept-alive connection makes more and a
    WebSocket echoes. No request fails; the proxy ends with as many descriptors as it had
    before (no leak of access-log files, listeners or contexts), listens on each address
    once (no duplicate listener); the requests counter and the access log count every
    request exactly once."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    access = tmp_path / "access.log"
    routes = {"/": url(a), "/ws": url(ws_backend.port)}
    certs = [(pki.server.cert, pki.server.key)]
    config.write_text(
        toml(
            ["tcp://127.0.0.1:0", "tls://127.0.0.1:0"],
            routes,
            f"access-log = {q(access)}",
            'admin-listen = "127.0.0.1:0"',
            certs=certs,
        )
    )
    proxy = proxies("--config", str(config))
    plain_port, tls_port = proxy.ports
    context = pki.client_context()
    kept = HttpClient(plain_port, timeout=5)
    ws_client = HttpClient(plain_port, timeout=5)
    ws = open_websocket(ws_client, "/ws")
    assert kept.request(simple_get("/warm")).status == 200
    with HttpClient(tls_port, timeout=5, ssl_context=context) as c:
        assert c.request(simple_get("/warm-tls")).status == 200
    time.sleep(0.2)
    fds_before = fd_count(proxy.pid)
    listening_before = sorted(listening_sockets(proxy.pid))
    stop = threading.Event()
    outcomes: list[object] = []
    lock = threading.Lock()

    def traffic(tls: bool) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if tls:
                    with HttpClient(tls_port, timeout=5, ssl_context=context) as c:
                        status = c.request(simple_get(f"/tls-{n}")).status
                else:
                    with HttpClient(plain_port, timeout=5) as c:
                        status = c.request(simple_get(f"/plain-{n}")).status
            except Exception as e:
                status = repr(e)
            with lock:
                outcomes.append(status)

    workers = [Background(traffic, False), Background(traffic, True)]
    mark = proxy.mark()
    kept_statuses = []
    for i in range(10):
        os.kill(proxy.pid, signal.SIGHUP)
        kept_statuses.append(kept.request(simple_get(f"/kept-{i}")).status)
        ws.send(f"echo {i}")
        assert ws.recv() == f"echo {i}"
        time.sleep(0.05)
    proxy.wait_for_log(r"SIGHUP: reloaded", since=mark)
    time.sleep(0.3)
    stop.set()
    for worker in workers:
        worker.join(20)
    assert not proxy.logs_matching(r"keeping|error|internal", since=mark), proxy.log_text(mark)
    reloads = len(proxy.logs_matching(r"SIGHUP: reloaded", since=mark))
    assert 1 <= reloads <= 10
    assert kept_statuses == [200] * 10
    assert outcomes
    assert all(o == 200 for o in outcomes), [o for o in outcomes if o != 200]
    ws.send("done")
    assert ws.recv() == "done"
    total = 2 + 10 + len(outcomes)  # the warm-up, the kept-alive ones, the traffic
    m = Metrics(proxy.admin_port)
    assert m("rawproxy_requests_total", code_class="2xx") == total
    time.sleep(0.2)
    assert fd_count(proxy.pid) == fds_before, "descriptors leaked across the reloads"
    assert sorted(listening_sockets(proxy.pid)) == listening_before
    lines = lines_of(access, total + 1, timeout=1.0)
    assert len(lines) == total, (len(lines), total)
    kept.close()
    ws_client.close()


@pytest.mark.timeout(40)
def test_reload_replaces_the_sni_certificates_and_open_tls_connections_keep_theirs(
    proxies, backends, pki, tmp_path: Path
):
    """Covers SNI selection across a reload (the TLS tests reload one certificate only): the
    set of certificates changes from {server (default), a.test} to {server_b (default),
    b.test, *.wild.test}. New handshakes choose among the new set by SNI (a.test, no longer
    served, gets the new default); a TLS connection made with SNI a.test before the reload
    still works on its context."""
    a = backends["a"]
    config = tmp_path / "rawproxy.toml"
    routes = {"/": url(a)}
    config.write_text(
        toml(["tls://127.0.0.1:0"], routes, certs=[(c.cert, c.key) for c in (pki.server, pki.a)])
    )
    proxy = proxies("--config", str(config))
    context = pki.client_context()

    def cert_for(name: str) -> bytes | None:
        with HttpClient(proxy.port, timeout=5, ssl_context=context, server_hostname=name) as c:
            der = c.sock.peer_cert_der()
            assert c.request(simple_get(f"/{name}")).status == 200
        return der

    assert cert_for("a.test") == pki.a.der
    old = HttpClient(proxy.port, timeout=5, ssl_context=context, server_hostname="a.test")
    try:
        assert old.request(simple_get("/old")).status == 200
        new_set = (pki.server_b, pki.b, pki.wild)
        config.write_text(
            toml(["tls://127.0.0.1:0"], routes, certs=[(c.cert, c.key) for c in new_set])
        )
        sighup(proxy)
        assert cert_for("b.test") == pki.b.der
        assert cert_for("x.wild.test") == pki.wild.der
        assert cert_for("localhost") == pki.server_b.der
        unchecked = pki.client_context(check_hostname=False)
        with HttpClient(
            proxy.port, timeout=5, ssl_context=unchecked, server_hostname="a.test"
        ) as c:
            assert c.sock.peer_cert_der() == pki.server_b.der  # a.test: the new default
        assert old.request(simple_get("/old-after")).status == 200
        assert old.sock.peer_cert_der() == pki.a.der
    finally:
        old.close()
