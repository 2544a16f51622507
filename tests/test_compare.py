"""The regression gate on constructed tables: ok / regressed / improved / missing / new, exit codes."""

from __future__ import annotations

from conftest import run_cli
from moebench import results
from moebench.compare import compare_rows, model_name


def _row(run, task, metric, value, split="val", sps=100.0):
    return {"run": run, "task": task, "split": split, "metric": metric, "value": value, "samples_per_s": sps,
            "device": "cpu", "timestamp": results.utc_now()}


BASE = [_row("shapes_dense-0123abcd", "gqa", "exact_match", 0.50), _row("shapes_dense-0123abcd", "pope", "f1", 0.60, "mean"),
        _row("shapes_moe-89abcdef", "gqa", "exact_match", 0.48)]


def _tables(tmp_path, current):
    base = results.write_table(BASE, results.METRICS_SCHEMA, tmp_path / "baseline.arrow")
    results.append_rows(tmp_path / "cur", "metrics", "x", current)
    return base, tmp_path / "cur"


def test_model_names_drop_the_hash():
    assert model_name("shapes_moe-89abcdef") == "shapes_moe"
    assert model_name("vimoe_shapes_shared-569f19e6") == "vimoe_shapes_shared"
    assert model_name("my-run") == "my-run"


def test_within_tolerance_passes(tmp_path, capsys):
    current = [_row("shapes_dense-ffffffff", "gqa", "exact_match", 0.49), _row("shapes_dense-ffffffff", "pope", "f1", 0.61, "mean"),
               _row("shapes_moe-eeeeeeee", "gqa", "exact_match", 0.48)]
    base, cur = _tables(tmp_path, current)
    code, out, err = run_cli(["compare", "--baseline", base, "--current", cur, "--markdown", tmp_path / "s.md"], capsys)
    assert code == 0, err
    assert "PASS" in (tmp_path / "s.md").read_text()


def test_regression_beyond_tolerance_fails_and_missing_is_reported(tmp_path, capsys):
    current = [_row("shapes_dense-ffffffff", "gqa", "exact_match", 0.40), _row("shapes_moe-eeeeeeee", "gqa", "exact_match", 0.60),
               _row("shapes_roe-dddddddd", "gqa", "exact_match", 0.3)]
    base, cur = _tables(tmp_path, current)
    code, out, err = run_cli(["compare", "--baseline", base, "--current", cur], capsys)
    assert code == 1 and "regression gate failed" in err
    verdicts = {(v["model"], v["metric"]): v["status"] for v in compare_rows(BASE, current, {})}
    assert verdicts[("shapes_dense", "exact_match")] == "regressed"  # -0.10 < -0.02
    assert verdicts[("shapes_dense", "f1")] == "missing"  # the POPE row is gone
    assert verdicts[("shapes_moe", "exact_match")] == "improved"
    assert verdicts[("shapes_roe", "exact_match")] == "new"


def test_tolerances_from_the_command_line_and_a_file(tmp_path, capsys):
    current = [_row("shapes_dense-ffffffff", "gqa", "exact_match", 0.45), _row("shapes_dense-ffffffff", "pope", "f1", 0.60, "mean"),
               _row("shapes_moe-eeeeeeee", "gqa", "exact_match", 0.48)]
    base, cur = _tables(tmp_path, current)
    assert run_cli(["compare", "--baseline", base, "--current", cur], capsys)[0] == 1
    assert run_cli(["compare", "--baseline", base, "--current", cur, "--tolerance", "exact_match=0.06"], capsys)[0] == 0
    (tmp_path / "tol.yaml").write_text("exact_match: 0.1\n")
    assert run_cli(["compare", "--baseline", base, "--current", cur, "--tolerances", tmp_path / "tol.yaml"], capsys)[0] == 0
    code, _, err = run_cli(["compare", "--baseline", base, "--current", cur, "--tolerance", "f1"], capsys)
    assert code == 2 and "metric=number" in err


def test_latency_gate(tmp_path):
    slow = [_row("shapes_dense-ffffffff", "gqa", "exact_match", 0.50, sps=50.0)]
    v = compare_rows(BASE[:1], slow, {}, latency_tolerance=0.1)
    assert [x["status"] for x in v] == ["ok", "regressed"]
    assert v[1]["metric"] == "exact_match:samples_per_s" and abs(v[1]["change"] + 0.5) < 1e-9


def test_pareto_front_and_report_plots(tmp_path, capsys):
    from moebench.plots import pareto

    # (cost, value): b dominates a; c is dearer but better; d is dearer and worse than c
    assert pareto([(2.0, 0.5), (1.0, 0.6), (3.0, 0.9), (4.0, 0.8)]) == [1, 2]
    rows = [{**_row(f"m{i}-0123abc{i}", "gqa", "exact_match", v), "params_activated": p}
            for i, (p, v) in enumerate([(1e6, 0.4), (2e6, 0.5), (3e6, 0.45)])]
    results.append_rows(tmp_path / "res", "metrics", "x", rows)
    code, out, err = run_cli(["report", tmp_path / "res", "--plot", tmp_path / "plots"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["gqa-exact_match-vs-latency.png", "gqa-exact_match-vs-params.png"]


def test_tables_written_by_schema_version_1_still_read(tmp_path, capsys):
    """A metrics file from moebench 0.1 (no `extra` column) reads, reports and compares."""
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "metrics-v1.arrow"
    (row,) = results.read_rows([fixture], "metrics")
    assert row["value"] == 0.408 and row["extra"] is None and row["run"] == "shapes_dense-0123abcd"
    code, out, err = run_cli(["report", fixture], capsys)
    assert code == 0 and "shapes_dense-0123abcd" in out
    current = [_row("shapes_dense-ffffffff", "gqa", "exact_match", 0.41, split="testdev_balanced")]
    results.append_rows(tmp_path / "cur", "metrics", "x", current)
    assert run_cli(["compare", "--baseline", fixture, "--current", tmp_path / "cur"], capsys)[0] == 0
