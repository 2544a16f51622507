"""Checkpoints in and out: a run exported to transformers' Llava (dense; MoE as Qwen2-MoE) computes the
same logits in transformers' own classes, converts back to a run with the same logits, evaluates
through `moebench eval --model PATH`, and checkpoints that do not match fail with one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, run_cli

NO_NORM = ["model.vision.feature_norm=false"]  # Llava reads the tower's states without its final LayerNorm


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny dense run and an MoE run (gated shared expert) of the shapes world, trained a few steps."""
    from moebench.config import load_recipe
    from moebench.train.pipeline import train

    base = tmp_path_factory.mktemp("interop")
    dense = train(load_recipe(REPO / "recipes" / "shapes_dense.yaml", [*TINY, *NO_NORM]),
                  runs_dir=base / "runs", results_dir=base / "res", progress=False)
    moe = train(load_recipe(REPO / "recipes" / "shapes_moe.yaml", [
        *TINY, *NO_NORM, "stages.moe.max_steps=2", "stages.moe.batch_size=8", "moe.shared_expert=gated"]),
        runs_dir=base / "runs", results_dir=base / "res", progress=False)
    mixtral = train(load_recipe(REPO / "recipes" / "shapes_moe.yaml", [
        *TINY, *NO_NORM, "stages.moe.max_steps=2", "stages.moe.batch_size=8", "model.llm.family=llama",
        "moe.layers=all"]), runs_dir=base / "runs", results_dir=base / "res", progress=False)
    return {"dense": dense, "moe": moe, "mixtral": mixtral, "base": base}


def _inputs(model, tokenizer, recipe):
    from moebench.data.conversations import Encoder

    torch.manual_seed(0)
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system)
    ids = torch.tensor([enc.prompt("Is there a red circle in the image?")])
    size = model.vision_tower.config.image_size
    return ids, torch.ones_like(ids), torch.randn(1, 3, size, size)


@torch.no_grad()
def _ours(run):
    model, tokenizer = run.load_model("cpu")
    ids, mask, pixels = _inputs(model, tokenizer, run.recipe)
    return model(ids, mask, pixels).logits, (ids, mask, pixels)


