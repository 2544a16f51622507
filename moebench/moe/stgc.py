"""STGC: token gradient conflicts in MoE layers (arXiv 2406.19905).

For every routed (token t, expert e) pair, take the token's gradient with respect to expert e and
compare it with the mean gradient of the tokens routed to e in the batch:

    c_{t,e} = cos(g_{t,e}, mean_{s -> e} g_{s,e}),      conflicting when c_{t,e} < tau

    L_ce = coef * sum_layers mean_{conflicting (t,e)} -log softmax(-z_t)_e

with z_t the router logits recomputed from the detached router input, so the loss moves the router
only (it lowers the probability of sending t to e). The mask is detached.

Gradients (`gradient:`):
  output  g_{t,e} = w_{t,e} dL/dy_t, the gradient at the expert's output for that token (what a
          per-expert output bias would receive). Cheap: one hook on the MoE block output.
  exact   g_{t,e} = dL/dtheta_e from token t alone, over all of expert e's weights. Token t's gradient
          of a linear map is the outer product v_t u_t^T (output gradient, input), so the cosine with
          the mean M = mean_s v_s u_s^T is sum_maps v_t^T M u_t / (|G_t| |M|) with
          |G_t|^2 = sum_maps |v_t|^2 |u_t|^2: no per-token gradient is ever materialised, but each
          expert's forward is recomputed to get the inner output gradients.

Scheme: one forward and one backward of the task + balance loss; a hook keeps dL/d(block output)
and the block keeps its detached input. After that backward (before the optimizer step) the
conflicts are found and L_ce is backpropagated into the routers alone: it adds a router matmul per
MoE layer, not a second pass through the model. The gradients are those of the current step.
"""

from __future__ import annotations

import torch
from torch import nn

from moebench.config import STGCConfig
from moebench.moe.layer import MoEBlock


def _cosines_output(block: MoEBlock) -> torch.Tensor:
    """(N, k) cosine of each pair's output gradient w_{t,e} g_t with its expert's mean."""
    r, g = block.last, block.saved_grad.float()  # g: (N, d)
    n, k = r.index.shape
    pair = r.weight.float()[..., None] * g[:, None, :]  # (N, k, d)
    kept = r.kept.float()[..., None]
    sums = torch.zeros(block.num_experts, g.shape[1], dtype=g.dtype, device=g.device)
    sums.index_add_(0, r.index.reshape(-1), (pair * kept).reshape(-1, g.shape[1]))  # (E, d)
    counts = torch.bincount(r.index[r.kept], minlength=block.num_experts).clamp(min=1).float()
    mean = sums / counts[:, None]  # (E, d)
    return nn.functional.cosine_similarity(pair, mean[r.index], dim=-1, eps=1e-12)  # (N, k)


def _cosines_exact(block: MoEBlock) -> torch.Tensor:
    """(N, k) cosine of each pair's per-token parameter gradient of its expert with the expert's mean."""
    r, g, x = block.last, block.saved_grad.float(), block.saved_input.float()
    cos = torch.zeros(r.index.shape, dtype=torch.float32, device=g.device)
    experts = block.experts
    for e in range(block.num_experts):
        tok, slot = torch.where((r.index == e) & r.kept)  # pairs routed to e
        if tok.numel() == 0:
            continue
        v = r.weight[tok, slot].float()[:, None] * g[tok]  # (n, d) gradient at e's output
        with torch.enable_grad():
            pieces = experts.grad_pieces(e, x[tok].to(_dtype(experts)), v.to(_dtype(experts)))
        dot = torch.zeros(tok.numel(), device=g.device)
        sq_t = torch.zeros(tok.numel(), device=g.device)
        sq_m = torch.zeros((), device=g.device)
        for u, vv in pieces:
            u, vv = u.float(), vv.float()
            m = vv.t() @ u / tok.numel()  # (out, in) mean per-token gradient
            dot += ((vv @ m) * u).sum(-1)  # v_t^T M u_t
            sq_t += (vv ** 2).sum(-1) * (u ** 2).sum(-1)
            sq_m += (m ** 2).sum()
        cos[tok, slot] = dot / (sq_t.sqrt() * sq_m.sqrt()).clamp(min=1e-12)
    return cos


def _dtype(m: nn.Module):
    return next(m.parameters()).dtype


def conflicts(block: MoEBlock, gradient: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(conflicting (N, k) bool, cosine (N, k)) for the block's latest forward and backward."""
    if block.saved_grad is None:
        raise RuntimeError("STGC needs the block's output gradient: run backward with capture_grads on first")
    with torch.no_grad():
        cos = _cosines_output(block) if gradient == "output" else _cosines_exact(block)
        return block.last.kept & (cos < threshold), cos


def elimination_loss(block: MoEBlock, conflicting: torch.Tensor) -> torch.Tensor:
    """mean over conflicting pairs of -log softmax(-z_t)_e; z from the detached input (router only)."""
    if not conflicting.any():
        return block.router.weight.sum() * 0.0
    tok, slot = torch.where(conflicting)
    z = block.router_logits(block.saved_input[tok])  # (n, E) fp32, input detached
    target = block.last.index[tok, slot]
    return nn.functional.cross_entropy(-z, target)


class STGC:
    """Applies STGC after each backward: finds conflicts, backpropagates the elimination loss into the
    routers, and returns the statistics for the training table."""

    def __init__(self, cfg: STGCConfig, blocks: list[tuple[int, MoEBlock]]):
        self.cfg = cfg
        wanted = set(cfg.layers) if cfg.layers is not None else {i for i, _ in blocks}
        self.blocks = [(i, b) for i, b in blocks if i in wanted]
        for _, b in self.blocks:
            b.capture_grads = True

    def after_backward(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """`scale` is the gradient-accumulation factor the task loss was divided by."""
        logs: dict[str, torch.Tensor] = {}
        total = None
        for i, b in self.blocks:
            if b.saved_grad is None:  # the block took no part in this batch's graph
                continue
            mask, cos = conflicts(b, self.cfg.gradient, self.cfg.threshold)
            kept = b.last.kept
            loss = elimination_loss(b, mask)
            total = loss if total is None else total + loss
            logs[f"conflict_rate/{i}"] = mask.sum() / kept.sum().clamp(min=1)
            logs[f"grad_cos/{i}"] = cos[kept].mean() if kept.any() else cos.new_zeros(())
            b.saved_grad = b.saved_input = None
        if total is not None:
            (self.cfg.coef * total * scale).backward()
            logs["stgc_loss"] = self.cfg.coef * total.detach()
        return logs

    def close(self) -> None:
        for _, b in self.blocks:
            b.capture_grads = False
            b.saved_grad = b.saved_input = None
