"""Reports over Arrow results: one table across runs, each task's metrics beside its majority baseline."""

from __future__ import annotations

from pathlib import Path

HEADLINES = {"pope": ("mean", "f1"), "gqa": (None, "exact_match"), "cls": (None, "top1"), "seg": (None, "mIoU")}


def _headline(task: str) -> tuple[str | None, str]:
    try:
        from moebench.eval.tasks import load_task

        t = load_task(task)
        return ("mean" if len(t.splits) > 1 else None), t.headline
    except Exception:  # a results file may name a task this checkout no longer ships
        return HEADLINES.get(task, (None, ""))


def load_rows(dirs: list[Path], tasks: list[str] | None = None, all_metrics: bool = False,
              breakdowns: bool = False) -> list[dict]:
    """Newest row per (run, task, split, metric), headline metrics only unless all_metrics; the official
    breakdowns (rows with a `group`: VQAv2 answer types, GQA binary / open, ScienceQA subjects and
    context) only with `breakdowns`."""
    from moebench.results import latest_rows, read_table

    rows = latest_rows(read_table([str(d) for d in dirs], "metrics")).to_pylist()
    if tasks:
        rows = [r for r in rows if r["task"] in tasks]
    if not breakdowns:
        rows = [r for r in rows if not r.get("group")]
    if not all_metrics:
        rows = headline_rows(rows)
    return sorted(rows, key=lambda r: (r["task"], r["split"], r["metric"], r["run"]))


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _params(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def report_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="moebench results", show_lines=False)
    left = ("task", "split", "metric", "run")
    for c in ("task", "split", "metric", "run", "value", "majority", "params act/total", "TTFT ms", "TPOT ms",
              "samples/s", "n"):
        t.add_column(c, justify="left" if c in left else "right", overflow="fold")
    for r in rows:
        t.add_row(r["task"], r["split"], r["metric"], r["run"], _fmt(r["value"]), _fmt(r.get("baseline")),
                  f"{_params(r.get('params_activated'))}/{_params(r.get('params_total'))}",
                  _fmt(r.get("ttft_ms"), 1), _fmt(r.get("tpot_ms"), 2), _fmt(r.get("samples_per_s"), 1), _fmt(r.get("n")))
    devices = sorted({f"{r.get('device')} {r.get('dtype')} batch {r.get('batch_size')}" for r in rows})
    t.caption = ("; ".join(devices) + ". majority = the metric of always giving the most frequent answer") if rows \
        else "no results yet: run `moebench train` or `moebench eval`"
    return t


def headline_rows(rows: list[dict]) -> list[dict]:
    """The rows of each task's headline metric (of its headline split, and its breakdowns when present)."""
    keep = []
    for r in rows:
        split, metric = _headline(r["task"])
        whole = r["split"].split("|")[0]  # a breakdown row's split is "<split>|<group>"
        if r["metric"] == metric and (split is None or whole == split):
            keep.append(r)
    return keep


def headline_table(rows: list[dict]):
    """The rows an eval just produced, reduced to each task's headline metric (no breakdowns)."""
    return report_table(headline_rows([r for r in rows if not r.get("group")]))
