"""The access log: one line per request and one per tunnel, when it closes.

Formats: Apache's "combined" (what log tools read), with the tunnel's duration, bytes each way
and ending appended to its line; or one JSON object per line. Lines go to the `rawproxy.access`
logger (stderr, so journald) or to a file of their own, reopened on SIGHUP for logrotate.
"""

from __future__ import annotations

import json
import logging
import time
from typing import IO

logger = logging.getLogger("rawproxy.access")

FORMATS = ("combined", "json")


def _quoted(value: str) -> str:
    """A field between double quotes, escaped as Apache does (quote, backslash, controls,
    and bytes above ASCII). Values from the wire are decoded as Latin-1, one character per
    byte: left as they were, 0x85 (NEL) ended the line for readers that split on Unicode
    line breaks, 0x9B (CSI) drove terminals, and UTF-8 text came out as mojibake."""
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or 0x7F <= ord(char) <= 0xFF:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def _clf_time(now: float) -> str:
    return time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))


class AccessLog:
    def __init__(self, path: str | None = None, fmt: str = "combined") -> None:
        self.path = path
        self.fmt = fmt
        self.file: IO[str] | None = None
        if path is not None:
            self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def reopen(self) -> None:
        """After logrotate moved the file away: write to a new one under the same name."""
        if self.path is None:
            return
        old = self.file
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        if old is not None:
            old.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def enabled(self) -> bool:
        return self.file is not None or logger.isEnabledFor(logging.INFO)

    def _write(self, line: str, level: int = logging.INFO) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
        else:
            logger.log(level, "%s", line)

    @property
    def to_file(self) -> bool:
        return self.file is not None

    def request(
        self,
        *,
        client: str,
        method: str | None,
        target: str | None,
        version: str | None,
        status: int,
        size: int,
        referer: str | None,
        user_agent: str | None,
        duration: float,
        backend: str | None,
        error: str | None = None,
        level: int | None = None,
    ) -> None:
        """One request (`method` None: its head never parsed). `error`: what the proxy
        answered itself and why, or what cut the exchange short; on stderr this line is then
        the error's one line, at WARNING unless `level` says otherwise."""
        if level is None:
            level = logging.WARNING if error is not None else logging.INFO
        if not self.enabled() and (error is None or not logger.isEnabledFor(level)):
            return
        now = time.time()
        if self.fmt == "json":
            self._write(
                json.dumps(
                    {
                        "type": "request",
                        "time": now,
                        "client": client,
                        "method": method,
                        "target": target,
                        "version": version,
                        "status": status,
                        "bytes": size,
                        "referer": referer,
                        "user_agent": user_agent,
                        "duration": round(duration, 6),
                        "backend": backend,
                        **({"error": error} if error is not None else {}),
                    },
                    separators=(",", ":"),
                ),
                level,
            )
            return
        request_line = "-" if method is None else f"{method} {target} HTTP/{version}"
        line = (
            f'{client} - - [{_clf_time(now)}] "{_quoted(request_line)}" '
            f"{status} {size if size else '-'} "
            f'"{_quoted(referer or "-")}" "{_quoted(user_agent or "-")}"'
        )
        if error is not None:
            line += f' error="{_quoted(error)}"'
        self._write(line, level)

    def unparsed(
        self,
        *,
        client: str,
        status: int,
        duration: float,
        error: str,
        line: tuple[str, str, str] | None = None,
        size: int = 0,
    ) -> None:
        """An answer to a request whose head never parsed (400, 408, 431): for the access log
        file, which has a line for every answer (request "-", or `line`, the method, target
        and version of a complete request line); on stderr the error's own line says it
        already."""
        if self.file is not None:
            method, target, version = line if line is not None else (None, None, None)
            self.request(
                client=client,
                method=method,
                target=target,
                version=version,
                status=status,
                size=size,
                referer=None,
                user_agent=None,
                duration=duration,
                backend=None,
                error=error,
            )

    def tunnel(
        self,
        *,
        client: str,
        method: str,
        target: str,
        version: str,
        referer: str | None,
        user_agent: str | None,
        duration: float,
        to_backend: int,
        to_client: int,
        ended: str,
        backend: str | None,
    ) -> None:
        if not self.enabled():
            return
        now = time.time()
        if self.fmt == "json":
            self._write(
                json.dumps(
                    {
                        "type": "tunnel",
                        "time": now,
                        "client": client,
                        "method": method,
                        "target": target,
                        "version": version,
                        "status": 101,
                        "referer": referer,
                        "user_agent": user_agent,
                        "duration": round(duration, 6),
                        "bytes_client_to_backend": to_backend,
                        "bytes_backend_to_client": to_client,
                        "ended": ended,
                        "backend": backend,
                    },
                    separators=(",", ":"),
                )
            )
            return
        self._write(
            f'{client} - - [{_clf_time(now)}] "{_quoted(f"{method} {target} HTTP/{version}")}" '
            f"101 {to_client if to_client else '-'} "
            f'"{_quoted(referer or "-")}" "{_quoted(user_agent or "-")}" '
            f"tunnel {duration:.3f}s client->backend={to_backend} backend->client={to_client} "
            f'ended="{_quoted(ended)}" backend="{_quoted(backend or "-")}"'
        )
