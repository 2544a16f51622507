"""Upcycling (MoE-LLaVA stage III): chosen decoder FFNs become MoE blocks of E exact copies.

Works on the LLM families moebench builds: SwiGLU MLPs with gate_proj / up_proj / down_proj (Qwen2,
Llama, StableLM) and Phi's GELU MLP with biased fc1 / fc2. With every expert a copy of the dense FFN
and the top-k weights renormalised to 1, the upcycled model computes the dense model's function.

A shared expert is also a copy of the dense FFN, with its output projection zeroed so that the
function is still the dense one at upcycling; it learns its contribution during stage III.
"""

from __future__ import annotations

import torch
from torch import nn

from moebench.config import MoEConfig, moe_layer_indices
from moebench.errors import UserError
from moebench.moe.layer import ExpertsConfig, GatedExperts, MoEBlock, PlainExperts, balance_loss, default_implementation


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    return llm.model.layers


PLAIN_FFNS = (("fc1", "fc2"), ("c_fc", "c_proj"))  # (up, down) names of biased two-linear FFNs


def _plain_ffn(mlp: nn.Module) -> tuple[str, str] | None:
    return next((names for names in PLAIN_FFNS if hasattr(mlp, names[0])), None)


def experts_from(mlp: nn.Module, num_experts: int, act: str, impl: str, empty: bool = False,
                 width: int | None = None) -> nn.Module:
    """Stacked experts, each a copy of `mlp` (or uninitialised shapes only, when `empty`, `width` wide
    when given: a converted checkpoint's experts)."""
    cfg = ExpertsConfig(impl)
    native = getattr(mlp, "experts", None)
    if empty and native is not None and hasattr(native, "gate_up_proj"):  # a checkpoint's own sparse block
        d = native.gate_up_proj.shape[-1]
        return GatedExperts(cfg, num_experts, d, width or native.gate_up_proj.shape[1] // 2, act).to(
            device=native.gate_up_proj.device, dtype=native.gate_up_proj.dtype)
    if hasattr(mlp, "gate_proj"):  # SwiGLU
        f, d = mlp.gate_proj.weight.shape
        f = width or f
        ex = GatedExperts(cfg, num_experts, d, f, act)
        if not empty:
            with torch.no_grad():
                w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)  # (2f, d)
                ex.gate_up_proj.copy_(w.expand(num_experts, -1, -1))
                ex.down_proj.copy_(mlp.down_proj.weight.expand(num_experts, -1, -1))
    elif (names := _plain_ffn(mlp)) is not None:  # Phi fc1/fc2, open_clip ViT c_fc/c_proj
        up, down = (getattr(mlp, n) for n in names)
        f, d = up.weight.shape
        ex = PlainExperts(cfg, num_experts, d, f, act)
        if not empty:
            with torch.no_grad():
                ex.up_proj.copy_(up.weight.expand(num_experts, -1, -1))
                ex.up_proj_bias.copy_(up.bias.expand(num_experts, -1))
                ex.down_proj.copy_(down.weight.expand(num_experts, -1, -1))
                ex.down_proj_bias.copy_(down.bias.expand(num_experts, -1))
    else:
        raise UserError(f"cannot upcycle {type(mlp).__name__}: moebench knows SwiGLU (gate_proj/up_proj/down_proj), "
                        "Phi (fc1/fc2) and open_clip ViT (c_fc/c_proj) FFNs")
    return ex.to(device=_device(mlp), dtype=_dtype(mlp))


def _device(m: nn.Module):
    return next(m.parameters()).device


def _dtype(m: nn.Module):
    return next(m.parameters()).dtype


def shared_from(mlp: nn.Module, width: int | None = None) -> nn.Module:
    """A copy of `mlp` whose output projection starts at zero (the upcycled model equals its parent);
    `width`: a SwiGLU of that width instead (the shape of a converted checkpoint's shared expert)."""
    import copy

    shared = copy.deepcopy(mlp)
    if width and hasattr(shared, "gate_proj"):
        d = shared.gate_proj.weight.shape[1]
        kw = dict(bias=False, device=shared.gate_proj.weight.device, dtype=shared.gate_proj.weight.dtype)
        shared.gate_proj, shared.up_proj = nn.Linear(d, width, **kw), nn.Linear(d, width, **kw)
        shared.down_proj = nn.Linear(width, d, **kw)
    out = shared.down_proj if hasattr(shared, "down_proj") else getattr(shared, _plain_ffn(shared)[1])
    with torch.no_grad():
        out.weight.zero_()
        if out.bias is not None:
            out.bias.zero_()
    return shared


