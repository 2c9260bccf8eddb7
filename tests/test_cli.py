"""The command line as a user meets it: --version, --help, start-up errors (one line, no
traceback, non-zero exit), several listeners, and a clean exit 0 on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
from peers import (
    HttpClient,
    WsClient,
    request_bytes,
    run_rawproxy,
    simple_get,
    wait_closed,
    ws_key,
)

import rawproxy
from rawproxy.server import listening_ports

FLAGS = [
    "--listen",
    "--backend",
    "--header-timeout",
    "--connect-timeout",
    "--response-timeout",
    "--idle-timeout",
    "--tunnel-idle-timeout",
    "--tcp-keepalive",
    "--max-header-size",
    "--max-header-count",
    "--max-connections",
    "--log-level",
    "--version",
    "--help",
]


def test_version():
    done = run_rawproxy("--version")
    assert done.returncode == 0, done.stderr
    assert rawproxy.__version__ in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_help_mentions_every_flag():
    done = run_rawproxy("--help")
    assert done.returncode == 0, done.stderr
    missing = [flag for flag in FLAGS if flag not in done.stdout]
    assert not missing, f"--help does not mention {missing}"


def assert_one_line_error(done) -> None:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, f"exit 0 for a bad start-up; stderr: {done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{done.stderr}"


GOOD = ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"]


@pytest.mark.parametrize(
    "args",
    [
        [*GOOD, "--bogus"],
        [*GOOD, "--header-timeout", "soon"],
        [*GOOD, "--max-header-size", "lots"],
        [*GOOD, "--max-connections", "many"],
        [*GOOD, "--log-level", "chatty"],
        ["--listen", "nonsense", "--backend", "127.0.0.1:9"],
        ["--listen", "127.0.0.1", "--backend", "127.0.0.1:9"],
        ["--listen", "127.0.0.1:99999", "--backend", "127.0.0.1:9"],
        ["--listen", "[::1:8080", "--backend", "127.0.0.1:9"],
        ["--listen", "127.0.0.1:0", "--backend", "ftp://127.0.0.1:21"],
        ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:http"],
        ["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:0"],
        ["--listen", "127.0.0.1:0", "--backend", "http://127.0.0.1:9/some/path?query"],
        ["--listen", "127.0.0.1:0", "--backend", "no-such-host.invalid:80"],
        ["--listen", "127.0.0.1:0", "--backend", "9000"],
        ["--listen", "127.0.0.1:18997", "--listen", "127.0.0.1:18997", *GOOD[2:]],
        [*GOOD, "--backend-tls", "--no-backend-tls"],
        [*GOOD, "--max-header-size", "100000000000"],
    ],
    ids=[
        "unknown-flag",
        "bad-duration",
        "bad-size",
        "bad-count",
        "bad-log-level",
        "listen-nonsense",
        "listen-without-port",
        "listen-port-out-of-range",
        "listen-unclosed-bracket",
        "backend-unknown-scheme",
        "backend-port-not-a-number",
        "backend-port-zero",
        "backend-path-with-query",
        "backend-unresolvable",
        "backend-just-a-port",
        "listen-twice",
        "backend-tls-and-no-backend-tls",
        "max-header-size-100GB",
    ],
)
def test_start_up_error_is_one_line(args):
    assert_one_line_error(run_rawproxy(*args))


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_missing_certificate_file_is_named(tmp_path, missing):
    """load_cert_chain's error names no file: ours names the one that is missing."""
    pki = tmp_path / "there.pem"
    pki.write_text("not read")
    cert = tmp_path / "missing.pem" if missing == "cert" else pki
    key = tmp_path / "missing.key" if missing == "key" else pki
    done = run_rawproxy(
        "--listen", "tls://127.0.0.1:0", "--cert", str(cert), "--key", str(key), *GOOD[2:]
    )
    assert_one_line_error(done)
    assert f"--{missing} {tmp_path}/missing" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--listen", "tls://127.0.0.1:0", "--cert", "{d}", "--key", "{d}/k.pem"],
            "--cert {d} is a directory: give the certificate's PEM file itself",
        ),
        (
            ["--backend-ca", "{d}/missing.pem"],
            "--backend-ca {d}/missing.pem: no such file (give the path of the PEM file of the "
            "CA that signed the backend's certificate)",
        ),
        (
            ["--backend-ca", "{d}"],
            "--backend-ca {d} is a directory: give the PEM file of the CA",
        ),
    ],
    ids=["cert-is-a-directory", "backend-ca-missing", "backend-ca-is-a-directory"],
)
def test_a_pem_path_that_is_no_file_is_named_with_what_it_should_be(tmp_path, flags, says):
    """Python's 'Is a directory' or 'No such file or directory' alone named neither the
    flag's purpose nor what to give instead."""
    args = [arg.format(d=tmp_path) for arg in flags]
    if "--listen" not in args:
        args = ["--listen", "127.0.0.1:0", "--backend", "https://127.0.0.1:9", *args]
    else:
        args += ["--backend", "127.0.0.1:9"]
    done = run_rawproxy(*args)
    assert_one_line_error(done)
    assert says.format(d=tmp_path) in done.stderr, done.stderr


def test_port_in_use_is_one_line():
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        done = run_rawproxy("--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9")
        assert_one_line_error(done)
        assert "stop the program holding it" in done.stderr, done.stderr
    finally:
        holder.close()


