"""Unit tests of the address parsers in rawproxy.config."""

from __future__ import annotations

import pytest

from rawproxy.config import (
    Backend,
    ConfigError,
    ListenAddress,
    parse_backend,
    parse_listen,
    parse_route,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":8080", ListenAddress(None, 8080)),
        ("127.0.0.1:8080", ListenAddress("127.0.0.1", 8080)),
        ("[::1]:443", ListenAddress("::1", 443)),
        ("[::]:80", ListenAddress("::", 80)),
        ("localhost:0", ListenAddress("localhost", 0)),
    ],
)
def test_parse_listen(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["8080", "127.0.0.1", ":", ":http", ":70000", "::1:80", "[::1", "[::1]80", "[::1]"]
)
def test_parse_listen_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--listen"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9000", Backend("http", "127.0.0.1", 9000)),
        ("http://app.internal:9000", Backend("http", "app.internal", 9000)),
        ("http://app.internal", Backend("http", "app.internal", 80)),
        ("ws://app/", Backend("ws", "app", 80, "/")),
        ("http://app:9000/v2/", Backend("http", "app", 9000, "/v2/")),
        ("https://app", Backend("https", "app", 443)),
        ("WSS://app:8443", Backend("wss", "app", 8443)),
        ("openqa-backend01:443", Backend("https", "openqa-backend01", 443)),
        ("app", Backend("http", "app", 80)),
        ("[::1]:9000", Backend("http", "::1", 9000)),
        ("http://[::1]", Backend("http", "::1", 80)),
    ],
)
def test_parse_backend(text: str, expected: Backend) -> None:
    assert parse_backend(text) == expected


def test_backend_tls_flag_and_str() -> None:
    assert parse_backend("https://a").tls
    assert parse_backend("wss://a").tls
    assert not parse_backend("ws://a").tls
    assert str(parse_backend("[::1]:9000")) == "http://[::1]:9000"
    assert str(ListenAddress(None, 80)) == "*:80"
    assert str(ListenAddress("::1", 80)) == "[::1]:80"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://a", "unknown scheme"),
        ("http://a/app?x=1", "may not hold a query"),
        ("http://:80", "host is required"),
        ("a:0", "port must be"),
        ("a:b", "port must be"),
        ("::1:80", "brackets"),
    ],
)
def test_parse_backend_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_backend(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tls://:443", ListenAddress(None, 443, True)),
        ("TCP://127.0.0.1:80", ListenAddress("127.0.0.1", 80, False)),
        ("tls://[::1]:8443", ListenAddress("::1", 8443, True)),
    ],
)
def test_parse_listen_with_scheme(text: str, expected: ListenAddress) -> None:
    assert parse_listen(text) == expected


def test_parse_listen_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="unknown scheme"):
        parse_listen("http://:80")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://admin:s3cret@app.internal:9000/", "http://***@app.internal:9000/"),
        ("https://admin@app.internal", "https://***@app.internal"),
        ("admin:s3cret@127.0.0.1:9000", "***@127.0.0.1:9000"),
    ],
)
def test_credentials_in_a_backend_url_are_refused_without_quoting_them(
    text: str, shown: str
) -> None:
    """user:password@ used to be read as an IPv6 address without brackets ("put an IPv6
    address in brackets", password quoted into the journal) or as a host name to resolve
    ("cannot resolve the backend host 'admin@app.internal'")."""
    with pytest.raises(ConfigError) as raised:
        parse_backend(text)
    message = str(raised.value)
    assert "user name or password" in message, message
    assert repr(shown) in message, message
    assert "s3cret" not in message, message
    assert "admin" not in message, message


@pytest.mark.parametrize("text", ["http://a:9000?x=1", "http://a?x=1", "http://a:9000#top"])
def test_a_query_without_a_path_in_a_backend_url_is_named(text: str) -> None:
    """ "http://a:9000?x=1" used to be "port must be a number from 1 to 65535"."""
    with pytest.raises(ConfigError, match="may not hold a query"):
        parse_backend(text)


@pytest.mark.parametrize(
    "prefix", ["/", "/~user/", "/api/v1.0/", "/a.b", "/..x/", "/x../", "/my%20app/", "/a;b/", "/@x"]
)
def test_route_prefixes_a_request_can_match_are_taken(prefix):
    assert parse_route(f"{prefix}=http://127.0.0.1:9").prefix == prefix


@pytest.mark.parametrize(
    ("prefix", "why"),
    [
        ("/my app/", "percent-encode it (a space is %20)"),
        ("/tab\t/", "percent-encode it"),
        ("/café/", "percent-encode it"),
        ("/a?b/", "'?' ends a request's path"),
        ("/a#b", "'#' ends a request's path"),
        ("/a/../b/", "'..' segment"),
        ("/a/./b/", "'..' segment"),
        ("/a/%2E%2e/", "'..' segment"),
        ("/a/..", "'..' segment"),
    ],
)
def test_route_prefixes_no_request_can_match_are_refused(prefix, why):
    with pytest.raises(ConfigError, match="no request could match this prefix") as e:
        parse_route(f"{prefix}=http://127.0.0.1:9")
    assert why in str(e.value)
