"""`moebench export RUN OUT`: a run's model as a transformers-native checkpoint that
`AutoModelForImageTextToText.from_pretrained(OUT)` loads and runs with moebench's logits.

    dense run  -> LlavaForConditionalGeneration: the CLIP tower as it is, the projector as
                  `multi_modal_projector.linear_{1,2}`, the LM as `language_model` + `lm_head`
    MoE run    -> the same Llava with a Mixtral text model (a llama LLM, every layer MoE, no shared expert) or
                  a Qwen2-MoE one (qwen2 family): `mlp_only_layers` are the
                  dense layers; each MoE layer's router is `mlp.gate`, its stacked experts
                  `mlp.experts.{gate_up_proj, down_proj}` (the same (E, 2f, d) / (E, d, f) layout), a
                  `gated` shared expert `mlp.shared_expert` + `mlp.shared_expert_gate`, and no shared
                  expert an empty one (width 0: it adds exactly zero)

What transformers' Llava cannot express is refused with one line naming the option: `feature_norm`
(Llava reads the tower's hidden states without its final LayerNorm), `select: max_patch`, a variant's
extension beside the LM (RoE's routing tokens and skipped layers), a `plain` shared expert (Qwen2-MoE
gates its shared expert with a sigmoid), evaluation with a capacity factor, and MoE in other families.
STGC is a training loss only: an STGC run exports as the MoE model it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moebench.errors import UserError

SELECT = {"patch": "default", "full": "full"}  # moebench VisionConfig.select -> Llava's strategy
MOE_NAMES = {"router": "gate", "shared_gate": "shared_expert_gate"}  # our MoE block's children -> Qwen2-MoE's


def export_blockers(model, meta: dict) -> list[str]:
    """Why the model cannot be written as a transformers Llava (empty: it can)."""
    from moebench.models.extensions import RoutedBlock

    out = []
    if model.feature_norm:
        out.append("model.vision.feature_norm=true: Llava reads the vision tower's hidden states without its final "
                   "LayerNorm; export a run trained with feature_norm: false")
    if model.select not in SELECT:
        out.append(f"model.vision.select={model.select}: Llava selects 'patch' (default) or 'full' features")
    if model.extensions():
        names = ", ".join(type(e).__name__ for e in model.extensions())
        out.append(f"the model has {names} beside its LM (routing tokens, skipped layers), which no transformers "
                   "model computes")
    blocks = [m for m in model.llm.modules() if isinstance(m, RoutedBlock)]
    if blocks:
        family = model.llm.config.model_type
        b = blocks[0]
        mixtral = family == "llama" and len(blocks) == model.llm.config.num_hidden_layers and b.shared_expert is None
        if family != "qwen2" and not mixtral:
            out.append(f"an MoE model of the {family} family: moebench exports MoE layers as Qwen2-MoE (qwen2) or "
                       "Mixtral (llama with every layer MoE and no shared expert)")
        if not b.top_k_normalized:
            out.append("moe.top_k_normalized=false: Qwen2-MoE and Mixtral as exported renormalise the top-k weights")
        if b.shared_expert is not None and b.shared_gate is None:
            out.append("moe.shared_expert=plain: Qwen2-MoE gates its shared expert with a sigmoid; train with "
                       "shared_expert: gated (or none) to export")
        if b.eval_capacity_factor is not None:
            out.append(f"moe.eval_capacity_factor={b.eval_capacity_factor}: transformers' MoE layers are dropless")
    return out


def text_config(model):
    """The transformers config of the exported language model: the LLM's own, or Qwen2-MoE for an MoE one."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    from moebench.moe.upcycle import moe_blocks

    cfg = model.llm.config
    blocks = dict(moe_blocks(model.llm))
    if not blocks:
        return cfg
    b = next(iter(blocks.values()))
    if cfg.model_type == "llama":  # every layer MoE, no shared expert (export_blockers): Mixtral
        fields = {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "tie_word_embeddings",
            "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id", "eos_token_id")}
        return MixtralConfig(**fields, intermediate_size=b.experts.down_proj.shape[-1],
                             num_local_experts=b.num_experts, num_experts_per_tok=b.top_k, sliding_window=None)
    shared = b.shared_expert.down_proj.weight.shape[1] if b.shared_expert is not None else 0
    fields = {k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
        "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id",
        "eos_token_id")}
    return Qwen2MoeConfig(**fields, num_experts=b.num_experts, num_experts_per_tok=b.top_k,
                          moe_intermediate_size=b.experts.down_proj.shape[-1], shared_expert_intermediate_size=shared,
                          norm_topk_prob=True, decoder_sparse_step=1, qkv_bias=True,
                          mlp_only_layers=[i for i in range(cfg.num_hidden_layers) if i not in blocks])


