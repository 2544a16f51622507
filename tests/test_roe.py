"""RoE against independent facts: the dense parent, the regulariser formula, real skipping, batch invariance."""

from __future__ import annotations

import math
import time

import pytest
import torch

from moebench.config import (
    LLMConfig,
    ModelConfig,
    RoEConfig,
    TokenizerConfig,
    VisionConfig,
)
from moebench.roe.model import RoELayer, add_roe, regularised_loss


@pytest.fixture(scope="module")
def tokenizer():
    from moebench.models.tokenizer import train_tokenizer

    texts = ["Is there a red circle in the image?", "USER: ASSISTANT: yes no left right", "a small blue star."] * 20
    return train_tokenizer(texts, 300)


def _model(tokenizer, seed=0):
    from moebench.models.build import build_vlm

    torch.manual_seed(seed)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, layers=1, heads=2, intermediate_size=64),
        llm=LLMConfig(hidden_size=32, layers=4, heads=2, kv_heads=1, intermediate_size=64, max_positions=128,
                      init_std=0.1),
        tokenizer=TokenizerConfig(vocab_size=300))
    return build_vlm(cfg, tokenizer).eval()


QUESTIONS = ["Is there a star?", "What color is the small circle?", "How many?", "Is the bar left?",
             "What shape is the red object?", "Is there a cross in the image?", "Left or right?", "Count them."]


