"""Concurrent writers: processes writing into one results directory at once keep every row, and
`report` reads them together (each write is a new file, see moebench/results.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from conftest import run_cli
from moebench import results

WRITERS, APPENDS, ROWS = 4, 25, 20

# One writer: waits for the start signal, then appends `appends` tables of `rows` metric rows each.
WRITER = """
import os, sys, time
from moebench import results
results_dir, go, writer, appends, rows = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
while not os.path.exists(go):
    time.sleep(0.005)
run = "shared" if writer % 2 == 0 else f"own{writer}"  # two writers share one run folder
for a in range(appends):
    results.append_rows(results_dir, "metrics", run, [
        {"run": run, "task": f"w{writer}", "split": str(a), "metric": f"m{r}", "value": float(r),
         "timestamp": results.utc_now()} for r in range(rows)])
"""

# A reader polling meanwhile: every read must succeed (no half-written file is ever visible).
READER = """
import os, sys, time
from moebench import results
results_dir, go, done = sys.argv[1], sys.argv[2], sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.005)
reads = 0
while not os.path.exists(done):
    results.read_table([results_dir], "metrics")
    reads += 1
print(reads)
"""


def test_parallel_writers_keep_every_row_and_readers_never_see_half_a_file(tmp_path, capsys):
    res, go, done = tmp_path / "results", tmp_path / "go", tmp_path / "done"
    res.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(res), str(go), str(w), str(APPENDS), str(ROWS)])
               for w in range(WRITERS)]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(res), str(go), str(done)], stdout=subprocess.PIPE,
                              text=True)
    time.sleep(1.0)  # let every process import and wait at the start line
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0] * WRITERS
    done.touch()
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0 and int(out) > 0

    rows = results.read_rows([res], "metrics")
    assert len(rows) == WRITERS * APPENDS * ROWS
    assert {(r["task"], r["split"], r["metric"]) for r in rows} == \
        {(f"w{w}", str(a), f"m{r}") for w in range(WRITERS) for a in range(APPENDS) for r in range(ROWS)}
    assert len(list((res / "shared").glob("metrics-*.arrow"))) == 2 * APPENDS  # one file per append
    assert not [p for p in res.rglob(".*") if p.is_file()]  # no temp file left behind

    code, out, err = run_cli(["report", res, "--json", "--all"], capsys)
    assert code == 0, err
    assert len(json.loads(out)) == WRITERS * APPENDS * ROWS  # every (run, task, split, metric) is distinct


def test_two_evals_into_one_results_dir_at_once_keep_all_their_rows(tiny_run, tmp_path, capsys):
    """Two `moebench eval` processes (two runs) write into one results folder at the same time."""
    run, _ = tiny_run
    twin = tmp_path / "runs" / "twin"
    shutil.copytree(run.dir, twin)
    meta = json.loads((twin / "run.json").read_text())
    (twin / "run.json").write_text(json.dumps({**meta, "name": "twin"}))
    res = tmp_path / "results"
    cmd = [sys.executable, "-c", "from moebench.cli import main; main()", "eval", "--tasks", "pope,gqa", "--limit", "2",
           "--results", str(res), "--no-progress"]
    procs = [subprocess.Popen([*cmd, "--model", str(d), "--batch-size", str(bs)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=os.environ.copy())
             for d, bs in ((run.dir, 4), (twin, 2))]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    metrics = results.read_rows([res], "metrics")
    by_run = {name: {(r["task"], r["split"], r["metric"]): r["value"] for r in metrics if r["run"] == name}
              for name in (run.name, "twin")}
    n_pope = len([k for k in by_run["twin"] if k[0] == "pope"])
    assert n_pope and n_pope % 4 == 0  # each metric for 3 splits + their mean
    assert by_run[run.name] == by_run["twin"]  # same weights, same numbers; nothing lost or mixed
    assert len(metrics) == 2 * len(by_run["twin"])
    samples = results.read_rows([res], "samples")
    assert sorted(r["run"] for r in samples) == [run.name] * 8 + ["twin"] * 8  # 3 POPE splits + GQA, 2 each
    assert not list(res.rglob(".partial/*.jsonl"))

    code, out, err = run_cli(["report", res, "--json"], capsys)
    assert code == 0, err
    assert {(r["run"], r["task"]) for r in json.loads(out)} == \
        {(name, task) for name in (run.name, "twin") for task in ("pope", "gqa")}
