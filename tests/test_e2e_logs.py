"""Do the logs answer "what happened to my request", and are they safe to read?

An admin who replaced nginx or HAProxy with rawproxy reads its logs after an incident. These
tests run the real proxy (`python -m rawproxy`) against loopback backends and look at its
access log (file and stderr, combined and JSON), its stderr lines and its metrics. They came
from a review of the logs (session 22); the faults it found are described in each test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import (
    BlackholeBackend,
    HttpBackend,
    HttpClient,
    Metrics,
    ProxyProcess,
    ScriptedConn,
    connect,
    proxy_args,
    request_bytes,
    reset_close,
    run_rawproxy,
    simple_get,
)

# The logging prefix of every stderr line: "2026-01-02 03:04:05,678 LEVEL ".
PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) ")
# C0 controls but tab, DEL and C1 controls (0x85 NEL ends a line for Unicode readers, 0x9b CSI
# and ESC drive terminals): none may reach a log line raw.
RAW_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
CLF = re.compile(
    r'(?P<client>\S+) - - \[[^\]]+\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) '
    r'(?P<size>\d+|-) "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"(?P<rest>.*)'
)


@pytest.fixture
def proxies() -> Iterator[Callable[..., ProxyProcess]]:
    """`proxies(*args)`: `python -m rawproxy ARGS`, stopped at teardown (by its own PID). No
    traceback check here: the tests that can provoke one assert on it themselves, so that a
    finding fails once, in the test, not again at teardown."""
    made: list[ProxyProcess] = []

    def start(*args: str) -> ProxyProcess:
        proc = ProxyProcess(list(args))
        made.append(proc)
        return proc

    yield start
    for proc in made:
        proc.stop()


@pytest.fixture
def backend() -> Iterator[HttpBackend]:
    b = HttpBackend()
    yield b
    b.gate.set()
    b.stop()


def wait_lines(path: Path, count: int, timeout: float = 8.0) -> list[str]:
    """The file's complete lines once there are at least `count` (or what is there at the
    deadline)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
            if len(lines) >= count:
                return lines
        time.sleep(0.05)
    return lines


def exchange(port: int, raw: bytes, timeout: float = 8.0, shut: bool = False) -> bytes:
    """Send `raw`, read until the proxy closes (or the timeout); what came back."""
    sock = connect(port)
    sock.settimeout(timeout)
    got = bytearray()
    try:
        sock.sendall(raw)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return bytes(got)


def stderr_messages(proxy: ProxyProcess, since: int = 0) -> list[tuple[str, str]]:
    """(level, message) of every stderr line since `since` that has the logging prefix."""
    out = []
    for line in proxy.log_text(since).splitlines():
        m = PREFIX.match(line)
        if m:
            out.append((m["level"], line[m.end() :]))
    return out


# --- 3. the access log file failing -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_full_disk_access_log_does_not_break_requests(proxies, backend):
    """A full disk under --access-log (ENOSPC; /dev/full here) does not break requests: the
    client gets its 200 and body, the request is counted once, and stderr says the access log
    cannot be written, as nginx does. Before, the OSError from the write escaped inside the
    response relay and was taken for a backend error: the client was reset after the head, a
    traceback per request went to stderr, and every request was counted twice."""
    proxy = proxies(
        *proxy_args(backend.port, "--access-log", "/dev/full", "--admin-listen", "127.0.0.1:0")
    )
    assert proxy.admin_port is not None
    before = Metrics(proxy.admin_port)
    outcomes = []
    for i in range(3):
        try:
            with HttpClient(proxy.port, timeout=5) as c:
                resp = c.request(simple_get(f"/full{i}"))
            outcomes.append((resp.status, resp.body))
        except OSError as e:
            outcomes.append(("error", repr(e)))
    assert outcomes == [(200, f"GET /full{i}".encode()) for i in range(3)], outcomes
    after = Metrics(proxy.admin_port)
    counted = after("rawproxy_requests_total", code_class="2xx") - before(
        "rawproxy_requests_total", code_class="2xx"
    )
    assert counted == 3, f"3 requests answered 200, counted {counted}"
    log = proxy.log_text()
    assert "Traceback" not in log, log
    assert not re.search(r"backend \S+ .*No space left on device", log), log
    assert re.search(r"access log.*No space left on device", log, re.IGNORECASE), log


