"""The proxy's life cycle, end to end, with signals sent to the real process:

- SIGTERM / SIGINT drain: the listeners close at once, idle kept-alive connections close, a
  request under way finishes (its response says `Connection: close`), a response under way
  finishes, /healthz answers 503, open tunnels keep working until they end (then `drained`,
  exit 0) or until `--drain-timeout` (then they are closed, exit 0); a second signal stops at
  once (exit 0);
- SIGHUP: the config file is read again for new connections (routes, listeners added and
  removed, flags still override it), open connections and tunnels keep what they started
  with, a broken file keeps everything (`keeping`), and the access log file is reopened
  (logrotate: rename, SIGHUP, new lines in a new file of the old name).
"""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest
from peers import (
    HttpClient,
    NotifySocket,
    ProxyProcess,
    admin_get,
    assert_refused,
    free_port,
    has,
    notify_env,
    open_websocket,
    proxy_args,
    request_bytes,
    served_by,
    sha256,
    simple_get,
)
from wsproto.events import CloseConnection

# How long "at once" may take on a loaded 2-core machine.
PROMPT = 3.0

STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT]


def signal_name(sig: int) -> str:
    return signal.Signals(sig).name


def exit_code(proxy: ProxyProcess, timeout: float = PROMPT) -> int:
    """The proxy's exit code, once it exited (TimeoutError if it is still running)."""
    deadline = time.monotonic() + timeout
    while (code := proxy.proc.poll()) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the proxy still runs after {timeout} s:\n{proxy.log_text()}")
        time.sleep(0.02)
    return code


def closed_by_proxy(c: HttpClient) -> str:
    """Wait for the proxy to close `c` ("eof" or "reset"), then close our end too (as a real
    client does; until then the proxy may linger on its half-closed connection)."""
    kind, leftover = c.wait_closed(PROMPT)
    c.close()
    assert leftover == b"", leftover
    return kind


def still_running(proxy: ProxyProcess, for_seconds: float) -> None:
    time.sleep(for_seconds)
    assert proxy.proc.poll() is None, f"the proxy exited early:\n{proxy.log_text()}"


def assert_ws_closes_cleanly(ws_client: HttpClient, ws) -> None:
    assert isinstance(ws.close(), CloseConnection)
    ws_client.close()


# --- SIGTERM and SIGINT: drain ---------------------------------------------------------------


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=signal_name)
def test_stop_signal_with_only_idle_connections_exits_at_once(run_proxy, http_backend, client, sig):
    proxy = run_proxy("--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{http_backend.port}")
    kept = client(proxy.port)
    assert kept.request(simple_get("/one")).status == 200  # kept alive, now idle
    silent = client(proxy.port)  # connected, sent nothing yet
    # Make sure the proxy has accepted the silent one before the signal.
    kept.request(simple_get("/two"))

    mark = proxy.mark()
    started = time.monotonic()
    proxy.proc.send_signal(sig)
    assert closed_by_proxy(kept) == "eof"
    assert closed_by_proxy(silent) == "eof"
    assert exit_code(proxy) == 0
    assert time.monotonic() - started < PROMPT
    proxy.wait_for_log(rf"{signal_name(sig)}.*draining", since=mark)
    proxy.wait_for_log(r"\bdrained\b", since=mark)
    assert_refused(proxy.port)


