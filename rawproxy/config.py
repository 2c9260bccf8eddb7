"""Configuration values and the parsers for listener and backend addresses.

Pure functions: no sockets, no name resolution. Errors are `ConfigError` with a
message that says what is wrong and what a valid value looks like.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
TLS_SCHEMES = frozenset({"https", "wss"})


class ConfigError(ValueError):
    """A configuration value is wrong; the message is meant for the user."""


@dataclasses.dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to accept clients. host None means every interface (IPv4 and IPv6). tls None
    means "TLS exactly when certificates are given"."""

    host: str | None
    port: int
    tls: bool | None = None

    def __str__(self) -> str:
        if self.host is None:
            return f"*:{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class Backend:
    """Where requests go. `tls` says whether we speak TLS to it. `path`, when given, replaces
    the route's prefix in the request target (Apache's `ProxyPass /app/ http://b/`)."""

    scheme: str
    host: str
    port: int
    path: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme in TLS_SCHEMES

    @property
    def endpoint(self) -> tuple[str, str, int]:
        """Scheme, host and port as written: routes with the same share one backend (one
        connection target, whatever --backend-tls makes of the scheme)."""
        return self.scheme, self.host, self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path or ''}"


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Requests whose path starts with `prefix` go to `backend` (the longest prefix wins)."""

    prefix: str
    backend: Backend

    def __str__(self) -> str:
        return f"{self.prefix}={self.backend}"


FORWARDED_MODES = ("x-forwarded", "rfc7239", "both", "none")


@dataclasses.dataclass(frozen=True, slots=True)
class CertPair:
    cert: str
    key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[ListenAddress, ...]
    routes: tuple[Route, ...]
    certs: tuple[CertPair, ...] = ()
    backend_tls: bool | None = None  # None: decided by the --backend scheme (or port 443)
    backend_ca: str | None = None
    backend_sni: str | None = None
    backend_insecure: bool = False
    backend_client_cert: CertPair | None = None
    header_timeout: float = 10.0
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    idle_timeout: float = 60.0
    drain_timeout: float = 30.0
    tunnel_idle_timeout: float | None = None
    tcp_keepalive: int = 60
    max_header_size: int = 64 * 1024
    max_header_count: int = 100
    max_connections: int = 10000
    log_level: str = "info"
    access_log: str | None = None
    admin_listen: ListenAddress | None = None
    accept_proxy_protocol: bool = False
    workers: int = 1
    send_proxy_protocol: str | None = None
    access_log_format: str = "combined"
    splice: bool = True
    forwarded: str = "x-forwarded"
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    rewrite_location: bool = True
    backend_host_header: bool = False
    cookie_domains: tuple[tuple[str, str], ...] = ()
    cookie_paths: tuple[tuple[str, str], ...] = ()


def _split_host_port(text: str, what: str, example: str) -> tuple[str, str | None]:
    """Split `host:port`, `[v6]:port`, `host` or `[v6]` into (host, port-or-None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{what} {text!r}: missing ']' after an IPv6 address; {example}")
        host, rest = text[1:end], text[end + 1 :]
        if rest == "":
            return host, None
        if not rest.startswith(":"):
            raise ConfigError(f"{what} {text!r}: expected ':PORT' after ']'; {example}")
        return host, rest[1:]
    if text.count(":") > 1:
        raise ConfigError(f"{what} {text!r}: put an IPv6 address in brackets; {example}")
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def _parse_port(port: str, what: str, text: str, example: str, lowest: int = 1) -> int:
    if not port.isdigit() or not lowest <= int(port) < 65536:
        raise ConfigError(
            f"{what} {text!r}: port must be a number from {lowest} to 65535; {example}"
        )
    return int(port)


def parse_listen(text: str) -> ListenAddress:
    """Parse `--listen [tls://|tcp://][HOST]:PORT`; `:PORT` means every interface."""
    example = "use [tls://|tcp://][HOST]:PORT, e.g. :8080, 127.0.0.1:8080 or tls://[::1]:443"
    original = text
    text = text.strip()
    tls: bool | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() not in ("tls", "tcp"):
            raise ConfigError(
                f"--listen {original!r}: unknown scheme {scheme!r} (use tls:// or tcp://)"
            )
        tls = scheme.lower() == "tls"
    host, port = _split_host_port(text, "--listen", example)
    if port is None:
        raise ConfigError(f"--listen {original!r}: a port is required; {example}")
    # Port 0 asks the kernel for a free port; the proxy logs the one it got.
    return ListenAddress(
        host or None, _parse_port(port, "--listen", original, example, lowest=0), tls
    )


def parse_backend(text: str) -> Backend:
    """Parse `--backend [SCHEME://]HOST[:PORT]`.

    Without a scheme, port 443 means https and anything else http. Without a path the client's
    request target is forwarded unchanged; with one (even "/"), the route's prefix is replaced
    by it.
    """
    example = "use [SCHEME://]HOST[:PORT], e.g. 127.0.0.1:9000 or https://app.internal:443"
    original = text
    text = text.strip()
    scheme: str | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(
                f"--backend {original!r}: unknown scheme {scheme!r} (use http, https, ws or wss)"
            )
    end = min((i for i in (text.find(c) for c in "/?#") if i >= 0), default=len(text))
    authority, rest = text[:end], text[end:]
    if "@" in authority:
        # Never quoted as given: it would put a password in the journal.
        shown = original.strip().replace(authority[: authority.rindex("@")], "***", 1)
        raise ConfigError(
            f"--backend {shown!r}: a user name or password (user:password@) in a backend URL "
            "is not supported: rawproxy passes the client's Authorization header on unchanged "
            "and logs in to no backend itself; remove it"
        )
    path = rest or None
    if path is not None and (not path.startswith("/") or any(c in path for c in "?# \t")):
        raise ConfigError(
            f"--backend {original!r}: the URL may not hold a query (?), a fragment (#) or spaces"
        )
    host, port_text = _split_host_port(authority, "--backend", example)
    if not host:
        raise ConfigError(f"--backend {original!r}: a host is required; {example}")
    if host.isdigit():
        # The resolver reads "9000" as the IPv4 address 0.0.35.40; it was meant as a port.
        raise ConfigError(
            f"--backend {original!r}: {host!r} is no host name; for port {host} on this "
            f"machine write 127.0.0.1:{host}"
        )
    if port_text is None:
        port = DEFAULT_PORTS[scheme or "http"]
    else:
        port = _parse_port(port_text, "--backend", original, example)
    if scheme is None:
        scheme = "https" if port == 443 else "http"
    return Backend(scheme, host, port, path)


def parse_route(text: str) -> Route:
    """Parse `--route PREFIX=URL`, e.g. `/api/=http://127.0.0.1:9001/`."""
    prefix, sep, url = text.partition("=")
    prefix = prefix.strip()
    if not sep or not prefix.startswith("/"):
        raise ConfigError(
            f"--route {text!r}: use PREFIX=URL with a prefix starting with '/', "
            "e.g. /api/=http://127.0.0.1:9001"
        )
    unfit = _unmatchable(prefix)
    if unfit:
        raise ConfigError(f"--route {text!r}: no request could match this prefix: {unfit}")
    return Route(prefix, parse_backend(url))


def _unmatchable(prefix: str) -> str | None:
    """Why no request path can start with `prefix`, or None. A request's path is printable
    ASCII without `?` and `#` (which end it), and its dot segments are resolved before a
    route is chosen (http.resolve_request), so a prefix that breaks either rule would be
    accepted and then never get a request: every request meant for it would silently go to
    another route."""
    for char in prefix:
        if char in "?#":
            return f"{char!r} ends a request's path (the query or fragment follows it)"
        if not "!" <= char <= "~":
            return f"{char!r} is never in a request's path: percent-encode it (a space is %20)"
    segments = re.sub("%2e", ".", prefix, flags=re.IGNORECASE).split("/")
    if "." in segments or ".." in segments:
        return "its '.' or '..' segment is resolved away in every request before routing"
    return None


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as e:
        raise ConfigError(f"--trusted-proxy {text!r}: not an address or CIDR ({e})") from e


def parse_rewrite(text: str, what: str) -> tuple[str, str]:
    """Parse `FROM=TO` for --cookie-domain and --cookie-path."""
    old, sep, new = text.partition("=")
    if not sep or not old.strip():
        raise ConfigError(f"{what} {text!r}: use FROM=TO")
    return old.strip(), new.strip()
