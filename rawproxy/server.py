"""Listeners, accepting with limits, and the proxy's start and stop.

Start-up problems (a port in use, a backend name that does not resolve) raise `StartupError`
with a message for the admin; the CLI prints it as one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import logging
import os
import resource
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from rawproxy.accesslog import AccessLog
from rawproxy.config import Backend, Config, ConfigError, ListenAddress, Route
from rawproxy.http import ForwardedLines, origin, select_route
from rawproxy.loop import READ, Loop, Timer, settle_gc
from rawproxy.metrics import CONTENT_TYPE, Metrics
from rawproxy.session import DONE, Session
from rawproxy.systemd import Notifier
from rawproxy.tls import ServerTLS, backend_context, backend_server_name
from rawproxy.transport import set_keepalive, set_nodelay
from rawproxy.tunnel import LaterKeepalive, PipePool, Tunnel

log = logging.getLogger("rawproxy")

# Signals beyond SIGTERM/SIGINT (drain; a second one stops at once) and SIGHUP (reload):
# SIGUSR1 reopens the access log, as in nginx; SIGUSR2 is the supervisor's "stop at once"
# to its workers (workers ignore a repeated SIGTERM, which systemd or a terminal may send
# them beside the supervisor's own).
REOPEN_LOGS_SIGNAL = signal.SIGUSR1
STOP_NOW_SIGNAL = signal.SIGUSR2
WORKER_SIGNALS = {
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    REOPEN_LOGS_SIGNAL,
    STOP_NOW_SIGNAL,
}

ACCEPTS_PER_EVENT = 64
# When the process runs out of file descriptors, accepting stops for this long: the pending
# connections wait in the kernel's backlog instead of the loop spinning on EMFILE.
FD_EXHAUSTED_PAUSE = 0.5
# How long a new connection must have waited without a byte before it may be closed for a
# new client at --max-connections: a client about to send its request (a packet away, or
# slowed by a burst) is not a browser's spare connection.
SPARE_GRACE = 1.0
LISTEN_BACKLOG = 1024
# While descriptors stay exhausted, say so once a minute, not at every pause.
ACCEPT_FAILURE_LOG_EVERY = 60.0


# -- file descriptors ------------------------------------------------------------------------

# What the connection limit is budgeted in. A proxied connection holds its client socket and,
# from its first request on, a backend socket: 2 descriptors each, always. A tunnel between
# plain TCP sockets may also splice, each direction through a pipe (2 descriptors) it holds
# only while bytes are in flight (idle tunnels hold none), and the pool keeps some spare
# ones; splicing is a speed-up that falls back to copying when no pipe can be had. Pipes get
# one per four connections (HAProxy's maxpipes = maxconn / 4) up to PIPES_BUDGETED, which is
# more tunnels moving bytes at the same instant than one event loop serves well; so a large
# limit loses 128 descriptors to pipes, not a fifth. The pool never opens more than what the
# connections leave (PipePool.limit), so pipes cannot take the descriptors a backend socket
# needs.
PIPES_BUDGETED = 64
# Descriptors that are not connections': stdin, stdout, stderr, epoll, the signal wake-up
# pair, the access log, the systemd notify socket, the --workers supervisor's pipe, a few
# admin requests, and what a reload opens for a moment (the config file, certificates, CA
# files, a DNS socket). Listening sockets are counted on top (reserved_descriptors).
FDS_RESERVED = 32
# Admin requests open at once (the few admin requests of FDS_RESERVED): scrapers and health
# checks take one each for a moment; beyond this, connections wait in the admin listener's
# backlog until one ends (at most 5 s each), as clients do at --max-connections. Without a
# cap, connections that send nothing (each held 5 s) could take every descriptor.
ADMIN_MAX_OPEN = 16


def raise_nofile_limit(needed: int = 0) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as systemd expects of a daemon that can
    use many (its default soft limit stays 1024 for select() users; this process uses epoll
    only); and when `needed` descriptors (descriptors_needed) are more than the hard limit,
    try to raise both to that, as HAProxy does with its computed ulimit-n: root (or
    CAP_SYS_RESOURCE) may, up to fs.nr_open; others keep the hard limit, and
    warn_if_descriptors_short says what fits. The (soft, hard) limits in force;
    RLIM_INFINITY is -1."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and needed > hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed, needed
    if soft != hard and soft != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, ValueError):
            # An unlimited hard limit is capped by the kernel (fs.nr_open): then keep soft.
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def descriptors_needed(config: Config, inherited: int = 0) -> int:
    """The descriptors --max-connections needs, with its pipes and the reserve."""
    return reserved_descriptors(config, inherited) + _descriptors_for(config.max_connections)


def _descriptors_for(connections: int) -> int:
    return 2 * connections + 2 * min(PIPES_BUDGETED, -(-connections // 4))


def nofile_limit() -> int:
    """The soft RLIMIT_NOFILE in force (-1: unlimited)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connections_that_fit(nofile: int, requested: int, reserved: int = FDS_RESERVED) -> int:
    """The connection limit `nofile` descriptors carry: `requested` (--max-connections) when
    it fits, else as many as fit beside `reserved` at 2 descriptors each plus their pipes (at
    least 1). `nofile` < 0 means no limit."""
    if nofile < 0:
        return requested
    room = nofile - reserved
    # 2.5 a connection while the pipes' quarter is under the cap, then 2 and the cap's pipes.
    fits = room * 4 // 10
    if fits > 4 * PIPES_BUDGETED:
        fits = (room - 2 * PIPES_BUDGETED) // 2
    return max(1, min(requested, fits))


