"""Recipe loading, overrides and validation; every shipped recipe and task validates."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO, run_cli
from moebench.config import apply_override, load_recipe, stage_key
from moebench.errors import UserError

RECIPE = REPO / "recipes" / "shapes_dense.yaml"


def test_overrides_by_stage_name_and_index():
    r = load_recipe(RECIPE, ["stages.finetune.lr=1e-4", "stages.0.batch_size=7", "seed=3", "eval.tasks=[gqa]"])
    assert r.stage("finetune").lr == 1e-4
    assert r.stages[0].batch_size == 7
    assert r.seed == 3 and r.eval.tasks == ["gqa"]


@pytest.mark.parametrize("override, message", [
    ("model.llm.hiden_size=64", "unknown recipe key 'model.llm.hiden_size' (did you mean 'hidden_size'?)"),
    ("stages.finetune.lr=fast", "stages.finetune.lr='fast' must be a float"),
    ("model.llm.layers=2.5", "model.llm.layers=2.5 must be an int"),
    ("model.projector=mlp3x", "model.projector='mlp3x' is not allowed; choose one of ['mlp2x_gelu', 'linear']"),
    ("stages.finetune.train=[projector,lm]", "allowed modules"),
    ("stages.nosuch.lr=1", "no item 'nosuch' in stages"),
    ("model.llm.heads=3", "must be divisible by heads=3"),
    ("stages.finetune.grounding=annotations/instances_train2014.json", "grounding is for kind: clip stages only"),
    ("stages.clip.grounding_weight=0", "grounding_weight=0.0 must be > 0"),
])
def test_errors_name_key_value_and_allowed(override, message):
    with pytest.raises(UserError) as e:
        load_recipe(RECIPE, [override])
    assert message in str(e.value)


def test_override_must_be_key_value():
    with pytest.raises(UserError, match="key=value"):
        apply_override({}, "seed")


def test_grounding_weight_enters_the_stage_key_only_when_set(tmp_path):
    shipped = load_recipe(RECIPE, [])  # grounded at weight 5
    raw = yaml.safe_load(RECIPE.read_text())
    for key in ("grounding", "grounding_weight"):
        del raw["stages"][0][key]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(raw))
    plain = load_recipe(tmp_path / "plain.yaml", [])  # a recipe written before grounding existed
    default_weight = load_recipe(RECIPE, ["stages.clip.grounding=", "stages.clip.grounding_weight=1.0"])
    grounded = load_recipe(RECIPE, ["stages.clip.grounding_weight=1.0"])
    assert shipped.stages[0].grounding and shipped.stages[0].grounding_weight == 5.0
    assert stage_key(plain, 0, "h") == stage_key(default_weight, 0, "h")  # earlier checkpoints keep their keys
    assert len({stage_key(r, 0, "h") for r in (shipped, grounded, plain)}) == 3


def test_stage_keys_shared_prefix():
    a = load_recipe(RECIPE)
    b = load_recipe(RECIPE, ["stages.finetune.lr=1e-4", "eval.batch_size=1", "stages.finetune.save_every=7"])
    assert stage_key(a, 0, "h") == stage_key(b, 0, "h") and stage_key(a, 1, "h") == stage_key(b, 1, "h")
    assert stage_key(a, 2, "h") != stage_key(b, 2, "h")
    c = load_recipe(RECIPE, ["stages.finetune.save_every=7", "stages.finetune.log_every=3"])
    assert stage_key(a, 2, "h") == stage_key(c, 2, "h")  # logging cadence does not change the model
    assert stage_key(a, 0, "h") != stage_key(a, 0, "other-data")


def test_validate_every_shipped_recipe_and_task(capsys):
    files = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "tasks").glob("*.yaml"))
    assert len(files) >= 4
    code, out, err = run_cli(["validate", *files], capsys)
    assert code == 0, err
    assert out.count("ok") == len(files)


def test_every_recipe_starts_with_its_command():
    for p in (REPO / "recipes").glob("*.yaml"):
        first = p.read_text().splitlines()[0]
        assert first.startswith(f"# moebench train recipes/{p.name}"), p


MOE = REPO / "recipes" / "shapes_moe.yaml"


def test_extends_shares_the_dense_stages():
    dense, moe = load_recipe(RECIPE), load_recipe(MOE)
    assert [s.name for s in moe.stages] == ["clip", "pretrain", "finetune", "moe"]
    assert moe.name == "shapes_moe" and moe.variant == "moe" and moe.stage("moe").upcycle
    for i in range(3):  # the MoE recipe reuses the dense recipe's cached stage checkpoints
        assert stage_key(dense, i, "h") == stage_key(moe, i, "h")
    other = load_recipe(MOE, ["moe.top_k=1"])
    assert stage_key(other, 2, "h") == stage_key(moe, 2, "h") and stage_key(other, 3, "h") != stage_key(moe, 3, "h")


@pytest.mark.parametrize("override, message", [
    ("moe.top_k=5", "moe.top_k=5 must be between 1 and moe.num_experts=4"),
    ("moe.layers=[0,9]", "moe.layers: index 9 is out of range for an LLM with 4 layers"),
    ("moe.capacity_factor=0", "moe.capacity_factor=0.0 must be > 0"),
    ("moe.layers=odd", "moe.layers='odd' is not allowed"),
    ("moe.shared_expert=always", "moe.shared_expert='always' is not allowed"),
])
def test_bad_moe_config(override, message):
    with pytest.raises(UserError) as e:
        load_recipe(MOE, [override])
    assert message in str(e.value)


def test_bad_moe_config_exits_2(capsys):
    code, _, err = run_cli(["train", MOE, "moe.top_k=8"], capsys)
    assert code == 2 and "moe.top_k=8" in err and "Traceback" not in err


@pytest.mark.parametrize("recipe, total, activated", [
    ("moe_llava_2b", 2.89e9, 2.06e9), ("moe_llava_qwen_2b", 3.05e9, 2.24e9), ("moe_llava_phi_3b", 5.30e9, 3.62e9),
])
def test_plan_matches_the_paper_counts(recipe, total, activated):
    """MoE-LLaVA's LLM-only counts (embeddings included), from architecture presets on the meta device."""
    from moebench.plan import plan

    p = plan(load_recipe(REPO / "recipes" / f"{recipe}.yaml"))
    assert p["llm"]["total"] == pytest.approx(total, rel=0.01)
    assert p["llm"]["activated"] == pytest.approx(activated, rel=0.01)
    assert len(p["llm"]["moe_layers"]) == p["llm"]["layers"] // 2


