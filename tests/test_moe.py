"""The MoE variant against independent facts: the dense parent, a naive per-token reference, the
balance-loss bounds, padding invariance, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from moebench.config import (
    LLMConfig,
    ModelConfig,
    MoEConfig,
    TokenizerConfig,
    VisionConfig,
)
from moebench.moe.layer import (
    ExpertsConfig,
    GatedExperts,
    MoEBlock,
    PlainExperts,
    route,
)
from moebench.moe.upcycle import moe_blocks, upcycle

FAMILIES = ["qwen2", "llama", "stablelm", "phi"]


@pytest.fixture(scope="module")
def tokenizer():
    from moebench.models.tokenizer import train_tokenizer

    texts = ["Is there a red circle in the image?", "USER: ASSISTANT: yes no left right", "a small blue star."] * 20
    return train_tokenizer(texts, 300)


def _cfg(family: str) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, layers=1, heads=2, intermediate_size=64),
        llm=LLMConfig(family=family, hidden_size=32, layers=4, heads=2, kv_heads=2 if family == "phi" else 1,
                      intermediate_size=64, max_positions=128),
        tokenizer=TokenizerConfig(vocab_size=300))


def _batch(tokenizer, model, n=3):
    from moebench.data.conversations import Encoder, pad_stack

    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    prompts = [enc.prompt(q) for q in ["Is there a star?", "What color is the small circle?", "How many?"][:n]]
    ids, mask = pad_stack([torch.tensor(p) for p in prompts], tokenizer.pad_token_id, left=True)
    pixels = torch.randn(len(prompts), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return ids, mask, pixels


# ----------------------------------------------------------------------------- upcycling


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_equals_dense_parent(tokenizer, family, top_k):
    """E exact copies with renormalised top-k weights compute the dense function (fp32, atol 1e-5)."""
    from moebench.models.build import build_vlm

    torch.manual_seed(0)
    model = build_vlm(_cfg(family), tokenizer).eval()
    ids, mask, pixels = _batch(tokenizer, model)
    with torch.no_grad():
        dense = model(ids, mask, pixels).logits
        layers = upcycle(model.llm, MoEConfig(num_experts=4, top_k=top_k, layers="every_other"))
        sparse = model(ids, mask, pixels).logits
    assert layers == [0, 2]
    assert len(moe_blocks(model)) == 2
    real = mask.bool()  # padding is not routed (its FFN output is 0); only real tokens are compared
    assert torch.allclose(dense[real], sparse[real], atol=1e-5)


def test_shared_expert_keeps_the_dense_function_at_upcycling(tokenizer):
    from moebench.models.build import build_vlm

    torch.manual_seed(0)
    model = build_vlm(_cfg("qwen2"), tokenizer).eval()
    ids, mask, pixels = _batch(tokenizer, model)
    with torch.no_grad():
        dense = model(ids, mask, pixels).logits
        upcycle(model.llm, MoEConfig(layers="all", shared_expert="gated"))
        real = mask.bool()
        assert torch.allclose(dense[real], model(ids, mask, pixels).logits[real], atol=1e-5)


def test_layer_placements():
    from moebench.moe.upcycle import moe_layer_indices

    assert moe_layer_indices("every_other", 6) == [0, 2, 4]
    assert moe_layer_indices("first_half", 6) == [0, 1, 2]
    assert moe_layer_indices("second_half", 6) == [3, 4, 5]
    assert moe_layer_indices("all", 3) == [0, 1, 2]
    assert moe_layer_indices([3, 1], 6) == [1, 3]


# ----------------------------------------------------------------------------- the layer vs a naive reference


def _random_block(kind: str, *, top_k=2, capacity=None, shared=None, impl="grouped_mm", seed=0, act=None):
    torch.manual_seed(seed)
    d, f, e = 16, 24, 4
    cls, default_act = (GatedExperts, "silu") if kind == "gated" else (PlainExperts, "gelu_new")
    experts = cls(ExpertsConfig(impl), e, d, f, act or default_act)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    shared_mlp = None
    if shared:
        shared_mlp = torch.nn.Sequential(torch.nn.Linear(d, f), torch.nn.GELU(), torch.nn.Linear(f, d))
    block = MoEBlock(experts, d, top_k, capacity_factor=capacity, eval_capacity_factor=capacity,
                     shared=shared_mlp, shared_gate=shared == "gated")
    torch.nn.init.normal_(block.router.weight, std=1.0)
    return block


def _naive(block: MoEBlock, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax, top-k, renormalise; capacity by the first-choices-first queue."""
    n, e, k = x.shape[0], block.num_experts, block.top_k
    probs = torch.softmax(x.double() @ block.router.weight.double().t(), -1).float()
    cf = block.capacity_factor
    cap = math.ceil(int(valid.sum()) / e * cf * k) if cf is not None else None
    used = [0] * e
    choice = [probs[t].topk(k) for t in range(n)]
    keep = [[False] * k for _ in range(n)]
    for j in range(k):  # all first choices, then all second choices
        for t in range(n):
            if not valid[t]:
                continue
            ex = int(choice[t].indices[j])
            if cap is None or used[ex] < cap:
                keep[t][j] = True
                used[ex] += 1
    rows = []
    for t in range(n):
        w = choice[t].values / choice[t].values.sum()
        y = torch.zeros(x.shape[1])
        for j in range(k):
            if keep[t][j]:
                y = y + w[j] * block.experts.expert(int(choice[t].indices[j]), x[t: t + 1])[0]
        if block.shared_expert is not None:
            s = block.shared_expert(x[t])
            if block.shared_gate is not None:
                s = torch.sigmoid(block.shared_gate(x[t])) * s
            y = y + s
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["gated", "plain"])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("capacity,shared", [(None, None), (0.6, None), (None, "plain"), (0.6, "gated")])
def test_layer_matches_naive_reference(kind, impl, capacity, shared):
    """Outputs and input gradients equal a per-token loop (atol 1e-5), with dropping and shared experts."""
    block = _random_block(kind, capacity=capacity, shared=shared, impl=impl)
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    block.token_mask = mask
    x1 = x.clone().requires_grad_(True)
    out = block(x1)
    x2 = x.clone().reshape(-1, 16).requires_grad_(True)
    ref = _naive(block, x2, mask.reshape(-1).bool())
    assert torch.allclose(out.reshape(-1, 16), ref, atol=1e-5)
    g = torch.randn_like(ref)
    (out.reshape(-1, 16) * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(x1.grad.reshape(-1, 16), x2.grad, atol=1e-5)
    if capacity is not None:
        assert block.statistics()["dropped"] > 0  # the example really drops tokens


@pytest.mark.parametrize("kind,act", [("gated", "silu"), ("gated", "gelu"), ("plain", "gelu_new")])
def test_grouped_mm_gradients_match_the_eager_loop(kind, act):
    """transformers' grouped_mm gives the eager loop's output and its input, routing-weight and expert-weight
    gradients (biases too), with a zero routing weight (a dropped pair) and an expert that gets no token."""
    experts = _random_block(kind, act=act).experts
    gen = torch.Generator().manual_seed(2)
    n = 23
    x = torch.randn(n, 16, generator=gen)
    index = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(n)])  # expert 3 never chosen
    weight = torch.rand(n, 2, generator=gen)
    weight[5, 1] = 0.0
    g = torch.randn(n, 16, generator=gen)
    results = []
    for impl in ("grouped_mm", "eager"):
        experts.config._experts_implementation = impl
        experts.zero_grad()
        xi, wi = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = experts(xi, index, wi)
        (out * g).sum().backward()
        results.append([out.detach(), xi.grad, wi.grad, *(p.grad.clone() for p in experts.parameters())])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)
    for p in results[0][3:]:
        assert torch.equal(p[3], torch.zeros_like(p[3]))  # the unused expert's gradients are zero


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_training_step_is_deterministic_on_cpu(impl):
    """Two forward + backward passes from the same state give bit-identical outputs and gradients."""
    block = _random_block("gated", impl=impl)
    x = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(4))
    runs = []
    for _ in range(2):
        block.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        (out.square().sum() + block.last.aux_loss).backward()
        runs.append([out.detach(), xi.grad, *(p.grad.clone() for p in block.parameters())])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_default_implementation_and_the_removed_kernel():
    """grouped_mm on CUDA, the eager loop on CPU; the removed "segment_mm" is an error that says what to use."""
    from moebench.errors import UserError
    from moebench.moe.layer import default_implementation

    assert default_implementation("cpu") == "eager"
    assert default_implementation(torch.device("cuda", 0)) == "grouped_mm"
    assert default_implementation() == ("grouped_mm" if torch.cuda.is_available() else "eager")
    with pytest.raises(UserError, match="moe.implementation=segment_mm.*gone.*grouped_mm or eager"):
        ExpertsConfig("segment_mm")


