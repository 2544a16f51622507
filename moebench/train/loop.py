"""One training stage: freezing, AdamW with per-module lr, cosine schedule with warmup, gradient
accumulation, bf16 autocast on CUDA, resumable checkpoints, a rich progress bar.

The loop is model-agnostic: it gets a module, a loss function and a dataset. Data order is a pure
function of (seed, epoch): each epoch is a seeded permutation cut into global batches of
`batch_size`. Under torchrun (moebench/distributed.py) rank r of W takes items r, r + W, ... of every
global batch, the loss functions return the loss of the whole global batch, and each rank
backpropagates W * loss / grad_accum, so W processes make the update one process makes: the same
steps, epochs and loss curve for any number of processes.

Checkpoints (`partial/`, every `save_every` steps) hold the weights (safetensors), the optimizer
state keyed by parameter name, the scheduler, the RNG states and the data position; they are written
once (rank 0) into a temp dir renamed into place, and load into any number of processes. A loss that
is NaN or inf stops the stage before the update: the last checkpoint stays as it was and the step is
recorded in `nonfinite.json` beside it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moebench import distributed as parallel
from moebench.config import StageConfig
from moebench.errors import UserError
from moebench.faults import fault_point
from moebench.models.checkpoint import atomic_dir, load_weights
from moebench.results import write_text_atomic

STATE_FILE = "state.pt"
WEIGHTS_FILE = "weights.safetensors"
NONFINITE_FILE = "nonfinite.json"


class NonFiniteLoss(UserError):
    """The loss became NaN or inf: the stage stopped before applying that step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


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
def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch: a seeded permutation cut into batches (the last may be short)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i: i + batch_size] for i in range(0, n, batch_size)]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's items of a global batch: items rank, rank + world, ... (sizes differ by at most one)."""
    return batch[rank::world]


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
    generators: dict[str, torch.Generator] | None = None,
) -> StageResult:
    """Train `module` for one stage. `param_groups` are (name, params, lr); `log` receives training rows.

    `module` may come from moebench.distributed.prepare (DDP / FSDP2); `generators` are RNGs of the
    stage besides torch's own (RoE's random skips), saved in checkpoints with it.
    """
    w = parallel.world()
    net = parallel.unwrap(module)
    generators = generators or {}
    n = len(dataset)
    total = total_steps(stage, n)
    per_epoch = math.ceil(n / stage.batch_size)
    opt = torch.optim.AdamW([{"params": p, "lr": lr, "name": name} for name, p, lr in param_groups],
                            weight_decay=stage.weight_decay, betas=(0.9, 0.999), fused=_fused(param_groups))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage, total))
    partial = Path(work_dir) / "partial"
    step = 0
    if resume and (partial / STATE_FILE).is_file():
        step = _load_partial(net, opt, sched, partial, generators, _position(0, stage, n, seed))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and precision != "fp32") \
        else torch.autocast("cpu", enabled=False)

    def micro_batch(m: int) -> tuple[dict, bool]:
        """This rank's part of global micro-batch m, and whether it is only a stand-in: a global batch
        with fewer items than ranks leaves some ranks none, and they run one item that counts for nothing."""
        epoch, within = divmod(m, per_epoch)
        idx = batch_order(n, stage.batch_size, seed, epoch)[within]
        mine = shard(idx, w.rank, w.size)
        batch = collate([dataset[i] for i in (mine or idx[:1])])
        return {k: v.to(device) for k, v in batch.items()}, not mine

    module.train()
    rows, pending, last_loss = [], [], float("nan")
    acc_loss, acc_logs, acc_tokens, t_log = 0.0, {}, 0, time.perf_counter()
    t_start = time.perf_counter()
    bar = _Bar(progress, stage.name, total, step)
    with bar:
        while step < total:
            if before_step is not None:  # e.g. RoE's phases and temperature
                before_step(step, total)
            step_loss = 0.0
            for micro in range(stage.grad_accum):
                batch, stand_in = micro_batch(step * stage.grad_accum + micro)
                with parallel.grad_sync(module, micro == stage.grad_accum - 1), parallel.stand_in(stand_in):
                    with autocast:
                        loss, logs = loss_fn(module, batch)  # the global batch's loss, alike on every rank
                    (loss * w.size / stage.grad_accum).backward()  # DDP / FSDP2 average over the w.size ranks
                if after_backward is not None:  # e.g. STGC: losses that need this step's gradients
                    logs = {**logs, **after_backward(1.0 / stage.grad_accum)}
                acc_loss += loss.item() / stage.grad_accum
                step_loss += loss.item() / stage.grad_accum
                if not stand_in:
                    acc_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["pixel_values"])
                for k, v in logs.items():
                    v = v.detach().float().cpu() if torch.is_tensor(v) else torch.tensor(float(v))
                    acc_logs[k] = acc_logs.get(k, 0.0) + v / stage.grad_accum
            fault_point("step")  # crash tests: killed after backward, before the update
            if not math.isfinite(step_loss):
                opt.zero_grad(set_to_none=True)
                raise _non_finite(stage, step + 1, total, step_loss, logs, partial, pending)
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
                acc_logs = parallel.mean_across_ranks(acc_logs)  # statistics of each rank's share
                tokens = parallel.sum_across_ranks(acc_tokens)
                row = {"stage": stage.name, "step": step, "epoch": step * stage.grad_accum / per_epoch,
                       "loss": last_loss, "lm_loss": float(acc_logs.get("lm_loss", last_loss * k)) / k,
                       "aux_loss": float(acc_logs.get("aux_loss", 0.0)) / k, "lr": sched.get_last_lr()[0],
                       "extra": _extra(acc_logs, k),
                       "tokens_per_s": tokens / dt if dt > 0 else None,
                       "elapsed_s": time.perf_counter() - t_start}
                rows.append(row)
                pending.append(row)
                bar.update(step, loss=last_loss, tps=row["tokens_per_s"] or 0.0)
                acc_loss, acc_logs, acc_tokens, t_log = 0.0, {}, 0, time.perf_counter()
            else:
                bar.update(step)
            if stage.save_every and step % stage.save_every == 0 and step < total:
                log(pending)  # rows first: a crash before the checkpoint repeats these steps, never loses their rows
                pending = []
                _save_partial(net, opt, sched, partial, generators, _position(step, stage, n, seed))
            if on_step is not None:
                on_step(step)
    log(pending)
    module.eval()
    return StageResult(steps=step, final_loss=last_loss, rows=rows)


