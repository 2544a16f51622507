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

The large intermediates come from a small pool of reused buffers (`_POOL`). glibc serves allocations
this size by mmap and unmaps them on free, so a fresh (M, 2f) tensor is page-faulted and zeroed by the
kernel again at every step: 31 ms to allocate and fill 92 MB against 4 ms to refill a reused one on
the 2-core box. With the pool, `moebench bench moe-layer` went from level with the naive loop to
0.95-0.97x its time (paired, 3 runs). Buffers saved for
backward go back to the pool when backward has used them (or at the end of a forward that no backward
will follow), as a caching allocator would.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import (
    ALL_EXPERTS_FUNCTIONS,
    grouped_mm_experts_forward,
)

_SILU = (nn.SiLU, SiLUActivation)  # activations with aten out= and backward kernels
ROWS = 2048  # the largest row block of the CPU path; near the best matmul shape on 2 AVX2 cores


class _BufferPool:
    """Free flat buffers, handed out by size: the smallest free one that holds n elements and is at
    most 4n (so a small request does not pin a large buffer), else a new one. Keeps at most `keep`."""

    def __init__(self, keep: int = 32):
        self.keep, self.free, self.lock = keep, [], threading.Lock()

    def take(self, like: torch.Tensor, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        with self.lock:
            fits = [i for i, b in enumerate(self.free)
                    if b.dtype == like.dtype and b.device == like.device and n <= b.numel() <= 4 * max(n, 1)]
            if fits:
                return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))[:n].view(shape)
        return like.new_empty(n).view(shape)

    def give(self, *tensors: torch.Tensor) -> None:
        with self.lock:
            for t in tensors:
                self.free.append(t if t._base is None else t._base)
            del self.free[:-self.keep]


_POOL = _BufferPool()


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
    def forward(ctx, x, index, weight, gate_up, down, act, backward_follows):
        n, k = index.shape
        d, f = x.shape[1], down.shape[2]
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs sorted by expert, ties in token order
        tok = order // k  # the token of each sorted pair
        counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
        m = tok.shape[0]
        xs = torch.index_select(x, 0, tok, out=_POOL.take(x, m, d))  # (M, d)
        pre = _POOL.take(x, m, 2 * f)  # [gate | up] pre-activations, kept for backward
        act_gate = _POOL.take(x, m, f)
        ys = _POOL.take(x, m, d)
        h = _POOL.take(x, min(ROWS, m), f)
        start = 0
        for e, c in enumerate(counts):
            for a, b in _blocks(start, c):
                p = torch.mm(xs[a:b], gate_up[e].t(), out=pre[a:b])
                _act(act, p[:, :f], act_gate[a:b])
                hb = torch.mul(act_gate[a:b], p[:, f:], out=h[: b - a])
                torch.mm(hb, down[e].t(), out=ys[a:b])
            start += c
        w = weight.reshape(-1).index_select(0, order)  # (M,)
        weighted = torch.mul(ys, w[:, None], out=_POOL.take(x, m, d))
        out = x.new_zeros(n, d).index_add_(0, tok, weighted)
        _POOL.give(h, weighted)
        if not backward_follows:
            _POOL.give(xs, pre, act_gate, ys)
            return out
        ctx.save_for_backward(xs, tok, order, pre, act_gate, ys, w, gate_up, down)
        ctx.counts, ctx.act, ctx.k, ctx.pooled = counts, act, k, True
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.pooled:
            raise RuntimeError("segment_mm's backward ran twice on one forward (retain_graph=True); its buffers "
                               "were reused after the first. Use experts implementation 'eager' for that.")
        xs, tok, order, pre, act_gate, ys, w, gate_up, down = ctx.saved_tensors
        m, d = xs.shape
        f = down.shape[2]
        gys = torch.index_select(grad_out.contiguous(), 0, tok, out=_POOL.take(xs, m, d))  # dL/d(combined) per pair
        gw = torch.empty_like(w)  # dL/d(weight) per sorted pair
        gxs = _POOL.take(xs, m, d)
        g_gate_up, g_down = torch.empty_like(gate_up), torch.empty_like(down)
        rows = min(ROWS, m)
        h, gh, gpre = _POOL.take(xs, rows, f), _POOL.take(xs, rows, f), _POOL.take(xs, rows, 2 * f)
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
                ghb = torch.mm(gy, down[e], out=gh[:r])  # (r, f) dL/dh
                gp = gpre[:r]
                torch.mul(ghb, ag, out=gp[:, f:])  # dL/d(up)
                _act_backward(ctx.act, gate, ghb.mul_(up), gp[:, :f])  # dL/d(gate)
                torch.mm(gp, gate_up[e], out=gxs[a:b])
                if i == 0:
                    torch.mm(gp.t(), xs[a:b], out=g_gate_up[e])
                else:
                    g_gate_up[e].addmm_(gp.t(), xs[a:b])
            start += c
        grad_weight = torch.empty_like(gw).index_copy_(0, order, gw).view(-1, ctx.k)
        grad_x = torch.zeros_like(grad_out).index_add_(0, tok, gxs)
        ctx.pooled = False
        _POOL.give(gys, gxs, h, gh, gpre, xs, pre, act_gate, ys)
        return grad_x, None, grad_weight, g_gate_up, g_down, None, None


def segment_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights):
    """The "segment_mm" experts implementation: fused per-expert segments on CPU for gated bias-free
    experts, transformers' grouped_mm everywhere else (CUDA, or biased experts such as Phi's)."""
    fused = (hidden_states.device.type == "cpu" and getattr(module, "has_gate", False)
             and not getattr(module, "has_bias", False) and not getattr(module, "is_transposed", False))
    if not fused:
        return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    tensors = (hidden_states, top_k_weights, module.gate_up_proj, module.down_proj)
    backward_follows = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _SegmentSwiGLU.apply(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj,
                                module.act_fn, backward_follows)


ALL_EXPERTS_FUNCTIONS.register("segment_mm", segment_mm_experts_forward)
