"""Report plots: each task's headline metric against activated parameters and against latency.

One point per run, labelled with its model name; the Pareto front (no other run is both cheaper and
better) is joined by a line and its points are filled. Drawn with PIL, so no plotting library is needed.
"""

from __future__ import annotations

from pathlib import Path

W, H, M = 560, 360, 56  # image size, margin


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower or equal cost and higher or equal value, one strictly."""
    front = []
    for i, (c, v) in enumerate(points):
        if not any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def scatter(points: list[tuple[float, float]], labels: list[str], title: str, xlabel: str, ylabel: str,
            path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys + [0.0]), max(ys + [1e-9])
    pad_x = (x1 - x0) * 0.1 or abs(x0) * 0.1 or 1.0
    x0, x1, y1 = x0 - pad_x, x1 + pad_x, y1 * 1.1

    def px(x, y):
        return M + (x - x0) / (x1 - x0) * (W - 2 * M), H - M - (y - y0) / ((y1 - y0) or 1) * (H - 2 * M)

    d.rectangle([M, M, W - M, H - M], outline=(0, 0, 0))
    d.text((M, 8), title, fill=(0, 0, 0))
    d.text((W // 2 - 40, H - M + 24), xlabel, fill=(0, 0, 0))
    d.text((4, M - 16), ylabel, fill=(0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        d.text((4, px(x0, yv)[1] - 6), f"{yv:.2f}", fill=(90, 90, 90))
        xv = x0 + frac * (x1 - x0)
        d.text((px(xv, y0)[0] - 16, H - M + 6), _short(xv), fill=(90, 90, 90))
    front = pareto(points)
    if len(front) > 1:
        d.line([px(*points[i]) for i in front], fill=(200, 60, 60), width=2)
    for i, ((x, y), label) in enumerate(zip(points, labels)):
        cx, cy = px(x, y)
        fill = (200, 60, 60) if i in front else None
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], outline=(200, 60, 60), fill=fill)
        d.text((cx + 6, cy - 12), label[:22], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
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
        labels = [model_name(r["run"]) for r in rs]
        with_params = [(r["params_activated"], r["value"]) for r in rs if r.get("params_activated")]
        if with_params:
            out.append(scatter(with_params, [lab for lab, r in zip(labels, rs) if r.get("params_activated")],
                               f"{key} vs activated parameters", "activated parameters", key,
                               Path(out_dir) / f"{key}-vs-params.png"))
        with_latency = [(1000 / r["samples_per_s"], r["value"]) for r in rs if r.get("samples_per_s")]
        if with_latency:
            out.append(scatter(with_latency, [lab for lab, r in zip(labels, rs) if r.get("samples_per_s")],
                               f"{key} vs latency", "ms per sample", key, Path(out_dir) / f"{key}-vs-latency.png"))
    return out