@pytest.mark.timeout(60)
def test_full_disk_access_log_stop_is_clean(proxies, backend):
    """With an access log that cannot be written, SIGTERM still ends with exit code 0 and no
    traceback. Before, the failed line stayed in the file object's buffer and close()
    flushed it again."""
    proxy = proxies(*proxy_args(backend.port, "--access-log", "/dev/full"))
    exchange(proxy.port, simple_get("/one", "a"), timeout=3)
    time.sleep(0.3)
    mark = proxy.mark()
    code = proxy.stop()
    after_stop = proxy.log_text(mark)
    assert code == 0, (code, after_stop)
    assert "Traceback" not in after_stop, after_stop


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("signum", "said", "workers"),
    [
        (signal.SIGHUP, r"SIGHUP: reloaded", 2),
        (signal.SIGUSR1, r"SIGUSR1: access log reopened", 2),
        (signal.SIGUSR1, r"SIGUSR1: access log reopened", 1),
    ],
    ids=["SIGHUP-workers", "SIGUSR1-workers", "SIGUSR1-single"],
)
def test_workers_reopen_access_log_on_sighup(proxies, backend, tmp_path, signum, said, workers):
    """logrotate's rename + SIGHUP (a reload) or SIGUSR1 (the log alone, as nginx), with
    --workers 2 and, for SIGUSR1, one process too: every worker writes to the new file
    afterwards, the old file keeps what came before, and no request's line is lost."""
    path = tmp_path / "access.log"
    proxy = proxies(*proxy_args(backend.port, "--access-log", str(path), "--workers", str(workers)))
    for i in range(6):
        with HttpClient(proxy.port, timeout=5) as c:
            assert c.request(simple_get(f"/before{i}")).status == 200
    assert len(wait_lines(path, 6)) == 6
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    mark = proxy.mark()
    os.kill(proxy.pid, signum)
    proxy.wait_for_logs(said, workers, mark, timeout=10)
    for i in range(12):  # new connections, spread over both workers by the kernel
        with HttpClient(proxy.port, timeout=5) as c:
            assert c.request(simple_get(f"/after{i}")).status == 200
    new = wait_lines(path, 12)
    old = rotated.read_text().splitlines()
    assert sorted(CLF.fullmatch(x)["request"] for x in new) == sorted(  # type: ignore[index]
        f"GET /after{i} HTTP/1.1" for i in range(12)
    ), new
    assert len(old) == 6, old
    assert all("/before" in x for x in old), old


# --- 2. what happened to my request -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_first_request_duration_excludes_idle_before_it(proxies, backend, tmp_path):
    """The first request on a connection is timed from its first byte, as nginx's
    $request_time and HAProxy's Ta: a connection opened and left idle 1.5 s (a browser's
    spare socket) logs its instant answer as instant. It was timed from the accept, so an
    admin hunting slow requests chased idle sockets."""
    path = tmp_path / "access.json"
    proxy = proxies(
        *proxy_args(backend.port, "--access-log", str(path), "--access-log-format", "json")
    )
    sock = connect(proxy.port)
    try:
        time.sleep(1.5)
        sock.sendall(simple_get("/idle-first", "a"))
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()
    [line] = wait_lines(path, 1)
    record = json.loads(line)
    assert record["target"] == "/idle-first"
    assert record["duration"] < 0.75, record


