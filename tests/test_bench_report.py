"""The benchmark summary marks a proxied rate taken while the load generator's core was
saturated: such a figure may be the load generator's limit, not the target's (issue 4: "the
load generator must not be the bottleneck: show it")."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed

from benchmarks.report import LOAD_MARK, summary_markdown


def row(variant: str, key: str, values: dict[str, list[float]], **kind: bool) -> dict[str, Any]:
    return {
        "variant": variant,
        "key": key,
        "label": key,
        "values": values,
        "errors": {},
        "higher_better": kind.get("higher_better", True),
        "primary": kind.get("primary", True),
        "proxy_only": kind.get("proxy_only", False),
        "info": kind.get("info", False),
    }


def cells(markdown: str, variant: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if parts[0] == variant and parts[1].split(" ")[0] == label:
            return parts
    raise AssertionError(f"no {variant} {label} row in:\n{markdown}")


def test_saturated_load_core_marks_proxied_rates_only() -> None:
    targets = ["DIRECT", "rawproxy", "haproxy", "nginx"]
    busy = {"primary": False, "info": True, "higher_better": False}
    results = {
        "targets": targets,
        "rows": [
            row("W5 plain", "rate", {t: [1000.0 * (i + 1)] for i, t in enumerate(targets)}),
            row("W5 plain", "cpu", {"rawproxy": [120.0], "haproxy": [70.0]}, higher_better=False),
            row(
                "W5 plain",
                "load_busy",
                {
                    "DIRECT": [100.0, 100.0, 100.0],  # DIRECT is load-bound by design: no mark
                    "rawproxy": [60.0, 99.0, 61.0],  # median 61
                    "haproxy": [94.0, 96.0, 97.0],  # median 96
                    "nginx": [90.0, 96.0, 94.0],  # median 94: under the line
                },
                **busy,
            ),
            row("W5 tls", "rate", {t: [500.0] for t in targets}),
            row("W5 tls", "load_busy", {t: [99.0] for t in targets}, **busy),
        ],
    }
    out = summary_markdown(results)
    plain = cells(out, "W5 plain", "rate")
    assert plain[2:6] == ["1,000", "2,000", f"3,000 {LOAD_MARK}", "4,000"], plain
    assert plain[6:] == ["2.00", "0.50 (nginx)"], plain  # ratios of the bare medians
    assert LOAD_MARK not in "".join(cells(out, "W5 plain", "cpu")), out  # costs are not marked
    tls = cells(out, "W5 tls", "rate")
    assert tls[2:6] == ["500", f"500 {LOAD_MARK}", f"500 {LOAD_MARK}", f"500 {LOAD_MARK}"], tls