def llava_config(model, text_cfg):
    from transformers import LlavaConfig

    return LlavaConfig(vision_config=model.vision_tower.config.to_dict(), text_config=text_cfg.to_dict(),
                       image_token_index=model.image_token_id, image_seq_length=model.num_image_tokens,
                       projector_hidden_act="gelu", vision_feature_select_strategy=SELECT[model.select],
                       vision_feature_layer=model.feature_layer, multimodal_projector_bias=True,
                       tie_word_embeddings=bool(text_cfg.tie_word_embeddings))


def llava_state_dict(model) -> dict[str, torch.Tensor]:
    """moebench's tensor names -> Llava's (tied LM head included when tied)."""
    from moebench.moe.upcycle import moe_blocks

    moe_layers = {i for i, _ in moe_blocks(model.llm)}
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("vision_tower."):
            out["model." + name] = tensor
        elif name.startswith("projector."):
            index, rest = name[len("projector."):].split(".", 1)
            out[f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"] = tensor
        elif name.startswith("llm.model."):
            key = "model.language_model." + name[len("llm.model."):]
            parts = key.split(".")
            if len(parts) > 5 and parts[2] == "layers" and int(parts[3]) in moe_layers and parts[4] == "mlp":
                key = ".".join([*parts[:5], *_moe_key(parts[5:])])
            out[key] = tensor
        elif name.startswith("llm.lm_head."):
            out[name[len("llm."):]] = tensor
        else:
            raise UserError(f"export: no Llava tensor for {name}; this model has parts transformers' Llava lacks")
    for i, block in moe_blocks(model.llm):
        if block.shared_expert is None and model.llm.config.model_type == "qwen2":  # Qwen2-MoE always has one: an empty expert, which adds exactly zero
            d, mlp = model.llm.config.hidden_size, f"model.language_model.layers.{i}.mlp"
            for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                out[f"{mlp}.shared_expert.{proj}.weight"] = torch.zeros(shape)
            out[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, d)
    return out


def _moe_key(rest: list[str]) -> list[str]:
    """Our MoE block's tensor names under `mlp.` -> Qwen2-MoE's (experts.* and shared_expert.* are named alike)."""
    return [MOE_NAMES.get(rest[0], rest[0]), *rest[1:]]


def export_run(run, out: Path) -> dict:
    """Write `run`'s model, tokenizer and processor to `out` as a transformers Llava checkpoint."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from moebench.models.checkpoint import atomic_dir

    model, tokenizer = run.load_model("cpu")
    if tokenizer is None:
        raise UserError(f"{run.dir} is a vision run (a ViT with task heads); export writes vision-language models")
    blockers = export_blockers(model, run.meta)
    if blockers:
        raise UserError(f"{run.name} cannot be exported: {blockers[0]}")
    text_cfg = text_config(model)
    config = llava_config(model, text_cfg)
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    state = llava_state_dict(model)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"export of {run.name}: the Llava checkpoint would lack {missing[:3]} or have extra "
                        f"{unexpected[:3]}; this model's layout is not one moebench exports")
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.eval()
    v = run.recipe.model.vision
    size = model.vision_tower.config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=list(v.image_mean),
        image_std=list(v.image_std), do_center_crop=True, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=model.vision_tower.config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1 if model.select == "patch" else 0)
    with atomic_dir(Path(out)) as tmp:
        hf.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "moebench_export.json").write_text(json.dumps(
            {"run": run.name, "recipe": run.recipe.name, "recipe_hash": run.recipe_hash,
             "git_commit": run.git_commit, "text_model": text_cfg.model_type}, indent=1))
    return {"out": str(out), "architecture": "LlavaForConditionalGeneration", "text_model": text_cfg.model_type}
