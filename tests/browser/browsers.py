"""Headless Chromium and Firefox ESR (the Debian packages), started as plain processes.

Each launch gets a fresh directory holding its HOME, its profile and its log, removed at
`stop()`. Both browsers trust the tests' trustme CA through an NSS database made with
`certutil` (libnss3-tools): Firefox reads the one in its profile directory, Chromium the one
in `$HOME/.pki/nssdb`. Nothing is downloaded and nothing is meant to leave loopback:
Chromium gets the flags that turn its background services off and a host resolver that
resolves nothing but localhost and 127.0.0.1; Firefox a user.js that turns off updates,
telemetry, captive portal and connectivity checks, safebrowsing, push, DNS over HTTPS and
prefetching, sets no proxy, and points Remote Settings at a loopback port that refuses
connections. (Checked with `strace -f -e trace=connect,sendto,sendmmsg`: Firefox then connects
to 127.0.0.1 only; Chromium connects UDP sockets to 2001:4860:4860::8888 to learn whether
IPv6 is routable, which sends nothing.)

A browser that cannot be found or started raises `BrowserUnavailable`, whose message says
why; the tests turn it into a failure (never a skip).

`stop()` sends SIGTERM to the browser's process group (it is started in a session of its
own, so the group's and the session's ID is its PID), then SIGKILL, and kills by PID any
process of its session that left the group, all before the browser's own process is reaped
(so that none of these IDs can have been reused by then).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

STOP_TIMEOUT = 5.0
VERSION_TIMEOUT = 30.0

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-default-browser-check",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
    "--no-pings",
    "--no-proxy-server",
    "--password-store=basic",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]

FIREFOX_PREFS: dict[str, bool | int | str] = {
    # updates, of Firefox, add-ons, search engines and plug-ins
    "app.update.disabledForTesting": True,
    "app.update.auto": False,
    "app.update.checkInstallTime": False,
    "extensions.update.enabled": False,
    "extensions.getAddons.cache.enabled": False,
    "extensions.systemAddon.update.enabled": False,
    "extensions.blocklist.enabled": False,
    "browser.search.update": False,
    "media.gmp-manager.updateEnabled": False,
    "media.gmp-gmpopenh264.enabled": False,
    # telemetry, studies, reporting
    "toolkit.telemetry.enabled": False,
    "toolkit.telemetry.unified": False,
    "toolkit.telemetry.archive.enabled": False,
    "toolkit.telemetry.server": "data:,",
    "datareporting.healthreport.uploadEnabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.policy.firstRunURL": "",
    "app.normandy.enabled": False,
    "app.normandy.api_url": "",
    "app.shield.optoutstudies.enabled": False,
    "browser.crashReports.unsubmittedCheck.autoSubmit2": False,
    "browser.ping-centre.telemetry": False,
    "browser.newtabpage.activity-stream.telemetry": False,
    "browser.newtabpage.activity-stream.feeds.telemetry": False,
    # network checks and background connections
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    "network.trr.mode": 5,  # DNS over HTTPS off
    "network.dns.disablePrefetch": True,
    "network.prefetch-next": False,
    "network.predictor.enabled": False,
    "network.http.speculative-parallel-limit": 0,
    "network.proxy.type": 0,  # direct, whatever the environment says
    "network.http.http3.enable": False,
    "browser.safebrowsing.malware.enabled": False,
    "browser.safebrowsing.phishing.enabled": False,
    "browser.safebrowsing.downloads.enabled": False,
    "browser.safebrowsing.downloads.remote.enabled": False,
    "browser.safebrowsing.blockedURIs.enabled": False,
    "browser.safebrowsing.provider.google4.updateURL": "",
    "browser.safebrowsing.provider.mozilla.updateURL": "",
    # "services.settings.server" (Remote Settings) is set per launch: a refused loopback port
    "security.remote_settings.crlite_filters.enabled": False,
    "security.remote_settings.intermediates.enabled": False,
    "security.OCSP.enabled": 0,
    "security.certerrors.mitm.priming.enabled": False,
    "security.enterprise_roots.enabled": False,
    "dom.push.connection.enabled": False,
    "dom.push.serverURL": "",
    "geo.provider.network.url": "",
    "browser.region.network.url": "",
    "browser.region.update.enabled": False,
    "identity.fxaccounts.enabled": False,
    "browser.topsites.contile.enabled": False,
    "browser.newtabpage.enabled": False,
    "browser.newtabpage.activity-stream.feeds.topsites": False,
    "browser.newtabpage.activity-stream.feeds.section.topstories": False,
    "browser.newtabpage.activity-stream.feeds.system.topstories": False,
    "browser.newtabpage.activity-stream.default.sites": "",
    "browser.discovery.enabled": False,
    "extensions.pocket.enabled": False,
    "browser.uitour.enabled": False,
    "browser.urlbar.suggest.quicksuggest.sponsored": False,
    # first run, session restore, https upgrades
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.startup.firstrunSkipsHomepage": True,
    "startup.homepage_welcome_url": "about:blank",
    "startup.homepage_welcome_url.additional": "",
    "browser.aboutwelcome.enabled": False,
    "browser.sessionstore.resume_from_crash": False,
    "toolkit.startup.max_resumed_crashes": -1,
    "dom.security.https_first": False,
    "dom.security.https_only_mode": False,
}


class BrowserUnavailable(RuntimeError):
    """The browser cannot be used here; the message says why (and what to install)."""


@dataclasses.dataclass(frozen=True)
class BrowserKind:
    name: str  # "chromium" | "firefox"
    command: str  # the Debian package's command
    package: str

    def executable(self) -> str:
        path = shutil.which(self.command)
        if path is None:
            raise BrowserUnavailable(
                f"{self.command} not found on PATH: install the Debian package "
                f"(apt-get install -y {self.package} libnss3-tools)"
            )
        return path


KINDS = {
    "chromium": BrowserKind("chromium", "chromium", "chromium"),
    "firefox": BrowserKind("firefox", "firefox-esr", "firefox-esr"),
}


@functools.cache
def browser_version(name: str) -> str:
    """`chromium --version` / `firefox-esr --version`, e.g. "Chromium 156.0.8078.79"."""
    kind = KINDS[name]
    exe = kind.executable()
    with tempfile.TemporaryDirectory(prefix=f"rawproxy-{name}-version-") as home:
        try:
            done = subprocess.run(
                [exe, "--version"],
                capture_output=True,
                text=True,
                timeout=VERSION_TIMEOUT,
                env=_browser_env(Path(home)),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BrowserUnavailable(f"{exe} --version failed: {exc}") from None
    m = re.search(r"(Chromium|Mozilla Firefox) (\S+)", done.stdout)
    if done.returncode != 0 or m is None:
        raise BrowserUnavailable(
            f"{exe} --version exited {done.returncode}: {done.stdout.strip()} "
            f"{done.stderr.strip()[-500:]}"
        )
    return f"{m.group(1)} {m.group(2)}"


def _certutil() -> str:
    path = shutil.which("certutil")
    if path is None:
        raise BrowserUnavailable(
            "certutil not found: install the Debian package libnss3-tools (needed to make "
            "the browsers trust the test CA)"
        )
    return path


def make_nss_db(db_dir: Path, ca_file: Path) -> None:
    """A new NSS database in `db_dir` that trusts `ca_file` to identify web sites."""
    db_dir.mkdir(parents=True, exist_ok=True)
    certutil = _certutil()
    for args in (
        ["-N", "-d", f"sql:{db_dir}", "--empty-password"],
        ["-A", "-d", f"sql:{db_dir}", "-t", "C,,", "-n", "test-ca", "-i", str(ca_file)],
    ):
        done = subprocess.run(
            [certutil, *args],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if done.returncode != 0:
            raise BrowserUnavailable(
                f"certutil {' '.join(args)} exited {done.returncode}: "
                f"{(done.stdout + done.stderr).strip()}"
            )


def _browser_env(home: Path) -> dict[str, str]:
    """A minimal environment: a HOME of its own, no display, no proxy settings."""
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "TMPDIR": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "XDG_RUNTIME_DIR": str(home / "run"),
        "MOZ_CRASHREPORTER_DISABLE": "1",
        "MOZ_HEADLESS": "1",
    }
    (home / "run").mkdir(mode=0o700, exist_ok=True)
    return env


class RunningBrowser:
    """One headless browser showing `url`, with a new temporary directory for its HOME,
    profile and log."""

    version = ""  # "Chromium 156.0.8078.79", set by whoever knows it

    def __init__(self, name: str, url: str, ca_file: Path) -> None:
        self.kind = KINDS[name]
        self.name = name
        self.url = url
        exe = self.kind.executable()
        self.dir = Path(tempfile.mkdtemp(prefix=f"rawproxy-{name}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._refused: socket.socket | None = None
        self.log_path = self.dir / "browser.log"
        try:
            home = self.dir / "home"
            home.mkdir()
            env = _browser_env(home)
            if name == "chromium":
                make_nss_db(home / ".pki" / "nssdb", ca_file)
                profile = self.dir / "profile"
                argv = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url]
            else:
                profile = self.dir / "profile"
                profile.mkdir()
                make_nss_db(profile, ca_file)
                # Remote Settings ignores a changed server URL in release builds unless this
                # is set, and it falls back to its production server for a data: URL: send
                # it to a loopback port that refuses connections instead.
                env["MOZ_REMOTE_SETTINGS_DEVTOOLS"] = "1"
                self._refused = socket.socket()
                self._refused.bind(("127.0.0.1", 0))  # bound, never listening: refused
                refused_port = self._refused.getsockname()[1]
                prefs = {
                    **FIREFOX_PREFS,
                    "services.settings.server": f"http://127.0.0.1:{refused_port}/v1",
                }
                (profile / "user.js").write_text(
                    "".join(f"user_pref({_js(k)}, {_js(v)});\n" for k, v in prefs.items()),
                    encoding="utf-8",
                )
                argv = [exe, "--headless", "--new-instance", "--profile", str(profile), url]
            self.argv = argv
            self.started = time.monotonic()
            with open(self.log_path, "wb") as log:
                try:
                    self.proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        cwd=self.dir,
                        start_new_session=True,  # its own process group, killed as a whole
                    )
                except OSError as exc:
                    raise BrowserUnavailable(f"cannot start {exe}: {exc}") from None
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def exited(self) -> str | None:
        """None while the browser runs; otherwise why it is gone, with its log's tail. The
        browser's process is not reaped here, so its PID (its group's and session's ID)
        stays reserved until `stop()`."""
        if self.proc is None:
            return f"{self.name} was not started"
        code = self.proc.returncode
        if code is None:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is None:
                return None
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        return (
            f"{self.name} exited with code {code} before the page finished "
            f"({' '.join(self.argv)}); its output ends with:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> list[int]:
        """Stop the browser and every process it started; remove its directory. Returns the
        PIDs that had to be killed one by one, outside the browser's process group
        (normally none)."""
        leftovers: list[int] = []
        if self.proc is not None and self.proc.returncode is None:
            pid = self.proc.pid  # start_new_session: also the ID of its group and session
            # Until it is reaped (proc.wait below) the browser's PID cannot be reused, so
            # signalling its group and session reaches only processes it started.
            pidfd = os.pidfd_open(pid)
            try:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    _kill_group(pid, sig)
                    readable, _, _ = select.select([pidfd], [], [], STOP_TIMEOUT)
                    if readable:  # exited (not reaped)
                        break
                _kill_group(pid, signal.SIGKILL)  # helpers still in the group
                leftovers = _kill_session(pid)  # and any that made a group of their own
            finally:
                os.close(pidfd)
            self.proc.wait(STOP_TIMEOUT)
        if self._refused is not None:
            self._refused.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return leftovers


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _kill_session(sid: int) -> list[int]:
    """SIGKILL, by PID, every live process of session `sid` outside its leader's group
    (whose members, just killed, may still be on their way out); their PIDs."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == sid:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and int(fields[2]) != sid and fields[0] != "Z":
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


def _js(value: bool | int | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