def test_requests_under_way_finish_then_the_proxy_exits(run_proxy, http_backend, client):
    proxy = run_proxy(
        *proxy_args(http_backend.port),
        "--admin-listen",
        "127.0.0.1:0",
    )
    assert proxy.admin_port is not None, proxy.log_text()
    assert admin_get(proxy.admin_port, "/healthz").status == 200

    # A request whose body is still coming: under way, no response yet.
    body = b"0123456789"
    uploading = client(proxy.port)
    uploading.send(
        request_bytes(
            "POST", "/stream-in", [("Host", "app.test"), ("Content-Length", str(len(body)))]
        )
        + body[:4]
    )
    assert http_backend.first_data.wait(5)
    # A response under way: its head and first part sent, the rest waits for the gate.
    streaming = client(proxy.port)
    streaming.send(simple_get("/stream"))
    status, _, _, _ = streaming.read_head()
    assert status == 200
    # A kept-alive connection between requests.
    idle = client(proxy.port)
    assert idle.request(simple_get("/idle")).status == 200
    # A request head half sent (after an earlier request on the connection, and as the
    # first request of another).
    heading = [client(proxy.port), client(proxy.port)]
    assert heading[0].request(simple_get("/first")).status == 200
    head = simple_get("/headed")
    for c in heading:
        c.send(head[:20])
    time.sleep(0.2)  # the proxy read them

    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"SIGTERM.*draining", since=mark)
    assert_refused(proxy.port)  # the listener closed at once
    assert closed_by_proxy(idle) == "eof"
    health = admin_get(proxy.admin_port, "/healthz")
    assert health.status == 503, health
    still_running(proxy, 0.3)

    # The half-sent heads are completed: answered, with Connection: close.
    for c in heading:
        c.send(head[20:])
        answer = c.read_response()
        assert answer.status == 200, answer
        assert answer.body == b"GET /headed"
        assert b"close" in [v.strip().lower() for v in answer.values("connection")], answer
        assert closed_by_proxy(c) == "eof"

    # The upload finishes: its answer comes, with Connection: close, and the connection ends.
    uploading.send(body[4:])
    answer = uploading.read_response()
    assert answer.status == 200, answer
    assert answer.body == f"{len(body)} {sha256(body)}".encode()
    assert b"close" in [v.strip().lower() for v in answer.values("connection")], answer.raw_head
    assert closed_by_proxy(uploading) == "eof"
    still_running(proxy, 0.2)  # the streaming response is not done yet

    # The streamed response finishes too (chunked: the rest, then the last chunk).
    http_backend.gate.set()
    rest = bytearray(streaming.buf)
    streaming.buf.clear()
    while not rest.endswith(b"0\r\n\r\n"):
        chunk = streaming.sock.recv(65536)
        assert chunk, f"the streamed response was cut short: {bytes(rest)!r}"
        rest += chunk
    assert b"second-part" in rest
    assert closed_by_proxy(streaming) == "eof"

    assert exit_code(proxy) == 0
    proxy.wait_for_log(r"\bdrained\b", since=mark)


def test_tunnels_keep_working_while_draining_until_they_end(run_proxy, ws_backend, client, sockets):
    proxy = run_proxy(
        *proxy_args(ws_backend.port),
        "--admin-listen",
        "127.0.0.1:0",
    )
    first_client, second_client = client(proxy.port), client(proxy.port)
    first, second = open_websocket(first_client), open_websocket(second_client)
    first.send("before")
    assert first.recv() == "before"

    mark = proxy.mark()
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"draining", since=mark)
    assert_refused(proxy.port)
    assert proxy.admin_port is not None
    assert admin_get(proxy.admin_port, "/healthz").status == 503
    # Well past "at once", far from the default drain timeout (30 s): the tunnels still work.
    still_running(proxy, 1.0)
    for ws in (first, second):
        ws.send("during the drain")
        assert ws.recv() == "during the drain"
        ws.send(b"\x00" * 200_000)
        assert ws.recv() == b"\x00" * 200_000

    assert_ws_closes_cleanly(first_client, first)
    still_running(proxy, 0.3)  # one tunnel is still open
    second.send("last one")
    assert second.recv() == "last one"
    assert_ws_closes_cleanly(second_client, second)

    assert exit_code(proxy) == 0
    assert time.monotonic() - started < 10
    proxy.wait_for_log(r"\bdrained\b", since=mark)


