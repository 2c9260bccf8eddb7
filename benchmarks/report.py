"""Tables, JSON, charts and RESULTS.md from a run's results.

Every figure is the median of the run's interleaved runs, with min-max beside it in the full
table. Ratios are plain quotients of medians: `rawproxy / DIRECT` and `rawproxy / best
peer`, where the best peer is the best of HAProxy, nginx, Apache and Caddy for that metric
(the highest rate, the lowest latency, CPU or memory), and `rawproxy / relay` against the
reference relay (plain legs). The arrow after a metric says which
way is better: a rate ratio of 0.5 is half the rate; a CPU or latency ratio of 2 is twice the
cost.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = ("haproxy", "nginx", "apache2", "caddy")
RELAY = "relay"  # the reference row (targets.Relay): no peer
DASH = "\u2013"  # en dash: an empty cell, and between min and max
BUSY_CORES = 0.25  # other processes using more than this during a group are reported
# A proxied rate measured while the load generator's core was at least this busy is marked
# LOAD_MARK in the summary: the load generator, not only the target, set that figure.
LOAD_BOUND = 95.0
LOAD_MARK = "\u2020"  # dagger


def fmt(value: float | None) -> str:
    if value is None:
        return DASH
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return DASH
    return f"{a / b:.2f}"


def median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def arrow(row: dict[str, Any]) -> str:
    if row.get("info"):
        return ""
    return "↑" if row["higher_better"] else "↓"


def best_peer(row: dict[str, Any]) -> tuple[str, float] | None:
    candidates = [(name, m) for name in PEERS if (m := median(row["values"].get(name))) is not None]
    if not candidates:
        return None
    pick = max if row["higher_better"] else min
    return pick(candidates, key=lambda item: item[1])


def _targets(results: dict[str, Any]) -> list[str]:
    return list(results["targets"])


def _cell_error(row: dict[str, Any], target: str) -> str:
    errors = row["errors"].get(target)
    return "failed" if errors else DASH


def load_bound(results: dict[str, Any], row: dict[str, Any]) -> set[str]:
    """The proxied targets whose figure in `row` (a rate) came with the load generator's core
    at LOAD_BOUND % or more (median over the runs): at that point the load generator may be
    what limits them, and two such figures do not rank their targets. DIRECT is left out:
    it is the load generator's own limit by design."""
    if not row["higher_better"] or row["proxy_only"] or row["info"]:
        return set()
    for other in results["rows"]:
        if other["variant"] == row["variant"] and other["key"] == "load_busy":
            return {
                t
                for t, values in other["values"].items()
                if t != "DIRECT" and (m := median(values)) is not None and m >= LOAD_BOUND
            }
    return set()


