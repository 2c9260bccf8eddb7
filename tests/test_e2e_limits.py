"""Running out of file descriptors degrades, never spins: accepting pauses, the loop stays idle,
and service comes back as soon as descriptors are free again."""

from __future__ import annotations

import errno
import os
import re
import resource
import sys
import time

import peers
import pytest
from peers import assert_serves, connect

from rawproxy.server import (
    ADMIN_MAX_OPEN,
    FDS_RESERVED,
    PIPES_BUDGETED,
    connections_that_fit,
    pipes_that_fit,
    raise_nofile_limit,
)
from rawproxy.tunnel import PipePool


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


def test_fd_exhaustion_with_a_scrape_waiting_does_not_spin(start_proxy, http_backend, sockets):
    """The admin listener (/metrics, /healthz) used to be left in the loop when its accept()
    failed for want of descriptors: level-triggered, it was reported again at once, and a
    single scrape waiting (when the proxy is in trouble is when it is scraped) made the
    proxy spin, 1.49 s of CPU in 1.5 s. Now it pauses as the client listeners do."""
    proxy = start_proxy(http_backend.port, "--admin-listen", "127.0.0.1:0")
    assert proxy.admin_port is not None
    _, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (32, hard))
    for _ in range(48):
        sockets.append(connect(proxy.port, timeout=5))
    proxy.wait_for_log(r"cannot accept", timeout=5)
    scrape = connect(proxy.admin_port, timeout=10)
    sockets.append(scrape)
    scrape.sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
    time.sleep(0.5)
    before = proxy.cpu_seconds()
    time.sleep(1.5)
    used = proxy.cpu_seconds() - before
    assert used < 0.5, f"the proxy used {used:.2f} s of CPU in 1.5 s while out of descriptors"
    for sock in sockets[:-1]:
        sock.close()
    resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE, (1024, hard))
    # The scrape waited in the backlog and is answered once descriptors are back.
    assert peers.recv_until(scrape, bytearray(), b"ok\n").startswith(b"HTTP/1.1 200 OK")
    assert_serves(proxy, http_backend)


def test_admin_requests_are_capped(start_proxy, http_backend, sockets):
    """Connections to the admin listener that send nothing were each held for 5 s without
    limit: enough of them took every descriptor, and clients waited. At most ADMIN_MAX_OPEN
    are open at once now; the others wait in the backlog, and a scrape among them is
    answered as soon as the ones before it end. Clients are served meanwhile."""
    proxy = start_proxy(http_backend.port, "--admin-listen", "127.0.0.1:0")
    assert proxy.admin_port is not None

    def descriptors() -> int:
        return len(os.listdir(f"/proc/{proxy.pid}/fd"))

    base = descriptors()
    idle = [connect(proxy.admin_port, timeout=10) for _ in range(4 * ADMIN_MAX_OPEN)]
    sockets.extend(idle)
    scrape = connect(proxy.admin_port, timeout=10)
    sockets.append(scrape)
    scrape.sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
    assert_serves(proxy, http_backend)  # the proxy's turns went by; clients still served
    time.sleep(0.3)
    held = descriptors() - base
    assert held <= ADMIN_MAX_OPEN, f"{held} admin connections held at once"
    started = time.monotonic()
    for sock in idle:
        sock.close()
    assert peers.recv_until(scrape, bytearray(), b"ok\n").startswith(b"HTTP/1.1 200 OK")
    waited = time.monotonic() - started
    assert waited < 3, f"the scrape waited {waited:.1f} s after the others left"
    assert descriptors() <= base + 1


# -- the connection limit fits the descriptor limit --------------------------------------------


def nofile_launcher(soft: int, hard: int, privileged: bool = False) -> list[str]:
    """A command that execs the rest of its arguments with RLIMIT_NOFILE (soft, hard). Unless
    `privileged`, without CAP_SYS_RESOURCE (dropped from the bounding set, so that root's
    exec does not get it back): the proxy then cannot raise the hard limit, as any user."""
    drop = (
        ""
        if privileged
        else "import ctypes; ctypes.CDLL(None, use_errno=True).prctl(24, 24, 0, 0, 0); "
    )  # prctl(PR_CAPBSET_DROP, CAP_SYS_RESOURCE); fails harmlessly when not root
    return [
        sys.executable,
        "-c",
        f"import os, resource, sys; {drop}"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    ]


WARNING = r"--max-connections (\d+) needs about \d+ file descriptors"


