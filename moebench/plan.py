"""`moebench plan`: parameters and FLOPs of any recipe, computed on the meta device (no weights).

Real backbones are described by architecture presets (the dimensions from their published configs),
so a plan for a 2B or 7B recipe needs neither a download nor the checkpoint. A recipe names its
preset with `model.llm.arch` / `model.vision.arch`; a local checkpoint directory's own config.json
wins when it is present.

The recipe's variants transform the model as its stages would (Variant.plan: upcycled FFNs, RoE
layers counted at the target skip ratio). Counting: MoE-LLaVA's activated / total counts are the whole LLM, embeddings and
LM head included; the embedding share is reported beside them. A token activates every dense
parameter, each MoE block's router and shared expert, and top_k of its num_experts routed experts.
FLOPs per token are 2 x the activated matmul weights (the input embedding is a lookup, not a
matmul) plus attention's 4 x layers x d x context for the scores and the weighted sum.
"""

from __future__ import annotations

import json
from pathlib import Path

from moebench.config import Recipe
from moebench.errors import UserError

# Published configs of the backbones the shipped recipes use (config.json of each hub repo).
LLM_ARCHS: dict[str, tuple[str, dict]] = {
    "stablelm-2-1_6b": ("stablelm", dict(
        vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, use_qkv_bias=True, partial_rotary_factor=0.25, tie_word_embeddings=False,
        max_position_embeddings=4096, hidden_act="silu")),
    # Qwen-1.8B (Qwen v1): fused qkv with bias, no bias on the output projection, SwiGLU 5504
    # (its config says 11008 = 2 x 5504), untied embeddings; the Qwen2 modelling has the same shapes.
    "qwen-1_8b": ("qwen2", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, tie_word_embeddings=False, max_position_embeddings=8192, hidden_act="silu")),
    "phi-2": ("phi", dict(
        vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, partial_rotary_factor=0.4, tie_word_embeddings=False, max_position_embeddings=2048,
        hidden_act="gelu_new")),
    "vicuna-7b-v1.5": ("llama", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, tie_word_embeddings=False, max_position_embeddings=4096, hidden_act="silu")),
}
VISION_ARCHS: dict[str, dict] = {
    "clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    "clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768),
}


def _local_config(path: str | None) -> dict | None:
    if path and (Path(path) / "config.json").is_file():
        return json.loads((Path(path) / "config.json").read_text())
    return None


def llm_config(recipe: Recipe):
    """The LLM's transformers config: local config.json, else the `arch` preset, else the size fields."""
    import transformers

    from moebench.models.build import family_config
    from moebench.models.build import llm_config as sized_config

    c = recipe.model.llm
    local = _local_config(c.pretrained)
    if local is not None:
        return transformers.AutoConfig.for_model(**local)
    if c.arch:
        if c.arch not in LLM_ARCHS:
            raise UserError(f"model.llm.arch={c.arch!r} is not a known architecture; known: {sorted(LLM_ARCHS)}")
        family, dims = LLM_ARCHS[c.arch]
        return family_config(family, **dims)
    if c.pretrained:
        raise UserError(f"model.llm.pretrained={c.pretrained!r} is not a local checkpoint; set model.llm.arch to one "
                        f"of {sorted(LLM_ARCHS)} so the plan knows its dimensions")
    vocab = recipe.model.tokenizer.vocab_size + 4  # a trained tokenizer has at most this many ids
    return sized_config(c, vocab, 0, 1)


def vision_config(recipe: Recipe):
    from transformers import CLIPVisionConfig

    from moebench.models.build import clip_vision_config

    v = recipe.model.vision
    local = _local_config(v.pretrained)
    if local is not None:
        return CLIPVisionConfig.from_dict(local.get("vision_config", local))
    if v.arch:
        if v.arch not in VISION_ARCHS:
            raise UserError(f"model.vision.arch={v.arch!r} is not a known architecture; known: {sorted(VISION_ARCHS)}")
        return CLIPVisionConfig(**VISION_ARCHS[v.arch])
    if v.pretrained:
        raise UserError(f"model.vision.pretrained={v.pretrained!r} is not a local checkpoint; set model.vision.arch "
                        f"to one of {sorted(VISION_ARCHS)} so the plan knows its dimensions")
    return clip_vision_config(v)


def assemble_vlm(recipe: Recipe, lcfg, vcfg):
    """The recipe's VLM, random-initialised from the LLM and tower configs, on the current default device
    (`with torch.device("meta")`: shapes only)."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from moebench.models.build import PROJECTORS
    from moebench.models.vlm import VLM

    llm = AutoModelForCausalLM.from_config(lcfg)
    vision = CLIPVisionModel(vcfg)
    projector = PROJECTORS.get(recipe.model.projector)(vcfg.hidden_size, lcfg.hidden_size)
    return VLM(vision, projector, llm, image_token_id=0, select=recipe.model.vision.select)


def plan(recipe: Recipe, text_tokens: int = 128) -> dict:
    """Parameters (total / activated, per part) and FLOPs per token of the recipe's final model: each
    variant of the recipe's chain transforms the meta-device model and says what it did (Variant.plan)."""
    import torch

    from moebench import variants
    from moebench.models.params import count_params

    lcfg, vcfg = llm_config(recipe), vision_config(recipe)
    structure, notes, stats = {}, [], {}
    with torch.device("meta"):
        model = assemble_vlm(recipe, lcfg, vcfg)
        llm, vision = model.llm, model.vision_tower
        for v in variants.chain(recipe.variant):
            part = v.plan(model, recipe)
            notes.append(part.pop("note", ""))
            stats.update(part.pop("stats", {}))
            structure.update(part)
    p = count_params(model, stats or None)
    d, n_layers = lcfg.hidden_size, lcfg.num_hidden_layers
    n_image = model.num_image_tokens
    context = n_image + text_tokens
    input_emb = llm.get_input_embeddings().weight.numel()
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    matmul = p["llm_activated"] - input_emb + (input_emb if tied else 0)  # a tied LM head is still a matmul
    attn = 4 * n_layers * d * context
    v_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    v_matmul = p["vision"] - sum(w.numel() for n, w in vision.named_parameters() if "position_embedding" in n)
    vision_flops = 2 * v_matmul * v_tokens + 4 * vcfg.num_hidden_layers * vcfg.hidden_size * v_tokens ** 2
    return {
        "recipe": recipe.name, "variant": recipe.variant,
        "llm": {"total": p["llm"], "activated": p["llm_activated"], "embeddings": p["llm_embeddings"],
                "embeddings_counted": True, "layers": n_layers, "hidden": d,
                "structure": "; ".join(n for n in notes if n), **structure},
        "vision": {"total": p["vision"], "tokens_per_image": n_image},
        "projector": {"total": p["projector"]},
        "total": p["total"], "activated": p["activated"],
        "flops_per_token": {"matmul": 2 * matmul, "attention": attn, "total": 2 * matmul + attn,
                            "context": context},
        "vision_flops_per_image": vision_flops,
    }
