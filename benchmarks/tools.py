"""The load tools: the compiled `benchtool` (built on demand with gcc), wrk, and the Python
stand-ins of `pytool` where either is missing. Every command line the workloads run comes
from here, so a run says exactly which generator measured what.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "benchtool.c"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rawproxy-bench"


def build_benchtool(notes: list[str]) -> tuple[Path | None, bool]:
    """(path of the compiled tool, whether it speaks TLS); (None, False) when gcc fails."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        notes.append("no C compiler: the backend and W2/W3/W5 clients are Python stand-ins")
        return None, False
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    attempts = [("tls", ["-DHAVE_TLS"], ["-lssl", "-lcrypto"]), ("plain", [], [])]
    errors = []
    for flavour, defines, libs in attempts:
        for directory in (cache_dir(), Path(tempfile.gettempdir()) / "rawproxy-bench"):
            out = directory / f"benchtool-{digest}-{flavour}"
            if out.exists():
                return out, flavour == "tls"
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            cmd = [gcc, "-O2", "-o", str(tmp), str(SOURCE), *defines, *libs]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                tmp.replace(out)
                if flavour != "tls":
                    notes.append(
                        "benchtool built without OpenSSL headers: TLS variants are skipped"
                    )
                return out, flavour == "tls"
            errors.append(done.stderr.strip().splitlines()[-1:] or [""])
            break  # the compiler failed, not the directory
    notes.append(
        f"building benchtool failed ({errors[-1][0] if errors else 'no writable cache'}); "
        "the backend and W2/W3/W5 clients are Python stand-ins"
    )
    return None, False


class Tools:
    def __init__(self, use_native: bool = True, use_wrk: bool = True) -> None:
        self.notes: list[str] = []
        self.native: Path | None = None
        self.tls = False
        if use_native:
            self.native, self.tls = build_benchtool(self.notes)
        else:
            self.notes.append("--python-tools: every load tool and the backend are Python")
        self.wrk = shutil.which("wrk") if use_wrk else None
        if self.wrk is None:
            self.notes.append(
                "wrk not found: W1 load is the Python stand-in (pytool http), which may be "
                "the bottleneck; its DIRECT row shows how far it goes"
            )

    def describe(self) -> dict[str, str]:
        return {
            "backend": f"benchtool serve ({self.native})" if self.native else "pytool serve",
            "W1": "wrk -t1 -c50 --latency" if self.wrk else "pytool http (Python)",
            "W2": "benchtool tunnel (C, 4 MiB send() and MSG_TRUNC receive)"
            if self.native
            else "pytool tunnel (Python)",
            "W3": "benchtool pingpong (C, epoll)" if self.native else "pytool pingpong (Python)",
            "W4": "pytool idle (Python; memory is read from the proxy)",
            "W5": "benchtool handshake (C, epoll)" if self.native else "pytool handshake (Python)",
        }

    def _py(self, *args: str) -> list[str]:
        return [sys.executable, str(HERE / "pytool.py"), *args]

    def tool(self, command: str, *args: str) -> list[str]:
        if self.native is not None:
            return [str(self.native), command, *args]
        return self._py(command, *args)

    def python(self, command: str, *args: str) -> list[str]:
        return self._py(command, *args)
