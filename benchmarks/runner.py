"""`python -m benchmarks`: every workload against DIRECT, rawproxy and the installed peers,
targets interleaved run by run, medians with min-max, ratios, JSON, charts, RESULTS.md.

A group is one workload in one leg (plain, tls-client, tls-both): its backends and every
target are started, each target warmed up, then run 1 measures A B C ..., run 2 measures
A B C ..., and so on; W4 starts a fresh proxy for each of its runs. Nothing is asserted
about speed: the exit status is 1 only when DIRECT or rawproxy could not be measured (a
broken harness, backend or proxy), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import report
from benchmarks.machine import describe
from benchmarks.pki import Pki, make_pki
from benchmarks.procs import (
    BenchError,
    Managed,
    OtherLoad,
    Placement,
    free_port,
    raise_nofile,
    wait_port,
)
from benchmarks.targets import (
    ALL_TARGETS,
    LEGS,
    PEER_PACKAGES,
    REPO,
    RawProxy,
    Relay,
    Setup,
    Target,
)
from benchmarks.tools import Tools
from benchmarks.workloads import OTHER, WORKLOADS, Context, Settings, Variant, Workload

HERE = Path(__file__).resolve().parent
MIB = 1 << 20


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- results --------------------------------------------------------------------------------


@dataclass
class Row:
    variant: Variant
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # target->metric
    errors: dict[str, list[str]] = field(default_factory=dict)

    def add(self, target: str, values: dict[str, float]) -> None:
        per = self.values.setdefault(target, {})
        for key, value in values.items():
            per.setdefault(key, []).append(value)

    def fail(self, target: str, error: str) -> None:
        self.errors.setdefault(target, []).append(error)


@dataclass
class GroupInfo:
    workload: str
    leg: str
    seconds: float = 0.0
    load_start: list[float] = field(default_factory=list)
    load_end: list[float] = field(default_factory=list)
    other_cores: float = 0.0
    quiet_waited: float = 0.0
    skipped: str = ""


# --- backends -------------------------------------------------------------------------------


class Backends:
    """The plain backend, and the TLS one for the TLS legs, pinned to the load CPU."""

    def __init__(self, leg: str, tools: Tools, placement: Placement, pki: Pki | None, d: Path):
        self.procs: list[Managed] = []
        self.plain_port = self._start(tools, placement, d, "backend", [])
        self.tls_port: int | None = None
        if leg != "plain":
            assert pki is not None
            extra = ["--cert", str(pki.cert), "--key", str(pki.key)]
            self.tls_port = self._start(tools, placement, d, "tls-backend", extra)

    def _start(
        self, tools: Tools, placement: Placement, d: Path, name: str, extra: list[str]
    ) -> int:
        port = free_port()
        argv = placement.load(tools.tool("serve", "--port", str(port), *extra))
        proc = Managed(name, argv, d / f"{name}.log", stdout_pipe=True)
        self.procs.append(proc)
        proc.read_json_line(20)
        wait_port(port, proc.proc, 20, name)
        return port

    def check(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(f"{proc.name} died: {proc.log_tail(3)}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


# --- one group ------------------------------------------------------------------------------


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.settings = settings_from(args)
        self.notes: list[str] = []
        self.nofile = raise_nofile()
        self.placement = Placement(enabled=not args.no_pin)
        self.tools = Tools(use_native=not args.python_tools, use_wrk=not args.no_wrk)
        self.notes += self.tools.notes
        self.workdir = Path(tempfile.mkdtemp(prefix="rawproxy-bench-"))
        self.pki: Pki | None = None
        self.rows: dict[str, Row] = {}
        self.groups: list[GroupInfo] = []
        self.targets: list[Target] = []
        self.missing: list[str] = []
        self.broken: list[str] = []
        self.retried = 0

    # -- planning --------------------------------------------------------------------------

    def choose_targets(self) -> None:
        wanted = set(self.args.targets.split(",")) if self.args.targets else None
        for target in ALL_TARGETS:
            if wanted is not None and target.name not in wanted and target.name != "DIRECT":
                continue
            if isinstance(target, Relay):
                target.tool = self.tools.native
                target.mode = self.args.relay_mode
                if not target.available():
                    self.notes.append("no relay row: it needs the compiled benchtool (gcc)")
                    continue
            if target.available():
                self.targets.append(target)
            else:
                self.missing.append(target.name)
        if self.missing:
            self.notes.append(
                "peers not installed (skipped): "
                + ", ".join(self.missing)
                + " (--install-peers installs them with apt-get)"
            )
        if self.args.rawproxy_rev:
            source, commit = self.export_rawproxy(self.args.rawproxy_rev)
            for target in self.targets:
                if isinstance(target, RawProxy):
                    target.source = source
                    target.label = f"git {self.args.rawproxy_rev} = {commit}"

    def export_rawproxy(self, rev: str) -> tuple[Path, str]:
        """The rawproxy package as committed at `rev`, and that commit (resolved once: the
        branch may move while the run goes on)."""
        resolved = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            check=False,
        )
        commit = resolved.stdout.strip()
        if resolved.returncode != 0 or not commit:
            raise SystemExit(f"--rawproxy-rev {rev}: {resolved.stderr.strip()}")
        dest = self.workdir / "rawproxy-src"
        dest.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, "rawproxy"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise SystemExit(f"--rawproxy-rev {rev}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        self.notes.append(f"rawproxy measured at git {rev} ({commit}), not the working tree")
        return dest, commit

    def plan(self) -> list[tuple[Workload, str]]:
        only = set(self.args.only.upper().split(",")) if self.args.only else None
        legs = set(self.args.legs.split(",")) if self.args.legs else set(LEGS)
        groups = []
        for workload in WORKLOADS:
            if only is not None and workload.id not in only:
                continue
            for leg in workload.legs:
                if leg in legs:
                    groups.append((workload, leg))
        return groups

    def tls_possible(self) -> str:
        """Why the TLS legs cannot run here ("" when they can)."""
        if self.tools.native is None or not self.tools.tls:
            return "the TLS variants need benchtool built with OpenSSL"
        if self.pki is None:
            self.pki = make_pki(self.workdir / "pki", self.notes)
        if self.pki is None:
            return "no certificates (trustme missing)"
        return ""

    # -- running ---------------------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        for workload, leg in self.plan():
            info = GroupInfo(workload.id, leg)
            self.groups.append(info)
            if leg != "plain" and (why := self.tls_possible()):
                info.skipped = why
                log(f"== {workload.id} {leg}: skipped ({why})")
                continue
            self.run_group(workload, leg, info)
        self.elapsed = time.monotonic() - started

    def wait_quiet(self, limit: float) -> float:
        """Wait up to `limit` seconds for other processes to use under BUSY_CORES; returns
        the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < limit:
            sample = OtherLoad()
            time.sleep(1.0)
            if sample.cores() < report.BUSY_CORES:
                break
        return round(time.monotonic() - start, 1)

    def run_group(self, workload: Workload, leg: str, info: GroupInfo) -> None:
        s = self.settings
        info.quiet_waited = self.wait_quiet(self.args.quiet_wait)
        other = OtherLoad()
        info.load_start = [round(x, 2) for x in _loadavg()]
        t0 = time.monotonic()
        variants = workload.variants(leg, s)
        for variant in variants:
            self.rows.setdefault(variant.name, Row(variant))
        log(f"== {workload.id} {leg}: {workload.title}")
        gdir = self.workdir / f"{workload.id}-{leg}"
        gdir.mkdir()
        backends = Backends(leg, self.tools, self.placement, self.pki, gdir)
        max_conns = workload.max_conns(s)
        running: dict[str, Any] = {}
        failed: dict[str, str] = {}

        def setup_for(target: Target) -> Setup:
            return Setup(
                leg=leg,
                port=free_port(),
                backend_port=backends.plain_port,
                tls_backend_port=backends.tls_port,
                pki=self.pki,
                workdir=gdir / target.name,
                placement=self.placement,
                max_conns=max_conns,
            )

        targets = [t for t in self.targets if t.supports(leg)]
        ctx = Context(self.tools, s, setup_for(targets[0]), gdir)
        try:
            if not workload.fresh_per_run:
                for target in targets:
                    try:
                        running[target.name] = target.start(setup_for(target))
                    except Exception as e:  # reported in the results, the run goes on
                        failed[target.name] = f"did not start: {e}"
                        log(f"   {target.name}: {failed[target.name]}")
                for target in targets:
                    if target.name in running:
                        try:
                            workload.warmup(variants[0], running[target.name], ctx)
                        except Exception as e:
                            log(f"   {target.name}: warm-up failed: {e}")
            for run in range(s.runs):
                for variant in variants:
                    for target in targets:
                        self.measure_one(
                            workload, variant, target, run, running, failed, setup_for, ctx
                        )
                        backends.check()
        finally:
            for r in running.values():
                r.stop()
            backends.stop()
        info.seconds = round(time.monotonic() - t0, 1)
        info.load_end = [round(x, 2) for x in _loadavg()]
        info.other_cores = round(other.cores(), 2)

    def measure_one(
        self,
        workload: Workload,
        variant: Variant,
        target: Target,
        run: int,
        running: dict[str, Any],
        failed: dict[str, str],
        setup_for: Any,
        ctx: Context,
    ) -> None:
        row = self.rows[variant.name]
        prefix = f"   {variant.name:<24} run {run + 1}/{self.settings.runs}  {target.name:<9}"
        if target.name in failed and not workload.fresh_per_run:
            row.fail(target.name, failed[target.name])
            return
        for attempt in range(self.args.retry_busy + 1):
            other = OtherLoad()
            fresh = None
            try:
                if workload.fresh_per_run:
                    fresh = target.start(setup_for(target))
                    r = fresh
                else:
                    r = running[target.name]
                    r.check_alive()
                values = workload.measure(variant, r, ctx)
            except Exception as e:
                message = str(e).strip().replace("\n", " ")[:300]
                row.fail(target.name, message)
                log(f"{prefix}  FAILED: {message}")
                if target.name in ("DIRECT", "rawproxy"):
                    self.broken.append(f"{variant.name} {target.name}: {message}")
                return
            finally:
                if fresh is not None:
                    fresh.stop()
            cores = other.cores()
            if cores <= report.BUSY_CORES or attempt == self.args.retry_busy:
                break
            # Another job took the CPU during this measurement: measure it again.
            self.retried += 1
            log(f"{prefix}  (other processes used {cores:.2f} cores; measuring again)")
            self.wait_quiet(self.args.quiet_wait)
        values["other_cores"] = cores
        row.add(target.name, values)
        primary = [m for m in variant.metrics if m.primary and m.key in values]
        if not primary:
            primary = [m for m in variant.metrics if m.key in values]
        shown = "  ".join(f"{report.fmt(values[m.key])} {m.label}" for m in primary)
        log(f"{prefix}  {shown}")

    # -- output ----------------------------------------------------------------------------

    def results(self) -> dict[str, Any]:
        machine = describe()
        versions = {t.name: t.version() for t in self.targets}
        wrk = self.tools.wrk
        versions["wrk"] = _version_line([wrk, "-v"]) if wrk else "not used"
        versions["gcc"] = _version_line(["gcc", "--version"]) if self.tools.native else "not used"
        rows = []
        for row in self.rows.values():
            v = row.variant
            for metric in [*v.metrics, OTHER]:
                values = {t: per[metric.key] for t, per in row.values.items() if metric.key in per}
                rows.append(
                    {
                        "variant": v.name,
                        "workload": v.workload,
                        "leg": v.leg,
                        "params": v.params,
                        **asdict(metric),
                        "values": values,
                        "errors": row.errors,
                    }
                )
        return {
            "command": "python -m benchmarks " + " ".join(self.args.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "elapsed_s": round(getattr(self, "elapsed", 0.0), 1),
            "quick": self.settings.quick,
            "settings": asdict(self.settings),
            "machine": machine,
            "placement": self.placement.description,
            "nofile_limit": self.nofile,
            "versions": versions,
            "load_tools": self.tools.describe(),
            "targets": [t.name for t in self.targets],
            "missing_peers": self.missing,
            "groups": [asdict(g) for g in self.groups],
            "notes": self.notes,
            "broken": self.broken,
            "retried": self.retried,
            "rows": rows,
        }

    def cleanup(self) -> None:
        if self.args.keep_workdir:
            log(f"work directory kept: {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _loadavg() -> tuple[float, float, float]:
    import os

    return os.getloadavg()


def _version_line(argv: list[str | None]) -> str:
    from benchmarks.machine import tool_version

    return tool_version([a for a in argv if a])


# --- command line ---------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(
            runs=1,
            w1_seconds=2,
            w2_bytes=64 * MIB,
            w3_seconds=0.5,
            w4_tunnels=500,
            w5_seconds=0.5,
            warmup=0.0,
            quick=True,
        )
    else:
        s = Settings()
    if args.runs:
        s.runs = args.runs
    if args.w1_seconds:
        s.w1_seconds = args.w1_seconds
    if args.w2_mib:
        s.w2_bytes = args.w2_mib * MIB
    if args.w3_seconds:
        s.w3_seconds = args.w3_seconds
    if args.w4_tunnels:
        s.w4_tunnels = args.w4_tunnels
    if args.w5_seconds:
        s.w5_seconds = args.w5_seconds
    return s


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="rawproxy against DIRECT and the installed peers (see benchmarks/README.md)",
    )
    p.add_argument("--quick", action="store_true", help="seconds per workload, small sizes")
    p.add_argument("--runs", type=int, help="interleaved runs per figure (default 3, quick 1)")
    p.add_argument("--only", help="workloads, e.g. W1,W2")
    p.add_argument("--legs", help="plain,tls-client,tls-both (default: all)")
    p.add_argument("--targets", help="e.g. rawproxy,nginx (DIRECT is always measured)")
    p.add_argument("--install-peers", action="store_true", help="apt-get install the peers")
    p.add_argument(
        "--relay-mode",
        choices=("copy", "splice"),
        default="copy",
        help="how the reference relay moves bytes (default copy, the faster here)",
    )
    p.add_argument("--write-results", action="store_true", help="write benchmarks/RESULTS.md")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--rawproxy-rev", help="measure rawproxy at this git revision")
    p.add_argument("--python-tools", action="store_true", help="no compiled helper (testing)")
    p.add_argument("--no-wrk", action="store_true", help="W1 with the Python load (testing)")
    p.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    p.add_argument("--quiet-wait", type=float, default=None, help="wait up to N s for quiet")
    p.add_argument(
        "--retry-busy",
        type=int,
        default=None,
        help="measure again (up to N times) when other processes took CPU meanwhile",
    )
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite tables and charts from a run"
    )
    p.add_argument("--w1-seconds", type=int)
    p.add_argument("--w2-mib", type=int)
    p.add_argument("--w3-seconds", type=float)
    p.add_argument("--w4-tunnels", type=int)
    p.add_argument("--w5-seconds", type=float)
    args = p.parse_args(argv)
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 10.0
    if args.retry_busy is None:
        args.retry_busy = 0 if args.quick else 2
    args.argv = argv
    return args


