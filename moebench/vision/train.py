"""`moebench train` for `kind: vision` recipes: a dense ViT, then each variant from it, each evaluated.

Phase 1 trains the dense ViT (cached in `runs/.stages/` by a hash of what produced it). Phase 2 starts
every variant from that checkpoint and trains it for the same steps: `dense` as it is, `moe` upcycled
(exact copies of each chosen block's MLP), `moe_shared` upcycled with a shared expert. So the three rows
of the report differ only by the variant. Evaluation: top-1 / top-5 (cls) or mIoU / mAcc / aAcc at the
label's resolution (seg, whole-image or sliding-window), images/s, params total and activated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from moebench import results
from moebench.config import STAGE_FORMAT, StageConfig, VisionRecipe, _digest, to_dict
from moebench.data.images import load_image, preprocess
from moebench.data.sources import resolve
from moebench.errors import MissingFile, UserError
from moebench.runs import git_commit
from moebench.train.loop import run_stage
from moebench.vision.vit import ViTClassifier, ViTSegmenter, add_vision_moe, build_vit, slide_inference

SEG_CLASSES = 9  # background + the 8 shapes
IGNORE = 255


class ShapesVision:
    """The world's images with class labels (cls/<split>.json) or label maps (seg/<split>/)."""

    def __init__(self, root: Path, split: str, task: str, vit_cfg):
        folder = {"train": "train2014", "val": "val2014"}[split]
        labels_file = root / "cls" / f"{folder}.json"
        if not labels_file.is_file():
            raise MissingFile(labels_file, "class labels", "use data.source=shapes or an image-folder layout")
        self.labels = json.loads(labels_file.read_text())
        self.files = sorted(self.labels)
        self.classes = sorted(set(self.labels.values()))
        self.images, self.maps, self.task, self.vit = root / "coco" / folder, root / "seg" / folder, task, vit_cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        from moebench.config import CLIP_MEAN, CLIP_STD

        f = self.files[i]
        pixels = preprocess(load_image(self.images / f), self.vit.image_size, CLIP_MEAN, CLIP_STD, "resize")
        if self.task == "cls":
            return {"pixel_values": pixels, "labels": torch.tensor(self.classes.index(self.labels[f]))}
        from PIL import Image

        return {"pixel_values": pixels, "labels": torch.from_numpy(np.array(Image.open(self.maps / f), dtype=np.int64))}


class ADE20KSeg:
    """ADEChallengeData2016 (150 classes, reduce_zero_label): images and labels resized to the ViT's
    input for training; `original_label` gives the full-resolution map the metrics compare against."""

    classes = [str(i) for i in range(150)]

    def __init__(self, root: Path, split: str, vit_cfg):
        from moebench.vision.seg_data import read_ade20k

        self.pairs = read_ade20k(root, {"train": "training", "val": "validation"}[split])
        self.vit = vit_cfg

    def __len__(self) -> int:
        return len(self.pairs)

    def original_label(self, i: int) -> torch.Tensor:
        from moebench.vision.seg_data import load_label
        from moebench.vision.seg_metrics import reduce_zero_label_map

        return torch.from_numpy(reduce_zero_label_map(load_label(self.pairs[i][1])).astype("int64"))

    def __getitem__(self, i: int) -> dict:
        from moebench.config import CLIP_MEAN, CLIP_STD

        size = self.vit.image_size
        pixels = preprocess(load_image(self.pairs[i][0]), size, CLIP_MEAN, CLIP_STD, "resize")
        label = self.original_label(i)[None, None].float()
        label = nn.functional.interpolate(label, size=(size, size), mode="nearest")[0, 0].long()
        return {"pixel_values": pixels, "labels": label}


class ImageFolderCls:
    """The image-folder layout: <root>/<split>/<class name>/<image>; classes are the sorted folder names."""

    def __init__(self, root: Path, split: str, vit_cfg):
        folder = Path(root) / split
        if not folder.is_dir():
            raise MissingFile(folder, "image folder", f"lay images out as {folder}/<class>/<image>")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.items = [(f, c) for c in self.classes for f in sorted((folder / c).iterdir()) if f.is_file()]
        if not self.items:
            raise UserError(f"{folder} has no images in class folders; expected {folder}/<class>/<image>")
        self.labels = {str(f): c for f, c in self.items}
        self.files = [str(f) for f, _ in self.items]
        self.vit = vit_cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from moebench.config import CLIP_MEAN, CLIP_STD

        f, c = self.items[i]
        pixels = preprocess(load_image(f), self.vit.image_size, CLIP_MEAN, CLIP_STD, "resize")
        return {"pixel_values": pixels, "labels": torch.tensor(self.classes.index(c))}


