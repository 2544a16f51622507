"""STGC against hand-worked facts: the loss value, where its gradient goes, which tokens are flagged."""

from __future__ import annotations

import math

import pytest
import torch

from moebench.config import STGCConfig
from moebench.moe.layer import ExpertsConfig, GatedExperts, MoEBlock, PlainExperts, route
from moebench.moe.stgc import STGC, conflicts, elimination_loss

D, F, E = 8, 12, 4


def _block(kind="gated", top_k=1):
    torch.manual_seed(0)
    cls, act = (GatedExperts, "silu") if kind == "gated" else (PlainExperts, "gelu_new")
    experts = cls(ExpertsConfig("grouped_mm"), E, D, F, act)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    block = MoEBlock(experts, D, top_k)
    torch.nn.init.normal_(block.router.weight)
    return block


def _set_routing(block, x, experts_of_tokens, grads):
    """Route token t to experts_of_tokens[t] with weight 1 and pretend dL/d(output) = grads."""
    n = x.shape[0]
    logits = torch.full((n, E), -20.0)
    logits[torch.arange(n), torch.tensor(experts_of_tokens)] = 20.0
    block.last = route(logits, torch.ones(n, dtype=torch.bool), 1, None)
    block.saved_input, block.saved_grad = x, grads


def test_elimination_loss_hand_computed():
    block = _block()
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[:, 0] = torch.tensor([1.0, 2.0, 0.0, -1.0])  # z = W x with x = e_0
    x = torch.zeros(2, D)
    x[:, 0] = 1.0
    _set_routing(block, x, [1, 3], torch.zeros(2, D))
    mask = torch.tensor([[True], [False]])  # only token 0 (routed to expert 1) conflicts
    loss = elimination_loss(block, mask)
    # -log softmax(-z)_1 with z = (1, 2, 0, -1): -(-2) + log(e^-1 + e^-2 + e^0 + e^1)
    expected = 2.0 + math.log(math.exp(-1) + math.exp(-2) + math.exp(0) + math.exp(1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_elimination_loss_reaches_the_router_only():
    """Through a real forward: the loss's gradient lands on router weights, none on experts or inputs."""
    block = _block(top_k=2)
    block.train()
    block.capture_grads = True
    x = torch.randn(1, 16, D, requires_grad=True)
    block(x).pow(2).sum().backward()
    for p in [block.router.weight, *block.experts.parameters()]:
        p.grad = None
    x.grad = None
    mask = torch.ones_like(block.last.kept)
    elimination_loss(block, mask).backward()
    assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in block.experts.parameters())
    assert x.grad is None


@pytest.mark.parametrize("gradient", ["output", "exact"])
@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_opposite_gradients_are_flagged_aligned_are_not(gradient, kind):
    """Five tokens share an input and an output gradient; a sixth has the same input and the opposite
    gradient, so its per-token gradient (output or parameter) is exactly opposite to the majority."""
    block = _block(kind)
    x = torch.randn(1, D).repeat(8, 1)
    g = torch.randn(1, D)
    grads = torch.cat([g.repeat(5, 1), -g, torch.randn(2, D)])
    _set_routing(block, x, [2, 2, 2, 2, 2, 2, 0, 1], grads)
    flagged, cos = conflicts(block, gradient, threshold=0.0)
    assert flagged[:5].sum() == 0 and bool(flagged[5, 0])
    assert cos[:5].min() > 0.5 and cos[5, 0] < -0.5
    assert torch.allclose(cos[6:], torch.ones(2, 1), atol=1e-5)  # alone with its expert: its own mean


def test_exact_cosine_matches_materialised_per_token_gradients():
    """The outer-product formula equals cosines of per-token parameter gradients computed by autograd."""
    block = _block("plain")
    x = torch.randn(6, D)
    grads = torch.randn(6, D)
    _set_routing(block, x, [1] * 6, grads)
    _, cos = conflicts(block, "exact", 0.0)
    per_token = []
    for t in range(6):
        params = list(block.experts.parameters())
        y = block.experts.expert(1, x[t: t + 1])
        gs = torch.autograd.grad(y, params, grads[t: t + 1], allow_unused=True)
        per_token.append(torch.cat([gi.flatten() for gi in gs if gi is not None]))
    per_token = torch.stack(per_token)
    ref = torch.nn.functional.cosine_similarity(per_token, per_token.mean(0, keepdim=True))
    assert torch.allclose(cos[:, 0], ref, atol=1e-5)


def test_after_backward_logs_and_adds_router_gradient():
    block = _block(top_k=2)
    block.train()
    stgc = STGC(STGCConfig(threshold=0.5, coef=1.0), [(0, block)])
    x = torch.randn(1, 32, D)
    block(x).sin().sum().backward()
    before = block.router.weight.grad.clone()
    logs = stgc.after_backward()
    assert 0 < logs["conflict_rate/0"].item() <= 1
    assert -1 <= logs["grad_cos/0"].item() <= 1
    assert not torch.equal(block.router.weight.grad, before)
    stgc.close()
    assert not block.capture_grads


def test_bench_stgc_on_a_tiny_recipe():
    from conftest import REPO, TINY
    from moebench.config import load_recipe
    from moebench.moe.bench import bench_stgc

    recipe = load_recipe(REPO / "recipes" / "shapes_stgc.yaml", TINY)
    r = bench_stgc(recipe, steps=2, batch_size=4, progress=False)
    assert set(r["ratio_to_moe"]) == {"moe", "stgc_output", "stgc_exact"} and r["ratio_to_moe"]["moe"] == 1.0
    assert r["pairs"] > 0 and -1.0 <= r["pearson_output_vs_exact"] <= 1.0
    assert 0.0 <= r["flag_agreement"] <= 1.0


@pytest.mark.parametrize("gradient", ["output", "exact"])
def test_padding_never_counts(gradient):
    """Padding tokens with huge gradients change neither the real tokens' cosines nor the flags."""
    block = _block(top_k=2)
    x = torch.randn(10, D)
    g = torch.randn(10, D)
    logits = torch.randn(10, E)
    block.last = route(logits, torch.ones(10, dtype=torch.bool), 2, None)
    block.saved_input, block.saved_grad = x, g
    flags, cos = conflicts(block, gradient, 0.0)
    xp, gp = torch.cat([torch.randn(4, D), x]), torch.cat([torch.randn(4, D) * 100, g])
    valid = torch.cat([torch.zeros(4, dtype=torch.bool), torch.ones(10, dtype=torch.bool)])
    block.last = route(torch.cat([torch.randn(4, E), logits]), valid, 2, None)
    block.saved_input, block.saved_grad = xp, gp
    flags_p, cos_p = conflicts(block, gradient, 0.0)
    assert not flags_p[:4].any()
    assert torch.equal(flags_p[4:], flags) and torch.allclose(cos_p[4:], cos, atol=1e-5)
