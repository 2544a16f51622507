"""One training stage: freezing, AdamW with per-module lr, cosine schedule with warmup, gradient
accumulation, bf16 autocast on CUDA, resumable checkpoints, a rich progress bar.

The loop is model-agnostic: it gets a module, a loss function and a dataset. Data order is a pure
function of (seed, epoch), and each rank would take every world_size-th batch, so torchrun data
parallelism can wrap the module without changing the loop.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moebench.config import StageConfig
from moebench.models.checkpoint import atomic_dir, load_weights

STATE_FILE = "state.pt"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class StageResult:
    steps: int
    final_loss: float
    rows: list[dict] = field(default_factory=list)


def lr_lambda(stage: StageConfig, total: int) -> Callable[[int], float]:
    """Linear warmup for warmup_ratio * total steps, then cosine decay to 0 (or constant)."""
    warmup = math.ceil(stage.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if stage.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@functools.lru_cache(maxsize=2)
def batch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation, cut into batches, sharded across ranks."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    batches = [perm[i: i + batch_size] for i in range(0, n, batch_size)]
    return batches[rank::world]


def total_steps(stage: StageConfig, n: int) -> int:
    per_epoch = math.ceil(n / stage.batch_size)
    if stage.max_steps:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * per_epoch / stage.grad_accum))


def run_stage(
    module: torch.nn.Module,
    param_groups: list[tuple[str, list[torch.nn.Parameter], float]],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    dataset,
    collate: Callable[[list], dict],
    stage: StageConfig,
    *,
    seed: int,
    work_dir: Path,
    resume: bool,
    device: torch.device,
    precision: str,
    log: Callable[[list[dict]], None],
    on_step: Callable[[int], None] | None = None,
    progress: bool = True,
    after_backward: Callable[[float], dict] | None = None,
    before_step: Callable[[int, int], None] | None = None,
) -> StageResult:
    """Train `module` for one stage. `param_groups` are (name, params, lr); `log` receives training rows."""
    n = len(dataset)
    total = total_steps(stage, n)
    per_epoch = math.ceil(n / stage.batch_size)
    opt = torch.optim.AdamW([{"params": p, "lr": lr, "name": name} for name, p, lr in param_groups],
                            weight_decay=stage.weight_decay, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage, total))
    partial = Path(work_dir) / "partial"
    step = 0
    if resume and (partial / STATE_FILE).is_file():
        load_weights(module, partial / WEIGHTS_FILE)
        state = torch.load(partial / STATE_FILE, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and precision != "fp32") \
        else torch.autocast("cpu", enabled=False)

    def micro_batch(m: int) -> dict:
        epoch, within = divmod(m, per_epoch)
        idx = batch_order(n, stage.batch_size, seed, epoch)[within]
        return {k: v.to(device) for k, v in collate([dataset[i] for i in idx]).items()}

    module.train()
    rows, pending, last_loss = [], [], float("nan")
    acc_loss, acc_logs, acc_tokens, t_log = 0.0, {}, 0, time.perf_counter()
    t_start = time.perf_counter()
    bar = _Bar(progress, stage.name, total, step)
    with bar:
        while step < total:
            if before_step is not None:  # e.g. RoE's phases and temperature
                before_step(step, total)
            for micro in range(stage.grad_accum):
                batch = micro_batch(step * stage.grad_accum + micro)
                with autocast:
                    loss, logs = loss_fn(module, batch)
                (loss / stage.grad_accum).backward()
                if after_backward is not None:  # e.g. STGC: losses that need this step's gradients
                    logs = {**logs, **after_backward(1.0 / stage.grad_accum)}
                acc_loss += loss.item() / stage.grad_accum
                acc_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
                for k, v in logs.items():
                    v = v.detach().float().cpu() if torch.is_tensor(v) else torch.tensor(float(v))
                    acc_logs[k] = acc_logs.get(k, 0.0) + v / stage.grad_accum
            if stage.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for _, ps, _ in param_groups for p in ps], stage.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            k = (step - 1) % stage.log_every + 1  # optimizer steps since the last log row
            if step % stage.log_every == 0 or step == total:
                dt = time.perf_counter() - t_log
                last_loss = acc_loss / k
                row = {"stage": stage.name, "step": step, "epoch": step * stage.grad_accum / per_epoch,
                       "loss": last_loss, "lm_loss": float(acc_logs.get("lm_loss", last_loss * k)) / k,
                       "aux_loss": float(acc_logs.get("aux_loss", 0.0)) / k, "lr": sched.get_last_lr()[0],
                       "extra": _extra(acc_logs, k),
                       "tokens_per_s": acc_tokens / dt if dt > 0 else None,
                       "elapsed_s": time.perf_counter() - t_start}
                rows.append(row)
                pending.append(row)
                bar.update(step, loss=last_loss, tps=row["tokens_per_s"] or 0.0)
                acc_loss, acc_logs, acc_tokens, t_log = 0.0, {}, 0, time.perf_counter()
            else:
                bar.update(step)
            if stage.save_every and step % stage.save_every == 0 and step < total:
                _save_partial(module, opt, sched, step, partial)
                log(pending)
                pending = []
            if on_step is not None:
                on_step(step)
    log(pending)
    module.eval()
    return StageResult(steps=step, final_loss=last_loss, rows=rows)


def _extra(acc_logs: dict, k: int) -> dict | None:
    """Logged statistics other than the losses, averaged over k steps: {"load": {"0": [...]}, ...}
    for keys named "load/0" (statistic / MoE layer)."""
    out: dict = {}
    for key, v in acc_logs.items():
        if key in ("lm_loss", "aux_loss"):
            continue  # columns of their own
        name, _, layer = key.partition("/")
        value = (v / k).tolist()
        if layer:
            out.setdefault(name, {})[layer] = value
        else:
            out[name] = value
    return out or None


def _save_partial(module, opt, sched, step: int, partial: Path) -> None:
    from safetensors.torch import save_model

    with atomic_dir(partial) as tmp:
        save_model(module, str(tmp / WEIGHTS_FILE))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(), "step": step}, tmp / STATE_FILE)


class _Bar:
    """A rich progress bar (loss, tokens/s, ETA), or nothing when progress is off."""

    def __init__(self, enabled: bool, name: str, total: int, done: int):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                              TimeRemainingColumn(), transient=False)
            self.task = self.p.add_task(name, total=total, completed=done, loss=float("nan"), tps=0.0)

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)

    def update(self, step: int, **fields):
        if self.enabled:
            self.p.update(self.task, completed=step, **fields)
