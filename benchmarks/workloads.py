"""The workloads W1-W5: what each measures, and one measurement of one target.

A workload has variants (a leg, a direction, a tunnel count); each variant has metrics,
one of them (or two) primary, shown in the summary table. `measure` runs the load once
against a started target and returns every metric's value for that run; the proxy's CPU
time is read from /proc/PID/stat (utime + stime of the process tree) just before and just
after the load, its memory from /proc/PID/smaps_rollup (PSS).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.procs import (
    BenchError,
    Managed,
    cpu_jiffies,
    cpu_seconds,
    fd_count,
    nofile_limit,
    pss_kib,
    read_line,
    run_json,
)
from benchmarks.targets import Running, Setup
from benchmarks.tools import Tools

GIB = 1 << 30


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_better: bool
    primary: bool = False
    proxy_only: bool = False  # DIRECT has no proxy process to measure
    info: bool = False  # neither direction is better (how busy the proxy's core was)


@dataclass
class Variant:
    workload: str
    name: str  # unique, e.g. "W2 up tls-both"
    leg: str
    params: dict[str, Any]
    metrics: list[Metric]


@dataclass
class Settings:
    runs: int = 3
    w1_seconds: int = 3
    w1_conns: int = 50
    w2_bytes: int = GIB
    w3_seconds: float = 3.0
    w3_tunnels: tuple[int, ...] = (1, 100)
    w4_tunnels: int = 9000
    w5_seconds: float = 3.0
    w5_inflight: int = 50
    warmup: float = 1.0  # seconds of unrecorded W1 load per target before the runs
    quick: bool = False


@dataclass
class Context:
    tools: Tools
    settings: Settings
    setup: Setup  # of this group (leg, ports); the target's own port is in Running
    group_dir: Path  # logs of this group's load tools


def _proxy_cpu(running: Running) -> float | None:
    return cpu_seconds(running.pids()) if running.managed else None


def _per(cpu0: float | None, cpu1: float | None, count: float, scale: float) -> float | None:
    if cpu0 is None or cpu1 is None or count <= 0:
        return None
    return (cpu1 - cpu0) / count * scale


BUSY = Metric("busy", "proxy core busy %", False, proxy_only=True, info=True)
LOAD_BUSY = Metric("load_busy", "load core busy %", False, info=True)
# Recorded by the runner for every measurement: CPU taken by processes it did not start.
OTHER = Metric("other_cores", "other processes' CPU (cores)", False, info=True)


class Window:
    """The proxy's CPU time and the load CPU's utilisation over one measurement."""

    def __init__(self, running: Running, ctx: Context) -> None:
        self.running = running
        self.load_cpu = ctx.setup.placement.load_cpu if ctx.setup.placement.pinned else None
        self.cpu0 = _proxy_cpu(running)
        self.jiffies0 = cpu_jiffies(self.load_cpu) if self.load_cpu else (0, 0)
        self.t0 = time.monotonic()

    def close(self) -> None:
        self.wall = time.monotonic() - self.t0
        self.cpu1 = _proxy_cpu(self.running)
        self.jiffies1 = cpu_jiffies(self.load_cpu) if self.load_cpu else (0, 0)

    def cpu_per(self, count: float, scale: float) -> float | None:
        """The proxy's CPU seconds per unit of work, times `scale` (None for DIRECT)."""
        return _per(self.cpu0, self.cpu1, count, scale)

    def busy(self) -> dict[str, float]:
        """Proxy core busy % (100 = saturated) and load core busy %."""
        out = {}
        if self.cpu0 is not None and self.cpu1 is not None and self.wall > 0:
            out["busy"] = 100.0 * (self.cpu1 - self.cpu0) / self.wall
        busy = self.jiffies1[0] - self.jiffies0[0]
        total = self.jiffies1[1] - self.jiffies0[1]
        if self.load_cpu and total > 0:
            out["load_busy"] = 100.0 * busy / total
        return out


def _tls_args(leg: str) -> list[str]:
    return [] if leg == "plain" else ["--tls"]


class Workload:
    id = "W?"
    title = "?"
    legs: tuple[str, ...] = ("plain",)
    fresh_per_run = False  # a new proxy process for every run

    def variants(self, leg: str, s: Settings) -> list[Variant]:
        raise NotImplementedError

    def max_conns(self, s: Settings) -> int:
        return 200

    def warmup(self, variant: Variant, running: Running, ctx: Context) -> None:
        return None

    def measure(self, variant: Variant, running: Running, ctx: Context) -> dict[str, float]:
        raise NotImplementedError


