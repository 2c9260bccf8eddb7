"""The machine a run measured: CPU, kernel, memory, versions, limits, load."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from typing import Any


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def mem_total_gib() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


def describe() -> dict[str, Any]:
    uname = os.uname()
    return {
        "cpu_model": cpu_model(),
        "cpus_online": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": f"{uname.sysname} {uname.release} {uname.machine}",
        "os": _os_release(),
        "memory_gib": round(mem_total_gib(), 1),
        "python": platform.python_version(),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "sysctl": {
            name: _read(f"/proc/sys/{name.replace('.', '/')}").strip()
            for name in (
                "net.ipv4.tcp_tw_reuse",
                "net.ipv4.ip_local_port_range",
                "net.core.somaxconn",
            )
        },
    }


def _os_release() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "?"
