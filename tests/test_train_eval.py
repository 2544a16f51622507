"""The real train -> eval path on a tiny model: reproducibility, resume, batch-size invariance."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from moebench import results


def _metrics(results_dir, run_name):
    rows = results.latest_rows(results.read_table([results_dir], "metrics")).to_pylist()
    return {(r["task"], r["split"], r["metric"]): r["value"] for r in rows if r["run"] == run_name}


def _predictions(results_dir):
    rows = results.read_rows([results_dir], "samples")
    return {(r["task"], r["split"], r["question_id"]): r["prediction"] for r in rows}


def test_train_writes_run_stages_and_tables(tiny_run):
    run, base = tiny_run
    assert (run.dir / "run.json").is_file() and (run.dir / "model" / "model.safetensors").is_file()
    stages = sorted(p.name.split("-")[1] for p in (base / "runs" / ".stages").iterdir())
    assert stages == ["clip", "finetune", "pretrain"]
    train_rows = results.read_rows([base / "results"], "train")
    assert {r["stage"] for r in train_rows} == {"clip", "pretrain", "finetune"}
    assert all(r["loss"] == r["loss"] for r in train_rows)  # no NaN


def test_cli_train_then_eval_gives_the_same_metrics(capsys, tmp_path, tiny_recipe):
    """`moebench train` evaluates at the end; `moebench eval` on the saved run reproduces it."""
    from conftest import TINY, REPO

    runs, res = tmp_path / "runs", tmp_path / "results"
    code, out, err = run_cli(["train", REPO / "recipes" / "shapes_dense.yaml", *TINY, "--runs", runs,
                              "--results", res, "--no-progress"], capsys)
    assert code == 0, err
    run_dir = next(p for p in runs.iterdir() if not p.name.startswith("."))
    first = _metrics(res, run_dir.name)
    assert {k[0] for k in first} == {"pope", "gqa"}
    assert ("pope", "mean", "f1") in first and ("gqa", "testdev_balanced", "exact_match") in first
    res2 = tmp_path / "results2"
    code, out, err = run_cli(["eval", "--tasks", "pope,gqa", "--data", "shapes", "--model", run_dir, "--limit", "8",
                              "--batch-size", "8", "--results", res2, "--no-progress"], capsys)
    assert code == 0, err
    assert _metrics(res2, run_dir.name) == first
    # eval without --model takes the most recent run
    code, _, err = run_cli(["eval", "--tasks", "gqa", "--runs", runs, "--limit", "4", "--results", tmp_path / "r3",
                            "--no-progress"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["report", res, "--json"], capsys)
    assert code == 0 and '"baseline"' in out


def test_batch_size_does_not_change_predictions(tiny_run, tmp_path):
    from moebench.eval.runner import evaluate_run

    run, _ = tiny_run
    preds = {}
    for bs in (1, 16):
        out = tmp_path / f"bs{bs}"
        evaluate_run(run, ["pope", "gqa"], data=None, batch_size=bs, limit=12, results_dir=out, progress=False)
        preds[bs] = _predictions(out)
    assert len(preds[1]) == 3 * 12 + 12
    assert preds[1] == preds[16]


def test_same_seed_same_numbers_and_resume_matches(tiny_recipe, tmp_path):
    """Two fresh runs with one seed agree exactly; a run interrupted mid-stage and resumed ends the same."""
    from moebench.train.pipeline import train

    a = train(tiny_recipe, runs_dir=tmp_path / "a", results_dir=tmp_path / "ra", progress=False)
    b = train(tiny_recipe, runs_dir=tmp_path / "b", results_dir=tmp_path / "rb", progress=False)
    assert a.meta["final_loss"] == b.meta["final_loss"]

    from moebench.eval.runner import evaluate_run

    ma = evaluate_run(a, ["pope", "gqa"], data=None, batch_size=8, limit=8, results_dir=tmp_path / "ea", progress=False)
    mb = evaluate_run(b, ["pope", "gqa"], data=None, batch_size=8, limit=8, results_dir=tmp_path / "eb", progress=False)
    assert [(r["task"], r["split"], r["metric"], r["value"]) for r in ma] == \
           [(r["task"], r["split"], r["metric"], r["value"]) for r in mb]

    calls = {"n": 0}

    def crash(step):
        calls["n"] += 1
        if step == 3 and calls["n"] > 4:  # stage finetune (after clip's 2 and pretrain's 2 steps)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_recipe, runs_dir=tmp_path / "c", results_dir=tmp_path / "rc", progress=False, on_step=crash)
    partial = [p for p in (tmp_path / "c" / ".stages").iterdir() if (p / "partial").is_dir()]
    assert len(partial) == 1 and partial[0].name.startswith("2-finetune")
    c = train(tiny_recipe, runs_dir=tmp_path / "c", results_dir=tmp_path / "rc", progress=False, resume=True)
    assert c.meta["final_loss"] == a.meta["final_loss"]
    steps = sorted(r["step"] for r in results.read_rows([tmp_path / "rc"], "train") if r["stage"] == "finetune")
    assert steps[-1] == 6


def test_moe_recipe_trains_on_the_dense_stages_and_records_routing(capsys, tmp_path):
    """shapes_moe reuses the dense stages, upcycles, trains stage III, and its rows carry the routing."""
    import json

    from conftest import REPO, TINY

    runs, res = tmp_path / "runs", tmp_path / "results"
    args = ["--runs", runs, "--results", res, "--no-progress"]
    code, _, err = run_cli(["train", REPO / "recipes" / "shapes_dense.yaml", *TINY, "--no-eval", *args], capsys)
    assert code == 0, err
    moe_tiny = [*TINY, "stages.moe.max_steps=3", "stages.moe.batch_size=8", "stages.moe.log_every=1"]
    code, _, err = run_cli(["train", REPO / "recipes" / "shapes_moe.yaml", *moe_tiny, *args], capsys)
    assert code == 0, err
    assert "reusing stages ['clip', 'pretrain', 'finetune']" in err
    rows = [r for r in results.read_rows([res], "metrics") if r["run"].startswith("shapes_moe")]
    assert rows and all(r["variant"] == "moe" for r in rows)
    assert all(r["params_activated"] < r["params_total"] for r in rows)
    load = json.loads(rows[0]["extra"])["expert_load"]
    assert sorted(load) == ["0"] and len(load["0"]) == 4 and abs(sum(load["0"]) - 1) < 1e-9
    steps = [r for r in results.read_rows([res], "train") if r["stage"] == "moe"]
    assert len(steps) == 3 and all(r["aux_loss"] > 0 for r in steps)
    extra = json.loads(steps[-1]["extra"])
    assert set(extra) == {"load", "entropy", "dropped"} and len(extra["load"]["0"]) == 4
    # the saved MoE run reloads (structure rebuilt from model.json) and reproduces its metrics
    run_dir = next(p for p in runs.iterdir() if p.name.startswith("shapes_moe"))
    first = _metrics(res, run_dir.name)
    code, _, err = run_cli(["eval", "--tasks", "pope,gqa", "--model", run_dir, "--limit", "8", "--batch-size", "8",
                            "--results", tmp_path / "r2", "--no-progress"], capsys)
    assert code == 0, err
    assert _metrics(tmp_path / "r2", run_dir.name) == first


def test_stgc_recipe_logs_conflicts_per_layer(capsys, tmp_path):
    import json

    from conftest import REPO, TINY

    runs, res = tmp_path / "runs", tmp_path / "results"
    tiny = [*TINY, "stages.moe.max_steps=2", "stages.moe.batch_size=8", "stages.moe.log_every=1"]
    code, _, err = run_cli(["train", REPO / "recipes" / "shapes_stgc.yaml", *tiny, "stgc.gradient=exact",
                            "--runs", runs, "--results", res, "--no-progress"], capsys)
    assert code == 0, err
    steps = [r for r in results.read_rows([res], "train") if r["stage"] == "moe"]
    assert len(steps) == 2
    extra = json.loads(steps[-1]["extra"])
    assert sorted(extra["conflict_rate"]) == ["0"] and 0 <= extra["conflict_rate"]["0"] <= 1
    assert -1 <= extra["grad_cos"]["0"] <= 1 and "stgc_loss" in extra
    rows = [r for r in results.read_rows([res], "metrics")]
    assert rows and all(r["variant"] == "stgc" for r in rows)


def test_roe_recipe_trains_and_reports_skips_and_measured_params(capsys, tmp_path):
    import json

    from conftest import REPO, TINY

    runs, res = tmp_path / "runs", tmp_path / "results"
    tiny = [*TINY, "model.llm.layers=4", "stages.roe.max_steps=4", "stages.roe.batch_size=8",
            "stages.roe.log_every=1"]
    code, _, err = run_cli(["train", REPO / "recipes" / "shapes_roe.yaml", *tiny, "--runs", runs, "--results", res,
                            "--no-progress"], capsys)
    assert code == 0, err
    steps = [r for r in results.read_rows([res], "train") if r["stage"] == "roe"]
    assert len(steps) == 4 and all(r["aux_loss"] >= 0 for r in steps)
    assert all("skip_rate" in json.loads(r["extra"]) for r in steps)
    rows = [r for r in results.read_rows([res], "metrics")]
    assert rows and all(r["variant"] == "roe" for r in rows)
    extra = json.loads(rows[0]["extra"])
    assert sorted(extra["skip_rate"]) == ["1", "2"] and 0 <= extra["skip_ratio"] <= 1
    assert rows[0]["params_activated"] <= rows[0]["params_total"]
    run_dir = next(p for p in runs.iterdir() if p.name.startswith("shapes_roe"))
    code, _, err = run_cli(["eval", "--tasks", "gqa", "--model", run_dir, "--limit", "8", "--batch-size", "4",
                            "--results", tmp_path / "r2", "--no-progress"], capsys)
    assert code == 0, err  # the RoE structure is rebuilt from model.json
    code, out, err = run_cli(["bench", "roe", "--model", run_dir, "--limit", "4", "--batch-sizes", "1,2",
                              "--repeats", "1", "--profile", tmp_path / "prof", "--json"], capsys)
    assert code == 0, err
    b = json.loads(out)
    assert sorted(b["by_batch_size"]) == ["1", "2"] and b["samples"] == 4 and b["by_batch_size"]["1"]["rounds"] == 1
    assert 0 <= b["skip_ratio_all_layers"] <= b["skip_ratio_routable_layers"] <= 1
    patterns = b["skip_patterns"]  # one letter per routable layer, r(un) or s(kip); the skips add up to s
    assert sum(patterns.values()) == 4 and all(len(p) == 2 and set(p) <= {"r", "s"} for p in patterns)
    skips = sum(n * p.count("s") for p, n in patterns.items())
    assert skips / (4 * 4) == pytest.approx(b["skip_ratio_all_layers"])
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == [
        "dense-batch1.txt", "dense-batch2.txt", "roe-batch1.txt", "roe-batch2.txt"]
    for x in b["by_batch_size"].values():
        assert x["ratio"] == pytest.approx(x["roe_ms_per_sample"] / x["dense_ms_per_sample"])
        assert x["roe_ms_per_sample"] == pytest.approx(x["prefill_ms_per_sample"]["roe"]
                                                       + x["decode_ms_per_sample"]["roe"])
        assert 0 < x["decoder_share_f"] < 1  # the decoder layers are part of the LM's time, not all of it
        assert x["bound_1_minus_f_s"] == pytest.approx(1 - x["decoder_share_f"] * b["skip_ratio_all_layers"])
        assert x["bound_1_minus_0.7_s_f"] == pytest.approx(1 - 0.7 * x["decoder_share_f"] * b["skip_ratio_all_layers"])
        assert x["meets_bound"] == (x["ratio"] <= x["bound_1_minus_0.7_s_f"])
        assert x["identical_to_one_at_a_time"]  # grouped decoding answers as the model does one prompt at a time
        assert x["ratio_batches_of_one_pattern"] > 0
        ops = x["ops_differing_most"]  # the profiler's operators, the largest differences first
        gaps = [abs(o["roe_us_per_sample"] - o["dense_us_per_sample"]) for o in ops]
        assert ops and gaps == sorted(gaps, reverse=True)
        assert any(o["roe_calls"] != o["dense_calls"] for o in ops)  # routing runs operators dense does not


def test_interrupted_eval_resumes_without_recomputing(tiny_run, tmp_path, monkeypatch):
    """Kill an eval after two batches; the rerun computes only the rest and gives the same metrics."""
    from moebench.eval import runner

    run, _ = tiny_run
    full = runner.evaluate_run(run, ["gqa"], data=None, batch_size=4, limit=16, results_dir=tmp_path / "full",
                               progress=False)
    real = runner.greedy_generate
    calls = {"n": 0, "prompts": 0}

    def flaky(model, prompts, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # warm-up + 2 batches done, the 3rd batch dies
            raise KeyboardInterrupt
        calls["prompts"] += len(prompts)
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(runner, "greedy_generate", flaky)
    res = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate_run(run, ["gqa"], data=None, batch_size=4, limit=16, results_dir=res, progress=False)
    partial = list((res / run.name / ".partial").glob("gqa-*.jsonl"))
    assert len(partial) == 1 and len(partial[0].read_text().splitlines()) == 8
    calls.update(n=-100, prompts=0)  # no more failures; count what the rerun computes
    again = runner.evaluate_run(run, ["gqa"], data=None, batch_size=4, limit=16, results_dir=res, progress=False)
    assert calls["prompts"] == 4 + 8  # the warm-up batch and the 8 samples that were left
    assert [(r["metric"], r["value"]) for r in again] == [(r["metric"], r["value"]) for r in full]
    assert not partial[0].exists()


def test_eval_all_five_tasks_on_the_shapes_world(tiny_run, tmp_path, capsys):
    """Every task runs on the embedded world and its rows carry the latency columns."""
    run, _ = tiny_run
    code, _, err = run_cli(["eval", "--tasks", "pope,gqa,vqav2,textvqa,scienceqa_img", "--data", "shapes",
                            "--model", run.dir, "--limit", "6", "--batch-size", "4", "--results", tmp_path,
                            "--no-progress"], capsys)
    assert code == 0, err
    rows = results.read_rows([tmp_path], "metrics")
    assert {r["task"] for r in rows} == {"pope", "gqa", "vqav2", "textvqa", "scienceqa_img"}
    assert all(r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["samples_per_s"] > 0 for r in rows)
    heads = {(r["task"], r["metric"]) for r in rows}
    assert {("vqav2", "accuracy"), ("textvqa", "accuracy"), ("scienceqa_img", "accuracy"),
            ("scienceqa_img", "unparsable")} <= heads
    samples = [r for r in results.read_rows([tmp_path], "samples") if r["task"] == "vqav2"]
    assert len(json.loads(samples[0]["target"])) == 10  # the 10 annotator answers


def test_repeated_prompts_are_generated_once_with_their_own_answers(tiny_run, monkeypatch):
    """POPE's splits share questions: each distinct (image, question) is generated once, and every sample
    gets the answer it gets when its split is evaluated alone (no prompt repeats within a split)."""
    import torch

    from moebench.data.conversations import Encoder
    from moebench.data.sources import resolve
    from moebench.eval import runner
    from moebench.eval.tasks import load_samples, load_task

    run, _ = tiny_run
    model, tok = run.load_model()
    enc = Encoder(tok, model.num_image_tokens, model.image_token_id, system=run.recipe.model.system)
    task = load_task("pope")
    samples = load_samples(task, resolve(run.recipe.data.source, run.recipe.data.world, progress=False).root, 12)
    distinct = {(s.image, s.question) for s in samples}
    assert len(samples) == 36 and len(distinct) < len(samples)
    real, generated = runner.greedy_generate, []

    def counting(model, prompts, *a, **kw):
        generated.append(len(prompts))
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr(runner, "greedy_generate", counting)
    kw = {"vision": run.recipe.model.vision, "batch_size": 5, "max_new_tokens": task.max_new_tokens,
          "device": torch.device("cpu"), "progress": False}
    records, _, _ = runner.predict(model, tok, enc, task, samples, **kw)
    assert sum(generated[1:]) == len(distinct)  # after the warm-up batch
    assert [(r["split"], r["question_id"]) for r in records] == [(s.split, s.question_id) for s in samples]
    alone = {}
    for split in {s.split for s in samples}:
        part = [s for s in samples if s.split == split]
        assert len({(s.image, s.question) for s in part}) == len(part)
        recs, _, _ = runner.predict(model, tok, enc, task, part, **kw)
        alone.update({(r["split"], r["question_id"]): r["prediction"] for r in recs})
    assert {(r["split"], r["question_id"]): r["prediction"] for r in records} == alone


def test_several_recipes_in_one_process_match_separate_processes(capsys, tmp_path):
    """`moebench train dense.yaml moe.yaml` gives the runs and metrics of two separate `train` commands."""
    from conftest import REPO, TINY

    dense, moe = REPO / "recipes" / "shapes_dense.yaml", REPO / "recipes" / "shapes_moe.yaml"
    both, apart = tmp_path / "both", tmp_path / "apart"
    code, _, err = run_cli(["train", dense, moe, *TINY, "--runs", both / "runs", "--results", both / "res",
                            "--no-progress"], capsys)
    assert code == 0, err
    for recipe in (dense, moe):
        code, _, err = run_cli(["train", recipe, *TINY, "--runs", apart / "runs", "--results", apart / "res",
                                "--no-progress"], capsys)
        assert code == 0, err
    names = sorted(p.name for p in (both / "runs").iterdir() if not p.name.startswith("."))
    assert [n.split("-")[0] for n in names] == ["shapes_dense", "shapes_moe"]
    assert names == sorted(p.name for p in (apart / "runs").iterdir() if not p.name.startswith("."))
    for name in names:
        assert _metrics(both / "res", name) == _metrics(apart / "res", name) != {}
    code, _, err = run_cli(["train", dense, "seed=1", moe, "--runs", tmp_path / "r"], capsys)
    assert code == 2 and "comes after the overrides" in err
