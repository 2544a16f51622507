"""`moebench convert PATH OUT`: a checkpoint directory of another layout as a moebench run, and the
layout detection that `moebench eval --model PATH` uses.

Layouts, told from the checkpoint's config.json and tensor names:
    moebench run    run.json + model/                          (opened as it is)
    llava-hf        model_type "llava" (LlavaForConditionalGeneration): a CLIP tower, the
                    `multi_modal_projector` (gelu, with biases) and a text model: a dense qwen2, llama,
                    stablelm or phi LM, or Qwen2-MoE, whose sparse layers become moebench MoE blocks
                    (router `mlp.gate`, stacked experts, the sigmoid-gated shared expert when it has one),
                    or Mixtral (every layer sparse, attention as Llama's), or Qwen3-MoE / OLMoE (the LM as
                    transformers builds it, its sparse layers swapped for MoE blocks), so the rows count
                    k of E experts and record their load like any MoE run
    llava-original  LLaVA-1.5 releases (`llava_llama`: `model.mm_projector.{0,2}`, the CLIP tower under
                    `model.vision_tower.vision_tower.` or only named by `mm_vision_tower`)
    moe-llava       MoE-LLaVA releases (`moe_llava_stablelm`, `moe_llava_phi`, `moe_llava_qwen`: Qwen v1 in
                    transformers' Qwen2 layout, c_attn split): the config's `moe` block,
                    DeepSpeed's `deepspeed_moe.gate.wg` router and `deepspeed_experts.<e>` experts, with
                    DeepSpeed's evaluation capacity, min_capacity and renormalisation over the kept experts

The converted run is an ordinary run directory: run.json (a recipe of variant dense or moe with no
stages, `converted_from`), model/ (model.json, weights, tokenizer).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from moebench.errors import MissingFile, UserError
from moebench.interop.export import MOE_NAMES, SELECT

_MOE_NAMES = {theirs: ours for ours, theirs in MOE_NAMES.items()}  # Qwen2-MoE's MoE block children -> ours
_STRATEGY = {theirs: ours for ours, theirs in SELECT.items()}  # Llava's vision_feature_select_strategy -> ours

FAMILIES = ("qwen2", "llama", "stablelm", "phi")  # dense text models moebench builds (models/build.py)
NATIVE_MOE = ("qwen3_moe", "olmoe")  # MoE text models kept as transformers builds them, sparse layers swapped


def read_config(path: Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise MissingFile(cfg, "checkpoint config", "point at a moebench run or a transformers checkpoint directory")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg}: not valid JSON ({e})") from None


def layout(path: Path) -> str:
    """'run' (a moebench run) or the name of a layout `convert` reads; anything else is a UserError."""
    path = Path(path)
    if (path / "run.json").is_file() and (path / "model").is_dir():
        return "run"
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a moebench run (no run.json and model/) nor a checkpoint directory (no "
                        "config.json); pass a directory made by `moebench train` or a llava-hf checkpoint")
    cfg = read_config(path)
    kind = cfg.get("model_type")
    if kind == "llava" or "LlavaForConditionalGeneration" in (cfg.get("architectures") or []):
        return "llava-hf"
    if kind in ORIGINAL:
        return "moe-llava" if kind.startswith("moe_") else "llava-original"
    from moebench.interop.native import NATIVE_VLMS

    if kind in NATIVE_VLMS:
        return "native-vlm"
    raise UserError(f"{path}: a checkpoint of model_type {kind!r} ({', '.join(cfg.get('architectures') or [])}) "
                    "is not a layout moebench reads; it reads moebench runs, llava-hf (LlavaForConditionalGeneration), "
                    f"original LLaVA-1.5 and MoE-LLaVA ({', '.join(sorted(ORIGINAL))}) directories and native "
                    "Qwen3-VL(-MoE) checkpoints")


# original LLaVA-1.5 and MoE-LLaVA releases: model_type -> the transformers family of their LM
ORIGINAL = {"llava_llama": "llama", "llava_stablelm": "stablelm", "moe_llava_stablelm": "stablelm",
            "llava_phi": "phi", "moe_llava_phi": "phi", "llava_qwen": "qwen", "moe_llava_qwen": "qwen"}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (one file, or the shards its index names)."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MissingFile(path / "model.safetensors", "checkpoint weights",
                          "moebench reads safetensors checkpoints (model.safetensors or an index of shards)")
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def _moe_section(text: dict):
    from moebench.config import MoEConfig

    n = text["num_hidden_layers"]
    step, only = text.get("decoder_sparse_step", 1), set(text.get("mlp_only_layers") or [])
    layers = [i for i in range(n) if i not in only and (i + 1) % step == 0]
    shared = text.get("shared_expert_intermediate_size", 0)
    return MoEConfig(num_experts=_num_experts(text), top_k=text["num_experts_per_tok"], layers=layers,
                     shared_expert="gated" if shared else "none", expert_size=text.get("moe_intermediate_size"),
                     shared_expert_size=shared or None, top_k_normalized=bool(text.get("norm_topk_prob", False)))


def _num_experts(text: dict) -> int:
    """The routed experts per layer, under either of the names transformers' configs use."""
    return text.get("num_experts") or text["num_local_experts"]


