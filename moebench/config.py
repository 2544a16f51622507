"""Recipes: YAML loaded into typed dataclasses, `key=value` overrides, validation.

A recipe is data; every check here names the key, the value and what is allowed, e.g.
`stages.finetune.lr='fast' must be a float`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moebench.bundled import bundled_file, find_yaml
from moebench.errors import MissingFile, UserError
from moebench.registry import did_you_mean

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """The vision tower. `pretrained` (local dir or hub id) wins over the size fields."""

    name: Literal["clip"] = "clip"
    pretrained: str | None = None
    arch: str | None = None  # architecture preset of the pretrained tower, for `moebench plan` (see plan.py)
    image_size: int = 48
    patch_size: int = 8
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    feature_layer: int = -2  # LLaVA-1.5 reads the penultimate layer
    select: Literal["patch", "full", "max_patch"] = "patch"  # "patch" drops the class token (LLaVA "default");
    # "max_patch": the patches plus one token, their max over patches (the image embedding stage 0 trains)
    # apply the tower's final LayerNorm to the chosen layer: keeps image embeddings on the scale of
    # token embeddings (raw CLIP residual states are ~100x larger); LLaVA itself feeds raw states
    feature_norm: bool = False
    aspect: Literal["pad", "resize"] = "pad"  # LLaVA-1.5 pads to a square with the mean colour
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))


@dataclass
class LLMConfig:
    """The causal LM. `pretrained` (local dir or hub id) wins over the size fields."""

    # qwen3_moe and olmoe: LMs read from checkpoints (`moebench convert`), whose sparse layers become MoE
    # blocks; a recipe builds its MoE layers from a dense family with `moe:`
    family: Literal["qwen2", "llama", "stablelm", "phi", "qwen3_moe", "olmoe"] = "qwen2"
    pretrained: str | None = None
    arch: str | None = None  # architecture preset of the pretrained LLM, for `moebench plan` (see plan.py)
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 512
    rope_theta: float = 10000.0
    # std of the normal init of a randomly initialised LLM (HF `initializer_range`); None keeps the
    # family default 0.02, which suits widths of 1k and more. A tiny LLM trained from scratch learns
    # content lookups ("is there a diamond?" against the image tokens) many times faster at about
    # 1/sqrt(hidden_size): see docs/shapes-world.md, "Why the tiny LLM uses init_std".
    init_std: float | None = None
    # transformers' attention kernel: sdpa (torch's scaled_dot_product_attention, the default) or eager
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


@dataclass
class TokenizerConfig:
    """`pretrained` names a tokenizer dir/hub id (default: the LLM's); otherwise one is trained on the data."""

    pretrained: str | None = None
    vocab_size: int = 512


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    template: Literal["llava_v1"] = "llava_v1"
    system: str = ""


@dataclass
class WorldConfig:
    """The embedded shapes world (used when data.source is 'shapes')."""

    seed: int = 0
    image_size: int = 48
    grid: int = 3
    n_train: int = 6000
    n_val: int = 1000


@dataclass
class DataConfig:
    source: str = "shapes"  # "shapes" or a data root directory (real datasets)
    world: WorldConfig = field(default_factory=WorldConfig)


@dataclass
class StageConfig:
    """One training stage. `train` names the modules that learn; everything else is frozen."""

    name: str = ""
    kind: Literal["clip", "lm"] = "lm"
    data: str = ""  # LLaVA conversation JSON, relative to the data root
    images: str = ""  # image folder, relative to the data root
    # clip stages: COCO instances JSON under the data root; each vision patch also learns the category of
    # the object whose box centre lies in it (moebench/train/clip.py)
    grounding: str = ""
    grounding_weight: float = 1.0  # the grounding term's weight in the clip stage's loss
    template: Literal["chat", "plain"] = "chat"  # "plain" = image then caption (LLaVA stage I)
    # a variant's transform stage (moebench/variants: Variant.stage_flag)
    upcycle: bool = False  # MoE-Tuning stage III: turn the FFNs named in `moe:` into experts first
    add_roe: bool = False  # RoE: wrap the routable layers named in `roe:` (adapters, routers) first
    train: list[str] = field(default_factory=list)
    lr: float = 2e-5
    lr_scale: dict[str, float] = field(default_factory=dict)  # per-module lr multipliers
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: float = 1.0
    max_steps: int | None = None
    max_samples: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    max_len: int = 512
    grad_clip: float = 1.0
    save_every: int = 0  # steps between resumable checkpoints; 0 = only at the end
    log_every: int = 10


@dataclass
class MoEConfig:
    """The MoE variant (MoE-LLaVA): which FFNs are upcycled into how many experts, and the routing losses."""

    num_experts: int = 4
    top_k: int = 2
    # every_other (0, 2, 4, ...), first_half, second_half, all, or a list of decoder layer indices
    layers: Literal["every_other", "first_half", "second_half", "all"] | list[int] = "every_other"
    aux_loss_coef: float = 0.01  # times the sum of the per-layer balance losses
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE uses 1e-3; MoE-LLaVA none)
    capacity_factor: float | None = None  # training; None = dropless
    eval_capacity_factor: float | None = None  # evaluation; None = dropless
    shared_expert: Literal["none", "plain", "gated"] = "none"
    # expert kernel, one of transformers.integrations.moe's; None = grouped_mm on CUDA, eager on CPU
    # ("segment_mm", a kernel of earlier versions, is refused with what to use instead)
    implementation: Literal["segment_mm", "grouped_mm", "batched_mm", "eager"] | None = None
    # widths of a routed / the shared expert when they are not the FFN's: set by `moebench convert` for
    # checkpoints trained with experts of their own width (Qwen2-MoE); upcycling copies the FFN (None)
    expert_size: int | None = None
    shared_expert_size: int | None = None
    # capacity at least this many token-expert pairs per expert (DeepSpeed's min_capacity)
    min_capacity: int = 0
    # when capacity drops a choice: false = the other choices keep their weights (moebench); true = the
    # weights are renormalised over the choices kept (DeepSpeed's top-2 gating, so MoE-LLaVA's releases)
    renormalize_kept: bool = False
    # the k routing weights renormalised to sum to 1 (MoE-LLaVA, Mixtral, Qwen-MoE); false: the softmax
    # probabilities of the k experts as they are (OLMoE)
    top_k_normalized: bool = True


