"""TLS for the end-to-end tests' peers: certificates made with trustme, and `TlsStream`, a TLS
connection over a blocking socket that the helpers in `peers` can use like a socket.

`TlsStream` is built on `ssl.SSLObject` with memory BIOs rather than on `ssl.SSLSocket`,
because the tests need what SSLSocket cannot do: close one half of a TLS connection (send
close_notify and keep reading; or a TCP FIN with no close_notify at all), tell a peer's
close_notify from a bare EOF, and send half a ClientHello. It also lets one thread send while
another receives (the 64 MiB both-ways tests): OpenSSL calls are serialised by a lock that is
never held across socket I/O.

Nothing here imports `peers` (which imports this module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import select
import socket
import ssl
import threading
import time
from pathlib import Path

import trustme
from cryptography.hazmat.primitives import serialization

LOOPBACK = "127.0.0.1"
# A peer may half-close with a bare TCP FIN and still be sent to (OpenSSL 3 would otherwise
# fail the connection at that EOF); TlsStream still tells such an EOF from a close_notify.
IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
RAW_CHUNK = 256 * 1024
WRITE_CHUNK = 64 * 1024


class TlsStream:
    """A TLS connection over the blocking socket `raw`, used like a socket: `sendall`,
    `recv`, `recv_into`, `shutdown`, `settimeout`, `close`, `fileno`.

    `recv` returns b"" at the end of the peer's data, whether that was a close_notify
    (`got_close_notify`) or a TCP EOF without one (`truncated`). `shutdown(SHUT_WR)` sends
    close_notify and then a TCP FIN; `close_notify()` and `fin_only()` do one each.

    Sending after the peer's bare TCP EOF needs ssl.OP_IGNORE_UNEXPECTED_EOF on the context
    (OpenSSL 3 otherwise fails the connection); the `Pki` contexts set it."""

    def __init__(
        self,
        raw: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._ssl_lock = threading.Lock()  # every OpenSSL call and BIO access; never held on I/O
        self._send_lock = threading.Lock()  # keeps drained records in order on the socket
        self._plain = bytearray()  # decrypted, not yet returned by recv
        self._error: BaseException | None = None
        self.got_close_notify = False
        self.truncated = False  # a TCP EOF came without a close_notify
        self._raw_eof = False

    @classmethod
    def connect(
        cls,
        port: int,
        context: ssl.SSLContext,
        server_hostname: str | None = "localhost",
        timeout: float = 10.0,
        host: str = LOOPBACK,
    ) -> TlsStream:
        """Connect to host:port and complete the handshake (the socket is closed if it fails)."""
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            raw.settimeout(timeout)
            stream = cls(raw, context, server_hostname=server_hostname)
            stream.handshake()
        except BaseException:
            raw.close()
            raise
        return stream

    # --- handshake and facts about the session ---------------------------------------------

    def handshake(self) -> None:
        while True:
            with self._ssl_lock:
                try:
                    self.obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
            self._flush()
            if done:
                return
            chunk = self.raw.recv(RAW_CHUNK)
            with self._ssl_lock:
                if chunk:
                    self._in.write(chunk)
                else:
                    self._in.write_eof()  # the next do_handshake raises

    def peer_cert_der(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)

    def selected_alpn(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    def version(self) -> str | None:
        return self.obj.version()

    # --- receiving ----------------------------------------------------------------------------

    def _decrypt_locked(self) -> None:
        """Decrypt every complete record in the incoming BIO into `_plain` (under _ssl_lock).

        Eager, so that the BIO holds at most a partial record whenever close_notify() runs:
        OpenSSL's SSL_shutdown, as Python calls it, reads on from the BIO and fails on
        application data ("application data after close notify")."""
        while True:
            try:
                data = self.obj.read(RAW_CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._ended()
                return
            except ssl.SSLEOFError:
                self.truncated = True
                return
            except ssl.SSLError as exc:  # an alert from the peer, a bad record: raised by recv
                self._error = exc
                return
            if not data:  # the end (reported as b"" rather than raised once we sent ours)
                self._ended()
                return
            self._plain += data

    def _ended(self) -> None:
        # With OP_IGNORE_UNEXPECTED_EOF (see `Pki`), OpenSSL reports a bare TCP EOF like a
        # close_notify; a close_notify is processed as soon as its record arrives, so an end
        # seen only after the TCP EOF was fed in is a truncation.
        if self.got_close_notify or self.truncated:
            return
        if self._raw_eof:
            self.truncated = True
        else:
            self.got_close_notify = True

    @property
    def at_eof(self) -> bool:
        return self.got_close_notify or self.truncated

    def recv(self, n: int = 65536) -> bytes:
        while True:
            with self._ssl_lock:
                self._decrypt_locked()
                if self._plain:
                    out = bytes(self._plain[:n])
                    del self._plain[:n]
                    pending_out = self._out.pending
                    data: bytes | None = out
                elif self._error is not None:
                    raise self._error
                elif self.at_eof:
                    data = b""
                    pending_out = self._out.pending
                else:
                    data = None
                    pending_out = self._out.pending
            if pending_out:  # OpenSSL answered something while reading (rare in TLS 1.3)
                self._flush(blocking=False)
            if data is not None:
                return data
            if self._raw_eof:
                # EOF written to the BIO but OpenSSL reported neither close_notify nor EOF
                self.truncated = True
                return b""
            chunk = self.raw.recv(RAW_CHUNK)
            with self._ssl_lock:
                if chunk:
                    self._in.write(chunk)
                else:
                    self._raw_eof = True
                    self._in.write_eof()

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view))
        view[: len(data)] = data
        return len(data)

    def pending(self) -> int:
        """Decrypted bytes waiting to be returned by recv (a select() on the socket misses them)."""
        with self._ssl_lock:
            self._decrypt_locked()
            return len(self._plain)

    # --- sending ------------------------------------------------------------------------------

    def _flush(self, blocking: bool = True) -> None:
        """Send what OpenSSL queued in the outgoing BIO, in order. A non-blocking flush (from a
        reader) leaves it to whoever holds the send lock, which re-checks before letting go."""
        if not self._send_lock.acquire(blocking=blocking):
            return
        try:
            while True:
                with self._ssl_lock:
                    data = self._out.read()
                if not data:
                    return
                self.raw.sendall(data)
        finally:
            self._send_lock.release()

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), WRITE_CHUNK):
            with self._ssl_lock:
                self.obj.write(view[start : start + WRITE_CHUNK])
            self._flush()

    def send(self, data: bytes | bytearray | memoryview) -> int:
        self.sendall(data)
        return len(data)

    # --- closing ------------------------------------------------------------------------------

    def close_notify(self) -> None:
        """Send close_notify; the TCP connection stays open both ways and recv goes on."""
        with self._ssl_lock:
            self._decrypt_locked()
            # our close_notify is queued even when the peer's has not come (yet)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLEOFError, ssl.SSLSyscallError):
                self.obj.unwrap()
        self._flush()

    def fin_only(self) -> None:
        """A TCP FIN with no close_notify before it (a truncation, in TLS terms)."""
        self.raw.shutdown(socket.SHUT_WR)

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self.close_notify()
        self.raw.shutdown(how)

    def settimeout(self, timeout: float | None) -> None:
        self.raw.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self.raw.gettimeout()

    def setsockopt(self, *args: object) -> None:
        self.raw.setsockopt(*args)  # type: ignore[call-overload]

    def fileno(self) -> int:
        return self.raw.fileno()

    def getpeername(self) -> object:
        return self.raw.getpeername()

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> TlsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def raw_socket(stream: TlsStream | socket.socket) -> socket.socket:
    """The TCP socket under a client or backend stream (a TlsStream or a plain socket)."""
    return stream.raw if isinstance(stream, TlsStream) else stream


def tls_wait_closed(stream: TlsStream, timeout: float) -> tuple[str, bytes]:
    """Wait until the peer ends the connection: ("close_notify" | "eof" | "reset" | "error",
    bytes received meanwhile). "eof" is a TCP EOF without close_notify. Raises TimeoutError
    if it is still open after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    old = stream.gettimeout()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"TLS connection still open after {timeout} s")
            if not stream.pending():
                readable, _, _ = select.select([stream.raw], [], [], left)
                if not readable:
                    continue
            stream.settimeout(max(left, 0.01))
            try:
                chunk = stream.recv(65536)
            except ConnectionResetError:
                return "reset", bytes(got)
            except ssl.SSLError:
                return "error", bytes(got)
            if not chunk:
                return ("close_notify" if stream.got_close_notify else "eof"), bytes(got)
            got += chunk
    finally:
        stream.settimeout(old)


