"""TLS contexts for both legs, and choosing a certificate by SNI.

Client side: TLS 1.2 at least, the ssl module's modern cipher list, ALPN `http/1.1` only (a
browser must not try HTTP/2 here), no renegotiation, no compression. Several certificate/key
pairs are told apart by the DNS names in their certificates (an exact name before a wildcard);
the first pair is the default.

Backend side: certificate verified against the system store or a given CA file, the name
checked and sent as SNI is the backend host or an override (without a trailing dot);
verification can be turned off.
"""

from __future__ import annotations

import os
import re
import ssl
from typing import NoReturn

from rawproxy.config import CertPair, ConfigError


class _EncryptedKey(Exception):
    """Raised by `_refuse_passphrase` out of load_cert_chain: the key needs a passphrase."""


def _refuse_passphrase() -> NoReturn:
    """The password callback for every key loaded. Without one, OpenSSL asks for the
    passphrase of an encrypted key on the terminal (blocking the event loop on SIGHUP) or,
    with no terminal, fails with a bare "Invalid argument"."""
    raise _EncryptedKey


def _encrypted(flag: str, key: str) -> str:
    return (
        f"{flag} {key} is encrypted with a passphrase, and rawproxy needs an unencrypted key: "
        f"write one with `openssl pkey -in {key} -out {key}.plain` (it asks for the "
        f"passphrase once), give that file as {flag}, and let only the proxy's user read it "
        f"(chmod 600)"
    )


def _file_at_fault(files: tuple[tuple[str, str], ...]) -> tuple[str, str] | None:
    """The first (flag, path) of `files` that cannot be read as a file (a directory, missing,
    unreadable): OpenSSL's errors do not say which."""
    for flag, path in files:
        if os.path.isdir(path) or not os.access(path, os.R_OK):
            return flag, path
    return None


def _unreadable(pair: CertPair, error: OSError) -> str:
    """Which file of `pair` load_cert_chain could not read."""
    if error.filename:
        return str(error.filename)
    at_fault = _file_at_fault((("--cert", pair.cert), ("--key", pair.key)))
    if at_fault is None:
        return f"--cert {pair.cert} / --key {pair.key}"
    return " ".join(at_fault)


_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----")
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


def _not_pem(flag: str, path: str, data: bytes, what: str, block: str) -> str:
    if data[:1] == b"\x30":  # an ASN.1 SEQUENCE: DER, the binary form
        convert = "x509" if "certificate" in what else "pkey"
        return (
            f"{flag} {path} is in DER (binary) form, and rawproxy reads PEM: convert it with "
            f"`openssl {convert} -inform der -in {path} -out {path}.pem`"
        )
    return f"{flag} {path} holds no {what} (a '-----BEGIN {block}-----' block)"


def pem_pair_problem(
    cert_flag: str, cert_path: str, cert: bytes, key_flag: str, key_path: str, key: bytes
) -> str | None:
    """What is wrong with a certificate file and a key file OpenSSL would not load together,
    naming the file at fault (OpenSSL's "PEM lib" names neither); None when both look right."""
    cert_ok = _CERTIFICATE in cert
    key_ok = _PRIVATE_KEY.search(key) is not None
    if not cert_ok and not key_ok and _PRIVATE_KEY.search(cert) and _CERTIFICATE in key:
        return (
            f"{cert_flag} {cert_path} holds a private key and {key_flag} {key_path} a "
            f"certificate: the two are swapped"
        )
    if not cert_ok:
        return _not_pem(cert_flag, cert_path, cert, "PEM certificate", "CERTIFICATE")
    if not key_ok:
        return _not_pem(key_flag, key_path, key, "PEM private key", "PRIVATE KEY")
    return None


def _pair_error(cert_flag: str, key_flag: str, pair: CertPair, error: ssl.SSLError) -> str:
    """The one line for a certificate and key that failed to load (files readable)."""
    try:
        with open(pair.cert, "rb") as f:
            cert = f.read()
        with open(pair.key, "rb") as f:
            key = f.read()
    except OSError:
        problem = None
    else:
        problem = pem_pair_problem(cert_flag, pair.cert, cert, key_flag, pair.key, key)
    if problem:
        return problem
    if error.reason == "KEY_VALUES_MISMATCH":
        return (
            f"{key_flag} {pair.key} is not the private key of {cert_flag} {pair.cert}: give the "
            f"key the certificate was made for (`openssl x509 -noout -pubkey -in CERT` and "
            f"`openssl pkey -pubout -in KEY` print the same for a matching pair)"
        )
    return (
        f"{cert_flag} {pair.cert} / {key_flag} {pair.key}: {error.reason or error}; both must "
        "be PEM and the key must belong to the certificate"
    )


