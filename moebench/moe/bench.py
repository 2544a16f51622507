"""`moebench bench moe-layer`: forward + backward time of one MoE layer against its baselines.

All contenders run in one process on the same input, interleaved round by round, and are reported as
ratios to the dense FFN with the same activated FLOPs (a SwiGLU of width top_k x f): machines are
noisy, ratios taken side by side are not.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


class DenseSwiGLU(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


def _moe(d: int, f: int, e: int, k: int, impl: str) -> nn.Module:
    from moebench.moe.layer import ExpertsConfig, GatedExperts, MoEBlock

    experts = GatedExperts(ExpertsConfig(impl), e, d, f, "silu")
    for p in experts.parameters():
        nn.init.normal_(p, std=d ** -0.5)
    return MoEBlock(experts, d, k)


def bench_moe_layer(*, experts: int = 4, top_k: int = 2, hidden: int = 512, ffn: int = 1408, tokens: int = 4096,
                    repeats: int = 5, device: str = "cpu", dtype: str = "fp32", seed: int = 0) -> dict:
    """Median forward+backward seconds per contender, and each as a ratio to the equal-FLOPs dense FFN."""
    from moebench.moe.layer import default_implementation

    torch.manual_seed(seed)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    dev = torch.device(device)
    contenders = {"dense_ffn_equal_flops": DenseSwiGLU(hidden, top_k * ffn)}
    # transformers' "batched_mm" kernel is left out: it gathers one weight matrix per token-expert pair
    # (8192 x 2816 x 512 floats = 47 GB at the default sizes)
    names = {"grouped_mm": "moe_grouped_mm (transformers kernel)", "eager": "moe_naive_expert_loop (Mixtral eager)"}
    for impl, name in names.items():
        contenders[name] = _moe(hidden, ffn, experts, top_k, impl)
    for m in contenders.values():
        m.to(device=dev, dtype=dt)
    x = torch.randn(1, tokens, hidden, device=dev, dtype=dt)
    grad = torch.randn_like(x)

    def step(m):
        xi = x.detach().requires_grad_(True)
        m(xi).backward(grad)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {n: [] for n in contenders}
    for n, m in contenders.items():  # warm-up
        step(m)
    for _ in range(repeats):
        for n, m in contenders.items():
            t = time.perf_counter()
            step(m)
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["dense_ffn_equal_flops"]
    loop = names["eager"]
    # paired: each contender against the naive loop of the same round (drift between rounds cancels)
    paired = {n: [a / b for a, b in zip(v, times[loop])] for n, v in times.items() if n != loop}
    return {
        "config": {"experts": experts, "top_k": top_k, "hidden": hidden, "ffn": ffn, "tokens": tokens,
                   "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "repeats": repeats,
                   "torch": torch.__version__},
        "default": names[default_implementation(dev)],  # the contender moe.implementation unset picks here
        "seconds": med,
        "ratio_to_dense": {n: v / base for n, v in med.items()},
        "ratio_to_loop_paired": {n: statistics.median(r) for n, r in paired.items()},
        "rounds_faster_than_loop": {n: sum(x < 1 for x in r) / len(r) for n, r in paired.items()},
    }


def bench_stgc(recipe, *, model_dir=None, steps: int = 8, batch_size: int = 8, progress: bool = True) -> dict:
    """STGC's training-step cost against plain MoE, and how well `output` conflicts track `exact` ones.

    On the recipe's stage-III data: each batch runs a plain MoE step (loss + backward), an STGC step in
    `output` mode and one in `exact` mode, interleaved, without optimizer updates (the weights stay the
    same for all three). The Pearson correlation between the two modes' gradient cosines is taken over
    every routed pair of every MoE layer, on the same forward and backward.
    """
    import dataclasses

    from moebench.config import STGCConfig
    from moebench.data.conversations import ConversationDataset, Encoder, collate, read_conversations
    from moebench.data.sources import resolve
    from moebench.errors import UserError
    from moebench.models.build import build_vlm
    from moebench.models.checkpoint import load_vlm
    from moebench.moe.stgc import STGC, conflicts
    from moebench.moe.upcycle import moe_blocks, upcycle
    from moebench.train.pipeline import _param_groups, _trainable_parts, lm_loss_fn, make_tokenizer
    from moebench.variants.moe import MOE, upcycle_index

    up = upcycle_index(recipe)
    if up is None or recipe.moe is None:
        raise UserError(f"recipe {recipe.name} has no MoE stage; give an MoE or STGC recipe")
    stage = recipe.stages[up]
    src = resolve(recipe.data.source, recipe.data.world, progress=progress)
    if model_dir is not None:
        model, tokenizer, _ = load_vlm(model_dir)
    else:
        tokenizer = make_tokenizer(recipe, src)
        model = build_vlm(recipe.model, tokenizer)
    if not moe_blocks(model):
        upcycle(model.llm, recipe.moe)
    encoder = Encoder(tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system,
                      max_len=stage.max_len)
    items = read_conversations(src.root / stage.data, steps * batch_size)
    dataset = ConversationDataset(items, src.root / stage.images, encoder, stage.template, recipe.model.vision)
    batches = [collate([dataset[i] for i in range(b * batch_size, min(len(dataset), (b + 1) * batch_size))],
                       tokenizer.pad_token_id) for b in range(steps)]
    groups = _param_groups(model, stage, parts=_trainable_parts)
    params = [p for _, ps, _ in groups for p in ps]
    loss_fn = MOE.loss_fn(lm_loss_fn(), recipe, up)  # next-token loss + the MoE terms (no STGC hook)
    base_cfg = recipe.stgc or STGCConfig()
    modes = {"moe": None, "stgc_output": dataclasses.replace(base_cfg, gradient="output"),
             "stgc_exact": dataclasses.replace(base_cfg, gradient="exact")}
    model.train()

    def step(batch, cfg):
        for p in params:
            p.grad = None
        stgc = STGC(cfg, moe_blocks(model)) if cfg else None
        loss, _ = loss_fn(model, batch)
        loss.backward()
        if stgc:
            stgc.after_backward()
            stgc.close()

    step(batches[0], modes["stgc_exact"])  # warm-up
    times: dict[str, list[float]] = {m: [] for m in modes}
    out_cos, exact_cos = [], []
    for batch in batches:
        for name, cfg in modes.items():
            t = time.perf_counter()
            step(batch, cfg)
            times[name].append(time.perf_counter() - t)
        # both modes' cosines from one forward and backward
        stgc = STGC(modes["stgc_output"], moe_blocks(model))
        loss, _ = loss_fn(model, batch)
        loss.backward()
        for _, b in stgc.blocks:
            kept = b.last.kept
            out_cos.append(conflicts(b, "output", 0.0)[1][kept])
            exact_cos.append(conflicts(b, "exact", 0.0)[1][kept])
        stgc.close()
    o, e = torch.cat(out_cos), torch.cat(exact_cos)
    pearson = torch.corrcoef(torch.stack([o, e]))[0, 1].item()
    agree = ((o < base_cfg.threshold) == (e < base_cfg.threshold)).float().mean().item()
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "recipe": recipe.name, "model": str(model_dir) if model_dir else "untrained (upcycled at init)",
        "steps": steps, "batch_size": batch_size, "pairs": int(o.numel()), "threads": torch.get_num_threads(),
        "seconds_per_step": med, "ratio_to_moe": {n: v / med["moe"] for n, v in med.items()},
        "pearson_output_vs_exact": pearson, "flag_agreement": agree,
        "conflict_rate": {"output": (o < base_cfg.threshold).float().mean().item(),
                          "exact": (e < base_cfg.threshold).float().mean().item()},
    }
