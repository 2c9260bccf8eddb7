"""The command line: flags into a Config, --help, exit codes.

Exit codes: 0 after a clean stop (SIGTERM, SIGINT), 1 when the proxy cannot start (the
reason is printed as one line), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable
from typing import Any, NoReturn

from rawproxy import __version__, systemd
from rawproxy.config import (
    FORWARDED_MODES,
    CertPair,
    Config,
    ConfigError,
    Route,
    parse_backend,
    parse_cidr,
    parse_listen,
    parse_rewrite,
    parse_route,
)

DESCRIPTION = """\
rawproxy is an HTTP/1.1 reverse proxy that gets WebSockets right. Every request that reaches a
listener is forwarded to the backend. A request whose Connection header lists the token
"upgrade" (in any case, in any position, on any of its lines) and that carries an Upgrade header
is forwarded as an upgrade; when the backend answers 101 Switching Protocols, rawproxy stops
speaking HTTP on that connection and moves bytes both ways untouched until either side closes.
No list of WebSocket paths is needed, and every browser's handshake comes through.
"""

EPILOG = """\
addresses:
  --listen [HOST]:PORT     :8080 listens on every interface, IPv4 and IPv6; 127.0.0.1:8080
                           and [::1]:8080 on one address. Port 0 picks a free port (logged).
                           tls://[HOST]:PORT and tcp://[HOST]:PORT choose TLS or plain TCP
                           explicitly; a bare [HOST]:PORT is TLS exactly when --cert is given.
  --backend [SCHEME://]HOST[:PORT][/PATH]
                           http:// and ws:// speak plain TCP (default port 80); https:// and
                           wss:// speak TLS (default port 443); with no scheme, port 443 means
                           TLS. The name is resolved once, at start-up. Shorthand for
                           --route /=URL.
  --route PREFIX=URL       requests whose path starts with PREFIX go to URL, the longest
                           prefix winning; no route: 404. Without a path in URL the request
                           target is sent unchanged; with one, PREFIX is replaced by it:
                           --route /api/=http://127.0.0.1:9001/ sends /api/x as /x (Apache's
                           ProxyPass /api/ http://127.0.0.1:9001/). WebSockets work on every
                           route, with nothing to configure.

responses: Location, Content-Location and URI headers pointing at the backend's own origin
(or at the Host it was sent) are rewritten to the origin the client used, as Apache's
ProxyPassReverse does (--no-rewrite-location turns it off); --cookie-domain and --cookie-path
rewrite Set-Cookie attributes.

forwarded headers: X-Forwarded-For/-Proto/-Host/-Port and/or RFC 7239 Forwarded (--forwarded).
What a client sends of them is dropped, unless its address is a --trusted-proxy: then they are
extended, so a chain of proxies reports the real client.

config file: --config FILE (TOML) takes every flag as a key spelled the same without the
dashes (lists for repeatable flags, [[route]] tables with prefix and backend, [[certificate]]
tables with cert and key, rewrite-location = false, splice = false); flags override the file.
rawproxy --check-config FILE prints the effective configuration and exits.

TLS: clients get TLS 1.2 or newer, ALPN http/1.1 only. The backend's certificate is verified
against the system store (or --backend-ca) for the backend host name (or --backend-sni), which
is also sent as SNI; a failed verification is a 502 naming the reason.

durations are seconds (2.5) or take a unit: 500ms, 10s, 5m, 1h.
sizes are bytes or take a unit: 16k, 64KiB, 1M, 1MiB.

errors rawproxy answers itself:
  400  malformed request, or framing a backend could read differently (request smuggling)
  408  request head not complete within --header-timeout
  431  request head larger than --max-header-size, or with more header fields than
       --max-header-count
  502  backend refused, unreachable, reset, or sent an invalid answer
  504  backend sent no response within --response-timeout
Each is one line in the log; other clients are not affected.

signals:
  SIGTERM, SIGINT   drain and stop: listeners close at once, requests under way finish,
                    tunnels get --drain-timeout, then exit 0; a second signal stops at once
  SIGHUP            re-read the config file (--config) and the certificates for new
                    connections; listeners added or removed (with --workers: only at a
                    restart); a kept-alive connection follows at its next request, open
                    tunnels keep what they started with; an error keeps the old ones
                    (logged)

examples:
  rawproxy --listen :8080 --backend 127.0.0.1:9000
  python -m rawproxy --listen 127.0.0.1:8080 --backend http://app.internal:9000 --log-level debug
"""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^\s*(\d+)\s*(k|kb|kib|m|mb|mib)?\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 10, 2.5, 500ms, 5m)")
    value = float(match.group(1))
    unit = (match.group(2) or "s").lower()
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def parse_positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def parse_optional_duration(text: str) -> float | None:
    if text.strip().lower() in ("none", "off", "0"):
        return None
    return parse_positive_duration(text)


MAX_HEADER_SIZE = 1024 * 1024


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 65536, 64KiB, 1M)")
    unit = (match.group(2) or "").lower()
    factor = 1024 if unit.startswith("k") else 1024 * 1024 if unit.startswith("m") else 1
    value = int(match.group(1)) * factor
    if value < 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1024 bytes")
    if value > MAX_HEADER_SIZE:
        # What one connection may hold of an unfinished head: 100 GB was accepted.
        raise argparse.ArgumentTypeError(
            f"{text!r}: at most 1MiB (heads that large are an attack or a bug; nginx's and "
            "HAProxy's defaults are 8-32 KiB)"
        )
    return value


def parse_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def parse_workers(text: str) -> int:
    if text.strip() == "auto":
        return os.cpu_count() or 1
    if not text.strip().isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number from 1 to 256, or auto")
    return int(text)


# Linux refuses TCP_KEEPIDLE above this (MAX_TCP_KEEPIDLE, about 9 hours).
MAX_KEEPALIVE = 32767


def parse_keepalive(text: str) -> int:
    """--tcp-keepalive: a duration like the others, in whole seconds (the socket option's
    unit, rounded up), 0 for off, at most what the kernel takes: a larger value used to be
    refused by setsockopt without a word, leaving the kernel's 2 hours in place."""
    value = math.ceil(parse_duration(text))
    if value > MAX_KEEPALIVE:
        raise argparse.ArgumentTypeError(
            f"{text!r}: at most {MAX_KEEPALIVE} seconds (about 9h, the most Linux takes for "
            "TCP keepalive), or 0 for off"
        )
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not the usage block: the message names the flag and what is wrong.
        self.exit(2, f"rawproxy: error: {message} (see rawproxy --help)\n")


def _for_flag(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A converter for argparse: our errors become argparse's, message intact."""

    def flag(text: str) -> Any:
        try:
            return convert(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    flag.__name__ = convert.__name__
    return flag


# Every setting: dest -> (converter of one text value, is a list, default). The file and the
# command line go through the same converters; the file's keys are the dests with dashes.
LIST = True
SETTINGS: dict[str, tuple[Callable[[str], Any] | None, bool, Any]] = {
    "listen": (parse_listen, LIST, []),
    "backend": (parse_backend, False, None),
    "route": (parse_route, LIST, []),
    "cert": (str, LIST, []),
    "key": (str, LIST, []),
    "backend_tls": (None, False, None),
    "backend_ca": (str, False, None),
    "backend_sni": (str, False, None),
    "backend_insecure": (None, False, False),
    "backend_cert": (str, False, None),
    "backend_key": (str, False, None),
    "header_timeout": (parse_positive_duration, False, 10.0),
    "connect_timeout": (parse_positive_duration, False, 5.0),
    "response_timeout": (parse_positive_duration, False, 60.0),
    "idle_timeout": (parse_positive_duration, False, 60.0),
    "drain_timeout": (parse_duration, False, 30.0),
    "tunnel_idle_timeout": (parse_optional_duration, False, None),
    "tcp_keepalive": (parse_keepalive, False, 60),
    "max_header_size": (parse_size, False, 64 * 1024),
    "max_header_count": (parse_count, False, 100),
    "max_connections": (parse_count, False, 10000),
    "splice": (None, False, True),
    "forwarded": (None, False, "x-forwarded"),
    "trusted_proxy": (parse_cidr, LIST, []),
    "rewrite_location": (None, False, True),
    "backend_host_header": (None, False, False),
    "cookie_domain": (lambda t: parse_rewrite(t, "--cookie-domain"), LIST, []),
    "cookie_path": (lambda t: parse_rewrite(t, "--cookie-path"), LIST, []),
    "log_level": (None, False, "info"),
    "access_log": (str, False, None),
    "admin_listen": (parse_listen, False, None),
    "accept_proxy_protocol": (None, False, False),
    "workers": (parse_workers, False, 1),
    "send_proxy_protocol": (None, False, None),
    "access_log_format": (None, False, "combined"),
}
CHOICES = {
    "forwarded": FORWARDED_MODES,
    "log_level": ("debug", "info", "warning", "error"),
    "access_log_format": ("combined", "json"),
    "send_proxy_protocol": ("v1", "v2"),
}
# Settings naming files: relative paths in a config file are relative to that file.
FILE_PATHS = {"cert", "key", "backend_ca", "backend_cert", "backend_key", "access_log"}
BOOLEANS = {
    "accept_proxy_protocol",
    "backend_tls",
    "backend_insecure",
    "splice",
    "rewrite_location",
    "backend_host_header",
}


def build_parser() -> argparse.ArgumentParser:
    # No defaults here: what is absent from the namespace was not given, so that a config
    # file's value stands (SETTINGS holds the defaults).
    parser = _Parser(
        prog="rawproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )

    def add(group: Any, flag: str, help: str, **kw: Any) -> None:
        dest = kw.get("dest", flag.lstrip("-").replace("-", "_"))
        convert, many, _ = SETTINGS[dest]
        if "action" not in kw:
            kw["action"] = "append" if many else "store"
            if convert is not None:
                kw["type"] = _for_flag(convert)
        group.add_argument(flag, help=help, **kw)

    parser.add_argument("--version", action="version", version=f"rawproxy {__version__}")
    files = parser.add_argument_group("configuration file")
    files.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from this TOML file; flags given on the command line override it",
    )
    files.add_argument(
        "--check-config",
        metavar="FILE",
        help="validate FILE (with any flags given), print the effective "
        "configuration as TOML and exit (0 when valid)",
    )
    where = parser.add_argument_group("where")
    add(
        where,
        "--listen",
        "accept clients here; repeat for several addresses (required)",
        metavar="[tls://|tcp://][HOST]:PORT",
    )
    add(
        where,
        "--backend",
        "forward every request and upgrade here (shorthand for --route /=URL)",
        metavar="[SCHEME://]HOST[:PORT][/PATH]",
    )
    add(
        where,
        "--route",
        "send requests whose path starts with PREFIX to URL; repeatable, the longest prefix wins",
        metavar="PREFIX=URL",
    )
    http = parser.add_argument_group("HTTP")
    add(
        http,
        "--forwarded",
        "which forwarded headers to send: X-Forwarded-For/-Proto/-Host/-Port, "
        "RFC 7239 Forwarded, both, or none (default: x-forwarded)",
        choices=FORWARDED_MODES,
    )
    add(
        http,
        "--trusted-proxy",
        "a client address or network (CIDR) whose forwarded headers are "
        "extended instead of dropped; repeatable",
        metavar="CIDR",
    )
    add(
        http,
        "--no-rewrite-location",
        "leave Location, Content-Location and URI headers as the backend sent them",
        dest="rewrite_location",
        action="store_false",
    )
    add(
        http,
        "--accept-proxy-protocol",
        "every listener expects a PROXY protocol v1 or v2 header first (behind an L4 balancer "
        "such as HAProxy in TCP mode), only from --trusted-proxy addresses; the client address "
        "it carries is then the client, and a v2 header's SSL TLV makes its scheme https",
        action="store_true",
    )
    add(
        http,
        "--send-proxy-protocol",
        "send a PROXY protocol header with the client's address to the backend first (v2 "
        "also says whether the client spoke TLS: the SSL TLV)",
        choices=("v1", "v2"),
    )
    add(
        http,
        "--backend-host-header",
        "send the backend's own host[:port] as Host instead of "
        "the client's (Apache's default without ProxyPreserveHost)",
        action="store_true",
    )
    add(
        http,
        "--cookie-domain",
        "rewrite Set-Cookie Domain=FROM to TO (repeatable)",
        metavar="FROM=TO",
    )
    add(
        http,
        "--cookie-path",
        "rewrite a Set-Cookie Path starting with FROM to start with TO (repeatable)",
        metavar="FROM=TO",
    )
    tls = parser.add_argument_group("TLS")
    add(
        tls,
        "--cert",
        "PEM certificate (the file may hold the chain) for TLS listeners; repeat "
        "with --key for several certificates chosen by SNI, the first being the default",
        metavar="FILE",
    )
    add(tls, "--key", "PEM private key of the --cert given in the same position", metavar="FILE")
    # One or the other: given both, the last would silently win.
    backend_tls = tls.add_mutually_exclusive_group()
    add(
        backend_tls,
        "--backend-tls",
        "speak TLS to the backend whatever its scheme and port say",
        action="store_const",
        const=True,
    )
    add(
        backend_tls,
        "--no-backend-tls",
        "speak plain TCP to the backend, even on port 443",
        dest="backend_tls",
        action="store_const",
        const=False,
    )
    add(
        tls,
        "--backend-ca",
        "verify the backend's certificate against this PEM CA file instead of the system store",
        metavar="FILE",
    )
    add(
        tls,
        "--backend-sni",
        "the name sent as SNI and checked in the backend's certificate (default: the backend host)",
        metavar="NAME",
    )
    add(
        tls,
        "--backend-insecure",
        "do not verify the backend's certificate (logged loudly; for tests and emergencies)",
        action="store_true",
    )
    add(
        tls,
        "--backend-cert",
        "client certificate (PEM) to present to the backend (mutual TLS)",
        metavar="FILE",
    )
    add(tls, "--backend-key", "private key of --backend-cert", metavar="FILE")
    timeouts = parser.add_argument_group("timeouts")
    add(
        timeouts,
        "--header-timeout",
        "a request head must arrive completely within this time of "
        "its first byte (of the connection, for the first request); slow heads get 408 "
        "(default: 10)",
        metavar="SECONDS",
    )
    add(
        timeouts,
        "--connect-timeout",
        "the backend must accept a connection within this time, else 502 (default: 5)",
        metavar="SECONDS",
    )
    add(
        timeouts,
        "--response-timeout",
        "the backend must start its response within this time "
        "after the request, else 504; also the longest silence allowed while a body streams "
        "(default: 60)",
        metavar="SECONDS",
    )
    add(
        timeouts,
        "--idle-timeout",
        "a kept-alive client connection with no request is closed after this time (default: 60)",
        metavar="SECONDS",
    )
    add(
        timeouts,
        "--drain-timeout",
        "on SIGTERM, open tunnels (WebSockets) get this long to finish before they are "
        "closed; requests under way finish first either way (default: 30)",
        metavar="SECONDS",
    )
    add(
        timeouts,
        "--tunnel-idle-timeout",
        "close an upgraded connection (WebSocket) silent in "
        "both directions for this long (default: none; dead peers are found by --tcp-keepalive "
        "instead)",
        metavar="SECONDS",
    )
    add(
        timeouts,
        "--tcp-keepalive",
        "TCP keepalive probes on both legs of a tunnel after this "
        "much silence, so dead peers are found without cutting quiet WebSockets; 0 turns them "
        "off; at most 32767 (default: 60)",
        metavar="SECONDS",
    )
    limits = parser.add_argument_group("limits")
    add(
        limits,
        "--max-header-size",
        "largest request or response head; a larger request gets 431, a larger "
        "response 502 (default: 64KiB; at most 1MiB)",
        metavar="BYTES",
    )
    add(
        limits,
        "--max-header-count",
        "most header fields in a request head; more get 431, as with HAProxy's "
        "tune.http.maxhdr and Apache's LimitRequestFields (default: 100)",
        metavar="N",
    )
    add(
        limits,
        "--max-connections",
        "client connections (tunnels included) open at once, per worker. At the limit a "
        "new client takes the place of the connection that waited longest for a request: "
        "kept alive between requests, or connected a second or more without sending one "
        "(a browser's spare connection); never a tunnel or a request under way. As in "
        "nginx. With none idle, new clients wait in the kernel's listen backlog. Lowered,"
        " with a warning at start-up, to what the file descriptor limit carries (2 a "
        "connection, and some for splice pipes; rawproxy raises its soft limit to the "
        "hard one, and root's hard limit to what is needed) "
        "(default: 10000)",
        metavar="N",
    )
    add(
        limits,
        "--workers",
        "event-loop processes sharing the listeners, supervised (a worker that dies is "
        "restarted; signals are passed on); auto = one per CPU; the admin listener of worker N "
        "is on its port + N (default: 1)",
        metavar="N|auto",
    )
    add(
        limits,
        "--no-splice",
        "copy tunnel bytes through a buffer instead of moving them with "
        "splice(2) between plain TCP sockets (slower; for troubleshooting)",
        dest="splice",
        action="store_false",
    )
    logs = parser.add_argument_group("logging")
    add(
        logs,
        "--log-level",
        "debug adds one line per upgrade decision, naming the Connection and "
        "Upgrade values that decided it (default: info: one line per request and per tunnel)",
        choices=CHOICES["log_level"],
    )
    add(
        logs,
        "--admin-listen",
        "serve /metrics (Prometheus text format, every name rawproxy_*) and /healthz (200, or "
        "503 while draining) here; keep it on loopback or a management network",
        metavar="[HOST]:PORT",
    )
    add(
        logs,
        "--access-log",
        "write the access log (one line per request, one per tunnel when it closes) to FILE, "
        "reopened on SIGHUP for logrotate (default: stderr, with the rest of the log)",
        metavar="FILE",
    )
    add(
        logs,
        "--access-log-format",
        "combined (Apache's, the tunnel's duration, bytes each way and ending appended) or "
        "json, one object per line (default: combined)",
        choices=CHOICES["access_log_format"],
    )
    return parser


# -- the configuration file -------------------------------------------------------------------


def _file_value(path: str, key: str, dest: str, value: Any) -> Any:
    """Convert one value of the file with the converter the flag uses."""
    convert, many, _ = SETTINGS[dest]

    def bad(message: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {message}")

    if dest in BOOLEANS:
        if not isinstance(value, bool):
            raise bad(f"expected true or false, got {value!r}")
        return value
    if dest in CHOICES:
        if value not in CHOICES[dest]:
            raise bad(f"expected one of {', '.join(CHOICES[dest])}, got {value!r}")
        return value
    assert convert is not None
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise bad(f"expected one value, got a list {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise bad(f"expected a string or a number, got {item!r}")
        try:
            out.append(convert(str(item)))
        except (ConfigError, argparse.ArgumentTypeError) as e:
            raise bad(str(e)) from e
    return out if many else out[0]


def _check_table(path: str, where: str, table: dict[str, Any], keys: tuple[str, ...]) -> None:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ConfigError(
            f"{path}: {where}: unknown key {unknown[0]!r} (this table has {' and '.join(keys)}; "
            "top-level settings go before the first [[...]] table)"
        )
    for name in keys:
        if not isinstance(table.get(name), str):
            raise ConfigError(f"{path}: {where}: {name} is required, as a string")


def load_config_file(path: str) -> dict[str, Any]:
    """The settings a TOML file gives, by dest; ConfigError naming the file and key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file") from e
    except PermissionError as e:
        raise ConfigError(f"{path}: permission denied") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 (byte {e.start}); a TOML file must be saved as UTF-8"
        ) from e
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from e
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key == "route" and isinstance(value, list) and value and isinstance(value[0], dict):
            routes = []
            for index, table in enumerate(value):
                where = f"route[{index}]"
                if not isinstance(table, dict):
                    raise ConfigError(f"{path}: {where}: a route table has prefix and backend")
                _check_table(path, where, table, ("prefix", "backend"))
                try:
                    routes.append(parse_route(f"{table['prefix']}={table['backend']}"))
                except ConfigError as e:
                    raise ConfigError(f"{path}: {where}: {e}") from e
            settings["route"] = routes
            continue
        if key == "certificate":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(f"{path}: certificate: use [[certificate]] tables")
            for index, table in enumerate(value):
                _check_table(path, f"certificate[{index}]", table, ("cert", "key"))
            base = os.path.dirname(os.path.abspath(path))
            settings.setdefault("cert", []).extend(os.path.join(base, t["cert"]) for t in value)
            settings.setdefault("key", []).extend(os.path.join(base, t["key"]) for t in value)
            continue
        dest = key.replace("-", "_")
        if key.startswith("no-") and key[3:].replace("-", "_") in BOOLEANS:
            raise ConfigError(
                f"{path}: {key}: write {key[3:]} = false (the file says yes or no to a setting; "
                f"--{key} is the command line's way of saying {key[3:]} = false)"
            )
        if dest not in SETTINGS or "_" in key:
            raise ConfigError(
                f"{path}: {key}: unknown setting (keys are the flag names "
                "without the dashes, e.g. header-timeout)"
            )
        converted = _file_value(path, key, dest, value)
        if dest in FILE_PATHS:
            # Relative to the file, not to whatever directory the service starts in.
            base = os.path.dirname(os.path.abspath(path))
            if isinstance(converted, list):
                converted = [os.path.join(base, p) for p in converted]
            else:
                converted = os.path.join(base, converted)
        if SETTINGS[dest][1] and dest in settings:
            settings[dest].extend(converted)
        else:
            settings[dest] = converted
    return settings


# -- settings into a Config ----------------------------------------------------------------


def build_config(settings: dict[str, Any], activated: bool = False) -> Config:
    """Validate the merged settings; ConfigError says what is wrong. `activated`: systemd
    passes listening sockets, so --listen may be left out."""
    merged = {dest: default for dest, (_, _, default) in SETTINGS.items()}
    merged.update(settings)
    if not merged["listen"] and not activated:
        raise ConfigError("--listen is required (or listen = [...] in the config file)")
    listens = [(where.host, where.port) for where in merged["listen"] if where.port]
    twice = sorted(
        {str(w) for w in merged["listen"] if w.port and listens.count((w.host, w.port)) > 1}
    )
    if twice:
        raise ConfigError(f"--listen {twice[0]} given twice: each address can be listened on once")
    routes: list[Route] = list(merged["route"])
    if merged["backend"] is not None:
        if any(route.prefix == "/" for route in routes):
            raise ConfigError("--backend and a route for / both given: use one of them")
        routes.append(Route("/", merged["backend"]))
    if not routes:
        raise ConfigError("--backend or --route is required")
    # Prefixes are compared as requests are matched against them: `/api/`, `/%61pi/` and
    # `//api/` are one prefix (http.route_prefix), and only one of such routes would ever
    # be chosen.
    from rawproxy.http import route_prefix  # here: --help and --version need no h11

    matched: dict[bytes, list[str]] = {}
    for route in routes:
        matched.setdefault(route_prefix(route.prefix), []).append(route.prefix)
    clashes = [sorted(set(same)) for same in matched.values() if len(same) > 1]
    if clashes:
        raise ConfigError(
            "more than one route for "
            + ", ".join(" and ".join(same) for same in sorted(clashes))
            + (" (a request matches them alike)" if any(len(same) > 1 for same in clashes) else "")
        )
    certs, keys = merged["cert"], merged["key"]
    if len(certs) != len(keys):
        raise ConfigError(
            f"{len(certs)} --cert but {len(keys)} --key: give them in pairs, --cert FILE --key FILE"
        )
    pairs = tuple(CertPair(c, k) for c, k in zip(certs, keys, strict=True))
    if any(where.tls for where in merged["listen"]) and not pairs:
        raise ConfigError("a tls:// listener needs a certificate: add --cert FILE --key FILE")
    if (merged["backend_cert"] is None) != (merged["backend_key"] is None):
        raise ConfigError("--backend-cert and --backend-key go together")
    client_pair = (
        CertPair(merged["backend_cert"], merged["backend_key"])
        if merged["backend_cert"] is not None
        else None
    )
    return Config(
        listen=tuple(merged["listen"]),
        routes=tuple(routes),
        certs=pairs,
        backend_tls=merged["backend_tls"],
        backend_ca=merged["backend_ca"],
        backend_sni=merged["backend_sni"],
        backend_insecure=merged["backend_insecure"],
        backend_client_cert=client_pair,
        header_timeout=merged["header_timeout"],
        connect_timeout=merged["connect_timeout"],
        response_timeout=merged["response_timeout"],
        idle_timeout=merged["idle_timeout"],
        drain_timeout=merged["drain_timeout"],
        tunnel_idle_timeout=merged["tunnel_idle_timeout"],
        tcp_keepalive=merged["tcp_keepalive"],
        max_header_size=merged["max_header_size"],
        max_header_count=merged["max_header_count"],
        max_connections=merged["max_connections"],
        log_level=merged["log_level"],
        access_log=merged["access_log"],
        admin_listen=merged["admin_listen"],
        accept_proxy_protocol=merged["accept_proxy_protocol"],
        workers=merged["workers"],
        send_proxy_protocol=merged["send_proxy_protocol"],
        access_log_format=merged["access_log_format"],
        splice=merged["splice"],
        forwarded=merged["forwarded"],
        trusted_proxies=tuple(merged["trusted_proxy"]),
        rewrite_location=merged["rewrite_location"],
        backend_host_header=merged["backend_host_header"],
        cookie_domains=tuple(merged["cookie_domain"]),
        cookie_paths=tuple(merged["cookie_path"]),
    )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if value is None:
        return '"none"'
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def describe_config(config: Config) -> str:
    """The effective configuration, as a TOML file that --config reads back."""
    lines = ["# effective rawproxy configuration"]
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    lines.append(f"listen = {_toml([_listen_text(w) for w in values.pop('listen')])}")
    routes = values.pop("routes")
    certs = values.pop("certs")
    client_pair = values.pop("backend_client_cert")
    renames = {
        "trusted_proxies": "trusted-proxy",
        "cookie_domains": "cookie-domain",
        "cookie_paths": "cookie-path",
    }
    for name, value in values.items():
        key = renames.get(name, name.replace("_", "-"))
        if name == "admin_listen" and value is not None:
            value = _listen_text(value)
        elif name in ("cookie_domains", "cookie_paths"):
            value = [f"{a}={b}" for a, b in value]
        elif name == "trusted_proxies":
            value = [str(n) for n in value]
        elif value is None:
            if name == "tunnel_idle_timeout":
                value = "none"
            else:
                lines.append(f"# {key} not set")
                continue
        lines.append(f"{key} = {_toml(value)}")
    if client_pair is not None:
        lines.append(f"backend-cert = {_toml(client_pair.cert)}")
        lines.append(f"backend-key = {_toml(client_pair.key)}")
    for pair in certs:
        lines += ["", "[[certificate]]", f"cert = {_toml(pair.cert)}", f"key = {_toml(pair.key)}"]
    for route in routes:
        lines += [
            "",
            "[[route]]",
            f"prefix = {_toml(route.prefix)}",
            f"backend = {_toml(str(route.backend))}",
        ]
    return "\n".join(lines) + "\n"


def _listen_text(where: Any) -> str:
    scheme = {True: "tls://", False: "tcp://", None: ""}[where.tls]
    host = "" if where.host is None else (f"[{where.host}]" if ":" in where.host else where.host)
    return f"{scheme}{host}:{where.port}"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
    )


def load_settings(args: argparse.Namespace, activated: bool = False) -> tuple[Config, str | None]:
    """Config from the file (if any) and the flags; which file it came from."""
    given = vars(args).copy()
    path = given.pop("check_config", None) or given.pop("config", None)
    given.pop("config", None)
    settings = load_config_file(path) if path else {}
    settings.update(given)  # flags win; a repeated flag replaces the file's list
    try:
        return build_config(settings, activated), path
    except ConfigError as e:
        if path and not str(e).startswith(path):
            raise ConfigError(f"{path}: {e}") from e
        raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    checking = getattr(args, "check_config", None) is not None
    activated = systemd.activated() and not checking
    try:
        # A file checked for a socket-activated service has no listen (rawproxy.socket
        # brings the listeners): valid, with a note below.
        config, path = load_settings(args, activated or checking)
    except ConfigError as e:
        print(f"rawproxy: error: {e}", file=sys.stderr)
        return 1 if checking or getattr(args, "config", None) else 2
    if checking:
        from rawproxy.server import check_config

        try:
            check_config(config)
        except ConfigError as e:
            print(f"rawproxy: error: {path}: {e}", file=sys.stderr)
            return 1
        sys.stdout.write(describe_config(config))
        if not config.listen:
            print(
                "rawproxy: note: no listen address: valid for socket activation only "
                "(rawproxy.socket passes the listeners); otherwise add --listen or "
                "listen = [...]",
                file=sys.stderr,
            )
        return 0
    setup_logging(config.log_level)
    from rawproxy.server import (
        Server,
        StartupError,
        descriptors_needed,
        raise_nofile_limit,
        warn_if_descriptors_short,
    )

    def reread() -> Config:
        return load_settings(args, activated)[0]

    try:
        inherited = systemd.listen_fds()
    except systemd.ActivationError as e:
        print(f"rawproxy: error: {e}", file=sys.stderr)
        return 1
    # Before any worker forks: each inherits the raised limit (and the supervisor says once,
    # as the single process does once it listens, whether --max-connections fits it).
    raise_nofile_limit(descriptors_needed(config, len(inherited)))
    if config.workers > 1:
        from rawproxy.workers import run_workers

        try:
            return run_workers(config, reread, inherited, config.workers)
        except StartupError as e:
            print(f"rawproxy: error: {e}", file=sys.stderr)
            return 1
    try:
        server = Server(config, reread=reread, inherited=inherited)
        server.open()
        server.open_admin()
        warn_if_descriptors_short(config, len(inherited))
    except StartupError as e:
        print(f"rawproxy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    server.run()
    return 0
