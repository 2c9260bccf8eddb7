"""Unit tests of rawproxy.metrics: the counters, the histograms and the text exposition format.

The rendered text is checked by a small strict parser of the Prometheus text format 0.0.4
written here (no third-party parser): every line is a HELP, a TYPE or a sample; every family
has its HELP and TYPE before its samples and its samples together; label values are unescaped;
histogram buckets are cumulative, in increasing `le` order, and end with +Inf equal to _count.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import math
import re

import pytest

from rawproxy import __version__
from rawproxy.metrics import (
    CODE_CLASSES,
    CONNECT_ERROR_CAUSES,
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    TLS_SIDES,
    Histogram,
    Metrics,
    classify_connect_error,
    escape_label_value,
    format_value,
)

# -- a strict parser of the text format -----------------------------------------------------------

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"NaN|[+-]Inf|[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs


@dataclasses.dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float

    @property
    def key(self) -> tuple[str, Labels]:
        return self.name, tuple(sorted(self.labels.items()))


@dataclasses.dataclass
class Family:
    name: str
    help: str | None = None
    type: str | None = None
    samples: list[Sample] = dataclasses.field(default_factory=list)


class FormatError(Exception):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise FormatError(message)


def _unescape(text: str, escapes: dict[str, str]) -> str:
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            _check(following in escapes, f"bad escape \\{following} in {text!r}")
            out.append(escapes[following])
        else:
            out.append(char)
    return "".join(out)


def _parse_labels(line: str, pos: int) -> tuple[dict[str, str], int]:
    """The labels of `line` from just after its '{', and the position just after the '}'."""
    labels: dict[str, str] = {}
    if line.startswith("}", pos):
        return labels, pos + 1
    while True:
        match = _LABEL_NAME.match(line, pos)
        _check(match is not None, f"label name expected at {pos}: {line!r}")
        assert match is not None
        name = match.group()
        _check(not name.startswith("__"), f"reserved label name {name!r}")
        _check(name not in labels, f"label {name!r} twice: {line!r}")
        pos = match.end()
        _check(line.startswith('="', pos), f"'=\"' expected at {pos}: {line!r}")
        pos += 2
        value: list[str] = []
        while True:
            _check(pos < len(line), f"unterminated label value: {line!r}")
            char = line[pos]
            if char == "\\":
                following = line[pos + 1 : pos + 2]
                escapes = {"\\": "\\", '"': '"', "n": "\n"}
                _check(following in escapes, f"bad escape in a label value: {line!r}")
                value.append(escapes[following])
                pos += 2
            elif char == '"':
                pos += 1
                break
            else:
                value.append(char)
                pos += 1
        labels[name] = "".join(value)
        if line.startswith("}", pos):
            return labels, pos + 1
        _check(line.startswith(",", pos), f"',' or '}}' expected at {pos}: {line!r}")
        pos += 1


def _parse_sample(line: str) -> Sample:
    match = _METRIC_NAME.match(line)
    _check(match is not None, f"metric name expected: {line!r}")
    assert match is not None
    pos = match.end()
    labels: dict[str, str] = {}
    if line.startswith("{", pos):
        labels, pos = _parse_labels(line, pos + 1)
    _check(line.startswith(" ", pos), f"one space before the value expected: {line!r}")
    value = line[pos + 1 :]
    _check(_VALUE.fullmatch(value) is not None, f"bad value {value!r} (no timestamps here)")
    return Sample(match.group(), labels, float(value))


def _family_of(sample: str, family: Family) -> bool:
    if family.type in ("histogram", "summary"):
        return any(sample == family.name + suffix for suffix in _HISTOGRAM_SUFFIXES)
    return sample == family.name


def parse(text: str) -> dict[str, Family]:
    """The families of an exposition, in order; FormatError at the first thing out of place."""
    _check(text.endswith("\n"), "the text must end with a newline")
    families: dict[str, Family] = {}
    current: Family | None = None
    seen: set[tuple[str, Labels]] = set()
    for line in text[:-1].split("\n"):
        _check(line != "", "empty line")
        _check(line == line.strip(" \t"), f"leading or trailing blanks: {line!r}")
        if line.startswith("#"):
            parts = line.split(" ", 3)
            _check(
                len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"),
                f"only HELP and TYPE comments are expected: {line!r}",
            )
            name = parts[2]
            _check(_METRIC_NAME.fullmatch(name) is not None, f"bad metric name {name!r}")
            if current is None or current.name != name:
                _check(name not in families, f"family {name} is split or repeated")
                current = families[name] = Family(name)
            _check(not current.samples, f"{parts[1]} of {name} after its samples")
            _check(len(parts) == 4, f"{parts[1]} of {name} without text")
            if parts[1] == "HELP":
                _check(current.help is None, f"two HELP lines for {name}")
                current.help = _unescape(parts[3], {"\\": "\\", "n": "\n"})
            else:
                _check(current.type is None, f"two TYPE lines for {name}")
                _check(parts[3] in _TYPES, f"unknown type {parts[3]!r}")
                current.type = parts[3]
            continue
        sample = _parse_sample(line)
        _check(current is not None, f"sample before any HELP/TYPE: {line!r}")
        assert current is not None
        _check(
            current.help is not None and current.type is not None,
            f"{current.name}: no HELP or TYPE",
        )
        _check(_family_of(sample.name, current), f"{sample.name} outside its family: {line!r}")
        _check(sample.key not in seen, f"duplicate sample: {line!r}")
        seen.add(sample.key)
        current.samples.append(sample)
    for family in families.values():
        _check(bool(family.samples), f"family {family.name} has no samples")
        if family.type == "counter":
            _check(all(s.value >= 0 for s in family.samples), f"{family.name}: negative counter")
        if family.type == "histogram":
            _check_histogram(family)
    return families


def _check_histogram(family: Family) -> None:
    groups: dict[Labels, list[Sample]] = {}
    for sample in family.samples:
        rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
        groups.setdefault(rest, []).append(sample)
    for labels, samples in groups.items():
        buckets = [s for s in samples if s.name == family.name + "_bucket"]
        sums = [s for s in samples if s.name == family.name + "_sum"]
        counts = [s for s in samples if s.name == family.name + "_count"]
        where = f"{family.name}{dict(labels)}"
        _check(len(sums) == 1 and len(counts) == 1, f"{where}: one _sum and one _count expected")
        _check(bool(buckets), f"{where}: no buckets")
        _check(all("le" in s.labels for s in buckets), f"{where}: a bucket without le")
        _check(all("le" not in s.labels for s in sums + counts), f"{where}: le on _sum or _count")
        bounds = [float(s.labels["le"]) for s in buckets]
        _check(all(a < b for a, b in itertools.pairwise(bounds)), f"{where}: le order")
        _check(buckets[-1].labels["le"] == "+Inf", f"{where}: the last bucket is not +Inf")
        values = [s.value for s in buckets]
        _check(all(v == int(v) and v >= 0 for v in values), f"{where}: non-integer bucket")
        _check(
            all(a <= b for a, b in itertools.pairwise(values)),
            f"{where}: buckets not cumulative",
        )
        _check(values[-1] == counts[0].value, f"{where}: +Inf bucket != _count")


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    """The value of the one sample called `name` whose labels include `labels`."""
    for family in families.values():
        found = [
            s
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        if found:
            assert len(found) == 1, found
            return found[0].value
    raise KeyError((name, labels))


def buckets(families: dict[str, Family], name: str) -> dict[str, float]:
    """le -> cumulative count of a histogram without extra labels."""
    return {s.labels["le"]: s.value for s in families[name].samples if s.name == f"{name}_bucket"}


def rendered(metrics: Metrics, extra_labels: dict[str, str] | None = None) -> dict[str, Family]:
    text = metrics.render(extra_labels)
    assert isinstance(text, bytes)
    return parse(text.decode("utf-8"))


# -- the parser itself refuses what it should --------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "# TYPE a counter\na 1\n",  # no HELP
        "# HELP a x\na 1\n",  # no TYPE
        "# HELP a x\n# TYPE a counter\na 1",  # no final newline
        '# HELP a x\n# TYPE a counter\na{b="1"} 1\n# HELP c y\n# TYPE c gauge\nc 1\na 2\n',
        "# HELP a x\n# TYPE a counter\na 1\na 1\n",  # duplicate
        '# HELP a x\n# TYPE a counter\na{b="x\\t"} 1\n',  # bad escape
        '# HELP a x\n# TYPE a counter\na{b="x} 1\n',  # unterminated
        '# HELP a x\n# TYPE a counter\na{b="1",b="2"} 1\n',  # label twice
        "# HELP a x\n# TYPE a counter\na  1\n",  # two spaces
        "# HELP a x\n# TYPE a counter\na inf\n",  # not Go's spelling
        "# HELP a x\n# TYPE a counter\na -1\n",  # negative counter
        "# HELP h x\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 1\n',  # not cumulative
        "# HELP h x\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 2\n',  # +Inf != count
        "# HELP h x\n# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1\nh_bucket{le="0.5"} 1\nh_bucket{le="+Inf"} 1\nh_sum 0\nh_count 1\n',
    ],
)
def test_parser_refuses_bad_text(text: str) -> None:
    with pytest.raises(FormatError):
        parse(text)


def test_parser_reads_labels_and_escapes() -> None:
    text = '# HELP a x\\\\y\\nz\n# TYPE a gauge\na{b="q\\"\\\\\\n",c=""} -1.5e3\n'
    family = parse(text)["a"]
    assert family.help == "x\\y\nz"
    assert family.samples == [Sample("a", {"b": 'q"\\\n', "c": ""}, -1500.0)]


# -- rendering -----------------------------------------------------------------------------------

FAMILIES = {
    "rawproxy_info": "gauge",
    "rawproxy_connections_open": "gauge",
    "rawproxy_tunnels_open": "gauge",
    "rawproxy_connections_total": "counter",
    "rawproxy_tunnels_total": "counter",
    "rawproxy_requests_total": "counter",
    "rawproxy_bytes_total": "counter",
    "rawproxy_backend_connect_errors_total": "counter",
    "rawproxy_tls_handshake_failures_total": "counter",
    "rawproxy_proxy_protocol_errors_total": "counter",
    "rawproxy_idle_connections_reclaimed_total": "counter",
    "rawproxy_request_head_latency_seconds": "histogram",
    "rawproxy_backend_connect_latency_seconds": "histogram",
    "rawproxy_gc_collections_total": "counter",
    "rawproxy_gc_frozen_objects": "gauge",
}
# The collector's figures are the process's, not counted by a Metrics object.
PROCESS_WIDE = ("rawproxy_gc_collections_total", "rawproxy_gc_frozen_objects")
HISTOGRAMS = [name for name, kind in FAMILIES.items() if kind == "histogram"]


def test_fresh_render_is_valid_and_complete() -> None:
    families = rendered(Metrics())
    assert {name: f.type for name, f in families.items()} == FAMILIES
    for name, family in families.items():
        assert name.startswith("rawproxy_")
        assert family.help
        if family.type == "counter":
            assert name.endswith("_total")
    assert value(families, "rawproxy_info", version=__version__) == 1
    for family in families.values():
        if family.name == "rawproxy_info" or family.name in PROCESS_WIDE:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_sum"):
                assert sample.value == 0, sample
    generations = [s.labels["generation"] for s in families[PROCESS_WIDE[0]].samples]
    assert generations == ["0", "1", "2"]
    for name in HISTOGRAMS:
        assert value(families, f"{name}_sum") == 0
        assert list(buckets(families, name)) == [format_value(b) for b in LATENCY_BUCKETS] + [
            "+Inf"
        ]


def test_every_labelled_sample_is_present_at_zero() -> None:
    families = rendered(Metrics())
    classes = [s.labels["code_class"] for s in families["rawproxy_requests_total"].samples]
    assert classes == ["1xx", "2xx", "3xx", "4xx", "5xx"] == list(CODE_CLASSES)
    causes = [s.labels["cause"] for s in families["rawproxy_backend_connect_errors_total"].samples]
    assert causes == list(CONNECT_ERROR_CAUSES)
    assert set(causes) == {"refused", "timeout", "unreachable", "reset", "tls", "dns", "other"}
    sides = [s.labels["side"] for s in families["rawproxy_tls_handshake_failures_total"].samples]
    assert sides == list(TLS_SIDES) == ["client", "backend"]
    directions = [s.labels["direction"] for s in families["rawproxy_bytes_total"].samples]
    assert directions == ["client_to_backend", "backend_to_client"]


def test_values_move_after_updates() -> None:
    m = Metrics()
    m.connections_open += 3
    m.connections_open -= 1
    m.tunnels_open = 4
    m.connections_total += 10
    m.tunnels_total += 5
    m.bytes_client_to_backend += 1234
    m.bytes_backend_to_client += 10**12
    m.backend_connect_errors["refused"] += 2
    m.backend_connect_errors[classify_connect_error(None, dns=True)] += 1
    m.tls_handshake_failures["client"] += 7
    m.proxy_protocol_errors += 1
    families = rendered(m)
    assert value(families, "rawproxy_connections_open") == 2
    assert value(families, "rawproxy_tunnels_open") == 4
    assert value(families, "rawproxy_connections_total") == 10
    assert value(families, "rawproxy_tunnels_total") == 5
    assert value(families, "rawproxy_bytes_total", direction="client_to_backend") == 1234
    assert value(families, "rawproxy_bytes_total", direction="backend_to_client") == 10**12
    assert value(families, "rawproxy_backend_connect_errors_total", cause="refused") == 2
    assert value(families, "rawproxy_backend_connect_errors_total", cause="dns") == 1
    assert value(families, "rawproxy_backend_connect_errors_total", cause="other") == 0
    assert value(families, "rawproxy_tls_handshake_failures_total", side="client") == 7
    assert value(families, "rawproxy_tls_handshake_failures_total", side="backend") == 0
    assert value(families, "rawproxy_proxy_protocol_errors_total") == 1
    # Big integers are written exactly, not through a float.
    assert b'rawproxy_bytes_total{direction="backend_to_client"} 1000000000000\n' in m.render()


def test_count_request_by_class() -> None:
    m = Metrics()
    for status in (100, 101, 200, 204, 299, 301, 304, 400, 404, 499, 500, 502, 503, 599):
        m.count_request(status)
    for status in (0, 99, 600, 999, -200):  # outside any class: ignored
        m.count_request(status)
    assert m.requests_by_class == [0, 2, 3, 2, 3, 4]
    families = rendered(m)
    got = {s.labels["code_class"]: s.value for s in families["rawproxy_requests_total"].samples}
    assert got == {"1xx": 2, "2xx": 3, "3xx": 2, "4xx": 3, "5xx": 4}


def test_histogram_bucket_boundaries() -> None:
    m = Metrics()
    m.observe_head_latency(0.005)  # exactly on a bound: counts in that bucket
    m.observe_head_latency(0.0)  # the first bucket
    m.observe_head_latency(0.0050001)  # just above a bound: the next one
    m.observe_head_latency(10.0)  # the last finite bound
    m.observe_head_latency(10.5)  # only +Inf
    families = rendered(m)
    name = "rawproxy_request_head_latency_seconds"
    got = buckets(families, name)
    assert got["0.0005"] == 1
    assert got["0.0025"] == 1
    assert got["0.005"] == 2
    assert got["0.01"] == 3
    assert got["5.0"] == 3
    assert got["10.0"] == 4
    assert got["+Inf"] == 5
    assert value(families, f"{name}_count") == 5
    assert value(families, f"{name}_sum") == pytest.approx(0.005 + 0.0050001 + 10.0 + 10.5)
    # The other histogram is untouched.
    assert value(families, "rawproxy_backend_connect_latency_seconds_count") == 0


@pytest.mark.parametrize("bound", LATENCY_BUCKETS)
def test_every_bound_is_inclusive(bound: float) -> None:
    m = Metrics()
    m.observe_connect_latency(bound)
    got = buckets(rendered(m), "rawproxy_backend_connect_latency_seconds")
    for le, count in got.items():
        assert count == (1 if le == "+Inf" or float(le) >= bound else 0), le


def test_histogram_class() -> None:
    h = Histogram((1, 2))
    assert h.bounds == (1.0, 2.0)
    for v in (0.5, 1, 1.5, 2, 3):
        h.observe(v)
    assert h.counts == [2, 2, 1]
    assert h.count == 5
    assert h.sum == 8.0
    for bad in ((), (1, 1), (2, 1), (1, math.inf), (math.nan,)):
        with pytest.raises(ValueError, match="bounds"):
            Histogram(bad)


def test_extra_labels_on_every_sample() -> None:
    m = Metrics()
    m.count_request(200)
    m.observe_head_latency(0.1)
    extra = {"worker": "2", "zone": "eu-1"}
    families = rendered(m, extra)
    samples = [s for f in families.values() for s in f.samples]
    assert len(samples) > 40
    for sample in samples:
        assert {k: sample.labels.get(k) for k in extra} == extra, sample
    assert value(families, "rawproxy_requests_total", code_class="2xx", worker="2") == 1
    assert value(families, "rawproxy_info", version=__version__, worker="2") == 1
    # No extra labels, or an empty mapping, render the same.
    assert m.render() == m.render({}) == m.render(None)
    assert b"{}" not in m.render()


@pytest.mark.parametrize("name", ["", "1x", "a-b", "a b", "__x", "le", "code_class", "version"])
def test_bad_extra_label_names(name: str) -> None:
    with pytest.raises(ValueError, match="label name"):
        Metrics().render({name: "x"})


def test_label_values_are_escaped() -> None:
    awkward = 'back\\slash "quoted"\nnew line, {braces}=é'
    assert escape_label_value(awkward) == 'back\\\\slash \\"quoted\\"\\nnew line, {braces}=é'
    m = Metrics()
    m.backend_connect_errors[awkward] = 3  # a cause nobody planned for is still rendered
    text = m.render({"worker": awkward})
    families = parse(text.decode("utf-8"))
    for family in families.values():
        for sample in family.samples:
            assert sample.labels["worker"] == awkward
    assert value(families, "rawproxy_backend_connect_errors_total", cause=awkward) == 3
    # The known causes come first, in their order, the unplanned one after them.
    causes = [s.labels["cause"] for s in families["rawproxy_backend_connect_errors_total"].samples]
    assert causes == [*CONNECT_ERROR_CAUSES, awkward]


def test_format_value() -> None:
    assert format_value(0) == "0"
    assert format_value(10**20) == "100000000000000000000"
    assert format_value(True) == "1"
    assert format_value(0.1) == "0.1"
    assert format_value(1e-05) == "1e-05"
    assert format_value(math.inf) == "+Inf"
    assert format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"


def test_content_type() -> None:
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_misspelt_attribute_is_an_error() -> None:
    m = Metrics()
    with pytest.raises(AttributeError):
        m.conections_open = 1  # type: ignore[attr-defined]


# -- connect errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((errno.ECONNREFUSED,), {}, "refused"),
        ((errno.ETIMEDOUT,), {}, "timeout"),
        ((None,), {"timed_out": True}, "timeout"),
        ((errno.ECONNREFUSED,), {"timed_out": True}, "timeout"),
        ((errno.EHOSTUNREACH,), {}, "unreachable"),
        ((errno.ENETUNREACH,), {}, "unreachable"),
        ((errno.ECONNRESET,), {}, "reset"),
        ((errno.EPIPE,), {}, "reset"),
        ((errno.EACCES,), {}, "other"),
        ((None,), {}, "other"),
        ((0,), {}, "other"),
        ((errno.ECONNRESET,), {"tls": True}, "tls"),
        ((None,), {"tls": True, "timed_out": True}, "tls"),
        ((-2,), {"dns": True}, "dns"),  # a gaierror's EAI_NONAME
        ((None,), {"dns": True, "timed_out": True}, "dns"),
    ],
)
def test_classify_connect_error(
    args: tuple[int | None], kwargs: dict[str, bool], expected: str
) -> None:
    assert classify_connect_error(*args, **kwargs) == expected
    assert expected in Metrics().backend_connect_errors


def test_every_cause_is_a_key() -> None:
    m = Metrics()
    for cause in CONNECT_ERROR_CAUSES:
        m.backend_connect_errors[cause] += 1
    assert sorted(m.backend_connect_errors) == sorted(CONNECT_ERROR_CAUSES)
