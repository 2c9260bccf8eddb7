"""The command line: flags into a Config, --help, exit codes.

Exit codes: 0 after a clean stop (SIGTERM, SIGINT), 1 when the proxy cannot start (the
reason is printed as one line), 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import NoReturn

from rawproxy import __version__
from rawproxy.config import CertPair, Config, ConfigError, parse_backend, parse_listen

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
  --backend [SCHEME://]HOST[:PORT]
                           http:// and ws:// speak plain TCP (default port 80); https:// and
                           wss:// speak TLS (default port 443); with no scheme, port 443 means
                           TLS. The name is resolved once, at start-up.

TLS: clients get TLS 1.2 or newer, ALPN http/1.1 only. The backend's certificate is verified
against the system store (or --backend-ca) for the backend host name (or --backend-sni), which
is also sent as SNI; a failed verification is a 502 naming the reason.

durations are seconds (2.5) or take a unit: 500ms, 10s, 5m, 1h.
sizes are bytes or take a unit: 16k, 64KiB, 1M, 1MiB.

errors rawproxy answers itself:
  400  malformed request, or framing a backend could read differently (request smuggling)
  408  request head not complete within --header-timeout
  431  request head larger than --max-header-size
  502  backend refused, unreachable, reset, or sent an invalid answer
  504  backend sent no response within --response-timeout
Each is one line in the log; other clients are not affected.

signals:
  SIGTERM, SIGINT   stop: close the listeners and every connection, exit 0
  SIGHUP            re-read the --cert/--key files for new connections; open connections and
                    tunnels keep theirs; a broken file keeps the old certificate (logged)

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


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 65536, 64KiB, 1M)")
    unit = (match.group(2) or "").lower()
    factor = 1024 if unit.startswith("k") else 1024 * 1024 if unit.startswith("m") else 1
    value = int(match.group(1)) * factor
    if value < 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1024 bytes")
    return value


def parse_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def parse_seconds(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds")
    return int(text)


def _listen_arg(text: str) -> object:
    try:
        return parse_listen(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _backend_arg(text: str) -> object:
    try:
        return parse_backend(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not the usage block: the message names the flag and what is wrong.
        self.exit(2, f"rawproxy: error: {message} (see rawproxy --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rawproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rawproxy {__version__}")
    where = parser.add_argument_group("where")
    where.add_argument(
        "--listen",
        metavar="[HOST]:PORT",
        action="append",
        type=_listen_arg,
        required=True,
        help="accept clients here; repeat for several addresses (required)",
    )
    where.add_argument(
        "--backend",
        metavar="[SCHEME://]HOST[:PORT]",
        type=_backend_arg,
        required=True,
        help="forward every request and upgrade here (required)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--cert",
        metavar="FILE",
        action="append",
        default=[],
        help="PEM certificate (the file may hold the chain) for TLS listeners; "
        "repeat with --key for several certificates chosen by SNI, the first "
        "being the default",
    )
    tls.add_argument(
        "--key",
        metavar="FILE",
        action="append",
        default=[],
        help="PEM private key of the --cert given in the same position",
    )
    tls.add_argument(
        "--backend-tls",
        dest="backend_tls",
        action="store_const",
        const=True,
        default=None,
        help="speak TLS to the backend whatever its scheme and port say",
    )
    tls.add_argument(
        "--no-backend-tls",
        dest="backend_tls",
        action="store_const",
        const=False,
        help="speak plain TCP to the backend, even on port 443",
    )
    tls.add_argument(
        "--backend-ca",
        metavar="FILE",
        help="verify the backend's certificate against this PEM CA file instead of "
        "the system store",
    )
    tls.add_argument(
        "--backend-sni",
        metavar="NAME",
        help="the name sent as SNI and checked in the backend's certificate "
        "(default: the --backend host)",
    )
    tls.add_argument(
        "--backend-insecure",
        action="store_true",
        help="do not verify the backend's certificate (logged loudly; for tests and emergencies)",
    )
    tls.add_argument(
        "--backend-cert",
        metavar="FILE",
        help="client certificate (PEM) to present to the backend (mutual TLS)",
    )
    tls.add_argument("--backend-key", metavar="FILE", help="private key of --backend-cert")
    timeouts = parser.add_argument_group("timeouts")
    timeouts.add_argument(
        "--header-timeout",
        metavar="SECONDS",
        type=parse_positive_duration,
        default=10.0,
        help="a request head must arrive completely within this time of its "
        "first byte (of the connection, for the first request); slow "
        "heads get 408 (default: 10)",
    )
    timeouts.add_argument(
        "--connect-timeout",
        metavar="SECONDS",
        type=parse_positive_duration,
        default=5.0,
        help="the backend must accept a connection within this time, else 502 (default: 5)",
    )
    timeouts.add_argument(
        "--response-timeout",
        metavar="SECONDS",
        type=parse_positive_duration,
        default=60.0,
        help="the backend must start its response within this time after the "
        "request, else 504; also the longest silence allowed while a body "
        "streams (default: 60)",
    )
    timeouts.add_argument(
        "--idle-timeout",
        metavar="SECONDS",
        type=parse_positive_duration,
        default=60.0,
        help="a kept-alive client connection with no request is closed after "
        "this time (default: 60)",
    )
    timeouts.add_argument(
        "--tunnel-idle-timeout",
        metavar="SECONDS",
        type=parse_optional_duration,
        default=None,
        help="close an upgraded connection (WebSocket) silent in both "
        "directions for this long (default: none; dead peers are found "
        "by --tcp-keepalive instead)",
    )
    timeouts.add_argument(
        "--tcp-keepalive",
        metavar="SECONDS",
        type=parse_seconds,
        default=60,
        help="TCP keepalive probes on both legs of a tunnel after this much "
        "silence, so dead peers are found without cutting quiet "
        "WebSockets; 0 turns them off (default: 60)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-header-size",
        metavar="BYTES",
        type=parse_size,
        default=64 * 1024,
        help="largest request or response head; larger requests get 431 (default: 64KiB)",
    )
    limits.add_argument(
        "--max-connections",
        metavar="N",
        type=parse_count,
        default=10000,
        help="client connections (tunnels included) open at once; more wait "
        "in the kernel's listen backlog (default: 10000)",
    )
    limits.add_argument(
        "--no-splice",
        dest="splice",
        action="store_false",
        help="copy tunnel bytes through a buffer instead of moving them with "
        "splice(2) between plain TCP sockets (slower; for troubleshooting)",
    )
    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="debug adds one line per upgrade decision, naming the Connection and "
        "Upgrade values that decided it (default: info: one line per request "
        "and per tunnel)",
    )
    return parser


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    if len(args.cert) != len(args.key):
        parser.error(
            f"{len(args.cert)} --cert but {len(args.key)} --key: give them in pairs, "
            "--cert FILE --key FILE"
        )
    certs = tuple(CertPair(cert, key) for cert, key in zip(args.cert, args.key, strict=True))
    if any(where.tls for where in args.listen) and not certs:
        parser.error("a tls:// listener needs a certificate: add --cert FILE --key FILE")
    if (args.backend_cert is None) != (args.backend_key is None):
        parser.error("--backend-cert and --backend-key go together")
    client_pair = (
        CertPair(args.backend_cert, args.backend_key) if args.backend_cert is not None else None
    )
    return Config(
        listen=tuple(args.listen),
        backend=args.backend,
        certs=certs,
        backend_tls=args.backend_tls,
        backend_ca=args.backend_ca,
        backend_sni=args.backend_sni,
        backend_insecure=args.backend_insecure,
        backend_client_cert=client_pair,
        header_timeout=args.header_timeout,
        connect_timeout=args.connect_timeout,
        response_timeout=args.response_timeout,
        idle_timeout=args.idle_timeout,
        tunnel_idle_timeout=args.tunnel_idle_timeout,
        tcp_keepalive=args.tcp_keepalive,
        max_header_size=args.max_header_size,
        max_connections=args.max_connections,
        log_level=args.log_level,
        splice=args.splice,
    )


def setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    setup_logging(config.log_level)
    from rawproxy.server import Server, StartupError

    try:
        server = Server(config)
        server.open()
    except StartupError as e:
        print(f"rawproxy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    server.run()
    return 0
