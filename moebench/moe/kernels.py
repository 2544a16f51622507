"""moebench's expert dispatch, registered with transformers' ExpertsInterface as "segment_mm".

The token-expert pairs are sorted by expert once, so each expert's tokens form one contiguous
segment of the gathered input. On CUDA each projection is then one grouped matmul (transformers'
grouped_mm kernel). On CPU, where torch's grouped matmul is a loop of plain matmuls that
materialises every intermediate at full size, each expert's segment runs through a fused SwiGLU
instead, forward and backward written by hand:

    pre = x_s W_gu^T;  a = act(pre_gate);  h = a * pre_up;  y_s = h W_d^T
    backward: dW_d += dy^T h;  dh = dy W_d;  dpre = [dh * up * act'(gate), dh * a];
              dx_s = dpre W_gu;  dW_gu += dpre^T x_s

with the intermediates of at most `ROWS` tokens at a time (they stay in cache), the weight gradients
written in place (no zero-filled (E, ...) tensor per expert, no concatenation of the gate and up
gradients), and the gather and the weighted combine folded into the same autograd node. The loop is
over experts and row blocks, never over tokens. Matmul FLOPs are those of the naive loop; what is
saved is the memory traffic around them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    grouped_mm_experts_forward,
)

_SILU = (nn.SiLU, SiLUActivation)  # activations with aten out= and backward kernels
ROWS = 2048  # the largest row block of the CPU path; near the best matmul shape on 2 AVX2 cores


def _blocks(start: int, count: int):
    """Row blocks of one expert's segment, of equal size (no small remainder matmul)."""
    if count == 0:
        return
    n = math.ceil(count / ROWS)
    size = math.ceil(count / n)
    for a in range(start, start + count, size):
        yield a, min(a + size, start + count)


def _act(act: nn.Module, gate: torch.Tensor, out: torch.Tensor) -> None:
    """out = act(gate); SiLU straight into `out` (its out= kernel is the fast one on a strided gate)."""
    if isinstance(act, _SILU):
        torch.ops.aten.silu.out(gate, out=out)
    else:
        out.copy_(act(gate))


def _act_backward(act: nn.Module, gate: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> None:
    """out = grad * act'(gate); SiLU by its aten kernel, any other activation by autograd."""
    if isinstance(act, _SILU):
        torch.ops.aten.silu_backward(grad, gate, grad_input=out)
        return
    with torch.enable_grad():
        g = gate.detach().requires_grad_(True)
        (d,) = torch.autograd.grad(act(g), g, grad)
    out.copy_(d)


class _SegmentSwiGLU(torch.autograd.Function):
    """Gather by expert, fused SwiGLU per expert segment, weighted combine: one autograd node."""

    @staticmethod
    def forward(ctx, x, index, weight, gate_up, down, act):
        n, k = index.shape
        d, f = x.shape[1], down.shape[2]
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs sorted by expert, ties in token order
        tok = order // k  # the token of each sorted pair
        counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
        xs = x.index_select(0, tok)  # (M, d)
        m = xs.shape[0]
        pre = xs.new_empty(m, 2 * f)  # [gate | up] pre-activations, kept for backward
        act_gate = xs.new_empty(m, f)
        ys = xs.new_empty(m, d)
        h = xs.new_empty(min(ROWS, m), f)
        start = 0
        for e, c in enumerate(counts):
            for a, b in _blocks(start, c):
                p = torch.mm(xs[a:b], gate_up[e].t(), out=pre[a:b])
                _act(act, p[:, :f], act_gate[a:b])
                hb = torch.mul(act_gate[a:b], p[:, f:], out=h[: b - a])
                torch.mm(hb, down[e].t(), out=ys[a:b])
            start += c
        w = weight.reshape(-1).index_select(0, order)  # (M,)
        out = x.new_zeros(n, d).index_add_(0, tok, ys * w[:, None])
        ctx.save_for_backward(xs, tok, order, pre, act_gate, ys, w, gate_up, down)
        ctx.counts, ctx.act, ctx.k = counts, act, k
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xs, tok, order, pre, act_gate, ys, w, gate_up, down = ctx.saved_tensors
        f = down.shape[2]
        gys = grad_out.contiguous().index_select(0, tok)  # (M, d) dL/d(combined) per sorted pair
        gw = torch.empty_like(w)  # dL/d(weight) per sorted pair
        gxs = torch.empty_like(xs)
        g_gate_up, g_down = torch.empty_like(gate_up), torch.empty_like(down)
        rows = min(ROWS, xs.shape[0])
        h, gpre = xs.new_empty(rows, f), xs.new_empty(rows, 2 * f)
        start = 0
        for e, c in enumerate(ctx.counts):
            if c == 0:
                g_gate_up[e].zero_()
                g_down[e].zero_()
            for i, (a, b) in enumerate(_blocks(start, c)):
                r = b - a
                gate, up, ag, gy = pre[a:b, :f], pre[a:b, f:], act_gate[a:b], gys[a:b]
                torch.linalg.vecdot(gy, ys[a:b], out=gw[a:b])
                gy.mul_(w[a:b, None])  # dL/d(expert output)
                hb = torch.mul(ag, up, out=h[:r])
                if i == 0:
                    torch.mm(gy.t(), hb, out=g_down[e])
                else:
                    g_down[e].addmm_(gy.t(), hb)
                gh = torch.mm(gy, down[e])  # (r, f) dL/dh
                gp = gpre[:r]
                torch.mul(gh, ag, out=gp[:, f:])  # dL/d(up)
                _act_backward(ctx.act, gate, gh.mul_(up), gp[:, :f])  # dL/d(gate)
                torch.mm(gp, gate_up[e], out=gxs[a:b])
                if i == 0:
                    torch.mm(gp.t(), xs[a:b], out=g_gate_up[e])
                else:
                    g_gate_up[e].addmm_(gp.t(), xs[a:b])
            start += c
        grad_weight = torch.empty_like(gw).index_copy_(0, order, gw).view(-1, ctx.k)
        grad_x = torch.zeros_like(grad_out).index_add_(0, tok, gxs)
        return grad_x, None, grad_weight, g_gate_up, g_down, None


def segment_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """The "segment_mm" experts implementation: fused per-expert segments on CPU for gated bias-free
    experts, transformers' grouped_mm everywhere else (CUDA, or biased experts such as Phi's)."""
    fused = (hidden_states.device.type == "cpu" and getattr(module, "has_gate", False)
             and not getattr(module, "has_bias", False) and not getattr(module, "is_transposed", False))
    if not fused:
        return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    return _SegmentSwiGLU.apply(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj,
                                module.act_fn)


ALL_EXPERTS_FUNCTIONS.register("segment_mm", segment_mm_experts_forward)