def _native_section(text: dict, kind: str):
    """Qwen3-MoE / OLMoE: the LM stays as transformers builds it (its attention normalises queries and
    keys); its sparse layers become MoE blocks with the same router (softmax, top-k, normalised or not)."""
    from moebench.config import MoEConfig

    n = text["num_hidden_layers"]
    if kind == "qwen3_moe":
        step, only = text.get("decoder_sparse_step", 1), set(text.get("mlp_only_layers") or [])
        layers, width = [i for i in range(n) if i not in only and (i + 1) % step == 0], text["moe_intermediate_size"]
    else:
        layers, width = list(range(n)), text["intermediate_size"]
    return MoEConfig(num_experts=_num_experts(text), top_k=text["num_experts_per_tok"], layers=layers,
                     expert_size=width, top_k_normalized=bool(text.get("norm_topk_prob", False)))


def _mixtral_section(text: dict, path: Path):
    """Mixtral: every layer sparse, top-k of num_local_experts renormalised, attention as Llama's."""
    from moebench.config import MoEConfig

    if text.get("sliding_window"):
        raise UserError(f"{path}: sliding_window={text['sliding_window']}; moebench's llama attention is full")
    return MoEConfig(num_experts=_num_experts(text), top_k=text["num_experts_per_tok"],
                     layers=list(range(text["num_hidden_layers"])))


def _model_config(cfg: dict, image: dict, family: str):
    """moebench's ModelConfig for a llava-hf config (sizes as the stored transformers configs build them)."""
    from moebench.config import LLMConfig, ModelConfig, VisionConfig

    v, t = cfg["vision_config"], cfg["text_config"]
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise UserError("this Llava's projector is not LLaVA-1.5's mlp2x_gelu (gelu, with biases); moebench "
                        "has no such projector")
    if not isinstance(cfg.get("vision_feature_layer", -2), int):
        raise UserError("this Llava concatenates several vision layers (vision_feature_layer is a list); "
                        "moebench reads one")
    vision = VisionConfig(
        name="clip", image_size=v.get("image_size", 336), patch_size=v.get("patch_size", 14),
        hidden_size=v.get("hidden_size", 1024), layers=v.get("num_hidden_layers", 24),
        heads=v.get("num_attention_heads", 16), intermediate_size=v.get("intermediate_size", 4096),
        feature_layer=cfg.get("vision_feature_layer", -2), select=_STRATEGY[strategy],
        feature_norm=False, **image)
    llm = LLMConfig(family=family, hidden_size=t["hidden_size"], layers=t["num_hidden_layers"],
                    heads=t["num_attention_heads"], kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
                    intermediate_size=t["intermediate_size"], max_positions=t.get("max_position_embeddings", 4096))
    return ModelConfig(vision=vision, llm=llm)


def _image_settings(path: Path) -> dict:
    """image_mean / image_std / aspect from the checkpoint's preprocessor config (CLIP's when absent)."""
    pre = Path(path) / "preprocessor_config.json"
    if not pre.is_file():
        return {}
    p = json.loads(pre.read_text())
    out = {}
    if "image_mean" in p and "image_std" in p:
        out["image_mean"], out["image_std"] = list(p["image_mean"]), list(p["image_std"])
    out["aspect"] = "pad" if p.get("do_pad") else "resize"
    return out


# llava-hf tensor name prefixes -> moebench's: the released layout (what transformers writes, and the
# hub's llava-hf checkpoints hold) and transformers' in-memory one
_PREFIXES = [("language_model.model.", "llm.model."), ("language_model.lm_head.", "llm.lm_head."),
             ("model.language_model.", "llm.model."), ("lm_head.", "llm.lm_head."),
             ("model.vision_tower.", "vision_tower."), ("vision_tower.", "vision_tower."),
             ("model.multi_modal_projector.", "projector."), ("multi_modal_projector.", "projector.")]