@dataclass
class STGCConfig:
    """STGC (arXiv 2406.19905): flag routed tokens whose gradient conflicts with their expert's mean
    gradient and push the router away from sending them there. Needs a `moe:` section."""

    threshold: float = 0.0  # tau: a (token, expert) pair conflicts when its gradient cosine is below it
    coef: float = 1.0  # lambda of the conflict elimination loss
    # output = gradient of the loss at the expert's output (cheap proxy); exact = per-token gradients
    # of the expert's parameters (reference for small models)
    gradient: Literal["output", "exact"] = "output"
    layers: list[int] | None = None  # decoder layers with STGC; None = every MoE layer


@dataclass
class RoEConfig:
    """RoE (Routing Experts): each routable LLM layer may be skipped per example, through an adapter."""

    target_skip: float = 0.3  # rho, the target share of routable layers an example skips
    reg_coef: float = 1.0  # lambda of the structure-sparsity regulariser
    adapter_rank: int | None = None  # r of the adapter shortcut; None = hidden_size / 2
    layers: list[int] | None = None  # routable decoder layers; None = all but the first and the last
    temp_start: float = 1.0  # routing temperature at the end of the warm-up ...
    temp_end: float = 0.1  # ... annealed (exponentially) to this at the end of the stage
    warmup_fraction: float = 0.3  # first 30% of the stage: adapters only, random hard skips
    tune_fraction: float = 0.5  # from here on the LLM trains too (at the stage's lr_scale.llm)


@dataclass
class ViTConfig:
    """A vision backbone: open_clip's VisionTransformer from `arch` (an open_clip config name, e.g.
    ViT-B-16) or from the sizes. `routing_unit` is how its MoE blocks (variant vimoe) route."""

    arch: str | None = None
    pretrained: str | None = None  # local weights of the tower (.safetensors / .pt)
    image_size: int = 64
    patch_size: int = 16
    width: int = 128
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    routing_unit: Literal["token", "image"] = "token"  # image: one assignment per image from the class token


def validate_vit(v: ViTConfig, where: str = "vit") -> None:
    if v.arch is None:
        if v.image_size % v.patch_size:
            raise UserError(f"{where}.image_size={v.image_size} is not divisible by {where}.patch_size={v.patch_size}; "
                            "choose sizes whose ratio is a whole number of patches")
        if v.width % v.heads:
            raise UserError(f"{where}.width={v.width} must be divisible by {where}.heads={v.heads}")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["pope", "gqa"])
    batch_size: int = 16
    limit: int | None = None
    max_new_tokens: int | None = None  # None = the task's own setting


