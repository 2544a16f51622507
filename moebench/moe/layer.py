"""The sparse MoE layer of MoE-LLaVA (Lin et al. 2024, arXiv 2401.15947; DESIGN section 2.1).

    z = W_r x                     router Linear(d, E, no bias), computed in fp32
    p = softmax(z)                top-k of p, the k weights renormalised to sum to 1
    y = sum_j w_j * expert_{e_j}(x)  [+ shared(x), optionally scaled by sigmoid(g . x)]

Experts are stored as stacked weights (E, ...) and dispatched through transformers' experts interface
(`transformers.integrations.moe`, `moe.implementation`): "eager" is the per-expert loop of transformers'
Mixtral block (one gather and one matmul per projection per expert that received tokens, no loop over
tokens), the naive reference of the tests and benchmarks; "grouped_mm" is transformers' kernel that
sorts the token-expert pairs by expert and runs each projection as one grouped matmul. The default is
grouped_mm on CUDA and eager on CPU, where the loop was measured faster at the main job's sizes
(issue 28; docs/performance.md).

Routing never samples: top-k is taken on the probabilities at training and at evaluation alike.
Padding tokens (the `token_mask` set by the VLM before each forward) are not routed: they get weight
0, take no capacity and count in neither the balance loss nor the statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from moebench.errors import UserError
from moebench.models.extensions import RoutedBlock

# names that recipes or saved runs may still carry, with what replaced them
_REMOVED = {"segment_mm": "moebench's hand-written CPU kernel is gone: it saved about 1% "
                          "of the main job's time"}


@dataclass
class ExpertsConfig:
    """What transformers' experts dispatcher reads: which kernel to use."""

    _experts_implementation: str = "eager"

    def __post_init__(self):
        name = self._experts_implementation
        if name in _REMOVED:
            raise UserError(f"moe.implementation={name}: {_REMOVED[name]}. Choose grouped_mm or eager, or leave "
                            f"moe.implementation unset (eager on CPU, grouped_mm on CUDA); a saved run that names "
                            f"it loads once 'implementation' is removed from the moe section of its model.json")


def default_implementation(device: torch.device | str | None = None) -> str:
    """transformers' grouped_mm on CUDA, the eager loop on CPU (faster there at the main job's sizes).
    Without `device`, the device moebench trains and evaluates on: CUDA when there is one."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return "grouped_mm" if kind == "cuda" else "eager"


def _eager_experts(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The naive reference: a Python loop over the experts that received tokens (as Mixtral's eager block)."""
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        hit = torch.nn.functional.one_hot(top_k_index, module.num_experts).sum((0, 1)).nonzero().flatten()
    for e in hit.tolist():
        tok, slot = torch.where(top_k_index == e)
        h = module.expert(e, hidden_states[tok]) * top_k_weights[tok, slot, None]
        out.index_add_(0, tok, h.to(out.dtype))
    return out