def summary_markdown(results: dict[str, Any]) -> str:
    """The primary metrics: medians, rawproxy / DIRECT, rawproxy / best peer, and rawproxy /
    relay when the run had the reference relay. A proxied rate taken with the load
    generator's core saturated is marked LOAD_MARK (see load_bound)."""
    targets = _targets(results)
    with_relay = RELAY in targets
    head = ["workload", "metric", *targets, "rawproxy / DIRECT", "rawproxy / best peer"]
    if with_relay:
        head.append("rawproxy / relay")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        if not row["primary"]:
            continue
        cells = []
        bound = load_bound(results, row)
        for t in targets:
            m = median(row["values"].get(t))
            mark = f" {LOAD_MARK}" if t in bound else ""
            cells.append(fmt(m) + mark if m is not None else _cell_error(row, t))
        raw = median(row["values"].get("rawproxy"))
        direct = median(row["values"].get("DIRECT"))
        best = best_peer(row)
        to_best = f"{ratio(raw, best[1])} ({best[0]})" if best else DASH
        to_direct = DASH if row["proxy_only"] else ratio(raw, direct)
        extra = [ratio(raw, median(row["values"].get(RELAY)))] if with_relay else []
        label = f"{row['label']} {arrow(row)}".strip()
        cells = [row["variant"], label, *cells, to_direct, to_best, *extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def full_markdown(results: dict[str, Any]) -> str:
    """Every metric: median (min-max) per target, then each target's ratio to DIRECT."""
    targets = _targets(results)
    head = ["workload", "metric", *targets, *(f"{t} / DIRECT" for t in targets[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        cells = []
        for t in targets:
            values = row["values"].get(t)
            if values:
                m = median(values)
                spread = f" ({fmt(min(values))}{DASH}{fmt(max(values))})" if len(values) > 1 else ""
                cells.append(f"{fmt(m)}{spread}")
            else:
                cells.append(_cell_error(row, t))
        direct = median(row["values"].get("DIRECT"))
        ratios = [
            DASH
            if row["proxy_only"] or row["info"]
            else ratio(median(row["values"].get(t)), direct)
            for t in targets[1:]
        ]
        label = f"{row['label']} {arrow(row)}".strip()
        lines.append("| " + " | ".join([row["variant"], label, *cells, *ratios]) + " |")
    return "\n".join(lines)


def errors_markdown(results: dict[str, Any]) -> str:
    seen: dict[tuple[str, str], list[str]] = {}
    for row in results["rows"]:
        for target, errors in row["errors"].items():
            seen.setdefault((row["variant"], target), errors)
    if not seen:
        return "No measurement failed."
    return "\n".join(
        f"- {variant}, {target}: {len(errors)} failed run(s): {errors[0]}"
        for (variant, target), errors in seen.items()
    )


def load_markdown(results: dict[str, Any]) -> str:
    lines = [
        "| group | seconds | load average at start | at end | other processes' CPU (cores) |",
        "|---|---|---|---|---|",
    ]
    for g in results["groups"]:
        if g["skipped"]:
            lines.append(f"| {g['workload']} {g['leg']} | skipped: {g['skipped']} | | | |")
            continue
        busy = " (busy)" if g["other_cores"] > BUSY_CORES else ""
        lines.append(
            f"| {g['workload']} {g['leg']} | {g['seconds']} | "
            f"{' '.join(map(str, g['load_start']))} | {' '.join(map(str, g['load_end']))} | "
            f"{g['other_cores']}{busy} |"
        )
    return "\n".join(lines)


def busy_note(results: dict[str, Any]) -> str:
    busy = [
        f"{g['workload']} {g['leg']} ({g['other_cores']})"
        for g in results["groups"]
        if not g["skipped"] and g["other_cores"] > BUSY_CORES
    ]
    retried = results.get("retried", 0)
    again = (
        f" {retried} measurement(s) were taken again because other processes used more than "
        f"{BUSY_CORES} of a core during them (up to --retry-busy times)."
        if retried
        else ""
    )
    if not busy:
        return (
            "Other processes used under "
            f"{BUSY_CORES} of a core on average during every group." + again
        )
    return (
        "**The machine was busy** during: "
        + ", ".join(busy)
        + " (average cores used by processes this harness did not start). Figures there "
        "are noisier and probably low; the min-max spread shows by how much." + again
    )


def machine_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"- CPU: {m['cpu_model']}, {m['cpus_online']} online ({m['cpus_usable']} usable); "
        f"memory {m['memory_gib']} GiB",
        f"- Kernel: {m['kernel']}; OS: {m['os']}; Python {m['python']}",
        f"- Placement: {results['placement']}; every proxy single-worker (HAProxy nbthread 1, "
        "nginx worker_processes 1, Apache -X, Caddy GOMAXPROCS=1, rawproxy one thread)",
        f"- Open-file limit: {results['nofile_limit']}; "
        + ", ".join(f"{k} = {v}" for k, v in m["sysctl"].items()),
        f"- Load average when the run started: {' '.join(map(str, m['load_average']))}",
        "- Versions:",
    ]
    lines += [f"  - {name}: {version}" for name, version in results["versions"].items()]
    lines.append("- Load tools:")
    lines += [f"  - {w}: {tool}" for w, tool in results["load_tools"].items()]
    return "\n".join(lines)


def settings_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    return (
        f"{s['runs']} interleaved run(s) per figure; W1 {s['w1_seconds']} s with "
        f"{s['w1_conns']} connections; W2 {s['w2_bytes'] / (1 << 20):,.0f} MiB per direction; "
        f"W3 {s['w3_seconds']:g} s on {' and '.join(map(str, s['w3_tunnels']))} tunnel(s); "
        f"W4 {s['w4_tunnels']:,} tunnels; W5 {s['w5_seconds']:g} s with "
        f"{s['w5_inflight']} in flight."
    )


# --- charts ---------------------------------------------------------------------------------


def charts(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per workload (primary metrics, median with min-max bars) and an overview of
    every throughput figure as a fraction of DIRECT. [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out.mkdir(parents=True, exist_ok=True)
    targets = _targets(results)
    colours = {
        "DIRECT": "#999999",
        "rawproxy": "#d62728",
        "relay": "#333333",
        "haproxy": "#1f77b4",
        "nginx": "#2ca02c",
        "apache2": "#9467bd",
        "caddy": "#ff7f0e",
    }
    written = []
    by_workload: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        if row["primary"] and row["values"]:
            by_workload.setdefault(row["workload"], []).append(row)
    for workload, rows in by_workload.items():
        cols = min(3, len(rows))
        nrows = (len(rows) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
        for ax, row in zip(axes.flat, rows, strict=False):
            names = [t for t in targets if row["values"].get(t)]
            meds = [median(row["values"][t]) or 0.0 for t in names]
            lows = [m - min(row["values"][t]) for m, t in zip(meds, names, strict=True)]
            highs = [max(row["values"][t]) - m for m, t in zip(meds, names, strict=True)]
            ax.bar(
                names,
                meds,
                yerr=[lows, highs],
                capsize=3,
                color=[colours.get(n, "#777777") for n in names],
            )
            ax.set_title(f"{row['variant']}\n{row['label']} {arrow(row)}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            ax.tick_params(axis="y", labelsize=8)
        for ax in list(axes.flat)[len(rows) :]:
            ax.axis("off")
        fig.tight_layout()
        path = out / f"{workload.lower()}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    overview = [
        row
        for row in results["rows"]
        if row["primary"] and row["higher_better"] and row["values"].get("DIRECT")
    ]
    proxies = [t for t in targets if t != "DIRECT"]
    if overview and proxies:
        fig, ax = plt.subplots(figsize=(max(8.0, 0.6 * len(overview)), 4.8))
        width = 0.8 / len(proxies)
        for i, t in enumerate(proxies):
            xs, ys = [], []
            for j, row in enumerate(overview):
                m, d = median(row["values"].get(t)), median(row["values"]["DIRECT"])
                if m is not None and d:
                    xs.append(j + i * width)
                    ys.append(m / d)
            ax.bar(xs, ys, width, label=t, color=colours.get(t, "#777777"))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(overview))])
        ax.set_xticklabels([r["variant"] for r in overview], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("fraction of DIRECT (median)")
        ax.axhline(1.0, color="#999999", linewidth=0.8)
        ax.legend(fontsize=8)
        ax.set_title("throughput figures as a fraction of DIRECT (higher is better)")
        fig.tight_layout()
        path = out / "overview.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.insert(0, path)
    return written


# --- files ----------------------------------------------------------------------------------


def results_markdown(results: dict[str, Any], chart_paths: list[Path], rel_to: Path) -> str:
    quick = " (--quick: one short run per figure, indicative only)" if results["quick"] else ""
    parts = [
        "# rawproxy benchmark results",
        "",
        f"Produced by `{results['command']}` on {results['date']}, "
        f"{results['elapsed_s']:.0f} s{quick}. Regenerate with "
        "`python -m benchmarks --write-results`; how it works is in `benchmarks/README.md`.",
        "",
        "## Machine",
        "",
        machine_markdown(results),
        "",
        settings_markdown(results),
        "",
        busy_note(results),
        "",
        "## Summary",
        "",
        "Medians; `↑` higher is better, `↓` lower is better; ratios are plain quotients of "
        "medians (best peer = the best of HAProxy, nginx, Apache, Caddy for that row). "
        "DIRECT is the client talking straight to the backend: the physical limit of this "
        "machine with this load generator."
        + (
            " relay (plain legs) is a TCP relay in C with nothing of a proxy (no HTTP, no "
            "timeouts, no logs): the ceiling of any proxy under the same placement; "
            "`rawproxy / relay` is how close rawproxy gets to it."
            if RELAY in _targets(results)
            else ""
        )
        + f" {LOAD_MARK}: the load generator's core was at least {LOAD_BOUND:g} % busy while "
        "that proxied rate was measured (median of the runs): the load generator may be what "
        "limited it, so such a figure is a floor for its target, and two of them do not rank "
        "their targets (DIRECT well above the proxied rows shows the load generator is not "
        "the limit).",
        "",
        summary_markdown(results),
        "",
        "## Every metric",
        "",
        "Median (min-max) over the interleaved runs, then each target's ratio to DIRECT.",
        "",
        full_markdown(results),
        "",
        "## Failures and notes",
        "",
        errors_markdown(results),
        "",
        *[f"- {note}" for note in results["notes"]],
        "",
        "## Load during each group",
        "",
        load_markdown(results),
        "",
    ]
    if chart_paths:
        parts += ["## Charts", ""]
        for path in chart_paths:
            rel = path.relative_to(rel_to) if path.is_relative_to(rel_to) else path
            parts += [f"![{path.stem}]({rel})", ""]
    else:
        parts += ["Charts: skipped (matplotlib is not installed: `pip install -e '.[bench]'`).", ""]
    return "\n".join(parts)


def write_all(results: dict[str, Any], out: Path, write_results: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    chart_paths = charts(results, out)
    if not chart_paths:
        results["notes"].append("charts skipped: matplotlib is not installed")
    (out / "RESULTS.md").write_text(results_markdown(results, chart_paths, out))
    if write_results:
        chart_dir = HERE / "charts"
        copied = []
        if chart_paths:
            chart_dir.mkdir(exist_ok=True)
            for path in chart_paths:
                shutil.copy(path, chart_dir / path.name)
                copied.append(chart_dir / path.name)
        (HERE / "RESULTS.md").write_text(results_markdown(results, copied, HERE))
    where = f"{out / 'results.json'}, {out / 'RESULTS.md'}"
    if write_results:
        where += f", {HERE / 'RESULTS.md'}"
    print(f"results: {where}", file=sys.stderr, flush=True)
