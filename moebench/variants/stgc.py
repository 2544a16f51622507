"""STGC (`variant: stgc`, sections `moe:` and `stgc:`, arXiv 2406.19905): an MoE model (chain
[moe, stgc]) whose stages from the upcycling one on add the conflict elimination loss computed from
each token's gradient after every backward (moebench/moe/stgc.py)."""

from __future__ import annotations

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
