"""MoE-LLaVA (`variant: moe`, section `moe:`): at the stage with `upcycle: true` the FFNs named in
`moe:` become experts (moebench/moe/upcycle.py); the loss gains aux_loss_coef * balance (+ z-loss);
model.json stores the section; evaluation counts each layer's expert load."""

from __future__ import annotations

import json

import typer

from moebench.config import moe_layer_indices, to_dict
from moebench.errors import UserError
from moebench.variants.base import Counter, HookCounter, Variant


class LoadCounter(HookCounter):
    """Per MoE layer, the token-expert pairs processed (moebench.moe.upcycle.LoadCounter), over ranks."""

    @property
    def load(self):
        return self.inner

    def state(self):
        return {i: c.tolist() for i, c in self.load.counts.items()}

    def merge(self, states: list) -> None:
        import torch

        for i in self.load.counts:
            self.load.counts[i] = torch.tensor([sum(c) for c in zip(*(s[i] for s in states))], dtype=torch.float64)

    def extra(self) -> dict:
        return {"expert_load": self.load.load()} if self.load.blocks else {}


class MoE(Variant):
    name = "moe"
    section = "moe"
    stage_flag = "upcycle"
    stores = "moe"
    structure = "an MoE"
    param_names = ("router",)  # the MoE routers only (ffn holds them too)

    def validate(self, recipe) -> None:
        self.one_transform_stage(recipe)
        m = recipe.moe
        if m is None:
            return
        check_section(m, "moe")
        if m.expert_size or m.shared_expert_size:
            raise UserError("moe.expert_size / moe.shared_expert_size describe a converted checkpoint's experts; "
                            "a recipe upcycles copies of its FFNs, so leave them unset")
        if isinstance(m.layers, list):
            if not m.layers:
                raise UserError("moe.layers is an empty list; name at least one decoder layer")
            if recipe.model.llm.pretrained is None:
                moe_layer_indices(m.layers, recipe.model.llm.layers)

    def stage_key_part(self, recipe, i: int) -> dict:
        # stages before the upcycling one are shared with the dense recipe
        return {"moe": _section(recipe.moe)} if self.applied(recipe, i) else {}

    def transform(self, model, recipe, i: int) -> str | None:
        if i != self.stage_index(recipe):
            return None
        from moebench.moe.upcycle import upcycle

        layers = upcycle(model.llm, recipe.moe)
        return f"upcycled FFNs of layers {layers} into {recipe.moe.num_experts} experts (top-{recipe.moe.top_k})"

    def param_parts(self, model) -> dict[str, list]:
        from moebench.moe.upcycle import moe_blocks

        return {"router": [p for _, b in moe_blocks(model) for p in b.router.parameters()]}

    def loss_fn(self, loss_fn, recipe, i: int):
        """+ aux_loss_coef * sum of balance losses (+ z-loss) when the LLM has MoE layers; the logs carry
        per-layer expert load, router entropy and dropped fraction for the training table."""
        from moebench.moe.upcycle import moe_blocks, moe_losses

        cfg = recipe.moe

        def moe_loss_fn(model, batch):
            loss, logs = loss_fn(model, batch)
            balance, z = moe_losses(model)
            if balance is None or cfg is None:
                return loss, logs
            aux = cfg.aux_loss_coef * balance + cfg.z_loss_coef * z
            logs["aux_loss"] = aux.detach()
            for j, block in moe_blocks(model):
                for k, v in block.statistics().items():
                    logs[f"{k}/{j}"] = v
            return loss + aux, logs

        return moe_loss_fn

    def checkpoint_config(self, recipe, i: int) -> dict:
        return {"moe": to_dict(recipe.moe)} if self.applied(recipe, i) else {}

    def rebuild(self, model, meta: dict) -> None:
        if meta.get("moe"):
            from moebench.config import MoEConfig, from_dict
            from moebench.moe.upcycle import upcycle

            upcycle(model.llm, from_dict(MoEConfig, meta["moe"], "moe"), empty=True)

    def counter(self, model) -> Counter:
        from moebench.moe.upcycle import LoadCounter as Counts

        return LoadCounter(Counts(model))

    def plan(self, model, recipe) -> dict:
        if self.stage_index(recipe) is None:
            return {"moe_layers": [], "experts": None, "top_k": None}
        from moebench.moe.upcycle import upcycle

        m = recipe.moe
        layers = upcycle(model.llm, m, empty=True)
        return {"note": f"{len(layers)} MoE layers x {m.num_experts} experts, top-{m.top_k}",
                "moe_layers": layers, "experts": m.num_experts, "top_k": m.top_k}


