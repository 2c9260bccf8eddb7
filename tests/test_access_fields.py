"""The Referer and User-Agent of an access line, as the session takes them from a request
(rawproxy.session._referer_and_agent): the first of each, names in any case, from the fast
path's raw headers and from h11's alike."""

from __future__ import annotations

import h11

from rawproxy.http import parse_simple_request
from rawproxy.session import _referer_and_agent

HEAD = (
    b"GET /ws HTTP/1.1\r\nHost: app.test\r\nuser-AGENT: first/1\r\nX-Referer: not-this\r\n"
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nREFERER: https://app.test/a\r\n"
    b"User-Agent: second/2\r\nReferer: https://app.test/b\r\nX-User-Agent: no\r\n\r\n"
)


def test_fast_path_request() -> None:
    request = parse_simple_request(HEAD, 65536)
    assert request is not None
    assert _referer_and_agent(request) == ("https://app.test/a", "first/1")


def test_h11_request() -> None:
    machine = h11.Connection(h11.SERVER)
    machine.receive_data(HEAD)
    request = machine.next_event()
    assert isinstance(request, h11.Request)
    assert _referer_and_agent(request) == ("https://app.test/a", "first/1")


def test_neither() -> None:
    request = parse_simple_request(b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n", 65536)
    assert request is not None
    assert _referer_and_agent(request) == (None, None)


def test_latin1_values_kept() -> None:
    request = h11.Request(
        method="GET", target="/", headers=[("Host", "a"), ("User-Agent", b"caf\xe9")]
    )
    assert _referer_and_agent(request) == (None, "caf\xe9")
