"""Data parallelism on torch.distributed, on the CPU (gloo): two processes under torchrun train the loss
curve one process trains on the same global batch (atol 1e-5), for the shapes dense and MoE stages under
DDP and the RoE stage under FSDP2; a 2-rank eval gives the metrics of a 1-rank eval; a checkpoint
written by 2 processes resumes in 1; a NaN loss stops training with a one-line error (exit code 2),
keeps the last good checkpoint and records the step.

Every torchrun launch costs ~10 s of start-up (three Python processes import torch), so the tests
share one single-process reference and launch torchrun twice in all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

from conftest import REPO, TINY, run_cli
from moebench import results

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")

DENSE, MOE, ROE = (REPO / "recipes" / f"shapes_{v}.yaml" for v in ("dense", "moe", "roe"))
# Every step logged. Stage pretrain trains on 17 conversations in batches of 8: its 3rd global batch has
# one item, so with 2 ranks one of them runs a stand-in that must count for nothing.
STAGES = [*TINY, "stages.clip.log_every=1", "stages.pretrain.log_every=1", "stages.pretrain.max_samples=17",
          "stages.pretrain.max_steps=3"]
MOE_ARGS = [*STAGES, "stages.moe.max_steps=3", "stages.moe.batch_size=8", "stages.moe.log_every=1"]
# RoE on the 2-layer tiny LLM: layer 1 routable; 6 steps cover its phases (random warm-up, soft routing, tuning)
ROE_ARGS = [*STAGES, "roe.layers=[1]", "stages.roe.max_steps=6", "stages.roe.batch_size=8", "stages.roe.log_every=1",
            "stages.roe.save_every=2"]
ATOL = 1e-5

# torchrun runs this in each process: train, and stop every rank after step 3 (the step-2 checkpoint is written)
WORKER = """
import sys
from moebench.config import load_recipe
from moebench.train.pipeline import train

def stop(step):
    if step == 3:
        raise SystemExit(3)

recipe, runs, res, *overrides = sys.argv[1:]
train(load_recipe(recipe, overrides), runs_dir=runs, results_dir=res, progress=False, on_step=stop)
"""


def _losses(res: Path, stages=None) -> dict[tuple[str, int], float]:
    return {(r["stage"], r["step"]): r["loss"] for r in results.read_rows([res], "train")
            if stages is None or r["stage"] in stages}


def _metrics(res: Path) -> dict:
    return {(r["task"], r["split"], r["metric"]): r["value"] for r in results.read_rows([res], "metrics")}


def _run_dir(runs: Path, prefix: str) -> Path:
    return next(p for p in runs.iterdir() if p.name.startswith(prefix))


def _launch(cmd: list) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The references, trained in this process: shapes_moe (its dense stages, then MoE) and shapes_roe's
    RoE stage on the same dense stages."""
    from moebench.config import load_recipe
    from moebench.train.pipeline import train

    base = tmp_path_factory.mktemp("one_process")
    runs = base / "runs"
    train(load_recipe(MOE, MOE_ARGS), runs_dir=runs, results_dir=base / "results", progress=False)
    train(load_recipe(ROE, ROE_ARGS), runs_dir=runs, results_dir=base / "roe_results", progress=False)
    return base