# --- W1 -------------------------------------------------------------------------------------


class W1(Workload):
    id = "W1"
    title = "HTTP/1.1 keep-alive GET of a 13-byte body, 50 connections"
    legs = ("plain", "tls-client", "tls-both")

    def variants(self, leg: str, s: Settings) -> list[Variant]:
        metrics = [
            Metric("rps", "requests/s", True, primary=True),
            Metric("p50_us", "p50 latency µs", False),
            Metric("p99_us", "p99 latency µs", False, primary=True),
            Metric("cpu_us", "proxy CPU µs/request", False, primary=True, proxy_only=True),
            BUSY,
            LOAD_BUSY,
        ]
        return [Variant(self.id, f"W1 {leg}", leg, {"conns": s.w1_conns}, metrics)]

    def _load(self, variant: Variant, port: int, seconds: float, ctx: Context) -> dict[str, Any]:
        tools, placement = ctx.tools, ctx.setup.placement
        conns = str(variant.params["conns"])
        if tools.wrk is None:
            argv = tools.python("http", "--port", str(port), "--conns", conns)
            argv += ["--seconds", str(seconds), "--warmup", "0"]
            return run_json(placement.load(argv), seconds + 60, "pytool http")
        scheme = "http" if variant.leg == "plain" else "https"
        argv = [tools.wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency"]
        argv += ["--timeout", "5s", f"{scheme}://127.0.0.1:{port}/"]
        try:
            done = subprocess.run(
                placement.load(argv), capture_output=True, text=True, timeout=seconds + 60
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError("wrk did not finish in time") from e
        return parse_wrk(done.stdout, done.stderr)

    def warmup(self, variant: Variant, running: Running, ctx: Context) -> None:
        if ctx.settings.warmup > 0:
            self._load(variant, running.port, ctx.settings.warmup, ctx)

    def measure(self, variant: Variant, running: Running, ctx: Context) -> dict[str, float]:
        seconds = ctx.settings.w1_seconds
        window = Window(running, ctx)
        result = self._load(variant, running.port, seconds, ctx)
        window.close()
        requests = float(result["requests"])
        if requests <= 0:
            raise BenchError(f"no successful request ({result.get('errors', '?')} errors)")
        if result["errors"] > 0.01 * requests:
            raise BenchError(f"{result['errors']} errors in {requests:.0f} requests")
        out = {"rps": result["rate"], "p50_us": result["p50_us"], "p99_us": result["p99_us"]}
        out.update(window.busy())
        if (per := window.cpu_per(requests, 1e6)) is not None:
            out["cpu_us"] = per
        return out


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def parse_wrk(stdout: str, stderr: str = "") -> dict[str, Any]:
    """wrk --latency output: requests, rate, p50/p99 in µs, errors."""

    def latency(pct: str) -> float:
        match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", stdout, re.M)
        if not match:
            raise BenchError(f"no {pct}% latency in wrk's output: {stdout[-300:]} {stderr}")
        return float(match.group(1)) * _UNITS[match.group(2)]

    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", stdout)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", stdout)
    if not total or not rate:
        raise BenchError(f"unexpected wrk output: {stdout[-300:]} {stderr[-300:]}")
    errors = 0
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    if non2xx:
        errors += int(non2xx.group(1))
    return {
        "requests": int(total.group(1)),
        "rate": float(rate.group(1)),
        "p50_us": latency("50"),
        "p99_us": latency("99"),
        "errors": errors,
    }


# --- W2 -------------------------------------------------------------------------------------


class W2(Workload):
    id = "W2"
    title = "one upgraded tunnel: bulk bytes client->backend, backend->client, both at once"
    legs = ("plain", "tls-client", "tls-both")

    def variants(self, leg: str, s: Settings) -> list[Variant]:
        out = []
        for mode in ("up", "down", "both"):
            metrics = [
                Metric("mbps", "MB/s", True, primary=True),
                Metric("cpu_s_gib", "proxy CPU s/GiB", False, proxy_only=True),
                BUSY,
                LOAD_BUSY,
            ]
            out.append(Variant(self.id, f"W2 {mode} {leg}", leg, {"mode": mode}, metrics))
        return out

    def measure(self, variant: Variant, running: Running, ctx: Context) -> dict[str, float]:
        total = ctx.settings.w2_bytes
        argv = ctx.tools.tool(
            "tunnel", "--port", str(running.port), "--mode", variant.params["mode"]
        )
        argv += ["--bytes", str(total), *_tls_args(variant.leg)]
        window = Window(running, ctx)
        result = run_json(ctx.setup.placement.load(argv), 30 + total / 20e6, "tunnel client")
        window.close()
        if result.get("error"):
            raise BenchError(f"tunnel client: {result['error']}")
        moved = float(result["sent"] + result["received"])
        expected = total * (2 if variant.params["mode"] == "both" else 1)
        if moved < expected:
            raise BenchError(f"moved {moved:.0f} of {expected} bytes")
        out = {"mbps": moved / result["seconds"] / 1e6}
        out.update(window.busy())
        if (per := window.cpu_per(moved / GIB, 1.0)) is not None:
            out["cpu_s_gib"] = per
        return out


# --- W3 -------------------------------------------------------------------------------------


class W3(Workload):
    id = "W3"
    title = "64-byte ping-pong through upgraded tunnels"

    def variants(self, leg: str, s: Settings) -> list[Variant]:
        out = []
        for n in s.w3_tunnels:
            metrics = [
                Metric("rtps", "round trips/s", True, primary=True),
                Metric("p50_us", "p50 µs", False),
                Metric("p99_us", "p99 µs", False, primary=True),
                Metric("p999_us", "p99.9 µs", False),
                Metric("cpu_us", "proxy CPU µs/round trip", False, proxy_only=True),
                BUSY,
                LOAD_BUSY,
            ]
            name = f"W3 {n} tunnel{'s' if n > 1 else ''}"
            out.append(Variant(self.id, name, leg, {"tunnels": n}, metrics))
        return out

    def max_conns(self, s: Settings) -> int:
        return max(s.w3_tunnels) + 50

    def measure(self, variant: Variant, running: Running, ctx: Context) -> dict[str, float]:
        s = ctx.settings
        argv = ctx.tools.tool("pingpong", "--port", str(running.port))
        argv += ["--conns", str(variant.params["tunnels"]), "--seconds", str(s.w3_seconds)]
        argv += ["--warmup", str(min(0.5, s.w3_seconds / 4)), "--size", "64"]
        window = Window(running, ctx)
        result = run_json(ctx.setup.placement.load(argv), s.w3_seconds + 60, "pingpong")
        window.close()
        if result.get("error"):
            raise BenchError(f"pingpong: {result['error']}")
        if not result["round_trips"]:
            raise BenchError("no round trip completed")
        out = {k: float(result[k]) for k in ("p50_us", "p99_us", "p999_us")}
        out["rtps"] = float(result["rate"])
        out.update(window.busy())
        if (per := window.cpu_per(float(result["all_round_trips"]), 1e6)) is not None:
            out["cpu_us"] = per
        return out


# --- W4 -------------------------------------------------------------------------------------


class W4(Workload):
    id = "W4"
    title = "idle upgraded tunnels: proxy memory per tunnel, then every tunnel must echo"
    fresh_per_run = True

    def variants(self, leg: str, s: Settings) -> list[Variant]:
        metrics = [
            Metric("kib", "proxy PSS KiB/tunnel", False, primary=True, proxy_only=True),
            Metric("kib_start", "proxy PSS KiB/tunnel from start", False, proxy_only=True),
            Metric("echoed", "tunnels echoing", True),
            Metric("fds", "proxy fds/tunnel", False, proxy_only=True),
            Metric("open_rate", "tunnels opened/s", True),
        ]
        n = s.w4_tunnels
        return [Variant(self.id, f"W4 {n} idle tunnels", leg, {"tunnels": n}, metrics)]

    def max_conns(self, s: Settings) -> int:
        return s.w4_tunnels + 100

    def measure(self, variant: Variant, running: Running, ctx: Context) -> dict[str, float]:
        """PSS is read at start, after the first ninth of the tunnels and after all of
        them. The primary figure is the growth over the last eight ninths per tunnel: memory
        a proxy frees or touches for the first time after start-up (allocator arenas, lazy
        imports, pools) moves the start-to-end quotient either way, not this one."""
        n = variant.params["tunnels"]
        first = max(1, n // 9)
        time.sleep(0.5)  # let a just-started proxy finish starting
        pids = running.pids()
        before = pss_kib(pids) if running.managed else None
        fds_before = fd_count(pids)
        argv = ctx.tools.python("idle", "--port", str(running.port), "--count", str(n))
        argv += ["--inflight", "100", "--timeout", str(60 + n / 50)]
        if n > first:
            argv += ["--pause-after", str(first)]
        log = ctx.group_dir / f"idle-{running.name}.log"
        client = Managed(
            "idle client", ctx.setup.placement.load(argv), log, stdout_pipe=True, stdin_pipe=True
        )
        middle = None
        try:
            opened = client.read_json_line(90 + n / 50)
            if "paused" in opened:
                if opened["paused"] != first:
                    raise BenchError(
                        f"opened {opened['paused']} of the first {first} tunnels "
                        f"({opened['first_error']})"
                    )
                time.sleep(1.0)
                running.check_alive()
                middle = pss_kib(running.pids()) if running.managed else None
                self._command(client, "go", 0)
                opened = client.read_json_line(90 + n / 50)
            pids = running.pids()
            fds = (fd_count(pids) - fds_before) / max(1, opened["opened"])
            if opened["opened"] != n:
                more = ""
                if running.managed:
                    more = f"; {fds:.1f} fds/tunnel in the proxy, fd limit {nofile_limit()}"
                raise BenchError(
                    f"opened {opened['opened']} of {n} tunnels ({opened['first_error']}{more})"
                )
            time.sleep(1.0)
            running.check_alive()
            after = pss_kib(pids) if running.managed else None
            checked = self._command(client, "check", 60 + n / 100)
        finally:
            self._command(client, "close", 0)
            client.stop(10)
        out = {
            "echoed": float(checked["echoed"]),
            "open_rate": n / max(1e-9, float(opened["seconds"])),
        }
        if checked["echoed"] != n:
            raise BenchError(f"only {checked['echoed']} of {n} tunnels echoed afterwards")
        if before is not None and after is not None:
            out["kib_start"] = (after - before) / n
            out["kib"] = out["kib_start"] if middle is None else (after - middle) / (n - first)
            out["fds"] = fds
        return out

    @staticmethod
    def _command(client: Managed, command: str, timeout: float) -> dict[str, Any]:
        stdin = client.stdin
        if stdin is None:
            return {}
        try:
            stdin.write(f"{command}\n".encode())
            stdin.flush()
        except OSError:
            return {}
        if timeout <= 0:
            return {}
        assert client.proc.stdout is not None
        line = read_line(client.proc.stdout, timeout)
        result: dict[str, Any] = json.loads(line)
        return result


# --- W5 -------------------------------------------------------------------------------------


class W5(Workload):
    id = "W5"
    title = "connect + upgrade + 101 + close, 50 in flight"
    legs = ("plain", "tls-client", "tls-both")

    def variants(self, leg: str, s: Settings) -> list[Variant]:
        metrics = [
            Metric("hps", "handshakes/s", True, primary=True),
            Metric("p99_us", "p99 handshake µs", False),
            Metric("cpu_us", "proxy CPU µs/handshake", False, proxy_only=True),
            BUSY,
            LOAD_BUSY,
        ]
        return [Variant(self.id, f"W5 {leg}", leg, {"inflight": s.w5_inflight}, metrics)]

    def measure(self, variant: Variant, running: Running, ctx: Context) -> dict[str, float]:
        s = ctx.settings
        argv = ctx.tools.tool("handshake", "--port", str(running.port))
        argv += ["--inflight", str(variant.params["inflight"]), "--seconds", str(s.w5_seconds)]
        argv += ["--warmup", str(min(0.5, s.w5_seconds / 4)), *_tls_args(variant.leg)]
        window = Window(running, ctx)
        result = run_json(ctx.setup.placement.load(argv), s.w5_seconds + 60, "handshake")
        window.close()
        done = float(result["handshakes"])
        if done <= 0:
            raise BenchError(f"no handshake completed ({result.get('first_error')})")
        if result["errors"] > 0.01 * done:
            raise BenchError(f"{result['errors']} failed handshakes: {result['first_error']}")
        out = {"hps": float(result["rate"]), "p99_us": float(result["p99_us"])}
        out.update(window.busy())
        if (per := window.cpu_per(float(result["all_handshakes"]), 1e6)) is not None:
            out["cpu_us"] = per
        return out


WORKLOADS: list[Workload] = [W1(), W2(), W3(), W4(), W5()]
