"""Evaluate a vision recipe's model on classification and segmentation tasks: metric rows in the same
schema as the VQA tasks (plus a samples row per classified image).

Classification: top-1 / top-5 over the split's images; majority = always the most frequent class.
Segmentation: mIoU / mAcc / aAcc as mmseg computes them (moebench.vision.seg_metrics), each prediction
compared at its label's full resolution (logits upsampled bilinearly), whole-image or sliding-window
(the recipe's `slide_stride`). Timings: images per second and the mean wall time of a batch's forward;
the token timings (TTFT / TPOT) stay null.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from torch import nn

from moebench import distributed as parallel
from moebench import results
from moebench.data.sources import DataSource
from moebench.errors import UserError


def vision_params(model) -> dict:
    """Total and activated parameters of a vision model (a routed block's unused experts are not activated)."""
    from moebench.models.params import inactive_params

    total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    return {"total": total, "activated": total - inactive_params(model.vit), "vit": total - heads, "heads": heads,
            "embeddings_counted": True}


@torch.no_grad()
def evaluate_vision(run, model, tasks: list, src: DataSource, *, batch_size: int, limit: int | None,
                    results_dir: Path, device: torch.device, progress: bool = True, log_samples: bool = True) -> list[dict]:
    from moebench import variants
    from moebench.eval.runner import _peak_memory_mb, _task_bar, common_fields
    from moebench.vision.data import IGNORE, collate, load_split, pixels
    from moebench.vision.seg_metrics import SegEvaluator
    from moebench.vision.vit import slide_inference

    w = parallel.world()
    if w.size > 1:
        raise UserError("vision tasks evaluate in one process; run `moebench eval` without torchrun / --nproc")
    recipe = run.recipe
    for task in tasks:
        if task.head not in model.num_classes:
            raise UserError(f"run {run.name} has no {task.head} head (its recipe trained on {recipe.tasks}); "
                            f"evaluate it on tasks of those kinds")
    chain = variants.chain(recipe.variant)
    params = vision_params(model)
    for v in chain:
        p = v.activated_params(model, {})
        if p is not None:
            params = p
    common = common_fields(run, model, params, device, batch_size)
    size = model.vit.image_size[0]
    model.eval()
    all_rows = []
    for task in tasks:
        classes = model.classes[task.head]
        metric_rows, samples, n_images, elapsed, batches = [], [], 0, 0.0, 0
        splits = {split: load_split(task, src.root, split, classes, limit) for split in task.splits}
        first = next(iter(splits.values()))
        model(torch.stack([pixels(p, size) for p in first.images[:batch_size]]).to(device))  # warm-up, not counted
        counters = [c for v in chain if (c := v.counter(model)) is not None]
        with contextlib.ExitStack() as stack:
            for c in counters:
                stack.enter_context(c)
            for split, data in splits.items():
                seg = SegEvaluator(len(classes), ignore_index=IGNORE) if task.head == "seg" else None
                top1 = top5 = 0
                idx_batches = [list(range(i, min(len(data), i + batch_size))) for i in range(0, len(data), batch_size)]
                with _task_bar(progress, f"{task.name} {split}", len(data)) as bar:
                    for idx in idx_batches:
                        batch = torch.stack([pixels(data.images[i], size) for i in idx]).to(device)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t = time.perf_counter()
                        if task.head == "seg" and recipe.slide_stride:
                            logits = slide_inference(model.segment, batch, size, recipe.slide_stride, len(classes))
                        else:
                            logits = model(batch)[task.head]
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        dt = time.perf_counter() - t
                        elapsed, batches = elapsed + dt, batches + 1
                        logits = logits.float().cpu()
                        if task.head == "cls":
                            best = logits.topk(min(5, len(classes)), dim=-1).indices  # (B, 5)
                            labels = collate([{"y": data.label(i)} for i in idx])["y"]
                            top1 += int((best[:, 0] == labels).sum())
                            top5 += int((best == labels[:, None]).any(-1).sum())
                            samples += [{"split": split, "question_id": Path(data.images[i]).stem,
                                         "image": Path(data.images[i]).name, "prediction": classes[int(b[0])],
                                         "target": classes[int(y)], "score": float(b[0] == y),
                                         "latency_ms": 1000 * dt, "batch_size": len(idx)}
                                        for i, b, y in zip(idx, best, labels)]
                        else:
                            for i, lg in zip(idx, logits):
                                label = data.label(i)  # (H, W) at full resolution
                                if tuple(lg.shape[-2:]) != tuple(label.shape):
                                    lg = nn.functional.interpolate(lg[None], size=tuple(label.shape), mode="bilinear",
                                                                   align_corners=False)[0]
                                seg.update(lg.argmax(0).numpy(), label.numpy())
                        bar(len(idx))
                n_images += len(data)
                if task.head == "cls":
                    values = {"top1": top1 / len(data), "top5": top5 / len(data)}
                    baselines = {"top1": data.majority_share()}
                else:
                    res = seg.compute()
                    values, baselines = {k: res[k] for k in ("mIoU", "mAcc", "aAcc")}, {}
                metric_rows += [{"split": split, "metric": k, "value": v, "baseline": baselines.get(k), "n": len(data)}
                                for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))]
        extra = {}
        for c in counters:
            extra.update(c.extra())
        timing = {"ttft_ms": None, "tpot_ms": None, "latency_ms": 1000 * elapsed / batches if batches else None,
                  "samples_per_s": n_images / elapsed if elapsed else None, "peak_mem_mb": _peak_memory_mb(device)}
        stamp = results.utc_now()
        rows = [{**common, **timing, **r, "task": task.name, "dataset": src.name,
                 "dataset_hash": src.hash or None, "task_version": task.version, "normalizer": None,
                 "protocol": task.protocol,
                 "extra": extra or None, "timestamp": stamp} for r in metric_rows]
        all_rows += rows
        results.append_rows(results_dir, "metrics", run.name, rows)
        if log_samples and samples:
            results.append_rows(results_dir, "samples", run.name, [
                {"run": run.name, "task": task.name, "prompt": None, "ttft_ms": None, "prompt_tokens": None,
                 "output_tokens": None, "timestamp": stamp, **s} for s in samples])
    return all_rows