def test_drain_timeout_closes_what_is_still_open(run_proxy, ws_backend, http_backend, client):
    """At the drain deadline, a tunnel still open and a request still waiting for its backend
    (which never answers) are closed, and the proxy exits 0."""
    proxy = run_proxy(
        "--listen",
        "127.0.0.1:0",
        "--route",
        f"/ws=http://127.0.0.1:{ws_backend.port}",
        "--route",
        f"/=http://127.0.0.1:{http_backend.port}",
        "--drain-timeout",
        "1.5",
    )
    ws_client = client(proxy.port)
    ws = open_websocket(ws_client)
    waiting = client(proxy.port)
    waiting.send(simple_get("/slow"))
    http_backend.wait_for_heads(1)

    mark = proxy.mark()
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"draining", since=mark)
    ws.send("still there?")
    assert ws.recv() == "still there?"

    kind, _ = ws_client.wait_closed(1.5 + PROMPT)
    closed_after = time.monotonic() - started
    assert kind in ("eof", "reset")
    assert 1.2 <= closed_after < 1.5 + PROMPT, closed_after
    kind, _ = waiting.wait_closed(PROMPT)  # whatever it was told, its connection ends
    assert kind in ("eof", "reset")
    assert exit_code(proxy) == 0
    assert time.monotonic() - started < 1.5 + PROMPT
    proxy.wait_for_log(r"drain time over", since=mark)


@pytest.mark.parametrize(
    ("first", "second"),
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM)],
    ids=["TERM-TERM", "INT-TERM"],
)
def test_second_stop_signal_stops_at_once(run_proxy, ws_backend, client, first, second):
    proxy = run_proxy("--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{ws_backend.port}")
    ws_client = client(proxy.port)
    ws = open_websocket(ws_client)

    mark = proxy.mark()
    proxy.proc.send_signal(first)
    proxy.wait_for_log(r"draining", since=mark)
    ws.send("ping")
    assert ws.recv() == "ping"
    started = time.monotonic()
    proxy.proc.send_signal(second)
    assert exit_code(proxy) == 0
    assert time.monotonic() - started < PROMPT
    kind, _ = ws_client.wait_closed(PROMPT)
    assert kind in ("eof", "reset")


def test_second_stop_signal_says_what_it_cut(run_proxy, scripted_backend, client):
    """A request still waiting for its answer when the second signal comes is cut: its access
    line says so, the log counts what was closed, and nothing claims a clean drain."""
    backend = scripted_backend(lambda sc: time.sleep(3))
    proxy = run_proxy("--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.port}")
    c = client(proxy.port)
    c.send(simple_get("/slow"))
    time.sleep(0.3)
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"draining", since=mark)
    proxy.proc.send_signal(signal.SIGTERM)
    assert exit_code(proxy) == 0
    text = proxy.log_text(mark)
    assert "stopping now: closing 1 connection(s) still open" in text, text
    assert re.search(r'"GET /slow HTTP/1\.1" 502 .*cut short', text), text
    assert "drained: every connection ended" not in text, text


def test_sighup_while_draining_keeps_the_listeners_closed(
    run_proxy, ws_backend, client, tmp_path: Path
):
    """A reload during a drain (logrotate's SIGHUP, say) must not listen again: a client it
    let in would wait in a backlog no one accepts from, then be reset at the exit. systemd,
    told STOPPING=1, is not told READY=1 again; the access log file is still reopened."""
    port = free_port()
    address = str(tmp_path / "notify")
    notify = NotifySocket(address)
    access = tmp_path / "access.log"
    try:
        proxy = run_proxy(
            "--listen",
            f"127.0.0.1:{port}",
            "--backend",
            f"127.0.0.1:{ws_backend.port}",
            "--access-log",
            str(access),
            env=notify_env(address),
        )
        notify.wait_for(has("READY", "1"))
        ws_client = client(proxy.port)
        ws = open_websocket(ws_client)  # keeps the drain going

        mark = proxy.mark()
        proxy.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for(has("STOPPING", "1"))
        assert_refused(port)
        access.rename(tmp_path / "access.log.1")
        proxy.proc.send_signal(signal.SIGHUP)
        proxy.wait_for_log(r"SIGHUP", since=mark)
        assert access.exists()  # reopened under its name
        assert_refused(port, within=0)
        assert "listening on" not in proxy.log_text(mark), proxy.log_text(mark)
        notify.collect(0.3)
        assert not any("READY" in m for m in notify.messages[stopping:]), notify.messages

        ws.send("still here")
        assert ws.recv() == "still here"
        assert_ws_closes_cleanly(ws_client, ws)
        assert exit_code(proxy) == 0
    finally:
        notify.close()