def _prompts(tokenizer, model):
    from moebench.data.conversations import Encoder

    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    pixels = torch.randn(len(QUESTIONS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return [enc.prompt(q) for q in QUESTIONS], pixels


def _force(monkeypatch, rule):
    """Make every RoE layer's [run, skip] logits a function of (layer, routing-token states)."""
    def route_logits(self, h):
        run = rule(self, h[:, -2:].float())  # (B,) bool
        return torch.stack([run.float(), (~run).float()], dim=-1)

    monkeypatch.setattr(RoELayer, "route_logits", route_logits)


def test_routing_tokens_leave_normal_tokens_unchanged_when_nothing_is_skipped(tokenizer, monkeypatch):
    from moebench.data.conversations import pad_stack

    model = _model(tokenizer)
    prompts, pixels = _prompts(tokenizer, model)
    ids, mask = pad_stack([torch.tensor(p) for p in prompts], tokenizer.pad_token_id, left=True)
    with torch.no_grad():
        dense = model(ids, mask, pixels).logits
        add_roe(model, RoEConfig())
        _force(monkeypatch, lambda layer, rt: torch.ones(rt.shape[0], dtype=torch.bool))
        model.roe.ctx.mode = "hard"
        routed = model(ids, mask, pixels).logits
    real = mask.bool()
    assert torch.allclose(dense[real], routed[real], atol=1e-5)


def test_routed_sdpa_equals_transformers_sdpa_on_a_boolean_mask_with_gradients():
    """Grouped keys (enable_gqa) under a boolean mask against transformers' own SDPA, which repeats them."""
    from transformers import AttentionInterface

    from moebench.roe.model import routed_sdpa

    class Attn(torch.nn.Module):
        num_key_value_groups, is_causal = 2, True

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 7, 8, generator=g, requires_grad=True)  # (B, heads, T, D), 2 heads per KV head
    k, v = (torch.randn(3, 2, 7, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.rand(3, 1, 7, 7, generator=g) < 0.6
    mask |= torch.eye(7, dtype=torch.bool)  # no empty row
    ours, _ = routed_sdpa(Attn(), q, k, v, mask, scaling=0.3)
    theirs, _ = AttentionInterface()["sdpa"](Attn(), q, k, v, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (3, 7, 4, 8)
    assert torch.allclose(ours, theirs, atol=1e-6)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(theirs.square().sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-5)


def test_boolean_routing_mask_equals_eager_s_additive_mask(tokenizer):
    """The same RoE weights, routed softly over a left-padded batch: the LM switched to moebench_routed_sdpa
    with a boolean mask, and the LM on transformers' attention with the additive mask eager would get,
    give the same logits and skip probabilities."""
    from moebench.data.conversations import pad_stack

    out = {}
    for attention in ("sdpa", "eager"):
        model = _model(tokenizer)
        torch.manual_seed(1)
        add_roe(model, RoEConfig(), attention)
        assert model.roe.boolean_mask == (attention == "sdpa")
        for layer in model.roe.layers(model.llm):  # routers that read the routing tokens for real
            torch.nn.init.normal_(layer.router.weight, std=0.5, generator=torch.Generator().manual_seed(2))
        model.roe.ctx.mode = "soft"
        prompts, pixels = _prompts(tokenizer, model)
        ids, mask = pad_stack([torch.tensor(p) for p in prompts], tokenizer.pad_token_id, left=True)
        with torch.no_grad():
            logits = model(ids, mask, pixels).logits
        out[attention] = logits[mask.bool()], torch.stack(model.roe.ctx.skip_probs)
    assert torch.allclose(out["sdpa"][0], out["eager"][0], atol=1e-5)
    assert torch.allclose(out["sdpa"][1], out["eager"][1], atol=1e-6)
    assert out["sdpa"][1].std() > 0.01  # the routing tokens' states decide something


def test_regulariser_hand_computed():
    """Two examples; the first under its target skip ratio, the second over it (no penalty)."""
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = 2.0  # example 0 predicts token 1 at position 0 with p = e^2 / (e^2 + 3)
    labels = torch.tensor([[-100, 1, -100], [-100, 3, -100]])
    skip = [torch.tensor([0.1, 0.5]), torch.tensor([0.1, 0.3])]  # two routable layers
    loss, logs = regularised_loss(logits, labels, skip, target=0.3, coef=1.0)
    ce0 = -math.log(math.exp(2) / (math.exp(2) + 3))
    ce1 = math.log(4)
    s0, s1 = 0.1, 0.4
    expected = ((ce0 + math.exp(-5 * ce0) * (0.3 - s0)) + (ce1 + math.exp(-5 * ce1) * max(0.0, 0.3 - s1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["skip_rate"].item() == pytest.approx((s0 + s1) / 2)


def test_a_skipped_layer_is_not_called_for_the_examples_that_skip_it(tokenizer, monkeypatch):
    from moebench.eval.generate import greedy_generate

    model = _model(tokenizer)
    add_roe(model, RoEConfig())
    model.roe.ctx.mode = "hard"
    prompts, pixels = _prompts(tokenizer, model)
    skip_rows = {1: {0, 3, 5}, 2: {1, 3, 6, 7}}  # layer -> examples that skip it
    rows = {}

    def rule(layer, rt):
        i = model.roe.layer_ids[model.roe.layers(model.llm).index(layer)]
        return torch.tensor([b not in skip_rows[i] for b in range(rt.shape[0])])

    _force(monkeypatch, rule)
    gen = greedy_generate(model, prompts, pixels, max_new_tokens=4, eos_id=-1, pad_id=tokenizer.pad_token_id)
    steps = 1 + gen.decode_steps  # the prefill and every decoding step
    for i, layer in zip(model.roe.layer_ids, model.roe.layers(model.llm)):
        rows[i] = layer.calls
        assert layer.calls == steps * (len(QUESTIONS) - len(skip_rows[i]))
        assert layer.skipped == len(skip_rows[i]) and layer.seen == len(QUESTIONS)


def test_predictions_batch_8_equal_batch_1(tokenizer, monkeypatch):
    from moebench.eval.generate import greedy_generate

    model = _model(tokenizer, seed=3)
    add_roe(model, RoEConfig())
    model.roe.ctx.mode = "hard"
    # a content-based rule, independent of the batch: skip when the text routing token's first feature < 0
    _force(monkeypatch, lambda layer, rt: rt[:, 1, 0] >= 0)
    prompts, pixels = _prompts(tokenizer, model)
    kw = dict(max_new_tokens=5, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    batched = greedy_generate(model, prompts, pixels, **kw).tokens
    single = [greedy_generate(model, [p], pixels[i: i + 1], **kw).tokens[0] for i, p in enumerate(prompts)]
    skipped = sum(layer.skipped for layer in model.roe.layers(model.llm))
    assert 0 < skipped < 2 * 2 * len(QUESTIONS)  # some examples skip some layers, not all
    assert batched == single


def _grouped(model, prompts, pixels, batch_size, **kw):
    """Every prompt through GroupedGeneration in prefill batches of `batch_size`: {index: answer}, finished."""
    from moebench.eval.generate import GroupedGeneration

    gen, finished = GroupedGeneration(model, batch_size=batch_size, **kw), []
    for i in range(0, len(prompts), batch_size):
        finished += gen.add(list(range(i, i + batch_size))[: len(prompts) - i], prompts[i: i + batch_size],
                            pixels[i: i + batch_size])
    finished += gen.flush()
    return {f.key: f.tokens for f in finished}, finished, gen


@pytest.mark.parametrize("batch_size", [2, 3])
def test_grouped_decoding_equals_one_at_a_time_and_skips_whole_layers(tokenizer, monkeypatch, batch_size):
    """Decoding batches are formed of one skip pattern where a pool fills, across prefill batches; the
    rest decode together: the answers equal the same model's one prompt at a time, and a layer is
    computed while decoding only for the rows that run it (none, in a batch whose pattern skips it)."""
    from moebench.eval.generate import greedy_generate

    model = _model(tokenizer, seed=3)
    add_roe(model, RoEConfig())
    model.roe.ctx.mode = "hard"
    skip_rows = {1: {0, 3, 5}, 2: {1, 3, 6}}  # layer -> examples that skip it: patterns RR, SR, RS, SS
    prompts, pixels = _prompts(tokenizer, model)
    kw = dict(max_new_tokens=5, eos_id=-1, pad_id=tokenizer.pad_token_id)
    # route by prompt, whatever batch or position it is in: the prefill tells the rule whose prompts run
    order = {tuple(p): i for i, p in enumerate(prompts)}
    current: list[int] = []

    def rule_by_prompt(layer, rt):
        i = model.roe.layer_ids[model.roe.layers(model.llm).index(layer)]
        return torch.tensor([current[b] not in skip_rows[i] for b in range(rt.shape[0])])

    _force(monkeypatch, rule_by_prompt)
    from moebench.eval import generate as generation

    real_prefill = generation._prefill

    def prefill(model_, prompts_, *args):
        current[:] = [order[tuple(p)] for p in prompts_]
        return real_prefill(model_, prompts_, *args)

    monkeypatch.setattr(generation, "_prefill", prefill)
    single = [greedy_generate(model, [p], pixels[i: i + 1], **kw).tokens[0] for i, p in enumerate(prompts)]
    for layer in model.roe.layers(model.llm):
        layer.state.calls = 0
    calls_in_decoding = []
    real_decode = generation._decode

    def decode(model_, nxt, *args, **kwargs):
        layers = model.roe.layers(model.llm)
        before = [layer.calls for layer in layers]
        runners = [nxt.shape[0] if l.state.all_run else 0 if l.state.none_run else len(l.state.run_idx) for l in layers]
        out = real_decode(model_, nxt, *args, **kwargs)
        after = [layer.calls for layer in layers]
        calls_in_decoding.append((nxt.shape[0], [a - b for a, b in zip(after, before)], out.shape[1] - 1, runners))
        return out

    monkeypatch.setattr(generation, "_decode", decode)
    answers, finished, gen = _grouped(model, prompts, pixels, batch_size, **kw)
    assert [answers[i] for i in range(len(prompts))] == single
    assert all(n <= batch_size for n, *_ in calls_in_decoding)  # no forward computes more than a batch
    # a layer is computed for the rows of the batch that run it, at every step, and for no other row
    patterns = [tuple(i not in skip_rows[layer] for layer in (1, 2)) for i in range(len(prompts))]
    for n, calls, steps, runners in calls_in_decoding:
        assert calls == [r * steps for r in runners]
    assert sum(n for n, *_ in calls_in_decoding) == len(prompts) and gen.prefills == -(-len(prompts) // batch_size)
    # pools of one pattern: a batch whose rows all skip a layer, and no more batches than one per pattern
    # beyond what the prompts need
    assert any(r == 0 for *_, runners in calls_in_decoding for r in runners)
    assert len(calls_in_decoding) <= -(-len(prompts) // batch_size) + len(set(patterns))


def test_decoding_after_the_routing_tokens_are_cropped_equals_the_dense_parent(tokenizer, monkeypatch):
    """Nothing skipped: hard mode (routing tokens appended at prefill, then cropped from every KV cache) decodes
    exactly what the dense parent decodes, also when the image features are given precomputed."""
    from moebench.eval.generate import greedy_generate

    model = _model(tokenizer, seed=5)
    prompts, pixels = _prompts(tokenizer, model)
    kw = dict(max_new_tokens=6, eos_id=-1, pad_id=tokenizer.pad_token_id)
    dense = greedy_generate(model, prompts, pixels, **kw).tokens
    add_roe(model, RoEConfig())
    _force(monkeypatch, lambda layer, rt: torch.ones(rt.shape[0], dtype=torch.bool))
    model.roe.ctx.mode = "hard"
    import transformers

    caches = []

    class Recorded(transformers.DynamicCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            caches.append(self)

    monkeypatch.setattr(transformers, "DynamicCache", Recorded)
    routed = greedy_generate(model, prompts, pixels, **kw).tokens
    with torch.no_grad():
        feats = model.image_features(pixels)
    from_features = greedy_generate(model, prompts, None, image_features=feats, **kw).tokens
    assert routed == dense and from_features == dense
    # every example ran every layer: the routable layers wrote to the model's own cache, and the routing
    # tokens are gone from it (prompt length, then 5 fed-back tokens)
    t = len(max(prompts, key=len))
    n_layers = model.llm.config.num_hidden_layers
    assert [caches[-1].get_seq_length(i) for i in range(n_layers)] == [t + 5] * n_layers
    assert all(layer.cache is None for layer in model.roe.layers(model.llm))


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
def test_shortcut_equals_its_definition_with_gradients(tokenizer, mode):
    """The fast shortcut path (fused RMSNorm, addmm) against h + Linear(ReLU(Linear(norm(h)))) by modules."""
    model = _model(tokenizer)
    add_roe(model, RoEConfig())
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model.to(dtype)
    layer = model.roe.layers(model.llm)[0]
    torch.nn.init.normal_(layer.adapter[2].weight, std=0.2)  # not the identity it starts as
    h = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        fast = layer.shortcut(h.clone().requires_grad_())
        hr = h.clone().requires_grad_()
        ref = hr + layer.adapter(layer.layer.input_layernorm(hr))
    bf16 = mode == "bf16"  # addmm rounds once where the modules round twice: one bf16 ulp (outputs up to ~3)
    assert torch.allclose(fast.float(), ref.float(), atol=2e-2 if bf16 else 1e-6)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(ref.dtype)
    w = layer.adapter[0].weight
    (gw_fast,) = torch.autograd.grad(fast, w, g)
    (gw_ref,) = torch.autograd.grad(ref, w, g)
    assert torch.allclose(gw_fast.float(), gw_ref.float(), atol=0.1 if bf16 else 1e-5)  # entries up to ~14


def test_decoder_share_counts_the_time_inside_the_layers():
    """f from the hooks: a model whose layers sleep 20 ms each and whose call sleeps 20 ms outside them has
    f = 2/3 (two layers) within timing noise."""
    import time as _time

    from torch import nn

    from moebench.roe.bench import decoder_share

    class Slow(nn.Module):
        def forward(self, x):
            _time.sleep(0.02)
            return x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = nn.Module()
            self.llm.model = nn.Module()
            self.llm.model.layers = nn.ModuleList([Slow(), Slow()])

    m = M()

    def call():
        _time.sleep(0.02)
        for layer in m.llm.model.layers:
            layer(torch.zeros(1))

    assert decoder_share(m, call, torch.device("cpu")) == pytest.approx(2 / 3, abs=0.08)


def test_grouped_decoding_counts_the_copying_out_of_waiting_rows(tokenizer, monkeypatch):
    """Rows that wait for a decoding batch are copied out of their prefill batch; that time is decoding's
    (GroupedGeneration.decode_s), in full once every waiting row has decoded, so a benchmark leaves none out."""
    from moebench.eval import generate as generation

    model = _model(tokenizer, seed=3)
    add_roe(model, RoEConfig())
    model.roe.ctx.mode = "hard"
    _force(monkeypatch, lambda layer, rt: rt[:, 1, 0] >= 0)  # mixed patterns: rows wait in pools
    prompts, pixels = _prompts(tokenizer, model)
    real_compact, copies = generation._compact, []

    def slow_compact(*args):
        copies.append(args[4])
        time.sleep(0.05)
        return real_compact(*args)

    monkeypatch.setattr(generation, "_compact", slow_compact)
    answers, finished, gen = _grouped(model, prompts, pixels, 3, max_new_tokens=3, eos_id=-1,
                                      pad_id=tokenizer.pad_token_id)
    assert copies and len(answers) == len(prompts)
    assert gen.decode_s >= 0.05 * len(copies)


def test_waiting_rows_are_copied_out_only_when_some_prompts_of_the_batch_finished():
    """`_compact` on a hand-built layout: when every prompt waits it keeps the prefill's tensors (no copy);
    when prompt 0 finished at its first token, the others' rows are copied out and renumbered per layer."""
    from moebench.eval.generate import _compact

    nxt, mask = torch.tensor([5, 6, 7]), torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    k0, v0 = torch.randn(3, 1, 3, 2), torch.randn(3, 1, 3, 2)  # a layer all three ran
    k1, v1 = torch.randn(2, 1, 3, 2), torch.randn(2, 1, 3, 2)  # a layer prompts 0 and 2 ran (rows 0, 1)
    layout = [(k0, v0, [0, 1, 2]), (k1, v1, [0, None, 1]), None]  # the last layer: all three skipped it
    kept = _compact(nxt, mask, positions, layout, [0, 1, 2], 0.1, 3)
    assert kept.nxt is nxt and kept.mask is mask and kept.layout[0][0] is k0 and kept.layout[1][1] is v1
    assert kept.layout[1][2] == [0, None, 1] and kept.layout[2] is None
    rest = _compact(nxt, mask, positions, layout, [1, 2], 0.1, 3)
    assert rest.nxt.tolist() == [6, 7] and rest.mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert rest.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert torch.equal(rest.layout[0][0], k0[1:]) and torch.equal(rest.layout[0][1], v0[1:])
    assert rest.layout[0][2] == [0, 1]  # prompt 1 is row 0 now, prompt 2 row 1
    assert torch.equal(rest.layout[1][0], k1[1:]) and torch.equal(rest.layout[1][1], v1[1:])
    assert rest.layout[1][2] == [None, 0]  # prompt 1 skipped it; prompt 2's row moved from 1 to 0
    assert rest.layout[2] is None and rest.layout[0][0].data_ptr() != k0.data_ptr()