def install_peers() -> None:
    missing = [pkg for name, pkg in PEER_PACKAGES.items() if shutil.which(name) is None]
    if shutil.which("wrk") is None:
        missing.append("wrk")
    if shutil.which("taskset") is None:
        missing.append("util-linux")
    if not missing:
        log("every peer is installed")
        return
    log(f"installing {' '.join(missing)} with apt-get")
    subprocess.run(["apt-get", "update"], check=False)
    subprocess.run(
        ["apt-get", "install", "-y", *missing],
        check=False,
        env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        results = json.loads(args.render.read_text())
        report.write_all(results, args.out, write_results=args.write_results)
        print(report.summary_markdown(results))
        return 0
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.install_peers:
        install_peers()
    harness = Harness(args)
    try:
        harness.choose_targets()
        names = ", ".join(t.name for t in harness.targets)
        log(f"targets: {names}; {harness.placement.description}")
        for note in harness.notes:
            log(f"note: {note}")
        harness.run()
    except KeyboardInterrupt:
        log("interrupted; every process started here is stopped")
        harness.cleanup()
        return 130
    results = harness.results()
    harness.cleanup()
    report.write_all(results, args.out, write_results=args.write_results)
    print(report.summary_markdown(results))
    if results["broken"]:
        log("BROKEN: DIRECT or rawproxy could not be measured:")
        for line in results["broken"]:
            log(f"  {line}")
        return 1
    return 0
