"""Report plots: each task's headline metric against activated parameters and against latency.

One marker per run, coloured by variant and labelled with its model name; the Pareto front (no other
run is both cheaper and better) is joined in red, its markers ringed. Drawn with matplotlib (Agg,
imported inside the functions); no version stamp in the PNG, so the same rows give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

# Variant colours in order of first appearance; red is left to the Pareto front.
COLOURS = [f"tab:{c}" for c in "blue orange green purple brown pink gray olive cyan".split()]

# Per task, one plot per x axis: file name suffix, title, x label, a row's x (None: the row has no point).
AXES = [("params", "activated parameters", "activated parameters", lambda r: r.get("params_activated")),
        ("latency", "latency", "ms per sample", lambda r: 1000 / r["samples_per_s"] if r.get("samples_per_s") else None)]


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower or equal cost and higher or equal value, one strictly."""
    front = []
    for i, (c, v) in enumerate(points):
        if not any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def scatter(points: list[tuple[float, float]], labels: list[str], title: str, xlabel: str, ylabel: str,
            path: Path, variants: list[str | None] | None = None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    variants = variants or [None] * len(points)
    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")  # not pyplot's: nothing global to close
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, variant in enumerate(dict.fromkeys(variants)):
        mine = [p for p, v in zip(points, variants) if v == variant]
        ax.scatter([x for x, _ in mine], [y for _, y in mine], s=36, color=COLOURS[k % len(COLOURS)], zorder=3,
                   label=variant)
    front = [points[i] for i in pareto(points)]
    ax.plot([x for x, _ in front], [y for _, y in front], "-o", color="tab:red", lw=1.5, ms=12, mfc="none",
            zorder=2, label="Pareto front")
    at: dict[tuple[float, float], list[str]] = {}  # runs at the same point share one label
    for p, label in zip(points, labels):
        at.setdefault(p, []).append(label)
    mid = (min(x for x, _ in points) + max(x for x, _ in points)) / 2
    for (x, y), names in at.items():
        right = x > mid  # labels on the right half go left of their marker, to stay inside the figure
        ax.annotate("\n".join(names), (x, y), xytext=(-8 if right else 8, 4), textcoords="offset points",
                    ha="right" if right else "left", fontsize=8)
    ax.margins(x=0.12, y=0.15)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v)))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    return path


def _short(v: float) -> str:
    return f"{v / 1e9:.2f}B" if abs(v) >= 1e9 else f"{v / 1e6:.2f}M" if abs(v) >= 1e6 else f"{v:.3g}"


def report_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """For each task: headline metric vs activated params, and vs ms per sample (1000 / samples/s)."""
    from moebench.compare import model_name

    out = []
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(f"{r['task']}-{r['metric']}", []).append(r)
    for key, rs in sorted(by_task.items()):
        for name, title, xlabel, cost in AXES:
            some = [r for r in rs if cost(r)]
            if some:
                out.append(scatter([(cost(r), r["value"]) for r in some], [model_name(r["run"]) for r in some],
                                   f"{key} vs {title}", xlabel, key, Path(out_dir) / f"{key}-vs-{name}.png",
                                   [r.get("variant") for r in some]))
    return out