@pytest.mark.timeout(90)
def test_backend_failures_have_one_line_each_with_cause_and_metrics_agree(
    proxies, scripted_backend, tmp_path
):
    """Each way a backend can fail a request gives exactly one access-log record and one
    stderr line, with a status, the bytes the client got, a plausible duration and a cause
    that tells the cases apart; requests_total and bytes_total move by exactly what the
    records say, and only a backend that never accepts counts as a connect error."""

    def script(sc: ScriptedConn) -> str:
        head = sc.head
        if b"/reset-before" in head:
            reset_close(sc.sock)
        elif b"/close-before" in head:
            sc.sock.close()
        elif b"/garbage" in head:
            sc.sock.sendall(b"HTTP/1.1 2\x1b[31mOO OK\r\n\r\n")
            time.sleep(0.3)
        elif b"/reset-mid" in head:
            sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            time.sleep(0.3)
            reset_close(sc.sock)
        elif b"/silent" in head:
            time.sleep(4)
        elif b"/slow" in head:
            time.sleep(2)
            sc.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            time.sleep(0.3)
        return "done"

    blackhole = BlackholeBackend()
    try:
        assert blackhole.connect_hangs()
        back = scripted_backend(script)
        path = tmp_path / "access.json"
        proxy = proxies(
            "--listen",
            "127.0.0.1:0",
            "--route",
            f"/hole/=http://127.0.0.1:{blackhole.port}",
            "--route",
            f"/=http://127.0.0.1:{back.port}",
            "--access-log",
            str(path),
            "--access-log-format",
            "json",
            "--response-timeout",
            "3",
            "--connect-timeout",
            "1",
            "--admin-listen",
            "127.0.0.1:0",
        )
        assert proxy.admin_port is not None
        before = Metrics(proxy.admin_port)
        mark = proxy.mark()
        targets = [
            "/reset-before",
            "/close-before",
            "/garbage",
            "/reset-mid",
            "/silent",
            "/slow",
            "/hole/x",
        ]
        for target in targets:
            exchange(proxy.port, request_bytes("GET", target, [("Host", "a")]), timeout=10)
        lines = wait_lines(path, len(targets), timeout=10)
        time.sleep(0.5)  # nothing more may come
        lines = path.read_text().splitlines()
        records = [json.loads(x) for x in lines]
        by_target: dict[str, Any] = {}
        for r in records:
            assert r["target"] not in by_target, f"two records for {r['target']}: {lines}"
            by_target[r["target"]] = r
        assert set(by_target) == set(targets), lines
        expect = {
            "/reset-before": (502, r"reset by peer"),
            "/close-before": (502, r"closed the connection before answering"),
            "/garbage": (502, r"invalid response: illegal status line"),
            "/reset-mid": (200, r"in the middle of the response"),
            "/silent": (504, r"sent no response within 3s"),
            "/hole/x": (502, r"did not accept the connection within 1s"),
        }
        for target, (status, cause) in expect.items():
            r = by_target[target]
            assert r["status"] == status, r
            assert re.search(cause, r.get("error", "")), r
        assert by_target["/reset-mid"]["bytes"] == 100
        assert "error" not in by_target["/slow"], by_target["/slow"]
        assert by_target["/slow"]["status"] == 200, by_target["/slow"]
        assert 1.8 <= by_target["/slow"]["duration"] < 3.0, by_target["/slow"]
        assert 2.8 <= by_target["/silent"]["duration"] < 4.5, by_target["/silent"]
        assert 0.9 <= by_target["/hole/x"]["duration"] < 2.5, by_target["/hole/x"]
        warnings = [m for level, m in stderr_messages(proxy, mark) if level == "WARNING"]
        for target in expect:
            assert len([m for m in warnings if f'"GET {target} HTTP/1.1"' in m]) == 1, warnings
        after = Metrics(proxy.admin_port)

        def delta(name: str, **labels: str) -> float:
            return after(name, **labels) - before(name, **labels)

        assert delta("rawproxy_requests_total", code_class="5xx") == 5
        assert delta("rawproxy_requests_total", code_class="2xx") == 2
        assert delta("rawproxy_bytes_total", direction="backend_to_client") == 102
        assert delta("rawproxy_backend_connect_errors_total", cause="timeout") == 1
        for cause in ("refused", "reset", "other"):
            assert delta("rawproxy_backend_connect_errors_total", cause=cause) == 0, cause
        assert "Traceback" not in proxy.log_text()
    finally:
        blackhole.stop()


@pytest.mark.timeout(60)
def test_client_closing_mid_body_is_not_called_malformed(proxies, scripted_backend, tmp_path):
    """A client that stops sending its request body and closes its side (an upload
    cancelled) is logged as a client that gave up, at info, as nginx's "client prematurely
    closed connection": it was a WARNING "malformed request body", which sends an admin
    looking for a broken client or an attack."""

    def drain(sc: ScriptedConn) -> str:
        try:
            sc.sock.settimeout(5)
            while sc.sock.recv(65536):
                pass
        except OSError:
            pass
        return "drained"

    back = scripted_backend(drain)
    path = tmp_path / "access.log"
    proxy = proxies(*proxy_args(back.port, "--access-log", str(path)))
    head = b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n"
    exchange(proxy.port, head + b"y" * 100, timeout=5, shut=True)
    [line] = wait_lines(path, 1)
    m = CLF.fullmatch(line)
    assert m, line
    assert m["request"] == "POST /upload HTTP/1.1"
    assert "malformed" not in m["rest"], line
    assert re.search(r"client (went away|closed)", m["rest"]), line
    said = [(level, x) for level, x in stderr_messages(proxy) if "client closed its side" in x]
    assert [level for level, _ in said] == ["INFO"], said


