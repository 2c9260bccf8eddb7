"""Unit tests of rawproxy.tls: certificate names, SNI matching, context errors."""

from __future__ import annotations

import datetime
import pathlib
import ssl
import time
from typing import Any

import pytest
import trustme
from tls_peers import encrypt_key

from rawproxy.config import CertPair, ConfigError
from rawproxy.http import looks_like_plain_http
from rawproxy.tls import (
    ServerTLS,
    backend_context,
    backend_server_name,
    certificate_names,
    choose_certificate,
    name_matches,
)


def _der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def test_certificate_names_from_subject_alt_names() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "*.Example.test", "::1")
    assert certificate_names(_der(cert)) == ["localhost", "*.example.test"]


def test_certificate_names_fall_back_to_common_name() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert(common_name="legacy.test")
    der = _der(cert)
    names = certificate_names(der)
    assert "legacy.test" in names


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("a.test", "a.test", True),
        ("*.a.test", "b.a.test", True),
        ("*.a.test", "a.test", False),
        ("*.a.test", "c.b.a.test", False),
        ("a.test", "b.test", False),
    ],
)
def test_name_matches(pattern: str, name: str, expected: bool) -> None:
    assert name_matches(pattern, name) is expected


def test_an_exact_name_wins_over_a_wildcard_whatever_the_order() -> None:
    default, wild, exact = ["default.test"], ["*.shop.test", "shop.test"], ["pay.shop.test"]
    assert choose_certificate([default, wild, exact], "pay.shop.test") == 2
    assert choose_certificate([default, exact, wild], "pay.shop.test") == 1
    assert choose_certificate([default, wild, exact], "PAY.shop.test.") == 2
    assert choose_certificate([default, wild, exact], "www.shop.test") == 1
    assert choose_certificate([default, wild, exact], "shop.test") == 1
    assert choose_certificate([default, wild, exact], "other.test") is None
    assert choose_certificate([wild, ["*.shop.test"]], "a.shop.test") == 0  # first of equals


@pytest.mark.parametrize(
    ("start", "plain"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"DELETE /x HTTP/1.1\r\n", True),
        (b"PROPFIND /dav/ HTTP/1.1\r\n", True),
        (b"M-SEARCH * HTTP/1.1\r\n", True),
        (b"CONNECT a:443 HTTP/1.1\r\n", True),
        (b"VERSION-CONTROL /x HTTP/1.1", True),
        (b"DELETE", False),  # no space yet: not known
        (b"get / HTTP/1.1\r\n", False),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # a ClientHello
        (b"\x80\x2e\x01\x03\x01", False),  # an SSLv2-style ClientHello
        (b"", False),
    ],
)
def test_looks_like_plain_http(start: bytes, plain: bool) -> None:
    assert looks_like_plain_http(start) is plain


def test_a_real_client_hello_is_not_plain_http() -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16
    assert not looks_like_plain_http(hello[:32])


def _pair(tmp_path: pathlib.Path, cert: trustme.LeafCert, stem: str) -> CertPair:
    cert_file = tmp_path / f"{stem}.crt"
    key_file = tmp_path / f"{stem}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return CertPair(str(cert_file), str(key_file))


def test_server_context_is_modern(tmp_path: pathlib.Path) -> None:
    tls = ServerTLS((_pair(tmp_path, trustme.CA().issue_cert("localhost"), "a"),))
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_missing_key_file_names_it(tmp_path: pathlib.Path) -> None:
    pair = _pair(tmp_path, trustme.CA().issue_cert("localhost"), "a")
    with pytest.raises(ConfigError, match="no such file"):
        ServerTLS((CertPair(pair.cert, str(tmp_path / "missing.key")),))