def client_hello(context: ssl.SSLContext, server_hostname: str | None = "localhost") -> bytes:
    """The bytes of the ClientHello `context` sends (made in memory, nothing connects).

    Raises ssl.SSLError if OpenSSL cannot build one (e.g. no protocol version allowed)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


# --- certificates ---------------------------------------------------------------------------


@dataclasses.dataclass
class CertFiles:
    """One certificate on disk: `cert` (PEM, leaf first, then any intermediates) and `key`."""

    name: str
    leaf: trustme.LeafCert
    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        """The leaf certificate, DER (what a peer's getpeercert(binary_form=True) returns)."""
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode())

    def configure(self, ctx: ssl.SSLContext) -> None:
        self.leaf.configure_cert(ctx)

    def write_encrypted_key(self, path: Path, traditional: bool = False) -> Path:
        """Write the key to `path` encrypted (see encrypt_key)."""
        return encrypt_key(self.key, path, traditional)


def cert_flags(*certs: CertFiles) -> list[str]:
    """--cert/--key for each certificate, in order (the first is the default)."""
    flags: list[str] = []
    for cert in certs:
        flags += ["--cert", str(cert.cert), "--key", str(cert.key)]
    return flags


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


class Pki:
    """Every certificate the TLS tests use, written once per session under `root`.

    - `ca`: the CA the clients (and the proxy, via --backend-ca `ca_file`) trust;
    - `server`, `server_b`: two certificates for localhost, 127.0.0.1 and ::1 from `ca`;
    - `chained`: the same names, from an intermediate CA; its file holds the chain;
    - `untrusted`: localhost/127.0.0.1/::1 from `other_ca`, which nobody trusts;
    - `other_name`: for other.test only; `expired`: localhost etc. but expired yesterday;
    - `app`: for app.test only (the --backend-sni test);
    - `a`, `b`, `wild`: a.test, b.test and *.wild.test (SNI selection); `pay_wild`:
      pay.wild.test, a name the wildcard covers too;
    - `client`: the proxy's client certificate for mutual TLS.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA(organization_name="rawproxy tests")
        self.other_ca = trustme.CA(organization_name="rawproxy tests, untrusted")
        self.intermediate = self.ca.create_child_ca()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.other_ca_file = root / "other-ca.pem"
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_file))
        now = datetime.datetime.now(datetime.UTC)

        self.server = self.issue("server", self.ca, *LOCAL_NAMES)
        self.server_b = self.issue("server-b", self.ca, *LOCAL_NAMES)
        self.chained = self.issue("chained", self.intermediate, *LOCAL_NAMES)
        self.untrusted = self.issue("untrusted", self.other_ca, *LOCAL_NAMES)
        self.other_name = self.issue("other-name", self.ca, "other.test")
        self.expired = self.issue(
            "expired",
            self.ca,
            *LOCAL_NAMES,
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
        self.app = self.issue("app", self.ca, "app.test")
        self.a = self.issue("a", self.ca, "a.test")
        self.b = self.issue("b", self.ca, "b.test")
        self.wild = self.issue("wild", self.ca, "*.wild.test")
        self.pay_wild = self.issue("pay-wild", self.ca, "pay.wild.test")
        self.client = self.issue("client", self.ca, "proxy-client.test")

    def issue(
        self,
        name: str,
        ca: trustme.CA,
        *identities: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertFiles:
        leaf = ca.issue_cert(
            *identities, common_name=identities[0], not_before=not_before, not_after=not_after
        )
        cert = self.root / f"{name}.pem"
        key = self.root / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return CertFiles(name, leaf, cert, key)

    # contexts

    def client_context(
        self,
        alpn: list[str] | None = None,
        check_hostname: bool = True,
        tolerate_bare_fin: bool = True,
    ) -> ssl.SSLContext:
        """A client context trusting `ca` only (not the system store). With
        `tolerate_bare_fin=False` it keeps OpenSSL 3's default: a TCP FIN without close_notify
        is an error that ends the connection both ways (as for most OpenSSL-based clients)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if tolerate_bare_fin:
            ctx.options |= IGNORE_UNEXPECTED_EOF
        self.ca.configure_trust(ctx)
        ctx.check_hostname = check_hostname
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def server_context(
        self,
        cert: CertFiles | None = None,
        require_client_cert: bool = False,
        tolerate_bare_fin: bool = True,
    ) -> ssl.SSLContext:
        """A backend's context serving `cert` (default `server`); with `require_client_cert`,
        the client must present a certificate from `ca`; `tolerate_bare_fin` as for
        `client_context`."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if tolerate_bare_fin:
            ctx.options |= IGNORE_UNEXPECTED_EOF
        (cert or self.server).configure(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx


def encrypt_key(source: Path, path: Path, traditional: bool = False) -> Path:
    """Write the PEM key at `source` to `path` (it may be the same file) encrypted with the
    passphrase "secret": PKCS#8 ("ENCRYPTED PRIVATE KEY"), or with `traditional` the older
    OpenSSL form (a Proc-Type: 4,ENCRYPTED header)."""
    key = serialization.load_pem_private_key(source.read_bytes(), password=None)
    form = serialization.PrivateFormat
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            form.TraditionalOpenSSL if traditional else form.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return path
