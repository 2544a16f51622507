"""STGC (`variant: stgc`, sections `moe:` and `stgc:`, arXiv 2406.19905): an MoE model (chain
[moe, stgc]) whose stages from the upcycling one on add the conflict elimination loss computed from
each token's gradient after every backward (moebench/moe/stgc.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moebench.config import moe_layer_indices, to_dict
from moebench.errors import UserError
from moebench.variants.base import StageHooks, Variant
from moebench.variants.moe import MOE


class STGC(Variant):
    name = "stgc"
    builds_on = ("moe",)
    section = "stgc"

    def validate(self, recipe) -> None:
        g = recipe.stgc
        if recipe.variant == "stgc" and g is None:
            raise UserError("variant=stgc needs an `stgc:` section")
        if g is None:
            return
        if recipe.moe is None or MOE.stage_index(recipe) is None:
            raise UserError("stgc: works on MoE layers; add a `moe:` section and a stage with `upcycle: true`")
        if g.coef < 0:
            raise UserError(f"stgc.coef={g.coef} must be >= 0")
        if not -1.0 <= g.threshold <= 1.0:
            raise UserError(f"stgc.threshold={g.threshold} is a cosine similarity; choose a value in [-1, 1]")
        if g.layers is not None and recipe.model.llm.pretrained is None:
            moe = moe_layer_indices(recipe.moe.layers, recipe.model.llm.layers)
            bad = [i for i in g.layers if i not in moe]
            if bad:
                raise UserError(f"stgc.layers has {bad[0]}, which is not an MoE layer; MoE layers are {moe}")

    def applied(self, recipe, i: int) -> bool:
        return recipe.stgc is not None and MOE.applied(recipe, i)

    def stage_key_part(self, recipe, i: int) -> dict:
        return {"stgc": to_dict(recipe.stgc)} if self.applied(recipe, i) else {}

    def check_launch(self, recipe, world_size: int) -> None:
        if world_size > 1 and recipe.stgc is not None:
            raise UserError("variant stgc trains in one process: its conflict test compares each token's gradient "
                            "with the mean of its expert's tokens in the batch; run it without torchrun / --nproc")

    def stage_hooks(self, net, recipe, i: int, kind: str, parts: dict[str, list]) -> StageHooks | None:
        if not self.applied(recipe, i):
            return None
        from moebench.moe.stgc import STGC as Conflicts
        from moebench.moe.upcycle import moe_blocks

        stgc = Conflicts(recipe.stgc, moe_blocks(net))
        return StageHooks(after_backward=stgc.after_backward, close=stgc.close)


STGC_VARIANT = STGC()


# ------------------------------------------------------------ `moebench bench stgc`
def bench_stgc(
    recipe: Path = typer.Argument(Path("shapes_stgc"), help="An MoE or STGC recipe, file or bundled name (its stage-III data and settings)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A trained run or stage model dir; default: the recipe's model upcycled at init."),
    steps: int = typer.Option(8, min=1, help="Batches (each timed once per mode)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Conversations per batch."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """STGC step time vs plain MoE (output and exact modes), and the Pearson correlation of their cosines."""
    from moebench.cli import out

    from moebench.config import load_recipe
    from moebench.moe.bench import bench_stgc as run_bench

    model_dir = (model / "model" if (model / "model").is_dir() else model) if model else None
    r = run_bench(load_recipe(recipe), model_dir=model_dir, steps=steps, batch_size=batch_size)
    if as_json:
        print(json.dumps(r, indent=1))
        return
    from rich.table import Table

    t = Table(title=f"STGC on {r['recipe']}: {r['steps']} batches of {r['batch_size']}, {r['model']}")
    for col in ("mode", "s / step (median)", "x plain MoE"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for name, sec in r["seconds_per_step"].items():
        t.add_row(name, f"{sec:.3f}", f"{r['ratio_to_moe'][name]:.2f}")
    out.print(t)
    out.print(f"Pearson r between output- and exact-mode gradient cosines over {r['pairs']} routed pairs: "
              f"{r['pearson_output_vs_exact']:.3f}; conflict flags agree on {100 * r['flag_agreement']:.1f}% "
              f"(conflict rate output {r['conflict_rate']['output']:.3f}, exact {r['conflict_rate']['exact']:.3f})")


STGC_VARIANT.commands = {'stgc': bench_stgc}
