"""`moebench train`: build the model, run the recipe's stages (reusing cached ones), save the run.

Each stage's checkpoint is keyed by a hash of the recipe part that produced it (model, data, stages so
far, seed), so the dense, MoE, STGC and RoE recipes that share stages I and II share those checkpoints.

Under torchrun every rank runs this function: each stage trains through moebench.distributed.prepare
(the recipe's `distributed: ddp | fsdp`), the data world and the tokenizer are made by rank 0 first,
and only rank 0 writes stage checkpoints, the run directory and training rows (then a barrier).
Data parallelism does not change what a stage computes, so stage keys (and cached stages) are shared
with single-process runs.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from moebench import distributed as parallel
from moebench import results
from moebench import variants
from moebench.config import Recipe, StageConfig, recipe_hash, stage_key, to_dict, tokenizer_corpus, trainable_modules
from moebench.data.conversations import IGNORE, ConversationDataset, Encoder, collate, read_conversations
from moebench.data.sources import DataSource, file_hash, resolve
from moebench.errors import UserError
from moebench.models.checkpoint import atomic_dir, is_model_dir, load_vlm, save_vlm
from moebench.runs import RUN_FILE, STAGES_DIR, RunInfo, git_commit
from moebench.train.loop import NONFINITE_FILE, run_stage, total_steps


def _say(progress: bool, msg: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(msg)


def data_hash(recipe: Recipe, src: DataSource) -> str:
    """The world's hash, or for a real data root the hash of every stage's data file."""
    if src.hash:
        return src.hash
    return "-".join(file_hash(src.root / s.data) for s in recipe.stages if (src.root / s.data).is_file())


def make_tokenizer(recipe: Recipe, src: DataSource):
    from moebench.eval.tasks import SHORT_ANSWER
    from moebench.models.tokenizer import load_tokenizer, train_tokenizer

    tcfg = recipe.model.tokenizer
    name = tcfg.pretrained or recipe.model.llm.pretrained
    if name:
        return load_tokenizer(name)
    texts = [SHORT_ANSWER, "USER: ASSISTANT:"]
    for data, max_samples in tokenizer_corpus(recipe):
        for item in read_conversations(src.root / data, max_samples):
            texts += [t["value"].replace("<image>", "") for t in item["conversations"]]
    return train_tokenizer(texts, tcfg.vocab_size)


def stage_dirs(recipe: Recipe, runs_dir: Path, dhash: str) -> list[Path]:
    return [Path(runs_dir) / STAGES_DIR / f"{i}-{s.name}-{stage_key(recipe, i, dhash)}" for i, s in enumerate(recipe.stages)]


def _trainable_parts(model, chain: list[variants.Variant] | None = None) -> dict[str, list]:
    """Module name in a stage's `train:` list -> its parameters: the common parts and each variant's
    (Variant.param_parts; every registered variant's when `chain` is None). A name no part gives has none."""
    chain = variants.VARIANTS.values() if chain is None else chain
    extra: dict[str, list] = {}
    for v in chain:
        extra.update(v.param_parts(model))
    apart = {id(p) for v in chain for name in v.separate_from_llm for p in extra.get(name, [])}
    ffn = [p for layer in model.llm.model.layers for p in layer.mlp.parameters()]
    return {**{name: [] for name in trainable_modules()}, **extra,
            "vision": list(model.vision_tower.parameters()), "projector": list(model.projector.parameters()),
            "llm": [p for p in model.llm.parameters() if id(p) not in apart], "ffn": ffn}


def _param_groups(model, stage: StageConfig, chain: list[variants.Variant] | None = None) -> list[tuple[str, list, float]]:
    parts = _trainable_parts(model, chain)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for name in stage.train:
        params = parts[name]
        if not params:
            raise UserError(f"stages.{stage.name}.train has {name!r} but the model has no such parameters "
                            "(routers exist only after a stage with upcycle: true)")
        for p in params:
            p.requires_grad_(True)
        groups.append((name, params, stage.lr * stage.lr_scale.get(name, 1.0)))
    return groups


def lm_loss_fn():
    """The next-token loss over the supervised positions (the variants add their terms to it)."""
    from moebench.models.vlm import lm_loss, supervised_positions

    def loss_fn(model, batch):
        keep = supervised_positions(batch["labels"])  # the LM head runs at these positions only
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                    vision_features=batch.get("vision_features"), logits_to_keep=keep)
        supervised = (batch["labels"][:, 1:] != IGNORE).sum()  # the tokens lm_loss averages over
        lm = parallel.global_mean(lm_loss(out.logits, batch["labels"], keep), supervised)
        return lm, {"lm_loss": lm.detach()}

    return loss_fn


