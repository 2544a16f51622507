"""`moebench train RECIPE --dry-run`: check a full-size run before it spends GPU hours.

In order, stopping at the first problem with a one-line error: every stage's data file exists and every
record has the fields the loader reads (moebench.data.conversations), a sample of each stage's images
exists; every task's question files load and a sample of their images exists; then the full-size model
is built on the meta device (no memory, no weights read) and each stage's plan printed:

- parameters: total and activated (the final stage's equal `moebench plan`'s), trainable and frozen;
- memory per GPU, in GiB, from standard accounting (not a measurement): weights (fp32 under autocast,
  bf16 with `precision: bf16_weights`), gradients of the trainable parameters and AdamW's
  two moments in the weights' dtype, and activations for the stage's micro-batch (batch_size x max_len tokens of the LLM
  and the tower's tokens): per decoder layer about 34 x s x b x d bytes in 16-bit (Korthikanti et al.
  2022, no sequence parallelism; + 5 x a x s^2 x b for the attention scores with `attn_implementation:
  eager`, which sdpa's fused kernels do not keep) or, with gradient
  checkpointing, the layer inputs (2 x s x b x d bytes per layer) plus one layer's full activations;
- under the recipe's `distributed` mode for 1, 8 and `--gpus N` GPUs: DDP keeps a full copy of weights,
  gradients and optimizer state per GPU; FSDP2 divides them by N. Activations are per GPU either way.
"""

from __future__ import annotations

from pathlib import Path

GIB = 2 ** 30
IMAGE_SAMPLE = 64  # records per stage whose image file is checked


def check_data(recipe, root: Path) -> list[str]:
    """Each stage's conversation file and a sample of its images; returns lines to print."""
    from moebench.data.conversations import read_conversations
    from moebench.errors import MissingFile

    lines = []
    for s in recipe.stages:
        items = read_conversations(root / s.data, s.max_samples)  # every record's fields, or a UserError
        with_image = [(i, it) for i, it in enumerate(items) if it.get("image")]
        for i, it in with_image[:IMAGE_SAMPLE]:
            image = root / s.images / it["image"]
            if not image.is_file():
                raise MissingFile(image, f"image of {s.data} record {i}",
                                  f"put the images under {root / s.images} as the file names them")
        lines.append(f"stage {s.name}: {root / s.data}: {len(items)} conversations ({len(items) - len(with_image)} "
                     f"text-only), first {min(IMAGE_SAMPLE, len(with_image))} images present")
    return lines


def check_tasks(recipe, root: Path) -> list[str]:
    from moebench.errors import MissingFile
    from moebench.eval.tasks import load_samples, load_task

    lines = []
    for name in recipe.eval_tasks:
        task = load_task(name)
        if task.head:
            from moebench.vision.data import load_split

            data = load_split(task, root, task.splits[0])
            lines.append(f"task {name}: {len(data)} images in split {task.splits[0]}")
            continue
        samples = load_samples(task, root)
        for s in samples[:IMAGE_SAMPLE]:
            if not Path(s.image).is_file():
                raise MissingFile(s.image, f"{name} image (question {s.question_id})", task.download or "")
        lines.append(f"task {name}: {len(samples)} questions over {', '.join(task.splits)}")
    return lines


