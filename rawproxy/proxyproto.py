"""The PROXY protocol (versions 1 and 2), without I/O.

A load balancer in front of the proxy that relays TCP (HAProxy, AWS NLB, ...) hides the
client's address: the connection comes from the balancer. With the PROXY protocol the balancer
first sends one header naming the client, then the client's bytes unchanged. This module reads
that header from the start of a stream and writes it for a backend; the I/O layer feeds it the
bytes it has and skips `length` of them.

The rules are those of HAProxy's specification (doc/proxy-protocol.txt). The receiver is
strict, as the specification asks ("any sequence which does not exactly match the protocol
must be discarded"): a header that is not exactly right is an error, never a guess, because a
listener that accepts this protocol believes whatever address it carries. It is also early:
bytes that can no longer become a valid header are refused as soon as they are seen, so that
a stranger speaking HTTP to the port is told at once, while a valid header that arrives in
pieces is waited for (NEED_MORE; the caller bounds the wait).

Of the TLVs that may follow the addresses of a v2 header, the SSL one is read: it says whether
the client spoke TLS to the balancer, which is all a proxy behind a TLS-terminating balancer
has to tell its backends the client's scheme. A CRC32C TLV is verified (section 2.2.2: a
header whose checksum does not match is invalid). The others are checked for their framing
only.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from typing import Final

V1_PREFIX: Final = b"PROXY "
# At most 107 bytes with the CRLF: "PROXY UNKNOWN" and two full IPv6 addresses and ports.
V1_MAX_LENGTH: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16  # signature, version and command, family and protocol, length
# The 16-bit length field could announce 64 KiB; nothing a balancer sends (addresses and a few
# TLVs such as ALPN, SNI, a unique ID or TLS details) comes near this. A larger value is a
# peer that is not a balancer, and waiting for it would hold a buffer for nothing.
V2_MAX_BLOCK: Final = 4096

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM = 0x0, 0x1, 0x2
# The address block each family needs: two addresses, then two 16-bit ports but for AF_UNIX.
_V2_ADDRESS_BLOCK = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

# TLVs after the addresses of a v2 header (section 2.2): a type byte, a 16-bit length, a value.
_TLV_HEAD = 3
PP2_TYPE_SSL: Final = 0x20  # how the client reached the balancer: flags, verify, sub-TLVs
PP2_CLIENT_SSL: Final = 0x01  # in the SSL TLV's client flags: the client spoke TLS
PP2_SUBTYPE_SSL_VERSION: Final = 0x21  # a sub-TLV of the SSL TLV: "TLSv1.3", US-ASCII
_SSL_FIXED = 5  # the SSL TLV's value starts with the client flags (1 byte) and verify (4)
PP2_TYPE_CRC32C: Final = 0x03  # the CRC32C of the whole header, this field counted as zeros


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (RFC 3720 B.4, the checksum of SCTP and iSCSI), byte by byte: a PROXY header
    is a few hundred bytes at most, and only a header that carries the TLV is summed."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV4_CHARS = frozenset(b"0123456789.")
_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")  # no "%": a scope means nothing remotely
_IPV4_TEXT_MAX = len("255.255.255.255")
_IPV6_TEXT_MAX = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header.

    `command` is "PROXY" when the addresses are the client's, "LOCAL" when the balancer speaks
    for itself (a v2 health check, or a v1 "UNKNOWN" line): the real connection's endpoints
    apply then. `family` is "tcp4" or "tcp6" when `source` and `destination` are given, None
    when they are not (LOCAL, UNKNOWN, UNSPEC, UNIX and UDP, which a TCP proxy cannot use):
    without addresses, whatever the command, the connection's own endpoints are all there is.
    Addresses are in canonical text form, an IPv4-mapped IPv6 one as "::ffff:192.0.2.1" as
    getpeername() shows it. `length` is how many bytes the header took: the client's own
    bytes start there.

    `client_tls` is true when a v2 PROXY header for TCP carries the SSL TLV (PP2_TYPE_SSL)
    with the PP2_CLIENT_SSL flag: the client spoke TLS to the balancer, which terminated it;
    `tls_version` is then the version the balancer named in that TLV ("TLSv1.3"), if it did.
    Other TLVs are checked for their framing only (parse_tlvs), and a v1 header has none.
    """

    version: int
    command: str
    family: str | None
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int
    client_tls: bool = False
    tls_version: str | None = None


