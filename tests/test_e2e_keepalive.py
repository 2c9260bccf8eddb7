"""A kept-alive backend connection that the backend closes just as the proxy reuses it: an
idempotent request (GET, DELETE, ...) without a body is sent again on a new connection; one
with a body, or a POST even without one (the backend may have run it), is not, and the client
gets 502."""

from __future__ import annotations

import itertools

from peers import request_bytes, simple_get

FIRST = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"


def closes_when_reused(counter: itertools.count[int]):
    """Connection 1 answers one request, then closes on reading the next head unanswered;
    later connections answer with SECOND."""

    def script(conn) -> None:
        if next(counter) == 0:
            conn.sock.sendall(FIRST)
            while b"\r\n\r\n" not in conn.extra:
                data = conn.sock.recv(65536)
                if not data:
                    return
                conn.extra += data
            return  # the handler closes the socket: the second request is dropped unanswered
        conn.sock.sendall(SECOND)

    return script


def test_bodiless_request_retried_on_a_fresh_connection(scripted_backend, start_proxy, client):
    backend = scripted_backend(closes_when_reused(itertools.count()))
    proxy = start_proxy(backend.port, "--log-level", "debug")
    c = client(proxy.port)
    assert c.request(simple_get("/1")).body == b"first"
    second = c.request(simple_get("/2"))
    assert second.status == 200
    assert second.body == b"second"
    proxy.wait_for_log(r"retrying on a new one")


def test_request_with_body_not_retried(scripted_backend, start_proxy, client):
    backend = scripted_backend(closes_when_reused(itertools.count()))
    proxy = start_proxy(backend.port)
    c = client(proxy.port)
    assert c.request(simple_get("/1")).body == b"first"
    post = request_bytes(
        "POST", "/2", [("Host", "backend.test"), ("Content-Length", "4")], body=b"data"
    )
    assert c.request(post, "POST").status == 502


def test_post_without_body_not_retried(scripted_backend, start_proxy, client):
    """The backend may have run the POST before it closed: sending it again could charge a
    card twice. The client gets 502, and the backend saw the POST once."""
    counter = itertools.count()
    backend = scripted_backend(closes_when_reused(counter))
    proxy = start_proxy(backend.port)
    c = client(proxy.port)
    assert c.request(simple_get("/1")).body == b"first"
    post = request_bytes("POST", "/2", [("Host", "backend.test"), ("Content-Length", "0")])
    assert c.request(post, "POST").status == 502
    assert next(counter) == 1  # no second backend connection was opened


def test_delete_without_body_retried(scripted_backend, start_proxy, client):
    """DELETE is idempotent (RFC 9110 9.2.2): repeating it changes nothing more."""
    backend = scripted_backend(closes_when_reused(itertools.count()))
    proxy = start_proxy(backend.port, "--log-level", "debug")
    c = client(proxy.port)
    assert c.request(simple_get("/1")).body == b"first"
    delete = request_bytes("DELETE", "/2", [("Host", "backend.test")])
    assert c.request(delete, "DELETE").body == b"second"
    proxy.wait_for_log(r"retrying on a new one")


def test_an_answer_with_both_framings_ends_its_backend_connection(
    scripted_backend, start_proxy, client
):
    """A backend that sends Content-Length and Transfer-Encoding together may frame its body
    by either: the proxy reads it by Transfer-Encoding (and drops the Content-Length), and
    then does not reuse that connection, where bytes past its reading of the end would be
    taken for the next answer (RFC 9112 6.3; Apache's mod_proxy closes it too)."""

    def script(conn) -> str:
        if b" /second " in conn.head.split(b"\r\n", 1)[0]:
            conn.sock.sendall(SECOND)
            conn.sock.recv(1)
            return "second"
        conn.sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nfirst\r\n0\r\n\r\n"
        )
        more = conn.sock.recv(65536)  # the next request if reused, b"" once closed
        return "reused" if more else "closed"

    backend = scripted_backend(script)
    proxy = start_proxy(backend.port, "--log-level", "debug")
    mark = proxy.mark()
    c = client(proxy.port)
    first = c.request(simple_get("/first"))
    assert first.status == 200
    assert first.body == b"first"
    assert first.values("content-length") == []
    assert backend.result(timeout=5) == "closed"
    assert c.request(simple_get("/second")).body == b"second"  # the client's stays open
    assert "both Content-Length and Transfer-Encoding" in proxy.wait_for_log("not reused", mark)
