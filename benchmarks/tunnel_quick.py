"""A first, small measurement of the tunnel: bytes through an upgraded connection, direct to the
backend versus through rawproxy, interleaved, medians of several runs.

    python benchmarks/tunnel_quick.py [--mib 512] [--runs 5]

The full harness (peers, workloads W1-W5, CPU placement) is `python -m benchmarks`, still to
come; this script only keeps the hot path honest in the meantime. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

CHUNK = 1 << 20


def backend_server(stop: threading.Event) -> socket.socket:
    """Answers any head with 101, then sinks everything and closes when the client does."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=sink, args=(conn,), daemon=True).start()

    def sink(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n"
            )
            buf = bytearray(CHUNK)
            while conn.recv_into(buf):
                pass
            conn.sendall(b"done")

    threading.Thread(target=serve, daemon=True).start()
    return listener


def one_run(port: int, total: int) -> float:
    payload = memoryview(os.urandom(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: bench\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        start = time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(payload)
            sent += len(payload)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
        return total / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    stop = threading.Event()
    listener = backend_server(stop)
    backend_port = listener.getsockname()[1]
    proxy = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rawproxy",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            f"127.0.0.1:{backend_port}",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # At warning level the proxy prints nothing at start-up: find its port from /proc.
        proxy_port = _wait_for_port(proxy.pid)
        total = args.mib * CHUNK
        results: dict[str, list[float]] = {"direct": [], "rawproxy": []}
        for _ in range(args.runs):
            results["direct"].append(one_run(backend_port, total))
            results["rawproxy"].append(one_run(proxy_port, total))
        direct = statistics.median(results["direct"])
        print(
            f"{args.mib} MiB client->backend through an upgraded connection, "
            f"{args.runs} interleaved runs"
        )
        for name, values in results.items():
            median = statistics.median(values)
            print(
                f"  {name:9s} median {median:7.0f} MB/s (min {min(values):.0f}, "
                f"max {max(values):.0f}), ratio to direct {median / direct:.2f}"
            )
    finally:
        proxy.terminate()
        proxy.wait(10)
        stop.set()
        listener.close()


def _wait_for_port(pid: int) -> int:
    deadline = time.monotonic() + 10
    inodes = set()
    while time.monotonic() < deadline:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            match = re.match(r"socket:\[(\d+)\]", target)
            if match:
                inodes.add(match.group(1))
        with open("/proc/net/tcp") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    return int(fields[1].split(":")[1], 16)
        time.sleep(0.05)
    raise RuntimeError("rawproxy did not start listening")


if __name__ == "__main__":
    main()