def _check_vision_tasks(recipe, root: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Each task's train split (what the stages read) and evaluation splits load; returns the lines to
    print and each head's classes (from the train splits, as training builds the heads)."""
    from moebench.eval.tasks import load_task
    from moebench.vision.data import load_split

    lines, heads = [], {}
    for name in dict.fromkeys([*recipe.tasks, *recipe.eval_tasks]):
        task = load_task(name)
        for split in dict.fromkeys([task.train_split, *task.splits]):
            data = load_split(task, root, split)
            lines.append(f"task {name}: {len(data)} images in split {split}")
            if split == task.train_split and name in recipe.tasks:
                heads[task.head] = data.classes
    return lines, heads


def _count(params) -> int:
    return sum(p.numel() for p in params)


def stage_plans(recipe) -> list[dict]:
    """Per stage: parameters total / activated / trainable, tokens per micro-batch, shapes for memory."""
    import torch

    from moebench import variants
    from moebench.models.params import count_params
    from moebench.plan import assemble_vlm, llm_config, vision_config
    from moebench.train.pipeline import _trainable_parts

    lcfg, vcfg = llm_config(recipe), vision_config(recipe)
    chain = variants.chain(recipe.variant)
    out = []
    with torch.device("meta"):
        model = assemble_vlm(recipe, lcfg, vcfg)
        stats = {}
        for i, stage in enumerate(recipe.stages):
            if stage.kind != "clip":
                for v in chain:
                    if i == v.stage_index(recipe):
                        stats.update(v.plan(model, recipe).get("stats", {}))
            parts = _trainable_parts(model, chain)
            if stage.kind == "clip":
                trainable = _count(model.vision_tower.parameters())
            else:
                seen, trainable = set(), 0
                for name in stage.train:
                    for p in parts[name]:
                        if id(p) not in seen:
                            seen.add(id(p))
                            trainable += p.numel()
            p = count_params(model, stats or None)
            out.append({"stage": stage.name, "total": p["total"], "activated": p["activated"], "trainable": trainable,
                        "batch": stage.batch_size, "seq": min(stage.max_len, lcfg.max_position_embeddings),
                        "grad_accum": stage.grad_accum})
    d, layers, heads = lcfg.hidden_size, lcfg.num_hidden_layers, lcfg.num_attention_heads
    for r in out:
        r.update(hidden=d, layers=layers, heads=heads, v_hidden=vcfg.hidden_size, v_layers=vcfg.num_hidden_layers,
                 v_heads=vcfg.num_attention_heads, v_tokens=(vcfg.image_size // vcfg.patch_size) ** 2 + 1)
    return out


def _activations(s: int, b: int, d: int, a: int, layers: int, checkpointing: bool, sdpa: bool = True) -> float:
    """Bytes of saved activations of `layers` transformer layers (16-bit), Korthikanti et al. 2022; with
    sdpa (fused attention kernels) the s x s attention scores and their softmax are not kept."""
    full = 34 * s * b * d + (0 if sdpa else 5 * a * s * s * b)
    return (2 * s * b * d * layers + full) if checkpointing else full * layers


def memory(plan: dict, precision: str, distributed: str, gpus: int, sdpa: bool = True) -> dict:
    """GiB per GPU: weights, gradients, optimizer state, activations (with / without checkpointing)."""
    # fp32 weights under autocast (precision auto / bf16); bf16_weights: weights, gradients, AdamW in bf16
    width = 2 if precision == "bf16_weights" else 4
    shard = gpus if distributed == "fsdp" else 1
    weights = plan["total"] * width / shard
    grads = plan["trainable"] * width / shard
    optim = plan["trainable"] * 2 * width / shard
    act = {ck: (_activations(plan["seq"], plan["batch"], plan["hidden"], plan["heads"], plan["layers"], ck, sdpa)
                + _activations(plan["v_tokens"], plan["batch"], plan["v_hidden"], plan["v_heads"], plan["v_layers"], ck,
                               sdpa)) for ck in (False, True)}
    static = weights + grads + optim
    return {"weights": weights / GIB, "grads": grads / GIB, "optimizer": optim / GIB,
            "activations": act[False] / GIB, "activations_ckpt": act[True] / GIB,
            "total": (static + act[False]) / GIB, "total_ckpt": (static + act[True]) / GIB}


def vision_stage_plans(recipe, heads: dict[str, list[str]]) -> list[dict]:
    """A vision recipe's stages: its ViT and `heads` (head -> classes) on the meta device, transformed
    stage by stage."""
    import dataclasses

    import torch

    from moebench import variants
    from moebench.eval.vision import vision_params
    from moebench.vision.vit import ViTModel, build_vit

    out = []
    with torch.device("meta"):
        model = ViTModel(build_vit(dataclasses.replace(recipe.vit, pretrained=None)), heads)
        for i, stage in enumerate(recipe.stages):
            for v in variants.chain(recipe.variant):
                v.transform(model, recipe, i)
            p = vision_params(model)
            w = model.vit.transformer.width
            tokens = (model.vit.image_size[0] // model.vit.patch_size[0]) ** 2 + 1
            out.append({"stage": stage.name, "total": p["total"], "activated": p["activated"],
                        "trainable": p["total"], "batch": stage.batch_size, "seq": 0, "grad_accum": stage.grad_accum,
                        "hidden": w, "layers": 0, "heads": 1, "v_hidden": w, "v_layers": len(model.vit.transformer.resblocks),
                        "v_heads": max(1, w // 64), "v_tokens": tokens})
    return out


def dry_run(recipe, gpus: int = 8) -> dict:
    """Every check, then the plan per stage; the first problem raises UserError."""
    from moebench.data.sources import resolve

    src = resolve(recipe.data.source, recipe.data.world, progress=False)
    if recipe.kind == "vision":
        checks, heads = _check_vision_tasks(recipe, src.root)
        stages = vision_stage_plans(recipe, heads)
        final = {"total": stages[-1]["total"], "activated": stages[-1]["activated"]}
    else:
        from moebench.plan import plan as make_plan

        checks = check_data(recipe, src.root) + check_tasks(recipe, src.root)
        stages = stage_plans(recipe)
        final = make_plan(recipe)
    counts = [1, 8] + ([gpus] if gpus not in (1, 8) else [])
    for s in stages:
        sdpa = recipe.kind == "vision" or recipe.model.llm.attn_implementation == "sdpa"
        s["memory"] = {n: memory(s, recipe.precision, recipe.distributed, n, sdpa) for n in counts}
    return {"recipe": recipe.name, "checks": checks, "stages": stages, "gpus": counts,
            "plan_total": final["total"], "plan_activated": final["activated"]}