def _ours(name: str, moe_layers: set[int]) -> str:
    """A llava-hf tensor name -> moebench's VLM name ('?name' when it has no place)."""
    for theirs, ours in _PREFIXES:
        if name.startswith(theirs):
            key = ours + name[len(theirs):]
            break
    else:
        return "?" + name
    if key.startswith("projector.linear_"):
        index, rest = key[len("projector.linear_"):].split(".", 1)
        return f"projector.{0 if index == '1' else 2}.{rest}"
    parts = key.replace(".block_sparse_moe.", ".mlp.").split(".")  # Mixtral's name for its MoE block
    if key.startswith("llm.model.layers.") and int(parts[3]) in moe_layers and parts[4] == "mlp" and len(parts) > 5:
        sub = _MOE_NAMES.get(parts[5], parts[5])
        rest = parts[6:]
        if sub == "experts" and len(rest) == 3:  # Mixtral's experts.<e>.w1 / w3 / w2: gate, up, down
            rest = [rest[0], {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(rest[1], rest[1]), rest[2]]
        parts = [*parts[:5], sub, *rest]
    return ".".join(parts)


def convert(path: Path, out: Path, vision_tower: Path | None = None):
    """Write the checkpoint at `path` as a moebench run at `out`; return its RunInfo. `vision_tower`: a
    CLIP vision checkpoint directory, for original LLaVA-1.5 / MoE-LLaVA releases, which name their tower
    (`mm_vision_tower`) rather than hold its config."""
    from moebench import results
    from moebench.config import Recipe, recipe_hash, to_dict
    from moebench.models.checkpoint import atomic_dir, save_vlm
    from moebench.runs import RUN_FILE, git_commit, open_run

    path, out = Path(path), Path(out)
    kind = layout(path)
    if kind == "run":
        raise UserError(f"{path} is already a moebench run; nothing to convert")
    if kind == "native-vlm":
        raise UserError(f"{path} is a transformers-native VLM, which moebench evaluates as it is: "
                        "`moebench eval --model PATH` (nothing to convert)")
    if kind == "llava-hf":
        model, model_cfg, tokenizer, moe = _from_llava_hf(path)
    else:
        model, model_cfg, tokenizer, moe = _from_original(path, vision_tower)
    recipe = Recipe(name=out.name, variant="moe" if moe is not None else "dense", model=model_cfg, moe=moe)
    meta = {"name": out.name, "recipe": to_dict(recipe), "recipe_hash": recipe_hash(recipe), "stages": [],
            "data": None, "data_hash": None, "converted_from": str(path.resolve()), "layout": kind,
            **results.software_versions(), "git_commit": git_commit()}
    with atomic_dir(out) as tmp:
        save_vlm(model, model_cfg, tokenizer, tmp / "model", variant_config={"moe": to_dict(moe)} if moe else {})
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1))
    return open_run(out)


def _from_llava_hf(path: Path):
    from moebench.models.build import rebuild_vlm
    from moebench.models.tokenizer import load_tokenizer
    from moebench.moe.upcycle import upcycle

    from transformers import AutoConfig

    cfg = read_config(path)
    # a saved config leaves out the values that are its class's defaults: fill them in
    raw_text = dict(cfg.get("text_config") or {})
    text = AutoConfig.for_model(**{"model_type": "llama", **raw_text}).to_dict()
    cfg["vision_config"] = AutoConfig.for_model(**{"model_type": "clip_vision_model",
                                                   **(cfg.get("vision_config") or {})}).to_dict()
    cfg["text_config"] = text
    kind = text.get("model_type", "llama")
    moe = None
    if kind == "qwen2_moe":
        moe, family = _moe_section(text), "qwen2"
    elif kind == "mixtral":
        moe, family = _mixtral_section(text, path), "llama"
    elif kind in NATIVE_MOE:
        moe, family = _native_section(text, kind), kind
    elif kind in FAMILIES:
        family = kind
    else:
        raise UserError(f"{path}: text model {kind!r}; moebench reads {', '.join(FAMILIES)}, qwen2_moe, mixtral, "
                        f"{' and '.join(NATIVE_MOE)}")
    model_cfg = _model_config(cfg, _image_settings(path), family)
    tokenizer = load_tokenizer(str(path))
    llm_config = text if family in NATIVE_MOE else {k: v for k, v in text.items() if k not in _MOE_KEYS}
    llm_config["model_type"] = family
    model = rebuild_vlm(model_cfg, cfg["vision_config"], llm_config, tokenizer)
    if model.image_token_id != cfg.get("image_token_index", cfg.get("image_token_id")):
        raise UserError(f"{path}: the tokenizer's <image> id {model.image_token_id} is not the config's "
                        f"image_token_index {cfg.get('image_token_index')}")
    if moe is not None:
        upcycle(model.llm, moe, empty=True)
    moe_layers = set(moe.layers) if moe is not None else set()
    state = {}
    for name, tensor in read_tensors(path).items():
        if moe is not None and ".shared_expert" in name and moe.shared_expert == "none":
            continue  # Qwen2-MoE's empty shared expert (width 0) adds nothing
        state[_ours(name, moe_layers)] = tensor
    _load_exact(model, _stack_experts(state), path)
    return model, model_cfg, tokenizer, moe


