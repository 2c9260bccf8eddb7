"""The pure-Python load tools: the W4 idle-tunnel client always, and stand-ins for the
compiled `benchtool` (and for wrk in W1) where gcc or wrk is missing.

    python -m benchmarks.pytool serve --port P
    python -m benchmarks.pytool http --port P --conns 50 --seconds 2
    python -m benchmarks.pytool tunnel --port P --mode up|down|both --bytes N
    python -m benchmarks.pytool pingpong --port P --conns C --seconds S
    python -m benchmarks.pytool handshake --port P --inflight K --seconds S
    python -m benchmarks.pytool idle --port P --count N [--pause-after K]

Same protocol and the same one-line JSON results as benchtool.c (plain TCP only: the TLS
variants need the compiled tool). The stand-ins are slower than what they replace, so a
DIRECT row measured with them may be limited by the load generator; the results say so.

`idle` opens N upgraded echo tunnels, prints {"opened": ...}, then answers commands on
stdin: `check` sends 16 bytes down every tunnel and prints how many came back, `close`
(or end of input) closes them all and exits. With `--pause-after K` it first opens K, prints
{"paused": K, ...} and waits for a line on stdin before it opens the rest, so that the
caller can read the proxy's memory in between (W4's marginal cost per tunnel).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
WS_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
RESPONSE_200 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nhello, world\n"
)
RESPONSE_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + WS_ACCEPT.encode() + b"\r\n\r\n"
)
CHUNK = 1 << 20
RANDOM = memoryview(os.urandom(4 * CHUNK))


def upgrade_request(path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    samples_ns.sort()
    out: dict[str, float] = {}
    for key, p in (("p50_us", 50.0), ("p99_us", 99.0), ("p999_us", 99.9), ("max_us", 100.0)):
        if samples_ns:
            i = round(p / 100 * (len(samples_ns) - 1))
            out[key] = samples_ns[i] / 1000
        else:
            out[key] = -1.0
    return out


def connect_upgraded(port: int, path: str, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """A blocking tunnel: (socket, bytes that came after the 101 head)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(upgrade_request(path))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the 101 ({buf[:80]!r})")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"expected 101, got {head[:80]!r}")
    return sock, rest


# --- serve ------------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("inbuf", "mode", "out", "rd_eof", "sink_left", "sock", "src_left", "tunnel")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.out = bytearray()
        self.tunnel = False
        self.mode = "echo"
        self.sink_left = 0
        self.src_left = 0
        self.rd_eof = False


