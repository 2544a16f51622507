"""Assemble a VLM from a ModelConfig: random init from configs, or parts loaded from local checkpoints.

Registries: vision towers ("clip"), LLM families ("qwen2", "llama", "stablelm", "phi"), projectors
("mlp2x_gelu", "linear"). A checkpoint says what it is in its config; nothing is chosen by folder name.
"""

from __future__ import annotations

from pathlib import Path

from moebench.config import LLMConfig, ModelConfig, VisionConfig
from moebench.errors import UserError
from moebench.registry import Registry

LLM_FAMILIES: Registry = Registry("LLM family")
VISION_TOWERS: Registry = Registry("vision tower")
PROJECTORS: Registry = Registry("projector")


def _llm_config(family: str, c: LLMConfig, vocab_size: int, pad_id: int, eos_id: int):
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.max_positions, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
           "stablelm": transformers.StableLmConfig, "phi": transformers.PhiConfig}[family]
    if family == "phi":
        common["hidden_act"] = "gelu_new"
    if c.init_std is not None:
        common["initializer_range"] = c.init_std
    return cls(**common)


for _name in ("qwen2", "llama", "stablelm", "phi"):
    LLM_FAMILIES.add(_name, _name)


@VISION_TOWERS.register("clip")
def _clip_vision(c: VisionConfig):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if c.pretrained:
        return _from_pretrained(CLIPVisionModel, c.pretrained, "model.vision.pretrained")
    cfg = CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.layers, num_attention_heads=c.heads,
                           image_size=c.image_size, patch_size=c.patch_size)
    return CLIPVisionModel(cfg)


@PROJECTORS.register("mlp2x_gelu")
def _mlp2x_gelu(d_vision: int, d_llm: int):
    from moebench.models.vlm import MLPProjector

    return MLPProjector(d_vision, d_llm)


@PROJECTORS.register("linear")
def _linear(d_vision: int, d_llm: int):
    from torch import nn

    return nn.Linear(d_vision, d_llm)


def _from_pretrained(cls, name: str, key: str, **kw):
    local = Path(name).exists()
    try:
        return cls.from_pretrained(name, local_files_only=local, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}={name!r} could not be loaded: {str(e).splitlines()[0]} "
                        "(give a local checkpoint directory made by save_pretrained)") from None


def build_llm(c: LLMConfig, tokenizer):
    """The causal LM: from `c.pretrained`, or random init from the family's config."""
    from transformers import AutoModelForCausalLM

    LLM_FAMILIES.get(c.family)
    if c.pretrained:
        llm = _from_pretrained(AutoModelForCausalLM, c.pretrained, "model.llm.pretrained")
    else:
        cfg = _llm_config(c.family, c, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        llm = AutoModelForCausalLM.from_config(cfg)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer))  # the added <image> token
    return llm


def build_vlm(cfg: ModelConfig, tokenizer):
    """Vision tower + projector + LLM, assembled into a VLM (random init unless `pretrained` parts)."""
    from moebench.models.tokenizer import image_token_id
    from moebench.models.vlm import VLM

    vision = VISION_TOWERS.get(cfg.vision.name)(cfg.vision)
    llm = build_llm(cfg.llm, tokenizer)
    projector = PROJECTORS.get(cfg.projector)(vision.config.hidden_size, llm.config.hidden_size)
    return VLM(vision, projector, llm, image_token_id=image_token_id(tokenizer),
               feature_layer=cfg.vision.feature_layer, select=cfg.vision.select,
               feature_norm=cfg.vision.feature_norm)


def rebuild_vlm(cfg: ModelConfig, vision_config: dict, llm_config: dict, tokenizer):
    """Rebuild the exact architecture of a saved model from its stored HF configs (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from moebench.models.tokenizer import image_token_id
    from moebench.models.vlm import VLM

    vision = CLIPVisionModel(CLIPVisionConfig.from_dict(vision_config))
    llm_cfg = AutoConfig.for_model(**llm_config)
    llm = AutoModelForCausalLM.from_config(llm_cfg)
    projector = PROJECTORS.get(cfg.projector)(vision.config.hidden_size, llm.config.hidden_size)
    return VLM(vision, projector, llm, image_token_id=image_token_id(tokenizer),
               feature_layer=cfg.vision.feature_layer, select=cfg.vision.select,
               feature_norm=cfg.vision.feature_norm)
