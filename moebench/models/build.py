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


# family name -> its transformers config class (the model class follows from the config through
# AutoModelForCausalLM); the one place that says which families moebench builds
LLM_FAMILIES.add("qwen2", "Qwen2Config")
LLM_FAMILIES.add("llama", "LlamaConfig")
LLM_FAMILIES.add("stablelm", "StableLmConfig")
LLM_FAMILIES.add("phi", "PhiConfig")


def family_config(family: str, **fields):
    """The transformers config of an LLM `family` with the given fields (a published architecture's
    dimensions, or the sizes of a from-scratch model)."""
    import transformers

    return getattr(transformers, LLM_FAMILIES.get(family))(**fields)


def llm_config(c: LLMConfig, vocab_size: int, pad_id: int, eos_id: int):
    """The config of a from-scratch LLM of the recipe's sizes (tied embeddings, default RoPE)."""
    fields = dict(
        vocab_size=vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
        max_position_embeddings=c.max_positions, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    if c.family == "phi":
        fields["hidden_act"] = "gelu_new"
    if c.init_std is not None:
        fields["initializer_range"] = c.init_std
    return family_config(c.family, **fields)


def clip_vision_config(c: VisionConfig):
    """The config of a from-scratch CLIP vision tower of the recipe's sizes."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                            num_hidden_layers=c.layers, num_attention_heads=c.heads,
                            image_size=c.image_size, patch_size=c.patch_size)


@VISION_TOWERS.register("clip")
def _clip_vision(c: VisionConfig):
    from transformers import CLIPVisionModel

    if c.pretrained:
        return _from_pretrained(CLIPVisionModel, c.pretrained, "model.vision.pretrained")
    return CLIPVisionModel(clip_vision_config(c))


@PROJECTORS.register("mlp2x_gelu")
def _mlp2x_gelu(d_vision: int, d_llm: int):
    from moebench.models.vlm import MLPProjector

    return MLPProjector(d_vision, d_llm)


@PROJECTORS.register("linear")
def _linear(d_vision: int, d_llm: int):
    from torch import nn

    return nn.Linear(d_vision, d_llm)


def _from_pretrained(cls, name: str, key: str, **kw):
    """`cls.from_pretrained(name)`; a checkpoint whose tensors do not cover the model (missing keys or
    shapes that differ: weights that would stay randomly initialised) is a one-line UserError."""
    from transformers.utils import logging as hf_logging

    local = Path(name).exists()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its load report is replaced by the check below
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(name, local_files_only=local, output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"{key}={name!r} could not be loaded: {str(e).splitlines()[0]} "
                        "(give a local checkpoint directory made by save_pretrained)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing, mismatched = list(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        total = len(model.state_dict())
        first = (f"no tensor for {sorted(missing)[0]} ({len(missing)} of {total} missing)" if missing
                 else f"{mismatched[0][0]} has another shape")
        raise UserError(f"{key}={name!r} does not hold a {type(model).__name__}'s weights: {first}; point at a "
                        "checkpoint of that model alone (for a llava-hf checkpoint's parts, `moebench convert` it)")
    return model


def build_llm(c: LLMConfig, tokenizer):
    """The causal LM: from `c.pretrained`, or random init from the family's config."""
    from transformers import AutoModelForCausalLM

    LLM_FAMILIES.get(c.family)
    if c.pretrained:
        llm = _from_pretrained(AutoModelForCausalLM, c.pretrained, "model.llm.pretrained",
                               attn_implementation=c.attn_implementation)
    else:
        cfg = llm_config(c, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        llm = AutoModelForCausalLM.from_config(cfg, attn_implementation=c.attn_implementation)
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
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from moebench.models.tokenizer import image_token_id
    from moebench.models.vlm import VLM

    vision = AutoModel.from_config(AutoConfig.for_model(**vision_config))  # its model_type says which tower
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llm_config))
    projector = PROJECTORS.get(cfg.projector)(vision.config.hidden_size, llm.config.hidden_size)
    return VLM(vision, projector, llm, image_token_id=image_token_id(tokenizer),
               feature_layer=cfg.vision.feature_layer, select=cfg.vision.select,
               feature_norm=cfg.vision.feature_norm)
