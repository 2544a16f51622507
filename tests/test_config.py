"""Recipe loading, overrides and validation; every shipped recipe and task validates."""

from __future__ import annotations

import pytest

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
])
def test_errors_name_key_value_and_allowed(override, message):
    with pytest.raises(UserError) as e:
        load_recipe(RECIPE, [override])
    assert message in str(e.value)


def test_override_must_be_key_value():
    with pytest.raises(UserError, match="key=value"):
        apply_override({}, "seed")


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
