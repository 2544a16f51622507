"""`moebench compare` and `moebench ci`: the regression gate.

Rows are matched by (model, task, split, metric), the model being the run name without its trailing
hash (`shapes_moe-1a2b3c4d` -> `shapes_moe`), so a baseline survives changes that only move hashes.
Per metric the change is current - baseline; with higher-is-better metrics a drop beyond the metric's
tolerance is `regressed`, a rise beyond it `improved`, anything else `ok`. A baseline row with no
current row is `missing` (it fails the gate too: a CI run that silently loses a task is a regression).
With a latency tolerance, samples/s is compared the same way, relatively, when the device matches.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moebench import results
from moebench.errors import MissingFile, UserError

LOWER_IS_BETTER = {"unparsable"}
NOT_GATED = {"yes_ratio", "entropy", "purity", "top5"}  # descriptive, or redundant with a gated metric
DEFAULT_TOLERANCE = 0.02


def model_name(run: str) -> str:
    head, _, tail = run.rpartition("-")
    return head if head and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else run


def _index(rows: list[dict]) -> dict[tuple, dict]:
    return {(model_name(r["run"]), r["task"], r["split"], r["metric"]): r for r in rows}


def load_tolerances(path: Path | None, overrides: list[str]) -> dict[str, float]:
    tol: dict[str, float] = {}
    if path is not None:
        if not Path(path).is_file():
            raise MissingFile(Path(path), "tolerances file", "a YAML mapping metric: tolerance, e.g. f1: 0.03")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: tolerances must be a YAML mapping of metric: number")
        tol.update({str(k): float(v) for k, v in raw.items()})
    for o in overrides:
        metric, sep, value = o.partition("=")
        try:
            tol[metric.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--tolerance {o!r}: write metric=number, e.g. --tolerance f1=0.03")
    return tol


def compare_rows(baseline: list[dict], current: list[dict], tolerances: dict[str, float],
                 latency_tolerance: float | None = None) -> list[dict]:
    """One verdict per baseline row (plus `new` for current rows the baseline lacks)."""
    base, cur = _index(baseline), _index(current)
    out = []
    for key, b in sorted(base.items()):
        model, task, split, metric = key
        row = {"model": model, "task": task, "split": split, "metric": metric, "baseline": b["value"]}
        c = cur.get(key)
        if c is None:
            out.append({**row, "current": None, "change": None, "status": "missing"})
            continue
        change = c["value"] - b["value"]
        tol = tolerances.get(metric, DEFAULT_TOLERANCE)
        sign = -1 if metric in LOWER_IS_BETTER else 1
        if metric in NOT_GATED:
            status = "ok"
        elif sign * change < -tol:
            status = "regressed"
        elif sign * change > tol:
            status = "improved"
        else:
            status = "ok"
        out.append({**row, "current": c["value"], "change": change, "status": status})
        if latency_tolerance is not None and b.get("samples_per_s") and c.get("samples_per_s") \
                and b.get("device") == c.get("device") and metric not in NOT_GATED:
            rel = c["samples_per_s"] / b["samples_per_s"] - 1
            lat = "regressed" if rel < -latency_tolerance else ("improved" if rel > latency_tolerance else "ok")
            out.append({**row, "metric": f"{metric}:samples_per_s", "baseline": b["samples_per_s"],
                        "current": c["samples_per_s"], "change": rel, "status": lat})
    for key in sorted(set(cur) - set(base)):
        c = cur[key]
        out.append({"model": key[0], "task": key[1], "split": key[2], "metric": key[3], "baseline": None,
                    "current": c["value"], "change": None, "status": "new"})
    return out


def failed(verdicts: list[dict]) -> bool:
    return any(v["status"] in ("regressed", "missing") for v in verdicts)


def markdown(verdicts: list[dict]) -> str:
    def num(x, fmt: str) -> str:
        return "" if x is None else format(x, fmt)

    lines = ["| model | task | split | metric | baseline | current | change | status |", "|" + "---|" * 8]
    for v in verdicts:
        lines.append(f"| {v['model']} | {v['task']} | {v['split']} | {v['metric']} | {num(v['baseline'], '.4g')} | "
                     f"{num(v['current'], '.4g')} | {num(v['change'], '+.4f')} | {v['status']} |")
    verdict = "FAIL" if failed(verdicts) else "PASS"
    counts = {s: sum(v["status"] == s for v in verdicts) for s in ("ok", "improved", "regressed", "missing", "new")}
    return f"**moebench regression gate: {verdict}** ({', '.join(f'{k} {n}' for k, n in counts.items())})\n\n" + "\n".join(lines) + "\n"


def read_baseline(path: Path) -> list[dict]:
    if not Path(path).is_file():
        raise MissingFile(Path(path), "baseline table", "write one with `moebench ci ... --update-baseline`")
    return results.latest_rows(results.read_table([str(path)], "metrics")).to_pylist()


def write_baseline(rows: list[dict], path: Path) -> Path:
    """The current headline-and-all metric rows as a baseline Arrow file (atomic)."""
    return results.write_table([r for r in rows if r["task"] != "routing"], results.METRICS_SCHEMA, path)