def test_client_closing_mid_head_is_not_called_malformed(proxies, backend, tmp_path):
    """The same for a head: a client that sends part of a request head and closes its side
    gets one line at info saying it closed in the middle of its head (a 400, request line
    named), not a WARNING "malformed request"."""
    path = tmp_path / "access.log"
    proxy = proxies(*proxy_args(backend.port, "--access-log", str(path)))
    exchange(proxy.port, b"GET /half HTTP/1.1\r\nHost: a\r\nUser-Ag", timeout=5, shut=True)
    [line] = wait_lines(path, 1)
    m = CLF.fullmatch(line)
    assert m, line
    assert m["request"] == "GET /half HTTP/1.1", line
    assert m["status"] == "400", line
    assert "client closed its side in the middle of its request head" in m["rest"], line
    said = [(level, x) for level, x in stderr_messages(proxy) if "-> 400" in x]
    assert [level for level, _ in said] == ["INFO"], said
    assert "malformed" not in said[0][1], said


# --- the access log on stderr (the default, journald) ------------------------------------------


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_unparsed_head_has_access_line_on_stderr(proxies, backend, fmt):
    """With the access log on stderr (the default; journald), a head that never parsed has
    its access line there too (request "-", error=...), as the README promises and as with
    --access-log FILE: it had only a free-text "ADDR -> 400: ..." line, which tools reading
    access lines from the journal never saw."""
    proxy = proxies(*proxy_args(backend.port, "--access-log-format", fmt))
    mark = proxy.mark()
    answer = exchange(proxy.port, b"GARBAGE\r\n\r\n", timeout=5)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    proxy.wait_for_log(r"-> 400|\b400\b", mark)
    time.sleep(0.3)
    messages = [m for _, m in stderr_messages(proxy, mark)]
    if fmt == "json":  # JSON access lines on stderr come without the logging prefix
        messages = proxy.log_text(mark).splitlines()
    found = []
    for message in messages:
        if fmt == "combined":
            m = CLF.fullmatch(message)
            if m and m["status"] == "400" and m["request"] == "-":
                found.append(message)
        else:
            try:
                record = json.loads(message)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("status") == 400:
                found.append(message)
    assert len(found) == 1, messages


def test_json_access_lines_on_stderr_parse_whole(proxies, backend):
    """`--access-log-format json` on stderr writes each record as the JSON object alone, as
    nginx's `access_log /dev/stderr` does, so that a shipper parsing the journal's message
    as JSON reads it. It came behind the logging prefix (time and level)."""
    proxy = proxies(*proxy_args(backend.port, "--access-log-format", "json"))
    mark = proxy.mark()
    with HttpClient(proxy.port, timeout=5) as c:
        assert c.request(simple_get("/json-stderr")).status == 200
    [line] = proxy.wait_for_logs(r'"target":"/json-stderr"', 1, mark)
    try:
        record = json.loads(line)
    except ValueError:
        pytest.fail(f"the access line on stderr is not JSON: {line!r}")
    assert record["target"] == "/json-stderr"


# --- 1. log injection and escaping -------------------------------------------------------------


HOSTILE_AGENT = b'a\x1b[2Jb\x01\x7f\x85\x9b\xff\xc3\x28"\\ end'
HOSTILE_REFERER = b"https://x/\xe9\x80\x1b]0;title\x07"