def test_eval_routing_is_deterministic():
    block = _random_block("gated").eval()
    x = torch.randn(1, 50, 16)
    with torch.no_grad():
        assert torch.equal(block(x), block(x))


# ----------------------------------------------------------------------------- losses and statistics


def test_balance_loss_bounds():
    n, e = 64, 4
    uniform = route(torch.zeros(n, e), torch.ones(n, dtype=torch.bool), 2, None)
    assert uniform.aux_loss.item() == pytest.approx(1.0)
    one_expert = torch.full((n, e), -1e4)
    one_expert[:, 2] = 1e4
    collapsed = route(one_expert, torch.ones(n, dtype=torch.bool), 2, None)
    assert collapsed.aux_loss.item() == pytest.approx(float(e))


def test_padding_changes_neither_loss_nor_statistics():
    """The same real tokens with and without extra padding rows give the same losses and statistics."""
    block = _random_block("gated", capacity=1.0)
    x = torch.randn(1, 12, 16)
    block.token_mask = torch.ones(1, 12, dtype=torch.long)
    y = block(x)
    ref_aux, ref_z, ref_stats = block.last.aux_loss, block.last.z_loss, block.statistics()
    padded = torch.cat([torch.randn(1, 7, 16) * 5, x], 1)  # 7 padding tokens with large activations
    block.token_mask = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    y2 = block(padded)
    assert torch.allclose(block.last.aux_loss, ref_aux)
    assert torch.allclose(block.last.z_loss, ref_z)
    stats = block.statistics()
    for k in ref_stats:
        assert torch.allclose(stats[k], ref_stats[k])
    assert torch.allclose(y2[:, 7:], y, atol=1e-6)  # padding takes no capacity from real tokens
    assert torch.equal(y2[:, :7], torch.zeros_like(y2[:, :7]))


