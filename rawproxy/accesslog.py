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
import select
import stat
import sys
import time
from collections.abc import Callable
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
# A write to a pipe is whole only up to PIPE_BUF bytes: past it, two writers' lines may
# interleave mid-line, and a non-blocking write may stop half-way. Lines bound for a pipe
# that is shared (the workers' stderr) or written without blocking (a FIFO access log) are
# kept under it: the values from the wire are cut shorter until the line fits.
PIPE_BUF = select.PIPE_BUF
# Room for what logging puts before a line on stderr (time and level).
PREFIX_ROOM = 64
# The wire values are never cut shorter than this to make a line fit.
MIN_FIELD_LIMIT = 64
# Set in a worker whose stderr is a pipe: the longest line it writes there, in bytes.
_stderr_limit: int | None = None


@overload
def _bounded(value: str, limit: int = FIELD_LIMIT) -> str: ...
@overload
def _bounded(value: None, limit: int = FIELD_LIMIT) -> None: ...
def _bounded(value: str | None, limit: int = FIELD_LIMIT) -> str | None:
    """A value from the wire as a line shows it: cut to `limit` characters, marked."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + CUT_MARK


def _encoded(line: str) -> bytes:
    return line.encode("utf-8", "backslashreplace")


def _cut(data: bytes, size: int) -> str:
    """Encoded `data` cut, marked, to at most `size` bytes encoded (a character split by the
    cut is dropped)."""
    return data[: size - len(CUT_MARK)].decode("utf-8", "ignore") + CUT_MARK


class _BoundedFormatter(logging.Formatter):
    """A stderr line cut to fit one whole write to a pipe. A record with a traceback is left
    whole: it is rare, and a torn traceback says more than a cut one."""

    def __init__(self, inner: logging.Formatter | None, limit: int) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.limit = limit

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        if record.exc_info or record.stack_info:
            return text
        data = _encoded(text)
        if len(data) < self.limit:  # and its newline
            return text
        return _cut(data, self.limit - 1)


def bound_shared_stderr() -> bool:
    """In a worker: when stderr is a pipe (a container runtime's, a shell's `|`), the workers
    all write their lines to it, so each line is kept to one whole write (under PIPE_BUF).
    journald's stream socket takes far longer lines whole and is left alone. True if bound."""
    global _stderr_limit
    try:
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            return False
    except OSError:
        return False
    _stderr_limit = PIPE_BUF
    for owner in (logging.getLogger(), logger):
        for handler in owner.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (
                sys.stderr,
                sys.__stderr__,
            ):
                inner = handler.formatter
                if isinstance(inner, _BoundedFormatter):
                    inner = inner.inner
                handler.setFormatter(_BoundedFormatter(inner, PIPE_BUF))
    return True


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
        plain = logging.Formatter("%(message)s")
        handler.setFormatter(
            plain if _stderr_limit is None else _BoundedFormatter(plain, _stderr_limit)
        )
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
        self.fifo = False  # the file is a FIFO: lines kept under PIPE_BUF
        if path is not None:
            self.fd = self._open(path)
            self.fifo = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
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
        self.fifo = stat.S_ISFIFO(os.fstat(self.fd).st_mode)
        if old is not None:
            os.close(old)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def enabled(self) -> bool:
        return self.fd is not None or logger.isEnabledFor(logging.INFO)

    def _fitted(self, render: Callable[[int], str]) -> str:
        """The line `render` makes with the wire values cut to FIELD_LIMIT characters, or
        shorter where it must fit one whole write to a pipe."""
        line = render(FIELD_LIMIT)
        if self.fd is not None:
            budget = PIPE_BUF - 1 if self.fifo else None
        else:
            budget = None if _stderr_limit is None else _stderr_limit - 1 - PREFIX_ROOM
        limit = FIELD_LIMIT
        while budget is not None and limit > MIN_FIELD_LIMIT and len(_encoded(line)) > budget:
            limit //= 2
            line = render(limit)
        return line

    def _write(self, line: str, level: int = logging.INFO) -> None:
        if self.fd is None:
            logger.log(level, "%s", line)
            return
        data = _encoded(line + "\n")
        if self.fifo and len(data) > PIPE_BUF:  # still too long: whole or not at all
            data = _encoded(_cut(data, PIPE_BUF - 1) + "\n")
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

        def render(limit: int) -> str:
            cut_target = _bounded(target, limit)
            cut_referer, cut_agent = _bounded(referer, limit), _bounded(user_agent, limit)
            if self.fmt == "json":
                return json.dumps(
                    {
                        "type": "request",
                        "time": now,
                        "client": client,
                        "method": method,
                        "target": cut_target,
                        "version": version,
                        "status": status,
                        "bytes": size,
                        "referer": cut_referer,
                        "user_agent": cut_agent,
                        "duration": round(duration, 6),
                        "backend": backend,
                        **({"error": error} if error is not None else {}),
                    },
                    separators=(",", ":"),
                )
            request_line = "-" if method is None else f"{method} {cut_target} HTTP/{version}"
            line = (
                f'{client} - - [{_clf_time(now)}] "{_quoted(request_line)}" '
                f"{status} {size if size else '-'} "
                f'"{_quoted(cut_referer or "-")}" "{_quoted(cut_agent or "-")}"'
            )
            if error is not None:
                line += f' error="{_quoted(error)}"'
            return line

        self._write(self._fitted(render), level)

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

        def render(limit: int) -> str:
            cut_target = _bounded(target, limit)
            cut_referer, cut_agent = _bounded(referer, limit), _bounded(user_agent, limit)
            if self.fmt == "json":
                return json.dumps(
                    {
                        "type": "tunnel",
                        "time": now,
                        "client": client,
                        "method": method,
                        "target": cut_target,
                        "version": version,
                        "status": 101,
                        "referer": cut_referer,
                        "user_agent": cut_agent,
                        "duration": round(duration, 6),
                        "bytes_client_to_backend": to_backend,
                        "bytes_backend_to_client": to_client,
                        "ended": ended,
                        "backend": backend,
                    },
                    separators=(",", ":"),
                )
            return (
                f"{client} - - [{_clf_time(now)}] "
                f'"{_quoted(f"{method} {cut_target} HTTP/{version}")}" '
                f"101 {to_client if to_client else '-'} "
                f'"{_quoted(cut_referer or "-")}" "{_quoted(cut_agent or "-")}" '
                f"tunnel {duration:.3f}s client->backend={to_backend} backend->client={to_client} "
                f'ended="{_quoted(ended)}" backend="{_quoted(backend or "-")}"'
            )

        self._write(self._fitted(render))