def test_json_escapes_controls_and_invalid_utf8(proxies, backend, tmp_path):
    """JSON records of a request whose User-Agent and Referer carry ESC, C0/C1 controls,
    DEL, invalid UTF-8, a quote and a backslash (h11's path: such values are not the fast
    path's) are one ASCII line each, parse, and give the bytes back one Latin-1 character
    each."""
    path = tmp_path / "access.json"
    proxy = proxies(
        *proxy_args(backend.port, "--access-log", str(path), "--access-log-format", "json")
    )
    head = (
        b"GET /hostile HTTP/1.1\r\nHost: a\r\nUser-Agent: "
        + HOSTILE_AGENT
        + b"\r\nReferer: "
        + HOSTILE_REFERER
        + b"\r\nConnection: close\r\n\r\n"
    )
    assert exchange(proxy.port, head, timeout=5).startswith(b"HTTP/1.1 200 ")
    [line] = wait_lines(path, 1)
    raw = path.read_bytes()
    assert raw.isascii(), raw
    assert raw.count(b"\n") == 1, raw
    record = json.loads(line)
    assert record["user_agent"] == HOSTILE_AGENT.decode("latin-1")
    assert record["referer"] == HOSTILE_REFERER.decode("latin-1")


def test_stderr_error_lines_show_hostile_bytes_escaped(proxies, scripted_backend, tmp_path):
    """The stderr lines of a 400 quoting a request line with ESC and C1 bytes, and of a 502
    quoting a backend's status line and header with ESC, NUL and 0x85 (NEL), are one line
    each with every control escaped, with --access-log FILE (where stderr has the error's
    own free-text line) as without it."""

    def script(sc: ScriptedConn) -> str:
        if b"/status" in sc.head:
            sc.sock.sendall(b"HTTP/1.1 2\x1b[2J\x85OO OK\r\n\r\n")
        else:
            sc.sock.sendall(
                b"HTTP/1.1 200 OK\r\nX-Evil: a\x00\x1b]0;t\x07\r\nContent-Length: 0\r\n\r\n"
            )
        time.sleep(0.3)
        return "done"

    back = scripted_backend(script)
    for flags in ((), ("--access-log", str(tmp_path / "a.log"))):
        proxy = proxies(*proxy_args(back.port, *flags))
        mark = proxy.mark()
        exchange(proxy.port, b"GET /\x1b[2J\x9b HTTP/1.1\r\nHost: a\r\n\r\n", timeout=5)
        exchange(proxy.port, request_bytes("GET", "/status", [("Host", "a")]), timeout=5)
        exchange(proxy.port, request_bytes("GET", "/header", [("Host", "a")]), timeout=5)
        proxy.wait_for_logs(r"\b(400|502)\b", 3, mark)
        time.sleep(0.3)
        text = proxy.log_text(mark)
        lines = text.splitlines()
        assert all(PREFIX.match(x) for x in lines), lines
        assert not [x for x in lines if RAW_CONTROL.search(x)], lines
        assert len([x for x in lines if re.search(r"\b502\b", x)]) == 2, lines