def upcycle(llm: nn.Module, cfg: MoEConfig, *, implementation: str | None = None, empty: bool = False) -> list[int]:
    """Replace the chosen FFNs of `llm` by MoE blocks in place; return the MoE layer indices.

    `empty` builds the structure only (for loading a saved MoE checkpoint or planning on meta).
    The router starts at zero in neither case: it is initialised like a Linear layer (random), as
    in MoE-LLaVA, so the copies start receiving different tokens and gradients.
    """
    layers = decoder_layers(llm)
    if cfg.top_k > cfg.num_experts:
        raise UserError(f"moe.top_k={cfg.top_k} is larger than moe.num_experts={cfg.num_experts}; "
                        "choose top_k <= num_experts")
    indices = moe_layer_indices(cfg.layers, len(layers))
    impl = implementation or cfg.implementation or default_implementation()
    act = llm.config.hidden_act
    hidden = llm.config.hidden_size
    for i in indices:
        mlp = layers[i].mlp
        if isinstance(mlp, MoEBlock):
            raise UserError(f"layer {i} is already an MoE layer; upcycle a dense model")
        if not empty and (cfg.expert_size or cfg.shared_expert_size):
            raise UserError("moe.expert_size / moe.shared_expert_size describe a converted checkpoint's experts; "
                            "upcycling copies the FFN, so leave them unset")
        experts = experts_from(mlp, cfg.num_experts, act, impl, empty=empty, width=cfg.expert_size)
        shared = None if cfg.shared_expert == "none" else shared_from(mlp, width=cfg.shared_expert_size)
        block = MoEBlock(experts, hidden, cfg.top_k, capacity_factor=cfg.capacity_factor,
                         eval_capacity_factor=cfg.eval_capacity_factor, shared=shared,
                         shared_gate=cfg.shared_expert == "gated", min_capacity=cfg.min_capacity,
                         renormalize_kept=cfg.renormalize_kept, top_k_normalized=cfg.top_k_normalized
                         ).to(_device(mlp))
        if block.shared_gate is not None:
            block.shared_gate.to(_dtype(mlp))
        layers[i].mlp = block
    return indices


def moe_blocks(model: nn.Module) -> list[tuple[int, MoEBlock]]:
    """(decoder layer index, block) for every MoE block of a VLM or an LLM."""
    llm = getattr(model, "llm", model)
    return [(i, layer.mlp) for i, layer in enumerate(decoder_layers(llm)) if isinstance(layer.mlp, MoEBlock)]


def moe_losses(model: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(sum of balance losses, sum of z losses) over MoE layers from the latest forward; None if dense.

    Under data parallelism f_i, P_i and the z-loss are means over the tokens of the whole global batch
    (moebench.distributed.global_mean), so the loss is the one a single process would compute.
    """
    from moebench.distributed import global_mean

    routings = [b.last for _, b in moe_blocks(model) if b.last is not None]
    if not routings:
        return None, None
    balance, z = [], []
    for r in routings:
        e = r.f.shape[0]
        means = global_mean(torch.cat([r.f, r.p_mean, r.z_loss.reshape(1)]), r.n_valid)  # one all-reduce
        balance.append(balance_loss(means[:e], means[e: 2 * e]))
        z.append(means[2 * e])
    return sum(balance), sum(z)


class LoadCounter:
    """Counts, per MoE layer, the token-expert pairs processed while active (padding excluded)."""

    def __init__(self, model: nn.Module | None = None, blocks: list[tuple[int, MoEBlock]] | None = None):
        self.blocks = blocks if blocks is not None else moe_blocks(model)
        self.counts = {i: torch.zeros(b.num_experts, dtype=torch.float64) for i, b in self.blocks}
        self.handles = []

    def _hook(self, i: int):
        def hook(block: MoEBlock, args, output):
            r = block.last
            pairs = nn.functional.one_hot(r.index, block.num_experts).mul(r.kept[..., None]).sum((0, 1))
            self.counts[i] += pairs.detach().cpu().double()

        return hook

    def __enter__(self):
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in self.blocks]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def load(self) -> dict[str, list[float]]:
        """{layer: share of pairs per expert}; empty for a dense model."""
        return {str(i): (c / c.sum().clamp(min=1)).tolist() for i, c in self.counts.items()}