@pytest.mark.parametrize("kind", ["dense", "moe", "mixtral"])
def test_export_then_transformers_then_convert_keeps_the_logits(runs, kind, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from moebench.interop.convert import convert
    from moebench.models.params import count_params

    run = runs[kind]
    want, (ids, mask, pixels) = _ours(run)
    code, _, err = run_cli(["export", run.dir, tmp_path / "hf"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == {"dense": "qwen2", "moe": "qwen2_moe", "mixtral": "mixtral"}[kind]
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (got - want).abs().max() < 1e-5

    back = convert(tmp_path / "hf", tmp_path / "back")
    assert back.recipe.variant == ("dense" if kind == "dense" else "moe")
    model, _ = back.load_model("cpu")
    with torch.no_grad():
        again = model(ids, mask, pixels).logits
    assert (again - want).abs().max() < 1e-5
    original, _ = run.load_model("cpu")
    assert count_params(model)["activated"] == count_params(original)["activated"]


def test_eval_takes_a_llava_hf_directory_and_counts_k_of_e_experts(runs, tmp_path, capsys):
    """`moebench eval --model HF_DIR` converts once (runs/.converted/) and writes ordinary MoE rows."""
    from moebench import results
    from moebench.data.sources import resolve

    run = runs["moe"]
    assert run_cli(["export", run.dir, tmp_path / "hf"], capsys)[0] == 0
    root = resolve("shapes", run.recipe.data.world, progress=False).root
    args = ["eval", "--model", tmp_path / "hf", "--tasks", "gqa", "--limit", "8", "--data", root,
            "--runs", tmp_path / "runs", "--results", tmp_path / "res", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    (converted,) = (tmp_path / "runs" / ".converted").iterdir()
    rows = results.read_rows([tmp_path / "res"], "metrics")
    assert rows and all(r["variant"] == "moe" for r in rows)
    r = rows[0]
    m = run.recipe.moe  # 4 experts, top-2, layers 0 of 2 (every_other) with a gated shared expert
    assert m.num_experts == 4 and m.top_k == 2
    detail = json.loads(r["params_detail"])
    assert r["params_total"] - r["params_activated"] > 0 and detail["llm"] > detail["llm_activated"]
    assert sorted(json.loads(r["extra"])["expert_load"]) == ["0"]
    assert run_cli(args, capsys)[0] == 0  # the second time reuses the conversion
    assert list((tmp_path / "runs" / ".converted").iterdir()) == [converted]


def test_export_refuses_what_llava_cannot_express(tiny_run, capsys, tmp_path):
    run, _ = tiny_run  # the shipped recipes' feature_norm: true
    code, _, err = run_cli(["export", run.dir, tmp_path / "hf"], capsys)
    assert code == 2 and "feature_norm=true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_checkpoints_that_do_not_match_fail_with_one_line(runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from moebench.config import load_recipe

    run = runs["dense"]
    assert run_cli(["export", run.dir, tmp_path / "hf"], capsys)[0] == 0
    # a tensor missing from the weights
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    dropped = sorted(k for k in state if "multi_modal_projector.linear_2.weight" in k)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / "hf" / "model.safetensors"),
              metadata={"format": "pt"})
    code, _, err = run_cli(["convert", tmp_path / "hf", tmp_path / "out"], capsys)
    assert code == 2 and "projector.2.weight" in err and len(err.strip().splitlines()) == 1
    # a tensor of another shape
    state[dropped] = state[dropped][:, :-1].contiguous()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(["convert", tmp_path / "hf", tmp_path / "out"], capsys)
    assert code == 2 and "has shape" in err and len(err.strip().splitlines()) == 1
    # a vision tower pointed at a whole llava-hf checkpoint: its weights are not a CLIPVisionModel's
    recipe = REPO / "recipes" / "shapes_dense.yaml"
    load_recipe(recipe, TINY)
    code, _, err = run_cli(["train", recipe, *TINY, f"model.vision.pretrained={tmp_path / 'hf'}",
                            "--runs", tmp_path / "r", "--results", tmp_path / "res", "--no-progress"], capsys)
    assert code == 2 and "does not hold a CLIPVisionModel's weights" in err, err
    assert len(err.strip().splitlines()) == 1
    # a directory of no known layout
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    code, _, err = run_cli(["eval", "--model", tmp_path / "other", "--tasks", "gqa"], capsys)
    assert code == 2 and "model_type 'bert'" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- MoE-LLaVA releases
class DeepSpeedTop2(torch.nn.Module):
    """The reference: an MoE layer as MoE-LLaVA runs it at evaluation, written from DeepSpeed's
    `top2gating` (drop_tokens, eval_capacity_factor, min_capacity; the second expert without its Gumbel
    sampling) and MoE-LLaVA's experts (the LM's SwiGLU MLP, copied)."""

    def __init__(self, wg: torch.Tensor, experts: list[dict], capacity_factor: float, min_capacity: int):
        super().__init__()
        self.wg, self.experts, self.cf, self.min_capacity = wg, experts, capacity_factor, min_capacity

    def forward(self, x):
        import math

        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (S, d): DeepSpeed routes every token of the batch together
        logits = x.float() @ self.wg.float().t()
        gates = logits.softmax(1)
        s, e = gates.shape
        idx1 = gates.argmax(1)
        mask1 = torch.nn.functional.one_hot(idx1, e)
        idx2 = logits.masked_fill(mask1.bool(), float("-inf")).argmax(1)
        mask2 = torch.nn.functional.one_hot(idx2, e)
        loc1 = mask1.cumsum(0) - 1
        loc2 = mask2.cumsum(0) - 1 + mask1.sum(0, keepdim=True)
        capacity = max(math.ceil(s / e * self.cf * 2), self.min_capacity)
        mask1, mask2 = mask1 * (loc1 < capacity), mask2 * (loc2 < capacity)
        g1, g2 = (gates * mask1).sum(1), (gates * mask2).sum(1)
        denom = (g1 + g2).clamp(min=torch.finfo(g1.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        out = torch.zeros_like(x)
        for t in range(s):
            for g, idx in ((g1[t], idx1[t]), (g2[t], idx2[t])):
                if g > 0:
                    out[t] += g * _expert(self.experts[int(idx)], x[t])
        return out.view(shape)


def _expert(w: dict, x: torch.Tensor) -> torch.Tensor:
    """One MoE-LLaVA expert, a copy of its LM's MLP: SwiGLU (StableLM) or fc1 / gelu_new / fc2 (Phi-2)."""
    from transformers.activations import ACT2FN

    if "gate_proj.weight" in w:
        h = torch.nn.functional.silu(x @ w["gate_proj.weight"].t()) * (x @ w["up_proj.weight"].t())
        return h @ w["down_proj.weight"].t()
    if "w1.weight" in w:  # Qwen (v1): c_proj(w1(x) * silu(w2(x)))
        return ((x @ w["w1.weight"].t()) * torch.nn.functional.silu(x @ w["w2.weight"].t())) @ w["c_proj.weight"].t()
    h = ACT2FN["gelu_new"](x @ w["fc1.weight"].t() + w["fc1.bias"])
    return h @ w["fc2.weight"].t() + w["fc2.bias"]


class QwenV1Reference(torch.nn.Module):
    """Qwen (v1) as MoE-LLaVA-Qwen's modeling_qwen.py computes it for prompts shorter than its seq_length
    (no dynamic NTK, no logn scaling): RMSNorm, fused c_attn with bias, rotary on the whole head
    (rotate-half), causal softmax attention, c_proj without bias; MoE layers in place of the MLP."""

    def __init__(self, w: dict, layers: int, heads: int, eps: float, base: float, mlps: list):
        super().__init__()
        self.w, self.layers, self.heads, self.eps, self.base, self.mlps = w, layers, heads, eps, base, mlps

    def norm(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def get_input_embeddings(self):
        return lambda ids: self.w["transformer.wte.weight"][ids]

    def forward(self, inputs_embeds):
        h = inputs_embeds
        b, t, d = h.shape
        hd = d // self.heads
        inv = 1.0 / (self.base ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(t).float(), inv)
        cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

        def rope(x):  # (b, heads, t, hd)
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], -1) * sin

        for i in range(self.layers):
            p = f"transformer.h.{i}."
            x = self.norm(h, self.w[p + "ln_1.weight"])
            qkv = x @ self.w[p + "attn.c_attn.weight"].t() + self.w[p + "attn.c_attn.bias"]
            q, k, v = (z.view(b, t, self.heads, hd).transpose(1, 2) for z in qkv.chunk(3, -1))
            scores = rope(q) @ rope(k).transpose(-1, -2) / hd ** 0.5
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
            h = h + a @ self.w[p + "attn.c_proj.weight"].t()
            h = h + self.mlps[i](self.norm(h, self.w[p + "ln_2.weight"]))
        return type("Out", (), {"logits": self.norm(h, self.w["transformer.ln_f.weight"]) @ self.w["lm_head.weight"].t()})


def _moe_llava_release(tmp_path, family="stablelm", eval_capacity_factor=0.5):
    """A tiny MoE-LLaVA-StableLM release: config.json as MoE-LLaVA writes it (StableLM-epoch fields, mm_*
    keys, the `moe` block), DeepSpeed expert and gate tensors, no vision tower weights (the config names
    a CLIP directory), a tokenizer with <image>. Returns (dir, reference parts)."""
    from safetensors.torch import save_file
    from transformers import (CLIPVisionConfig, CLIPVisionModel, PhiConfig, PhiForCausalLM, StableLmConfig,
                              StableLmForCausalLM)

    from moebench.models.tokenizer import train_tokenizer

    torch.manual_seed(0)
    clip_dir, ckpt = tmp_path / "clip", tmp_path / f"MoE-LLaVA-{family}-tiny-4e"
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8)).eval()
    clip.save_pretrained(clip_dir)
    tok = train_tokenizer(["Is there a red circle in the image? yes no", "USER: ASSISTANT:"], 300)
    tok.save_pretrained(ckpt)
    sizes = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, partial_rotary_factor=0.25, max_position_embeddings=256, layer_norm_eps=1e-5,
                 tie_word_embeddings=False)
    if family == "stablelm":
        lm = StableLmForCausalLM(StableLmConfig(**sizes, use_qkv_bias=True)).eval()
        shapes = {"gate_proj.weight": (64, 32), "up_proj.weight": (64, 32), "down_proj.weight": (32, 64)}
    elif family == "qwen":
        lm = None
        shapes = {"w1.weight": (64, 32), "w2.weight": (64, 32), "c_proj.weight": (32, 64)}
    else:
        lm = PhiForCausalLM(PhiConfig(**sizes, hidden_act="gelu_new")).eval()
        shapes = {"fc1.weight": (64, 32), "fc1.bias": (64,), "fc2.weight": (32, 64), "fc2.bias": (32,)}
    if lm is not None:
        state, prefix = {k: v for k, v in lm.state_dict().items() if ".mlp." not in k}, "model.layers"
    else:  # Qwen (v1) names: transformer.wte / h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2} / ln_f
        prefix, r = "transformer.h", lambda *shape: torch.randn(*shape) * 0.2
        state = {"transformer.wte.weight": r(len(tok), 32), "transformer.ln_f.weight": 1 + r(32),
                 "lm_head.weight": r(len(tok), 32)}
        for i in range(2):
            state.update({f"transformer.h.{i}.ln_1.weight": 1 + r(32), f"transformer.h.{i}.ln_2.weight": 1 + r(32),
                          f"transformer.h.{i}.attn.c_attn.weight": r(96, 32), f"transformer.h.{i}.attn.c_attn.bias": r(96),
                          f"transformer.h.{i}.attn.c_proj.weight": r(32, 32)})
    experts, gates = {}, {}
    for i in range(2):
        experts[i] = [{p: torch.randn(shape) * 0.2 for p, shape in shapes.items()} for _ in range(4)]
        gates[i] = torch.randn(4, 32)
        state[f"{prefix}.{i}.mlp.deepspeed_moe.gate.wg.weight"] = gates[i]
        for e, w in enumerate(experts[i]):
            for p, t in w.items():
                state[f"{prefix}.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{p}"] = t
    proj = {"0.weight": torch.randn(32, 32) * 0.2, "0.bias": torch.randn(32) * 0.1,
            "2.weight": torch.randn(32, 32) * 0.2, "2.bias": torch.randn(32) * 0.1}
    owner = "transformer" if family == "qwen" else "model"
    state.update({f"{owner}.mm_projector.image_spatial_proj.{k}": v for k, v in proj.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    if family == "stablelm":  # StableLM-epoch's config names, as MoE-LLaVA-StableLM writes them
        lm_fields = {"model_type": "moe_llava_stablelm", "architectures": ["MoELLaVAStablelmForCausalLM"],
                     "hidden_act": "silu", "rope_pct": 0.25, "rope_theta": 10000, "norm_eps": 1e-5,
                     "use_qkv_bias": True}
    elif family == "qwen":  # Qwen (v1) config names, as MoE-LLaVA-Qwen writes them
        lm_fields = {"model_type": "moe_llava_qwen", "architectures": ["MoELLaVAQWenForCausalLM"],
                     "intermediate_size": 128, "kv_channels": 16, "layer_norm_epsilon": 1e-6, "rotary_pct": 1.0,
                     "rotary_emb_base": 10000, "no_bias": True, "seq_length": 8192, "use_dynamic_ntk": True,
                     "use_logn_attn": True}
    else:  # transformers' Phi config names, as MoE-LLaVA-Phi writes them
        lm_fields = {"model_type": "moe_llava_phi", "architectures": ["MoELLaVAPhiForCausalLM"],
                     "hidden_act": "gelu_new", "partial_rotary_factor": 0.25, "rope_theta": 10000,
                     "layer_norm_eps": 1e-5, "qk_layernorm": False}
    config = {"intermediate_size": 64, **lm_fields, "vocab_size": len(tok), "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "mm_image_tower": str(clip_dir),
              "mm_hidden_size": 32,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad",
              "moe": {"moe_enable": True, "moe_mode": "sparse", "num_experts": [4, 4], "moe_layers_idx": [0, 1],
                      "top_k_experts": 2, "capacity_factor": 1.5, "eval_capacity_factor": eval_capacity_factor,
                      "min_capacity": 0, "use_residual": False, "router_aux_loss_coef": 0.01, "ep_size": 1}}
    (ckpt / "config.json").write_text(json.dumps(config))
    mlps = [DeepSpeedTop2(gates[i], experts[i], eval_capacity_factor, 0) for i in range(2)]
    if lm is None:
        lm = QwenV1Reference(state, 2, 2, 1e-6, 10000.0, mlps)
    else:
        for i in range(2):
            lm.model.layers[i].mlp = mlps[i]
    return ckpt, {"clip": clip, "lm": lm, "proj": proj}


@torch.no_grad()
def _reference_logits(ref, ids, image_token_id, pixels):
    """MoE-LLaVA's forward: CLIP layer -2 without its class token, the mm_projector, the features in place
    of the image tokens, the StableLM decoder with DeepSpeed MoE layers."""
    feats = ref["clip"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    p = ref["proj"]
    feats = torch.nn.functional.gelu(feats @ p["0.weight"].t() + p["0.bias"]) @ p["2.weight"].t() + p["2.bias"]
    embeds = ref["lm"].get_input_embeddings()(ids)
    embeds[ids == image_token_id] = feats.reshape(-1, feats.shape[-1])
    return ref["lm"](inputs_embeds=embeds).logits


@pytest.mark.parametrize("family", ["stablelm", "phi", "qwen"])
def test_moe_llava_release_matches_deepspeed_gating_and_evaluates(tmp_path, capsys, family):
    """Converted, a MoE-LLaVA release computes MoE-LLaVA's logits within 1e-5 with capacity dropping
    tokens (eval_capacity_factor 0.5): DeepSpeed renormalises over the experts kept, and so does the
    converted model (moe.renormalize_kept); moebench's own rule would differ. `moebench eval --model` on
    the release directory writes MoE rows (2 of 4 experts active)."""
    from moebench import results
    from moebench.data.sources import resolve
    from moebench.interop.convert import convert
    from moebench.models.params import count_params
    from moebench.moe.upcycle import moe_blocks

    ckpt, ref = _moe_llava_release(tmp_path, family)
    run = convert(ckpt, tmp_path / "converted")
    assert run.recipe.variant == "moe" and run.recipe.moe.renormalize_kept and run.meta["layout"] == "moe-llava"
    model, tokenizer = run.load_model("cpu")
    ids, mask, pixels = _inputs(model, tokenizer, run.recipe)
    with torch.no_grad():
        ours = model(ids, mask, pixels).logits
    want = _reference_logits(ref, ids, model.image_token_id, pixels)
    dropped = [b.last.kept.logical_not().sum().item() for _, b in moe_blocks(model)]
    assert sum(dropped) > 0  # capacity dropped some choices, so the rule matters
    assert (ours - want).abs().max() < 1e-5
    for _, b in moe_blocks(model):
        b.renormalize_kept = False
    with torch.no_grad():
        assert (model(ids, mask, pixels).logits - want).abs().max() > 1e-3
    p = count_params(model)
    assert p["activated"] < p["total"]

    world = resolve("shapes", run.recipe.data.world.__class__(image_size=32, grid=4, n_train=200, n_val=900),
                    progress=False).root
    args = ["eval", "--model", ckpt, "--tasks", "gqa", "--limit", "4", "--data", world, "--batch-size", "1",
            "--runs", tmp_path / "runs", "--results", tmp_path / "res", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    rows = results.read_rows([tmp_path / "res"], "metrics")
    assert rows and all(r["variant"] == "moe" for r in rows)
    assert sorted(json.loads(rows[0]["extra"])["expert_load"]) == ["0", "1"]
    assert rows[0]["params_activated"] == p["activated"]


def test_original_llava_1_5_release_matches_transformers_llava(tmp_path, capsys):
    """An original LLaVA-1.5 release (model_type llava_llama, `model.mm_projector.{0,2}`, the CLIP tower
    under `model.vision_tower.vision_tower.`) converts to the logits transformers' Llava computes from
    the same weights."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from moebench.interop.convert import convert
    from moebench.models.tokenizer import train_tokenizer

    torch.manual_seed(0)
    ckpt, clip_dir = tmp_path / "llava-v1.5-tiny", tmp_path / "clip"
    tok = train_tokenizer(["Is there a red circle in the image? yes no", "USER: ASSISTANT:"], 300)
    tok.save_pretrained(ckpt)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8)
    tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    hf = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(), image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default")).eval()
    for p in hf.parameters():  # a trained-looking spread, so that a misplaced tensor shows
        torch.nn.init.normal_(p, std=0.2)
    hf.model.vision_tower.save_pretrained(clip_dir)
    state = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.vision_tower."):
            state["model.vision_tower.vision_tower." + k[len("model.vision_tower."):]] = v
        elif k.startswith("model.multi_modal_projector.linear_"):
            i, rest = k[len("model.multi_modal_projector.linear_"):].split(".", 1)
            state[f"model.mm_projector.{0 if i == '1' else 2}.{rest}"] = v
        elif k.startswith("model.language_model."):
            state["model." + k[len("model.language_model."):]] = v
        else:
            state[k] = v
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    config = {**{k: v for k, v in tcfg.to_dict().items() if k not in ("model_type", "architectures")},
              "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": "openai/clip-vit-large-patch14-336",
              "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False}
    (ckpt / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(["eval", "--model", ckpt, "--tasks", "gqa", "--runs", tmp_path / "r"], capsys)
    assert code == 2 and "--vision-tower DIR" in err  # the tower it names is a hub id, not a local directory
    run = convert(ckpt, tmp_path / "converted", vision_tower=clip_dir)
    assert run.recipe.variant == "dense" and run.meta["layout"] == "llava-original"
    assert run.recipe.model.vision.aspect == "pad" and run.recipe.model.vision.feature_layer == -2
    model, tokenizer = run.load_model("cpu")
    ids, mask, pixels = _inputs(model, tokenizer, run.recipe)
    with torch.no_grad():
        assert (model(ids, mask, pixels).logits - hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
                ).abs().max() < 1e-5
    from moebench.models.params import count_params

    _eval_rows_count(tmp_path / "converted", count_params(model), capsys, tmp_path)


@pytest.mark.parametrize("text_model", ["mixtral", "qwen3_moe", "olmoe"])
def test_llava_hf_with_a_native_moe_text_model_matches_transformers(tmp_path, text_model, capsys):
    """A llava-hf checkpoint whose LM is a transformers MoE LM (Mixtral: every layer sparse; Qwen3-MoE with
    a dense layer and normalised top-k; OLMoE: top-k not normalised) converts to moebench MoE blocks with
    transformers' logits, and counts 2 of 4 experts as active."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MixtralConfig,
                              OlmoeConfig, Qwen3MoeConfig)

    from moebench.interop.convert import convert
    from moebench.models.params import count_params
    from moebench.models.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["Is there a red circle in the image? yes no", "USER: ASSISTANT:"], 300)
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, patch_size=8)
    sizes = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, num_experts_per_tok=2, max_position_embeddings=256)
    t = {"mixtral": lambda: MixtralConfig(**sizes, intermediate_size=48, num_local_experts=4),
         "qwen3_moe": lambda: Qwen3MoeConfig(**sizes, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                             mlp_only_layers=[0], norm_topk_prob=True),
         "olmoe": lambda: OlmoeConfig(**sizes, intermediate_size=40, num_experts=4, norm_topk_prob=False)}[text_model]()
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=v.to_dict(), text_config=t.to_dict(),
                                                   image_token_index=tok.convert_tokens_to_ids("<image>"))).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    run = convert(tmp_path / "hf", tmp_path / "run")
    sparse = [1] if text_model == "qwen3_moe" else [0, 1]
    assert run.recipe.variant == "moe" and run.recipe.moe.layers == sparse
    assert run.recipe.model.llm.family == ("llama" if text_model == "mixtral" else text_model)
    model, tokenizer = run.load_model("cpu")
    ids, mask, pixels = _inputs(model, tokenizer, run.recipe)
    with torch.no_grad():
        assert (model(ids, mask, pixels).logits - hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
                ).abs().max() < 1e-5
    p = count_params(model)
    experts = sum(model.llm.model.layers[i].mlp.experts.gate_up_proj.numel()
                  + model.llm.model.layers[i].mlp.experts.down_proj.numel() for i in sparse)
    assert p["total"] - p["activated"] == experts // 2  # 2 of 4 experts per token
    _eval_rows_count(tmp_path / "hf", p, capsys, tmp_path)


