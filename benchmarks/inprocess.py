"""The proxy's own cost per request or per WebSocket handshake, without scheduler noise.

    python -m benchmarks.inprocess [w1|w3|w5|null] [--ops N] [--source DIR] [--repeat K]

One process, one thread: a real rawproxy Server (from the working tree, or from the source
tree `--source DIR`, e.g. a `git worktree` of another revision) is driven turn by turn,
against a client and a backend on loopback sockets in the same process:

- w1: a kept-alive `GET /` answered by a 12-byte body (the fast path), per exchange;
- w5: connect, WebSocket upgrade, 101, client close, backend close, per handshake;
- w3: a 64-byte message and its 64-byte answer through one upgraded tunnel, per round trip;
- null: w1 through a ten-line forwarder with the same selector and socket calls, the floor
  that the proxy's own work adds to.

It prints microseconds per operation (wall, and the process's user and system time), the
best of `--repeat` runs, with the garbage collector settled as Server.run settles it. The
figures include the client's and backend's side, which stay the same between revisions:
compare revisions (or a change against `null`), not these numbers against the harness's. On
a noisy VM it resolves differences of a microsecond that 3-second cross-process runs cannot;
claims of speed still come from `python -m benchmarks`.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import sys
import time
from collections.abc import Callable

REQUEST = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\nhello world\n"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: app.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGOzhZRbK+xOo=\r\n\r\n"
)

Op = Callable[[], None]


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def proxy_ops(mode: str) -> Op:
    from rawproxy.cli import build_parser, load_settings
    from rawproxy.server import Server

    backend = socket.create_server(("127.0.0.1", 0), backlog=1024)
    argv = ["--listen", "127.0.0.1:0", "--backend", f"127.0.0.1:{backend.getsockname()[1]}"]
    argv += ["--log-level", "error", "--max-connections", "100000"]
    config, _ = load_settings(build_parser().parse_args(argv))
    server = Server(config)
    server.open()
    server._accept_on()
    loop = server.loop
    address = server.listeners[0].getsockname()

    if hasattr(loop, "run_once"):

        def turn() -> None:
            loop.run_once(0)

    else:  # a revision from before 2026-11-22 (`--source`): a selectors loop

        def turn() -> None:
            for key, mask in loop.selector.select(0):  # type: ignore[attr-defined]
                key.data(mask)
            loop.now = time.monotonic()
            loop._run_timers()

    if mode in ("w1", "w3"):
        # One kept-alive connection, opened by a first exchange: a GET, or the upgrade.
        first, answer = (REQUEST, ANSWER) if mode == "w1" else (UPGRADE, SWITCH)
        client = _nodelay(socket.create_connection(address))
        turn()
        client.send(first)
        turn()
        turn()
        conn = _nodelay(backend.accept()[0])
        turn()
        conn.recv(65536)
        conn.send(answer)
        turn()
        assert client.recv(65536).startswith(answer[:12]), "no answer through the proxy"
        if mode == "w1":
            return _exchange(client, conn, turn)
        message = bytes(range(64))  # a small WebSocket message each way, through the tunnel
        return _exchange(client, conn, turn, message, message)

    backend.setblocking(False)

    def handshake() -> None:
        client = socket.create_connection(address)
        turn()
        client.send(UPGRADE)
        while True:
            turn()
            try:
                conn = backend.accept()[0]
                break
            except BlockingIOError:
                pass
        turn()
        conn.recv(65536)
        conn.send(SWITCH)
        turn()
        assert client.recv(65536).startswith(b"HTTP/1.1 101"), "no 101 through the proxy"
        client.close()
        turn()
        turn()
        conn.recv(65536)
        conn.close()
        turn()
        turn()

    return handshake


def null_ops() -> Op:
    """w1 through the least a forwarder can do with the same calls."""
    backend = socket.create_server(("127.0.0.1", 0))
    front = socket.create_server(("127.0.0.1", 0))
    client = _nodelay(socket.create_connection(front.getsockname()))
    accepted = _nodelay(front.accept()[0])
    upstream = _nodelay(socket.create_connection(backend.getsockname()))
    conn = _nodelay(backend.accept()[0])
    accepted.setblocking(False)
    upstream.setblocking(False)
    sel = selectors.DefaultSelector()
    view = memoryview(bytearray(256 * 1024))

    def forward(src: socket.socket, dst: socket.socket) -> Callable[[int], None]:
        def on_ready(_mask: int) -> None:
            n = src.recv_into(view)
            dst.send(bytes(view[:n]))

        return on_ready

    sel.register(accepted, selectors.EVENT_READ, forward(accepted, upstream))
    sel.register(upstream, selectors.EVENT_READ, forward(upstream, accepted))

    def turn() -> None:
        for key, mask in sel.select(0):
            key.data(mask)

    return _exchange(client, conn, turn)


def _exchange(
    client: socket.socket,
    conn: socket.socket,
    turn: Callable[[], None],
    request: bytes = REQUEST,
    answer: bytes = ANSWER,
) -> Op:
    """One exchange (w1's by default): the client's request, through a turn of the forwarder,
    answered by the backend, through another turn."""

    def exchange() -> None:
        client.send(request)
        turn()
        conn.recv(65536)
        conn.send(answer)
        turn()
        client.recv(65536)

    return exchange


def measure(op: Op, ops: int) -> tuple[float, float, float]:
    for _ in range(min(2000, max(1, ops // 5))):  # warm-up
        op()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(ops):
        op()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    scale = 1e6 / ops
    return (
        (t1 - t0) * scale,
        (r1.ru_utime - r0.ru_utime) * scale,
        (r1.ru_stime - r0.ru_stime) * scale,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inprocess", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("mode", nargs="?", default="w1", choices=["w1", "w3", "w5", "null"])
    parser.add_argument("--ops", type=int, default=0, help="operations per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is shown")
    parser.add_argument("--source", help="a rawproxy source tree to measure instead")
    args = parser.parse_args(argv)
    if args.source:
        sys.path.insert(0, args.source)
    ops = args.ops or (5000 if args.mode == "w5" else 30000)
    op = null_ops() if args.mode == "null" else proxy_ops(args.mode)
    import rawproxy.loop

    # The garbage collector as Server.run leaves it before serving (a source tree older than
    # bf8efc0 has no settle_gc and keeps the default collector).
    settle_gc = getattr(rawproxy.loop, "settle_gc", None)
    if settle_gc is not None:
        settle_gc()
    best = min((measure(op, ops) for _ in range(args.repeat)), key=lambda r: r[0])
    import rawproxy

    where = "null forwarder" if args.mode == "null" else rawproxy.__file__.rsplit("/", 2)[0]
    print(
        f"{args.mode}: {best[0]:.2f} us per op wall (user {best[1]:.2f}, system {best[2]:.2f}),"
        f" best of {args.repeat} x {ops}; {where}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
