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
    impls = ["grouped_mm", "eager"] if default_implementation() == "grouped_mm" else ["eager"]
    names = {"grouped_mm": "moe_grouped_mm (moebench default, transformers kernel)",
             "eager": "moe_naive_expert_loop (Mixtral eager)"}
    for impl in impls:
        contenders[names[impl]] = _moe(hidden, ffn, experts, top_k, impl)
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
    return {
        "config": {"experts": experts, "top_k": top_k, "hidden": hidden, "ffn": ffn, "tokens": tokens,
                   "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "repeats": repeats,
                   "torch": torch.__version__},
        "seconds": med,
        "ratio_to_dense": {n: v / base for n, v in med.items()},
    }