def _datasets(recipe: VisionRecipe, src):
    """Train and val sets: the shapes world; under a data root, ADE20K (seg) or an image folder (cls)."""
    if recipe.data.source == "shapes":  # the embedded world
        return (ShapesVision(src.root, "train", recipe.task, recipe.vit),
                ShapesVision(src.root, "val", recipe.task, recipe.vit))
    if recipe.task == "cls":
        return ImageFolderCls(src.root, "train", recipe.vit), ImageFolderCls(src.root, "val", recipe.vit)
    return ADE20KSeg(src.root, "train", recipe.vit), ADE20KSeg(src.root, "val", recipe.vit)


def _collate(batch: list[dict]) -> dict:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


def _model(recipe: VisionRecipe, num_classes: int) -> nn.Module:
    vit = build_vit(recipe.vit)
    return (ViTClassifier if recipe.task == "cls" else ViTSegmenter)(vit, num_classes)


def _loss_fn(coef: float):
    from moebench.vision.vit import vision_moe_blocks

    def loss_fn(model, batch):
        logits = model(batch["pixel_values"])
        task = nn.functional.cross_entropy(logits, batch["labels"], ignore_index=IGNORE)
        blocks = [b for _, b in vision_moe_blocks(model.vit) if b.last is not None]
        if not blocks:
            return task, {"lm_loss": task.detach()}
        aux = coef * sum(b.last.aux_loss for b in blocks)
        logs = {"lm_loss": task.detach(), "aux_loss": aux.detach()}
        for i, b in vision_moe_blocks(model.vit):
            logs[f"load/{i}"] = b.statistics()["load"]
        return task + aux, logs

    return loss_fn


def _stage(name: str, t) -> StageConfig:
    return StageConfig(name=name, data="-", train=["vision"], lr=t.lr, weight_decay=t.weight_decay,
                       warmup_ratio=t.warmup_ratio, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
                       grad_clip=t.grad_clip, log_every=t.log_every)


def train_vision(recipe: VisionRecipe, *, runs_dir: Path, results_dir: Path, progress: bool = True) -> list[dict]:
    """Train the dense parent (cached), then every variant; evaluate each; return the metric rows."""
    from safetensors.torch import load_model, save_model

    from moebench.models.checkpoint import atomic_dir

    src = resolve(recipe.data.source, recipe.data.world, progress=progress)
    train_set, val_set = _datasets(recipe, src)
    n_classes = len(train_set.classes) if recipe.task == "cls" else (
        SEG_CLASSES if isinstance(train_set, ShapesVision) else len(ADE20KSeg.classes))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = {"task": recipe.task, "vit": to_dict(recipe.vit), "data": src.hash, "seed": recipe.seed,
            "pretrain": to_dict(recipe.pretrain), "format": STAGE_FORMAT}
    parent_dir = Path(runs_dir) / ".stages" / f"vision-dense-{_digest(base)}"
    log_rows = []

    def log(rows):
        log_rows.extend(rows)

    torch.manual_seed(recipe.seed)
    parent = _model(recipe, n_classes).to(device)
    if (parent_dir / "model.safetensors").is_file():
        load_model(parent, str(parent_dir / "model.safetensors"))
    else:
        run_stage(parent, [("vision", list(parent.parameters()), recipe.pretrain.lr)], _loss_fn(0.0), train_set,
                  _collate, _stage("dense", recipe.pretrain), seed=recipe.seed, work_dir=parent_dir, resume=False,
                  device=device, precision="auto", log=log, progress=progress)
        with atomic_dir(parent_dir) as tmp:
            save_model(parent, str(tmp / "model.safetensors"))
    rows = []
    for variant in recipe.variants:
        torch.manual_seed(recipe.seed + 1)
        model = _model(recipe, n_classes).to(device)
        load_model(model, str(parent_dir / "model.safetensors"))
        if variant != "dense":
            moe = dataclasses.replace(recipe.moe, shared_expert=recipe.shared_expert if variant == "moe_shared" else "none")
            add_vision_moe(model.vit, moe, recipe.vit.routing_unit)
            model.to(device)
        run = f"{recipe.name}-{variant}-{_digest({**base, 'variant': variant, 'moe': to_dict(recipe.moe), 'finetune': to_dict(recipe.finetune)})[:8]}"
        variant_rows = []
        run_stage(model, [("vision", list(model.parameters()), recipe.finetune.lr)], _loss_fn(recipe.moe.aux_loss_coef),
                  train_set, _collate, _stage(variant, recipe.finetune), seed=recipe.seed,
                  work_dir=Path(runs_dir) / run, resume=False, device=device, precision="auto",
                  log=variant_rows.extend, progress=progress)
        stamp = results.utc_now()
        results.append_rows(results_dir, "train", run, [{**r, "run": run, "timestamp": stamp} for r in variant_rows])
        out_dir = Path(runs_dir) / run
        with atomic_dir(out_dir) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            (tmp / "run.json").write_text(json.dumps({"name": run, "recipe": to_dict(recipe), "variant": variant,
                                                     "git_commit": git_commit(), **results.software_versions()},
                                                    indent=1))
        rows += evaluate_vision(model, recipe, val_set, n_classes, run=run, variant=variant, data_name=src.name,
                                data_hash=src.hash, device=device, results_dir=results_dir)
    return rows


