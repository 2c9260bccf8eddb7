"""What the load goes through: DIRECT (straight to the backend), rawproxy, and the peers
found installed (HAProxy, nginx, Apache, Caddy), each with a config generated here.

Every proxy gets the same port scheme, certificates and backend, runs in the foreground as
a child of the harness, single worker, pinned to the proxy CPU:

- HAProxy: `haproxy -f CFG -db`, `nbthread 1`;
- nginx: `nginx -p DIR -c CFG -e LOG -g 'daemon off;'`, `worker_processes 1` (master +
  one worker: CPU and memory are summed over both);
- Apache: `apache2 -X -d DIR -f CFG` (one process, mpm_event threads), the classic
  mod_rewrite WebSocket recipe plus ProxyPass/ProxyPassReverse;
- Caddy: `caddy run --config CFG --adapter caddyfile` with GOMAXPROCS=1.

Legs: `plain` (client and backend plain), `tls-client` (TLS from the client, plain backend),
`tls-both` (TLS on both legs, the backend's certificate verified against the run's CA for
the name `localhost`). DIRECT in the TLS legs is the client speaking TLS to the TLS backend.

Settings beyond each program's defaults, the same for all where they exist: backend
keep-alive (nginx `keepalive 64`, Caddy's idle pool 64; HAProxy and Apache pool by default),
no cap on requests per keep-alive connection, tunnel/read timeouts of an hour, no access log,
X-Forwarded-For added (rawproxy, Apache and Caddy add it by default).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.pki import Pki
from benchmarks.procs import Managed, Placement, nofile_limit, wait_port

LEGS = ("plain", "tls-client", "tls-both")
REPO = Path(__file__).resolve().parent.parent
APACHE_MODULES = Path("/usr/lib/apache2/modules")


@dataclass
class Setup:
    leg: str
    port: int  # where the target listens
    backend_port: int  # the plain backend
    tls_backend_port: int | None  # the TLS backend (tls-both, and DIRECT in the TLS legs)
    pki: Pki | None
    workdir: Path
    placement: Placement
    max_conns: int  # client connections (tunnels) the workload opens at most

    @property
    def client_tls(self) -> bool:
        return self.leg != "plain"

    @property
    def upstream_port(self) -> int:
        if self.leg == "tls-both":
            assert self.tls_backend_port is not None
            return self.tls_backend_port
        return self.backend_port

    @property
    def upstream_tls(self) -> bool:
        return self.leg == "tls-both"

    def need_pki(self) -> Pki:
        assert self.pki is not None, "TLS leg without certificates"
        return self.pki


class Running:
    """A started target: where to send load, and which processes to account."""

    def __init__(self, name: str, port: int, managed: Managed | None) -> None:
        self.name = name
        self.port = port
        self.managed = managed

    def pids(self) -> list[int]:
        return self.managed.pids() if self.managed else []

    def check_alive(self) -> None:
        if self.managed and not self.managed.alive():
            raise RuntimeError(f"{self.name} died: {self.managed.log_tail(3)}")

    def stop(self) -> None:
        if self.managed:
            self.managed.stop()


class Target:
    name = "?"
    binary: str | None = None
    is_proxy = True
    is_peer = True
    start_timeout = 20.0

    def path(self) -> str | None:
        if self.binary is None:
            return None
        return shutil.which(self.binary) or next(
            (
                str(Path(d) / self.binary)
                for d in ("/usr/sbin", "/usr/bin", "/sbin")
                if (Path(d) / self.binary).exists()
            ),
            None,
        )

    def available(self) -> bool:
        return self.path() is not None

    def supports(self, leg: str) -> bool:
        return True

    def version(self) -> str:
        return "?"

    def argv(self, setup: Setup) -> tuple[list[str], dict[str, str] | None]:
        raise NotImplementedError

    def start(self, setup: Setup) -> Running:
        setup.workdir.mkdir(parents=True, exist_ok=True)
        argv, env = self.argv(setup)
        managed = Managed(
            self.name,
            setup.placement.proxy(argv),
            setup.workdir / f"{self.name}.log",
            env=env,
            cwd=setup.workdir,
        )
        try:
            wait_port(setup.port, managed.proc, self.start_timeout, self.name)
        except Exception as e:
            managed.stop()
            raise RuntimeError(f"{e}: {managed.log_tail(4)}") from e
        return Running(self.name, setup.port, managed)


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "?"


class Direct(Target):
    name = "DIRECT"
    is_proxy = False
    is_peer = False

    def available(self) -> bool:
        return True

    def version(self) -> str:
        return "client straight to the backend"

    def start(self, setup: Setup) -> Running:
        port = setup.tls_backend_port if setup.client_tls else setup.backend_port
        assert port is not None
        return Running(self.name, port, None)


class RawProxy(Target):
    name = "rawproxy"
    is_peer = False

    def __init__(self) -> None:
        self.source = REPO  # the directory put first on PYTHONPATH
        self.label = ""  # e.g. "git HEAD (8f8bd46)" when --rawproxy-rev exported a revision
        self._help: str | None = None

    def help_text(self) -> str:
        if self._help is None:
            env = dict(os.environ, PYTHONPATH=str(self.source))
            done = subprocess.run(
                [sys.executable, "-m", "rawproxy", "--help"],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            self._help = done.stdout
        return self._help

    def available(self) -> bool:
        return True

    def version(self) -> str:
        code = "import rawproxy, sys; print(rawproxy.__version__, rawproxy.__file__)"
        env = dict(os.environ, PYTHONPATH=str(self.source))
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
        )
        version = done.stdout.split()[0] if done.stdout.strip() else "?"
        if self.label:
            return f"rawproxy {version} ({self.label}), Python {sys.version.split()[0]}"
        commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "rawproxy"])
        where = "working tree"
        if re.fullmatch(r"[0-9a-f]+", commit):
            where += f" at git {commit}" + (", rawproxy/ modified" if dirty != "?" else "")
        return f"rawproxy {version} ({where}), Python {sys.version.split()[0]}"

    def argv(self, setup: Setup) -> tuple[list[str], dict[str, str] | None]:
        argv = [sys.executable, "-m", "rawproxy", "--listen", f"127.0.0.1:{setup.port}"]
        argv += ["--log-level", "warning"]
        if setup.client_tls:
            pki = setup.need_pki()
            argv += ["--cert", str(pki.cert), "--key", str(pki.key)]
        if setup.upstream_tls:
            argv += ["--backend", f"https://localhost:{setup.upstream_port}"]
            argv += ["--backend-ca", str(setup.need_pki().ca)]
        else:
            argv += ["--backend", f"127.0.0.1:{setup.upstream_port}"]
        argv += ["--max-connections", str(max(10000, setup.max_conns + 100))]
        if "--workers" in self.help_text():
            argv += ["--workers", "1"]  # one event loop, no supervisor (the default today)
        env = dict(os.environ, PYTHONPATH=str(self.source))
        return argv, env


class Relay(Target):
    """The reference row: `benchtool relay`, a TCP relay in C with nothing of a proxy (no
    HTTP, no timeouts, no limits, no logs), in one epoll loop like every target here. What it
    reaches is the ceiling of any proxy on this machine and placement; it is no peer (not in
    the best-peer ratio). Plain legs only: a relay cannot terminate TLS."""

    name = "relay"
    is_peer = False

    def __init__(self) -> None:
        self.tool: Path | None = None  # the compiled benchtool (set by the runner)
        self.mode = "copy"

    def available(self) -> bool:
        return self.tool is not None

    def supports(self, leg: str) -> bool:
        return leg == "plain"

    def version(self) -> str:
        how = "recv/send, 1 MiB buffers" if self.mode == "copy" else "splice, 1 MiB pipes"
        return f"benchtool relay --mode {self.mode} (C, one epoll loop, {how}; no HTTP)"

    def argv(self, setup: Setup) -> tuple[list[str], dict[str, str] | None]:
        assert self.tool is not None
        argv = [str(self.tool), "relay", "--port", str(setup.port)]
        return [*argv, "--backend-port", str(setup.upstream_port), "--mode", self.mode], None


class HAProxy(Target):
    name = "haproxy"
    binary = "haproxy"

    def version(self) -> str:
        return _first_line([self.path() or "haproxy", "-v"])

    def argv(self, setup: Setup) -> tuple[list[str], dict[str, str] | None]:
        # HAProxy refuses to start when 2 x maxconn (+ a margin) exceeds the fd limit.
        maxconn = min(setup.max_conns + 1000, (nofile_limit() - 300) // 2)
        bind = f"bind 127.0.0.1:{setup.port}"
        if setup.client_tls:
            bind += f" ssl crt {setup.need_pki().combined} alpn http/1.1"
        server = f"server app 127.0.0.1:{setup.upstream_port}"
        if setup.upstream_tls:
            server += (
                f" ssl verify required ca-file {setup.need_pki().ca}"
                " sni str(localhost) verifyhost localhost"
            )
        config = f"""\