def _fused(param_groups) -> bool | None:
    """AdamW's fused kernel (one pass over each parameter instead of a dozen ops: 4% of a shapes stage-II
    step on the CPU) where every parameter is a plain floating tensor on the CPU or CUDA; torch's default
    elsewhere."""
    from torch.distributed.tensor import DTensor

    ps = [p for _, group, _ in param_groups for p in group]
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in ps)
    return True if ps and ok else None


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


def _position(step: int, stage: StageConfig, n: int, seed: int) -> dict:
    """Where the data stream stands after `step` optimizer steps (the next micro-batch to run)."""
    epoch, batch = divmod(step * stage.grad_accum, math.ceil(n / stage.batch_size))
    return {"step": step, "epoch": epoch, "batch": batch, "samples": n, "batch_size": stage.batch_size,
            "grad_accum": stage.grad_accum, "seed": seed}


def _save_partial(net, opt, sched, partial: Path, generators: dict[str, torch.Generator], position: dict) -> None:
    """A resumable checkpoint, written once (rank 0) into a temp dir renamed into place. Weights and
    optimizer state are full (gathered under FSDP2) and keyed by parameter name, so the checkpoint
    loads into any number of processes."""
    from safetensors.torch import save_file, save_model

    weights = parallel.full_state_dict(net) if parallel.sharded(net) else None  # collectives: every rank
    optimizer = parallel.optimizer_state_dict(net, opt)
    if not parallel.world().main:
        return
    state = {"optimizer": optimizer, "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
             "generators": {name: g.get_state() for name, g in generators.items()},
             "step": position["step"], "data": position, "world_size": parallel.world().size}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    with atomic_dir(partial) as tmp:
        if weights is None:
            save_model(net, str(tmp / WEIGHTS_FILE))
        else:
            save_file(_one_per_storage(weights), str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)


def _one_per_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights once (as save_model stores them); loading fills the twin."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v.contiguous()
    return out


def _load_partial(net, opt, sched, partial: Path, generators: dict[str, torch.Generator], expect: dict) -> int:
    """Restore a checkpoint written by `_save_partial` (with any number of processes); return its step."""
    from safetensors.torch import load_file

    state = torch.load(partial / STATE_FILE, weights_only=True)
    data = state.get("data", {})
    for key in ("samples", "batch_size", "grad_accum", "seed"):
        if key in data and data[key] != expect[key]:
            raise UserError(f"cannot resume from {partial}: it was written with {key}={data[key]}, this run has "
                            f"{expect[key]}; remove the folder to start the stage over")
    if parallel.sharded(net):
        parallel.load_full_state_dict(net, load_file(str(partial / WEIGHTS_FILE)))
    else:
        load_weights(net, partial / WEIGHTS_FILE)
    if all(isinstance(k, int) for k in state["optimizer"]["state"]):  # written before names keyed it
        opt.load_state_dict(state["optimizer"])
    else:
        parallel.load_optimizer_state_dict(net, opt, state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    for name, g in generators.items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])
    return state["step"]


def _non_finite(stage: StageConfig, step: int, total: int, loss: float, logs: dict, partial: Path,
                pending: list[dict]) -> NonFiniteLoss:
    """The error for a NaN / inf loss at `step`; rank 0 records it in nonfinite.json beside the checkpoint."""
    saved = None
    if (partial / STATE_FILE).is_file():
        saved = torch.load(partial / STATE_FILE, weights_only=True)["step"]
    record = Path(partial).parent / NONFINITE_FILE
    if parallel.world().main:
        terms = {k: float(v) for k, v in logs.items() if k in ("lm_loss", "aux_loss")}  # last micro-batch
        info = {"stage": stage.name, "step": step, "loss": str(loss), "terms": terms, "checkpoint_step": saved,
                "rows_since_checkpoint": pending}
        write_text_atomic(record, json.dumps(info, indent=1, default=str))
    kept = (f"the last good checkpoint (step {saved}) is kept in {partial}" if saved is not None else
            f"no checkpoint was written before it (stages.{stage.name}.save_every={stage.save_every})")
    return NonFiniteLoss(f"stage {stage.name}: the loss is {loss} at step {step} of {total}; stopped before that "
                         f"update, {kept}; recorded in {record}. Lower stages.{stage.name}.lr or check the data",
                         step)


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