def check_section(m, key: str) -> None:
    """The checks an MoE section (`moe:` or `vimoe:`, named `key` in the messages) needs whatever it upcycles."""
    if m.num_experts < 1:
        raise UserError(f"{key}.num_experts={m.num_experts} must be >= 1")
    if not 1 <= m.top_k <= m.num_experts:
        raise UserError(f"{key}.top_k={m.top_k} must be between 1 and {key}.num_experts={m.num_experts}")
    for name in ("capacity_factor", "eval_capacity_factor"):
        cf = getattr(m, name)
        if cf is not None and cf <= 0:
            raise UserError(f"{key}.{name}={cf} must be > 0 (or null for dropless routing)")
    if m.aux_loss_coef < 0 or m.z_loss_coef < 0:
        raise UserError(f"{key}.aux_loss_coef and {key}.z_loss_coef must be >= 0")
    if m.min_capacity < 0:
        raise UserError(f"{key}.min_capacity={m.min_capacity} must be >= 0")


def _section(m) -> dict:
    """The `moe:` section as a stage key sees it: fields added later leave earlier keys (and cached
    stages) as they were while unset."""
    d = to_dict(m)
    for k, default in (("expert_size", None), ("shared_expert_size", None), ("min_capacity", 0),
                       ("renormalize_kept", False), ("top_k_normalized", True)):
        if d.get(k) == default:
            d.pop(k, None)
    return d


MOE = MoE()


def upcycle_index(recipe) -> int | None:
    """The index of the stage that upcycles the model, or None for a dense recipe."""
    return MOE.stage_index(recipe)


# ------------------------------------------------------------ `moebench bench moe-layer`
def bench_moe_layer(
    experts: int = typer.Option(4, help="Routed experts E."),
    top_k: int = typer.Option(2, "--top-k", help="Experts per token k."),
    hidden: int = typer.Option(512, help="Model width d."),
    ffn: int = typer.Option(1408, help="SwiGLU width f of one expert."),
    tokens: int = typer.Option(4096, help="Tokens per forward."),
    repeats: int = typer.Option(5, help="Timed rounds (median reported)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Forward+backward of one MoE layer vs the equal-FLOPs dense FFN, the naive expert loop and transformers' kernels."""
    from moebench.cli import out

    import torch

    from moebench.moe.bench import bench_moe_layer as run_bench

    if top_k > experts:
        raise UserError(f"--top-k {top_k} is larger than --experts {experts}; choose top_k <= experts")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype {dtype!r}: choose fp32 or bf16")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu")
    r = run_bench(experts=experts, top_k=top_k, hidden=hidden, ffn=ffn, tokens=tokens, repeats=repeats,
                  device=device, dtype=dtype)
    if as_json:
        print(json.dumps(r, indent=1))
        return
    from rich.table import Table

    c = r["config"]
    t = Table(title=f"MoE layer fwd+bwd: E={c['experts']} k={c['top_k']} d={c['hidden']} f={c['ffn']} "
                    f"{c['tokens']} tokens, {c['dtype']} {c['device']} ({c['threads']} threads)")
    for col in ("contender", "ms (median)", "x dense", "x loop (paired)", "rounds faster than loop"):
        t.add_column(col, justify="left" if col == "contender" else "right")
    for name, sec in r["seconds"].items():
        vs = r["ratio_to_loop_paired"]
        t.add_row(name + (" = moebench default" if name == r["default"] else ""), f"{1000 * sec:.1f}",
                  f"{r['ratio_to_dense'][name]:.2f}",
                  f"{vs[name]:.3f}" if name in vs else "1", f"{r['rounds_faster_than_loop'][name]:.0%}" if name in vs else "")
    out.print(t)
    out.print("x loop (paired): the median over rounds of each contender's time over the naive loop's in the same round")


MOE.commands = {'moe-layer': bench_moe_layer}