def _eval_rows_count(path, params, capsys, tmp_path):
    """`moebench eval --model PATH` writes rows with these parameter counts and an expert load."""
    from moebench import results
    from moebench.config import WorldConfig
    from moebench.data.sources import resolve

    root = resolve("shapes", WorldConfig(image_size=32, grid=4, n_train=200, n_val=900), progress=False).root
    code, _, err = run_cli(["eval", "--model", path, "--tasks", "gqa", "--limit", "2", "--data", root,
                            "--runs", tmp_path / "runs", "--results", tmp_path / "res", "--no-progress"], capsys)
    assert code == 0, err
    (row,) = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["metric"] == "exact_match"
              and not r["group"]]
    assert (row["params_total"], row["params_activated"]) == (params["total"], params["activated"])
    if params["activated"] < params["total"]:
        assert row["variant"] == "moe" and json.loads(row["extra"])["expert_load"]


def _tiny_qwen3_vl_moe(out):
    """A tiny Qwen3-VL-MoE checkpoint with its processor (image processor, tokenizer with the vision
    tokens, a chat template), as `save_pretrained` writes a real one."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration,
                              Qwen3VLProcessor)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from moebench.models.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["Is there a red circle in the image? yes no", "user assistant"], 300)
    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens({"additional_special_tokens": vision})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    images = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                   max_pixels=64 * 64, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=images, tokenizer=tok, chat_template=template,
                                 video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2))
    ids = {t: tok.convert_tokens_to_ids(t) for t in vision}
    config = Qwen3VLMoeConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                         num_experts_per_tok=2, max_position_embeddings=512,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model


def test_eval_takes_a_native_qwen3_vl_moe_checkpoint_as_it_is(tmp_path, capsys):
    """`moebench eval --model` on a Qwen3-VL-MoE directory runs transformers' own model with its processor
    and chat template and writes the rows a moebench run gets: MoE, 2 of 4 experts active, expert load per
    sparse layer, TTFT / TPOT; its answers are the model's own greedy generations."""
    from PIL import Image
    from transformers import AutoProcessor

    from moebench import results
    from moebench.data.sources import resolve
    from moebench.config import WorldConfig
    from moebench.eval.tasks import load_samples, load_task

    model = _tiny_qwen3_vl_moe(tmp_path / "Qwen3-VL-tiny-A1B")
    root = resolve("shapes", WorldConfig(image_size=32, grid=4, n_train=200, n_val=900), progress=False).root
    args = ["eval", "--model", tmp_path / "Qwen3-VL-tiny-A1B", "--tasks", "gqa", "--limit", "4", "--batch-size", "2",
            "--data", root, "--results", tmp_path / "res", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    (row,) = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["metric"] == "exact_match"
              and not r["group"]]
    experts = sum(layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
                  for layer in model.model.language_model.layers)
    assert row["variant"] == "moe" and row["params_total"] - row["params_activated"] == experts // 2
    assert row["params_total"] == sum(p.numel() for p in model.parameters())
    load = json.loads(row["extra"])["expert_load"]
    assert sorted(load) == ["0", "1"] and all(abs(sum(v) - 1) < 1e-9 for v in load.values())
    assert row["ttft_ms"] > 0 and row["tpot_ms"] > 0 and row["n"] == 4 and row["protocol"] == "llava"
    # the samples table holds the model's own greedy answers
    processor = AutoProcessor.from_pretrained(tmp_path / "Qwen3-VL-tiny-A1B")
    processor.tokenizer.padding_side = "left"
    s = load_samples(load_task("gqa"), root, 1)[0]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                           "text": s.question + load_task("gqa").prompt_suffix}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[Image.open(s.image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    samples = {r["question_id"]: r for r in results.read_rows([tmp_path / "res"], "samples")}
    assert samples[s.question_id]["prediction"] == processor.tokenizer.decode(want, skip_special_tokens=True).strip()
    code, _, err = run_cli(["convert", tmp_path / "Qwen3-VL-tiny-A1B", tmp_path / "x"], capsys)
    assert code == 2 and "evaluates as it is" in err


def test_eval_takes_a_native_aria_checkpoint_as_it_is(tmp_path, capsys):
    """Aria (an MoE VLM whose router is named `router` and whose shared experts always run) through the same
    path: 2 of 4 routed experts counted as active, the shared experts in full."""
    from transformers import (AriaConfig, AriaForConditionalGeneration, AriaImageProcessor, AriaProcessor,
                              PreTrainedTokenizerFast)

    from moebench import results
    from moebench.config import WorldConfig
    from moebench.data.sources import resolve
    from moebench.models.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["Is there a red circle in the image? yes no", "user assistant"], 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|img|>", "<|im_start|>", "<|im_end|>"]})
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>", extra_special_tokens={"image_token": "<|img|>"})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
                "'image' %}<|img|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = AriaProcessor(image_processor=AriaImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3),
                              tokenizer=tok, chat_template=template, size_conversion={490: 8, 980: 8})
    config = AriaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=490, patch_size=14),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, moe_num_experts=4,
                         moe_topk=2, moe_num_shared_experts=1, max_position_embeddings=1024),
        projector_patch_to_query_dict={1225: 8, 4900: 8}, image_token_id=tok.image_token_id)
    model = AriaForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "Aria-tiny")
    processor.save_pretrained(tmp_path / "Aria-tiny")
    root = resolve("shapes", WorldConfig(image_size=32, grid=4, n_train=200, n_val=900), progress=False).root
    code, _, err = run_cli(["eval", "--model", tmp_path / "Aria-tiny", "--tasks", "gqa", "--limit", "2",
                            "--batch-size", "1", "--data", root, "--results", tmp_path / "res", "--no-progress"], capsys)
    assert code == 0, err
    (row,) = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["metric"] == "exact_match"
              and not r["group"]]
    routed = sum(p.numel() for layer in model.model.language_model.layers for p in layer.mlp.experts.parameters())
    assert row["variant"] == "moe" and row["params_total"] - row["params_activated"] == routed // 2
    assert sorted(json.loads(row["extra"])["expert_load"]) == ["0", "1"]