def pipes_that_fit(nofile: int, connections: int, reserved: int = FDS_RESERVED) -> int:
    """How many splice pipes may be open beside `connections` connections' sockets: what is
    left of `nofile` (when `connections` was fitted by connections_that_fit, at least one per
    four connections or PIPES_BUDGETED). -1: no limit."""
    if nofile < 0:
        return -1
    return max(0, (nofile - reserved - 2 * connections) // 2)


def reserved_descriptors(config: Config, inherited: int = 0) -> int:
    """FDS_RESERVED plus the listening sockets (a `:PORT` listener may be two, IPv4 and IPv6;
    `inherited` ones are systemd's)."""
    listeners = 2 * len(config.listen) + inherited + (2 if config.admin_listen else 0)
    return FDS_RESERVED + listeners


def warn_if_descriptors_short(config: Config, inherited: int = 0) -> int:
    """At start-up, after raise_nofile_limit: log one warning when --max-connections does not
    fit the descriptor limit, naming the numbers and the fixes. The limit each process (each
    worker, with --workers) accepts."""
    nofile = nofile_limit()
    reserved = reserved_descriptors(config, inherited)
    requested = config.max_connections
    effective = connections_that_fit(nofile, requested, reserved)
    if effective < requested:
        needed = descriptors_needed(config, inherited)
        log.warning(
            "--max-connections %d needs about %d file descriptors (2 per connection, some "
            "for splice pipes, %d reserved), but the limit is %d (RLIMIT_NOFILE): %s at "
            "most %d connections at once, more wait in the listen backlog; raise the limit "
            "(LimitNOFILE=%d in the systemd unit, or ulimit -n) or lower --max-connections "
            "to %d",
            requested,
            needed,
            reserved,
            nofile,
            f"each of the {config.workers} workers accepts" if config.workers > 1 else "accepting",
            effective,
            needed,
            effective,
        )
    return effective


class StartupError(Exception):
    """The proxy cannot start; the message says what is wrong and how to fix it."""


class Connection(Protocol):
    def shutdown(self) -> None: ...

    def drain(self) -> None: ...


class _Recurring:
    """A condition that may recur often (a busy proxy at its limits): counted every time,
    logged the first time and then at most once per ACCEPT_FAILURE_LOG_EVERY seconds."""

    __slots__ = ("count", "logged")

    def __init__(self) -> None:
        self.count = 0
        self.logged = -ACCEPT_FAILURE_LOG_EVERY

    def happened(self, now: float) -> bool:
        """Count one more; True when it is to be logged now."""
        self.count += 1
        if now < self.logged + ACCEPT_FAILURE_LOG_EVERY:
            return False
        self.logged = now
        return True


class Target:
    """A backend as the I/O layer needs it: resolved addresses, TLS, the names it goes by.
    Routes to the same scheme, host and port share one (their paths may differ)."""

    __slots__ = (
        "addresses",
        "authority",
        "name",
        "origin",
        "sni",
        "tls",
        "tls_session",
        "tls_session_proven",
        "tls_single_use",
    )

    def __init__(self, backend: Backend, config: Config) -> None:
        use_tls = backend.tls if config.backend_tls is None else config.backend_tls
        self.tls: ssl.SSLContext | None = (
            backend_context(config.backend_ca, config.backend_insecure, config.backend_client_cert)
            if use_tls
            else None
        )
        # Connections go to backend.host as written; only SNI and verification drop a
        # trailing dot.
        self.sni = backend_server_name(config.backend_sni or backend.host)
        self.tls_session: ssl.SSLSession | None = None  # offered to new connections
        self.tls_session_proven = False  # it has resumed a connection
        self.tls_single_use = False  # the backend refused a proven session: always renew
        self.addresses = resolve_backend(backend)
        scheme = "https" if use_tls else "http"
        self.name = f"{scheme}://{_bracketed(backend.host)}:{backend.port}"
        host = _bracketed(backend.host)
        if backend.port != (443 if use_tls else 80):
            host = f"{host}:{backend.port}"
        self.authority = host.encode("idna")
        self.origin = origin(scheme, backend.host, backend.port)

    def keep_tls_session(self, session: ssl.SSLSession | None) -> None:
        self.tls_session = session
        self.tls_session_proven = False

    def wants_tls_session(self, offered: ssl.SSLSession | None, reused: bool) -> bool:
        """After a TLS 1.3 connection that offered `offered` (and resumed it if `reused`):
        whether its own session should replace the one kept. Fetching it costs as much as
        a resumed handshake (the ssl module decodes it, certificate and all), so a session
        that resumes connections is kept while it is young, as long as the backend accepts
        it again and again. A backend that refuses one it accepted before has single-use
        tickets (a stateful session cache): from then on every connection's is kept."""
        saved = self.tls_session
        if saved is None or offered is not saved:
            return True
        if not reused:
            if self.tls_session_proven:
                self.tls_single_use = True
            return True
        self.tls_session_proven = True
        age = time.time() - saved.time
        return self.tls_single_use or age >= min(
            TLS_SESSION_RENEW_AFTER, saved.ticket_lifetime_hint / 2
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# A proven TLS 1.3 session is renewed after this long (or half its ticket's lifetime).
TLS_SESSION_RENEW_AFTER = 600.0


def make_targets(config: Config) -> dict[tuple[str, str, int], Target]:
    targets: dict[tuple[str, str, int], Target] = {}
    for route in config.routes:
        key = route.backend.endpoint
        if key not in targets:
            targets[key] = Target(route.backend, config)
    return targets


def _same_address(key: ListenAddress | str, where: ListenAddress) -> bool:
    return isinstance(key, ListenAddress) and (key.host, key.port) == (where.host, where.port)


def listener_kind(tls: bool | None, config: Config) -> str:
    """What a listener speaks: "tls" or "plain" (`tls` None: TLS when certificates exist)."""
    return "tls" if (bool(config.certs) if tls is None else tls) else "plain"


def open_access_log(config: Config) -> AccessLog:
    try:
        return AccessLog(config.access_log, config.access_log_format)
    except OSError as e:
        raise StartupError(
            f"cannot open --access-log {config.access_log}: {e.strerror or e}"
        ) from e


def status_line(http: int, tunnels: int, draining: bool) -> str:
    """The STATUS= of systemctl status: what is open now."""
    return f"{http} HTTP connections, {tunnels} tunnels" + (", draining" if draining else "")


def check_config(config: Config) -> None:
    """What start-up would refuse, short of binding ports: certificates, keys, CA files,
    backend names. Raises ConfigError."""
    if config.certs:
        ServerTLS(config.certs)
    try:
        make_targets(config)
    except StartupError as e:
        raise ConfigError(str(e)) from e


def resolve_backend(backend: Backend) -> list[tuple[int, tuple[str, int]]]:
    try:
        infos = socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise StartupError(
            f"cannot resolve the backend host {backend.host!r}: {e.strerror}; check the name "
            "or give an IP address"
        ) from e
    except UnicodeError as e:
        # The IDNA codec refuses the name before any lookup: an empty label (`a..b`), one
        # over 63 characters.
        raise StartupError(
            f"cannot resolve the backend host {backend.host!r}: not a valid host name ({e}); "
            "check the name or give an IP address"
        ) from e
    return _unique_addresses(infos)


def _unique_addresses(infos: list[Any]) -> list[tuple[int, tuple[str, int]]]:
    """(family, (host, port)) of getaddrinfo's answers, in its order, each once (it lists an
    address once per socket type and protocol)."""
    seen: list[tuple[int, tuple[str, int]]] = []
    for family, _, _, _, address in infos:
        entry = (int(family), (str(address[0]), int(address[1])))
        if entry not in seen:
            seen.append(entry)
    return seen


def listening_ports(table: str) -> set[int]:
    """The local ports of the listening sockets in a /proc/net/tcp or /proc/net/tcp6 table
    (state 0A is LISTEN; the port is the hexadecimal after the address's colon)."""
    ports = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def _in_use_hint(port: int) -> str:
    """Why a port is in use: a program listening on it, or (no listener in sight) an
    outgoing connection that the kernel gave it as its local port."""
    listening: set[int] = set()
    try:
        for name in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(name) as f:
                listening |= listening_ports(f.read())
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        listening = {port}  # cannot tell: the usual case
    if port in listening or not port:
        return (
            "the address is already in use; stop the program holding it or choose another "
            "--listen port"
        )
    if low <= port <= high:
        why = (
            f"a connection holds it as its local port (the kernel gives ports {low}-{high} to "
            "outgoing connections, net.ipv4.ip_local_port_range); choose a --listen port "
            "outside that range"
        )
    else:
        why = (
            "a connection or a socket bound without listening holds it "
            f"(`ss -tanp sport = :{port}` shows which)"
        )
    return f"the address is in use, but no program listens on port {port}: {why}"


# The ports of the sockets systemd passed (inherited_listener): a listen address on one of
# them is in use by systemd, on our behalf.
_passed_ports: set[int] = set()


def served_by_systemd(where: ListenAddress) -> bool:
    """A --listen :PORT (every address) on a port systemd passed a socket for: that socket
    serves it. The example config's listen = [":443"] beside rawproxy.socket's
    ListenStream=443 is then one listener, not a start-up failure (daemon(7): use the
    sockets passed instead of opening them)."""
    if where.host is None and where.port in _passed_ports:
        log.info("listen %s: served by the socket systemd passed for port %d", where, where.port)
        return True
    return False


def _listen_error(where: ListenAddress, e: OSError) -> StartupError:
    if e.errno == errno.EADDRINUSE and where.port in _passed_ports:
        hint = (
            "systemd already passed rawproxy a socket on this port (socket activation, "
            "rawproxy.socket); leave this address out of --listen and listen = [...], or "
            "do not enable the socket unit"
        )
    elif e.errno == errno.EADDRINUSE:
        hint = _in_use_hint(where.port)
    elif e.errno == errno.EACCES:
        hint = (
            "permission denied; ports below 1024 need root or CAP_NET_BIND_SERVICE "
            "(for example AmbientCapabilities= in a systemd unit), or choose a port above 1023"
        )
    elif e.errno == errno.EADDRNOTAVAIL:
        hint = "no interface of this machine has that address; check the --listen host"
    else:
        hint = e.strerror or str(e)
    return StartupError(f"cannot listen on {where}: {hint}")


def open_listener(where: ListenAddress) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for one --listen address."""
    candidates: list[tuple[int, tuple[str, int]]] = []
    if where.host is None:
        if socket.has_ipv6:
            candidates.append((int(socket.AF_INET6), ("::", where.port)))
        candidates.append((int(socket.AF_INET), ("0.0.0.0", where.port)))
    else:
        try:
            infos = socket.getaddrinfo(
                where.host, where.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except socket.gaierror as e:
            raise StartupError(
                f"cannot listen on {where}: cannot resolve {where.host!r}: {e.strerror}"
            ) from e
        candidates = _unique_addresses(infos)
    sockets: list[socket.socket] = []
    for family, address in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            if where.host is None and e.errno == errno.EAFNOSUPPORT:
                continue  # no IPv6 on this machine: IPv4 alone serves ":PORT"
            raise _listen_error(where, e) from e
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # ":PORT" is one dual-stack socket; an explicit IPv6 host is IPv6 only.
                sock.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if where.host is None else 1
                )
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if (
                where.host is None
                and family == socket.AF_INET6
                and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
            ):
                continue
            for other in sockets:
                other.close()
            raise _listen_error(where, e) from e
        sockets.append(sock)
        if where.host is None and family == socket.AF_INET6:
            break  # the dual-stack socket already takes IPv4
    if not sockets:
        raise StartupError(f"cannot listen on {where}: no usable address")
    return sockets


def _tune_listener(sock: socket.socket, keepalive: int) -> int:
    """Set on the listening socket what every accepted connection needs, TCP_NODELAY and
    keepalive (--tcp-keepalive): Linux copies both to each accepted socket, which saves five
    system calls per connection. Return the port it listens on (0: not an IP socket)."""
    set_nodelay(sock)
    set_keepalive(sock, keepalive)
    try:
        name = sock.getsockname()
    except OSError:
        return 0
    return name[1] if isinstance(name, tuple) else 0


def _shown(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:  # passed by systemd (ListenStream=/path or @name)
        if isinstance(address, bytes):  # the abstract namespace: a NUL, then the name
            return "unix:@" + address[1:].decode("utf-8", "backslashreplace")
        return f"unix:{address}" if address else "unix:(unnamed)"
    host, port = address[:2]
    return f"{_bracketed(host)}:{port}"


class Runtime:
    """The settings connections work with. A reload builds a new one; a connection takes it
    at its next request (Session._follow_reload), a tunnel keeps the one it started with."""

    __slots__ = (
        "client_tls",
        "config",
        "forwarded_memo",
        "only_route",
        "routes",
        "targets",
        "trusted",
    )

    def __init__(self, config: Config) -> None:
        """Reads certificates and resolves backend names: StartupError when one fails."""
        try:
            self.client_tls = ServerTLS(config.certs) if config.certs else None
            self.targets = make_targets(config)
        except ConfigError as e:
            raise StartupError(str(e)) from e
        self.config = config
        # Longest prefix first (select_route does not depend on it; the log reads better).
        self.routes = tuple(sorted(config.routes, key=lambda r: len(r.prefix), reverse=True))
        self.trusted = config.trusted_proxies
        # Session._forwarded_lines: (client address, scheme, port, Host) -> the forwarded
        # headers of a `plain` request and their lines.
        self.forwarded_memo: dict[tuple[str, str, int, bytes], ForwardedLines] = {}
        # The usual set-up, one backend for every path and no path of its own: then any
        # origin-form target goes there unchanged (see choose).
        self.only_route: tuple[Route, Target] | None = None
        if len(self.routes) == 1:
            route = self.routes[0]
            if route.prefix == "/" and route.backend.path is None:
                self.only_route = (route, self.target_for(route))

    def target_for(self, route: Route) -> Target:
        return self.targets[route.backend.endpoint]

    def choose(self, target: bytes) -> tuple[Route, bytes, Target] | None:
        """The route for a request target, the target to send, and the route's backend
        (rawproxy.http.select_route); None when no route fits."""
        only = self.only_route
        if only is not None and target.startswith(b"/"):
            return only[0], target, only[1]  # what select_route would say, without asking
        chosen = select_route(self.routes, target)
        if chosen is None:
            return None
        route, sent = chosen
        return route, sent, self.target_for(route)

    def describe(self) -> None:
        config = self.config
        tls_flags = [
            flag
            for flag, value in (
                ("--backend-ca", config.backend_ca),
                ("--backend-sni", config.backend_sni),
                ("--backend-cert", config.backend_client_cert),
                ("--backend-insecure", True if config.backend_insecure else None),
            )
            if value is not None
        ]
        if tls_flags and all(target.tls is None for target in self.targets.values()):
            log.warning("%s given, but no backend uses TLS: ignored", ", ".join(tls_flags))
        elif config.backend_insecure and config.backend_ca is not None:
            log.warning("--backend-ca is ignored with --backend-insecure (nothing is verified)")
        for target in self.targets.values():
            if target.tls is None:
                log.info("backend %s: plain TCP", target.name)
            elif config.backend_insecure:
                log.warning(
                    "backend %s: TLS WITHOUT certificate verification (--backend-insecure): "
                    "anyone on the path can impersonate the backend",
                    target.name,
                )
            else:
                log.info(
                    "backend %s: TLS, certificate verified against %s for the name %r (%s)",
                    target.name,
                    config.backend_ca or "the system's CA store",
                    target.sni,
                    "an IP address: no SNI is sent (RFC 6066)"
                    if _is_ip(target.sni)
                    else "sent as SNI",
                )
        for route in self.routes:
            addresses = (address for _, address in self.target_for(route).addresses)
            log.info(
                "route %s -> %s (%s)",
                route.prefix,
                route.backend,
                ", ".join(f"{_bracketed(host)}:{port}" for host, port, *_ in addresses),
            )


# How often the STATUS= line systemd shows is refreshed.
STATUS_EVERY = 10.0
# What a --workers worker tells its supervisor on the serving pipe (workers.py): its PID, its
# HTTP connections and tunnels, and whether it drains. 16 bytes: one atomic pipe write.
WORKER_REPORT = struct.Struct(">IIII")


# A listening socket group: what it came from, its sockets, whether it is TLS (None: TLS when
# certificates are configured).
Listener = tuple[ListenAddress | str, list[socket.socket], bool | None]


class Server:
    def __init__(
        self,
        config: Config,
        reread: Callable[[], Config] | None = None,
        inherited: list[tuple[str, socket.socket]] | None = None,
        preopened: list[Listener] | None = None,
        worker: int | None = None,
        serving_fd: int | None = None,
        heartbeat: float | None = None,
    ) -> None:
        """`reread` gives the configuration anew on SIGHUP (from the config file and the
        flags); `inherited` are sockets passed by systemd, with their names; `preopened` are
        the listeners a --workers supervisor opened for this worker number `worker`, which
        tells the supervisor on `serving_fd` when it serves and then, when `heartbeat` is
        set (systemd listens), every `heartbeat` seconds from its loop."""
        self.runtime = Runtime(config)
        self.reread = reread
        self.loop = Loop()
        self.pipes = PipePool()
        # systemd's listening sockets, counted in the descriptors reserved beside connections.
        self.inherited_count = (
            len(inherited or [])
            if preopened is None
            else sum(len(socks) for key, socks, _ in preopened if isinstance(key, str))
        )
        self.max_connections = self._fit_to_descriptors(config)
        self.later_keepalive = LaterKeepalive(self.loop)
        self.splice = config.splice and hasattr(os, "splice")
        self.connections: set[Connection] = set()
        # Sessions waiting for a request, the longest waiting first: kept-alive ones between
        # requests (Session._await_request adds them) and new ones that sent nothing yet. At
        # --max-connections the oldest is closed for a new client. A session takes itself out
        # when a request begins or it closes; entries are checked anyway (may_make_room).
        self.idle: dict[Session, float] = {}  # -> since when (loop time)
        # Listening sockets with what they came from: a ListenAddress, or a systemd name.
        self.listening: list[tuple[ListenAddress | str, list[socket.socket]]] = []
        self.listener_tls: dict[int, bool | None] = {}  # None: TLS when certificates exist
        self.listener_port: dict[int, int] = {}  # 0: not an IP socket
        self.inherited = inherited or []
        self.preopened = preopened
        self.worker = worker
        self.serving_fd = serving_fd
        self.heartbeat = heartbeat
        self.accepting = False
        self.resume_timer: Timer | None = None
        # Set while the oldest idle entry is a new connection younger than SPARE_GRACE: the
        # limit is looked at again when it comes of age.
        self.spare_timer: Timer | None = None
        self.accept_failures = _Recurring()  # accept() out of descriptors or memory
        self.limit_reached = _Recurring()  # --max-connections stopped accepting
        self.reclaimed = _Recurring()  # --max-connections closed idle kept-alive connections
        self.draining = False
        self.drain_timer: Timer | None = None
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.admin: list[socket.socket] = []
        self.admin_timer: Timer | None = None  # the admin listener's pause (descriptors out)
        self.admin_watched = False  # the admin listeners are in the loop
        self.admin_open = 0  # admin requests open (ADMIN_MAX_OPEN)
        self.access = open_access_log(config)

    @property
    def config(self) -> Config:
        return self.runtime.config

    def _fit_to_descriptors(self, config: Config) -> int:
        """The connection limit that fits this process's descriptor limit (--max-connections,
        or fewer: warn_if_descriptors_short said so at start-up), and the pipes' share."""
        nofile = nofile_limit()
        reserved = reserved_descriptors(config, self.inherited_count)
        limit = connections_that_fit(nofile, config.max_connections, reserved)
        self.pipes.limit = pipes_that_fit(nofile, limit, reserved)
        return limit

    @property
    def listeners(self) -> list[socket.socket]:
        return [sock for _, socks in self.listening for sock in socks]

    # -- listeners -------------------------------------------------------------------------

    def open(self) -> None:
        if self.preopened is not None:
            for key, socks, tls in self.preopened:
                self._add_listener(key, socks, tls)
            self._accept_on()
            return
        try:
            for name, sock in self.inherited:
                self._add_listener(*inherited_listener(name, sock, self.config))
            for where in self.config.listen:
                if not served_by_systemd(where):
                    self._add_listener(where, open_listener(where), where.tls)
        except StartupError:
            self.close_listeners()
            raise
        self._accept_on()

    def _add_listener(
        self, key: ListenAddress | str, socks: list[socket.socket], tls: bool | None
    ) -> None:
        self.listening.append((key, socks))
        for sock in socks:
            self.listener_tls[sock.fileno()] = tls
            self.listener_port[sock.fileno()] = _tune_listener(sock, self.config.tcp_keepalive)
            if self.accepting:
                self.loop.add(sock.fileno(), READ, self._make_acceptor(sock))

    def _respell_listener(self, index: int, where: ListenAddress, config: Config) -> None:
        """The listener at `index` stays, under its new spelling: TLS or not from now on."""
        _key, socks = self.listening[index]
        self.listening[index] = (where, socks)
        for sock in socks:
            self.listener_tls[sock.fileno()] = where.tls
        log.info("SIGHUP: %s is now a %s listener", where, listener_kind(where.tls, config))

    def _remove_listener(self, index: int) -> None:
        _key, socks = self.listening.pop(index)
        for sock in socks:
            if self.accepting:
                self.loop.remove(sock.fileno())
            del self.listener_tls[sock.fileno()]
            del self.listener_port[sock.fileno()]
            sock.close()

    def _accept_on(self) -> None:
        if not self.accepting and not self.draining:
            for sock in self.listeners:
                self.loop.add(sock.fileno(), READ, self._make_acceptor(sock))
            self.accepting = True

    def _accept_off(self) -> None:
        if self.accepting:
            for sock in self.listeners:
                self.loop.remove(sock.fileno())
            self.accepting = False

    def _make_acceptor(self, listener: socket.socket) -> Callable[[int], None]:
        def on_ready(_mask: int) -> None:
            self._accept(listener)

        return on_ready

    def _accept(self, listener: socket.socket) -> None:
        runtime = self.runtime
        limit = self.max_connections
        wanted = self.listener_tls[listener.fileno()]
        port = self.listener_port[listener.fileno()]
        tls = None
        if runtime.client_tls is not None and wanted is not False:
            tls = runtime.client_tls.context
        # socket.accept() converts the listener's family and type to enums and runs
        # socket.__init__'s checks for every client (about 2 us a connection, a quarter of
        # the accept's cost in Python); the descriptor and the known family make the same
        # socket object.
        family = listener.family
        for _ in range(ACCEPTS_PER_EVENT):
            room = None  # the idle session that makes room for this client, at the limit
            if len(self.connections) >= limit and (room := self._oldest_idle()) is None:
                # Once a minute at most: a busy proxy reaches the limit again and again.
                if self.limit_reached.happened(self.loop.now):
                    log.warning(
                        "%d connections open (--max-connections%s); new clients wait in the "
                        "listen backlog (reached %d times so far)",
                        limit,
                        ""
                        if limit == runtime.config.max_connections
                        else ", lowered to fit the file descriptor limit",
                        self.limit_reached.count,
                    )
                self._accept_off()
                return
            try:
                fd, address = listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if self.accept_failures.happened(self.loop.now):
                        log.error(
                            "cannot accept: %s; pausing accepts for %gs at a time (%d pauses "
                            "so far; raise the file descriptor limit, e.g. LimitNOFILE=, or "
                            "lower --max-connections)",
                            e.strerror,
                            FD_EXHAUSTED_PAUSE,
                            self.accept_failures.count,
                        )
                    self._accept_off()
                    self.resume_timer = self.loop.call_later(FD_EXHAUSTED_PAUSE, self._resume)
                    return
                # ECONNABORTED and friends: that client gave up already; take the next one.
                continue
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            sock.setblocking(False)
            self.metrics.connections_total += 1
            session = Session(self, sock, address, tls, port)
            if session.phase != DONE:
                self.connections.add(session)
            if room is not None:
                # A client is here (accepted first: no idle connection is closed for nobody)
                # and the limit is reached: the longest idle kept-alive connection makes room,
                # as in nginx. Its client reconnects when it needs to; a new client waiting in
                # the backlog behind idle ones could wait --idle-timeout for each.
                self._reclaim(room)

    def _oldest_idle(self) -> Session | None:
        """The session that waited longest for a request (between requests, or since it
        connected), dropping entries that cannot make room now (they come back when next idle).
        A new connection younger than SPARE_GRACE is not closed: None then, and accepts are
        tried again once it is old enough (entries after it are younger still)."""
        idle = self.idle
        while idle:
            session, since = next(iter(idle.items()))
            if not session.may_make_room():
                del idle[session]
                continue
            if not session.is_idle():  # a new connection, not yet used
                wait = since + SPARE_GRACE - self.loop.now
                if wait > 0:
                    if self.spare_timer is None:
                        self.spare_timer = self.loop.call_later(wait, self._spare_of_age)
                    return None
            return session
        return None

    def _spare_of_age(self) -> None:
        self.spare_timer = None
        if not self.accepting and self.resume_timer is None and self.loop.running:
            self._accept_on()  # at the limit still: _accept closes the spare, or stops again

    def _reclaim(self, session: Session) -> None:
        """Close `session`, idle, for a new client; its close (forget) takes it out of idle."""
        self.metrics.idle_reclaimed += 1
        if self.reclaimed.happened(self.loop.now):
            # Once a minute at most, like the limit's own line.
            log.warning(
                "--max-connections %d reached: idle connections (kept alive between requests, "
                "or not sent a request yet) are closed to make room for new clients (%d so far)",
                self.max_connections,
                self.metrics.idle_reclaimed,
            )
        session.reclaim()

    def became_idle(self, session: Session) -> None:
        """`session` waits for a request now (between requests, or since it connected): it
        may make room for a new client. A proxy that stopped accepting at the limit accepts
        again, for the clients in the backlog."""
        self.idle[session] = self.loop.now
        if not self.accepting and self.resume_timer is None and self.loop.running:
            self._accept_on()

    def _resume(self) -> None:
        self.resume_timer = None
        if self.loop.running and len(self.connections) < self.max_connections:
            self._accept_on()

    # -- connection registry ---------------------------------------------------------------

    def remember(self, connection: Connection) -> None:
        self.connections.add(connection)

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.idle.pop(connection, None)  # type: ignore[call-overload]
        if self.draining:
            if not self.connections and self.loop.running:  # not while stop() closes them
                log.info("drained: every connection ended")
                self.loop.stop()
            return
        if (
            not self.accepting
            and self.resume_timer is None
            and self.loop.running
            and len(self.connections) < self.max_connections
        ):
            self._accept_on()

    def target_for(self, route: Route) -> Target:
        return self.runtime.target_for(route)

    # -- running ---------------------------------------------------------------------------

    def run(self) -> None:
        # Start-up's last work (a full collection, a few ms) before anything says "ready": a
        # worker that announced itself would otherwise leave its first connections waiting.
        settle_gc()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._on_stop_signal)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        self.loop.add_signal_handler(REOPEN_LOGS_SIGNAL, self._on_reopen_signal)
        if self.worker is not None:
            self.loop.add_signal_handler(STOP_NOW_SIGNAL, self._on_stop_now_signal)
            # The supervisor forked us with these blocked (see workers.spawn): now they have
            # handlers, let them in, including any that arrived meanwhile.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        if self.worker is not None:
            log.info("worker %d (pid %d) serving", self.worker, os.getpid())
            self._tell_supervisor()
        else:
            self._log_listeners(self.listeners)
            self.runtime.describe()
            log.info(
                "ready: %d listener(s), %d route(s)",
                len(self.listeners),
                len(self.runtime.routes),
            )
        self.notifier.ready(self._status())
        if self.notifier.watchdog_interval:
            self._watchdog()
        if self.notifier.sock is not None:
            self.loop.call_later(STATUS_EVERY, self._report_status)
        try:
            self.loop.run()
        finally:
            self.stop()

    def _tell_supervisor(self) -> None:
        """Say to the --workers supervisor that this worker serves (it says ready once every
        worker has), and, with a heartbeat, that its loop still turns (the supervisor stands
        for the workers before systemd's watchdog) and what it carries (for the STATUS line):
        a WORKER_REPORT. A supervisor that is gone or not reading changes nothing here."""
        fd = self.serving_fd
        if fd is None:
            return
        http, tunnels = self._counts()
        with contextlib.suppress(OSError):
            os.write(fd, WORKER_REPORT.pack(os.getpid(), http, tunnels, self.draining))
        if self.heartbeat:
            self.loop.call_later(self.heartbeat, self._tell_supervisor)
        else:
            self._close_serving_fd()

    def _close_serving_fd(self) -> None:
        if self.serving_fd is not None:
            os.close(self.serving_fd)
            self.serving_fd = None

    def _log_listeners(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            kind = listener_kind(self.listener_tls[sock.fileno()], self.config)
            log.info("listening on %s (%s)", _shown(sock), kind)

    def _counts(self) -> tuple[int, int]:
        """HTTP connections and tunnels open now."""
        tunnels = sum(1 for c in self.connections if not isinstance(c, Session))
        return len(self.connections) - tunnels, tunnels

    def _status(self) -> str:
        return status_line(*self._counts(), self.draining)

    def _report_status(self) -> None:
        self.notifier.status(self._status())
        self.loop.call_later(STATUS_EVERY, self._report_status)

    def _watchdog(self) -> None:
        self.notifier.watchdog()
        interval = self.notifier.watchdog_interval
        if interval:
            self.loop.call_later(interval, self._watchdog)

    # -- reload ----------------------------------------------------------------------------

    def _on_reload_signal(self, _signum: int) -> None:
        """SIGHUP: the configuration file and certificates read anew, for new connections;
        kept-alive connections at their next request, tunnels never. While draining
        only the access log is reopened (logrotate): the listeners stay closed, and systemd,
        told STOPPING, is not told READY again."""
        if self.draining:
            self._reopen_access_log()
            log.info("SIGHUP received while draining: only the access log is reopened")
            return
        self.notifier.reloading()
        try:
            self.reload()
        finally:
            self.notifier.ready(self._status())

    def _reopen_access_log(self) -> None:
        try:
            self.access.reopen()
        except OSError as e:
            log.error("SIGHUP: cannot reopen the access log: %s; still writing the old one", e)

    def reload(self) -> None:
        self._reopen_access_log()
        old = self.runtime
        try:
            config = self.reread() if self.reread is not None else old.config
            runtime = Runtime(config)
        except (ConfigError, StartupError) as e:
            log.error("SIGHUP: keeping the current configuration and certificates: %s", e)
            return
        if self.preopened is not None and list(config.listen) != list(old.config.listen):
            log.warning("SIGHUP: listeners change only with a restart when --workers is used")
            config = dataclasses.replace(config, listen=old.config.listen)
            runtime = Runtime(config)
        for name in ("admin_listen", "workers"):
            if getattr(config, name) != getattr(old.config, name):
                log.warning(
                    "SIGHUP: %s changes only with a restart; the rest is reloaded",
                    name.replace("_", "-"),
                )
        # Listeners that stay are matched one to one (two equal --listen :0 are two sockets).
        unmatched = [
            i for i, (key, _) in enumerate(self.listening) if isinstance(key, ListenAddress)
        ]
        # Every new listener is opened before anything changes: one that cannot be (a port in
        # use) keeps the whole current configuration, as a broken file does (nginx too).
        opened: list[tuple[ListenAddress, list[socket.socket]]] = []
        respelled: list[tuple[int, ListenAddress]] = []
        try:
            # Listeners kept whatever the file says (systemd's; with --workers, all) must
            # still find a certificate if they speak TLS: start-up refuses that, and so does
            # a reload (a `tls` socket from rawproxy.socket would otherwise answer TLS
            # clients in plain).
            for key, socks in self.listening:
                kept = isinstance(key, str) or self.preopened is not None
                tls = any(self.listener_tls.get(sock.fileno()) for sock in socks)
                if kept and tls and not config.certs:
                    raise StartupError(
                        f"{_shown(socks[0])} is a TLS listener, and the new configuration has "
                        "no certificate"
                    )
            for where in config.listen:
                if served_by_systemd(where):
                    continue
                # Matched by address alone: a listener that turns TLS on or off (or is only
                # spelled anew, `:P` as `tcp://:P`) keeps its socket; binding a second one
                # would fail on our own port.
                same = next(
                    (i for i in unmatched if _same_address(self.listening[i][0], where)), None
                )
                if same is not None:
                    unmatched.remove(same)
                    if self.listening[same][0] != where:
                        respelled.append((same, where))
                    continue
                opened.append((where, open_listener(where)))
            # A new access log file or format too, before anything changes.
            access: AccessLog | None = None
            if (config.access_log, config.access_log_format) != (
                old.config.access_log,
                old.config.access_log_format,
            ):
                access = open_access_log(config)
        except StartupError as e:
            for _where, socks in opened:
                for sock in socks:
                    sock.close()
            log.error("SIGHUP: keeping the current configuration and certificates: %s", e)
            return
        for index, where in respelled:
            self._respell_listener(index, where, config)
        if access is not None:
            self.access.close()
            self.access = access
        if config.log_level != old.config.log_level:
            logging.getLogger().setLevel(getattr(logging, config.log_level.upper()))
        self.splice = config.splice and hasattr(os, "splice")  # for tunnels from now on
        added: list[socket.socket] = []
        for where, socks in opened:
            self._add_listener(where, socks, where.tls)
            added.extend(socks)
        for index in sorted(unmatched, reverse=True):
            log.info("SIGHUP: no longer listening on %s", self.listening[index][0])
            self._remove_listener(index)
        if config.tcp_keepalive != old.config.tcp_keepalive:
            for sock in self.listeners:
                _tune_listener(sock, config.tcp_keepalive)
        self.runtime = runtime
        limit = self._fit_to_descriptors(config)
        if limit != self.max_connections and limit < config.max_connections and not self.worker:
            log.warning(
                "SIGHUP: --max-connections %d does not fit the file descriptor limit %d: "
                "accepting at most %d connections at once (raise LimitNOFILE= or ulimit -n)",
                config.max_connections,
                nofile_limit(),
                limit,
            )
        self.max_connections = limit
        if not self.accepting and self.resume_timer is None and len(self.connections) < limit:
            # Stopped at the old limit, with clients in the backlog: a raised one lets them in
            # now, not when an old connection (a WebSocket, for hours) ends.
            self._accept_on()
        self._log_listeners(added)
        runtime.describe()
        log.info(
            "SIGHUP: reloaded configuration and certificates (%s); open connections keep theirs",
            ", ".join(pair.cert for pair in config.certs) or "no listener certificates",
        )

    # -- stopping --------------------------------------------------------------------------

    # -- the admin listener: /metrics and /healthz ------------------------------------------

    def open_admin(self) -> None:
        where = self.config.admin_listen
        if where is None:
            return
        if self.worker and where.port:
            # One admin port per worker: worker N serves on the given port + N.
            where = dataclasses.replace(where, port=where.port + self.worker)
        self.admin = open_listener(where)
        self._watch_admin(True)
        for sock in self.admin:
            log.info("admin on %s: /metrics, /healthz", _shown(sock))

    def _watch_admin(self, on: bool) -> None:
        """Put the admin listeners in the loop, or take them out (paused: connections wait
        in their backlog)."""
        if on == self.admin_watched:
            return
        for sock in self.admin:
            if on:
                self.loop.add(sock.fileno(), READ, self._make_admin_acceptor(sock))
            else:
                self.loop.remove(sock.fileno())
        self.admin_watched = on

    def admin_done(self) -> None:
        """An admin request ended: accept again if only the cap had paused the listeners."""
        self.admin_open -= 1
        if self.admin and self.admin_timer is None and self.admin_open < ADMIN_MAX_OPEN:
            self._watch_admin(True)

    def _make_admin_acceptor(self, listener: socket.socket) -> Callable[[int], None]:
        def on_ready(_mask: int) -> None:
            for _ in range(16):
                if self.admin_open >= ADMIN_MAX_OPEN:
                    self._watch_admin(False)  # until one ends (admin_done)
                    return
                try:
                    sock, _address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        self._pause_admin(e)
                    return
                AdminRequest(self, sock)

        return on_ready

    def _pause_admin(self, error: OSError) -> None:
        """Out of descriptors: the admin listener leaves the loop for FD_EXHAUSTED_PAUSE, as
        the client listeners do; left in, level-triggered, a scrape waiting in its backlog
        was reported (and failed) on every round, and the loop spun."""
        if self.accept_failures.happened(self.loop.now):
            log.error(
                "admin listener cannot accept: %s; pausing it for %gs at a time",
                error.strerror,
                FD_EXHAUSTED_PAUSE,
            )
        self._watch_admin(False)
        self.admin_timer = self.loop.call_later(FD_EXHAUSTED_PAUSE, self._resume_admin)

    def _resume_admin(self) -> None:
        self.admin_timer = None
        if self.admin_open < ADMIN_MAX_OPEN:
            self._watch_admin(True)  # else when one ends (admin_done)

    def render_metrics(self) -> bytes:
        metrics = self.metrics
        tunnels = [c for c in self.connections if isinstance(c, Tunnel)]
        metrics.tunnels_open = len(tunnels)
        metrics.connections_open = len(self.connections) - len(tunnels)
        # Live tunnels count their bytes so far, so that the totals move while they run.
        live_up = sum(t.c2b.moved for t in tunnels)
        live_down = sum(t.b2c.moved for t in tunnels)
        metrics.bytes_client_to_backend += live_up
        metrics.bytes_backend_to_client += live_down
        try:
            return metrics.render()
        finally:
            metrics.bytes_client_to_backend -= live_up
            metrics.bytes_backend_to_client -= live_down

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.draining and self.worker is not None:
            # A worker gets one stop twice when systemd signals the whole control group
            # (KillMode=control-group) or Ctrl-C reaches the process group: from there and
            # from the supervisor. Only the supervisor says when to stop at once.
            log.info(
                "worker %d: %s received again while draining; still draining", self.worker, name
            )
            return
        if self.draining:
            log.info(
                "%s received while draining; stopping now: closing %d connection(s) still open",
                name,
                len(self.connections),
            )
            self.loop.stop()
            return
        drain = self.config.drain_timeout
        log.info(
            "%s received; draining: no new connections, requests finish, tunnels get %gs "
            "(--drain-timeout); send it again to stop at once",
            name,
            drain,
        )
        self.draining = True
        self.notifier.stopping(self._status())
        self.close_listeners()
        for connection in list(self.connections):
            connection.drain()
        if not self.connections:
            self.loop.stop()
            return
        self.drain_timer = self.loop.call_later(drain, self._drain_over)

    def _on_stop_now_signal(self, _signum: int) -> None:
        """A worker told by its supervisor to stop at once (a second stop signal there)."""
        log.info(
            "worker %s: stopping now: closing %d connection(s) still open",
            self.worker,
            len(self.connections),
        )
        self.loop.stop()

    def _on_reopen_signal(self, _signum: int) -> None:
        """SIGUSR1, as nginx: the access log reopened (logrotate), nothing else."""
        self._reopen_access_log()
        log.info("SIGUSR1: access log reopened")

    def _drain_over(self) -> None:
        log.info("drain time over: closing %d connection(s) still open", len(self.connections))
        self.loop.stop()

    def close_listeners(self) -> None:
        self._accept_off()
        while self.listening:
            self._remove_listener(len(self.listening) - 1)

    def stop(self) -> None:
        self.close_listeners()
        if self.admin_timer is not None:
            self.admin_timer.cancel()
            self.admin_timer = None
        self._watch_admin(False)
        for sock in self.admin:
            sock.close()
        self.admin.clear()
        left = len(self.connections)
        for connection in list(self.connections):
            connection.shutdown()
        self.connections.clear()
        self.pipes.close()
        self.later_keepalive.close()
        self.notifier.close()
        self._close_serving_fd()
        self.access.close()
        self.loop.close()
        # The last line: that the process ended as asked, not by a crash or a kill.
        who = "rawproxy" if self.worker is None else f"worker {self.worker}"
        log.info(
            "%s (pid %d) stopped%s",
            who,
            os.getpid(),
            f"; {left} connection(s) were still open and are closed" if left else "",
        )


def inherited_listener(name: str, sock: socket.socket, config: Config) -> Listener:
    """A socket systemd passed, as a listener; StartupError when its name asks for TLS and
    there is no certificate to serve it with."""
    tls = tls_of_name(name)
    if tls and not config.certs:
        raise StartupError(
            f"the socket systemd passed as {name!r} (FileDescriptorName=) is a TLS listener, "
            "but no certificate is configured: add --cert/--key, or name it tcp"
        )
    with contextlib.suppress(OSError):
        address = sock.getsockname()
        if isinstance(address, tuple):
            _passed_ports.add(address[1])
    return f"systemd:{name}", [sock], tls


def tls_of_name(name: str) -> bool | None:
    """A socket-activated listener's kind from its FileDescriptorName=: tls..., or
    tcp.../plain.../http..., else TLS exactly when certificates are configured."""
    lowered = name.lower()
    if lowered.startswith(("tls", "https")):
        return True
    if lowered.startswith(("tcp", "plain", "http")):
        return False
    return None


class AdminRequest:
    """One request to the admin listener, answered and closed. Small and bounded: the head
    must fit in 8 KiB and arrive within 5 seconds."""

    __slots__ = ("buffer", "fd", "server", "sock", "timer")

    LIMIT = 8192

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer = bytearray()
        sock.setblocking(False)
        server.loop.add(self.fd, READ, self._on_read)
        self.timer: Timer | None = server.loop.call_later(5.0, self.abort)
        server.admin_open += 1

    def _on_read(self, _mask: int) -> None:
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not data:
            self.abort()
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer and b"\n\n" not in self.buffer:
            if len(self.buffer) > self.LIMIT:
                self._answer(431, b"head too large\n")
            return
        line = bytes(self.buffer).split(b"\n", 1)[0].strip().split()
        if len(line) != 3 or line[0] not in (b"GET", b"HEAD"):
            self._answer(405 if len(line) == 3 else 400, b"GET /metrics or GET /healthz\n")
            return
        path = line[1].split(b"?", 1)[0]
        if path == b"/metrics":
            self._answer(200, self.server.render_metrics(), CONTENT_TYPE, head=line[0] == b"HEAD")
        elif path == b"/healthz":
            if self.server.draining:
                self._answer(503, b"draining\n")
            else:
                self._answer(200, b"ok\n", head=line[0] == b"HEAD")
        else:
            self._answer(404, b"GET /metrics or GET /healthz\n")

    def _answer(
        self, status: int, body: bytes, content_type: str = "text/plain", head: bool = False
    ) -> None:
        reasons = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            503: "Service Unavailable",
        }
        response = (
            f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + (b"" if head else body)
        # One non-blocking send: a fresh socket's buffer takes a metrics page whole, and the
        # loop never waits on a scraper (one that reads too slowly gets a short answer).
        with contextlib.suppress(OSError):
            self.sock.send(response)
            self.sock.shutdown(socket.SHUT_WR)
        self.abort()

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fd >= 0:
            self.server.loop.remove(self.fd)
            self.sock.close()
            self.fd = -1
            self.server.admin_done()
