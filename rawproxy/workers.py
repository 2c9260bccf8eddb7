"""--workers N: one supervising process and N event-loop processes sharing the listeners.

The supervisor opens every listening socket (or takes systemd's), then forks the workers,
which inherit them: the kernel hands each new connection to one worker. It restarts a worker
that dies, forwards SIGTERM/SIGINT/SIGHUP, speaks to systemd, and exits 0 when the last worker
has drained. A worker is the single-process proxy, minus listening and minus systemd.

Under systemd each worker reports on a pipe from its loop every STATUS_EVERY / 2, or every
half watchdog period if that is sooner; the supervisor sums the reports into its STATUS= line.
With the watchdog on (WatchdogSec=) the supervisor pings systemd from its own loop and takes
the reports as the workers' heartbeats: a worker silent for a whole period is hung (an
endless loop, a blocking call), and the supervisor aborts it and starts another in its
place. Only that worker's clients suffer, where stopping the pings would have had systemd
restart every worker; a hung supervisor still stops the pings.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable

from rawproxy import accesslog
from rawproxy.config import Config, ConfigError
from rawproxy.loop import READ, Loop
from rawproxy.server import (
    REOPEN_LOGS_SIGNAL,
    STATUS_EVERY,
    STOP_NOW_SIGNAL,
    WORKER_REPORT,
    WORKER_SIGNALS,
    Listener,
    Server,
    StartupError,
    _shown,
    check_config,
    inherited_listener,
    listener_kind,
    open_listener,
    served_by_systemd,
    status_line,
    warn_if_descriptors_short,
)
from rawproxy.systemd import Notifier

log = logging.getLogger("rawproxy")

# A worker that dies sooner than this after its start is restarted only after this long, so
# that a worker crashing at start-up does not make the supervisor spin.
QUICK_DEATH = 1.0
# A worker found hung gets SIGABRT (a core to debug with, as systemd's own watchdog does),
# then SIGKILL if it is still there this long after (stopped, or dumping for ever).
ABORT_GRACE = 2.0
PR_SET_PDEATHSIG = 1  # prctl(2)


def _drain_when_orphaned(supervisor: int) -> None:
    """In a worker: get SIGTERM (drain and exit) when the supervisor dies, however it dies
    (PR_SET_PDEATHSIG), so that a killed supervisor leaves no workers holding the port. The
    signal stays blocked until the worker has its handlers, so it is never lost."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux's libc: outside systemd, orphans are then left to the admin
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_workers(
    config: Config,
    reread: Callable[[], Config],
    inherited: list[tuple[str, socket.socket]],
    count: int,
) -> int:
    # What a single process refuses before it listens (certificates, keys, backend names) is
    # refused here once, in one line, before any worker forks and says it N times.
    try:
        check_config(config)
    except ConfigError as e:
        raise StartupError(str(e)) from e
    listeners: list[Listener] = [inherited_listener(name, sock, config) for name, sock in inherited]
    for where in config.listen:
        if not served_by_systemd(where):
            listeners.append((where, open_listener(where), where.tls))
    for _, socks, tls in listeners:
        for sock in socks:
            log.info("listening on %s (%s)", _shown(sock), listener_kind(tls, config))
    warn_if_descriptors_short(config, len(inherited))  # once here, not in every worker
    loop = Loop()
    notifier = Notifier()
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
    stopping = False
    # Each worker writes a WORKER_REPORT here once it serves, and then every `beat` seconds;
    # the supervisor says ready when every worker has. Non-blocking at both ends: a worker
    # never waits on it, and the supervisor reads it from its loop.
    serving_r, serving_w = os.pipe()
    os.set_blocking(serving_r, False)
    os.set_blocking(serving_w, False)
    serving: set[int] = set()
    # When each serving worker (by PID) was last heard from (loop time), and what it said
    # it carries (HTTP connections, tunnels).
    heard: dict[int, float] = {}
    carries: dict[int, tuple[int, int]] = {}
    beats = [notifier.watchdog_interval] if notifier.watchdog_interval else []
    if notifier.sock is not None:
        beats.append(STATUS_EVERY / 2)  # a STATUS= line then tells of at most 5 s ago
    beat = min(beats, default=None)  # the workers' (forget_in_child clears the notifier)
    period = 2 * notifier.watchdog_interval if notifier.watchdog_interval else None
    announced = False
    failed = False  # a worker's first start failed: everything stops, exit code 1

    def spawn(index: int) -> None:
        if stopping:
            return  # a restart still waiting when the stop came: the listeners are closed
        # Signals stay blocked across the fork until the worker has its own handlers: a
        # SIGHUP passed on right after READY=1 must not kill a worker still starting.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        supervisor = os.getpid()
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if pid == 0:
            code = 1
            _drain_when_orphaned(supervisor)
            try:
                loop.forget_in_child()
                notifier.forget_in_child()
                os.close(serving_r)
                for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                    os.environ.pop(name, None)
                accesslog.bound_shared_stderr()  # every worker writes to the one stderr
                server = Server(
                    config,
                    reread=reread,
                    preopened=listeners,
                    worker=index,
                    serving_fd=serving_w,
                    heartbeat=beat,
                )
                server.open()
                server.open_admin()
                server.run()
                code = 0
            except (ConfigError, StartupError) as e:
                # A certificate half-renewed on disk, say: one line, and the next try soon.
                log.error("worker %d cannot start: %s", index, e)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        children[pid] = (index, loop.now)
        log.info("worker %d started (pid %d)", index, pid)

    def reap(_signum: int) -> None:
        on_serving(0)  # what the dead said before they died, while their PIDs are known
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index, started = children.pop(pid, (-1, 0.0))
            heard.pop(pid, None)
            carries.pop(pid, None)
            if index < 0:
                continue
            how = (
                f"killed by {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
                if os.WIFSIGNALED(status)
                else f"exit code {os.waitstatus_to_exitcode(status)}"
            )
            if stopping:
                log.info("worker %d (pid %d) ended (%s)", index, pid, how)
                continue
            if index not in serving:
                # Its first start failed (a backend name that does not resolve, an admin port
                # in use): a start-up problem, which stops rawproxy with a non-zero exit code
                # as it does a single process, rather than a restart every QUICK_DEATH for
                # ever that no one is told of.
                log.error(
                    "worker %d (pid %d) ended (%s) before it served: rawproxy cannot start",
                    index,
                    pid,
                    how,
                )
                give_up()
                continue
            delay = QUICK_DEATH if loop.now - started < QUICK_DEATH else 0.0
            log.warning("worker %d (pid %d) ended (%s); restarting", index, pid, how)
            loop.call_later(delay, lambda index=index: spawn(index))  # type: ignore[misc]
        if stopping and not children:
            loop.stop()

    def halt(signum: int) -> None:
        """Close the listeners (the workers hold their own copies; closing twice is nothing)
        and pass `signum` to every worker."""
        for _, socks, _ in listeners:
            for sock in socks:
                sock.close()
        tell_workers(signum)

    def tell_workers(signum: int) -> None:
        for pid in list(children):
            os.kill(pid, signum)

    def give_up() -> None:
        nonlocal stopping, failed
        stopping = failed = True
        halt(signal.SIGTERM)

    def stop(signum: int) -> None:
        nonlocal stopping
        name = signal.Signals(signum).name
        if stopping:
            log.info("%s received again: workers stop at once", name)
            halt(STOP_NOW_SIGNAL)
        else:
            stopping = True
            log.info("%s received; the workers drain", name)
            notifier.stopping("draining")
            halt(signal.SIGTERM)
        if not children:
            loop.stop()

    def reopen_logs(signum: int) -> None:
        log.info("SIGUSR1 received; passed to the workers (access log reopened)")
        tell_workers(signum)

    def reload(signum: int) -> None:
        nonlocal config
        if stopping:
            # The workers only reopen their access logs now; systemd, told STOPPING, is not
            # told RELOADING and READY, and the listeners are closed for good.
            log.info("SIGHUP received while the workers drain; passed to them")
            tell_workers(signum)
            return
        if announced:  # before that, systemd still waits for the first READY
            notifier.reloading()
        log.info("SIGHUP received; passed to the workers")
        # A worker restarted later must start from the configuration the others run, not
        # from the one of start-up: read and check it here too (each worker logs why a
        # configuration is refused; the listeners stay those of start-up, as in the workers).
        try:
            fresh = dataclasses.replace(reread(), listen=config.listen)
            check_config(fresh)
            if not fresh.certs and any(tls for _, _, tls in listeners):
                raise ConfigError("a TLS listener, and no certificate")  # as in Server.reload
        except (ConfigError, StartupError):
            pass  # the workers keep theirs and say why; workers restarted later keep it too
        except Exception:
            # Whatever else the file does to the parser: the workers are still told (their
            # access logs reopen for logrotate), and systemd still gets its READY.
            log.exception("SIGHUP: the configuration could not be read; workers keep theirs")
        else:
            config = fresh
        try:
            tell_workers(signum)
        finally:
            if announced:
                notifier.ready(f"{len(children)} workers")

    def on_serving(_mask: int) -> None:
        nonlocal announced
        try:
            data = os.read(serving_r, 4096)
        except BlockingIOError:
            return
        for pid, http, tunnels, _ in WORKER_REPORT.iter_unpack(data):
            if pid in children:
                serving.add(children[pid][0])
                heard[pid] = loop.now
                carries[pid] = (http, tunnels)
        if not announced and not stopping and len(serving) >= count:
            announced = True
            log.info("ready: %d workers", count)
            notifier.ready(f"{count} workers")

    loop.add_signal_handler(signal.SIGCHLD, reap)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(REOPEN_LOGS_SIGNAL, reopen_logs)
    loop.add(serving_r, READ, on_serving)
    for index in range(count):
        spawn(index)

    def abort_hung() -> None:
        """Abort each worker silent for a whole watchdog period; reap restarts it."""
        assert period is not None
        on_serving(0)  # heartbeats already in the pipe count, however late this runs
        for pid, last in list(heard.items()):
            if loop.now - last <= period or pid not in children:
                continue
            del heard[pid]
            log.error(
                "worker %d (pid %d) hung: no heartbeat for %.1f s (the watchdog period); "
                "aborting it (SIGABRT)",
                children[pid][0],
                pid,
                loop.now - last,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
            loop.call_later(ABORT_GRACE, lambda pid=pid: finish_off(pid))  # type: ignore[misc]

    def finish_off(pid: int) -> None:
        if pid in children:
            log.error("worker %d (pid %d) still there: killed (SIGKILL)", children[pid][0], pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def report_status() -> None:
        """STATUS= with what the workers said they carry, at their last report."""
        http = sum(h for h, _ in carries.values())
        tunnels = sum(t for _, t in carries.values())
        notifier.status(f"{len(children)} workers: {status_line(http, tunnels, stopping)}")
        loop.call_later(STATUS_EVERY, report_status)

    if notifier.sock is not None:
        loop.call_later(STATUS_EVERY, report_status)
    if notifier.watchdog_interval:

        def watchdog() -> None:
            abort_hung()
            notifier.watchdog()
            assert notifier.watchdog_interval is not None
            loop.call_later(notifier.watchdog_interval, watchdog)

        watchdog()
    try:
        loop.run()
    finally:
        notifier.close()
        loop.remove(serving_r)
        loop.close()
        os.close(serving_r)
        os.close(serving_w)
    if failed:
        log.error("rawproxy (pid %d) stopped: a worker could not start", os.getpid())
        return 1
    # As a single process's last line (Server.stop): the stop was orderly.
    log.info("rawproxy (pid %d) stopped: every worker ended", os.getpid())
    return 0