def _text_config(cfg: dict, family: str) -> dict:
    """The transformers config fields of an original release's LM (its config.json minus the LLaVA keys;
    StableLM-epoch's names mapped to transformers' StableLm)."""
    text = {k: v for k, v in cfg.items()
            if not k.startswith(("mm_", "image_", "video_", "tune_", "freeze_")) and k not in (
                "moe", "architectures", "model_type", "use_mm_proj", "transformers_version", "auto_map",
                "tokenizer_padding_side", "tokenizer_model_max_length")}
    if family == "qwen":  # Qwen-1.8B (v1) in transformers' Qwen2 layout: SwiGLU of intermediate_size / 2
        heads = cfg["num_attention_heads"]
        if cfg.get("kv_channels", cfg["hidden_size"] // heads) * heads != cfg["hidden_size"] or cfg.get("rotary_pct", 1.0) != 1.0:
            raise UserError("this Qwen (v1) config has kv_channels x heads != hidden_size or rotary_pct != 1, "
                            "which transformers' Qwen2 attention cannot express")
        return {"model_type": "qwen2", "vocab_size": cfg["vocab_size"], "hidden_size": cfg["hidden_size"],
                "intermediate_size": cfg["intermediate_size"] // 2, "num_hidden_layers": cfg["num_hidden_layers"],
                "num_attention_heads": heads, "num_key_value_heads": heads, "hidden_act": "silu",
                "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-6),
                "max_position_embeddings": cfg.get("max_position_embeddings", 8192),
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.get("rotary_emb_base", 10000)},
                "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}
    if family == "stablelm":
        text["partial_rotary_factor"] = text.pop("rope_pct", 0.25)
        text["layer_norm_eps"] = text.pop("norm_eps", 1e-5)
        text.setdefault("use_qkv_bias", True)
    if "rope_theta" in text:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
    text["model_type"] = family
    return text


def _deepspeed_moe(cfg: dict, path: Path):
    """MoE-LLaVA's `moe` block as moebench's MoE section: DeepSpeed's top-2 gating with its evaluation
    capacity, min_capacity and the renormalisation over the experts kept (`renormalize_kept`)."""
    from moebench.config import MoEConfig

    m = cfg["moe"]
    counts = m.get("num_experts")
    counts = counts if isinstance(counts, list) else [counts] * len(m["moe_layers_idx"])
    if len(set(counts)) != 1:
        raise UserError(f"{path}: its MoE layers have different numbers of experts ({sorted(set(counts))}); "
                        "moebench's MoE section has one")
    if m.get("use_residual"):
        raise UserError(f"{path}: use_residual (PR-MoE's residual expert) is not one moebench computes")
    return MoEConfig(num_experts=counts[0], top_k=m.get("top_k_experts", 2), layers=list(m["moe_layers_idx"]),
                     capacity_factor=m.get("capacity_factor", 1.0), eval_capacity_factor=m.get("eval_capacity_factor", 1.0),
                     min_capacity=m.get("min_capacity", 0), renormalize_kept=True,
                     aux_loss_coef=m.get("router_aux_loss_coef", 0.01))


def _vision_dir(cfg: dict, vision_tower: Path | None, path: Path) -> Path:
    named = cfg.get("mm_vision_tower") or cfg.get("mm_image_tower")
    for candidate in (vision_tower, named):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    raise UserError(f"{path} names its vision tower {named!r}, which is not a local directory; convert it with "
                    "`moebench convert PATH OUT --vision-tower DIR` (DIR: a local copy of that CLIP checkpoint)")


_QWEN_V1 = [(".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
            (".attn.c_proj.", ".self_attn.o_proj."), (".mlp.w1.", ".mlp.up_proj."), (".mlp.w2.", ".mlp.gate_proj."),
            (".mlp.c_proj.", ".mlp.down_proj."), (".w1.", ".up_proj."), (".w2.", ".gate_proj."),
            (".c_proj.", ".down_proj.")]  # the last three: inside deepspeed_experts.<e>


def _qwen_v1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen (v1) tensor names -> the LLaVA layout of transformers' Qwen2 (`model.layers.N...`): the fused
    c_attn split into q, k and v; c = a1 * silu(a2) with a1 = w1 (up) and a2 = w2 (gate)."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("transformer.h.") and ".attn.c_attn." in k:
            base, kind = k.replace("transformer.h.", "model.layers.").split(".attn.c_attn.")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, 0)):
                out[f"{base}.self_attn.{name}.{kind}"] = part.contiguous()
            continue
        k = k.replace("transformer.wte.", "model.embed_tokens.").replace("transformer.ln_f.", "model.norm.")
        if k.startswith("transformer.h."):
            k = "model.layers." + k[len("transformer.h."):]
            for theirs, ours in _QWEN_V1:
                if theirs in k:
                    k = k.replace(theirs, ours)
                    break
        elif k.startswith("transformer."):
            k = "model." + k[len("transformer."):]
        out[k] = v
    return out


