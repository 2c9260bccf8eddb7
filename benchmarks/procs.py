"""Processes the harness starts, and what it reads about them from /proc.

Every process is started by the harness, pinned with `taskset -c` when the machine has two
CPUs, logged to a file in the run's work directory, and stopped by its PID (SIGTERM, then
SIGKILL after a grace period). Nothing here looks processes up by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
NOFILE = 65536  # 9,000 tunnels are 18,000 sockets in a proxy


class BenchError(Exception):
    """A measurement or a process failed; the message says which and why."""


# --- CPU placement ----------------------------------------------------------------------------


class Placement:
    """Load generator and backend on CPU 0, the proxy under test on CPU 1 (when possible)."""

    def __init__(self, enabled: bool = True) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        self.taskset = shutil.which("taskset")
        self.pinned = enabled and len(cpus) >= 2 and self.taskset is not None
        self.load_cpu = str(cpus[0])
        self.proxy_cpu = str(cpus[1]) if len(cpus) >= 2 else str(cpus[0])
        if self.pinned:
            self.description = (
                f"load generator and backend pinned to CPU {self.load_cpu}, "
                f"proxy under test to CPU {self.proxy_cpu} (taskset -c)"
            )
        elif not enabled:
            self.description = "no CPU pinning (--no-pin)"
        elif self.taskset is None:
            self.description = "no CPU pinning (taskset not found)"
        else:
            self.description = f"no CPU pinning (only {len(cpus)} CPU available)"

    def load(self, argv: Sequence[str]) -> list[str]:
        return self._pin(self.load_cpu, argv)

    def proxy(self, argv: Sequence[str]) -> list[str]:
        return self._pin(self.proxy_cpu, argv)

    def _pin(self, cpu: str, argv: Sequence[str]) -> list[str]:
        if not self.pinned or self.taskset is None:
            return list(argv)
        return [self.taskset, "-c", cpu, *argv]


def raise_nofile(want: int = NOFILE) -> int:
    """Raise this process's open-file limit (inherited by everything it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    if soft == resource.RLIM_INFINITY or soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- ports ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any] | None, timeout: float, what: str) -> None:
    """Wait until 127.0.0.1:port accepts a connection (and the process is still alive)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{what} is not listening on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.05)


# --- managed processes ------------------------------------------------------------------------


class Managed:
    """One long-running process (a backend or a proxy), its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self._log.write(f"$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            env=env,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C at the harness does not hit it first
        )
        self.pid = self.proc.pid

    def read_json_line(self, timeout: float) -> dict[str, Any]:
        """The first line of stdout, parsed (only with stdout_pipe)."""
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, timeout)
        if not line:
            raise BenchError(f"{self.name} printed nothing; see {self.log_path}")
        result: dict[str, Any] = json.loads(line)
        return result

    @property
    def stdin(self) -> Any:
        return self.proc.stdin

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        """This process and its descendants (nginx's worker, for one)."""
        return tree_pids(self.pid) if self.alive() else []

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                # Its own children first (by PID), then itself.
                for pid in tree_pids(self.pid)[1:]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(grace)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._log.close()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def read_line(stream: Any, timeout: float) -> str:
    """One line from a pipe, waiting at most `timeout` seconds."""
    import select

    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    data = bytearray()
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"no answer within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def run_json(argv: Sequence[str], timeout: float, what: str) -> dict[str, Any]:
    """Run a load tool to completion; its last stdout line is a JSON object."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what}: still running after {timeout:g} s (stopped)") from e
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        err = done.stderr.strip().splitlines()
        raise BenchError(
            f"{what}: exit {done.returncode}, no result ({err[-1] if err else 'no output'})"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    result["_exit"] = done.returncode
    result["_stderr"] = done.stderr[-2000:]
    return result


# --- what /proc says about a process tree -----------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def all_ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                out[int(entry)] = int(fields[1])
    return out


def tree_pids(root: int, ppids: dict[int, int] | None = None) -> list[int]:
    ppids = all_ppids() if ppids is None else ppids
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(pid: int) -> int:
    fields = _stat_fields(pid)
    if fields is None:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of these processes (all threads), from /proc/PID/stat."""
    return sum(cpu_ticks(pid) for pid in pids) / CLK_TCK


def pss_kib(pids: Iterable[int]) -> int:
    """Proportional set size of these processes, from /proc/PID/smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def cpu_jiffies(cpu: str) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat (busy = all but idle and iowait)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                fields = [int(x) for x in line.split()[1:]]
                total = sum(fields[:8])  # guest time is already in user
                return total - fields[3] - fields[4], total
    return 0, 0


def fd_count(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return total


def nofile_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return NOFILE if soft == resource.RLIM_INFINITY else int(soft)


class OtherLoad:
    """CPU used by processes this harness did not start (another job on the machine).

    The machine's user + system time (/proc/stat) minus this harness's process tree (its
    own time, its live descendants' and every reaped child's, so short-lived tools count)
    minus kernel threads (softirq work for our own loopback traffic). Another job's
    short-lived processes are counted too, which a per-process scan would miss."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.busy, self.ours = self._sample()

    @staticmethod
    def _sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = fields[0] + fields[1] + fields[2]  # user, nice, system (guest is in user)
        ppids = all_ppids()
        ours = 0
        for pid in tree_pids(os.getpid(), ppids):
            stat = _stat_fields(pid)
            if stat is not None:  # utime, stime, cutime, cstime
                ours += int(stat[11]) + int(stat[12]) + int(stat[13]) + int(stat[14])
        ours += sum(cpu_ticks(pid) for pid in tree_pids(2, ppids))
        return busy, ours

    def cores(self) -> float:
        """Average CPUs busy with other processes since this object was made."""
        busy, ours = self._sample()
        elapsed = time.monotonic() - self.start
        delta = (busy - self.busy) - (ours - self.ours)
        return max(0.0, delta / CLK_TCK / elapsed) if elapsed > 0 else 0.0
