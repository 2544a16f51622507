"""Model assembly from configs and from local pretrained checkpoints; generation against a naive reference."""

from __future__ import annotations

import pytest
import torch

from moebench.config import LLMConfig, ModelConfig, TokenizerConfig, VisionConfig
from moebench.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    from moebench.models.tokenizer import train_tokenizer

    texts = ["Is there a red circle in the image?", "USER: ASSISTANT: yes no left right", "a small blue star."] * 20
    return train_tokenizer(texts, 300)


def _tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(image_size=16, patch_size=8, hidden_size=32, layers=2, heads=2, intermediate_size=64),
        llm=LLMConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64, max_positions=128),
        tokenizer=TokenizerConfig(vocab_size=300), **kw)


def test_builder_loads_local_pretrained_parts(tmp_path, tokenizer):
    """A tiny CLIP tower and Qwen2 LM saved with save_pretrained are loaded weight-for-weight."""
    from moebench.models.build import build_vlm

    torch.manual_seed(0)
    ref = build_vlm(_tiny_cfg(), tokenizer)
    ref.vision_tower.save_pretrained(tmp_path / "vision")
    ref.llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    cfg = _tiny_cfg()
    cfg.vision.pretrained = str(tmp_path / "vision")
    cfg.llm.pretrained = str(tmp_path / "llm")
    torch.manual_seed(1)  # a different seed: only the loaded weights can make them equal
    got = build_vlm(cfg, tokenizer)
    for part in ("vision_tower", "llm"):
        a, b = getattr(ref, part).state_dict(), getattr(got, part).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_missing_pretrained_dir_is_a_user_error(tmp_path, tokenizer):
    from moebench.models.build import build_vlm

    cfg = _tiny_cfg()
    cfg.llm.pretrained = str(tmp_path / "absent")
    with pytest.raises(UserError, match="model.llm.pretrained"):
        build_vlm(cfg, tokenizer)


def test_save_load_roundtrip_and_mismatch(tmp_path, tokenizer):
    from moebench.models.build import build_vlm
    from moebench.models.checkpoint import load_vlm, save_vlm

    cfg = _tiny_cfg()
    model = build_vlm(cfg, tokenizer)
    save_vlm(model, cfg, tokenizer, tmp_path / "m")
    loaded, tok, _ = load_vlm(tmp_path / "m", expect=cfg)
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _tiny_cfg()
    other.llm.layers = 3
    with pytest.raises(UserError, match="does not match the recipe: model.llm.layers"):
        load_vlm(tmp_path / "m", expect=other)


def _naive_greedy(model, ids: list[int], pixels, steps: int, eos: int) -> list[int]:
    """Reference decoding: no cache, no padding, the whole sequence recomputed every step."""
    out = []
    seq = torch.tensor([ids])
    for _ in range(steps):
        logits = model(seq, torch.ones_like(seq), pixels).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def test_batched_cached_greedy_matches_naive_reference(tokenizer):
    from moebench.data.conversations import Encoder
    from moebench.eval.generate import greedy_generate
    from moebench.models.build import build_vlm

    torch.manual_seed(0)
    model = build_vlm(_tiny_cfg(), tokenizer).eval()
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    questions = ["Is there a red circle?", "What color is the star in the image?", "left?"]
    prompts = [enc.prompt(q) for q in questions]
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding matters
    pixels = torch.randn(3, 3, 16, 16)
    eos = tokenizer.eos_token_id
    gen = greedy_generate(model, prompts, pixels, max_new_tokens=6, eos_id=eos, pad_id=tokenizer.pad_token_id)
    for i, p in enumerate(prompts):
        assert gen.tokens[i] == _naive_greedy(model, p, pixels[i: i + 1], 6, eos)
    # prompts about one image share its row of pixels: the tower runs once per distinct image, same answers
    index, seen = torch.tensor([1, 0, 1]), []
    hook = model.vision_tower.register_forward_hook(lambda m, args, kw, out: seen.append(len(kw["pixel_values"])),
                                                    with_kwargs=True)
    shared = greedy_generate(model, prompts, pixels[:2], max_new_tokens=6, eos_id=eos, pad_id=tokenizer.pad_token_id,
                             image_index=index)
    hook.remove()
    assert seen == [2]
    for i, p in enumerate(prompts):
        assert shared.tokens[i] == _naive_greedy(model, p, pixels[index[i]][None], 6, eos)