def stage_loss_fn(recipe: Recipe, i: int, chain: list[variants.Variant] | None = None):
    """The loss of lm stage i: the next-token loss, passed through each variant of the chain in order."""
    loss_fn = lm_loss_fn()
    for v in variants.chain(recipe.variant) if chain is None else chain:
        loss_fn = v.loss_fn(loss_fn, recipe, i)
    return loss_fn


def _stage_hooks(hooks: list[variants.StageHooks]) -> variants.StageHooks:
    """The variants' hooks of one stage as one: each called in the chain's order."""
    before = [h.before_step for h in hooks if h.before_step]
    after = [h.after_backward for h in hooks if h.after_backward]
    closes = [h.close for h in hooks if h.close]

    def before_step(step: int, total: int) -> None:
        for f in before:
            f(step, total)

    def after_backward(scale: float) -> dict:
        logs = {}
        for f in after:
            logs.update(f(scale))
        return logs

    def close() -> None:
        for f in closes:
            f()

    return variants.StageHooks(before_step=before_step if before else None,
                               after_backward=after_backward if after else None,
                               generators={k: g for h in hooks for k, g in h.generators.items()},
                               close=close if closes else None)


def train(recipe: Recipe, *, runs_dir: Path, results_dir: Path, resume: bool = False, progress: bool = True,
          on_step: Callable[[int], None] | None = None) -> RunInfo:
    """Train every stage of `recipe` that is not cached yet; return the finished run.

    Under torchrun, every rank calls this; rank 0 writes (see the module docstring)."""
    w = parallel.init()
    chain = variants.chain(recipe.variant)  # what the recipe's variant applies, in order (stgc: moe, stgc)
    for v in chain:
        v.check_launch(recipe, w.size)
    progress = progress and w.main
    torch.manual_seed(recipe.seed)
    src = parallel.node_first(lambda: resolve(recipe.data.source, recipe.data.world, progress=progress))
    dhash = data_hash(recipe, src)
    dirs = stage_dirs(recipe, runs_dir, dhash)
    run_name = f"{recipe.name}-{dirs[-1].name.rsplit('-', 1)[1][:8]}"
    device = parallel.device()

    done = parallel.broadcast(max((i for i, d in enumerate(dirs) if is_model_dir(d / "model")), default=-1))
    if done >= 0:
        model, tokenizer, _ = load_vlm(dirs[done] / "model", expect=recipe.model)
        _say(w.main, f"reusing stages {[s.name for s in recipe.stages[: done + 1]]} from {dirs[done].parent}")
    else:
        from moebench.models.build import build_vlm

        tokenizer = parallel.broadcast(make_tokenizer(recipe, src) if w.main else None)
        model = build_vlm(recipe.model, tokenizer)
    model.to(device)

    def log(rows: list[dict]) -> None:
        if rows and w.main:
            stamp = results.utc_now()
            results.append_rows(results_dir, "train", run_name, [{**r, "run": run_name, "timestamp": stamp} for r in rows])

    t0 = time.perf_counter()
    for i in range(done + 1, len(recipe.stages)):
        stage = recipe.stages[i]
        torch.manual_seed(recipe.seed * 1000 + i)
        encoder = Encoder(tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system,
                          max_len=stage.max_len)
        items = read_conversations(src.root / stage.data, stage.max_samples)
        with_image = [it for it in items if it.get("image")]
        if len(with_image) < len(items):  # LLaVA-mix665k has text-only items; this loop trains on image ones
            _say(w.main, f"[yellow]note:[/] stage {stage.name}: skipping {len(items) - len(with_image)} of "
                         f"{len(items)} conversations without an image")
            items = with_image
        dataset = ConversationDataset(items, src.root / stage.images, encoder, stage.template, recipe.model.vision)
        batch_fn = functools.partial(collate, pad_id=tokenizer.pad_token_id)
        if stage.kind == "clip":
            from moebench.train.clip import ClipPretrainer, GroundedCaptions, clip_loss_fn, grounded_collate

            _keep_images(model, dataset, stage, device, progress, frozen_tower=False)

            if stage.grounding:
                v = recipe.model.vision
                dataset = GroundedCaptions(dataset, src.root / stage.grounding, v.image_size, v.patch_size)
                batch_fn = grounded_collate(batch_fn)
            plain = ClipPretrainer(model.vision_tower, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                   num_categories=getattr(dataset, "num_categories", 0),
                                   grounding_weight=stage.grounding_weight).to(device)
            select, loss_fn = functools.partial(_all_params, lr=stage.lr), clip_loss_fn
        else:
            for v in chain:  # the stage that asks for it transforms the model (upcycle, add routers)
                said = v.transform(model, recipe, i)
                if said:
                    _say(w.main, said)
            plain = model
            select, loss_fn = functools.partial(_param_groups, stage=stage, chain=chain), stage_loss_fn(recipe, i, chain)
            _keep_images(model, dataset, stage, device, progress, frozen_tower="vision" not in stage.train)
        # module: what a step calls; net: the model it trains (a sharded copy of `plain` under FSDP2)
        module, net, groups = parallel.prepare(plain, recipe.distributed, select)
        trained = {name: params for name, params, _ in groups}
        hooks = _stage_hooks([h for v in chain if (h := v.stage_hooks(net, recipe, i, stage.kind, trained))])
        _say(progress, f"[bold]stage {i} {stage.name}[/]: {len(dataset)} samples, training {stage.train}"
                       + (f", {w.size} processes ({recipe.distributed})" if w.size > 1 else ""))
        res = run_stage(module, groups, loss_fn, dataset, batch_fn, stage,
                        seed=recipe.seed, work_dir=dirs[i], resume=resume, device=device,
                        precision=recipe.precision, log=log, on_step=on_step, progress=progress,
                        after_backward=hooks.after_backward, before_step=hooks.before_step,
                        generators=hooks.generators)
        parallel.copy_back(net, plain)
        for v in chain:
            v.end_stage(model, recipe, i)
        if hooks.close:
            hooks.close()
        if w.main:
            # stage.json whole or absent, and before the model, whose presence marks the stage done
            results.write_text_atomic(dirs[i] / "stage.json", json.dumps(
                {"stage": stage.name, "steps": res.steps, "final_loss": res.final_loss}))
            save_vlm(model, recipe.model, tokenizer, dirs[i] / "model", extra={"stage": stage.name, "final_loss": res.final_loss},
                     variant_config={k: c for v in chain for k, c in v.checkpoint_config(recipe, i).items()})
            shutil.rmtree(dirs[i] / "partial", ignore_errors=True)
            (dirs[i] / NONFINITE_FILE).unlink(missing_ok=True)
        parallel.barrier()

    run_dir = Path(runs_dir) / run_name
    meta = {
        "name": run_name, "recipe": to_dict(recipe), "recipe_hash": recipe_hash(recipe),
        "stages": [d.name for d in dirs], "data": src.name, "data_hash": dhash,
        **results.software_versions(), "git_commit": git_commit(),  # git_commit: "" outside a checkout
        "train_seconds": time.perf_counter() - t0,
        "final_loss": json.loads((dirs[-1] / "stage.json").read_text())["final_loss"],
    }
    if w.main:
        with atomic_dir(run_dir) as tmp:
            shutil.copytree(dirs[-1] / "model", tmp / "model", copy_function=_link_or_copy)
            (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1))
    parallel.barrier()
    return RunInfo(run_dir, meta)


