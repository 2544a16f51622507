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
from moebench.config import (Recipe, StageConfig, VisionRecipe, recipe_hash, stage_key, to_dict, tokenizer_corpus,
                             trainable_modules)
from moebench.data.conversations import IGNORE, ConversationDataset, Encoder, collate, read_conversations
from moebench.data.sources import DataSource, file_hash, resolve
from moebench.errors import UserError
from moebench.models.checkpoint import (atomic_dir, is_model_dir, load_vision_model, load_vlm, save_vision_model,
                                       save_vlm)
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
    files = [src.root / s.data for s in recipe.stages if getattr(s, "data", "")]
    return "-".join(file_hash(f) for f in files if f.is_file())


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
    (Variant.param_parts; every registered VLM variant's when `chain` is None). A name no part gives has none."""
    chain = [v for v in variants.VARIANTS.values() if "lm" in v.kinds] if chain is None else chain
    extra: dict[str, list] = {}
    for v in chain:
        extra.update(v.param_parts(model))
    apart = {id(p) for v in chain for name in v.separate_from_llm for p in extra.get(name, [])}
    ffn = [p for layer in model.llm.model.layers for p in layer.mlp.parameters()]
    return {**{name: [] for name in trainable_modules()}, **extra,
            "vision": list(model.vision_tower.parameters()), "projector": list(model.projector.parameters()),
            "llm": [p for p in model.llm.parameters() if id(p) not in apart], "ffn": ffn}


def _param_groups(model, stage: StageConfig, parts: Callable[[object], dict[str, list]]) -> list[tuple[str, list, float]]:
    """The optimizer groups of `stage`: (name, parameters, lr) for each module in its `train:` list;
    `parts(model)`: module name -> parameters. Everything else is frozen."""
    parts = parts(model)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for name in stage.train:
        params = parts[name]
        if not params:
            raise UserError(f"stages.{stage.name}.train has {name!r} but the model has no such parameters "
                            "(routers exist only after the stage that adds them)")
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


def _checkpointing(model, on: bool, tower: bool) -> None:
    """Gradient checkpointing of the LM's decoder layers (and the vision tower's when it trains), through
    transformers' public switch (`activation_checkpointing_*` from 5.25, `gradient_checkpointing_*`
    before); off restores the plain forward."""
    for part, wanted in ((model.llm, on), (model.vision_tower, on and tower)):
        new = hasattr(part, "activation_checkpointing_enable")
        active = part.is_activation_checkpointing if new else part.is_gradient_checkpointing
        if wanted:
            kwargs = {"use_reentrant": False}
            if new:
                part.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif active:
            (part.activation_checkpointing_disable if new else part.gradient_checkpointing_disable)()


def _transform(model, recipe, i: int, chain: list[variants.Variant], device) -> None:
    """Each variant of the chain whose stage i it is transforms the model (upcycle, add routers)."""
    for v in chain:
        said = v.transform(model, recipe, i)
        if said:
            _say(parallel.world().main, said)
    model.to(device)


class _LanguageModel:
    """What `train` does that is particular to a VLM recipe: the tokenizer and model, each stage's
    conversations, its loss (clip or next-token) and the checkpoint layout."""

    def __init__(self, recipe: Recipe, src: DataSource, device, progress: bool):
        self.recipe, self.src, self.device, self.progress = recipe, src, device, progress
        self.tokenizer = None

    def load(self, model_dir: Path):
        model, self.tokenizer, _ = load_vlm(model_dir, expect=self.recipe.model)
        return model

    def build(self):
        from moebench.models.build import build_vlm

        w = parallel.world()
        self.tokenizer = parallel.broadcast(make_tokenizer(self.recipe, self.src) if w.main else None)
        return build_vlm(self.recipe.model, self.tokenizer)

    def stage(self, model, i: int, chain: list[variants.Variant]):
        """(module trained, parameter selection, loss, dataset, batch function) of stage i; the variants of
        `chain` transform the model first where the stage asks for it."""
        recipe, stage, w = self.recipe, self.recipe.stages[i], parallel.world()
        encoder = Encoder(self.tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system,
                          max_len=stage.max_len)
        items = read_conversations(self.src.root / stage.data, stage.max_samples)
        with_image = [it for it in items if it.get("image")]
        if len(with_image) < len(items):  # LLaVA-mix665k has text-only items; this loop trains on image ones
            _say(w.main, f"[yellow]note:[/] stage {stage.name}: skipping {len(items) - len(with_image)} of "
                         f"{len(items)} conversations without an image")
            items = with_image
        dataset = ConversationDataset(items, self.src.root / stage.images, encoder, stage.template, recipe.model.vision)
        batch_fn = functools.partial(collate, pad_id=self.tokenizer.pad_token_id)
        if stage.kind == "clip":
            from moebench.train.clip import ClipPretrainer, GroundedCaptions, clip_loss_fn, grounded_collate

            _keep_images(model, dataset, stage, self.device, self.progress, frozen_tower=False)
            if stage.grounding:
                v = recipe.model.vision
                dataset = GroundedCaptions(dataset, self.src.root / stage.grounding, v.image_size, v.patch_size)
                batch_fn = grounded_collate(batch_fn)
            tok = self.tokenizer
            plain = ClipPretrainer(model.vision_tower, len(tok), tok.pad_token_id, tok.eos_token_id,
                                   num_categories=getattr(dataset, "num_categories", 0),
                                   grounding_weight=stage.grounding_weight).to(self.device)
            return plain, functools.partial(_all_params, lr=stage.lr), clip_loss_fn, dataset, batch_fn
        _transform(model, recipe, i, chain, self.device)
        _keep_images(model, dataset, stage, self.device, self.progress, frozen_tower="vision" not in stage.train)
        _checkpointing(model, recipe.gradient_checkpointing, "vision" in stage.train)
        select = functools.partial(_param_groups, stage=stage, parts=lambda m: _trainable_parts(m, chain))
        return model, select, stage_loss_fn(recipe, i, chain), dataset, batch_fn

    def save(self, model, out: Path, extra: dict, variant_config: dict) -> None:
        save_vlm(model, self.recipe.model, self.tokenizer, out, extra=extra, variant_config=variant_config)


class _VisionModel:
    """What `train` does that is particular to a vision recipe: a ViT with a head per task, the tasks'
    labelled train images, the task losses and the checkpoint layout."""

    def __init__(self, recipe, src: DataSource, device, progress: bool):
        from moebench.eval.tasks import load_task
        from moebench.vision.data import load_split

        self.recipe, self.src, self.device = recipe, src, device
        tasks = [load_task(t) for t in recipe.tasks]
        self.splits = [load_split(t, src.root, t.train_split) for t in tasks]

    def load(self, model_dir: Path):
        return load_vision_model(model_dir, expect=self.recipe.vit)[0]

    def build(self):
        from moebench.vision.vit import ViTModel, build_vit

        return ViTModel(build_vit(self.recipe.vit), {d.head: d.classes for d in self.splits})

    def stage(self, model, i: int, chain: list[variants.Variant]):
        from moebench.vision.data import TrainImages, collate

        stage = self.recipe.stages[i]
        dataset = TrainImages(self.splits, model.vit.image_size[0], stage.max_samples)
        _transform(model, self.recipe, i, chain, self.device)

        def parts(m) -> dict[str, list]:
            extra = {k: p for v in chain for k, p in v.param_parts(m).items()}
            return {**extra, "vit": list(m.vit.parameters()), "heads": list(m.heads.parameters())}

        select = functools.partial(_param_groups, stage=stage, parts=parts)
        loss_fn = vision_loss_fn()
        for v in chain:
            loss_fn = v.loss_fn(loss_fn, self.recipe, i)
        return model, select, loss_fn, dataset, collate

    def save(self, model, out: Path, extra: dict, variant_config: dict) -> None:
        save_vision_model(model, self.recipe, out, extra=extra, variant_config=variant_config)


def vision_loss_fn():
    """The sum over heads of each head's cross-entropy (images without a label for a head are ignored)."""
    from moebench.vision.data import IGNORE, IGNORE_CLASS

    def loss_fn(model, batch):
        out = model(batch["pixel_values"])
        loss, logs = 0.0, {}
        for head, logits in out.items():
            labels = batch[f"labels_{head}"]
            ignore = IGNORE_CLASS if head == "cls" else IGNORE
            if bool((labels != ignore).any()):
                term = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=ignore)
            else:  # no label for this head in the batch: a zero that keeps the head in the graph
                term = logits.sum() * 0.0
            loss = loss + term
            logs[f"{head}_loss"] = term.detach()
        logs["lm_loss"] = loss.detach()  # the training table's task-loss column
        return loss, logs

    return loss_fn