class ProxyProtocolError(ValueError):
    """The stream does not start with a valid PROXY header; the message says why, on one line."""


class _NeedMore(enum.Enum):
    NEED_MORE = "NEED_MORE"

    def __repr__(self) -> str:
        return "NEED_MORE"


# Returned by parse_proxy_header for a valid but incomplete header: read more and call again.
# An enum member rather than object() so that `result is NEED_MORE` narrows the type.
NEED_MORE: Final = _NeedMore.NEED_MORE


def parse_proxy_header(data: bytes | bytearray | memoryview) -> ProxyHeader | _NeedMore:
    """Parse a PROXY header at the start of `data`.

    Returns a ProxyHeader, or NEED_MORE when `data` is a valid prefix of a header but
    incomplete; raises ProxyProtocolError when it is not a PROXY header or is malformed. Never
    reads past the header (length says where the HTTP bytes start).

    The answer only moves forward as bytes arrive: once `data` is refused, no longer `data`
    is accepted, and once a header is returned, more bytes return the same header. The
    version is told by the first bytes: the 12-byte v2 signature, or "PROXY " for v1.
    """
    head = bytes(data[: len(V2_SIGNATURE)])
    if head.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if head.startswith(V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(head) or V1_PREFIX.startswith(head):
        return NEED_MORE
    raise ProxyProtocolError(f"not a PROXY protocol header: starts with {head!r}")


# -- version 1: one line of text --------------------------------------------------------------


def _parse_v1(data: bytes | bytearray | memoryview) -> ProxyHeader | _NeedMore:
    window = bytes(data[:V1_MAX_LENGTH])
    end = window.find(b"\r\n")
    if end >= 0:
        return _v1_line(window[:end], end + 2)
    if len(window) >= V1_MAX_LENGTH:
        raise ProxyProtocolError(f"PROXY v1 line has no CRLF within {V1_MAX_LENGTH} bytes")
    if window.endswith(b"\r"):
        # Only an LF can follow, so the line is complete already: judge it now.
        _v1_line(window[:-1], len(window) + 1)
        return NEED_MORE
    _v1_partial(window)
    return NEED_MORE


def _v1_line(line: bytes, length: int) -> ProxyHeader:
    """The header of one whole v1 line, given without its CRLF."""
    if b"\r" in line or b"\n" in line:
        # The line must end with CRLF and nothing else: a lone CR or LF is how two parsers
        # come to disagree on where the line ends.
        raise ProxyProtocolError(f"PROXY v1 line has a lone CR or LF: {line!r}")
    fields = line.split(b" ")
    if len(fields) < 2:
        raise ProxyProtocolError(f"PROXY v1 line has no protocol: {line!r}")
    if fields[1] == b"UNKNOWN":
        # The sender could not say (or would not): whatever follows up to CRLF is ignored.
        return ProxyHeader(1, "LOCAL", None, None, None, length)
    if fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1 protocol {fields[1]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyProtocolError(
            f"PROXY v1 {fields[1].decode()} line needs 6 fields separated by single spaces, "
            f"has {len(fields)}: {line!r}"
        )
    v6 = fields[1] == b"TCP6"
    source = _v1_address(fields[2], v6, "source")
    destination = _v1_address(fields[3], v6, "destination")
    sport = _v1_port(fields[4], "source")
    dport = _v1_port(fields[5], "destination")
    family = "tcp6" if v6 else "tcp4"
    return ProxyHeader(1, "PROXY", family, (source, sport), (destination, dport), length)


def _v1_address(field: bytes, v6: bool, which: str) -> str:
    chars = _IPV6_CHARS if v6 else _IPV4_CHARS
    name = "IPv6" if v6 else "IPv4"
    if not field or not chars.issuperset(field):
        raise ProxyProtocolError(f"PROXY v1 {which} address {field!r} is not {name}")
    try:
        # ipaddress refuses leading zeros in IPv4, more than one "::", groups of more than four
        # digits and a wrong count of bits; the character check above keeps out scopes and
        # anything non-ASCII. "::ffff:192.0.2.1" is accepted: inet_ntop() writes it so.
        address = (ipaddress.IPv6Address if v6 else ipaddress.IPv4Address)(field.decode())
    except ValueError as e:
        raise ProxyProtocolError(f"PROXY v1 {which} address {field!r} is not {name}: {e}") from e
    return _address_text(address)


def _v1_port(field: bytes, which: str) -> int:
    if _PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise ProxyProtocolError(
            f"PROXY v1 {which} port {field!r} is not a decimal 0-65535 without leading zeros"
        )
    return int(field)


def _v1_partial(window: bytes) -> None:
    """Refuse an incomplete v1 line (no CR or LF yet) that no more bytes could make valid.

    Only refusals that are certain: each whole field is checked as in a whole line, the field
    being written only for characters and size. Lenient beyond that is fine, the whole line is
    checked when its CRLF comes.
    """
    if b"\r" in window or b"\n" in window:  # not at the end: that CR is handled before
        raise ProxyProtocolError(f"PROXY v1 line has a lone CR or LF: {window!r}")
    fields = window[len(V1_PREFIX) :].split(b" ")
    last = len(fields) - 1
    protocol = fields[0]
    if last == 0:
        if not any(name.startswith(protocol) for name in (b"TCP4", b"TCP6", b"UNKNOWN")):
            raise ProxyProtocolError(f"PROXY v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
        return
    if protocol == b"UNKNOWN":
        return  # anything may follow
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1 protocol {protocol!r} is not TCP4, TCP6 or UNKNOWN")
    if last > 4:
        raise ProxyProtocolError(f"PROXY v1 line has more than 6 fields: {window!r}")
    v6 = protocol == b"TCP6"
    chars, most = (_IPV6_CHARS, _IPV6_TEXT_MAX) if v6 else (_IPV4_CHARS, _IPV4_TEXT_MAX)
    for index, field in enumerate(fields[1:], start=1):
        which = "source" if index in (1, 3) else "destination"
        if index <= 2 and index < last:
            _v1_address(field, v6, which)
        elif index <= 2 and (not chars.issuperset(field) or len(field) > most):
            raise ProxyProtocolError(f"PROXY v1 {which} address {field!r} is not valid")
        elif index > 2 and (field or index < last):
            # Every prefix of a valid port but "" is a valid port: check it as a whole one.
            _v1_port(field, which)


# -- version 2: binary --------------------------------------------------------------------------


def _parse_v2(data: bytes | bytearray | memoryview) -> ProxyHeader | _NeedMore:
    fixed = bytes(data[:V2_FIXED_LENGTH])
    if len(fixed) <= 12:
        return NEED_MORE
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"PROXY v2 header has version {version}, not 2")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyProtocolError(f"PROXY v2 header has command {command:#x}, not LOCAL or PROXY")
    if len(fixed) <= 13:
        return NEED_MORE
    af, proto = fixed[13] >> 4, fixed[13] & 0x0F
    if command == _V2_PROXY:
        # For LOCAL the specification has the family ignored, whatever it says.
        if af not in _V2_ADDRESS_BLOCK:
            raise ProxyProtocolError(f"PROXY v2 header has address family {af:#x}")
        if proto not in (_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM):
            raise ProxyProtocolError(f"PROXY v2 header has transport protocol {proto:#x}")
    if len(fixed) < V2_FIXED_LENGTH:
        return NEED_MORE
    block_length = int.from_bytes(fixed[14:16], "big")
    if block_length > V2_MAX_BLOCK:
        raise ProxyProtocolError(
            f"PROXY v2 header announces {block_length} bytes of addresses and TLVs, "
            f"over the limit of {V2_MAX_BLOCK}"
        )
    needed = 0
    if command == _V2_PROXY and proto != _PROTO_UNSPEC:
        # An UNSPEC transport says the address information is to be ignored; otherwise the
        # family says how much of it there must be.
        needed = _V2_ADDRESS_BLOCK[af]
    if block_length < needed:
        raise ProxyProtocolError(
            f"PROXY v2 header of family {fixed[13]:#04x} announces {block_length} bytes, "
            f"its addresses need {needed}"
        )
    length = V2_FIXED_LENGTH + block_length
    if command == _V2_LOCAL or proto != _PROTO_STREAM or af not in (_AF_INET, _AF_INET6):
        # Nothing of this header is used, so what follows the addresses is skipped unread, as
        # HAProxy does: TLVs are read for TCP over IPv4 and IPv6 only.
        if len(data) < length:
            return NEED_MORE
        return ProxyHeader(
            2, "LOCAL" if command == _V2_LOCAL else "PROXY", None, None, None, length
        )
    # The TLVs that are here already are checked now: a TLV that cannot fit in the announced
    # length is refused as soon as its type and length are seen.
    tlvs, _ = _walk_tlvs(data, V2_FIXED_LENGTH + needed, length, "header")
    client_tls, tls_version = _tls_of(tlvs)
    if len(data) < length:
        return NEED_MORE
    _check_crc32c(data, length, V2_FIXED_LENGTH + needed, tlvs)
    size = 4 if af == _AF_INET else 16
    block = bytes(data[V2_FIXED_LENGTH : V2_FIXED_LENGTH + needed])
    make = ipaddress.IPv4Address if af == _AF_INET else ipaddress.IPv6Address
    source = _address_text(make(block[:size]))
    destination = _address_text(make(block[size : 2 * size]))
    sport = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    family = "tcp4" if af == _AF_INET else "tcp6"
    return ProxyHeader(
        2, "PROXY", family, (source, sport), (destination, dport), length, client_tls, tls_version
    )


def _check_crc32c(
    data: bytes | bytearray | memoryview,
    length: int,
    offset: int,
    tlvs: list[tuple[int, bytes]],
) -> None:
    """Verify the CRC32C TLV among `tlvs`, if any, of the complete v2 header that is the first
    `length` bytes of `data`, its TLVs starting at `offset`: the checksum of the header with
    that TLV's value as zeros."""
    for kind, value in tlvs:
        if kind != PP2_TYPE_CRC32C:
            offset += _TLV_HEAD + len(value)
            continue
        if len(value) != 4:
            raise ProxyProtocolError(
                f"PROXY v2 header has a CRC32C TLV of {len(value)} bytes, not 4"
            )
        at = offset + _TLV_HEAD
        header = bytes(data[:length])
        computed = crc32c(header[:at] + bytes(4) + header[at + 4 :])
        sent = int.from_bytes(value, "big")
        if sent != computed:
            raise ProxyProtocolError(
                f"PROXY v2 header's CRC32C is {sent:#010x}, its bytes sum to "
                f"{computed:#010x}: damaged or forged"
            )
        return


def parse_tlvs(block: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """The TLVs of `block` (what follows the addresses of a v2 header, or the sub-TLVs of an
    SSL TLV after its first 5 bytes) as (type, value), in order.

    Raises ProxyProtocolError unless the TLVs fill `block` exactly: a TLV whose value runs
    past the end, or a block that ends inside a TLV's 3 bytes of type and length. Such a
    block is not padding to skip (padding is a NOOP TLV, 0x04) but a header written wrong,
    and the receiver that skips it and the one that reads it would disagree on what it says.
    """
    tlvs, _ = _walk_tlvs(block, 0, len(block), "TLV block")
    return tlvs


def _walk_tlvs(
    data: bytes | bytearray | memoryview, start: int, end: int, where: str
) -> tuple[list[tuple[int, bytes]], bool]:
    """The TLVs from `start` to `end` of `data` as far as `data` goes, and whether it went to
    `end`. The refusals are certain whatever bytes come later: they depend on `end` and on
    TLV heads that are there, never on where `data` stops."""
    tlvs: list[tuple[int, bytes]] = []
    available = min(len(data), end)
    offset = start
    while offset < end:
        if end - offset < _TLV_HEAD:
            raise ProxyProtocolError(
                f"PROXY v2 {where} ends {end - offset} bytes into a TLV, "
                f"whose type and length take {_TLV_HEAD}"
            )
        if available - offset < _TLV_HEAD:
            return tlvs, False
        kind = data[offset]
        size = int.from_bytes(data[offset + 1 : offset + _TLV_HEAD], "big")
        value_end = offset + _TLV_HEAD + size
        if value_end > end:
            raise ProxyProtocolError(
                f"PROXY v2 {where} has a TLV of type {kind:#04x} announcing {size} bytes, "
                f"{end - offset - _TLV_HEAD} are left"
            )
        if value_end > available:
            return tlvs, False
        tlvs.append((kind, bytes(data[offset + _TLV_HEAD : value_end])))
        offset = value_end
    return tlvs, True


def _tls_of(tlvs: list[tuple[int, bytes]]) -> tuple[bool, str | None]:
    """Whether the SSL TLV among `tlvs` says the client spoke TLS, and the version it names.

    The SSL TLV is read as the specification has it (section 2.2.6): the client flags, the
    4-byte verify field (not used: rawproxy does not act on client certificates), then
    sub-TLVs filling the rest exactly. Two SSL TLVs, or two versions in one, are refused: two
    answers to one question is how two readers come to different ones. The version must be
    printable US-ASCII, as the specification says it is.
    """
    found = [value for kind, value in tlvs if kind == PP2_TYPE_SSL]
    if not found:
        return False, None
    if len(found) > 1:
        raise ProxyProtocolError(f"PROXY v2 header has {len(found)} SSL TLVs, at most 1 is valid")
    value = found[0]
    if len(value) < _SSL_FIXED:
        raise ProxyProtocolError(
            f"PROXY v2 SSL TLV has {len(value)} bytes, its client flags and verify field "
            f"need {_SSL_FIXED}"
        )
    subs, _ = _walk_tlvs(value, _SSL_FIXED, len(value), "SSL TLV")
    versions = [text for kind, text in subs if kind == PP2_SUBTYPE_SSL_VERSION]
    if len(versions) > 1:
        raise ProxyProtocolError(f"PROXY v2 SSL TLV names {len(versions)} TLS versions")
    version = None
    if versions:
        text = versions[0]
        if not text or not all(0x20 <= c < 0x7F for c in text):
            raise ProxyProtocolError(
                f"PROXY v2 SSL TLV names TLS version {text!r}, not printable US-ASCII"
            )
        version = text.decode("ascii")
    if not value[0] & PP2_CLIENT_SSL:
        return False, None  # the balancer says the client did not use TLS: nothing to name
    return True, version


def _address_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as a socket's getpeername() shows it, the same on every Python version.

    Python 3.13 changed str() of an IPv4-mapped address from "::ffff:c000:201" to
    "::ffff:192.0.2.1"; we always give the latter, which is what a dual-stack listener
    reports for a direct IPv4 client, so that both look alike in logs and forwarded headers.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


# -- writing a header -----------------------------------------------------------------------


def encode_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """The v1 line announcing a TCP connection from `source` to `destination`.

    TCP4 when both addresses are IPv4 (an IPv4-mapped IPv6 address counts as IPv4), else TCP6
    with any IPv4 address mapped into ::ffff:0:0/96. IPv6 addresses are written in hexadecimal
    groups only, as the specification has it: a strict receiver may refuse the dotted tail.
    Raises ValueError for an address that is not IP or a port outside 0-65535.
    """
    src, dst, v6 = _endpoints(source, destination)
    if v6:
        line = f"PROXY TCP6 {_hex_v6(src)} {_hex_v6(dst)}"
    else:
        line = f"PROXY TCP4 {ipaddress.IPv4Address(src)} {ipaddress.IPv4Address(dst)}"
    return f"{line} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(
    source: tuple[str, int],
    destination: tuple[str, int],
    *,
    client_tls: bool = False,
    tls_version: str | None = None,
) -> bytes:
    """The v2 header of a PROXY command for TCP from `source` to `destination`.

    The family is chosen as for encode_v1. With `client_tls` (the client spoke TLS to us) an
    SSL TLV follows the addresses, as HAProxy's send-proxy-v2-ssl writes it: the
    PP2_CLIENT_SSL flag, a verify field of 0 (no client certificate was asked for) and the
    `tls_version` ("TLSv1.3") in a PP2_SUBTYPE_SSL_VERSION sub-TLV when it is known. Without
    it, no TLVs. Raises ValueError for an address that is not IP, a port outside 0-65535, or
    a version that is not printable US-ASCII or comes without `client_tls`.
    """
    src, dst, v6 = _endpoints(source, destination)
    family = (_AF_INET6 if v6 else _AF_INET) << 4 | _PROTO_STREAM
    block = src + dst + source[1].to_bytes(2, "big") + destination[1].to_bytes(2, "big")
    if client_tls:
        block += _tlv(PP2_TYPE_SSL, _ssl_value(tls_version))
    elif tls_version is not None:
        raise ValueError(f"TLS version {tls_version!r} for a client that did not use TLS")
    return V2_SIGNATURE + bytes([0x20 | _V2_PROXY, family]) + len(block).to_bytes(2, "big") + block


def _ssl_value(tls_version: str | None) -> bytes:
    """The value of an SSL TLV: client flags, verify, and the version sub-TLV if known."""
    value = bytes([PP2_CLIENT_SSL]) + (0).to_bytes(4, "big")
    if tls_version is not None:
        if not tls_version or not all(" " <= c <= "~" for c in tls_version):
            raise ValueError(f"TLS version {tls_version!r} is not printable US-ASCII")
        value += _tlv(PP2_SUBTYPE_SSL_VERSION, tls_version.encode("ascii"))
    return value


def _tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def _endpoints(source: tuple[str, int], destination: tuple[str, int]) -> tuple[bytes, bytes, bool]:
    """Both addresses packed, 4 bytes each for IPv4 or 16 for IPv6, and whether it is IPv6."""
    for _, port in (source, destination):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is outside 0-65535")
    # .packed drops an IPv6 scope ("%eth0"): it names an interface of this host only.
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    src4 = src if isinstance(src, ipaddress.IPv4Address) else src.ipv4_mapped
    dst4 = dst if isinstance(dst, ipaddress.IPv4Address) else dst.ipv4_mapped
    if src4 is not None and dst4 is not None:
        return src4.packed, dst4.packed, False
    return _as_v6(src), _as_v6(dst), True


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(address, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + address.packed
    return address.packed


def _hex_v6(packed: bytes) -> str:
    """RFC 5952 text of an IPv6 address in hexadecimal groups only, even when IPv4-mapped.

    str() of an IPv6Address would do on Python 3.11 but writes a dotted tail for mapped
    addresses from 3.13 on; this keeps the bytes we send the same on every version.
    """
    groups = [int.from_bytes(packed[i : i + 2], "big") for i in range(0, 16, 2)]
    # The longest run of two or more zero groups (the first of equal ones) becomes "::".
    best_start, best_length, index = 0, 0, 0
    while index < 8:
        run = index
        while run < 8 and groups[run] == 0:
            run += 1
        if run - index > best_length:
            best_start, best_length = index, run - index
        index = max(run, index + 1)
    text = [f"{group:x}" for group in groups]
    if best_length < 2:
        return ":".join(text)
    return ":".join(text[:best_start]) + "::" + ":".join(text[best_start + best_length :])