def _keep_images(model, dataset: ConversationDataset, stage: StageConfig, device: torch.device, progress: bool, *,
                 frozen_tower: bool) -> None:
    """When the stage shows its images again and again (moebench/train/frozen.py), give `dataset` its
    images' features from the frozen tower, computed once, or else keep each image's pixels once decoded."""
    from moebench.train import frozen

    images = len({it["image"] for it in dataset.items})
    samples = total_steps(stage, len(dataset)) * stage.grad_accum * stage.batch_size
    d_vision, size = model.vision_tower.config.hidden_size, model.vision_tower.config.image_size
    if frozen_tower and frozen.wanted(images, samples, model.num_image_tokens * d_vision):
        t = time.perf_counter()
        dataset.features = frozen.feature_table(model, dataset, device)
        _say(progress, f"frozen vision tower: features of {images} images computed once "
                       f"({time.perf_counter() - t:.0f}s) for {samples} samples")
    elif frozen.wanted(images, samples, 3 * size * size):
        dataset.memo = {}


def _all_params(module, lr: float) -> list[tuple[str, list, float]]:
    """Stage 0 (CLIP pre-training): every parameter of the pre-trainer learns."""
    for p in module.parameters():
        p.requires_grad_(True)
    return [("vision", list(module.parameters()), lr)]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