def serve(port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    emit({"port": listener.getsockname()[1], "tls_built": False})
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            conn: _Conn | None = key.data
            if conn is None:
                _accept(listener, sel)
                continue
            if _progress(conn):
                sel.unregister(conn.sock)
                conn.sock.close()
                continue
            events = 0
            if not conn.rd_eof and len(conn.out) < CHUNK:
                events |= selectors.EVENT_READ
            if conn.out or conn.src_left:
                events |= selectors.EVENT_WRITE
            if events != key.events:
                sel.modify(conn.sock, events, conn)


def _accept(listener: socket.socket, sel: selectors.BaseSelector) -> None:
    for _ in range(64):
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(sock, selectors.EVENT_READ, _Conn(sock))


def _start_tunnel(conn: _Conn, head: bytes) -> None:
    path = head.split(b" ", 2)[1].decode("latin-1") if head.count(b" ") >= 2 else "/"
    n = int(path.split("bytes=", 1)[1].split("&")[0]) if "bytes=" in path else 0
    conn.tunnel = True
    for mode in ("sink", "source", "both"):
        if path.startswith(f"/ws/{mode}"):
            conn.mode = mode
    if conn.mode in ("sink", "both"):
        conn.sink_left = n
    if conn.mode in ("source", "both"):
        conn.src_left = n
    conn.out += RESPONSE_101


def _tunnel_bytes(conn: _Conn, data: bytes | memoryview) -> None:
    if conn.mode == "echo":
        conn.out += data
    elif conn.mode in ("sink", "both"):
        conn.sink_left = max(0, conn.sink_left - len(data))


def _progress(conn: _Conn) -> bool:
    """Move what can move; True when the connection is finished."""
    sock = conn.sock
    try:
        if conn.out:
            sent = sock.send(conn.out)
            del conn.out[:sent]
        if conn.tunnel and not conn.out and conn.src_left:
            n = min(conn.src_left, CHUNK)
            conn.src_left -= sock.send(RANDOM[:n])
        if not conn.rd_eof and len(conn.out) < CHUNK:
            data = sock.recv(CHUNK)
            if not data:
                conn.rd_eof = True
            elif conn.tunnel:
                _tunnel_bytes(conn, data)
            else:
                conn.inbuf += data
                _parse_heads(conn)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        return True
    if conn.out:
        return False
    if not conn.tunnel or conn.mode == "echo":
        return conn.rd_eof
    if conn.rd_eof and conn.sink_left:
        return True
    return conn.sink_left == 0 and conn.src_left == 0


def _parse_heads(conn: _Conn) -> None:
    while not conn.tunnel:
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(conn.inbuf[: end + 4])
        del conn.inbuf[: end + 4]
        if b"\nupgrade:" in head.lower():
            _start_tunnel(conn, head)
            rest = bytes(conn.inbuf)
            conn.inbuf.clear()
            if rest:
                _tunnel_bytes(conn, rest)
            return
        conn.out += RESPONSE_200


# --- http: W1 without wrk -----------------------------------------------------------------------


def http_load(port: int, conns: int, seconds: float, warmup: float) -> None:
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sel = selectors.DefaultSelector()
    state: dict[int, list[Any]] = {}  # fd -> [sock, buffer, sent_at]
    for _ in range(conns):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        state[sock.fileno()] = [sock, bytearray(), time.perf_counter_ns()]
        sock.send(request)
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + seconds
    samples: list[int] = []
    errors = 0
    while (now := time.monotonic()) < end:
        for key, _ in sel.select(0.1):
            entry = state[key.fd]
            sock, buf = entry[0], entry[1]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                errors += 1
                sel.unregister(sock)
                continue
            buf += data
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                length = _content_length(bytes(buf[:head_end]))
                if length is None:
                    raise SystemExit("a response without Content-Length")
                total = head_end + 4 + length
                if len(buf) < total:
                    break
                status_ok = buf.startswith(b"HTTP/1.1 200")
                del buf[:total]
                done_at = time.perf_counter_ns()
                if not status_ok:
                    errors += 1
                elif now >= measure_from:
                    samples.append(done_at - entry[2])
                entry[2] = done_at
                sock.send(request)
    measured = min(time.monotonic(), end) - measure_from
    for entry in state.values():
        entry[0].close()
    result: dict[str, Any] = {
        "requests": len(samples),
        "errors": errors,
        "seconds": measured,
        "rate": len(samples) / measured if measured > 0 else 0.0,
    }
    result.update(percentiles(samples))
    emit(result)


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


# --- tunnel: W2 ---------------------------------------------------------------------------------


def tunnel(port: int, mode: str, total: int) -> None:
    path = {"up": "sink", "down": "source", "both": "both"}[mode]
    sock, rest = connect_upgraded(port, f"/ws/{path}?bytes={total}", timeout=60)
    received = len(rest)
    sent = 0
    start = time.perf_counter()

    def send_all() -> None:
        nonlocal sent
        while sent < total:
            n = min(CHUNK, total - sent)
            sock.sendall(RANDOM[:n])
            sent += n

    sender = threading.Thread(target=send_all, daemon=True)
    if mode in ("up", "both"):
        sender.start()
    buf = bytearray(CHUNK)
    error = None
    want = total if mode in ("down", "both") else None
    while want is None or received < want:
        n = sock.recv_into(buf)
        if n == 0:
            if want is not None:
                error = "the target closed early"
            break
        received += n
    if mode in ("up", "both"):
        sender.join(60)
    seconds = time.perf_counter() - start
    sock.close()
    emit({"sent": sent, "received": received, "seconds": seconds, "error": error})


# --- pingpong: W3 --------------------------------------------------------------------------------


def pingpong(port: int, conns: int, seconds: float, warmup: float, size: int) -> None:
    msg = b"x" * size
    sel = selectors.DefaultSelector()
    socks = []
    sent_at: dict[int, int] = {}
    got: dict[int, int] = {}
    for _ in range(conns):
        sock, rest = connect_upgraded(port, "/ws/echo")
        if rest:
            raise SystemExit("bytes after the 101")
        sock.setblocking(False)
        socks.append(sock)
        sel.register(sock, selectors.EVENT_READ)
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + seconds
    for sock in socks:
        sent_at[sock.fileno()] = time.perf_counter_ns()
        got[sock.fileno()] = 0
        sock.send(msg)
    samples: list[int] = []
    total = 0
    error = None
    while time.monotonic() < end and error is None:
        for key, _ in sel.select(0.1):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                error = "a tunnel closed"
                break
            got[key.fd] += len(data)
            if got[key.fd] < size:
                continue
            now_ns = time.perf_counter_ns()
            total += 1
            if time.monotonic() >= measure_from:
                samples.append(now_ns - sent_at[key.fd])
            got[key.fd] = 0
            sent_at[key.fd] = now_ns
            conn.send(msg)
    measured = min(time.monotonic(), end) - measure_from
    result: dict[str, Any] = {
        "round_trips": len(samples),
        "all_round_trips": total,
        "seconds": measured,
        "rate": len(samples) / measured if measured > 0 else 0.0,
        "error": error,
    }
    result.update(percentiles(samples))
    for sock in socks:
        sock.close()
    emit(result)


# --- handshake: W5 -------------------------------------------------------------------------------


def _upgrade_step(
    sel: selectors.BaseSelector, sock: socket.socket, state: list[Any], request: bytes
) -> bytes | None:
    """One readiness event of a client that connects, sends `request` and reads the answer
    up to the end of its head. `state` ends with [bytes read, request sent]. Returns what was
    read once the head is complete, else None; raises OSError for a failed connect or a
    connection closed early."""
    buf, sent = state[-2], state[-1]
    try:
        if not sent:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            sock.send(request)
            state[-1] = True
            sel.modify(sock, selectors.EVENT_READ, state)
            return None
        data = sock.recv(4096)
    except BlockingIOError:
        return None
    if not data:
        raise ConnectionError("closed before the 101")
    buf += data
    return bytes(buf) if b"\r\n\r\n" in buf else None


def handshake(port: int, inflight: int, seconds: float, warmup: float) -> None:
    request = upgrade_request("/ws/echo")
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + seconds
    samples: list[int] = []
    errors = 0
    total = 0
    first_error = ""

    def begin() -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex(("127.0.0.1", port))
        sel.register(sock, selectors.EVENT_WRITE, [time.perf_counter_ns(), bytearray(), False])

    for _ in range(inflight):
        begin()
    while time.monotonic() < end:
        for key, _ in sel.select(0.1):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            started = key.data[0]
            ok: bool | None = None
            try:
                head = _upgrade_step(sel, sock, key.data, request)
                if head is None:
                    continue
                ok = head.startswith(b"HTTP/1.1 101")
                if not ok:
                    first_error = first_error or head[:80].decode("latin-1")
            except OSError as e:
                ok = False
                first_error = first_error or str(e)
            if ok is None:
                continue
            now_ns = time.perf_counter_ns()
            total += ok
            if ok and time.monotonic() >= measure_from:
                samples.append(now_ns - started)
            elif not ok:
                errors += 1
            sel.unregister(sock)
            sock.close()
            if time.monotonic() < end:
                begin()
    result: dict[str, Any] = {
        "handshakes": len(samples),
        "all_handshakes": total,
        "errors": errors,
        "seconds": seconds,
        "rate": len(samples) / seconds,
        "first_error": first_error,
    }
    result.update(percentiles(samples))
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    emit(result)


# --- idle: W4 ------------------------------------------------------------------------------------


def idle(port: int, count: int, inflight: int, timeout: float, pause_after: int = 0) -> None:
    """Open `count` echo tunnels, `inflight` handshakes at a time; then obey stdin. With
    `pause_after`, stop after that many have finished their handshakes (opened or failed),
    report, and go on when stdin has a line."""
    request = upgrade_request("/ws/echo")
    sel = selectors.DefaultSelector()
    tunnels: list[socket.socket] = []
    errors = 0
    first_error = ""
    started = 0
    start = time.monotonic()
    deadline = start + timeout

    def begin() -> None:
        nonlocal started
        started += 1
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        sel.register(sock, selectors.EVENT_WRITE, [bytearray(), False])

    first = min(pause_after, count) if pause_after > 0 else count
    for _ in range(min(inflight, first)):
        begin()
    while time.monotonic() < deadline:
        if not sel.get_map():
            if started >= count:
                break
            # The first stage is done: report it and wait for the caller's go-ahead.
            emit({"paused": len(tunnels), "errors": errors, "first_error": first_error})
            waited = time.monotonic()
            if not sys.stdin.readline():
                break
            waited = time.monotonic() - waited
            start += waited  # "seconds" counts opening tunnels, not the caller's reading
            deadline += waited
            first = count
            for _ in range(min(inflight, count - started)):
                begin()
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            done: bool | None = None
            try:
                head = _upgrade_step(sel, sock, key.data, request)
                if head is None:
                    continue
                done = head.startswith(b"HTTP/1.1 101") and head.endswith(b"\r\n\r\n")
                if not done:
                    raise ConnectionError(f"not a clean 101: {head[:80]!r}")
            except OSError as e:
                done = False
                first_error = first_error or str(e)
            if done is None:
                continue
            sel.unregister(sock)
            if done:
                tunnels.append(sock)
            else:
                errors += 1
                sock.close()
            if started < first:
                begin()
    for key in list(sel.get_map().values()):  # the ones that did not finish in time
        errors += 1
        key.fileobj.close()  # type: ignore[union-attr]
    emit(
        {
            "opened": len(tunnels),
            "errors": errors,
            "seconds": time.monotonic() - start,
            "first_error": first_error,
        }
    )
    for line in sys.stdin:
        if line.strip() == "check":
            emit(_check(tunnels, timeout))
        else:
            break
    for sock in tunnels:
        sock.close()


def _check(tunnels: list[socket.socket], timeout: float) -> dict[str, Any]:
    """Send 16 bytes down every tunnel; count the tunnels that echo exactly them."""
    msg = b"are you there? \n"
    sel = selectors.DefaultSelector()
    got: dict[int, bytearray] = {}
    failed = 0
    for sock in tunnels:
        try:
            sock.send(msg)
        except OSError:
            failed += 1
            continue
        got[sock.fileno()] = bytearray()
        sel.register(sock, selectors.EVENT_READ)
    echoed = 0
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            buf = got[key.fd]
            buf += data
            if not data or len(buf) >= len(msg):
                sel.unregister(conn)
                if bytes(buf) == msg:
                    echoed += 1
                else:
                    failed += 1
    failed += len(sel.get_map())
    sel.close()
    return {"echoed": echoed, "failed": failed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pytool", description=__doc__)
    parser.add_argument("command")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--mode", default="up")
    parser.add_argument("--bytes", type=int, default=64 << 20)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--pause-after", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port)
    elif args.command == "http":
        http_load(args.port, args.conns, args.seconds, args.warmup)
    elif args.command == "tunnel":
        tunnel(args.port, args.mode, args.bytes)
    elif args.command == "pingpong":
        pingpong(args.port, args.conns, args.seconds, args.warmup, args.size)
    elif args.command == "handshake":
        handshake(args.port, args.inflight, args.seconds, args.warmup)
    elif args.command == "idle":
        idle(args.port, args.count, args.inflight, args.timeout, args.pause_after)
    else:
        parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
