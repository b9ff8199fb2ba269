"""The sweep plot: the metric against the swept value(s), trainable parameters beside it.

One swept key: the metric as a line over its values, trainable parameters as bars on a second
axis.
Two: one line per value of the second key. More: one point per job, labelled by its values.
The metric axis never zooms in so far that noise looks like a result: it spans at least
`MIN_RELATIVE_SPAN` of the metric's size, and the title states the measured range.
matplotlib is a dependency of peftc; where it is missing anyway the CSV and the terminal table
are still written and a one-line message says how to get the plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftc.cli.sweep_rows import metric_of, parse_overrides

# The smallest metric-axis span, relative to the metric's magnitude: a 0.004 difference in a
# loss of 5.4 stays a flat line instead of filling the plot.
MIN_RELATIVE_SPAN = 0.05


def plot_sweep(rows: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> bool:
    """Write the plot; False (with a message) when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep plot skipped: matplotlib is not installed (pip install matplotlib)")
        return False
    if all(metric_of(r, metric) is None for r in rows):
        metric = "train_loss"
    values = [parse_overrides(r["overrides"].split()) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    params_ax = ax.twinx()
    if len(keys) in (1, 2):
        x_key = keys[0]
        x_labels = _ordered([v.get(x_key, "") for v in values])
        groups = _ordered([v.get(keys[1], "") for v in values]) if len(keys) == 2 else [""]
        for index, group in enumerate(groups):
            members = [(r, v) for r, v in zip(rows, values) if len(keys) == 1 or v.get(keys[1], "") == group]
            xs = [x_labels.index(v.get(x_key, "")) for _, v in members]
            label = f"{keys[1]}={group}" if len(keys) == 2 else metric
            offset = (index - (len(groups) - 1) / 2) * 0.8 / len(groups)
            _draw(ax, params_ax, xs, [r for r, _ in members], metric, f"C{index}", label, offset, 0.8 / len(groups))
        ax.set_xticks(range(len(x_labels)), x_labels)
        ax.set_xlabel(x_key)
    else:
        labels = [" ".join(f"{k}={v.get(k, '')}" for k in keys) or str(r.get("job")) for r, v in zip(rows, values)]
        _draw(ax, params_ax, list(range(len(rows))), rows, metric, "C0", metric, 0.0, 0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    measured = [m for m in (metric_of(r, metric) for r in rows) if m is not None]
    if measured:
        ax.set_ylim(*metric_limits(measured))
    ax.set_ylabel(metric)
    params_ax.set_ylabel("trainable params (bars)")
    ax.set_zorder(params_ax.get_zorder() + 1)  # the metric lines above the bars
    ax.patch.set_visible(False)
    ax.set_title(f"{metric} vs {', '.join(keys) or 'job'}{range_note(measured)}", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _draw(
    ax: Any,
    params_ax: Any,
    xs: list[int],
    rows: list[dict[str, Any]],
    metric: str,
    color: str,
    label: str,
    offset: float,
    width: float,
) -> None:
    """The metric as a line (left axis), trainable parameters as faint bars (right axis)."""
    points = sorted(zip(xs, rows), key=lambda p: p[0])
    ok = [(x, metric_of(r, metric)) for x, r in points if metric_of(r, metric) is not None]
    if ok:
        ax.plot([x for x, _ in ok], [y for _, y in ok], "o-", color=color, label=label, zorder=3)
    params = [(x + offset, r["trainable_params"]) for x, r in points if r.get("trainable_params")]
    if params:
        params_ax.bar([x for x, _ in params], [p for _, p in params], width=width, color=color, alpha=0.18)
    for x, row in points:
        if row.get("status") == "failed":
            ax.annotate("failed", (x, 0.02), xycoords=("data", "axes fraction"), color="red", ha="center", fontsize=8)


def _ordered(items: list[str]) -> list[str]:
    """Distinct values, numerically sorted when they are all numbers."""
    distinct = list(dict.fromkeys(items))
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


def metric_limits(values: list[float]) -> tuple[float, float]:
    """Metric-axis limits: the values with a margin, and never narrower than MIN_RELATIVE_SPAN
    of their magnitude (centred on them), so small differences look small."""
    low, high = min(values), max(values)
    centre = (low + high) / 2
    span = max((high - low) * 1.2, MIN_RELATIVE_SPAN * max(abs(centre), 1e-12))
    return centre - span / 2, centre + span / 2


def range_note(values: list[float]) -> str:
    """' (range 5.482-5.486, spread 0.004)' for the title; empty for fewer than two values."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    return f" (range {low:.4g}–{high:.4g}, spread {high - low:.2g})"