@dataclass
class Recipe:
    name: str = ""
    seed: int = 0
    variant: str = "dense"  # a registered variant (moebench/variants): dense, moe, stgc, roe
    # auto / bf16 = bf16 autocast on CUDA over fp32 weights (fp32 on CPU); fp32; bf16_weights = the model
    # itself in bf16 (weights, gradients and AdamW state: half the memory of fp32 weights), on any device
    precision: Literal["auto", "fp32", "bf16", "bf16_weights"] = "auto"
    # data parallelism under torchrun: DDP (a full replica per GPU) or FSDP2 (parameters, gradients and
    # optimizer state sharded over GPUs); one process ignores it. Not part of any stage key: both give
    # the single-process update on the same global batch
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # recompute each decoder (and trained vision) layer in backward instead of keeping its activations:
    # less memory, about a third more compute; the same update (transformers' gradient_checkpointing_enable)
    gradient_checkpointing: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)
    moe: MoEConfig | None = None
    stgc: STGCConfig | None = None
    roe: RoEConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    kind = "lm"  # a class attribute, not a recipe key: VisionRecipe's is "vision"

    @property
    def eval_tasks(self) -> list[str]:
        return self.eval.tasks

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise UserError(f"no stage named {name!r}; stages are {[s.name for s in self.stages]}")


# ffn = every decoder FFN (dense MLPs, experts, routers, shared experts); llm = the LLM less the parts a
# variant keeps apart (Variant.separate_from_llm). The variants add their own names (Variant.param_names).
COMMON_MODULES = ("vision", "projector", "llm", "ffn")


def trainable_modules(kind: str = "lm") -> tuple[str, ...]:
    """The module names a stage's `train:` may use in a recipe of `kind` (lm, vision): the common ones,
    then each registered variant's of that kind (router, roe, ...)."""
    from moebench import variants  # the variant modules import this one

    common = COMMON_MODULES if kind == "lm" else VISION_MODULES
    return (*common, *dict.fromkeys(n for v in variants.VARIANTS.values() if kind in v.kinds for n in v.param_names))
# Part of every stage key: bump it when the code changes what a stage computes (losses, data
# encoding), so cached stage checkpoints made by older code are not reused.
STAGE_FORMAT = 1
# Fields that change how a stage is logged or checkpointed, not what it computes.
_NON_SEMANTIC_STAGE_KEYS = {"save_every", "log_every"}