def test_key_of_another_certificate_is_refused(tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    one = _pair(tmp_path, ca.issue_cert("a.test"), "one")
    two = _pair(tmp_path, ca.issue_cert("b.test"), "two")
    with pytest.raises(ConfigError, match="is not the private key of --cert"):
        ServerTLS((CertPair(one.cert, two.key),))


def test_reload_failure_keeps_the_old_context(tmp_path: pathlib.Path) -> None:
    pair = _pair(tmp_path, trustme.CA().issue_cert("localhost"), "a")
    tls = ServerTLS((pair,))
    before = tls.context
    pathlib.Path(pair.cert).write_text("not a certificate")
    with pytest.raises(ConfigError):
        tls.reload()
    assert tls.context is before


def _encrypt_key(pair: CertPair, traditional: bool) -> None:
    """Encrypt `pair`'s key in place with the passphrase "secret"."""
    path = pathlib.Path(pair.key)
    encrypt_key(path, path, traditional)


ENCRYPTED_FORMS = [pytest.param(False, id="pkcs8"), pytest.param(True, id="traditional")]


@pytest.mark.parametrize("traditional", ENCRYPTED_FORMS)
def test_encrypted_key_is_refused_with_the_way_out(
    tmp_path: pathlib.Path, traditional: bool
) -> None:
    """OpenSSL would ask for the passphrase on the terminal (or fail with "Invalid argument"
    without one): the error says what the key is and how to make an unencrypted one."""
    pair = _pair(tmp_path, trustme.CA().issue_cert("localhost"), "a")
    _encrypt_key(pair, traditional)
    with pytest.raises(ConfigError) as server_side:
        ServerTLS((pair,))
    message = str(server_side.value)
    assert f"--key {pair.key} is encrypted with a passphrase" in message, message
    assert f"openssl pkey -in {pair.key} -out {pair.key}.plain" in message, message
    with pytest.raises(ConfigError) as backend_side:
        backend_context(None, False, pair)
    message = str(backend_side.value)
    assert f"--backend-key {pair.key} is encrypted with a passphrase" in message, message
    assert "openssl pkey" in message, message


def test_reload_with_an_encrypted_key_keeps_the_old_context(tmp_path: pathlib.Path) -> None:
    pair = _pair(tmp_path, trustme.CA().issue_cert("localhost"), "a")
    tls = ServerTLS((pair,))
    before = tls.context
    _encrypt_key(pair, traditional=False)
    with pytest.raises(ConfigError, match="encrypted with a passphrase"):
        tls.reload()
    assert tls.context is before


def test_backend_context_verifies_by_default(tmp_path: pathlib.Path) -> None:
    context = backend_context(None, False, None)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    insecure = backend_context(None, True, None)
    assert insecure.verify_mode == ssl.CERT_NONE
    with pytest.raises(ConfigError, match="--backend-ca"):
        backend_context(str(tmp_path / "nope.pem"), False, None)


def test_expired_is_not_a_parse_problem() -> None:
    # Names are read from expired certificates too (expiry is the verifier's business).
    ca = trustme.CA()
    cert = ca.issue_cert("old.test", not_after=datetime.datetime(2001, 1, 1))
    assert certificate_names(_der(cert)) == ["old.test"]


# -- which backend TLS session is kept for the next connection ------------------------------


class FakeSession:
    """What Target reads of an ssl.SSLSession: when it was made, its ticket's lifetime."""

    def __init__(self, age: float = 0.0, lifetime: int = 7200) -> None:
        self.time = int(time.time() - age)
        self.ticket_lifetime_hint = lifetime


def tls_target(backend: str = "https://127.0.0.1:1", *flags: str) -> Any:
    from rawproxy.cli import build_parser, load_settings
    from rawproxy.server import Target

    args = build_parser().parse_args(["--listen", "127.0.0.1:0", "--backend", backend, *flags])
    config, _ = load_settings(args)
    return Target(config.routes[0].backend, config)


@pytest.mark.parametrize(
    ("name", "sent"),
    [
        ("localhost.", "localhost"),
        ("api.example.com.", "api.example.com"),
        ("api.example.com", "api.example.com"),
        ("a..", "a."),  # one dot only: what is left is refused as it stands
        (".", "."),
    ],
)
def test_backend_server_name_drops_one_trailing_dot(name: str, sent: str) -> None:
    assert backend_server_name(name) == sent


def test_a_backend_host_with_a_trailing_dot_is_connected_to_as_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """https://localhost.:PORT: SNI and verification use `localhost` (RFC 6066: no trailing
    dot), the name resolved for connecting keeps its dot (a fully qualified name)."""
    import rawproxy.server

    resolved: list[str] = []

    def resolve(backend: Any) -> list[tuple[int, tuple[str, int]]]:
        resolved.append(backend.host)
        return [(2, ("127.0.0.1", backend.port))]

    monkeypatch.setattr(rawproxy.server, "resolve_backend", resolve)
    assert tls_target("https://localhost.:8443").sni == "localhost"
    assert resolved == ["localhost."]
    assert tls_target("https://127.0.0.1:1", "--backend-sni", "app.test.").sni == "app.test"


def test_a_session_that_resumes_connections_is_kept_while_young() -> None:
    """Fetching a connection's session costs as much as a resumed handshake: one the backend
    keeps accepting is kept, and renewed when it ages (10 minutes, or half its lifetime)."""
    target = tls_target()
    first = FakeSession()
    assert target.wants_tls_session(None, False)  # nothing kept yet
    target.keep_tls_session(first)
    assert not target.wants_tls_session(first, True)  # resumed: keep it
    assert not target.wants_tls_session(first, True)
    assert target.wants_tls_session(FakeSession(), True)  # offered another: take its own
    old = FakeSession(age=700)
    target.keep_tls_session(old)
    assert target.wants_tls_session(old, True)  # older than 10 minutes
    short = FakeSession(age=40, lifetime=60)
    target.keep_tls_session(short)
    assert target.wants_tls_session(short, True)  # past half its ticket's lifetime
    assert not target.tls_single_use


def test_a_backend_that_refuses_a_session_it_accepted_gets_a_fresh_one_every_time() -> None:
    """Single-use tickets (a stateful session cache): the first refusal of a session that
    resumed a connection before is the sign; from then on every connection's is kept."""
    target = tls_target()
    saved = FakeSession()
    target.keep_tls_session(saved)
    assert target.wants_tls_session(saved, False)  # never proven: a refusal says nothing
    assert not target.tls_single_use
    target.keep_tls_session(saved)
    assert not target.wants_tls_session(saved, True)  # accepted once
    assert target.wants_tls_session(saved, False)  # refused now
    assert target.tls_single_use
    fresh = FakeSession()
    target.keep_tls_session(fresh)
    assert target.wants_tls_session(fresh, True)  # resumed, but kept anew all the same