def _original_key(name: str) -> str:
    """An original LLaVA-1.5 / MoE-LLaVA tensor name -> moebench's ('?name' when it has no place)."""
    for theirs, ours in (("model.mm_projector.image_spatial_proj.", "projector."), ("model.mm_projector.", "projector."),
                         ("model.vision_tower.vision_tower.", "vision_tower."),
                         ("model.image_tower.image_tower.", "vision_tower.")):
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    name = name.replace(".mlp.deepspeed_moe.gate.wg.", ".mlp.router.")
    name = name.replace(".mlp.deepspeed_moe.experts.deepspeed_experts.", ".mlp.experts.")
    if name.startswith("model."):
        return "llm." + name
    if name.startswith("lm_head."):
        return "llm." + name
    return "?" + name


def _from_original(path: Path, vision_tower: Path | None):
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from moebench.config import LLMConfig, ModelConfig, VisionConfig
    from moebench.models.build import PROJECTORS, _from_pretrained
    from moebench.models.tokenizer import image_token_id, load_tokenizer
    from moebench.models.vlm import VLM
    from moebench.moe.upcycle import upcycle

    cfg = read_config(path)
    family = ORIGINAL[cfg["model_type"]]
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise UserError(f"{path}: mm_projector_type={cfg.get('mm_projector_type')!r}; moebench has LLaVA-1.5's "
                        "mlp2x_gelu")
    moe = _deepspeed_moe(cfg, path) if (cfg.get("moe") or {}).get("moe_enable") else None
    text = _text_config(cfg, family)
    raw = read_tensors(path)
    if family == "qwen":
        raw, family = _qwen_v1(raw), "qwen2"
    tensors = {_original_key(k): v for k, v in raw.items()}
    vdir = _vision_dir(cfg, vision_tower, path)
    vcfg = CLIPVisionConfig.from_pretrained(vdir)
    if any(k.startswith("vision_tower.") for k in tensors):
        vision = CLIPVisionModel(vcfg)
    else:  # the release holds no tower weights: LLaVA loads the named CLIP checkpoint
        vision = _from_pretrained(CLIPVisionModel, str(vdir), "--vision-tower")
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text))
    tokenizer = load_tokenizer(str(path))
    projector = PROJECTORS.get("mlp2x_gelu")(vcfg.hidden_size, llm.config.hidden_size)
    select = {"patch": "patch", "cls_patch": "full"}.get(cfg.get("mm_vision_select_feature", "patch"))
    if select is None:
        raise UserError(f"{path}: mm_vision_select_feature={cfg.get('mm_vision_select_feature')!r}; moebench reads "
                        "patch or cls_patch")
    layer = cfg.get("mm_vision_select_layer", -2)
    image = _image_settings(vdir)
    image["aspect"] = "pad" if cfg.get("image_aspect_ratio", "pad") == "pad" else "resize"
    model_cfg = ModelConfig(
        vision=VisionConfig(name="clip", image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                            hidden_size=vcfg.hidden_size, layers=vcfg.num_hidden_layers,
                            heads=vcfg.num_attention_heads, intermediate_size=vcfg.intermediate_size,
                            feature_layer=layer, select=select, feature_norm=False, **image),
        llm=LLMConfig(family=family, hidden_size=llm.config.hidden_size, layers=llm.config.num_hidden_layers,
                      heads=llm.config.num_attention_heads,
                      kv_heads=getattr(llm.config, "num_key_value_heads", None) or llm.config.num_attention_heads,
                      intermediate_size=llm.config.intermediate_size,
                      max_positions=llm.config.max_position_embeddings))
    if moe is not None:
        upcycle(llm, moe, empty=True)
    model = VLM(vision, projector, llm, image_token_id=0, feature_layer=layer, select=select)
    has_tower = any(k.startswith("vision_tower.") for k in tensors)
    _load_exact(model, _stack_experts(tensors), path, absent_ok=() if has_tower else ("vision_tower.",))
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the added <image>: replaced by features
    model.image_token_id = image_token_id(tokenizer)
    return model, model_cfg, tokenizer, moe