def test_statistics_describe_the_routing():
    block = _random_block("gated", top_k=1)
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[3, 0] = 100.0  # every token with x_0 > 0 goes to expert 3
    x = torch.randn(1, 40, 16).abs() + 1.0
    block(x)
    s = block.statistics()
    assert s["load"].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert s["entropy"].item() == pytest.approx(0.0, abs=1e-4)
    assert s["dropped"].item() == 0.0


def test_activated_parameters(tokenizer):
    """Top-2 of 4 experts: the inactive half of each MoE layer's experts is not activated."""
    from moebench.models.build import build_vlm
    from moebench.models.params import count_params

    model = build_vlm(_cfg("qwen2"), tokenizer)
    dense = count_params(model)
    upcycle(model.llm, MoEConfig(num_experts=4, top_k=2, layers="every_other"))
    moe = count_params(model)
    ffn = 3 * 32 * 64
    router = 32 * 4
    assert moe["total"] == dense["total"] + 2 * (3 * ffn + router)
    assert moe["activated"] == dense["total"] + 2 * (ffn + router)


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_trained_model_equals_its_parent_on_a_shapes_batch(tiny_run, top_k):
    """The trained tiny dense run, upcycled, gives the same logits on held-out shapes questions."""
    from moebench.data.conversations import Encoder, pad_stack
    from moebench.data.images import load_image, preprocess
    from moebench.data.sources import resolve
    from moebench.eval.tasks import load_samples, load_task

    run, _ = tiny_run
    model, tokenizer = run.load_model()
    v = run.recipe.model.vision
    src = resolve("shapes", run.recipe.data.world, progress=False)
    samples = load_samples(load_task("gqa"), src.root, limit=6)
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    ids, mask = pad_stack([torch.tensor(enc.prompt(s.question)) for s in samples], tokenizer.pad_token_id, left=True)
    pixels = torch.stack([preprocess(load_image(s.image), v.image_size, v.image_mean, v.image_std, v.aspect)
                          for s in samples])
    with torch.no_grad():
        dense = model(ids, mask, pixels).logits
        upcycle(model.llm, MoEConfig(num_experts=4, top_k=top_k, layers="all"))
        sparse = model(ids, mask, pixels).logits
    real = mask.bool()  # padding is not routed (its FFN output is 0); only real tokens are compared
    assert torch.allclose(dense[real], sparse[real], atol=1e-5)


def test_bench_moe_layer_reports_ratios_taken_side_by_side():
    """`bench moe-layer` on tiny sizes: every contender has a time, the dense FFN is its own unit, and the
    paired comparison against the naive loop is a median of per-round ratios with a win share."""
    from moebench.moe.bench import bench_moe_layer

    r = bench_moe_layer(experts=4, top_k=2, hidden=16, ffn=24, tokens=64, repeats=3)
    loop = "moe_naive_expert_loop (Mixtral eager)"
    assert set(r["seconds"]) >= {"dense_ffn_equal_flops", loop}
    assert r["ratio_to_dense"]["dense_ffn_equal_flops"] == 1.0
    assert loop not in r["ratio_to_loop_paired"]
    assert set(r["ratio_to_loop_paired"]) == set(r["seconds"]) - {loop}
    assert all(v > 0 for v in r["ratio_to_loop_paired"].values())
    assert all(v in (0, 1 / 3, 2 / 3, 1) for v in r["rounds_faster_than_loop"].values())