# ---------------------------------------------------------------------------- loading


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, what: str = "recipe"):
    """Check `value` against the annotation `tp`; return it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, what)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = did_you_mean(str(value), [str(a) for a in allowed])
            raise UserError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}={value!r} must be a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}.{_item_name(v, i)}", what) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}={value!r} must be a mapping")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", what) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, what)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}={value!r} must be a float")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}={value!r} must be an int")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}={value!r} must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported annotation {_type_name(tp)} for {key}")


def _item_name(item: Any, index: int) -> str:
    """List items are named in messages by their `name` when they have one (stages.finetune.lr)."""
    return str(item["name"]) if isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"] else str(index)


def from_dict(cls, data: Any, prefix: str = "", what: str = "recipe"):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix or what
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise UserError(f"unknown {what} key {full!r}{did_you_mean(str(key), names)}; allowed keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full, what)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value, e.g. stages.finetune.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(raw: dict, text: str) -> None:
    """Apply one `a.b.c=value` override to the raw recipe dict; list items by index or by `name`."""
    path, value = _parse_override(text)
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise UserError(f"override {text!r}: {where} is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        raise UserError(f"override {text!r}: name a field of the list item, e.g. stages.<name>.lr=...")
    node[last] = value


def _list_item(items: list, part: str, where: str):
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    names = [str(it.get("name")) for it in items if isinstance(it, dict)]
    raise UserError(f"no item {part!r} in {where.rsplit('.', 1)[0]}{did_you_mean(part, names)}; items: {names}")


def _merge(base: dict, child: dict) -> dict:
    """`child` over `base`: mappings merge key by key; `stages` merge by stage name (a new name is
    appended, a known one is updated); any other value replaces the base's."""
    out = dict(base)
    for k, v in child.items():
        if k == "stages" and isinstance(v, list) and isinstance(base.get(k), list):
            stages = [dict(s) for s in base[k]]
            for s in v:
                same = [b for b in stages if isinstance(s, dict) and b.get("name") == s.get("name")]
                if same:
                    same[0].update(s)
                else:
                    stages.append(s)
            out[k] = stages
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = _merge(base[k], v)
        else:
            out[k] = v
    return out


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The recipe mapping of `path`, with its `extends:` chain resolved (paths relative to the file, else
    a bundled recipe's name)."""
    if not path.is_file():
        raise MissingFile(path, "recipe file", "see `moebench ls` for the shipped recipes")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise UserError(f"{path} is empty; a recipe is a YAML mapping with `stages:` (see recipes/shapes_dense.yaml)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping")
    raw.setdefault("name", path.stem)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base_path = path.parent / str(parent)
    if not base_path.is_file():  # a copy of a bundled recipe, outside the bundled folder, names its base
        base_path = bundled_file("recipes", str(parent)) or base_path
    base_path = base_path.resolve()
    if base_path in seen:
        raise UserError(f"{path}: `extends: {parent}` makes a cycle")
    base = _read_raw(base_path, (*seen, path.resolve()))
    return _merge(base, raw)


@dataclass
class VisionStageConfig:
    """One training stage of a vision recipe. `train` names what learns: vit (the backbone), heads, and
    the variants' parts (router: the MoE routers only)."""

    name: str = ""
    # a variant's transform stage (moebench/variants: Variant.stage_flag)
    upcycle: bool = False  # ViMoE: turn the block MLPs named in `vimoe:` into experts first
    train: list[str] = field(default_factory=lambda: ["vit", "heads"])
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    epochs: float = 1.0
    max_steps: int | None = None
    max_samples: int | None = None
    batch_size: int = 64
    grad_accum: int = 1
    grad_clip: float = 1.0
    save_every: int = 0
    log_every: int = 10


@dataclass
class VisionEvalConfig:
    tasks: list[str] = field(default_factory=list)  # empty: the recipe's `tasks`
    batch_size: int = 64
    limit: int | None = None  # the first N images of each split
    max_new_tokens: int | None = None  # unused (no generation); evaluation reads every recipe's eval alike


@dataclass
class VisionRecipe:
    """A ViT with one head per task (classification, segmentation), trained by stages like a VLM recipe.
    `variant: dense` or `vimoe` (ViMoE, arXiv 2410.15732: the stage with `upcycle: true` turns the block
    MLPs named in `vimoe:` into experts). `tasks` are the task files whose train split the heads learn;
    `moebench eval` runs them (or `eval.tasks`) on the val split."""

    name: str = ""
    kind: Literal["vision"] = "vision"
    seed: int = 0
    variant: str = "dense"
    precision: Literal["auto", "fp32", "bf16", "bf16_weights"] = "auto"
    distributed: Literal["ddp", "fsdp"] = "ddp"
    data: DataConfig = field(default_factory=DataConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    tasks: list[str] = field(default_factory=lambda: ["cls_shapes"])
    stages: list[VisionStageConfig] = field(default_factory=list)
    vimoe: MoEConfig | None = None
    eval: VisionEvalConfig = field(default_factory=lambda: VisionEvalConfig())
    slide_stride: int | None = None  # segmentation: sliding-window inference with this stride (crop = vit.image_size)

    @property
    def eval_tasks(self) -> list[str]:
        return self.eval.tasks or self.tasks


VISION_MODULES = ("vit", "heads")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe | VisionRecipe:
    """Read a recipe YAML (following `extends:`), apply key=value overrides, type-check and validate.
    `path` is a file or the name of a bundled recipe (`shapes_dense`). `kind: vision` makes it a ViMoE
    recipe."""
    raw = _read_raw(find_yaml(path))
    for o in overrides:
        apply_override(raw, o)
    recipe = recipe_from_dict(raw)
    validate(recipe)
    _check_tasks(recipe.eval_tasks, "eval.tasks" if recipe.eval.tasks else "tasks", recipe.kind)
    if isinstance(recipe, VisionRecipe):
        _check_tasks(recipe.tasks, "tasks", recipe.kind)
        _one_task_per_head(recipe.tasks)
    return recipe


def _one_task_per_head(names: list[str]) -> None:
    from moebench.eval.tasks import load_task

    heads: dict[str, str] = {}
    for name in names:
        head = load_task(name).head
        if head in heads:
            raise UserError(f"tasks: {heads[head]} and {name} are both {head} tasks; a vision model has one head of "
                            "each kind, so name at most one classification and one segmentation task")
        heads[head] = name


def recipe_from_dict(raw: dict) -> Recipe | VisionRecipe:
    """A recipe from its mapping (a YAML file's, or a run.json's `recipe`): `kind: vision` is a VisionRecipe."""
    return from_dict(VisionRecipe if isinstance(raw, dict) and raw.get("kind") == "vision" else Recipe, raw)


def _check_tasks(names: list[str], key: str, kind: str) -> None:
    """Every task the recipe evaluates loads (names known, task files valid) and suits the recipe's
    model (a VQA task for a VLM, a classification or segmentation task for a vision recipe), so a recipe
    fails before training."""
    from moebench.eval.tasks import load_task  # that module imports this one

    for name in names:
        try:
            task = load_task(name)
        except UserError as e:
            raise UserError(f"{e} (recipe key {key})") from None
        if task.kind != kind:
            what = "a vision recipe (a ViT with task heads)" if kind == "vision" else "a VLM recipe"
            raise UserError(f"{key}: task {name} is {'a ' + task.head + ' task for vision recipes' if task.head else 'a VQA task for VLM recipes'}"
                            f", and this is {what}; name tasks of its kind (`moebench ls` lists them)")


def validate(recipe: Recipe | VisionRecipe) -> None:
    """Cross-field checks that types alone cannot express."""
    from moebench import variants  # the variant modules import this one

    variants.check_name(recipe.variant, recipe.kind)
    if isinstance(recipe, VisionRecipe):
        _validate_vision(recipe)
    else:
        _validate_lm(recipe)
    variants.validate(recipe)  # each variant's section and stage flag (moebench/variants)
    if recipe.eval.batch_size < 1:
        raise UserError(f"eval.batch_size={recipe.eval.batch_size} must be >= 1")


def _validate_stages(recipe, modules: tuple[str, ...]) -> None:
    """What every recipe's stages need: names, trainable modules that exist, sane optimisation settings."""
    if not recipe.stages:
        raise UserError("recipe has no stages; add at least one under `stages:`")
    seen = set()
    for i, s in enumerate(recipe.stages):
        where = f"stages.{s.name or i}"
        if not s.name:
            raise UserError(f"stages.{i}.name is empty; give every stage a name")
        if s.name in seen:
            raise UserError(f"{where}: stage name used twice; names must be unique")
        seen.add(s.name)
        for m in s.train:
            if m not in modules:
                raise UserError(f"{where}.train has {m!r}; allowed modules: {list(modules)}{did_you_mean(m, modules)}")
        for m in s.lr_scale:
            if m not in s.train:
                raise UserError(f"{where}.lr_scale.{m}: module is not trained in this stage ({s.train})")
        if not s.train:
            raise UserError(f"{where}.train is empty; name the modules that learn ({list(modules)})")
        for key in ("batch_size", "grad_accum", "max_len"):
            if getattr(s, key, 1) < 1:
                raise UserError(f"{where}.{key}={getattr(s, key)} must be >= 1")
        if s.lr <= 0:
            raise UserError(f"{where}.lr={s.lr} must be > 0")
        if not 0 <= s.warmup_ratio < 1:
            raise UserError(f"{where}.warmup_ratio={s.warmup_ratio} must be in [0, 1)")
        if s.epochs <= 0 and not s.max_steps:
            raise UserError(f"{where}: set epochs > 0 or max_steps")


def _validate_lm(recipe: Recipe) -> None:
    _validate_stages(recipe, trainable_modules("lm"))
    for i, s in enumerate(recipe.stages):
        where = f"stages.{s.name}"
        if not s.data:
            raise UserError(f"{where}.data is empty; name the LLaVA conversation JSON under the data root")
        if s.kind == "clip" and s.train != ["vision"]:
            raise UserError(f"{where}: a clip stage trains the vision tower only; set train: [vision]")
        if s.grounding and s.kind != "clip":
            raise UserError(f"{where}.grounding is for kind: clip stages only; remove it or set kind: clip")
        if s.grounding_weight <= 0:
            raise UserError(f"{where}.grounding_weight={s.grounding_weight} must be > 0")
    v = recipe.model.vision
    if v.pretrained is None and v.image_size % v.patch_size:
        raise UserError(f"model.vision.image_size={v.image_size} must be a multiple of patch_size={v.patch_size}")
    llm = recipe.model.llm
    if llm.family in ("qwen3_moe", "olmoe") and llm.pretrained is None:
        raise UserError(f"model.llm.family={llm.family} is read from a checkpoint (moebench convert), not built from "
                        "sizes; build a dense family (qwen2, llama, stablelm, phi) and add experts with `moe:`")
    if llm.pretrained is None:
        if llm.hidden_size % llm.heads:
            raise UserError(f"model.llm.hidden_size={llm.hidden_size} must be divisible by heads={llm.heads}")
        if llm.heads % llm.kv_heads:
            raise UserError(f"model.llm.heads={llm.heads} must be divisible by kv_heads={llm.kv_heads}")


def _validate_vision(recipe: VisionRecipe) -> None:
    _validate_stages(recipe, trainable_modules("vision"))
    validate_vit(recipe.vit)
    if not recipe.tasks:
        raise UserError("tasks is empty; name the classification or segmentation tasks the heads learn, "
                        "e.g. tasks: [cls_shapes, seg_shapes]")
    if recipe.slide_stride is not None and recipe.slide_stride < 1:
        raise UserError(f"slide_stride={recipe.slide_stride} must be >= 1 (or null for whole-image inference)")


def tokenizer_corpus(recipe: Recipe) -> list[tuple[str, int | None]]:
    """The (data file, max_samples) pairs a trained tokenizer learns from: each stage's, once each.

    Part of every stage key (the tokenizer is saved with stage 0's checkpoint), so two recipes share
    cached stages only when they would train the same tokenizer.
    """
    if recipe.model.tokenizer.pretrained or recipe.model.llm.pretrained:
        return []
    return list(dict.fromkeys((s.data, s.max_samples) for s in recipe.stages))


def moe_layer_indices(spec, num_layers: int) -> list[int]:
    """every_other (0, 2, 4, ...), first_half, second_half, all, or an explicit list of indices."""
    if isinstance(spec, list):
        bad = [i for i in spec if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"moe.layers: index {bad[0]} is out of range for an LLM with {num_layers} layers "
                            f"(use 0..{num_layers - 1})")
        return sorted(set(spec))
    half = num_layers // 2
    return {"every_other": list(range(0, num_layers, 2)), "first_half": list(range(half)),
            "second_half": list(range(half, num_layers)), "all": list(range(num_layers))}[spec]


# ---------------------------------------------------------------------------- hashing


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(recipe: Recipe | VisionRecipe, index: int, data_hash: str) -> str:
    """Hash of everything that produced stage `index`: model, data, stages so far, seed.

    Two recipes that share their first stages get the same keys, so they share those checkpoints.
    """
    stages = []
    for s in recipe.stages[: index + 1]:
        d = to_dict(s)
        for k in _NON_SEMANTIC_STAGE_KEYS:
            d.pop(k)
        if not d.get("grounding", True):  # added later: recipes without it keep their earlier keys (and checkpoints)
            del d["grounding"]
        if d.get("grounding_weight") == 1.0:  # likewise
            del d["grounding_weight"]
        stages.append(d)
    if isinstance(recipe, VisionRecipe):
        model, corpus = {"kind": recipe.kind, "vit": to_dict(recipe.vit), "tasks": recipe.tasks}, []
    else:
        model, corpus = to_dict(recipe.model), tokenizer_corpus(recipe)
        model["llm"].pop("attn_implementation")  # a kernel choice: the same computation either way
    part = {
        "model": model,
        "data": {"source": recipe.data.source, "hash": data_hash},
        "stages": stages,
        "seed": recipe.seed,
        "precision": recipe.precision,
        "format": STAGE_FORMAT,
        "tokenizer_corpus": corpus,
    }
    from moebench import variants

    for v in variants.chain(recipe.variant):  # from the stage that transforms the model on: its section(s)
        part.update(v.stage_key_part(recipe, index))
    return _digest(part)


def recipe_hash(recipe: Recipe) -> str:
    return _digest(to_dict(recipe))