global
    nbthread 1
    maxconn {maxconn}
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    option forwardfor
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout tunnel 1h

frontend fe
    {bind}
    maxconn {maxconn}
    default_backend be

backend be
    {server}
"""
        path = setup.workdir / "haproxy.cfg"
        path.write_text(config)
        return [self.path() or "haproxy", "-f", str(path), "-db"], None


class Nginx(Target):
    name = "nginx"
    binary = "nginx"

    def version(self) -> str:
        return _first_line([self.path() or "nginx", "-v"]).replace("nginx version: ", "")

    def argv(self, setup: Setup) -> tuple[list[str], dict[str, str] | None]:
        d = setup.workdir
        # As many connections as descriptors: nginx starts closing connections that wait
        # for a request once fewer than 1/16 of worker_connections are free.
        nofile = nofile_limit()
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(exist_ok=True)
        listen = f"listen 127.0.0.1:{setup.port}{' ssl' if setup.client_tls else ''};"
        tls_server = ""
        if setup.client_tls:
            pki = setup.need_pki()
            tls_server = f"""
        ssl_certificate {pki.cert};
        ssl_certificate_key {pki.key};
        ssl_protocols TLSv1.2 TLSv1.3;"""
        scheme = "https" if setup.upstream_tls else "http"
        tls_upstream = ""
        if setup.upstream_tls:
            tls_upstream = f"""
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {setup.need_pki().ca};
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;"""
        config = f"""\
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections {nofile - 50};
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000000;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    upstream app {{
        server 127.0.0.1:{setup.upstream_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}

    server {{
        {listen}{tls_server}

        location / {{
            proxy_pass {scheme}://app;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;{tls_upstream}
        }}
    }}
}}
"""
        path = d / "nginx.conf"
        path.write_text(config)
        argv = [self.path() or "nginx", "-p", f"{d}/", "-c", str(path), "-e", f"{d}/error.log"]
        return [*argv, "-g", "daemon off;"], None


class Apache(Target):
    name = "apache2"
    binary = "apache2"

    def version(self) -> str:
        return _first_line([self.path() or "apache2", "-v"]).replace("Server version: ", "")

    def argv(self, setup: Setup) -> tuple[list[str], dict[str, str] | None]:
        d = setup.workdir
        mods = ["mpm_event", "authz_core", "proxy", "proxy_http", "proxy_wstunnel", "rewrite"]
        if setup.client_tls or setup.upstream_tls:
            mods += ["ssl", "socache_shmcb"]
        load = "\n".join(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so" for m in mods)
        # A thread per connection being served; keep-alive and (async) tunnels may not need
        # one each, but a worker must never be the limit.
        threads = setup.max_conns + 64
        user = ""
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("www-data")
                user = "User www-data\nGroup www-data"
            except KeyError:
                user = "User nobody\nGroup nogroup"
        # mod_ssl checks the backend's name against DNS names only (not IP addresses):
        # the TLS backend is addressed as localhost, which must resolve to 127.0.0.1.
        host = "localhost" if setup.upstream_tls else "127.0.0.1"
        upstream = f"{host}:{setup.upstream_port}"
        http, ws = ("https", "wss") if setup.upstream_tls else ("http", "ws")
        tls_vhost = ""
        if setup.client_tls:
            pki = setup.need_pki()
            tls_vhost += f"""
    SSLEngine on
    SSLCertificateFile {pki.cert}
    SSLCertificateKeyFile {pki.key}
    SSLProtocol -all +TLSv1.2 +TLSv1.3"""
        if setup.upstream_tls:
            tls_vhost += f"""
    SSLProxyEngine on
    SSLProxyVerify require
    SSLProxyCACertificateFile {setup.need_pki().ca}
    SSLProxyCheckPeerName on"""
        config = f"""\
