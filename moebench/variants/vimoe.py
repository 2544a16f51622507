"""ViMoE (`variant: vimoe`, section `vimoe:`, vision recipes; arXiv 2410.15732): at the stage with
`upcycle: true` the ViT blocks named in `vimoe:` get MoE MLPs, experts copied from the block's MLP, with
an optional shared expert (moebench/vision/vit.py); routing per token or per image (`vit.routing_unit`).
The loss gains aux_loss_coef * balance; model.json stores the section; evaluation counts each block's
expert load."""

from __future__ import annotations

from moebench.config import moe_layer_indices, to_dict
from moebench.errors import UserError
from moebench.variants.base import Counter, Variant
from moebench.variants.moe import LoadCounter, check_section


class ViMoE(Variant):
    name = "vimoe"
    kinds = ("vision",)
    section = "vimoe"
    stage_flag = "upcycle"
    stores = "vimoe"
    structure = "a vision MoE"
    param_names = ("router",)

    def validate(self, recipe) -> None:
        self.one_transform_stage(recipe)
        m = recipe.vimoe
        if m is None:
            return
        check_section(m, "vimoe")
        if recipe.vit.arch is None and isinstance(m.layers, list):
            bad = [i for i in m.layers if not 0 <= i < recipe.vit.layers]
            if bad:
                raise UserError(f"vimoe.layers: block {bad[0]} is out of range for a ViT with {recipe.vit.layers} "
                                f"blocks (use 0..{recipe.vit.layers - 1})")
            moe_layer_indices(m.layers, recipe.vit.layers)

    def stage_key_part(self, recipe, i: int) -> dict:
        return {"vimoe": to_dict(recipe.vimoe)} if self.applied(recipe, i) else {}

    def transform(self, model, recipe, i: int) -> str | None:
        if i != self.stage_index(recipe):
            return None
        from moebench.vision.vit import add_vision_moe

        layers = add_vision_moe(model.vit, recipe.vimoe, recipe.vit.routing_unit)
        m = recipe.vimoe
        shared = "" if m.shared_expert == "none" else f", a {m.shared_expert} shared expert"
        return f"upcycled the MLPs of ViT blocks {layers} into {m.num_experts} experts (top-{m.top_k}{shared})"

    def param_parts(self, model) -> dict[str, list]:
        from moebench.vision.vit import vision_moe_blocks

        return {"router": [p for _, b in vision_moe_blocks(model.vit) for p in b.router.parameters()]}

    def loss_fn(self, loss_fn, recipe, i: int):
        """+ aux_loss_coef * the sum of the blocks' balance losses (+ z-loss), once the blocks exist;
        the logs carry each block's expert load."""
        from moebench.vision.vit import vision_moe_blocks

        cfg = recipe.vimoe

        def vimoe_loss_fn(model, batch):
            loss, logs = loss_fn(model, batch)
            blocks = [(j, b) for j, b in vision_moe_blocks(model.vit) if b.last is not None]
            if not blocks or cfg is None:
                return loss, logs
            aux = sum(cfg.aux_loss_coef * b.last.aux_loss + cfg.z_loss_coef * b.last.z_loss for _, b in blocks)
            logs["aux_loss"] = aux.detach()
            for j, b in blocks:
                logs[f"load/{j}"] = b.statistics()["load"]
            return loss + aux, logs

        return vimoe_loss_fn

    def checkpoint_config(self, recipe, i: int) -> dict:
        return {"vimoe": {**to_dict(recipe.vimoe), "routing_unit": recipe.vit.routing_unit}} \
            if self.applied(recipe, i) else {}

    def rebuild(self, model, meta: dict) -> None:
        if meta.get("vimoe"):
            from moebench.config import MoEConfig, from_dict
            from moebench.vision.vit import add_vision_moe

            cfg = dict(meta["vimoe"])
            unit = cfg.pop("routing_unit", "token")
            add_vision_moe(model.vit, from_dict(MoEConfig, cfg, "vimoe"), unit)

    def counter(self, model) -> Counter:
        from moebench.moe.upcycle import LoadCounter as Counts
        from moebench.vision.vit import vision_moe_blocks

        return LoadCounter(Counts(blocks=vision_moe_blocks(model.vit)))


VIMOE = ViMoE()
