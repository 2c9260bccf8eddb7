"""The counters of one process, and their rendering in the Prometheus text format (0.0.4).

Metrics are updated on the proxy's hot paths, so an update is a plain `+=` on an attribute, a
list index or a dict key, or for a histogram a bisect into a list of bucket counts: no locks
(the process is one thread), no string formatting, nothing allocated but the new number. All
the text is built by `Metrics.render()`, when /metrics is scraped; the loop is single-threaded,
so what it renders is one consistent snapshot.
"""

from __future__ import annotations

import errno
import gc
import itertools
import math
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence

from rawproxy import __version__

# What a /metrics response says it is (the text exposition format, version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
CONNECT_ERROR_CAUSES = ("refused", "timeout", "unreachable", "reset", "tls", "dns", "other")
TLS_SIDES = ("client", "backend")

# Upper bounds (seconds) of the latency buckets; +Inf is implied.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_ERRNO_CAUSES = {
    errno.ECONNREFUSED: "refused",
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.EHOSTDOWN: "unreachable",
    errno.ENETDOWN: "unreachable",
    errno.ECONNRESET: "reset",
    errno.ECONNABORTED: "reset",
    errno.EPIPE: "reset",
}


def classify_connect_error(
    errno_value: int | None, timed_out: bool = False, tls: bool = False, dns: bool = False
) -> str:
    """The `cause` label of a failed backend connection, one of CONNECT_ERROR_CAUSES.

    The flags win over the errno, in the order tls, dns, timed_out: an ssl.SSLError carries an
    OpenSSL code in `errno` and a socket.gaierror an EAI_* code, neither of which is an errno,
    so the caller says what failed rather than passing those on.
    """
    if tls:
        return "tls"
    if dns:
        return "dns"
    if timed_out:
        return "timeout"
    if errno_value is None:
        return "other"
    return _ERRNO_CAUSES.get(errno_value, "other")


