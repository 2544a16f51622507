"""Bad input: exit code 2, one line on stderr naming the problem and the fix, no traceback."""

from __future__ import annotations

import json

from conftest import REPO, run_cli

RECIPE = REPO / "recipes" / "shapes_dense.yaml"


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_unknown_recipe_key(capsys, tmp_path):
    code, _, err = run_cli(["train", RECIPE, "optim.lr=1e-4", "--runs", tmp_path], capsys)
    _one_line_error(code, err, "unknown recipe key 'optim'")


def test_unknown_key_in_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("\nseed: 0\n", "\nseed: 0\nsede: 1\n"))
    code, _, err = run_cli(["validate", bad], capsys)
    _one_line_error(code, err, "unknown recipe key 'sede'", "did you mean 'seed'")


def test_wrong_type(capsys, tmp_path):
    code, _, err = run_cli(["train", RECIPE, "stages.finetune.batch_size=big", "--runs", tmp_path], capsys)
    _one_line_error(code, err, "stages.finetune.batch_size='big' must be an int")


def test_missing_recipe_file(capsys, tmp_path):
    code, _, err = run_cli(["validate", tmp_path / "nope.yaml"], capsys)
    _one_line_error(code, err, "missing recipe file")


def test_missing_data_root(capsys, tmp_path):
    code, _, err = run_cli(["train", RECIPE, f"data.source={tmp_path / 'nowhere'}", "--runs", tmp_path], capsys)
    _one_line_error(code, err, "missing data root", "--data (eval)")


def test_missing_data_file(capsys, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    code, _, err = run_cli(["train", RECIPE, f"data.source={root}", "--runs", tmp_path / "runs"], capsys)
    _one_line_error(code, err, "missing training data file", "shapes_caption_train2014.json")


def test_model_that_is_not_a_run(capsys, tmp_path):
    code, _, err = run_cli(["eval", "--tasks", "pope", "--model", tmp_path], capsys)
    _one_line_error(code, err, "is not a moebench run")


def test_eval_without_any_run(capsys, tmp_path):
    code, _, err = run_cli(["eval", "--tasks", "pope", "--runs", tmp_path / "empty"], capsys)
    _one_line_error(code, err, "missing trained run", "moebench train")


def test_unknown_task(capsys, tiny_run):
    run, base = tiny_run
    code, _, err = run_cli(["eval", "--tasks", "popе,gqa", "--model", run.dir, "--results", base / "r"], capsys)
    _one_line_error(code, err, "unknown task")


def test_missing_image_and_missing_questions(capsys, tiny_run, tmp_path):
    """A real-format data root whose POPE file names an image that is not there."""
    run, base = tiny_run
    root = tmp_path / "root"
    code, _, err = run_cli(["eval", "--tasks", "pope", "--model", run.dir, "--data", root], capsys)
    _one_line_error(code, err, "missing data root")
    (root / "pope").mkdir(parents=True)
    code, _, err = run_cli(["eval", "--tasks", "pope", "--model", run.dir, "--data", root], capsys)
    _one_line_error(code, err, "missing pope file", "coco_pope_random.json", "DATA_ROOT/pope/")
    for split in ("random", "popular", "adversarial"):
        (root / "pope" / f"coco_pope_{split}.json").write_text(json.dumps(
            {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", "label": "yes"}) + "\n")
    code, _, err = run_cli(["eval", "--tasks", "pope", "--model", run.dir, "--data", root, "--results", tmp_path / "r"], capsys)
    _one_line_error(code, err, "missing image", "COCO_val2014_000000000001.jpg")


def test_checkpoint_that_does_not_match_recipe(capsys, tiny_run, tmp_path):
    import shutil

    run, _ = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy)
    meta = json.loads((copy / "run.json").read_text())
    meta["recipe"]["model"]["llm"]["layers"] = 3
    (copy / "run.json").write_text(json.dumps(meta))
    code, _, err = run_cli(["eval", "--tasks", "pope", "--model", copy, "--limit", "2"], capsys)
    _one_line_error(code, err, "does not match the recipe", "model.llm.layers")


def test_help_is_instant_and_lists_commands(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for cmd in ("train", "eval", "validate", "report", "data", "ls"):
        assert cmd in out


def test_bench_gpu_runs_at_tiny_sizes_on_cpu(tmp_path, capsys):
    """`moebench bench gpu --device cpu --tiny`: the GPU benchmark's code at tiny sizes, so it cannot rot
    unnoticed: MoE layer ratios, a training step, generation of the dense / MoE / RoE models, rows and a
    markdown table."""
    from conftest import run_cli
    from moebench import results

    code, out, err = run_cli(["bench", "gpu", "--device", "cpu", "--tiny", "--results", tmp_path], capsys)
    assert code == 0, err
    rows = results.read_rows([tmp_path], "metrics")
    tasks = {r["task"] for r in rows}
    assert tasks == {"bench/moe_layer", "bench/train", "bench/eval"}
    evals = {r["split"] for r in rows if r["task"] == "bench/eval"}
    assert evals == {f"{v}/batch{b}" for v in ("dense", "moe", "roe") for b in (1, 2)}
    assert all(r["value"] > 0 for r in rows)
    assert (tmp_path / "bench-gpu-cpu-tiny" / "bench-gpu.md").read_text().startswith("# moebench bench gpu")
    code, _, err = run_cli(["bench", "gpu", "--device", "cpu"], capsys)
    assert code == 2 and "--tiny" in err


def test_bench_roe_profile_path_must_be_a_directory(capsys, tmp_path):
    afile = tmp_path / "tables.txt"
    afile.write_text("")
    code, _, err = run_cli(["bench", "roe", "--profile", afile, "--runs", tmp_path], capsys)
    _one_line_error(code, err, "--profile", "give a directory")