def test_image_tokens_receive_projected_features(tokenizer):
    from moebench.data.conversations import Encoder
    from moebench.models.build import build_vlm

    model = build_vlm(_tiny_cfg(), tokenizer).eval()
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    ids = torch.tensor([enc.prompt("Is there a star?")])
    pixels = torch.randn(1, 3, 16, 16)
    emb = model.embed(ids, pixels)
    mask = ids[0] == model.image_token_id
    assert int(mask.sum()) == model.num_image_tokens == 4
    assert torch.allclose(emb[0, mask], model.image_features(pixels)[0])
    with pytest.raises(UserError, match="image placeholder"):
        model.embed(torch.cat([ids, ids[:, -3:]], 1), torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("family", ["qwen2", "llama", "stablelm"])
def test_logits_at_read_positions_match_the_full_model(tokenizer, family):
    """Training's `logits_to_keep` (the supervised positions) gives the full model's loss and gradients,
    and a left-padded prefill into a KV cache reading only the last position gives the uncached logits
    and the same cache as a full prefill."""
    from moebench.data.conversations import Encoder, collate
    from moebench.models.build import build_vlm
    from moebench.models.vlm import lm_loss, supervised_positions

    torch.manual_seed(0)
    cfg = _tiny_cfg()
    cfg.llm.family = family
    model = build_vlm(cfg, tokenizer).train()
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id)
    turns = [[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]
             for q, a in [("Is there a red circle?", "yes"), ("What color is the star in the image?", "small blue star"),
                          ("left?", "no")]]
    pixels = torch.randn(3, 3, 16, 16)
    batch = collate([{"input_ids": torch.tensor(i), "labels": torch.tensor(lab), "caption_ids": torch.tensor([0]),
                      "pixel_values": pixels[k]}
                     for k, (i, lab) in enumerate(enc.conversation(t, "chat") for t in turns)],
                    tokenizer.pad_token_id)  # right padding

    def loss_and_grads(**kw):
        model.zero_grad()
        out = model(batch["input_ids"], batch["attention_mask"], pixels, **kw)
        loss = lm_loss(out.logits, batch["labels"], kw.get("logits_to_keep"))
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = loss_and_grads()
    keep = supervised_positions(batch["labels"])
    assert 0 < len(keep) < batch["input_ids"].shape[1] - 1
    got, grads = loss_and_grads(logits_to_keep=keep)
    torch.testing.assert_close(got, full)
    assert full_grads.keys() == grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)

    model.eval()  # a left-padded prefill into a KV cache, reading the last position only
    from transformers import DynamicCache

    ids, mask = batch["input_ids"], batch["attention_mask"]
    order = torch.argsort(mask, dim=1, stable=True)  # padding moved to the left
    ids, mask = ids.gather(1, order), mask.gather(1, order)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, mask, pixels, positions).logits[:, -1]
        cache = DynamicCache(config=model.llm.config)
        out = model(ids, mask, pixels, positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        full_cache = DynamicCache(config=model.llm.config)
        model(ids, mask, pixels, positions, cache=full_cache, use_cache=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == ids.shape[1]
    for (k, v), (k2, v2) in zip(cache_layers(cache), cache_layers(full_cache)):
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)


def cache_layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_gradient_checkpointing_trains_the_same_steps(tmp_path):
    """`gradient_checkpointing: true` recomputes the layers in backward (transformers' switch): the same
    losses step by step as keeping the activations, for the dense stages and an MoE stage."""
    from conftest import REPO, TINY
    from moebench import results
    from moebench.config import load_recipe
    from moebench.train.pipeline import train

    losses = {}
    for on in (False, True):
        recipe = load_recipe(REPO / "recipes" / "shapes_moe.yaml",
                             [*TINY, "stages.moe.max_steps=3", "stages.moe.batch_size=8", "stages.moe.log_every=1",
                              f"gradient_checkpointing={str(on).lower()}"])
        train(recipe, runs_dir=tmp_path / f"runs{on}", results_dir=tmp_path / f"res{on}", progress=False)
        rows = results.read_rows([tmp_path / f"res{on}"], "train")
        losses[on] = sorted((r["stage"], r["step"], r["loss"]) for r in rows)
    assert [x[:2] for x in losses[True]] == [x[:2] for x in losses[False]]
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(losses[True], losses[False]))
    assert {x[0] for x in losses[True]} == {"clip", "pretrain", "finetune", "moe"}


def test_bf16_weights_train_in_bf16_and_evaluate(tmp_path):
    """`precision: bf16_weights` trains the model itself in bf16 (its checkpoint holds bf16 tensors) and the
    run evaluates as usual; the stage keys differ from fp32's, so no cached fp32 stage is reused."""
    from safetensors import safe_open

    from conftest import REPO, TINY
    from moebench.config import load_recipe, stage_key
    from moebench.eval.runner import evaluate_run
    from moebench.train.pipeline import train

    recipe = load_recipe(REPO / "recipes" / "shapes_dense.yaml", [*TINY, "precision=bf16_weights"])
    assert stage_key(recipe, 0, "h") != stage_key(load_recipe(REPO / "recipes" / "shapes_dense.yaml", TINY), 0, "h")
    run = train(recipe, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res", progress=False)
    with safe_open(str(run.dir / "model" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    rows = evaluate_run(run, ["gqa"], data=None, batch_size=4, limit=4, results_dir=tmp_path / "res", progress=False)
    assert rows and all(0 <= r["value"] <= 1 for r in rows)
