"""Crash safety: `moebench train` killed with SIGKILL inside a training step, while a checkpoint or a
results file is being written, and during its evaluation, then resumed with `--resume` each time, ends
with the loss, metrics and predictions of an uninterrupted run; after every kill, every file a reader
opens (checkpoints, run dirs, Arrow tables, eval partial files) loads cleanly.

The kills come from inside the process at named points (moebench/faults.py), so they land on the same
instruction every time; the process gets no chance to clean up, exactly as with `kill -9`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY
from moebench import results
from moebench.faults import KILL_ENV

RECIPE = REPO / "recipes" / "shapes_dense.yaml"
# stage finetune: 6 steps of 2 micro-batches (4 + 4), a resumable checkpoint every 2 steps, a training
# row per step; then GQA on 8 samples in 2 batches of 4
CRASH = [*TINY, "stages.finetune.batch_size=4", "stages.finetune.grad_accum=2", "eval.tasks=[gqa]",
         "eval.batch_size=4"]

# Each kill resumes the previous one's leftovers (the first starts fresh); `fault_point` counts per process.
KILLS = [
    ("step:3", "inside step 3: after the backward of both micro-batches, before the update"),
    ("checkpoint:1", "writing the step-4 checkpoint over the step-2 one"),
    ("results:1", "writing the training rows of steps 3-4"),
    ("partial:1", "evaluating, after the first batch of samples was stored"),
]


def _is_temp(part: str) -> bool:
    """Names of files and folders under construction: hidden, and marked .tmp / .old (see atomic_dir, write_table)."""
    return part.startswith(".") and (".tmp" in part or ".old-" in part)


def _problems(runs: Path, res: Path) -> list[str]:
    """Every visible checkpoint / run / results file that does not load, as messages."""
    import torch
    from safetensors.torch import load_file

    from moebench.eval.partial import read_partial

    bad = []
    for p in sorted(runs.rglob("*")):
        if any(_is_temp(part) for part in p.relative_to(runs).parts) or not p.is_file():
            continue
        try:
            if p.suffix == ".safetensors":
                load_file(str(p))
            elif p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".pt":
                torch.load(p, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            bad.append(f"{p}: {type(e).__name__}: {e}")
    for d in sorted(runs.rglob("model")) + sorted(runs.rglob("partial")):
        if any(_is_temp(part) for part in d.relative_to(runs).parts):
            continue
        need = ["model.safetensors", "model.json", "tokenizer"] if d.name == "model" else ["weights.safetensors", "state.pt"]
        bad += [f"{d}: no {n}" for n in need if not (d / n).exists()]
    for d in sorted(p for p in runs.iterdir() if not p.name.startswith(".")):
        if not ((d / "run.json").is_file() and (d / "model").is_dir()):
            bad.append(f"{d}: a run dir without run.json and model/")
    if res.exists():
        for kind in results.SCHEMAS:
            try:
                results.read_table([res], kind)
            except Exception as e:  # noqa: BLE001
                bad.append(f"{res} ({kind}): {e}")
        for p in res.rglob("*.jsonl"):
            read_partial(p)
    return bad


def _partial_step(runs: Path) -> int | None:
    import torch

    found = [p for p in (runs / ".stages").glob("2-finetune-*/partial/state.pt")]
    return torch.load(found[0], weights_only=True)["step"] if found else None


def _finetune_steps(res: Path) -> set[int]:
    return {r["step"] for r in results.read_rows([res], "train") if r["stage"] == "finetune"}


def _with_first_stages(tiny_run, runs: Path) -> None:
    """Reuse the session's clip and pretrain stages: only stage finetune (and eval) run here."""
    _, base = tiny_run
    for d in (base / "runs" / ".stages").iterdir():
        if d.name.startswith(("0-clip-", "1-pretrain-")):
            shutil.copytree(d, runs / ".stages" / d.name)


def _train_here(args: list) -> None:
    """`moebench train ARGS` through the real entry point, in this process (saves a torch import)."""
    from moebench.cli import main

    old, sys.argv = sys.argv, ["moebench", "train", *map(str, args)]
    try:
        main()
    except SystemExit as e:
        assert not e.code, f"moebench train {args} exited with {e.code} (its error is in the captured stderr)"
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory):
    """The uninterrupted run: final loss, GQA metrics and predictions."""
    base = tmp_path_factory.mktemp("reference")
    runs, res = base / "runs", base / "results"
    _with_first_stages(tiny_run, runs)
    _train_here([RECIPE, *CRASH, "--runs", runs, "--results", res, "--no-progress"])
    return _outcome(runs, res)


