"""Unit tests of the sans-IO PROXY protocol in rawproxy.proxyproto: no sockets, no clock.

The facts checked here are those of HAProxy's doc/proxy-protocol.txt: the v1 line and its 107
bytes, the v2 signature, version, command, family and length fields, the v2 TLVs and the SSL
TLV (section 2.2.6) that says whether the client spoke TLS to the balancer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rawproxy.proxyproto import (
    NEED_MORE,
    V1_PREFIX,
    V2_MAX_BLOCK,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    crc32c,
    encode_v1,
    encode_v2,
    parse_proxy_header,
    parse_tlvs,
)

Address = tuple[str, int]
Expected = tuple[int, str, str | None, Address | None, Address | None]
Encoder = Callable[[tuple[str, int], tuple[str, int]], bytes]

HTTP = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
SIG = V2_SIGNATURE
assert bytes.fromhex("0d0a0d0a000d0a515549540a") == SIG


def v2(ver_cmd: int, fam: int, block: bytes, length: int | None = None) -> bytes:
    """A v2 header by hand; `length` overrides the length field."""
    size = len(block) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + block


def ipv4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def ipv6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + sport.to_bytes(2, "big")
        + dport.to_bytes(2, "big")
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def parse_error(data: bytes) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse_proxy_header(data)
    message = str(info.value)
    assert message
    assert "\n" not in message
    assert "\r" not in message
    return message


# -- valid headers ------------------------------------------------------------------------------

V6_MAX = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
TLVS = tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"") + tlv(0xE0, bytes(40))

# (header bytes, expected (version, command, family, source, destination))
VALID: list[tuple[bytes, Expected]] = [
    # the example of the specification
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        (1, "PROXY", "tcp4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",  # 56 bytes, the largest
        (1, "PROXY", "tcp4", ("255.255.255.255", 65535), ("255.255.255.255", 65535)),
    ),
    (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 0\r\n", (1, "PROXY", "tcp4", ("0.0.0.0", 0), ("10.0.0.1", 0))),
    (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 8443\r\n",
        (1, "PROXY", "tcp6", ("2001:db8::1", 51234), ("2001:db8::2", 8443)),
    ),
    (
        # upper case and uncompressed: returned in canonical form
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::1 1 2\r\n",
        (1, "PROXY", "tcp6", ("2001:db8::1", 1), ("::1", 2)),
    ),
    (
        # what inet_ntop() writes for a mapped address (HAProxy sends this)
        b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:c000:202 1 2\r\n",
        (1, "PROXY", "tcp6", ("::ffff:192.0.2.1", 1), ("::ffff:192.0.2.2", 2)),
    ),
    (
        f"PROXY TCP6 {V6_MAX} {V6_MAX} 65535 65535\r\n".encode(),  # 104 bytes
        (1, "PROXY", "tcp6", (V6_MAX, 65535), (V6_MAX, 65535)),
    ),
    (b"PROXY UNKNOWN\r\n", (1, "LOCAL", None, None, None)),
    (b"PROXY UNKNOWN 192.0.2.1 192.0.2.2 1 2\r\n", (1, "LOCAL", None, None, None)),
    (
        # the worst case of the specification: exactly 107 bytes
        f"PROXY UNKNOWN {V6_MAX} {V6_MAX} 65535 65535\r\n".encode(),
        (1, "LOCAL", None, None, None),
    ),
    (b"PROXY UNKNOWN whatever \xff\x00 it says\r\n", (1, "LOCAL", None, None, None)),
    (
        v2(0x21, 0x11, ipv4_block("192.0.2.1", "198.51.100.7", 56324, 443)),
        (2, "PROXY", "tcp4", ("192.0.2.1", 56324), ("198.51.100.7", 443)),
    ),
    (
        v2(0x21, 0x21, ipv6_block("2001:db8::1", "2001:db8::2", 1, 65535)),
        (2, "PROXY", "tcp6", ("2001:db8::1", 1), ("2001:db8::2", 65535)),
    ),
    (
        v2(0x21, 0x21, ipv6_block("::ffff:192.0.2.1", "::1", 1, 2)),
        (2, "PROXY", "tcp6", ("::ffff:192.0.2.1", 1), ("::1", 2)),
    ),
    (
        v2(0x21, 0x11, ipv4_block("192.0.2.1", "198.51.100.7", 1, 2) + TLVS),
        (2, "PROXY", "tcp4", ("192.0.2.1", 1), ("198.51.100.7", 2)),
    ),
    (
        v2(0x21, 0x21, ipv6_block("2001:db8::1", "2001:db8::2", 3, 4) + TLVS),
        (2, "PROXY", "tcp6", ("2001:db8::1", 3), ("2001:db8::2", 4)),
    ),
    # LOCAL: a health check of the balancer's own; addresses, family and length are ignored
    (v2(0x20, 0x00, b""), (2, "LOCAL", None, None, None)),
    (v2(0x20, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)), (2, "LOCAL", None, None, None)),
    (v2(0x20, 0x21, b""), (2, "LOCAL", None, None, None)),
    (v2(0x20, 0xFF, b"xyz"), (2, "LOCAL", None, None, None)),
    # UNSPEC: valid, but nothing to learn from it
    (v2(0x21, 0x00, b""), (2, "PROXY", None, None, None)),
    (v2(0x21, 0x00, b"ignored" + TLVS), (2, "PROXY", None, None, None)),
    (v2(0x21, 0x10, b""), (2, "PROXY", None, None, None)),  # INET, transport UNSPEC
    # UDP and UNIX: addresses a TCP proxy has no use for
    (v2(0x21, 0x12, ipv4_block("192.0.2.1", "192.0.2.2", 53, 53)), (2, "PROXY", None, None, None)),
    (v2(0x21, 0x22, ipv6_block("::1", "::2", 53, 53)), (2, "PROXY", None, None, None)),
    (v2(0x21, 0x31, b"/run/a.sock".ljust(108, b"\0") * 2), (2, "PROXY", None, None, None)),
    (v2(0x21, 0x32, bytes(216) + TLVS), (2, "PROXY", None, None, None)),
]
VALID_IDS = [repr(data[:40]) for data, _ in VALID]


@pytest.mark.parametrize(("data", "expected"), VALID, ids=VALID_IDS)
def test_valid_header(data: bytes, expected: Expected) -> None:
    header = parse_proxy_header(data)
    assert header == ProxyHeader(*expected, length=len(data))


@pytest.mark.parametrize(("data", "expected"), VALID, ids=VALID_IDS)
def test_length_points_at_what_follows(data: bytes, expected: Expected) -> None:
    stream = data + HTTP
    header = parse_proxy_header(stream)
    assert isinstance(header, ProxyHeader)
    assert header == ProxyHeader(*expected, length=len(data))
    assert stream[header.length :] == HTTP


@pytest.mark.parametrize(("data", "expected"), VALID, ids=VALID_IDS)
def test_every_truncation_needs_more(data: bytes, expected: Expected) -> None:
    for end in range(len(data)):
        assert parse_proxy_header(data[:end]) is NEED_MORE, data[:end]


def test_bytearray_and_memoryview() -> None:
    data = VALID[0][0] + HTTP
    expected = parse_proxy_header(data)
    assert parse_proxy_header(bytearray(data)) == expected
    assert parse_proxy_header(memoryview(data)) == expected
    assert parse_proxy_header(memoryview(data)[:10]) is NEED_MORE
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(memoryview(HTTP))


def test_v1_the_line_may_end_at_byte_107() -> None:
    line = f"PROXY UNKNOWN {V6_MAX} {V6_MAX} 65535 65535\r\n".encode()
    assert len(line) == 107
    header = parse_proxy_header(line + HTTP)
    assert isinstance(header, ProxyHeader)
    assert header.length == 107


# -- malformed headers --------------------------------------------------------------------------

GOOD4 = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
GOOD_V2 = v2(0x21, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2))


def v1_tcp4(src: bytes = b"192.0.2.1", dst: bytes = b"192.0.2.2", sport: bytes = b"1") -> bytes:
    return b"PROXY TCP4 " + src + b" " + dst + b" " + sport + b" 2\r\n"


def v1_tcp6(src: bytes = b"2001:db8::1", dst: bytes = b"::1", dport: bytes = b"2") -> bytes:
    return b"PROXY TCP6 " + src + b" " + dst + b" 1 " + dport + b"\r\n"


MALFORMED = [
    # not the PROXY protocol at all
    HTTP,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY\tTCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    # v1 framing
    b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
    b"PROXY TCP4\r\n",
    b"PROXY \r\n",
    b"PROXY\r\n",
    b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n" + HTTP,  # a bare LF
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r" + HTTP,  # a bare CR
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n",
    b"PROXY UNKNOWN a\nb\r\n",
    b"PROXY UNKNOWN a\rb\r\n",
    # v1 length: no CRLF in the first 107 bytes
    b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n",
    b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",  # 108 bytes
    b"PROXY UNKNOWN " + b"x" * 93,  # 107 bytes and no CRLF yet: it cannot come in time
    b"PROXY TCP6 " + b"0:" * 48,
    # v1 ports
    v1_tcp4(sport=b"01"),
    v1_tcp4(sport=b"00"),
    v1_tcp4(sport=b"65536"),
    v1_tcp4(sport=b"99999"),
    v1_tcp4(sport=b"100000"),
    v1_tcp4(sport=b"-1"),
    v1_tcp4(sport=b"+1"),
    v1_tcp4(sport=b"1a"),
    v1_tcp4(sport=b"0x10"),
    v1_tcp4(sport=b"\xd9\xa1"),  # an Arabic-Indic digit one, which int() would take
    v1_tcp6(dport=b"080"),
    v1_tcp6(dport=b"70000"),
    # v1 addresses
    v1_tcp4(src=b"192.0.2.256"),
    v1_tcp4(src=b"192.0.2.01"),  # leading zero: octal to some parsers
    v1_tcp4(src=b"192.0.2"),
    v1_tcp4(src=b"192.0.2.1.5"),
    v1_tcp4(src=b"0xc0.0.2.1"),
    v1_tcp4(dst=b"localhost"),
    v1_tcp4(dst=b"192.0.2.2/24"),
    v1_tcp6(src=b"fe80::1%eth0"),
    v1_tcp6(src=b"1::2::3"),
    v1_tcp6(src=b"12345::1"),
    v1_tcp6(src=b"1:2:3:4:5:6:7:8:9"),
    v1_tcp6(src=b"[2001:db8::1]"),
    v1_tcp6(dst=b"::ffff:192.0.2.01"),
    v1_tcp6(dst=b"g::1"),
    # v1 family and address disagree
    v1_tcp4(src=b"2001:db8::1"),
    v1_tcp4(dst=b"::ffff:192.0.2.2"),
    v1_tcp6(src=b"192.0.2.1"),
    v1_tcp6(dst=b"192.0.2.2"),
    # v2 signature: one byte off
    *[GOOD_V2[:i] + bytes([GOOD_V2[i] ^ 0x40]) + GOOD_V2[i + 1 :] for i in range(12)],
    # v2 version
    v2(0x11, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)),
    v2(0x31, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)),
    v2(0x01, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)),
    v2(0x10, 0x00, b""),
    # v2 command
    v2(0x22, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)),
    v2(0x2F, 0x00, b""),
    # v2 family and transport
    v2(0x21, 0x41, bytes(12)),
    v2(0x21, 0xF1, bytes(12)),
    v2(0x21, 0x13, bytes(12)),
    v2(0x21, 0x1F, bytes(12)),
    # v2 address block shorter than its family needs
    v2(0x21, 0x11, bytes(11)),
    v2(0x21, 0x11, b""),
    v2(0x21, 0x21, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)),  # IPv4 block announced IPv6
    v2(0x21, 0x21, bytes(35)),
    v2(0x21, 0x12, bytes(8)),
    v2(0x21, 0x22, bytes(12)),
    v2(0x21, 0x31, bytes(215)),
    v2(0x21, 0x32, b""),
    # v2 length over the limit: refused from the 16 bytes alone
    v2(0x21, 0x11, b"", length=V2_MAX_BLOCK + 1),
    v2(0x21, 0x00, b"", length=0xFFFF),
    v2(0x20, 0x00, b"", length=0xFFFF),
]


@pytest.mark.parametrize("data", MALFORMED, ids=[repr(d[:48]) for d in MALFORMED])
def test_malformed_header(data: bytes) -> None:
    parse_error(data)
    parse_error(data + HTTP)  # more bytes never mend it


def test_messages_say_what_is_wrong() -> None:
    assert "starts with" in parse_error(HTTP)
    assert "source port" in parse_error(v1_tcp4(sport=b"65536"))
    assert "source address" in parse_error(v1_tcp4(src=b"192.0.2.256"))
    assert "destination address" in parse_error(v1_tcp6(dst=b"192.0.2.2"))
    assert "107" in parse_error(b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n")
    assert "version 1" in parse_error(v2(0x11, 0x11, bytes(12)))
    assert "command 0x2" in parse_error(v2(0x22, 0x11, bytes(12)))
    assert "need 12" in parse_error(v2(0x21, 0x11, bytes(11)))
    assert str(V2_MAX_BLOCK) in parse_error(v2(0x21, 0x11, b"", length=V2_MAX_BLOCK + 1))


@pytest.mark.parametrize(
    "data",
    [
        # refused as soon as the bytes can no longer become a header, not when the line ends
        b"G",
        b"PROXX",
        b"\r\n\r\n\x00\r\nQUIX",
        b"PROXY X",
        b"PROXY TCP4X",
        b"PROXY TCP4 1.2.3.4:",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 012",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
        b"PROXY TCP4 1.2.3.256 ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
        b"PROXY TCP6 ::1 fe80::1%",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY UNKNOWN x\ry",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r",
        SIG + b"\x11",
        SIG + b"\x22",
        SIG + b"\x21\x41",
        SIG + b"\x21\x11\x00\x04",
        SIG + b"\x21\x11\xff\xff",
    ],
)
def test_refused_early(data: bytes) -> None:
    parse_error(data)


def test_v2_address_block_is_read_from_the_block_start() -> None:
    block = ipv4_block("10.1.2.3", "10.4.5.6", 0x1234, 0xABCD)
    header = parse_proxy_header(v2(0x21, 0x11, block + TLVS) + HTTP)
    assert header == ProxyHeader(
        2, "PROXY", "tcp4", ("10.1.2.3", 0x1234), ("10.4.5.6", 0xABCD), 16 + len(block + TLVS)
    )


def test_v2_length_limit_is_inclusive() -> None:
    # The addresses, then one NOOP TLV (padding) to the limit.
    padding = tlv(0x04, bytes(V2_MAX_BLOCK - 12 - 3))
    data = v2(0x21, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2) + padding)
    header = parse_proxy_header(data + HTTP)
    assert isinstance(header, ProxyHeader)
    assert header.length == 16 + V2_MAX_BLOCK


# -- TLVs and the SSL TLV ----------------------------------------------------------------------


def ssl_tlv(client: int, *subs: bytes, verify: int = 0) -> bytes:
    """PP2_TYPE_SSL: the client flags, the verify field, then sub-TLVs."""
    return tlv(0x20, bytes([client]) + verify.to_bytes(4, "big") + b"".join(subs))


V4 = ipv4_block("192.0.2.1", "198.51.100.7", 56324, 443)
V6 = ipv6_block("2001:db8::1", "2001:db8::2", 1, 443)
VERSION13 = tlv(0x21, b"TLSv1.3")
# What HAProxy's send-proxy-v2-ssl-cn sends, more or less: version, CN, cipher, algorithms.
HAPROXY_SSL = ssl_tlv(
    0x07,
    VERSION13,
    tlv(0x22, b"client.example"),
    tlv(0x23, b"TLS_AES_256_GCM_SHA384"),
    tlv(0x24, b"RSA-SHA256"),
    tlv(0x25, b"RSA2048"),
)

# (header, (client_tls, tls_version)): TCP over IPv4 or IPv6 with TLVs
SSL_VALID: list[tuple[bytes, tuple[bool, str | None]]] = [
    (v2(0x21, 0x11, V4 + ssl_tlv(0x01, VERSION13)), (True, "TLSv1.3")),
    (v2(0x21, 0x21, V6 + ssl_tlv(0x01, VERSION13)), (True, "TLSv1.3")),
    (v2(0x21, 0x11, V4 + ssl_tlv(0x01)), (True, None)),  # no version: TLS all the same
    (v2(0x21, 0x11, V4 + TLVS + HAPROXY_SSL + tlv(0x04, b"pad")), (True, "TLSv1.3")),
    (v2(0x21, 0x11, V4 + ssl_tlv(0x01, tlv(0x21, b"TLSv1.2"), verify=1)), (True, "TLSv1.2")),
    # the flags say the client did not use TLS (a certificate flag alone is not TLS)
    (v2(0x21, 0x11, V4 + ssl_tlv(0x00)), (False, None)),
    (v2(0x21, 0x11, V4 + ssl_tlv(0x06, VERSION13)), (False, None)),
    (v2(0x21, 0x11, V4 + tlv(0xE1, bytes([0x01]) + bytes(4))), (False, None)),  # not type 0x20
    (v2(0x21, 0x11, V4 + TLVS), (False, None)),
    (v2(0x21, 0x11, V4), (False, None)),
]
SSL_IDS = [repr(data[28:60]) for data, _ in SSL_VALID]


@pytest.mark.parametrize(("data", "expected"), SSL_VALID, ids=SSL_IDS)
def test_ssl_tlv(data: bytes, expected: tuple[bool, str | None]) -> None:
    header = parse_proxy_header(data + HTTP)
    assert isinstance(header, ProxyHeader)
    assert (header.client_tls, header.tls_version) == expected
    assert header.length == len(data)
    assert header.command == "PROXY"
    assert header.family in ("tcp4", "tcp6")
    for end in range(len(data)):
        assert parse_proxy_header(data[:end]) is NEED_MORE, data[:end]


def test_ssl_tlv_is_not_read_where_no_tlvs_are() -> None:
    """v1 has no TLVs; LOCAL, UNSPEC, UDP and UNIX headers are not used, what follows their
    addresses is skipped unread (as HAProxy does)."""
    for data in (
        v2(0x20, 0x11, V4 + ssl_tlv(0x01, VERSION13)),
        v2(0x21, 0x00, ssl_tlv(0x01, VERSION13)),
        v2(0x21, 0x12, V4 + ssl_tlv(0x01, VERSION13)),
        v2(0x21, 0x31, bytes(216) + ssl_tlv(0x01)),
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    ):
        header = parse_proxy_header(data)
        assert isinstance(header, ProxyHeader)
        assert (header.client_tls, header.tls_version) == (False, None)


def test_parse_tlvs() -> None:
    assert parse_tlvs(b"") == []
    assert parse_tlvs(TLVS) == [
        (0x01, b"h2"),
        (0x02, b"example.com"),
        (0x04, b""),
        (0xE0, bytes(40)),
    ]
    assert parse_tlvs(bytearray(tlv(0x20, b"x"))) == [(0x20, b"x")]
    assert parse_tlvs(memoryview(tlv(0xFF, bytes(300)))) == [(0xFF, bytes(300))]
    for bad in (b"\x01", b"\x01\x00", tlv(0x01, b"h2")[:-1], tlv(0x01, b"h2") + b"\x04\x00"):
        with pytest.raises(ProxyProtocolError, match="TLV"):
            parse_tlvs(bad)


TLV_MALFORMED = [
    # the TLVs do not fill the announced length exactly
    v2(0x21, 0x11, V4 + b"\x04"),
    v2(0x21, 0x11, V4 + b"\x04\x00"),
    v2(0x21, 0x11, V4 + TLVS + b"\x00"),
    v2(0x21, 0x11, V4 + tlv(0x01, b"h2")[:-1]),
    v2(0x21, 0x21, V6 + b"\x20\x00\x06" + bytes(5)),
    v2(0x21, 0x11, V4 + bytes(V2_MAX_BLOCK - 12)),  # zeros: 1361 empty TLVs and one byte
    # the SSL TLV: too short for its fixed part, sub-TLVs that do not fit, twice
    v2(0x21, 0x11, V4 + tlv(0x20, b"")),
    v2(0x21, 0x11, V4 + tlv(0x20, b"\x01\x00\x00\x00")),
    v2(0x21, 0x11, V4 + tlv(0x20, bytes([1]) + bytes(4) + b"\x21\x00\x08TLSv1.3")),
    v2(0x21, 0x11, V4 + tlv(0x20, bytes([1]) + bytes(4) + b"\x21")),
    v2(0x21, 0x11, V4 + ssl_tlv(0x01) + ssl_tlv(0x01)),
    v2(0x21, 0x11, V4 + ssl_tlv(0x00) + ssl_tlv(0x01)),
    v2(0x21, 0x11, V4 + ssl_tlv(0x01, VERSION13, tlv(0x21, b"TLSv1.2"))),
    # the version: printable US-ASCII
    v2(0x21, 0x11, V4 + ssl_tlv(0x01, tlv(0x21, b""))),
    v2(0x21, 0x11, V4 + ssl_tlv(0x01, tlv(0x21, b"TLSv1.3\r\nX-Evil: 1"))),
    v2(0x21, 0x11, V4 + ssl_tlv(0x01, tlv(0x21, "TLSv1.3\u00e9".encode()))),
]


@pytest.mark.parametrize("data", TLV_MALFORMED, ids=[repr(d[28:60]) for d in TLV_MALFORMED])
def test_malformed_tlvs(data: bytes) -> None:
    message = parse_error(data)
    assert "TLV" in message, message
    parse_error(data + HTTP)


def test_tlv_overrun_is_refused_from_its_head() -> None:
    """A TLV announcing more than the header has left is refused when its 3 bytes of type
    and length are in, not when the whole announced header is."""
    data = v2(0x21, 0x11, V4 + tlv(0x01, b"h2") + b"\xe0\x01\x00" + bytes(20))
    cut = 16 + 12 + 5 + 3
    assert "256 bytes" in parse_error(data[:cut])
    assert parse_proxy_header(data[: cut - 1]) is NEED_MORE


# Any TLV type but SSL (0x20, read) and CRC32C (0x03, verified: see its own tests).
TLV_LISTS = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t not in (0x03, 0x20)), st.binary(max_size=40)),
    max_size=8,
)


def tlv_bytes(tlvs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(tlv(kind, value) for kind, value in tlvs)


@given(TLV_LISTS)
def test_tlvs_round_trip(tlvs: list[tuple[int, bytes]]) -> None:
    block = tlv_bytes(tlvs)
    assert parse_tlvs(block) == tlvs
    header = parse_proxy_header(v2(0x21, 0x11, V4 + block) + HTTP)
    assert isinstance(header, ProxyHeader)
    assert (header.client_tls, header.tls_version, header.length) == (False, None, 28 + len(block))


@given(TLV_LISTS, st.data())
def test_a_cut_tlv_block_is_refused(tlvs: list[tuple[int, bytes]], draw: st.DataObject) -> None:
    """Announced a byte short, or with the last TLV cut anywhere: never read as fewer TLVs."""
    block = tlv_bytes(tlvs)
    if not block:
        return
    end = draw.draw(st.integers(1, len(block) - 1)) if len(block) > 1 else 0
    last_start = len(block) - 3 - len(tlvs[-1][1])
    if end > last_start:
        with pytest.raises(ProxyProtocolError):
            parse_tlvs(block[:end])
        parse_error(v2(0x21, 0x11, V4 + block[:end]))


@given(
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.one_of(
        st.none(),
        st.text(
            alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20
        ),
    ),
    TLV_LISTS,
)
def test_ssl_tlv_flags_and_version(
    client: int, verify: int, version: str | None, others: list[tuple[int, bytes]]
) -> None:
    subs = [tlv(0x21, version.encode())] if version is not None else []
    block = tlv_bytes(others) + ssl_tlv(client, *subs, verify=verify)
    header = parse_proxy_header(v2(0x21, 0x21, V6 + block))
    assert isinstance(header, ProxyHeader)
    tls = bool(client & 0x01)
    assert (header.client_tls, header.tls_version) == (tls, version if tls else None)


# -- writing headers -----------------------------------------------------------------------------


def test_encode_v1() -> None:
    assert (
        encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
        == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert (
        encode_v1(("2001:db8::1", 0), ("::1", 65535)) == b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"
    )
    # mapped addresses count as IPv4 when both are
    assert (
        encode_v1(("::ffff:192.0.2.1", 1), ("192.0.2.2", 2))
        == b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
    )
    # mixed families: both in IPv6 form, in hexadecimal groups only
    assert (
        encode_v1(("192.0.2.1", 1), ("2001:db8::2", 2))
        == b"PROXY TCP6 ::ffff:c000:201 2001:db8::2 1 2\r\n"
    )
    assert (
        encode_v1(("2001:db8::1", 1), ("::ffff:192.0.2.2", 2))
        == b"PROXY TCP6 2001:db8::1 ::ffff:c000:202 1 2\r\n"
    )
    # a scope names an interface of this host only
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"
    assert len(encode_v1((V6_MAX, 65535), (V6_MAX, 65535))) == 104


def test_encode_v2() -> None:
    assert encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443)) == (
        SIG + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 7]) + b"\xdc\x04\x01\xbb"
    )
    assert encode_v2(("2001:db8::1", 1), ("::1", 2)) == (
        SIG
        + b"\x21\x21\x00\x24"
        + ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("::1").packed
        + b"\x00\x01\x00\x02"
    )
    assert encode_v2(("::ffff:192.0.2.1", 1), ("192.0.2.2", 2)) == v2(
        0x21, 0x11, ipv4_block("192.0.2.1", "192.0.2.2", 1, 2)
    )
    assert encode_v2(("192.0.2.1", 1), ("::1", 2)) == v2(
        0x21, 0x21, ipv6_block("::ffff:192.0.2.1", "::1", 1, 2)
    )


def test_encode_v2_ssl_tlv() -> None:
    """The SSL TLV as HAProxy's send-proxy-v2-ssl writes it: PP2_CLIENT_SSL, verify 0, the
    version in a PP2_SUBTYPE_SSL_VERSION sub-TLV; built here byte by byte."""
    block = ipv4_block("192.0.2.1", "198.51.100.7", 56324, 443)
    ssl_value = b"\x01" + b"\x00\x00\x00\x00" + b"\x21\x00\x07" + b"TLSv1.3"
    expected = v2(0x21, 0x11, block + b"\x20\x00\x0f" + ssl_value)
    assert (
        encode_v2(
            ("192.0.2.1", 56324), ("198.51.100.7", 443), client_tls=True, tls_version="TLSv1.3"
        )
        == expected
    )
    # the version unknown: the flags and verify only
    assert encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), client_tls=True) == v2(
        0x21, 0x11, block + b"\x20\x00\x05\x01\x00\x00\x00\x00"
    )
    # not TLS: no TLV, the header as before
    assert encode_v2(("192.0.2.1", 56324), ("198.51.100.7", 443), client_tls=False) == v2(
        0x21, 0x11, block
    )
    header = parse_proxy_header(expected)
    assert isinstance(header, ProxyHeader)
    assert (header.client_tls, header.tls_version) == (True, "TLSv1.3")


@pytest.mark.parametrize(
    ("client_tls", "tls_version"),
    [(False, "TLSv1.3"), (True, ""), (True, "TLSv1.3\r\n"), (True, "é")],
)
def test_encode_v2_refuses_versions(client_tls: bool, tls_version: str) -> None:
    with pytest.raises(ValueError, match="TLS version"):
        encode_v2(
            ("192.0.2.1", 1), ("192.0.2.2", 2), client_tls=client_tls, tls_version=tls_version
        )


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    ("source", "destination"),
    [
        (("192.0.2.1", -1), ("192.0.2.2", 2)),
        (("192.0.2.1", 1), ("192.0.2.2", 65536)),
        (("example.com", 1), ("192.0.2.2", 2)),
        (("192.0.2.1", 1), ("", 2)),
        (("192.0.2.1/32", 1), ("192.0.2.2", 2)),
    ],
)
def test_encode_refuses(
    encode: Encoder, source: tuple[str, int], destination: tuple[str, int]
) -> None:
    with pytest.raises(ValueError, match=r"."):
        encode(source, destination)


# -- properties ------------------------------------------------------------------------------------

PORTS = st.integers(0, 65535)
IPV4 = st.ip_addresses(v=4)
# Mapped addresses are drawn on purpose: the encoders must treat them as IPv4.
IPV6 = st.one_of(
    st.ip_addresses(v=6),
    IPV4.map(lambda a: ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)),
)
ADDRESSES = st.one_of(IPV4, IPV6)
ENCODERS = st.sampled_from([encode_v1, encode_v2])


def as_v4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return address
    return address.ipv4_mapped


def as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address


@given(ADDRESSES, ADDRESSES, PORTS, PORTS, st.booleans())
def test_round_trip(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
    binary: bool,
) -> None:
    encode = encode_v2 if binary else encode_v1
    data = encode((str(src), sport), (str(dst), dport))
    header = parse_proxy_header(data + HTTP)
    assert isinstance(header, ProxyHeader)
    assert header.version == (2 if binary else 1)
    assert header.command == "PROXY"
    assert header.length == len(data)
    assert header.source is not None
    assert header.destination is not None
    src4, dst4 = as_v4(src), as_v4(dst)
    if src4 is not None and dst4 is not None:
        assert header.family == "tcp4"
        assert header.source == (str(src4), sport)
        assert header.destination == (str(dst4), dport)
    else:
        assert header.family == "tcp6"
        assert ipaddress.IPv6Address(header.source[0]) == as_v6(src)
        assert ipaddress.IPv6Address(header.destination[0]) == as_v6(dst)
        assert (header.source[1], header.destination[1]) == (sport, dport)
    if not binary:
        assert len(data) <= 107
        assert data.isascii()
        if header.family == "tcp6":
            assert b"." not in data  # hexadecimal groups only, as the specification has it
            for text, address in zip(data.split(b" ")[2:4], (src, dst), strict=True):
                if as_v4(address) is None:
                    assert text.decode() == str(address)  # RFC 5952, as ipaddress writes it


@given(
    ADDRESSES,
    ADDRESSES,
    st.booleans(),
    st.one_of(
        st.none(),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1),
    ),
)
def test_round_trip_tls(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    client_tls: bool,
    tls_version: str | None,
) -> None:
    version = tls_version if client_tls else None
    data = encode_v2((str(src), 1), (str(dst), 2), client_tls=client_tls, tls_version=version)
    header = parse_proxy_header(data + HTTP)
    assert isinstance(header, ProxyHeader)
    assert (header.client_tls, header.tls_version, header.length) == (
        client_tls,
        version,
        len(data),
    )


@given(IPV6, IPV6, PORTS, PORTS, ENCODERS)
def test_round_trip_mapped_text(
    src: ipaddress.IPv6Address,
    dst: ipaddress.IPv6Address,
    sport: int,
    dport: int,
    encode: Encoder,
) -> None:
    """A mapped address comes back as getpeername() writes it, on every Python version."""
    header = parse_proxy_header(encode((str(src), sport), (str(dst), dport)))
    assert isinstance(header, ProxyHeader)
    if header.family == "tcp6":
        assert header.source is not None
        if src.ipv4_mapped is not None:
            assert header.source[0] == f"::ffff:{src.ipv4_mapped}"
        else:
            assert header.source[0] == str(src)


def check_contract(data: bytes) -> ProxyHeader | None:
    """Only ProxyProtocolError escapes; a header never reaches past the bytes it is given."""
    message: str | None
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError as e:
        message = str(e)
    else:
        message = None
    if message is not None:
        assert "\n" not in message
        return None
    if result is NEED_MORE:
        return None
    assert isinstance(result, ProxyHeader)
    assert 0 < result.length <= len(data)
    assert parse_proxy_header(data[: result.length]) == result
    return result


STARTS = st.sampled_from(
    [
        b"",
        V1_PREFIX,
        b"PROXY TCP4 ",
        b"PROXY TCP4 192.0.2.1 ",
        b"PROXY TCP6 ",
        b"PROXY TCP6 ::1 ::2 ",
        b"PROXY UNKNOWN",
        SIG,
        SIG + b"\x21",
        SIG + b"\x20",
        SIG + b"\x21\x11\x00\x0c",
        SIG + b"\x21\x21\x00\x24",
        SIG + b"\x21\x11\x00\x20" + V4,
        SIG + b"\x21\x11\x00\x30" + V4 + b"\x20\x00",
    ]
)
# Tails drawn from the bytes that matter to a header, and from all bytes.
TAILS = st.one_of(
    st.binary(max_size=120),
    st.text(alphabet="0123456789abcdefABCDEF:. \r\nTCPUNKOWXY", max_size=120).map(str.encode),
)


@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    check_contract(data)


@given(STARTS, TAILS)
def test_arbitrary_tails(start: bytes, tail: bytes) -> None:
    check_contract(start + tail)


@given(st.sampled_from([data for data, _ in VALID + SSL_VALID]), st.data())
def test_one_byte_changed(data: bytes, draw: st.DataObject) -> None:
    index = draw.draw(st.integers(0, len(data) - 1))
    value = draw.draw(st.integers(0, 255))
    check_contract(data[:index] + bytes([value]) + data[index + 1 :] + HTTP)


@given(STARTS, TAILS, st.binary(max_size=120))
def test_answers_only_move_forward(start: bytes, tail: bytes, more: bytes) -> None:
    """Refused stays refused and a header stays the same header as bytes arrive; NEED_MORE
    is only ever said of bytes whose every prefix is also NEED_MORE."""
    data = start + tail
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError:
        with pytest.raises(ProxyProtocolError):
            parse_proxy_header(data + more)
        return
    if result is NEED_MORE:
        for end in range(len(data)):
            assert parse_proxy_header(data[:end]) is NEED_MORE
    else:
        assert parse_proxy_header(data + more) == result


@given(ADDRESSES, ADDRESSES, PORTS, PORTS, ENCODERS, st.data())
def test_encoded_truncations_need_more(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
    encode: Encoder,
    draw: st.DataObject,
) -> None:
    data = encode((str(src), sport), (str(dst), dport))
    end = draw.draw(st.integers(0, len(data) - 1))
    assert parse_proxy_header(data[:end]) is NEED_MORE


# -- the CRC32C TLV ----------------------------------------------------------------------------


def test_crc32c_check_values() -> None:
    # The check value of the CRC catalogues, and RFC 3720 B.4's 32 zero bytes (sent as
    # aa 36 91 8a, least significant byte first).
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"") == 0


def with_crc(tlvs_before: bytes = b"", tlvs_after: bytes = TLVS) -> bytes:
    """A TCP/IPv4 v2 header with a CRC32C TLV, its checksum filled in as a sender does."""
    header = bytearray(v2(0x21, 0x11, V4 + tlvs_before + tlv(0x03, bytes(4)) + tlvs_after))
    at = 16 + len(V4) + len(tlvs_before) + 3
    header[at : at + 4] = crc32c(header).to_bytes(4, "big")
    return bytes(header)


@pytest.mark.parametrize(
    "data", [with_crc(), with_crc(HAPROXY_SSL, b""), with_crc(tlv(0x04, b"pad"), TLVS)]
)
def test_crc32c_tlv_that_matches_is_accepted(data: bytes) -> None:
    header = parse_proxy_header(data + HTTP)
    assert isinstance(header, ProxyHeader)
    assert (header.source, header.length) == (("192.0.2.1", 56324), len(data))


def test_crc32c_tlv_that_does_not_match_is_refused() -> None:
    good = with_crc(HAPROXY_SSL)
    checksum = 16 + len(V4) + len(HAPROXY_SSL) + 3
    version = 16 + len(V4) + HAPROXY_SSL.index(b"TLSv1.3") + 4
    # A byte of the source address, of the TLS version named, of the checksum, of the last TLV.
    for at in (17, version, checksum + 2, len(good) - 1):
        bad = bytearray(good)
        bad[at] ^= 0x01
        with pytest.raises(ProxyProtocolError, match="CRC32C"):
            parse_proxy_header(bytes(bad) + HTTP)


def test_crc32c_tlv_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ProxyProtocolError, match="CRC32C TLV of 3 bytes"):
        parse_proxy_header(v2(0x21, 0x11, V4 + tlv(0x03, bytes(3))) + HTTP)
