"""Fixtures for the end-to-end tests: the proxy as a real process, the backends, clients.

The proxy is started exactly as a user starts it, `python -m rawproxy --listen 127.0.0.1:0
--backend ...`; the fixture reads its stderr until `ready`, takes the port from the
`listening on` line, and keeps collecting stderr lines for the test to assert on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import peers
import pytest


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., peers.ProxyProcess]]:
    """`start_proxy(backend_port, *flags)` starts a proxy; all are stopped at teardown, and a
    Python traceback anywhere in their stderr fails the test. `listen` may be a list (one
    --listen each); `backend` replaces the default `--backend 127.0.0.1:PORT`."""
    procs: list[peers.ProxyProcess] = []

    def start(
        backend_port: int,
        *extra: str,
        listen: str | list[str] = "127.0.0.1:0",
        backend: str | None = None,
    ) -> peers.ProxyProcess:
        args = peers.proxy_args(backend_port, *extra, listen=listen, backend=backend)
        proc = peers.ProxyProcess(args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
    for proc in procs:
        log = proc.log_text()
        assert "Traceback" not in log, f"a traceback in the proxy's log:\n{log}"


@pytest.fixture
def run_proxy() -> Iterator[Callable[..., peers.ProxyProcess]]:
    """`run_proxy(*args, env=None, launcher=())`: `python -m rawproxy ARGS` exactly (nothing
    added; see `peers.ProxyProcess` for `env` and `launcher`). At teardown each proxy still
    running gets SIGTERM, and a second one if it is still draining 5 s later; a traceback in
    any proxy's log fails the test."""
    procs: list[peers.ProxyProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, launcher: Iterable[str] = ()
    ) -> peers.ProxyProcess:
        proc = peers.ProxyProcess(list(args), env=env, launcher=launcher)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGTERM)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.proc.wait(5)
        proc.stop()  # the second signal stops a proxy still draining at once
    for proc in procs:
        log = proc.log_text()
        assert "Traceback" not in log, f"a traceback in the proxy's log:\n{log}"


@pytest.fixture
def http_backend() -> Iterator[peers.HttpBackend]:
    backend = peers.HttpBackend()
    yield backend
    backend.gate.set()
    backend.stop()
    peers.assert_no_malformed_http(backend)


@pytest.fixture
def backends() -> Iterator[dict[str, peers.HttpBackend]]:
    """Two HTTP backends, "a" and "b" (peers.served_by tells which one a request reached)."""
    made = {"a": peers.HttpBackend(), "b": peers.HttpBackend()}
    yield made
    for backend in made.values():
        backend.gate.set()
        backend.stop()
    for backend in made.values():
        peers.assert_no_malformed_http(backend)


@pytest.fixture
def make_backend() -> Iterator[Callable[..., Any]]:
    """`make_backend(cls=HttpBackend, *args, ssl_context=None)` starts a backend (TLS with a
    context); all are stopped at teardown, and an HttpBackend that received malformed HTTP
    fails the test."""
    made: list[Any] = []

    def make(cls: type = peers.HttpBackend, *args: Any, ssl_context: Any = None) -> Any:
        backend = cls(*args, ssl_context=ssl_context)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        if isinstance(backend, peers.HttpBackend):
            backend.gate.set()
        backend.stop()
    for backend in made:
        if isinstance(backend, peers.HttpBackend):
            peers.assert_no_malformed_http(backend)


@pytest.fixture
def port80_backend() -> Iterator[peers.HttpBackend]:
    """An HttpBackend on 127.0.0.1:80, for a backend URL without a port (skipped where port
    80 cannot be had: not root, or in use)."""
    try:
        backend = peers.HttpBackend(port=80)
    except OSError as e:
        pytest.skip(f"cannot listen on 127.0.0.1:80: {e}")
    yield backend
    backend.stop()
    peers.assert_no_malformed_http(backend)


@pytest.fixture
def ws_backend() -> Iterator[peers.WsBackend]:
    backend = peers.WsBackend()
    yield backend
    backend.stop()


@pytest.fixture
def scripted_backend() -> Iterator[Callable[..., peers.ScriptedBackend]]:
    """`scripted_backend(script)` starts a ScriptedBackend; all are stopped at teardown."""
    backends: list[peers.ScriptedBackend] = []

    def start(script: Callable[[peers.ScriptedConn], object]) -> peers.ScriptedBackend:
        backend = peers.ScriptedBackend(script)
        backends.append(backend)
        return backend

    yield start
    for backend in backends:
        backend.stop()


