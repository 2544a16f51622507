"""Results files: schema, atomic writes, concurrent writers, reading back, latest rows."""

import multiprocessing
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from moebench import results as R
from moebench.errors import MissingFile, UserError


def metric_row(**kw):
    row = dict(run="r1", task="pope", split="random", metric="f1", value=0.5, timestamp=R.utc_now())
    row.update(kw)
    return row


def test_schemas_have_expected_columns():
    assert R.METRICS_SCHEMA.field("value").type == pa.float64()
    assert R.METRICS_SCHEMA.field("params_activated").type == pa.int64()
    assert R.SAMPLES_SCHEMA.field("question_id").type == pa.string()
    assert R.TRAIN_SCHEMA.field("step").type == pa.int64()
    assert set(R.SCHEMAS) == {"metrics", "samples", "train"}
    names = R.METRICS_SCHEMA.names  # provenance together: commit, then the software versions
    i = names.index("git_commit")
    assert names[i: i + 4] == ["git_commit", "moebench_version", "torch_version", "transformers_version"]
    for c in ("torch_version", "transformers_version"):
        assert R.METRICS_SCHEMA.field(c).type == pa.string() and R.METRICS_SCHEMA.field(c).nullable
    assert R.METRICS_SCHEMA.metadata[b"moebench.schema_version"] == str(R.SCHEMA_VERSION).encode()
    assert R.SCHEMA_VERSION == 5


def test_round_trip(tmp_path):
    rows = [
        metric_row(n=10, baseline=0.0, params_detail={"llm": 3, "vision": 2}, ttft_ms=1.5, seed=0),
        metric_row(metric="accuracy", value=0.7, n=10),
    ]
    path = R.append_rows(tmp_path, "metrics", "r1", rows)
    assert path.parent == tmp_path / "r1" and path.name.startswith("metrics-") and path.suffix == ".arrow"
    table = R.read_table([tmp_path], "metrics")
    assert table.schema.equals(R.METRICS_SCHEMA)
    back = table.to_pylist()
    assert [r["metric"] for r in back] == ["f1", "accuracy"]
    assert back[0]["params_detail"] == '{"llm": 3, "vision": 2}'  # dicts stored as JSON
    assert back[1]["ttft_ms"] is None and back[1]["variant"] is None  # missing keys -> null
    assert back[0]["n"] == 10 and back[0]["value"] == 0.5
    # a single file path works as well as a folder
    assert R.read_table(path, "metrics").num_rows == 2
    # samples and train tables
    R.append_rows(tmp_path, "samples", "r1", [dict(run="r1", task="pope", split="random", question_id="7", score=1.0)])
    R.append_rows(tmp_path, "train", "r1", [dict(run="r1", stage="pretrain", step=1, loss=2.5, extra={"load": [0.5, 0.5]})])
    assert R.read_table(tmp_path, "samples").column("question_id").to_pylist() == ["7"]
    assert R.read_rows(tmp_path, "train")[0]["loss"] == 2.5
    assert R.read_table(tmp_path, "metrics").num_rows == 2  # other kinds are not globbed in


def test_empty_read(tmp_path):
    table = R.read_table([tmp_path], "samples")
    assert table.num_rows == 0 and table.schema.equals(R.SAMPLES_SCHEMA)


