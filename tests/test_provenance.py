"""Provenance: every writer of metrics rows records the moebench, torch and transformers versions."""

from __future__ import annotations

import json

import pytest

from moebench import results


@pytest.fixture(scope="module")
def expected():
    import torch
    import transformers

    import moebench

    return {"moebench_version": moebench.__version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__}


def _versions(rows):
    return {(r["moebench_version"], r["torch_version"], r["transformers_version"]) for r in rows}


def _check(returned, results_dir, expected):
    want = {tuple(expected.values())}
    assert returned and _versions(returned) == want
    written = results.read_rows([results_dir], "metrics")  # what the files hold, not only the return value
    assert written and _versions(written) == want


def test_evaluate_run_rows(tiny_run, tmp_path, expected):
    from moebench.eval.runner import evaluate_run

    run, _ = tiny_run
    rows = evaluate_run(run, ["gqa"], data=None, batch_size=4, limit=4, results_dir=tmp_path, progress=False,
                        log_samples=False)
    _check(rows, tmp_path, expected)


def test_scored_predictions_rows(tiny_recipe, tmp_path, expected):
    """Another harness made the predictions; the rows record what is installed where they were scored."""
    from moebench.data.sources import resolve
    from moebench.eval.score import score_predictions

    root = resolve("shapes", tiny_recipe.data.world, progress=False).root
    qs = json.loads((root / "gqa" / "testdev_balanced_questions.json").read_text())
    path = tmp_path / "other.jsonl"
    path.write_text("".join(json.dumps({"question_id": q, "answer": "yes"}) + "\n" for q in sorted(qs)))
    rows = score_predictions("gqa", path, data_root=root, data_name="shapes", data_hash=None,
                             results_dir=tmp_path / "res")
    _check(rows, tmp_path / "res", expected)


def test_vimoe_rows_and_run_json(tmp_path, expected):
    import numpy as np
    from PIL import Image

    from conftest import REPO
    from moebench.config import load_recipe
    from moebench.eval.runner import evaluate_run
    from moebench.train.pipeline import train

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    recipe = load_recipe(REPO / "recipes" / "vimoe_shapes_dense.yaml", [
        f"data.source={tmp_path}", "tasks=[image_folder]", "vit.image_size=16", "vit.patch_size=8", "vit.width=16",
        "vit.heads=2", "vit.layers=2", "stages.pretrain.max_steps=1", "stages.finetune.max_steps=1",
        "stages.pretrain.batch_size=2", "stages.finetune.batch_size=2"])
    run = train(recipe, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res", progress=False)
    rows = evaluate_run(run, recipe.eval_tasks, data=None, batch_size=2, limit=None, results_dir=tmp_path / "res",
                        progress=False)
    _check(rows, tmp_path / "res", expected)
    (meta,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/run.json")]
    assert meta["moebench_version"] == expected["moebench_version"]
