"""A variant defined and registered in this file alone trains and evaluates through the real pipeline.

`moe_top1`: MoE-LLaVA's upcycled model (it builds on `moe` and reads the `moe:` section) with every MoE
block forced to top-1 routing, plus a loss of its own (an L2 penalty on the router weights, logged as
`toy_loss`). It stores `moe_top1` in model.json so that loading the run rebuilds top-1 blocks, and adds
its name to the stage keys from the upcycling stage on (its stage III is not shapes_moe's).
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, TINY, run_cli

from moebench import results, variants

TOY_COEF = 1e-3


class MoETop1(variants.Variant):
    name = "moe_top1"
    builds_on = ("moe",)
    stores = "moe_top1"
    structure = "a top-1 MoE"

    def stage_key_part(self, recipe, i: int) -> dict:
        return {"moe_top1": True} if variants.get("moe").applied(recipe, i) else {}

    def transform(self, model, recipe, i: int):
        if i != variants.get("moe").stage_index(recipe):
            return None
        self._top1(model)
        return "moe_top1: every MoE block routes each token to one expert"

    def loss_fn(self, loss_fn, recipe, i: int):
        def toy_loss_fn(model, batch):
            loss, logs = loss_fn(model, batch)
            blocks = model.routed_blocks()  # one process: `model` is the VLM itself
            if not blocks:
                return loss, logs
            toy = TOY_COEF * sum(b.router.weight.pow(2).sum() for b in blocks)
            logs["toy_loss"] = toy.detach()
            return loss + toy, logs

        return toy_loss_fn

    def checkpoint_config(self, recipe, i: int) -> dict:
        return {"moe_top1": {"top_k": 1}} if variants.get("moe").applied(recipe, i) else {}

    def rebuild(self, model, meta: dict) -> None:
        if meta.get("moe_top1"):
            self._top1(model)

    @staticmethod
    def _top1(model) -> None:
        for block in model.routed_blocks():
            block.top_k = 1


@pytest.fixture
def toy():
    v = variants.register(MoETop1())
    yield v
    variants.VARIANTS.remove(v.name)


def test_a_variant_from_a_test_file_trains_and_evaluates(toy, capsys, tmp_path):
    runs, res = tmp_path / "runs", tmp_path / "results"
    tiny = [*TINY, "stages.moe.max_steps=3", "stages.moe.batch_size=8", "stages.moe.log_every=1"]
    code, _, err = run_cli(["train", REPO / "recipes" / "shapes_moe.yaml", "variant=moe_top1", "name=shapes_top1",
                            *tiny, "--runs", runs, "--results", res, "--no-progress"], capsys)
    assert code == 0, err
    assert "moe_top1: every MoE block routes each token to one expert" in err  # its transform ran
    steps = [r for r in results.read_rows([res], "train") if r["stage"] == "moe"]
    assert len(steps) == 3
    for r in steps:  # its loss and moe's both ran
        extra = json.loads(r["extra"])
        assert extra["toy_loss"] > 0 and r["aux_loss"] > 0
    rows = results.read_rows([res], "metrics")
    assert rows and all(r["variant"] == "moe_top1" for r in rows)
    load = json.loads(rows[0]["extra"])["expert_load"]  # moe's evaluation counter, through the chain
    assert len(load["0"]) == 4 and abs(sum(load["0"]) - 1) < 1e-9

    # model.json stores both entries; loading the run rebuilds the top-1 blocks
    run_dir = next(p for p in runs.iterdir() if p.name.startswith("shapes_top1"))
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    assert meta["moe"]["top_k"] == 2 and meta["moe_top1"] == {"top_k": 1}
    from moebench.runs import open_run

    model, _ = open_run(run_dir).load_model()
    blocks = model.routed_blocks()
    assert blocks and all(b.top_k == 1 for b in blocks)
    # activated parameters count one routed expert of four
    from moebench.models.params import count_params

    assert rows[0]["params_activated"] == count_params(model)["activated"] < rows[0]["params_total"]


def test_an_unknown_variant_names_the_registered_ones(toy, tiny_recipe):
    import dataclasses

    from moebench.config import validate
    from moebench.errors import UserError

    with pytest.raises(UserError, match=r"variant='moe_top2' is not allowed; .*'moe_top1'.*did you mean 'moe_top1'"):
        validate(dataclasses.replace(tiny_recipe, variant="moe_top2"))
