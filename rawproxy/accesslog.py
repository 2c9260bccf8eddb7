"""The access log: one line per request and one per tunnel, when it closes.

Formats: Apache's "combined" (what log tools read), with the tunnel's duration, bytes each way
and ending appended to its line; or one JSON object per line. Lines go to the `rawproxy.access`
logger (stderr, so journald; a JSON line there is the object alone, so that the journal's
message parses) or to a file of their own, reopened on SIGHUP for logrotate.

A line that cannot be written (a full disk) is dropped, and said on stderr at most once a
minute: the request it tells of is served all the same, as nginx does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from typing import overload

logger = logging.getLogger("rawproxy.access")
log = logging.getLogger("rawproxy")

FORMATS = ("combined", "json")
# A value from the wire (target, Referer, User-Agent) is cut to this many characters in a
# line: escaped (up to 4 characters a byte in combined, 6 in JSON) the three stay well under
# journald's 48 KiB line limit, past which a line would be split into entries whose
# continuations begin with text the client chose. HAProxy logs 1024 characters of a URI.
FIELD_LIMIT = 2048
CUT_MARK = "...[cut]"
# How often a failing access log file is said again on stderr, at most (seconds).
WRITE_FAILURE_LOG_EVERY = 60.0


@overload
def _bounded(value: str) -> str: ...
@overload
def _bounded(value: None) -> None: ...
def _bounded(value: str | None) -> str | None:
    """A value from the wire as a line shows it: cut to FIELD_LIMIT characters, marked."""
    if value is None or len(value) <= FIELD_LIMIT:
        return value
    return value[:FIELD_LIMIT] + CUT_MARK


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


def _bare_json_on_stderr(on: bool) -> None:
    """JSON lines on stderr go without the logging prefix (time and level), each the object
    alone; combined lines keep it, as every other line of ours has it."""
    for handler in logger.handlers[:]:
        if getattr(handler, "rawproxy_bare", False):
            logger.removeHandler(handler)
    logger.propagate = not on
    if on:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.rawproxy_bare = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


class AccessLog:
    def __init__(self, path: str | None = None, fmt: str = "combined") -> None:
        self.path = path
        self.fmt = fmt
        # The file's descriptor, written with one unbuffered write a line: a line that fails
        # is gone, never written again later (a buffer would keep it and fail at close).
        self.fd: int | None = None
        self.failures = 0  # lines dropped because the file could not take them
        self.failure_logged = -WRITE_FAILURE_LOG_EVERY
        if path is not None:
            self.fd = self._open(path)
        else:
            _bare_json_on_stderr(fmt == "json")

    @staticmethod
    def _open(path: str) -> int:
        """Non-blocking, for a FIFO read by a log shipper: a reader that does not keep up
        costs lines (EAGAIN, counted and reported below), never the loop's time (a regular
        file ignores the flag). A line under PIPE_BUF (4 KiB) is written whole or not at
        all. A FIFO that no program reads yet refuses the open (ENXIO) rather than blocking
        start-up until one does."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            return os.open(path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise OSError(
                    e.errno, "a FIFO that no program reads: start its reader first"
                ) from e
            raise

    def reopen(self) -> None:
        """After logrotate moved the file away: write to a new one under the same name."""
        if self.path is None:
            return
        old = self.fd
        self.fd = self._open(self.path)
        if old is not None:
            os.close(old)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def enabled(self) -> bool:
        return self.fd is not None or logger.isEnabledFor(logging.INFO)

    def _write(self, line: str, level: int = logging.INFO) -> None:
        if self.fd is None:
            logger.log(level, "%s", line)
            return
        data = (line + "\n").encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as e:
            self.failures += 1
            now = time.monotonic()
            if now >= self.failure_logged + WRITE_FAILURE_LOG_EVERY:
                self.failure_logged = now
                log.error(
                    "cannot write to the access log %s: %s; its lines are dropped meanwhile "
                    "(%d so far), requests are served as usual",
                    self.path,
                    "its reader does not keep up (the pipe is full)"
                    if isinstance(e, BlockingIOError)
                    else e.strerror or e,
                    self.failures,
                )

    @property
    def to_file(self) -> bool:
        return self.fd is not None

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
        target, referer, user_agent = _bounded(target), _bounded(referer), _bounded(user_agent)
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
        level: int = logging.WARNING,
        stderr: bool = True,
    ) -> None:
        """An answer to a request whose head never parsed (400, 408, 431), with request "-",
        or `line` (the method, target and version of a complete request line). The access
        log has a line for every answer: in its file, or on stderr, where it is the error's
        one line (at `level`) unless `stderr` is False (another line said it there)."""
        if self.fd is not None or stderr:
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
                level=level,
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
        target, referer, user_agent = _bounded(target), _bounded(referer), _bounded(user_agent)
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