def test_unknown_and_bad_columns(tmp_path):
    with pytest.raises(ValueError, match="'accuracy_pct'"):
        R.append_rows(tmp_path, "metrics", "r1", [metric_row(accuracy_pct=50.0)])
    with pytest.raises(ValueError, match="'value'"):
        R.append_rows(tmp_path, "metrics", "r1", [metric_row(value=None)])  # required column
    with pytest.raises(ValueError, match="'n'"):
        R.append_rows(tmp_path, "metrics", "r1", [metric_row(n="ten")])  # wrong type
    with pytest.raises(UserError, match="run name"):
        R.append_rows(tmp_path, "metrics", "../x", [metric_row()])
    assert list(tmp_path.rglob("*.arrow")) == [] and list(tmp_path.rglob("*.tmp")) == []


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics-fixed.arrow"
    R.write_table([metric_row(value=1.0)], R.METRICS_SCHEMA, path)
    before = path.read_bytes()

    def boom(fd):  # the temp file is fully written when fsync is reached; fail right there
        raise OSError("disk on fire")

    monkeypatch.setattr(R.os, "fsync", boom)
    with pytest.raises(OSError, match="disk on fire"):
        R.write_table([metric_row(value=2.0)] * 100, R.METRICS_SCHEMA, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics-fixed.arrow"]  # no temp left
    assert R.read_rows(tmp_path, "metrics")[0]["value"] == 1.0


def test_write_leaves_no_temp_files(tmp_path):
    for _ in range(3):
        R.append_rows(tmp_path, "metrics", "r1", [metric_row()])
    names = [p.name for p in (tmp_path / "r1").iterdir()]
    assert len(names) == 3 and all(n.startswith("metrics-") and n.endswith(".arrow") for n in names)


def test_unreadable_file_is_named(tmp_path):
    R.append_rows(tmp_path, "metrics", "r1", [metric_row()])
    bad = tmp_path / "r1" / "metrics-broken.arrow"
    bad.write_bytes(b"not arrow at all")
    with pytest.raises(UserError, match="metrics-broken.arrow"):
        R.read_table([tmp_path], "metrics")
    with pytest.raises(MissingFile):
        R.read_table([tmp_path / "nope"], "metrics")


def test_foreign_kind_file_is_refused(tmp_path):
    p = R.write_table([dict(run="r", stage="s", step=1)], R.TRAIN_SCHEMA, tmp_path / "x.arrow")
    with pytest.raises(UserError, match="'train' table"):
        R.read_table([p], "metrics")


def test_older_files_with_fewer_columns_are_promoted(tmp_path):
    old_schema = pa.schema([f for f in R.METRICS_SCHEMA if f.name not in ("tpot_ms", "variant")])
    R.write_table([dict(run="old", task="t", split="s", metric="m", value=1.0, timestamp=R.utc_now())],
                  old_schema, tmp_path / "metrics-old.arrow")
    R.append_rows(tmp_path, "metrics", "new", [metric_row(run="new", tpot_ms=3.0)])
    table = R.read_table(tmp_path, "metrics")
    assert table.column_names == R.METRICS_SCHEMA.names
    rows = {r["run"]: r for r in table.to_pylist()}
    assert rows["old"]["tpot_ms"] is None and rows["new"]["tpot_ms"] == 3.0


def _writer(results_dir, worker, files, barrier):
    barrier.wait()
    for f in range(files):
        rows = [metric_row(run=f"run{worker}", metric=f"m{f}-{i}", value=float(i)) for i in range(50)]
        R.append_rows(results_dir, "metrics", f"run{worker % 2}", rows)


def test_parallel_writers(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = multiprocessing.get_context("fork")
    workers, files = 4, 5  # runs run0 / run1 shared by two writers each
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(tmp_path, w, files, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(list(tmp_path.rglob("*.arrow"))) == workers * files
    table = R.read_table([tmp_path], "metrics")
    assert table.num_rows == workers * files * 50
    keys = set(zip(table.column("run").to_pylist(), table.column("metric").to_pylist()))
    assert len(keys) == workers * files * 50


def test_latest_rows():
    rows = [
        metric_row(metric="f1", value=0.1, timestamp="2025-01-01T00:00:00+00:00"),
        metric_row(metric="f1", value=0.3, timestamp="2025-01-03T00:00:00Z"),
        metric_row(metric="f1", value=0.2, timestamp="2025-01-02T00:00:00+00:00"),
        metric_row(metric="accuracy", value=0.9, timestamp="2025-01-01T00:00:00+00:00"),
        metric_row(metric="f1", split="popular", value=0.5, timestamp="2025-01-01T00:00:00+00:00"),
        # 2025-01-03T01:00+02:00 is 2025-01-02T23:00Z: older than the 0.3 row despite sorting later as text
        metric_row(metric="f1", value=0.4, timestamp="2025-01-03T01:00:00+02:00"),
    ]
    table = R.rows_to_table(rows, R.METRICS_SCHEMA)
    kept = R.latest_rows(table).to_pylist()
    assert [(r["split"], r["metric"], r["value"]) for r in kept] == [
        ("random", "f1", 0.3),
        ("random", "accuracy", 0.9),
        ("popular", "f1", 0.5),
    ]
    # a tie keeps the later row
    tie = R.rows_to_table([metric_row(value=1.0, timestamp="2025-01-01T00:00:00Z"),
                           metric_row(value=2.0, timestamp="2025-01-01T00:00:00Z")], R.METRICS_SCHEMA)
    assert R.latest_rows(tie).column("value").to_pylist() == [2.0]
    assert R.latest_rows(R.METRICS_SCHEMA.empty_table()).num_rows == 0


# ----------------------------------------------------------------------------- provenance (schema 3)

V2_DROPPED = ("torch_version", "transformers_version")  # the columns schema version 3 added


def test_software_versions_are_those_of_the_running_modules(monkeypatch):
    import torch
    import transformers

    import moebench

    v = R.software_versions()
    assert v == {"moebench_version": moebench.__version__, "torch_version": torch.__version__,
                 "transformers_version": transformers.__version__}
    # not imported: the installed distribution's version, read without importing it
    monkeypatch.delitem(sys.modules, "transformers")
    assert R.software_versions()["transformers_version"] == transformers.__version__
    assert "transformers" not in sys.modules
    assert R._installed_version("no_such_package_moebench_test") is None
    # the keys fit the metrics schema as they are
    R.rows_to_table([metric_row(**v)], R.METRICS_SCHEMA)


def test_schema_2_tables_read_with_null_versions(tmp_path):
    """A file written before schema 3 (no torch / transformers columns) reads beside new ones."""
    meta = {b"moebench.kind": b"metrics", b"moebench.schema_version": b"2"}
    v2 = pa.schema([f for f in R.METRICS_SCHEMA if f.name not in V2_DROPPED], metadata=meta)
    R.write_table([metric_row(run="old", moebench_version="0.1.0", git_commit="abc1234")], v2,
                  tmp_path / "old" / "metrics-old.arrow")
    R.append_rows(tmp_path, "metrics", "new", [metric_row(run="new", **R.software_versions())])
    table = R.read_table(tmp_path, "metrics")
    assert table.schema.equals(R.METRICS_SCHEMA)
    rows = {r["run"]: r for r in R.latest_rows(table).to_pylist()}
    assert rows["old"]["moebench_version"] == "0.1.0" and rows["old"]["git_commit"] == "abc1234"
    assert rows["old"]["torch_version"] is None and rows["old"]["transformers_version"] is None
    assert rows["new"]["torch_version"] and rows["new"]["transformers_version"]


def test_baselines_read_with_their_versions_and_without(tmp_path):
    """The committed baseline (schema 3) through the gate's reader and back out as `moebench ci
    --update-baseline` writes it; the same rows in a schema-2 file (no version columns, as baselines
    written before them) read with the versions null."""
    from moebench.compare import read_baseline, write_baseline

    path = Path(__file__).resolve().parents[1] / "results" / "baselines" / "cpu-shapes.arrow"
    rows = read_baseline(path)
    assert {r["task"] for r in rows} == {"pope", "gqa", "vqav2", "textvqa", "scienceqa_img", "mme", "mmbench"}
    assert {r["variant"] for r in rows} == {"dense", "moe", "stgc", "roe"} and len({r["run"] for r in rows}) == 4
    assert all(r["moebench_version"] and r["torch_version"] and r["transformers_version"] for r in rows)
    again = read_baseline(write_baseline(rows, tmp_path / "baseline.arrow"))
    assert again == rows

    v2 = pa.schema([f for f in R.METRICS_SCHEMA if f.name not in ("torch_version", "transformers_version")],
                   metadata={**R.METRICS_SCHEMA.metadata, b"moebench.schema_version": b"2"})
    old = [{k: v for k, v in r.items() if k in v2.names} for r in rows]
    R.write_table(old, v2, tmp_path / "v2" / "metrics-old.arrow")
    promoted = read_baseline(tmp_path / "v2" / "metrics-old.arrow")
    assert len(promoted) == len(rows)
    assert all(r["torch_version"] is None and r["transformers_version"] is None for r in promoted)
    assert [r["value"] for r in promoted] == [r["value"] for r in rows]
