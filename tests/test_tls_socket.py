"""TlsSocket (TLS over memory BIOs) read by receive_into, as the session and the tunnel read
it: a small record costs one read from the kernel (not a second one for EAGAIN), bulk fills
the buffer over several kernel reads, and a close_notify read together with the last data is
still reported. Real TLS (trustme) between loopback TCP sockets, in this process."""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
import trustme

from rawproxy.transport import TlsSocket, receive_into

pytestmark = pytest.mark.timeout(30)


class CountingSocket:
    """The raw socket under a TlsSocket, counting the reads from the kernel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reads = 0

    def recv_into(self, view: memoryview) -> int:
        self.reads += 1
        return self.sock.recv_into(view)

    def send(self, data: bytes) -> int:
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tls_pair() -> Iterator[tuple[TlsSocket, TlsSocket, CountingSocket]]:
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("backend.test").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    client = TlsSocket(a, client_ctx, "backend.test")
    server = TlsSocket(b, server_ctx, None)
    done = [False, False]
    deadline = time.monotonic() + 10
    while not all(done):
        assert time.monotonic() < deadline, "TLS handshake did not finish"
        for i, side in enumerate((client, server)):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
    counting = CountingSocket(b)
    server.raw = counting  # type: ignore[assignment]
    yield client, server, counting
    a.close()
    b.close()


def wait_readable(sock: CountingSocket) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(sock.fileno(), selectors.EVENT_READ)
        assert sel.select(5), "nothing arrived"


def read_all(server: TlsSocket, view: memoryview, want: int) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < want:
        assert time.monotonic() < deadline
        n = receive_into(server, view)
        if n > 0:
            got += view[:n]
    return bytes(got)


def test_a_small_record_costs_one_read_from_the_kernel(tls_pair) -> None:
    client, server, counting = tls_pair
    view = memoryview(bytearray(256 * 1024))
    for n in range(3):
        message = b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n
        client.send(message)
        wait_readable(counting)
        before = counting.reads
        assert receive_into(server, view) == len(message)
        assert bytes(view[: len(message)]) == message
        assert counting.reads - before == 1, "a second read from the kernel (EAGAIN)"
    assert receive_into(server, view) == -1  # a readiness event without data: one read


class CountingSslObject:
    """The SSL object under a TlsSocket, counting the want-read errors its reads raise."""

    def __init__(self, obj: ssl.SSLObject) -> None:
        self.obj = obj
        self.want_read = 0

    def read(self, *args: object) -> object:
        try:
            return self.obj.read(*args)  # type: ignore[arg-type]
        except ssl.SSLWantReadError:
            self.want_read += 1
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self.obj, name)


def test_a_read_event_costs_no_exception_from_ssl(tls_pair) -> None:
    """SSL says "want read" with an exception, which costs about 2 us each: a small record
    (a request, a response) is read without one, before or after it (nothing buffered is
    known without asking SSL), and an event without data costs none either."""
    client, server, counting = tls_pair
    counted = CountingSslObject(server._obj)
    server._obj = counted  # type: ignore[assignment]
    view = memoryview(bytearray(256 * 1024))
    for n in range(3):
        message = b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % n
        client.send(message)
        wait_readable(counting)
        assert receive_into(server, view) == len(message)
        assert bytes(view[: len(message)]) == message
    assert receive_into(server, view) == -1
    assert counted.want_read == 0
    # A record that arrives in two pieces: after the first, SSL does want more.
    client._obj.write(b"split")
    record = client._outgoing.read()
    client.raw.send(record[:10])
    wait_readable(counting)
    assert receive_into(server, view) == -1
    client.raw.send(record[10:])
    wait_readable(counting)
    assert receive_into(server, view) == 5
    assert bytes(view[:5]) == b"split"


def test_bulk_is_read_over_several_kernel_reads(tls_pair) -> None:
    client, server, _counting = tls_pair
    data = bytes(range(256)) * 4096  # 1 MiB
    view = memoryview(bytearray(256 * 1024))
    sent = memoryview(data)
    got = bytearray()
    deadline = time.monotonic() + 10
    largest = 0
    while len(got) < len(data):
        assert time.monotonic() < deadline
        if sent:
            with contextlib.suppress(ssl.SSLWantWriteError):
                sent = sent[client.send(sent[: 256 * 1024]) :]
        n = receive_into(server, view)
        if n > 0:
            got += view[:n]
            largest = max(largest, n)
    assert got == data
    assert largest > 64 * 1024, "one event should move more than one kernel read's worth"


def test_close_notify_with_the_last_data_is_reported(tls_pair) -> None:
    """The client sends data and then its close_notify (a TLS half-close), which arrive in
    one kernel read: the data is read, then end of stream, without a new readiness event."""
    client, server, counting = tls_pair
    client.send(b"last words")
    assert client.close_notify()
    time.sleep(0.05)  # both records are in the kernel
    view = memoryview(bytearray(256 * 1024))
    assert read_all(server, view, 10) == b"last words"
    reads = counting.reads
    assert receive_into(server, view) == 0
    assert counting.reads == reads, "end of stream came from the records already read"