def test_plan_cli_on_the_embedded_recipe(capsys):
    import json

    code, out, err = run_cli(["plan", MOE, "--json"], capsys)
    assert code == 0, err
    p = json.loads(out)
    assert p["llm"]["moe_layers"] == [0, 2] and p["activated"] < p["total"]
    assert p["flops_per_token"]["total"] > 0


def test_stage_keys_follow_the_tokenizer_corpus():
    """A trained tokenizer learns from every stage's data, so a new data file changes stage 0's key."""
    dense = load_recipe(RECIPE)
    other = load_recipe(MOE, ["stages.moe.data=llava/other.json"])
    assert stage_key(dense, 0, "h") != stage_key(other, 0, "h")
    assert stage_key(dense, 0, "h") == stage_key(load_recipe(MOE), 0, "h")  # same files, same tokenizer


STGC_RECIPE = REPO / "recipes" / "shapes_stgc.yaml"


@pytest.mark.parametrize("recipe, override, message", [
    (RECIPE, "stgc.coef=1", "stgc: works on MoE layers; add a `moe:` section"),
    (STGC_RECIPE, "stgc.coef=-0.5", "stgc.coef=-0.5 must be >= 0"),
    (STGC_RECIPE, "stgc.threshold=1.5", "stgc.threshold=1.5 is a cosine similarity; choose a value in [-1, 1]"),
    (STGC_RECIPE, "stgc.gradient=full", "stgc.gradient='full' is not allowed"),
    (STGC_RECIPE, "stgc.layers=[1]", "stgc.layers has 1, which is not an MoE layer; MoE layers are [0, 2]"),
])
def test_bad_stgc_config(recipe, override, message, capsys):
    with pytest.raises(UserError) as e:
        load_recipe(recipe, [override])
    assert message in str(e.value)
    code, _, err = run_cli(["train", recipe, override], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_stgc_shares_stages_with_moe_up_to_stage_iii():
    moe, stgc = load_recipe(MOE), load_recipe(STGC_RECIPE)
    assert [s.name for s in stgc.stages] == [s.name for s in moe.stages]
    assert all(stage_key(moe, i, "h") == stage_key(stgc, i, "h") for i in range(3))
    assert stage_key(moe, 3, "h") != stage_key(stgc, 3, "h")


ROE_RECIPE = REPO / "recipes" / "shapes_roe.yaml"


@pytest.mark.parametrize("override, message", [
    ("roe.target_skip=1.0", "roe.target_skip=1.0 must be in [0, 1)"),
    ("roe.target_skip=-0.1", "roe.target_skip=-0.1 must be in [0, 1)"),
    ("roe.adapter_rank=0", "roe.adapter_rank=0 must be > 0"),
    ("roe.layers=[1,7]", "roe.layers: index 7 is out of range; routable layers are 1..3"),
    ("roe.layers=[0,1]", "roe.layers: index 0 is out of range"),
])
def test_bad_roe_config(override, message, capsys):
    with pytest.raises(UserError) as e:
        load_recipe(ROE_RECIPE, [override])
    assert message in str(e.value)
    code, _, err = run_cli(["train", ROE_RECIPE, override], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_roe_starts_from_the_dense_stage_ii_checkpoint():
    dense, roe = load_recipe(RECIPE), load_recipe(ROE_RECIPE)
    assert all(stage_key(dense, i, "h") == stage_key(roe, i, "h") for i in range(3))