@torch.no_grad()
def evaluate_vision(model, recipe: VisionRecipe, dataset, n_classes: int, *, run: str, variant: str, data_name: str,
                    data_hash: str, device, results_dir: Path) -> list[dict]:
    from moebench.models.params import inactive_params
    from moebench.moe.upcycle import LoadCounter
    from moebench.vision.seg_metrics import SegEvaluator
    from moebench.vision.vit import vision_moe_blocks

    model.eval()
    bs = recipe.eval_batch_size
    batches = [list(range(i, min(len(dataset), i + bs))) for i in range(0, len(dataset), bs)]
    load = LoadCounter(blocks=vision_moe_blocks(model.vit))
    seg = SegEvaluator(n_classes, ignore_index=IGNORE) if recipe.task == "seg" else None
    top1 = top5 = n = 0
    model(_collate([dataset[i] for i in batches[0]])["pixel_values"].to(device))  # warm-up
    elapsed = 0.0
    with load:
        for idx in batches:
            batch = _collate([dataset[i] for i in idx])
            pixels, labels = batch["pixel_values"].to(device), batch["labels"]
            t = time.perf_counter()
            if recipe.task == "seg" and recipe.slide_stride:
                logits = slide_inference(model, pixels, recipe.vit.image_size, recipe.slide_stride).cpu()
            else:
                logits = model(pixels).cpu()
            elapsed += time.perf_counter() - t
            if recipe.task == "cls":
                best = logits.topk(min(5, n_classes), dim=-1).indices
                top1 += int((best[:, 0] == labels).sum())
                top5 += int((best == labels[:, None]).any(-1).sum())
            elif hasattr(dataset, "original_label"):  # compare at the label's original resolution
                for k, lg in zip(idx, logits):
                    full = dataset.original_label(k)
                    up = nn.functional.interpolate(lg[None], size=full.shape, mode="bilinear", align_corners=False)
                    seg.update(up[0].argmax(0).numpy(), full.numpy())
            else:
                pred = logits.argmax(1)
                for p, lab in zip(pred, labels):
                    seg.update(p.numpy(), lab.numpy())
            n += len(idx)
    if recipe.task == "cls":
        values = {"top1": top1 / n, "top5": top5 / n}
        baselines = {"top1": Counter(dataset.labels.values()).most_common(1)[0][1] / len(dataset.labels), "top5": None}
    else:
        res = seg.compute()
        values = {k: res[k] for k in ("mIoU", "mAcc", "aAcc")}
        baselines = {}
    total = sum(p.numel() for p in model.parameters())
    params = {"total": total, "activated": total - inactive_params(model.vit), "embeddings_counted": True}
    extra = {"expert_load": load.load()} if load.blocks else None
    versions = results.software_versions()
    stamp = results.utc_now()
    rows = [{"run": run, "variant": variant, "task": recipe.task, "split": "val", "metric": k, "value": v,
             "baseline": baselines.get(k), "n": n, "dataset": data_name, "dataset_hash": data_hash, "task_version": 1,
             "params_total": params["total"], "params_activated": params["activated"], "params_detail": params,
             "samples_per_s": n / elapsed if elapsed else None, "ttft_ms": 1000 * elapsed / n,
             "device": str(device), "dtype": "float32", "batch_size": bs, "threads": torch.get_num_threads(),
             "seed": recipe.seed, "git_commit": git_commit(), **versions, "recipe": recipe.name,
             "extra": extra, "timestamp": stamp}
            for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))]
    results.append_rows(results_dir, "metrics", run, rows)
    return rows
