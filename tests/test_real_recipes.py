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


ALL_REAL = [*LLM_RECIPES, "vimoe_ade20k"]


@pytest.mark.parametrize("name", ALL_REAL)
def test_dry_run_plans_a_full_size_recipe_on_the_meta_device(world, name, tmp_path, capsys):
    """`--dry-run` at full size (the recipes' architecture presets; their checkpoints are not here) over
    a data root in the real layouts: every check passes, nothing is written, the last stage's parameter
    counts equal `moebench plan`'s."""
    import json
    import time

    from conftest import run_cli
    from moebench.config import load_recipe
    from moebench.dryrun import dry_run

    _, data, _ = world
    path = REPO / "recipes" / f"{name}.yaml"
    extra = ["vit.pretrained=null"] if name == "vimoe_ade20k" else []
    t0 = time.perf_counter()
    code, out, err = run_cli(["train", path, f"data.source={data}", *extra, "--dry-run", "--gpus", "4",
                              "--runs", tmp_path / "runs"], capsys)
    assert code == 0, err
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "runs").exists()
    assert "4 GPUs" in out and "8 GPUs" in out
    r = dry_run(load_recipe(path, [f"data.source={data}", *extra]), gpus=4)
    last = r["stages"][-1]
    assert last["total"] > (1e8 if name == "vimoe_ade20k" else 1e9)  # full size, not a stand-in
    if name != "vimoe_ade20k":
        code, out, _ = run_cli(["plan", path, f"data.source={data}", "--json"], capsys)
        plan = json.loads(out)
        assert (last["total"], last["activated"]) == (plan["total"], plan["activated"])
        m = last["memory"]
        assert m[1]["total_ckpt"] < m[1]["total"]  # checkpointing keeps fewer activations
        if load_recipe(path).distributed == "fsdp":
            assert m[8]["weights"] == pytest.approx(m[1]["weights"] / 8)


def test_dry_run_stops_at_the_first_problem_with_one_line(world, tmp_path, capsys):
    import json

    from conftest import run_cli

    _, data, _ = world
    path = REPO / "recipes" / "moe_llava_2b.yaml"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "a", "image": "x.jpg", "conversations": [{"from": "human", "value": "hi"},
                                                                               {"from": "gpt", "value": "yo"}]},
                               {"id": "b", "image": "y.jpg", "conversations": [{"value": "no speaker"}]}]))
    cases = [
        ([f"data.source={tmp_path / 'empty'}"], "data root"),
        ([f"data.source={data}", "stages.moe.data=llava/nope.json"], "llava/nope.json"),
        ([f"data.source={data}", f"stages.finetune.data={bad}"], "conversation 1 (b) has a turn without `from`"),
        ([f"data.source={data}", "eval.tasks=[pope,nope]"], "unknown task 'nope'"),
        ([f"data.source={data}", "stages.pretrain.images=llava/elsewhere"], "image of llava/blip_laion_cc_sbu_558k.json record 0"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(["train", path, *args, "--dry-run"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
