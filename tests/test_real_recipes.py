"""Every shipped 2B-7B recipe, and the ViMoE ADE20K one, trains every stage for two steps and evaluates
on its tasks, run as the recipe says with only sizes and paths overridden: the `pretrained` checkpoints
become tiny stand-ins of the same families, `data.source` a data root in the real layouts
(tests/standins.py)."""

from __future__ import annotations

import pytest

from conftest import REPO
from standins import IMAGE_SIZE, PATCH, build_data_root, build_standins

LLM_RECIPES = ["llava_dense_2b", "moe_llava_2b", "moe_llava_qwen_2b", "moe_llava_phi_3b", "stgc_moe_llava_2b",
               "roe_llava_1_5_7b"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    return build_standins(base / "checkpoints"), build_data_root(base / "data"), base


def _overrides(recipe, standins, data) -> list[str]:
    """Sizes and paths only: the stand-in checkpoints and data root, the stand-in tower's image size,
    two steps of two samples per stage, a few evaluation samples."""
    out = [f"data.source={data}", f"model.vision.pretrained={standins['clip']}", f"model.vision.image_size={IMAGE_SIZE}",
           f"model.vision.patch_size={PATCH}", f"model.llm.pretrained={standins[recipe.model.llm.arch]}",
           "eval.limit=2", "eval.batch_size=2"]
    for s in recipe.stages:
        out += [f"stages.{s.name}.max_steps=2", f"stages.{s.name}.batch_size=2", f"stages.{s.name}.grad_accum=1"]
    if recipe.roe is not None:
        out.append("roe.adapter_rank=8")  # the recipe's 1024 is wider than the stand-in LLM
    return out


def _llm_family(name: str) -> str:
    from moebench.config import load_recipe

    return load_recipe(REPO / "recipes" / f"{name}.yaml").model.llm.family


@pytest.mark.parametrize("name", LLM_RECIPES)
def test_real_recipe_trains_every_stage_and_evaluates(world, name, tmp_path, capsys):
    from conftest import run_cli
    from moebench import results
    from moebench.config import load_recipe

    standins, data, _ = world
    path = REPO / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)
    code, _, err = run_cli(["train", path, *_overrides(recipe, standins, data), "--runs", tmp_path / "runs",
                            "--results", tmp_path / "res", "--no-progress"], capsys)
    assert code == 0, err
    trained = {r["stage"] for r in results.read_rows([tmp_path / "res"], "train")}
    assert trained == {s.name for s in recipe.stages}  # every stage ran its steps
    rows = results.read_rows([tmp_path / "res"], "metrics")
    assert {r["task"] for r in rows} == set(recipe.eval.tasks)
    assert all(r["variant"] == recipe.variant and r["recipe"] == name for r in rows)
    if recipe.variant in ("moe", "stgc"):
        assert all(r["params_activated"] < r["params_total"] for r in rows)


def test_vimoe_ade20k_recipe_trains_and_evaluates(world, tmp_path, capsys):
    from conftest import run_cli
    from moebench import results

    standins, data, _ = world
    overrides = [f"data.source={data}", f"vit.pretrained={standins['vit']}", "vit.arch=null", "vit.image_size=32",
                 "vit.patch_size=16", "vit.width=32", "vit.layers=4", "vit.heads=2", "vimoe.layers=[2,3]",
                 "stages.dense.max_steps=2", "stages.vimoe.max_steps=2", "stages.dense.batch_size=2",
                 "stages.vimoe.batch_size=2", "slide_stride=16", "eval.batch_size=2"]
    code, _, err = run_cli(["train", REPO / "recipes" / "vimoe_ade20k.yaml", *overrides, "--runs", tmp_path / "runs",
                            "--results", tmp_path / "res", "--no-progress"], capsys)
    assert code == 0, err
    rows = results.read_rows([tmp_path / "res"], "metrics")
    assert {r["metric"] for r in rows} == {"mIoU", "mAcc", "aAcc"} and all(r["task"] == "ade20k" for r in rows)
    assert rows[0]["params_activated"] < rows[0]["params_total"]