def test_debug_log_escapes_header_controls(proxies, backend):
    """At --log-level debug the upgrade decision line shows the client's Upgrade value
    escaped and bounded: it was written raw, so ESC sequences reached the terminal of an
    admin following the log, and 0x85 split the line for Unicode line readers."""
    proxy = proxies(*proxy_args(backend.port, "--log-level", "debug"))
    mark = proxy.mark()
    head = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: web\x1b[2Jsocket\x85\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert exchange(proxy.port, head, timeout=5).startswith(b"HTTP/1.1 ")
    proxy.wait_for_log(r"upgrade decision", mark)
    time.sleep(0.2)
    raw = [x for x in proxy.log_text(mark).splitlines() if RAW_CONTROL.search(x)]
    assert not raw, raw


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_access_line_size_is_bounded(proxies, backend, tmp_path, fmt):
    """Access-log fields from the wire (target, Referer, User-Agent) are cut to a bound, marked
    as cut, so that a line stays under journald's 48 KiB line limit: past it, journald
    splits a line into entries whose continuations begin with text the client chose.
    A 30 KB User-Agent and Referer made one 60 KB line."""
    path = tmp_path / "access.log"
    proxy = proxies(
        *proxy_args(backend.port, "--access-log", str(path), "--access-log-format", fmt)
    )
    head = (
        b"GET /long HTTP/1.1\r\nHost: a\r\nUser-Agent: "
        + b"A" * 30000
        + b"\r\nReferer: "
        + b"R" * 30000
        + b"\r\nConnection: close\r\n\r\n"
    )
    assert exchange(proxy.port, head, timeout=5).startswith(b"HTTP/1.1 200 ")
    [line] = wait_lines(path, 1)
    assert "/long" in line
    assert len(line.encode()) <= 48 * 1024, f"one access line of {len(line)} bytes"


# --- a FIFO as the access log (a log shipper reading it) --------------------------------------


F_SETPIPE_SZ = 1031  # fcntl(2), Linux


@pytest.mark.timeout(60)
def test_fifo_access_log_reader_that_stalls_costs_lines_not_requests(proxies, backend, tmp_path):
    """Fixed: the access log was opened blocking, so a FIFO whose reader stopped reading (a
    log shipper hung or slow) stalled the whole event loop at the first line that did not
    fit: every client of the proxy waited on it. It is now opened non-blocking: the lines
    that do not fit are dropped and counted, with an error line on stderr, and every request
    is answered; once the reader reads again, lines come again, each whole."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)  # one page: about 25 lines fill it
        proxy = proxies(*proxy_args(backend.port, "--access-log", str(fifo)))
        with HttpClient(proxy.port, timeout=5) as c:
            for i in range(120):
                assert c.request(simple_get(f"/stalled{i}")).status == 200
        proxy.wait_for_log(r"cannot write to the access log .*reader does not keep up")
        got = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(reader, 65536):
                got += chunk
        lines = got.decode().splitlines()
        assert got.endswith(b"\n"), got[-200:]
        assert 5 < len(lines) < 120, len(lines)
        assert all(CLF.fullmatch(line) for line in lines), lines
        with HttpClient(proxy.port, timeout=5) as c:
            assert c.request(simple_get("/after")).status == 200
        deadline = time.monotonic() + 5
        later = b""
        while b"/after" not in later and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                later += os.read(reader, 65536)
            time.sleep(0.02)
        assert b"GET /after HTTP/1.1" in later, later
    finally:
        os.close(reader)


@pytest.mark.timeout(30)
def test_fifo_access_log_without_reader_is_a_startup_error(tmp_path):
    """Fixed: with a FIFO as --access-log and no program reading it yet, start-up blocked in
    open(2) for ever (systemd's start timeout then killed it, with nothing said). It now
    stops at once with one line that says what to do."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    done = run_rawproxy(*proxy_args(9, "--access-log", str(fifo)), timeout=10)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"rawproxy: error: cannot open --access-log {fifo}: a FIFO that no program reads: "
        "start its reader first"
    ), done.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_fifo_access_log_line_is_one_whole_write(proxies, backend, tmp_path, fmt):
    """Fixed: a line longer than PIPE_BUF (long Referer and User-Agent, each 2,048
    characters after the cut) was written to the non-blocking FIFO in pieces: with one page
    free, the first 4,096 bytes went in and the rest met EAGAIN and was dropped, so the
    reader got a torn line with the next one glued to it. Lines bound for a FIFO are now kept
    under PIPE_BUF (the wire values cut shorter, marked), so each goes whole or not at all."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)  # one page: room for PIPE_BUF bytes
        proxy = proxies(
            *proxy_args(backend.port, "--access-log", str(fifo), "--access-log-format", fmt)
        )
        head = (
            b"GET /long HTTP/1.1\r\nHost: a\r\nUser-Agent: "
            + b"A" * 3000
            + b"\r\nReferer: "
            + b"R" * 3000
            + b"\r\nConnection: close\r\n\r\n"
        )
        assert exchange(proxy.port, head, timeout=5).startswith(b"HTTP/1.1 200 ")
        got = b""
        deadline = time.monotonic() + 5
        while not got.endswith(b"\n") and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                got += os.read(reader, 65536)
            time.sleep(0.02)
    finally:
        os.close(reader)
    assert got.endswith(b"\n"), got[-200:]
    assert got.count(b"\n") == 1, got
    assert len(got) <= select.PIPE_BUF
    line = got.decode()
    if fmt == "json":
        fields = json.loads(line)
        referer, agent = fields["referer"], fields["user_agent"]
        assert fields["target"] == "/long"
        assert fields["status"] == 200
    else:
        m = CLF.fullmatch(line.rstrip("\n"))
        assert m, line
        referer, agent = m["referer"], m["agent"]
        assert m["request"] == "GET /long HTTP/1.1"
    # Cut alike, marked, and no shorter than they must be to fit.
    assert referer == "R" * (len(referer) - 8) + "...[cut]", referer
    assert agent == "A" * (len(referer) - 8) + "...[cut]", agent
    assert len(referer) - 8 >= 1024