@use_experts_implementation(has_gate=True, has_bias=False)
class GatedExperts(nn.Module):
    """E SwiGLU FFNs (Qwen2 / Llama / StableLM): down(act(gate(x)) * up(x)), weights stacked."""

    def __init__(self, config: ExpertsConfig, num_experts: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))  # (E, 2f, d)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # (E, d, f)
        self.act_fn = ACT2FN[act]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return _eager_experts(self, hidden_states, top_k_index, top_k_weights)

    def grad_pieces(self, e: int, x: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-token parameter gradients of expert e as (input u, output gradient v) per linear map:
        token t's gradient of that weight is v_t u_t^T. `v` is dL/d(expert output) per token."""
        pre = nn.functional.linear(x, self.gate_up_proj[e].detach()).requires_grad_(True)  # (n, 2f)
        gate, up = pre.chunk(2, dim=-1)
        h = self.act_fn(gate) * up  # (n, f)
        y = nn.functional.linear(h, self.down_proj[e].detach())  # (n, d)
        (d_pre,) = torch.autograd.grad(y, pre, v)
        return [(x, d_pre), (h.detach(), v)]


@use_experts_implementation(has_gate=False, has_bias=True)
class PlainExperts(nn.Module):
    """E two-layer FFNs with biases (Phi's fc1 / fc2): down(act(up(x)))."""

    def __init__(self, config: ExpertsConfig, num_experts: int, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))  # (E, f, d)
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, intermediate))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))  # (E, d, f)
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.act_fn = ACT2FN[act]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(nn.functional.linear(x, self.up_proj[e], self.up_proj_bias[e]))
        return nn.functional.linear(h, self.down_proj[e], self.down_proj_bias[e])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return _eager_experts(self, hidden_states, top_k_index, top_k_weights)

    def grad_pieces(self, e: int, x: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As GatedExperts.grad_pieces; a bias is a linear map of the constant input 1."""
        pre = nn.functional.linear(x, self.up_proj[e].detach(), self.up_proj_bias[e].detach()).requires_grad_(True)
        h = self.act_fn(pre)  # (n, f)
        y = nn.functional.linear(h, self.down_proj[e].detach(), self.down_proj_bias[e].detach())
        (d_pre,) = torch.autograd.grad(y, pre, v)
        one = x.new_ones(x.shape[0], 1)
        return [(x, d_pre), (one, d_pre), (h.detach(), v), (one, v)]


@dataclass
class Routing:
    """One forward's routing decisions and the quantities derived from them (valid tokens only)."""

    probs: torch.Tensor  # (N, E) fp32 router probabilities
    index: torch.Tensor  # (N, k) chosen experts, best first
    weight: torch.Tensor  # (N, k) renormalised weights, 0 where the pair is dropped or the token is padding
    valid: torch.Tensor  # (N,) bool, False for padding
    kept: torch.Tensor  # (N, k) bool, pair processed (valid and within capacity)
    aux_loss: torch.Tensor  # E * sum_i f_i * P_i
    z_loss: torch.Tensor  # mean logsumexp(z)^2
    f: torch.Tensor  # (E,) fraction of valid tokens whose first choice is i
    p_mean: torch.Tensor  # (E,) mean router probability of i over valid tokens
    n_valid: torch.Tensor  # () valid tokens: what f, p_mean and z_loss are means over


def balance_loss(f: torch.Tensor, p_mean: torch.Tensor) -> torch.Tensor:
    """Switch / MoE-LLaVA load balancing: E * sum_i f_i * P_i (1 at perfect balance)."""
    return f.shape[-1] * (f * p_mean).sum()


def capacity_keep(index: torch.Tensor, valid: torch.Tensor, num_experts: int, capacity_factor: float,
                  min_capacity: int = 0) -> torch.Tensor:
    """(N, k) bool: the pairs that fit in capacity max(ceil(S / E * cf * k), min_capacity) per expert, S =
    valid tokens.

    Priority as in MoE-LLaVA's DeepSpeed gating: every token's first choice before any second choice,
    and within one choice rank, tokens in sequence order.
    """
    n, k = index.shape
    s = int(valid.sum())
    capacity = max(math.ceil(s / num_experts * capacity_factor * k), min_capacity)
    order = index.t().reshape(-1)  # (k*N,) choice-major
    take = valid.repeat(k)  # (k*N,)
    onehot = nn.functional.one_hot(order, num_experts) * take[:, None]  # (k*N, E)
    rank = (onehot.cumsum(0) - 1).gather(1, order[:, None]).squeeze(1)  # place in its expert's queue
    keep = take & (rank < capacity)
    return keep.view(k, n).t()


def route(logits: torch.Tensor, valid: torch.Tensor, top_k: int, capacity_factor: float | None,
          min_capacity: int = 0, renormalize_kept: bool = False, normalized: bool = True) -> Routing:
    """Softmax, top-k, renormalise, optional capacity; balance and z losses over valid tokens.

    The k weights are renormalised over the k choices, and a choice capacity drops then weighs 0
    (moebench's default); `renormalize_kept` renormalises over the choices kept instead, as DeepSpeed's
    top-2 gating does for MoE-LLaVA (a token whose second choice is dropped gives its first weight 1).
    `normalized=False` keeps the top-k softmax probabilities as they are (OLMoE: norm_topk_prob false)."""
    num_experts = logits.shape[-1]
    probs = logits.softmax(-1)  # (N, E)
    top_p, index = probs.topk(top_k, dim=-1)  # (N, k)
    kept = valid[:, None].expand_as(index)
    if capacity_factor is not None:
        kept = capacity_keep(index, valid, num_experts, capacity_factor, min_capacity)
    if renormalize_kept:
        weight = top_p * kept
        weight = weight / weight.sum(-1, keepdim=True).clamp(min=torch.finfo(weight.dtype).eps)
    elif normalized:
        weight = top_p / top_p.sum(-1, keepdim=True) * kept
    else:
        weight = top_p * kept
    v = valid.float()
    n_valid = v.sum().clamp(min=1.0)
    first = nn.functional.one_hot(index[:, 0], num_experts).float()  # (N, E) first choices
    f = (first * v[:, None]).sum(0) / n_valid  # fraction of valid tokens whose first choice is i
    p_mean = (probs * v[:, None]).sum(0) / n_valid  # mean router probability of i
    aux = balance_loss(f, p_mean)
    z = ((torch.logsumexp(logits, -1) ** 2) * v).sum() / n_valid
    return Routing(probs, index, weight, valid, kept, aux, z, f, p_mean, v.sum())


class MoEBlock(RoutedBlock):
    """A sparse MoE FFN that replaces a decoder layer's MLP: router, E experts, optional shared expert."""

    def __init__(self, experts: nn.Module, hidden: int, top_k: int, *, capacity_factor: float | None = None,
                 eval_capacity_factor: float | None = None, shared: nn.Module | None = None,
                 shared_gate: bool = False, routing_unit: str = "token", min_capacity: int = 0,
                 renormalize_kept: bool = False, top_k_normalized: bool = True):
        super().__init__()
        self.min_capacity, self.renormalize_kept = min_capacity, renormalize_kept  # see route()
        self.top_k_normalized = top_k_normalized
        self.routing_unit = routing_unit  # token, or image: one assignment per image from its first (class) token
        self.num_experts = experts.num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router = nn.Linear(hidden, self.num_experts, bias=False, dtype=torch.float32)
        self.experts = experts
        self.shared_expert = shared
        self.shared_gate = nn.Linear(hidden, 1, bias=False) if (shared is not None and shared_gate) else None
        self.token_mask: torch.Tensor | None = None  # (B, T) set by the VLM; None = every token is real
        self.last: Routing | None = None  # the routing of the latest forward, for losses and statistics
        # STGC: keep the router input and, after backward, the loss gradient at this block's output
        self.capture_grads = False
        self.saved_input: torch.Tensor | None = None  # (N, d) detached
        self.saved_grad: torch.Tensor | None = None  # (N, d) dL/d(output)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(x.float(), self.router.weight.float())  # (N, E) fp32

    def _valid(self, shape: torch.Size, device) -> torch.Tensor:
        b, t = shape[0], shape[1]
        m = self.token_mask
        if m is None or m.shape[0] != b or m.shape[1] < t:
            return torch.ones(b * t, dtype=torch.bool, device=device)
        return m[:, -t:].reshape(-1).to(device=device, dtype=torch.bool)  # decoding: the newest columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, d)
        flat = x.reshape(-1, shape[-1])  # (N, d)
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.routing_unit == "image":  # ViMoE: route each image by its class token, all its tokens alike
            valid = torch.ones(shape[0], dtype=torch.bool, device=x.device)
            r = route(self.router_logits(x[:, 0]), valid, self.top_k, cf, self.min_capacity,
                      self.renormalize_kept, self.top_k_normalized)  # (B, k)
            index = r.index.repeat_interleave(shape[1], dim=0)  # (N, k)
            weight = r.weight.repeat_interleave(shape[1], dim=0)
        else:
            r = route(self.router_logits(flat), self._valid(shape, x.device), self.top_k, cf, self.min_capacity,
                      self.renormalize_kept, self.top_k_normalized)
            index, weight = r.index, r.weight
        self.last = r
        out = self.experts(flat, index, weight.to(flat.dtype))  # (N, d)
        if self.shared_expert is not None:
            s = self.shared_expert(flat)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(flat)) * s
            out = out + s
        if self.capture_grads and self.training and out.requires_grad:
            self.saved_input, self.saved_grad = flat.detach(), None
            out.register_hook(self._save_grad)
        return out.view(shape)

    def _save_grad(self, grad: torch.Tensor) -> None:
        self.saved_grad = grad.detach()

    def inactive_parameters(self) -> int:
        """(E - k) / E of the routed experts: what one token does not use."""
        return sum(p.numel() for p in self.experts.parameters()) * (self.num_experts - self.top_k) // self.num_experts

    def statistics(self) -> dict[str, torch.Tensor]:
        """Expert load (share of processed pairs per expert), router entropy, dropped fraction."""
        r = self.last
        if r is None:
            return {}
        with torch.no_grad():
            v = r.valid.float()
            n_valid = v.sum().clamp(min=1.0)
            counts = nn.functional.one_hot(r.index, self.num_experts).mul(r.kept[..., None]).sum((0, 1)).float()
            load = counts / counts.sum().clamp(min=1.0)
            entropy = -(r.probs * r.probs.clamp(min=1e-12).log()).sum(-1)
            entropy = (entropy * v).sum() / n_valid
            dropped = 1.0 - r.kept.sum() / (n_valid * self.top_k)
        return {"load": load, "entropy": entropy, "dropped": dropped}