class Histogram:
    """Observations counted in fixed buckets.

    `counts[i]` holds the observations in (bounds[i-1], bounds[i]], so a value equal to a bound
    counts in that bound's bucket; the last entry holds those above every bound (+Inf). The
    counts are per bucket, not cumulative: rendering adds them up, and the total count is their
    sum, so it is not kept apart. Values are expected to be finite and non-negative (durations
    from time.monotonic()); nothing checks, to keep observing cheap.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        floats = tuple(float(b) for b in bounds)
        if not floats or not all(math.isfinite(b) for b in floats):
            raise ValueError("histogram bounds must be finite and not empty")
        if any(a >= b for a, b in itertools.pairwise(floats)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds = floats
        self.counts = [0] * (len(floats) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class Metrics:
    """All counters of one process. Updating is a plain += ; rendering builds the text.

    The attributes are slots: a misspelt counter raises AttributeError instead of quietly
    becoming a new attribute that is never rendered.
    """

    __slots__ = (
        "backend_connect_errors",
        "bytes_backend_to_client",
        "bytes_client_to_backend",
        "connect_latency",
        "connections_open",
        "connections_total",
        "head_latency",
        "idle_reclaimed",
        "proxy_protocol_errors",
        "requests_by_class",
        "tls_handshake_failures",
        "tunnels_open",
        "tunnels_total",
    )

    # gauges: set by the owner before rendering, or incremented and decremented
    connections_open: int
    tunnels_open: int
    # counters
    connections_total: int
    tunnels_total: int
    requests_by_class: list[int]  # index 1..5 for 1xx..5xx (0 unused): use count_request()
    bytes_client_to_backend: int
    bytes_backend_to_client: int
    backend_connect_errors: dict[str, int]  # cause (CONNECT_ERROR_CAUSES) -> count
    tls_handshake_failures: dict[str, int]  # side (TLS_SIDES) -> count
    proxy_protocol_errors: int
    idle_reclaimed: int  # idle client connections closed at --max-connections
    # histograms: use observe_head_latency() and observe_connect_latency()
    head_latency: Histogram
    connect_latency: Histogram

    def __init__(self) -> None:
        self.connections_open = 0
        self.tunnels_open = 0
        self.connections_total = 0
        self.tunnels_total = 0
        self.requests_by_class = [0] * 6
        self.bytes_client_to_backend = 0
        self.bytes_backend_to_client = 0
        self.backend_connect_errors = dict.fromkeys(CONNECT_ERROR_CAUSES, 0)
        self.tls_handshake_failures = dict.fromkeys(TLS_SIDES, 0)
        self.proxy_protocol_errors = 0
        self.idle_reclaimed = 0
        self.head_latency = Histogram()
        self.connect_latency = Histogram()

    def count_request(self, status: int) -> None:
        """Count a response by the class of its status; a status outside 100..599 is ignored."""
        if 100 <= status < 600:
            self.requests_by_class[status // 100] += 1

    def observe_head_latency(self, seconds: float) -> None:
        """Request head fully received -> response head sent to the client."""
        histogram = self.head_latency
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def observe_connect_latency(self, seconds: float) -> None:
        """Backend connect (and TLS handshake) duration."""
        histogram = self.connect_latency
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def render(self, extra_labels: Mapping[str, str] | None = None) -> bytes:
        """The text exposition format (CONTENT_TYPE), `extra_labels` added to every sample.

        Every family has its HELP and TYPE lines, and every labelled sample is present even at
        zero. An `extra_labels` name must be a valid label name not used by a metric here
        (ValueError otherwise).
        """
        out = _Writer(extra_labels)

        out.family("rawproxy_info", "gauge", "rawproxy build information; the value is always 1.")
        out.sample("rawproxy_info", 1, ("version", __version__))

        out.family("rawproxy_connections_open", "gauge", "Client connections open now.")
        out.sample("rawproxy_connections_open", self.connections_open)
        out.family("rawproxy_tunnels_open", "gauge", "Tunnels (upgraded connections) open now.")
        out.sample("rawproxy_tunnels_open", self.tunnels_open)

        out.family("rawproxy_connections_total", "counter", "Client connections accepted.")
        out.sample("rawproxy_connections_total", self.connections_total)
        out.family(
            "rawproxy_tunnels_total", "counter", "Tunnels opened (upgrades the backend accepted)."
        )
        out.sample("rawproxy_tunnels_total", self.tunnels_total)

        name = "rawproxy_requests_total"
        out.family(name, "counter", "Responses sent to clients, by status class.")
        for index, code_class in enumerate(CODE_CLASSES, start=1):
            out.sample(name, self.requests_by_class[index], ("code_class", code_class))

        name = "rawproxy_bytes_total"
        out.family(name, "counter", "Bytes relayed between clients and backends, by direction.")
        out.sample(name, self.bytes_client_to_backend, ("direction", "client_to_backend"))
        out.sample(name, self.bytes_backend_to_client, ("direction", "backend_to_client"))

        name = "rawproxy_backend_connect_errors_total"
        out.family(name, "counter", "Failed backend connection attempts, by cause.")
        for cause, count in _known_first(self.backend_connect_errors, CONNECT_ERROR_CAUSES):
            out.sample(name, count, ("cause", cause))

        name = "rawproxy_tls_handshake_failures_total"
        out.family(
            name,
            "counter",
            "Failed TLS handshakes, by side (client: with a client; backend: with a backend).",
        )
        for side, count in _known_first(self.tls_handshake_failures, TLS_SIDES):
            out.sample(name, count, ("side", side))

        name = "rawproxy_proxy_protocol_errors_total"
        out.family(
            name, "counter", "Connections closed for a missing or malformed PROXY protocol header."
        )
        out.sample(name, self.proxy_protocol_errors)

        name = "rawproxy_idle_connections_reclaimed_total"
        out.family(
            name,
            "counter",
            "Idle client connections (kept alive between requests, or not sent a request yet) "
            "closed to make room for new clients at --max-connections.",
        )
        out.sample(name, self.idle_reclaimed)

        out.histogram(
            "rawproxy_request_head_latency_seconds",
            "Time from a request head fully received to the response head sent to the client.",
            self.head_latency,
        )
        out.histogram(
            "rawproxy_backend_connect_latency_seconds",
            "Time to connect to a backend, TLS handshake included.",
            self.connect_latency,
        )

        name = "rawproxy_gc_collections_total"
        out.family(name, "counter", "Runs of Python's cyclic garbage collector, by generation.")
        for generation, stats in enumerate(gc.get_stats()):
            out.sample(name, stats["collections"], ("generation", str(generation)))
        name = "rawproxy_gc_frozen_objects"
        out.family(
            name, "gauge", "Objects of start-up that no collection walks (gc.freeze when serving)."
        )
        out.sample(name, gc.get_freeze_count())
        return out.getvalue()


def _known_first(counts: Mapping[str, int], known: Sequence[str]) -> list[tuple[str, int]]:
    """The known keys in their order (0 when absent), then any other key, sorted."""
    items = [(key, counts.get(key, 0)) for key in known]
    items.extend(sorted((key, n) for key, n in counts.items() if key not in known))
    return items


# -- the text format ---------------------------------------------------------------------------

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The label names the metrics above use themselves: an extra label may not repeat one.
RESERVED_LABELS = frozenset({"code_class", "direction", "cause", "side", "le", "version"})


def escape_label_value(value: str) -> str:
    """A label value as it goes between the double quotes (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: ints exactly, floats as Python's shortest repr, +Inf, -Inf and NaN."""
    if isinstance(value, int):
        return str(int(value))  # int() so that a bool renders as 0 or 1
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label_pairs(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{escape_label_value(value)}"' for name, value in pairs)


class _Writer:
    def __init__(self, extra_labels: Mapping[str, str] | None) -> None:
        extra = dict(extra_labels or {})
        for label in extra:
            if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"invalid label name {label!r}")
            if label in RESERVED_LABELS:
                raise ValueError(f"label name {label!r} is used by rawproxy's own metrics")
        self._extra = _label_pairs(extra.items())
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self._lines.append(f"# HELP {name} {_escape_help(help_text)}")
        self._lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, *labels: tuple[str, str]) -> None:
        own = _label_pairs(labels)
        joined = f"{self._extra},{own}" if self._extra and own else self._extra or own
        if joined:
            self._lines.append(f"{name}{{{joined}}} {format_value(value)}")
        else:
            self._lines.append(f"{name} {format_value(value)}")

    def histogram(self, name: str, help_text: str, histogram: Histogram) -> None:
        self.family(name, "histogram", help_text)
        cumulative = 0
        for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, ("le", format_value(bound)))
        cumulative += histogram.counts[-1]
        self.sample(f"{name}_bucket", cumulative, ("le", "+Inf"))
        self.sample(f"{name}_sum", histogram.sum)
        self.sample(f"{name}_count", cumulative)

    def getvalue(self) -> bytes:
        self._lines.append("")
        return "\n".join(self._lines).encode()