@pytest.fixture
def proxy(
    start_proxy: Callable[..., peers.ProxyProcess], http_backend: peers.HttpBackend
) -> peers.ProxyProcess:
    """A proxy with default settings in front of the HTTP backend."""
    return start_proxy(http_backend.port)


@pytest.fixture
def client() -> Iterator[Callable[..., peers.HttpClient]]:
    """`client(port)` opens an HttpClient (TLS with `ssl_context=...`); every one is closed at
    teardown."""
    clients: list[peers.HttpClient] = []

    def open_client(
        port: int, timeout: float = peers.DEFAULT_TIMEOUT, **tls: Any
    ) -> peers.HttpClient:
        c = peers.HttpClient(port, timeout, **tls)
        clients.append(c)
        return c

    yield open_client
    for c in clients:
        c.close()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """A list to register raw sockets in; each is closed at teardown."""
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


@pytest.fixture
def background(sockets: list[socket.socket]) -> Iterator[Callable[..., peers.Background]]:
    """`background(fn, *args)` runs fn in a daemon thread. At teardown the registered sockets
    are closed first (which unblocks any thread stuck on one), then every thread is joined."""
    tasks: list[peers.Background] = []

    def start(fn: Callable[..., object], *args: object) -> peers.Background:
        task = peers.Background(fn, *args)
        tasks.append(task)
        return task

    yield start
    for s in sockets:
        s.close()
    for task in tasks:
        task.thread.join(10)
    assert not [t for t in tasks if t.thread.is_alive()], "a background thread did not finish"


@pytest.fixture(scope="session")
def blob() -> memoryview:
    """64 MiB of random bytes, made once per session."""
    return memoryview(os.urandom(peers.BLOB_SIZE))


@pytest.fixture(scope="session")
def blob_sha(blob: memoryview) -> str:
    return peers.sha256(blob)


@pytest.fixture
def launch() -> Iterator[Callable[..., peers.ProxyProcess]]:
    """`launch(*args, listen=...)`: `python -m rawproxy --listen ... ARGS` (no --backend is
    added); every proxy is stopped at teardown, and a traceback in its log fails the test."""
    procs: list[peers.ProxyProcess] = []

    def start(*args: str, listen: str | list[str] = "127.0.0.1:0") -> peers.ProxyProcess:
        listens = [listen] if isinstance(listen, str) else listen
        proc = peers.ProxyProcess([*(a for where in listens for a in ("--listen", where)), *args])
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.log_text(), proc.log_text()


@pytest.fixture
def inprocess_404_server() -> Iterator[Callable[..., Any]]:
    """`inprocess_404_server(*flags)`: a real rawproxy Server in the test's own process, not
    running (the test turns its loop), whose one route is /api/: every other path is answered
    404 by the proxy itself, with no backend round trip between pipelined requests. Stopped
    at teardown."""
    from rawproxy.cli import build_parser, load_settings
    from rawproxy.server import Server

    made: list[tuple[Any, socket.socket]] = []

    def make(*flags: str) -> Any:
        api = socket.create_server(("127.0.0.1", 0))
        argv = [
            "--listen",
            "127.0.0.1:0",
            "--route",
            f"/api/=http://127.0.0.1:{api.getsockname()[1]}",
        ]
        config, _ = load_settings(
            build_parser().parse_args([*argv, *flags, "--log-level", "error"])
        )
        server = Server(config)
        made.append((server, api))
        server.open()
        server._accept_on()
        return server

    yield make
    for server, api in made:
        server.stop()
        api.close()


@pytest.fixture
def inprocess_server() -> Iterator[tuple[Any, socket.socket]]:
    """A real rawproxy Server in the test's own process, not running: the test drives its
    loop turn by turn (`server.loop.run_once`), with the backend's listening socket
    (non-blocking) to accept its connections from. Stopped at teardown."""
    from rawproxy.cli import build_parser, load_settings
    from rawproxy.server import Server

    backend = socket.create_server(("127.0.0.1", 0))
    backend.setblocking(False)
    argv = ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.getsockname()[1]}"]
    config, _ = load_settings(build_parser().parse_args([*argv, "--log-level", "error"]))
    server = Server(config)
    server.open()
    server._accept_on()
    yield server, backend
    server.stop()
    backend.close()