def test_clients_beyond_the_descriptor_limit_wait_instead_of_getting_502(
    run_proxy, http_backend, background
):
    """With 64 descriptors (soft and hard, so the proxy cannot raise them) and the default
    --max-connections 10000, the proxy used to accept clients until EMFILE and then had no
    descriptor for their backend sockets: 502. Now it accepts what fits; the rest wait in the
    listen backlog and are served as others finish."""
    proxy = run_proxy(*peers.proxy_args(http_backend.port), launcher=nofile_launcher(64, 64))
    warnings = proxy.logs_matching(WARNING)
    assert len(warnings) == 1, proxy.log_text()
    assert "limit is 64" in warnings[0]
    assert "LimitNOFILE=" in warnings[0]
    fitting = int(re.search(r"at most (\d+) connections", warnings[0]).group(1))
    assert 1 <= fitting < 30

    def fetch(index: int) -> tuple[int, bytes]:
        with peers.HttpClient(proxy.port, timeout=20) as c:
            resp = c.request(peers.simple_get(f"/stream?{index}", "a", ("Connection", "close")))
        return resp.status, resp.body

    clients = [background(fetch, i) for i in range(60)]
    # The backend holds every answer until the gate opens: the connections that fit are all
    # in, and no more.
    http_backend.wait_for_heads(fitting, timeout=10)
    time.sleep(0.5)
    assert len(http_backend.heads) == fitting
    http_backend.gate.set()
    results = [task.join(30) for task in clients]
    assert [status for status, _ in results] == [200] * 60
    assert all(body == b"first-partsecond-part" for _, body in results)
    assert len(proxy.logs_matching(WARNING)) == 1
    assert not proxy.logs_matching(r"Too many open files|cannot accept"), proxy.log_text()


def test_soft_descriptor_limit_is_raised_to_the_hard_one(run_proxy, http_backend):
    proxy = run_proxy(*peers.proxy_args(http_backend.port), launcher=nofile_launcher(64, 4096))
    assert resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE) == (4096, 4096)
    # 4096 carries fewer than 10000 connections: said once, with the raised limit.
    warnings = proxy.logs_matching(WARNING)
    assert len(warnings) == 1
    assert "limit is 4096" in warnings[0]
    assert_serves(proxy, http_backend)


def _may_raise_hard_limit() -> bool:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))
    except (OSError, ValueError):
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # lowering is always allowed
    return True


@pytest.mark.skipif(not _may_raise_hard_limit(), reason="needs CAP_SYS_RESOURCE (root)")
def test_root_raises_the_hard_limit_to_what_max_connections_needs(run_proxy, http_backend):
    """As HAProxy sets the ulimit-n its maxconn needs: a privileged proxy raises the hard
    limit too (up to fs.nr_open), and then nothing is lowered or warned about."""
    proxy = run_proxy(
        *peers.proxy_args(http_backend.port, "--max-connections", "30000"),
        launcher=nofile_launcher(64, 64, privileged=True),
    )
    soft, hard = resource.prlimit(proxy.pid, resource.RLIMIT_NOFILE)
    assert soft == hard >= 30000 * 2
    assert not proxy.logs_matching(WARNING), proxy.log_text()
    assert_serves(proxy, http_backend)


def test_with_workers_the_descriptor_warning_is_said_once(run_proxy, http_backend):
    """Each worker is a process with its own descriptor limit (inherited, raised, from the
    supervisor): the warning speaks of each, once."""
    proxy = run_proxy(
        *peers.proxy_args(http_backend.port, "--workers", "2"),
        launcher=nofile_launcher(64, 64),
    )
    warnings = proxy.logs_matching(WARNING)
    assert len(warnings) == 1, proxy.log_text()
    assert "each of the 2 workers" in warnings[0]
    assert_serves(proxy, http_backend)


def test_a_limit_that_fits_is_not_warned_about(run_proxy, http_backend):
    proxy = run_proxy(
        *peers.proxy_args(http_backend.port, "--max-connections", "10"),
        launcher=nofile_launcher(64, 64),
    )
    assert not proxy.logs_matching(WARNING), proxy.log_text()
    assert_serves(proxy, http_backend)