def test_ddp_two_processes_train_and_evaluate_like_one(one_process, tmp_path):
    """`moebench train --nproc 2` (torchrun, DDP): the per-step loss of every stage (CLIP, captions, QA,
    MoE) is one process's; its eval (2 ranks) gives the metrics and expert load of a 1-rank eval."""
    from moebench.eval.runner import evaluate_run
    from moebench.runs import open_run

    runs, res = tmp_path / "runs", tmp_path / "results"
    done = _launch([sys.executable, "-m", "moebench", "train", MOE, *MOE_ARGS, "--runs", runs, "--results", res,
                    "--no-progress", "--nproc", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    ref, two = _losses(one_process / "results"), _losses(res)
    assert sorted(two) == sorted(ref) and {s for s, _ in two} == {"clip", "pretrain", "finetune", "moe"}
    for key in ref:
        assert abs(two[key] - ref[key]) <= ATOL, (key, two[key], ref[key])

    # the 2-rank eval that followed training, against a 1-rank eval of the same weights
    run = open_run(_run_dir(runs, "shapes_moe"))
    one = evaluate_run(run, ["pope", "gqa"], data=None, batch_size=8, limit=8, results_dir=tmp_path / "one_rank",
                       progress=False)
    assert _metrics(res) == _metrics(tmp_path / "one_rank") and len(_metrics(res)) > 5
    two_rank = next(r for r in results.read_rows([res], "metrics") if r["task"] == "pope")
    load_two = json.loads(two_rank["extra"])["expert_load"]
    load_one = next(r["extra"]["expert_load"] for r in one if r["task"] == "pope")
    assert load_two.keys() == load_one.keys()
    assert all(abs(a - b) < 1e-12 for k in load_one for a, b in zip(load_one[k], load_two[k]))
    samples = results.read_rows([res], "samples")
    assert len(samples) == len({(r["task"], r["split"], r["question_id"]) for r in samples}) == 3 * 8 + 8
    assert not list(res.rglob("*.jsonl"))  # every rank's partial file is gone once the rows are written


def test_fsdp_checkpoint_of_two_processes_resumes_in_one(one_process, tmp_path):
    """torchrun, FSDP2, RoE stage: both processes stop after step 3; the step-2 checkpoint (written once,
    full state) resumes in one process, and steps 1-6 are the loss curve of the uninterrupted run."""
    from moebench.config import load_recipe
    from moebench.train.pipeline import train

    runs, res = tmp_path / "runs", tmp_path / "results"
    for d in (one_process / "runs" / ".stages").iterdir():  # the dense stages: only stage roe trains here
        if d.name.startswith(("0-", "1-", "2-")):
            shutil.copytree(d, runs / ".stages" / d.name)
    (tmp_path / "worker.py").write_text(WORKER)
    args = [*ROE_ARGS, "distributed=fsdp"]
    done = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    tmp_path / "worker.py", ROE, runs, res, *args])
    assert done.returncode != 0, "the workers were to stop after step 3"
    import torch

    (partial,) = (runs / ".stages").glob("3-roe-*/partial")
    state = torch.load(partial / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == 2 and state["data"]["batch"] == 2
    assert any(k.startswith("llm.model.layers.1.adapter") for k in state["optimizer"]["state"])  # keyed by name
    assert sorted(_losses(res)) == [("roe", 1), ("roe", 2)]  # rows after the checkpoint were not logged

    run = train(load_recipe(ROE, args), runs_dir=runs, results_dir=res, progress=False, resume=True)
    ref = _losses(one_process / "roe_results", {"roe"})
    got = _losses(res)
    assert sorted(got) == sorted(ref) == [("roe", s) for s in range(1, 7)]
    for key in ref:
        assert abs(got[key] - ref[key]) <= ATOL, (key, got[key], ref[key])
    ref_run = json.loads(_run_dir(one_process / "runs", "shapes_roe").joinpath("run.json").read_text())
    assert abs(run.meta["final_loss"] - ref_run["final_loss"]) <= ATOL


def test_nan_loss_stops_with_one_line_error_and_keeps_the_checkpoint(one_process, tmp_path, capsys, monkeypatch):
    """A NaN loss at step 3 of stage finetune: exit code 2, one line naming the step and the kept
    step-2 checkpoint, the step recorded in nonfinite.json, and no model or run written."""
    import torch

    from moebench.models import vlm

    runs = tmp_path / "runs"
    for d in (one_process / "runs" / ".stages").iterdir():
        if d.name.startswith(("0-", "1-")):
            shutil.copytree(d, runs / ".stages" / d.name)
    real, calls = vlm.lm_loss, {"n": 0}

    def nan_from_step_3(logits, labels, positions=None):  # one call per micro-batch, one micro-batch per step
        calls["n"] += 1
        loss = real(logits, labels, positions)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(vlm, "lm_loss", nan_from_step_3)
    code, _, err = run_cli(["train", DENSE, *STAGES, "--runs", runs, "--results", tmp_path / "results",
                            "--no-progress", "--no-eval"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: stage finetune: the loss is nan at step 3 of 6") and "(step 2)" in line, err
    assert "Traceback" not in err
    (stage,) = (runs / ".stages").glob("2-finetune-*")
    assert torch.load(stage / "partial" / "state.pt", weights_only=True)["step"] == 2
    record = json.loads((stage / "nonfinite.json").read_text())
    assert record["step"] == 3 and record["checkpoint_step"] == 2 and record["loss"] == "nan"
    assert not (stage / "model").exists() and not [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert {r["step"] for r in results.read_rows([tmp_path / "results"], "train")} == {1, 2}


def test_distributed_key_is_checked_like_every_recipe_key(capsys):
    from moebench.config import load_recipe

    assert load_recipe(DENSE).distributed == "ddp" and load_recipe(DENSE, ["distributed=fsdp"]).distributed == "fsdp"
    code, _, err = run_cli(["train", DENSE, "distributed=zero3", "--no-progress"], capsys)
    assert code == 2
    assert err.strip() == "error: distributed='zero3' is not allowed; choose one of ['ddp', 'fsdp']"


def test_global_batches_are_split_across_ranks_exactly():
    """Each rank takes items rank, rank + W, ... of every global batch: together every item once, in the
    batches one process uses, whatever W."""
    from moebench.train.loop import batch_order, shard

    for world in (1, 2, 3, 8):
        for batch in batch_order(21, 8, seed=0, epoch=1):
            parts = [shard(batch, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == sorted(batch)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(b) for b in batch_order(21, 8, seed=0, epoch=1)] == [8, 8, 5]