def _outcome(runs: Path, res: Path) -> dict:
    run_dir = next(p for p in runs.iterdir() if not p.name.startswith("."))
    metrics = results.latest_rows(results.read_table([res], "metrics")).to_pylist()
    samples = results.latest_rows(results.read_table([res], "samples"), ("run", "task", "split", "question_id"))
    return {"final_loss": json.loads((run_dir / "run.json").read_text())["final_loss"],
            "metrics": {(r["task"], r["split"], r["metric"]): r["value"] for r in metrics},
            "predictions": {r["question_id"]: r["prediction"] for r in samples.to_pylist()}}


@pytest.fixture(scope="module")
def crashed(tiny_run, tmp_path_factory):
    """Train with a kill at each point of KILLS in turn (each time resuming), then a clean --resume.
    Records what every kill left behind, for the tests below."""
    base = tmp_path_factory.mktemp("crashed")
    runs, res = base / "runs", base / "results"
    _with_first_stages(tiny_run, runs)
    cmd = [sys.executable, "-c", "from moebench.cli import main; main()", "train", str(RECIPE), *CRASH,
           "--runs", str(runs), "--results", str(res), "--no-progress"]
    after = []
    for i, (point, _) in enumerate(KILLS):
        env = {**os.environ, KILL_ENV: point}
        p = subprocess.run(cmd + (["--resume"] if i else []), env=env, capture_output=True, text=True, timeout=300)
        temps = sorted(str(q.relative_to(base)) for q in base.rglob("*") if _is_temp(q.name))
        after.append({"rc": p.returncode, "stderr": p.stderr[-2000:], "problems": _problems(runs, res),
                      "partial_step": _partial_step(runs), "temps": temps,
                      "eval_partial": [len(q.read_text().splitlines()) for q in res.rglob(".partial/*.jsonl")]})
    _train_here([RECIPE, *CRASH, "--resume", "--runs", runs, "--results", res, "--no-progress"])
    return {"after": after, "final": _outcome(runs, res), "problems": _problems(runs, res),
            "steps": _finetune_steps(res), "base": base}


def test_each_kill_is_a_sigkill_and_leaves_every_visible_file_loadable(crashed):
    for (point, where), a in zip(KILLS, crashed["after"]):
        assert a["rc"] == -signal.SIGKILL, f"{point} ({where}) was not reached: exit {a['rc']}\n{a['stderr']}"
        assert a["problems"] == [], f"after the kill at {point} ({where}): {a['problems']}"
    assert crashed["problems"] == []


def test_resume_after_every_kill_ends_like_the_uninterrupted_run(crashed, reference):
    assert crashed["final"]["final_loss"] == reference["final_loss"]
    assert crashed["final"]["metrics"] == reference["metrics"]
    assert crashed["final"]["predictions"] == reference["predictions"] and len(reference["predictions"]) == 8


def test_a_killed_checkpoint_write_keeps_the_previous_checkpoint(crashed):
    steps = [a["partial_step"] for a in crashed["after"]]
    # killed in step 3: the step-2 checkpoint; killed writing step 4's: still step 2's, whole; once the
    # stage is done its resumable checkpoint is gone (the stage model replaces it)
    assert steps[:2] == [2, 2] and steps[-1] is None
    assert any(".partial.tmp-" in t for t in crashed["after"][1]["temps"])  # the killed write's temp dir ...
    assert not any(".partial.tmp-" in t for t in crashed["after"][3]["temps"])  # ... removed by a later write


def test_eval_resumes_from_its_partial_file(crashed):
    assert crashed["after"][3]["eval_partial"] == [4]  # one batch of 4 stored when the eval was killed
    assert not list(crashed["base"].rglob(".partial/*.jsonl"))  # deleted once the task's rows were written


def test_a_killed_results_write_leaves_only_a_hidden_temp_file(crashed):
    assert any(t.endswith(".tmp") and "/.train-" in t for t in crashed["after"][2]["temps"])  # never read
    assert {1, 2, 5, 6} <= crashed["steps"]  # rows written before the kill, and by the resumed steps


def test_training_rows_of_every_step_survive_the_kills(crashed):
    assert crashed["steps"] == {1, 2, 3, 4, 5, 6}