_WHAT = {
    "--cert": "the certificate's PEM file",
    "--key": "the private key's PEM file",
    "--backend-ca": "the PEM file of the CA that signed the backend's certificate",
    "--backend-cert": "the client certificate's PEM file",
    "--backend-key": "the client key's PEM file",
}


def _file_error(files: tuple[tuple[str, str], ...], error: OSError) -> str:
    """One line for PEM files OpenSSL could not open: which one and what it should be."""
    at_fault = _file_at_fault(files)
    if at_fault is None:
        return " / ".join(f"{flag} {path}" for flag, path in files) + f": {error.strerror or error}"
    flag, path = at_fault
    if os.path.isdir(path):
        return f"{flag} {path} is a directory: give {_WHAT[flag]} itself"
    if not os.path.exists(path):
        return f"{flag} {path}: no such file (give the path of {_WHAT[flag]})"
    return f"{flag} {path}: permission denied (the proxy's user must be able to read it)"


def _read_pem_certificates(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        text = f.read().decode("ascii", "replace")
    ders = []
    marker = "-----BEGIN CERTIFICATE-----"
    for block in text.split(marker)[1:]:
        body = block.split("-----END CERTIFICATE-----")[0]
        ders.append(ssl.PEM_cert_to_DER_cert(marker + body + "-----END CERTIFICATE-----\n"))
    return ders


# -- a minimal DER reader, only as much as finding a certificate's DNS names needs ----------


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at `pos`."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, pos, end


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        tag, vstart, vend = _tlv(data, start)
        out.append((tag, vstart, vend))
        start = vend
    return out


_SAN_OID = bytes([0x55, 0x1D, 0x11])  # 2.5.29.17 subjectAltName
_CN_OID = bytes([0x55, 0x04, 0x03])  # 2.5.4.3 commonName


def certificate_names(der: bytes) -> list[str]:
    """The DNS names a certificate is for: its subjectAltName dNSName entries, or its subject
    common name when it has none. Lower case."""
    _, cstart, cend = _tlv(der, 0)
    tbs = _children(der, cstart, cend)[0]
    fields = _children(der, tbs[1], tbs[2])
    if fields and fields[0][0] == 0xA0:  # [0] version
        fields = fields[1:]
    # serial, signature algorithm, issuer, validity, subject, subjectPublicKeyInfo, ...
    subject = fields[4]
    names: list[str] = []
    for tag, start, end in fields[6:]:
        if tag != 0xA3:  # [3] extensions
            continue
        extensions = _children(der, start, end)[0]
        for _, estart, eend in _children(der, extensions[1], extensions[2]):
            parts = _children(der, estart, eend)
            if der[parts[0][1] : parts[0][2]] != _SAN_OID:
                continue
            octets = parts[-1]
            general_names = _children(der, octets[1], octets[2])[0]
            for gtag, gstart, gend in _children(der, general_names[1], general_names[2]):
                if gtag == 0x82:  # [2] dNSName
                    names.append(der[gstart:gend].decode("ascii", "replace").lower())
    if names:
        return names
    for _, rstart, rend in _children(der, subject[1], subject[2]):  # RDN sets
        for _, astart, aend in _children(der, rstart, rend):
            oid, value = _children(der, astart, aend)[:2]
            if der[oid[1] : oid[2]] == _CN_OID:
                names.append(der[value[1] : value[2]].decode("utf-8", "replace").lower())
    return names


def name_matches(pattern: str, server_name: str) -> bool:
    """RFC 6125 matching of one certificate name: exact, or `*.` for exactly one label."""
    if pattern == server_name:
        return True
    if pattern.startswith("*.") and "." in server_name:
        return server_name.split(".", 1)[1] == pattern[2:]
    return False


def choose_certificate(certificates: list[list[str]], server_name: str) -> int | None:
    """Which certificate (by its names, in --cert order) serves `server_name`: one naming it
    exactly, wherever it is in the list, before one whose wildcard covers it (as nginx and
    HAProxy choose); the first of equals. None when none fits (the default is used)."""
    wanted = server_name.lower().rstrip(".")
    for index, names in enumerate(certificates):
        if wanted in names:
            return index
    for index, names in enumerate(certificates):
        if any(name_matches(name, wanted) for name in names):
            return index
    return None


# A peer that ends its stream with a TCP FIN and no close_notify (many do) is at end of stream,
# not in error. Without this, OpenSSL 3 marks the connection failed and the other direction of
# a half-closed tunnel can no longer be sent.
TOLERATE_BARE_FIN = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


# -- client side -------------------------------------------------------------------------

# TLS 1.2 suites offered to clients: forward-secret AEAD only (Mozilla's "intermediate"
# profile), so that no client preference can pick a CBC suite. TLS 1.3 suites are all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL"


def _server_context(pair: CertPair) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | TOLERATE_BARE_FIN
    # The client chooses among suites that are all strong (Mozilla's "intermediate" and
    # "modern" profiles do the same): it knows whether it has AES instructions (AES-GCM) or
    # not (ChaCha20, phones). Python sets server preference by default, which took
    # AES-256-GCM over the AES-128-GCM that browsers ask for first.
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_ciphers(TLS12_CIPHERS)
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(pair.cert, pair.key, password=_refuse_passphrase)
    except _EncryptedKey:
        raise ConfigError(_encrypted("--key", pair.key)) from None
    except FileNotFoundError as e:
        raise ConfigError(
            f"cannot read {_unreadable(pair, e)}: no such file (check --cert/--key)"
        ) from e
    except PermissionError as e:
        raise ConfigError(
            f"cannot read {_unreadable(pair, e)}: permission denied (the proxy's user must be "
            "able to read --cert and --key)"
        ) from e
    except ssl.SSLError as e:
        raise ConfigError(_pair_error("--cert", "--key", pair, e)) from e
    except OSError as e:
        raise ConfigError(_file_error((("--cert", pair.cert), ("--key", pair.key)), e)) from e
    return context


class ServerTLS:
    """The client-side TLS contexts, chosen by SNI; `reload()` builds new ones for new
    connections (existing connections keep the context they started with)."""

    def __init__(self, pairs: tuple[CertPair, ...]) -> None:
        self.pairs = pairs
        self.context = self._build()

    def _build(self) -> ssl.SSLContext:
        contexts: list[tuple[list[str], ssl.SSLContext]] = []
        for pair in self.pairs:
            context = _server_context(pair)
            try:
                names = certificate_names(_read_pem_certificates(pair.cert)[0])
            except (ValueError, IndexError) as e:
                raise ConfigError(f"--cert {pair.cert}: cannot read the names in it") from e
            contexts.append((names, context))
        default = contexts[0][1]
        if len(contexts) > 1:
            by_names = [names for names, _ in contexts]

            def choose(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
                if server_name is None:
                    return
                chosen = choose_certificate(by_names, server_name)
                if chosen is not None:
                    sock.context = contexts[chosen][1]

            for _, context in contexts:
                context.sni_callback = choose
        return default

    def reload(self) -> None:
        """Re-read the files; on any error keep the current contexts and raise ConfigError."""
        self.context = self._build()


# -- backend side ------------------------------------------------------------------------


def backend_server_name(name: str) -> str:
    """The name sent as SNI and checked in the certificate for a backend called `name` (its
    host or --backend-sni): without one trailing dot. A fully qualified `example.com.` is the
    same host, but RFC 6066 forbids the dot in SNI and certificates never carry it, so sent
    as is it is refused or fails verification on the name."""
    return name[:-1] if len(name) > 1 and name.endswith(".") else name


def backend_context(
    ca_file: str | None,
    insecure: bool,
    client_pair: CertPair | None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # A backend's renegotiation (TLS 1.2) is refused, as HAProxy does: OpenSSL answers its
    # HelloRequest with a no_renegotiation alert and the connection goes on as it was.
    context.options |= ssl.OP_NO_RENEGOTIATION | TOLERATE_BARE_FIN
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as e:
            try:
                with open(ca_file, "rb") as f:
                    data = f.read()
            except OSError:
                data = b""
            if _CERTIFICATE not in data:
                raise ConfigError(
                    _not_pem("--backend-ca", ca_file, data, "PEM CA certificate", "CERTIFICATE")
                ) from e
            raise ConfigError(f"--backend-ca {ca_file}: {e.reason or e}") from e
        except OSError as e:
            raise ConfigError(_file_error((("--backend-ca", ca_file),), e)) from e
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if client_pair is not None:
        try:
            context.load_cert_chain(client_pair.cert, client_pair.key, password=_refuse_passphrase)
        except _EncryptedKey:
            raise ConfigError(_encrypted("--backend-key", client_pair.key)) from None
        except ssl.SSLError as e:
            raise ConfigError(_pair_error("--backend-cert", "--backend-key", client_pair, e)) from e
        except OSError as e:
            files = (("--backend-cert", client_pair.cert), ("--backend-key", client_pair.key))
            raise ConfigError(_file_error(files, e)) from e
    return context