def train(recipe: Recipe | VisionRecipe, *, runs_dir: Path, results_dir: Path, resume: bool = False,
          progress: bool = True, on_step: Callable[[int], None] | None = None) -> RunInfo:
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
    kind = (_VisionModel if isinstance(recipe, VisionRecipe) else _LanguageModel)(recipe, src, device, progress)

    done = parallel.broadcast(max((i for i, d in enumerate(dirs) if is_model_dir(d / "model")), default=-1))
    if done >= 0:
        model = kind.load(dirs[done] / "model")
        _say(w.main, f"reusing stages {[s.name for s in recipe.stages[: done + 1]]} from {dirs[done].parent}")
    else:
        model = kind.build()
    model.to(device)
    if recipe.precision == "bf16_weights":
        model.to(torch.bfloat16)

    def log(rows: list[dict]) -> None:
        if rows and w.main:
            stamp = results.utc_now()
            results.append_rows(results_dir, "train", run_name, [{**r, "run": run_name, "timestamp": stamp} for r in rows])

    t0 = time.perf_counter()
    for i in range(done + 1, len(recipe.stages)):
        stage = recipe.stages[i]
        torch.manual_seed(recipe.seed * 1000 + i)
        plain, select, loss_fn, dataset, batch_fn = kind.stage(model, i, chain)
        if recipe.precision == "bf16_weights":  # parts a transform or a stage module added start in fp32
            plain.to(torch.bfloat16)
        # module: what a step calls; net: the model it trains (a sharded copy of `plain` under FSDP2)
        module, net, groups = parallel.prepare(plain, recipe.distributed, select)
        trained = {name: params for name, params, _ in groups}
        hooks = _stage_hooks([h for v in chain if (h := v.stage_hooks(net, recipe, i, getattr(stage, "kind", recipe.kind),
                                                                     trained))])
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
            kind.save(model, dirs[i] / "model", extra={"stage": stage.name, "final_loss": res.final_loss},
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