ServerRoot "{d}"
ServerName localhost
DefaultRuntimeDir "{d}"
PidFile "{d}/httpd.pid"
ErrorLog "{d}/error.log"
LogLevel warn
Mutex file:{d} default
{user}
{load}

Listen 127.0.0.1:{setup.port}
ThreadLimit {threads}
ThreadsPerChild {threads}
ServerLimit 1
StartServers 1
MaxRequestWorkers {threads}
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 60
Timeout 3600
ProxyTimeout 3600
{"SSLSessionCache shmcb:" + str(d) + "/ssl_scache(512000)" if "ssl" in mods else ""}

<VirtualHost 127.0.0.1:{setup.port}>{tls_vhost}
    RewriteEngine on
    RewriteCond %{{HTTP:Upgrade}} websocket [NC]
    RewriteCond %{{HTTP:Connection}} upgrade [NC]
    RewriteRule ^/?(.*) "{ws}://{upstream}/$1" [P,L]
    ProxyPass / {http}://{upstream}/
    ProxyPassReverse / {http}://{upstream}/
</VirtualHost>
"""
        path = d / "apache2.conf"
        path.write_text(config)
        os.chmod(d, 0o755)
        return [self.path() or "apache2", "-X", "-d", str(d), "-f", str(path)], None


class Caddy(Target):
    name = "caddy"
    binary = "caddy"

    def version(self) -> str:
        return "caddy " + _first_line([self.path() or "caddy", "version"])

    def argv(self, setup: Setup) -> tuple[list[str], dict[str, str] | None]:
        d = setup.workdir
        scheme = "https" if setup.client_tls else "http"
        tls_site = ""
        if setup.client_tls:
            pki = setup.need_pki()
            tls_site = f"\n    tls {pki.cert} {pki.key}"
        upstream = f"127.0.0.1:{setup.upstream_port}"
        transport = ""
        if setup.upstream_tls:
            upstream = f"https://{upstream}"
            transport = f"""
            tls_trusted_ca_certs {setup.need_pki().ca}
            tls_server_name localhost"""
        config = f"""\
{{
    admin off
    auto_https off
    storage file_system {d}/data
    default_sni localhost
    servers {{
        protocols h1
    }}
}}

{scheme}://:{setup.port} {{
    bind 127.0.0.1{tls_site}
    reverse_proxy {upstream} {{
        transport http {{
            keepalive_idle_conns 64
            keepalive_idle_conns_per_host 64{transport}
        }}
    }}
}}
"""
        path = d / "Caddyfile"
        path.write_text(config)
        env = dict(
            os.environ,
            GOMAXPROCS="1",
            HOME=str(d),
            XDG_DATA_HOME=str(d / "data"),
            XDG_CONFIG_HOME=str(d / "config"),
        )
        return [self.path() or "caddy", "run", "--config", str(path), "--adapter", "caddyfile"], env


ALL_TARGETS: list[Target] = [
    Direct(),
    RawProxy(),
    Relay(),
    HAProxy(),
    Nginx(),
    Apache(),
    Caddy(),
]
PEER_PACKAGES = {"haproxy": "haproxy", "nginx": "nginx", "apache2": "apache2", "caddy": "caddy"}