@pytest.mark.parametrize(
    ("nofile", "requested", "expected"),
    [
        (1024 * 1024, 10000, 10000),  # fits: unchanged
        (-1, 10000, 10000),  # unlimited
        (64, 10000, (64 - FDS_RESERVED) * 4 // 10),  # 2.5 descriptors a connection
        (1024, 10000, (1024 - FDS_RESERVED - 128) // 2),  # 2 each and 64 pipes
        (20000, 10000, (20000 - FDS_RESERVED - 128) // 2),  # 9,000 tunnels fit in 20,000
        (1024, 100, 100),
        (FDS_RESERVED + 25, 10, 10),  # exactly fits
        (FDS_RESERVED + 24, 10, 9),
        (FDS_RESERVED, 10000, 1),  # never below one
        (8, 10000, 1),
    ],
)
def test_connections_that_fit(nofile: int, requested: int, expected: int) -> None:
    assert connections_that_fit(nofile, requested) == expected


def test_connections_and_pipes_that_fit_stay_within_the_limit() -> None:
    for nofile in (48, 64, 100, 1024, 4096, 65536):
        for requested in (1, 10, 100, 10000):
            connections = connections_that_fit(nofile, requested, reserved=40)
            pipes = pipes_that_fit(nofile, connections, reserved=40)
            if connections > 1:
                assert 40 + 2 * connections + 2 * pipes <= nofile
                # Where the limit was lowered, pipes still get one per four connections, or
                # the cap.
                assert pipes >= min(connections // 4, PIPES_BUDGETED)
    assert connections_that_fit(64, 10000, reserved=34) == 12


def test_pipe_pool_opens_no_more_than_its_limit() -> None:
    pool = PipePool(limit=2)
    first, second = pool.take(), pool.take()
    with pytest.raises(OSError, match="descriptor budget") as raised:
        pool.take()
    assert raised.value.errno == errno.EMFILE
    pool.give_back(first)
    assert pool.take() == first  # a spare one is no new descriptor
    pool.give_back(first)
    pool.give_back(second)
    pool.close()
    assert pool.lent == 0


def test_raise_nofile_limit_is_harmless_when_soft_equals_hard() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[0] != before[1]:
        pytest.skip("this test process has soft < hard; not changing it here")
    assert raise_nofile_limit() == before
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


# -- --max-header-count --------------------------------------------------------------------------


def head_with_fields(count: int, method: str = "GET", how: str = "fast") -> list[bytes]:
    """A request with `count` header fields (Host and, for a body, its framing header
    included), as the pieces to send. `how`: fast (a bodiless CRLF head in one piece: the
    fast path), lf (bare LF line ends), pieces (the head in two sends), body
    (Content-Length), chunked; all but fast go by h11's path."""
    headers = [("Host", "backend.test")]
    body = b""
    if how == "body":
        headers.append(("Content-Length", "5"))
        body = b"hello"
    elif how == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = b"5\r\nhello\r\n0\r\n\r\n"
    headers += [(f"X{i}", "v") for i in range(count - len(headers))]
    data = peers.request_bytes(method, "/echo" if body else "/count", headers, body)
    if how == "lf":
        data = data.replace(b"\r\n", b"\n")
    if how == "pieces":
        return [data[:40], data[40:]]
    return [data]


def send_pieces(c: peers.HttpClient, pieces: list[bytes]) -> peers.Response:
    for piece in pieces:
        c.send(piece)
        time.sleep(0.05)
    return c.read_response()


@pytest.mark.parametrize("how", ["fast", "lf", "pieces", "body", "chunked"])
def test_more_than_max_header_count_fields_get_431(start_proxy, http_backend, client, how):
    """12,000 header fields (58 KiB, under --max-header-size) used to be parsed and forwarded,
    13 ms of CPU each; HAProxy refuses more than 101, Apache more than 100 by default."""
    proxy = start_proxy(http_backend.port)
    c = client(proxy.port)
    method = "POST" if how in ("body", "chunked") else "GET"
    resp = send_pieces(c, head_with_fields(100, method, how))
    assert resp.status == 200
    assert len(http_backend.wait_for_requests(1)) == 1
    assert resp.body == (b"hello" if method == "POST" else b"GET /count")
    for count in (101, 5000):  # 5,000 fields: 50 KiB, under --max-header-size
        c = client(proxy.port)
        mark = proxy.mark()
        resp = send_pieces(c, head_with_fields(count, method, how))
        assert resp.status == 431
        assert b"--max-header-count" in resp.body
        assert c.wait_closed()[0] in ("eof", "reset")
        assert proxy.logs_matching(r"431.*more than 100 header fields", since=mark)
    assert len(http_backend.heads) == 1, "a head with too many fields reached the backend"


def test_max_header_count_after_a_kept_alive_request(start_proxy, http_backend, client):
    """The limit holds for the next request on a connection too (idle, then pipelined)."""
    proxy = start_proxy(http_backend.port, "--max-header-count", "10")
    c = client(proxy.port)
    assert send_pieces(c, head_with_fields(10)).status == 200
    assert send_pieces(c, head_with_fields(11)).status == 431
    c = client(proxy.port)
    c.send(head_with_fields(10)[0] + head_with_fields(11)[0])
    assert c.read_response().status == 200
    assert c.read_response().status == 431
    assert len(http_backend.heads) == 2


def test_max_header_count_in_the_config_file(start_proxy, http_backend, client, tmp_path):
    path = tmp_path / "rawproxy.toml"
    path.write_text("max-header-count = 5\n")
    done = peers.run_rawproxy(
        "--check-config", str(path), "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"
    )
    assert done.returncode == 0, done.stderr
    assert "max-header-count = 5\n" in done.stdout
    proxy = start_proxy(http_backend.port, "--config", str(path))
    for how in ("fast", "body"):
        method = "POST" if how == "body" else "GET"
        assert send_pieces(client(proxy.port), head_with_fields(5, method, how)).status == 200
        assert send_pieces(client(proxy.port), head_with_fields(6, method, how)).status == 431
    # The command line overrides the file.
    proxy = start_proxy(http_backend.port, "--config", str(path), "--max-header-count", "6")
    assert send_pieces(client(proxy.port), head_with_fields(6)).status == 200


def test_default_max_header_count_in_check_config_and_help(tmp_path):
    path = tmp_path / "rawproxy.toml"
    path.write_text('listen = ["127.0.0.1:8080"]\nbackend = "127.0.0.1:9"\n')
    done = peers.run_rawproxy("--check-config", str(path))
    assert "max-header-count = 100\n" in done.stdout
    assert "--max-header-count" in peers.run_rawproxy("--help").stdout