# --- SIGHUP: the config file again -----------------------------------------------------------


def toml_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(listens: list[str], routes: dict[str, str], forwarded: str = "rfc7239") -> str:
    lines = [f"listen = [{', '.join(toml_str(w) for w in listens)}]"]
    lines.append(f"forwarded = {toml_str(forwarded)}")
    for prefix, url in routes.items():
        lines += ["", "[[route]]", f"prefix = {toml_str(prefix)}", f"backend = {toml_str(url)}"]
    return "\n".join(lines) + "\n"


def reload(proxy: ProxyProcess, expect: str = r"reloaded") -> int:
    mark = proxy.mark()
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_log(expect, since=mark)
    return mark


def listening_ports(lines: list[str]) -> list[int]:
    return [
        int(m.group(1))
        for line in lines
        if (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line))
    ]


def test_sighup_rereads_the_config_file_for_new_connections(
    run_proxy, backends, ws_backend, client, tmp_path: Path
):
    a, b = backends["a"], backends["b"]
    config = tmp_path / "rawproxy.toml"
    base = ["127.0.0.1:0"]
    config.write_text(
        config_text(
            base, {"/": f"http://127.0.0.1:{a.port}", "/ws": f"http://127.0.0.1:{ws_backend.port}"}
        )
    )
    # The command line says x-forwarded; the file says rfc7239: the flag wins, also later.
    proxy = run_proxy("--config", str(config), "--forwarded", "x-forwarded")
    port = proxy.port
    assert served_by(port, backends) == "a"
    kept = client(port)  # a kept-alive connection from before the reload
    assert kept.request(simple_get("/kept-1")).status == 200
    ws_client = client(port)
    ws = open_websocket(ws_client, "/ws")  # a tunnel from before the reload
    ws.send("before")
    assert ws.recv() == "before"

    # One route, /app/ to b (so / and /ws are gone), one listener more.
    config.write_text(config_text([*base, "127.0.0.1:0"], {"/app/": f"http://127.0.0.1:{b.port}"}))
    mark = reload(proxy)
    added = listening_ports(proxy.logs_matching(r"listening on", since=mark))
    assert len(added) == 1, proxy.log_text(mark)
    new_port = added[0]
    assert new_port != port
    assert served_by(port, backends) == "b"
    assert served_by(new_port, backends) == "b"
    seen = b.heads[-1]
    assert seen.header("x-forwarded-for") == b"127.0.0.1", seen.headers
    assert seen.header("forwarded") is None, seen.headers
    with HttpClient(port, timeout=5) as c:
        assert c.request(simple_get("/ws")).status == 404  # the new routes: no /ws
        assert c.request(simple_get("/kept-2")).status == 404  # nor /

    # The kept-alive connection follows the new routes at its next request (no / any more:
    # 404, and it stays open), as a new one does; the tunnel keeps its backend and echoes.
    before_a = len(a.heads)
    assert kept.request(simple_get("/kept-2")).status == 404
    assert kept.request(simple_get("/app/kept-3")).status == 200
    assert b.heads[-1].target == b"/app/kept-3"
    assert len(a.heads) == before_a, "a kept-alive connection ignored the reload"
    ws.send("after")
    assert ws.recv() == "after"

    # The added listener goes again.
    config.write_text(config_text(base, {"/app/": f"http://127.0.0.1:{b.port}"}))
    mark = reload(proxy)
    assert proxy.logs_matching(r"no longer listening", since=mark), proxy.log_text(mark)
    assert_refused(new_port)
    assert served_by(port, backends) == "b"

    # Broken files keep everything as it was.
    for broken in (
        'listen = ["127.0.0.1:0"\n',  # not TOML
        config_text(base, {"/": f"http://127.0.0.1:{a.port}"}).replace(
            "forwarded", "header-timeout = 'soon'\nforwarded"
        ),  # a bad value
        config_text(base, {}),  # nothing to forward to
    ):
        config.write_text(broken)
        mark = reload(proxy, expect=r"keeping")
        line = proxy.logs_matching(r"keeping", since=mark)[0]
        assert str(config) in line, line
        assert not proxy.logs_matching(r"reloaded", since=mark)
        assert served_by(port, backends) == "b"
    assert proxy.proc.poll() is None

    ws.send("still up")
    assert ws.recv() == "still up"
    assert_ws_closes_cleanly(ws_client, ws)