def _stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors as checkpoints store them -> the stacked tensors of moebench's (and transformers')
    expert layers: SwiGLU `experts.<e>.{gate,up,down}_proj.weight` -> (E, 2f, d) `gate_up_proj` and
    (E, d, f) `down_proj`; Phi's `experts.<e>.fc{1,2}.{weight,bias}` -> `up_proj`, `up_proj_bias`,
    `down_proj`, `down_proj_bias`."""
    import re

    per: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|fc1|fc2)\.(weight|bias)", k)
        if m:
            per.setdefault(m[1], {}).setdefault(int(m[2]), {})[f"{m[3]}.{m[4]}"] = v
        else:
            out[k] = v
    for prefix, experts in per.items():
        n = max(experts) + 1
        parts = sorted(experts[0])
        if sorted(experts) != list(range(n)) or any(sorted(e) != parts for e in experts.values()):
            raise UserError(f"{prefix}: the experts' tensors are incomplete (experts {sorted(experts)})")
        if "gate_proj.weight" in parts:
            out[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([experts[e]["gate_proj.weight"], experts[e]["up_proj.weight"]], 0) for e in range(n)])
            out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj.weight"] for e in range(n)])
        else:
            for theirs, ours in (("fc1.weight", "up_proj"), ("fc1.bias", "up_proj_bias"), ("fc2.weight", "down_proj"),
                                 ("fc2.bias", "down_proj_bias")):
                out[f"{prefix}.{ours}"] = torch.stack([experts[e][theirs] for e in range(n)])
    return out


_MOE_KEYS = {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
             "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "output_router_logits",
             "router_aux_loss_coef", "qkv_bias", "num_local_experts", "router_jitter_noise", "sliding_window"}


def _load_exact(model, state: dict[str, torch.Tensor], path: Path, absent_ok: tuple[str, ...] = ()) -> None:
    """Load `state` into `model`; any tensor the model lacks, any it does not get, or a shape mismatch
    is a one-line UserError naming the first ones (a tied LM head may be absent, and names starting with
    `absent_ok`: parts loaded from elsewhere)."""
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise UserError(f"{path}: tensor {unknown[0].lstrip('?')} has no place in the model its config describes "
                        f"({len(unknown)} such tensors)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, the config builds {tuple(own[k].shape)}")
    loaded = {own[k].data_ptr() for k in state}
    missing = sorted(k for k in own if k not in state and own[k].data_ptr() not in loaded
                     and not k.startswith(absent_ok or ("\0",)))
    if missing:
        raise UserError(f"{path}: no tensor for {missing[0]} ({len(missing)} missing); the checkpoint is incomplete "
                        "or of another layout")
    model.load_state_dict(state, strict=False)
    model.eval()


def cached_conversion(path: Path, runs_dir: Path) -> Path:
    """Where `moebench eval --model PATH` keeps PATH converted: runs/.converted/<name>-<hash of its config
    and weight files' sizes and times>."""
    path = Path(path).resolve()
    h = hashlib.sha256(str(path).encode())
    for f in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(runs_dir) / ".converted" / f"{path.name}-{h.hexdigest()[:8]}"


def open_any(path: Path, runs_dir: Path, say=None):
    """A RunInfo for `path`: a moebench run as it is, any other layout converted (once, cached)."""
    from moebench.runs import open_run

    if layout(path) == "run":
        return open_run(path)
    out = cached_conversion(path, runs_dir)
    if (out / "run.json").is_file():
        return open_run(out)
    if say:
        say(f"converting {path} ({layout(path)}) into a moebench run at {out}")
    return convert(path, out)
