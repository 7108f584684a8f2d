"""PNG plots of benchmark results (matplotlib, Agg backend, imported only here: extra ``plot``).

Plots: the latency distribution of every row that has raw samples (box plots: median, quartiles, 1st-99th
percentile whiskers), p50 latency against batch size, and the speed-up against the reference (or the
first artifact). Rows from several machines are labelled with the machine's slug.
"""

from __future__ import annotations

from pathlib import Path

from ..optional import require
from .markdown import machine_key, series_name, speedup


def _pyplot():
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def labelled_rows(docs: list[dict]) -> list[tuple[str, str, dict]]:
    """(label, series, row) for every result. The series (one line in the latency-against-batch plot) names
    the subject, its machine when several are shown, and its run when it occurs in several runs; the label
    adds the batch."""
    several = len({machine_key(d) for d in docs}) > 1
    named = [(i, series_name(r, machine_key(d) if several else None), r)
             for i, d in enumerate(docs) for r in d["results"]]
    runs: dict[str, set] = {}
    for i, name, _ in named:
        runs.setdefault(name, set()).add(i)
    rows = []
    for i, name, r in named:
        series = f"{name} (run {i + 1})" if len(runs[name]) > 1 else name
        rows.append((f"{series} b{r['batch']}", series, r))
    return rows


def _layout(fig) -> None:
    """Everything inside the figure: tick labels, titles, the bars' value labels."""
    fig.tight_layout()


def _save(fig, path: str | Path) -> Path:
    """Whole or not at all (a temporary renamed into place): a Ctrl-C never leaves half a PNG."""
    from ..artifact import atomic_file

    path = Path(path)
    _layout(fig)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix[1:] or "png")
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return path


def plain_log_ticks(axis) -> None:
    """Log-scale tick labels as plain numbers (0.3, 3, 10, 30), never 3x10^0: matplotlib's choice of
    which ticks to label, in our spelling."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def latency_distribution(rows: list[tuple[str, str, dict]], path: str | Path) -> Path:
    """Box plots of the rows that have raw samples (a phone's benchmark_model gives summary statistics only)."""
    return _save(distribution_figure(rows), path)


def distribution_figure(rows: list[tuple[str, str, dict]]):
    """The latency distribution's figure; a log x axis (plain tick numbers) where latencies span > 20x."""
    rows = [row for row in rows if row[2].get("samples_ms")]
    if not rows:
        raise ValueError("no result has raw samples to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(rows)))
    data = [r["samples_ms"] for _, _, r in rows]
    try:  # matplotlib >= 3.10 spells it orientation=; older ones vert=
        ax.boxplot(data, orientation="horizontal", whis=(1, 99), showfliers=False, widths=0.6)
    except TypeError:
        ax.boxplot(data, vert=False, whis=(1, 99), showfliers=False, widths=0.6)
    ax.set_yticks(range(1, len(rows) + 1), [label for label, _, _ in rows], fontsize=8)
    ax.invert_yaxis()
    lo, hi = min(min(d) for d in data), max(max(d) for d in data)
    if lo > 0 and hi / lo > 20:
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
    ax.set_xlabel("latency per batch (ms); box: quartiles, whiskers: 1st-99th percentile")
    ax.set_title("Latency distribution")
    ax.grid(axis="x", alpha=0.3)
    _wide_enough(fig, ax)
    return fig


def latency_vs_batch(rows: list[tuple[str, str, dict]], path: str | Path) -> Path:
    plt = _pyplot()
    series: dict[str, list[tuple[int, float]]] = {}
    for _, name, r in rows:
        if r["latency_ms"].get("p50") is not None:
            series.setdefault(name, []).append((r["batch"], r["latency_ms"]["p50"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in series.items():
        points.sort()
        ax.plot([b for b, _ in points], [p for _, p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for _, _, r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency per batch (ms)")
    ax.set_title("Latency against batch size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def speedup_figure(rows: list[tuple[str, str, dict]]):
    """Bars of the speed-up of every non-reference row, each labelled with its value beside the bar."""
    plt = _pyplot()
    values = [(label, *speedup(r)) for label, _, r in rows if r["role"] != "reference"]
    values = [(label, s, against) for label, s, against in values if s is not None]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.4 * max(1, len(values))))
    bars = ax.barh(range(len(values)), [s for _, s, _ in values], color="tab:blue")
    texts = ax.bar_label(bars, [f"{s:.2f}x" for _, s, _ in values], padding=3, fontsize=8)
    ax.set_yticks(range(len(values)), [f"{label} (vs {against})" for label, _, against in values], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=1)
    ax.set_xlabel("speed-up of p50 latency (x, higher is faster)")
    ax.set_title("Speed-up vs reference (or first artifact)", loc="right")
    _wide_enough(fig, ax)
    _room_for_labels(fig, ax, [s for _, s, _ in values], texts)
    return fig


def _wide_enough(fig, ax, plot_inches: float = 5.0) -> None:
    """Long row labels (file names) take the width they need, and the bars keep ``plot_inches``: the axis
    label and the bars' value labels then stay inside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = max((t.get_window_extent(renderer).width for t in ax.get_yticklabels()), default=0.0)
    fig.set_figwidth(max(fig.get_figwidth(), labels / fig.dpi + plot_inches + 0.5))


def _room_for_labels(fig, ax, values: list[float], texts) -> None:
    """Widen the x range so that each bar's value label ends inside the axes (matplotlib places it past
    the bar's end, and by default off the plot's edge for the longest bar). Measured in pixels after
    the layout: the labels keep their size while the range grows."""
    if not values:
        return
    _layout(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width
    lo, hi = ax.get_xlim()
    need = hi
    for value, text in zip(values, texts):
        room = width * 0.95 - text.get_window_extent(renderer).width - 6   # 6 px: the padding and a margin
        if room > 0:
            need = max(need, lo + (value - lo) * width / room)
    ax.set_xlim(lo, need)


def speedups(rows: list[tuple[str, str, dict]], path: str | Path) -> Path:
    return _save(speedup_figure(rows), path)


def report_plots(docs: list[dict], out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Write every plot that has something to show; caption -> path."""
    rows = labelled_rows(docs)
    out = Path(out_dir)
    plots = {}
    if any(r.get("samples_ms") for _, _, r in rows):
        plots["Latency distribution"] = latency_distribution(rows, out / f"{stem}-latency.png")
    batches: dict[str, set] = {}
    for _, name, r in rows:
        batches.setdefault(name, set()).add(r["batch"])
    if any(len(b) > 1 for b in batches.values()):
        plots["Latency against batch size"] = latency_vs_batch(rows, out / f"{stem}-batch.png")
    if len(rows) > 1:
        plots["Speed-up"] = speedups(rows, out / f"{stem}-speedup.png")
    return plots