def test_sighup_with_a_listener_that_cannot_open_keeps_everything(
    run_proxy, backends, tmp_path: Path
):
    """A reloaded file whose new listener cannot be opened (its port taken) used to be
    applied but for that listener ("keeping the other listeners", then "reloaded"): half a
    configuration. Now it is kept whole, as for any broken file, and the log says why."""
    a, b = backends["a"], backends["b"]
    config = tmp_path / "rawproxy.toml"
    base = ["127.0.0.1:0"]
    config.write_text(config_text(base, {"/": f"http://127.0.0.1:{a.port}"}))
    proxy = run_proxy("--config", str(config))
    port = proxy.port
    assert served_by(port, backends) == "a"
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        busy = taken.getsockname()[1]
        config.write_text(
            config_text([*base, f"127.0.0.1:{busy}"], {"/": f"http://127.0.0.1:{b.port}"})
        )
        mark = reload(proxy, expect=r"keeping")
        line = proxy.logs_matching(r"keeping", since=mark)[0]
        assert "keeping the current configuration" in line, line
        assert str(busy) in line, line
        assert not proxy.logs_matching(r"reloaded", since=mark), proxy.log_text(mark)
        assert served_by(port, backends) == "a"  # the old routes, not the file's
    finally:
        taken.close()
    # The same file once the port is free: all of it applies.
    mark = reload(proxy)
    assert listening_ports(proxy.logs_matching(r"listening on", since=mark)) == [busy]
    assert served_by(port, backends) == "b"


CLF_LINE = re.compile(
    r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "GET (\S+) HTTP/1\.1" 200 \d+ '
    r'"-" "-"'
)


def read_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The file's lines, once it has at least `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_sighup_reopens_the_access_log_file(run_proxy, http_backend, tmp_path: Path):
    access = tmp_path / "access.log"
    proxy = run_proxy(
        *proxy_args(http_backend.port),
        "--access-log",
        str(access),
    )

    def get(target: str) -> None:
        with HttpClient(proxy.port, timeout=5) as c:
            assert c.request(simple_get(target)).status == 200

    get("/one")
    assert len(read_lines(access, 1)) == 1
    rotated = tmp_path / "access.log.1"
    access.rename(rotated)  # what logrotate does
    get("/two")  # still into the renamed file: the proxy holds it open
    assert len(read_lines(rotated, 2)) == 2
    reload(proxy)
    get("/three")
    new_lines = read_lines(access, 1)
    old_lines = read_lines(rotated, 2)
    targets_old = [m.group(1) for line in old_lines if (m := CLF_LINE.fullmatch(line))]
    targets_new = [m.group(1) for line in new_lines if (m := CLF_LINE.fullmatch(line))]
    assert targets_old == ["/one", "/two"], old_lines
    assert targets_new == ["/three"], new_lines
    # The lines went to the file only, not to the log on stderr.
    assert not proxy.logs_matching(r'"GET /(one|two|three) HTTP/1\.1"')


def test_sighup_without_a_config_file_keeps_serving(run_proxy, http_backend, client):
    """SIGHUP with flags only: the same settings again, open connections unaffected."""
    proxy = run_proxy("--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{http_backend.port}")
    kept = client(proxy.port)
    assert kept.request(simple_get("/a")).status == 200
    reload(proxy)
    assert kept.request(simple_get("/b")).status == 200
    assert served_by(proxy.port, {"only": http_backend}) == "only"
    # No listener closed and opened again: the port is the same one, still serving.
    assert not proxy.logs_matching(r"no longer listening")