def test_port_held_by_an_outgoing_connection_is_told_apart():
    """A port in the kernel's range for outgoing connections may be some connection's local
    port, with no program listening on it: 'stop the program holding it' sent the admin
    looking for one (the operability review hit this). The hint says what it is instead."""
    server = socket.create_server(("127.0.0.1", 0))
    conn = socket.create_connection(server.getsockname())
    try:
        port = conn.getsockname()[1]
        done = run_rawproxy("--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9")
        assert_one_line_error(done)
        assert f"no program listens on port {port}" in done.stderr, done.stderr
        assert "choose a --listen port outside that range" in done.stderr, done.stderr
    finally:
        conn.close()
        server.close()


def test_listening_ports_of_a_proc_net_tcp_table():
    table = (
        "  sl  local_address rem_address   st tx_queue rx_queue\n"
        "   0: 00000000:07E8 00000000:0000 0A 00000000:00000000\n"
        "   1: 0100007F:83CD 0100007F:1F90 01 00000000:00000000\n"
        "   2: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A\n"
    )
    assert listening_ports(table) == {0x07E8, 0x1F90}


def test_several_listeners(start_proxy, http_backend):
    proxy = start_proxy(http_backend.port, "--listen", "127.0.0.1:0")
    assert len(set(proxy.ports)) == 2, proxy.log_text()
    for port in proxy.ports:
        with HttpClient(port, timeout=5) as c:
            assert c.request(simple_get(f"/via/{port}")).status == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero(start_proxy, http_backend, sig):
    proxy = start_proxy(http_backend.port)
    with HttpClient(proxy.port, timeout=5) as idle:
        assert idle.request(simple_get("/")).status == 200  # a kept-alive connection is open
        assert proxy.stop(sig) == 0
        assert "Traceback" not in proxy.log_text()
        # The last line says the stop was orderly (a crash or SIGKILL leaves none).
        last = proxy.log_text().strip().splitlines()[-1]
        assert re.search(rf"INFO rawproxy \(pid {proxy.proc.pid}\) stopped$", last), last
        kind, _ = wait_closed(idle.sock, timeout=5)
        assert kind in ("eof", "reset")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_zero_with_open_websocket(start_proxy, ws_backend, sig):
    # The tunnel gets --drain-timeout to finish; then the proxy closes it and exits 0.
    proxy = start_proxy(ws_backend.port, "--drain-timeout", "1")
    key = ws_key()
    with HttpClient(proxy.port, timeout=5) as c:
        c.send(
            request_bytes(
                "GET",
                "/ws",
                [
                    ("Host", "b.test"),
                    ("Connection", "Upgrade"),
                    ("Upgrade", "websocket"),
                    ("Sec-WebSocket-Key", key),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
        )
        assert c.read_head()[0] == 101
        ws = WsClient(c.sock, bytes(c.buf))
        ws.send("hello")
        assert ws.recv() == "hello"
        assert proxy.stop(sig) == 0
        assert "Traceback" not in proxy.log_text()


def _unprivileged_prefix() -> list[str]:
    """How to run the proxy without the right to bind ports below 1024."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the privilege to test it")
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import rawproxy"], capture_output=True, timeout=30, cwd="/"
    )
    if probe.returncode != 0:
        pytest.skip("the unprivileged user cannot run this checkout's Python (a private folder)")
    return prefix


def test_low_port_without_privilege_is_one_line():
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        if int(f.read()) <= 80:
            pytest.skip("this kernel lets everyone bind port 80")
    done = subprocess.run(
        [
            *_unprivileged_prefix(),
            sys.executable,
            "-m",
            "rawproxy",
            "--listen",
            "127.0.0.1:80",
            "--backend",
            "127.0.0.1:9",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert_one_line_error(done)
    assert "permission denied" in done.stderr
    assert "CAP_NET_BIND_SERVICE" in done.stderr


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_max_header_count_must_be_a_positive_number(value):
    done = run_rawproxy(
        "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--max-header-count", value
    )
    assert done.returncode == 2
    assert "--max-header-count" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("value", "ok"), [("1MiB", True), ("1048577", False), ("2M", False)])
def test_max_header_size_is_at_most_a_mebibyte(value, ok):
    done = run_rawproxy(*GOOD, "--max-header-size", value, "--check-config", "/dev/null")
    if ok:
        assert "max-header-size" not in done.stderr, done.stderr
    else:
        assert_one_line_error(done)
        assert "at most 1MiB" in done.stderr, done.stderr


def test_tcp_keepalive_beyond_what_linux_takes_is_refused_at_start_up():
    """Linux refuses TCP_KEEPIDLE above 32767 s; the proxy used to accept such a value and
    the setsockopt failed without a word, leaving the kernel's 2 hours in place."""
    done = run_rawproxy("--check-config", "/dev/null", *GOOD, "--tcp-keepalive", "40000")
    assert_one_line_error(done)
    assert "--tcp-keepalive" in done.stderr
    assert "32767" in done.stderr


@pytest.mark.parametrize(("value", "seconds"), [("2m", 120), ("1.5", 2), ("32767", 32767)])
def test_tcp_keepalive_is_a_duration_like_the_others(value, seconds):
    """--help says durations take a unit; --tcp-keepalive refused "2m" as "not a whole number
    of seconds". It is rounded up to whole seconds, the socket option's unit."""
    done = run_rawproxy("--check-config", "/dev/null", *GOOD, "--tcp-keepalive", value)
    assert done.returncode == 0, done.stderr
    assert f"tcp-keepalive = {seconds}\n" in done.stdout
