"""`moebench eval --model PATH` on a transformers-native VLM, evaluated as it is: its own model class
(AutoModelForImageTextToText), its processor and chat template, greedy generation through `generate`.

Read today: Qwen3-VL-MoE (`qwen3_vl_moe`, e.g. Qwen3-VL-30B-A3B), Qwen3-VL (`qwen3_vl`) and Aria
(`aria`: its router is named `router`, its shared experts always run). Its rows are
the same kind as a moebench run's: the task's metrics, parameters total and activated (a sparse block
activates top_k of its num_experts routed experts), each sparse layer's expert load (counted by a
forward hook on its router; padding tokens of a batch are routed too and counted), TTFT (prefill up to
the first generated token, timed by a logits processor `generate` calls once per token), TPOT, latency
and samples per second.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from moebench.errors import UserError

NATIVE_VLMS = ("qwen3_vl_moe", "qwen3_vl", "aria")


def _router(m):
    """A sparse block's router (transformers names it `gate` or `router`), or None."""
    r = getattr(m, "gate", None) or getattr(m, "router", None)
    return r if hasattr(r, "top_k") and hasattr(r, "num_experts") and hasattr(m, "experts") else None


def sparse_blocks(model) -> list:
    """transformers' sparse MoE blocks of `model`: a router (top_k, num_experts) beside `experts`."""
    return [m for m in model.modules() if _router(m) is not None]


def native_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for b in sparse_blocks(model):
        e, k = _router(b).num_experts, _router(b).top_k
        inactive += sum(p.numel() for p in b.experts.parameters()) * (e - k) // e
    return {"total": total, "activated": total - inactive, "embeddings_counted": True}


class NativeLoad(contextlib.AbstractContextManager):
    """Token-expert pairs per sparse layer, from the indices its router returns."""

    def __init__(self, model):
        self.blocks = sparse_blocks(model)
        self.counts = [torch.zeros(_router(b).num_experts, dtype=torch.float64) for b in self.blocks]
        self.handles = []

    def __enter__(self):
        for i, b in enumerate(self.blocks):
            def hook(module, args, output, i=i):
                index = output[2]  # (tokens, top_k)
                self.counts[i] += torch.bincount(index.reshape(-1).cpu(), minlength=module.num_experts).double()
            self.handles.append(_router(b).register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        return False

    def extra(self) -> dict:
        if not self.blocks:
            return {}
        return {"expert_load": {str(i): (c / c.sum().clamp(min=1)).tolist() for i, c in enumerate(self.counts)}}


class _FirstToken:
    """A logits processor that notes when `generate` has the first token's logits (the end of prefill)."""

    def __init__(self, device: torch.device):
        self.device, self.at = device, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.at = time.perf_counter()
        return scores


def load_native(path: Path, device):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} could not be loaded as a transformers VLM: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        first = f"no tensor for {missing[0]}" if missing else f"{info['mismatched_keys'][0][0]} has another shape"
        raise UserError(f"{path}: its weights do not cover {type(model).__name__}: {first}; the checkpoint is "
                        "incomplete or of another model")
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


@torch.no_grad()
def evaluate_native(path: Path, task_names: list[str], *, data: str | None, batch_size: int, limit: int | None,
                    results_dir: Path, max_new_tokens: int | None = None, progress: bool = True,
                    log_samples: bool = True, device: torch.device | None = None) -> list[dict]:
    """Evaluate the native VLM at `path` on VQA tasks; append metric (and sample) rows; return metric rows."""
    from PIL import Image

    from moebench import distributed as parallel
    from moebench import results
    from moebench.config import WorldConfig
    from moebench.data.sources import resolve
    from moebench.eval.runner import _batches, _device_name, _peak_memory_mb, _task_bar, sample_rows, score
    from moebench.eval.tasks import load_task, load_samples

    tasks = [load_task(t) for t in task_names]
    for task in tasks:
        if task.head:
            raise UserError(f"task {task.name} is a {task.head} (vision) task; {path} is a vision-language model")
    if parallel.world().size > 1:
        raise UserError("a native VLM evaluates in one process; run `moebench eval` without torchrun / --nproc")
    src = resolve(data, WorldConfig(), progress=progress)  # --data, else $MOEBENCH_DATA, else the shapes world
    device = device or parallel.device()
    model, processor = load_native(Path(path), device)
    params = native_params(model)
    name = Path(path).resolve().name
    common = {"run": name, "variant": "moe" if sparse_blocks(model) else "dense", "params_total": params["total"],
              "params_activated": params["activated"], "params_detail": params, "device": _device_name(device),
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "batch_size": batch_size,
              "threads": torch.get_num_threads(), "seed": 0, "git_commit": "", **results.software_versions(),
              "recipe": None, "recipe_hash": None}

    def prompts(batch, task):
        messages = [[{"role": "user", "content": [{"type": "image"},
                                                  {"type": "text", "text": s.question + task.prompt_suffix}]}]
                    for s in batch]
        texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
        images = [Image.open(s.image).convert("RGB") for s in batch]
        return processor(text=texts, images=images, return_tensors="pt", padding=True).to(device)

    all_rows = []
    for task in tasks:
        samples = load_samples(task, src.root, limit)
        n_new = max_new_tokens or task.max_new_tokens
        model.generate(**prompts(samples[:batch_size], task), max_new_tokens=1, do_sample=False)  # warm-up
        records, ttft, decode, steps, batches, wall = [], 0.0, 0.0, 0, 0, 0.0
        counter = NativeLoad(model)
        with _task_bar(progress, task.name, len(samples)) as bar, counter:
            for batch in _batches(samples, batch_size):
                inputs = prompts(batch, task)
                timer = _FirstToken(device)
                t0 = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, logits_processor=[timer])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t2 = time.perf_counter()
                new = out[:, inputs["input_ids"].shape[1]:]
                ttft, decode, steps, batches = ttft + (timer.at - t0), decode + (t2 - timer.at), steps + new.shape[1] - 1, batches + 1
                wall += t2 - t0
                for s, ids in zip(batch, new):
                    records.append({"split": s.split, "question_id": s.question_id, "sample": s,
                                    "prediction": processor.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                    "latency_ms": 1000 * (t2 - t0), "ttft_ms": 1000 * (timer.at - t0),
                                    "prompt_tokens": int(inputs["attention_mask"][0].sum()),
                                    "output_tokens": int((ids != processor.tokenizer.pad_token_id).sum()),
                                    "batch_size": len(batch)})
                bar(len(batch))
        metric_rows, scores = score(task, records)
        timing = {"ttft_ms": 1000 * ttft / batches, "tpot_ms": 1000 * decode / steps if steps else None,
                  "latency_ms": 1000 * wall / batches, "samples_per_s": len(records) / wall if wall else None,
                  "peak_mem_mb": _peak_memory_mb(device)}
        stamp = results.utc_now()
        rows = [{**common, **timing, **r, "task": task.name, "dataset": src.name, "dataset_hash": src.hash or None,
                 "task_version": task.version, "normalizer": task.normalizer or None, "protocol": task.protocol,
                 "extra": counter.extra() or None, "timestamp": stamp} for r in metric_rows]
        all_rows += rows
        results.append_rows(results_dir, "metrics", name, rows)
        if log_samples:
            results.append_rows(results_dir, "samples", name, sample_rows(name, task, records, scores, stamp))
    return all_rows
