"""Data parallelism on torch.distributed: the process group torchrun describes, DDP / FSDP2 wrapping,
sums across ranks for exact global-batch losses, full state dicts for checkpoints, rank-0 writes.

`torchrun --nproc-per-node N -m moebench train RECIPE` starts N copies of one command. Each optimizer
step still sees the recipe's global batch: rank r takes items r, r + W, ... of every batch (W ranks),
and every loss is the loss of the whole global batch, the same value on every rank, built from sums
across ranks (`global_mean`, `gather_rows`). Those sums pass gradients back to this rank's share only
(forward all-reduce, identity backward: Megatron-LM's "reduce from model-parallel region"), and DDP /
FSDP2 average gradients over the W ranks, so each rank backpropagates W * loss and the update equals
one process's update on the same global batch.

Without torchrun's environment (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

KINDS = ("ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, stage caches and result rows."""
        return self.rank == 0


def world() -> World:
    """This process's place in the initialised process group (one process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def launched() -> bool:
    """True inside a torchrun worker of a job with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> World:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); one process otherwise."""
    if launched() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """This rank's device: its local GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled); the argument of other ranks is ignored."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order (pickled)."""
    if world().size == 1:
        return [obj]
    out: list = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def node_first(fn: Callable[[], T]) -> T:
    """Run `fn` on each machine's first process, then on the others: a cache on the machine (the
    shapes world under $MOEBENCH_CACHE) is filled once and then read, not built by every rank."""
    w = world()
    if w.local_rank == 0:
        out = fn()
    barrier()
    if w.local_rank != 0:
        out = fn()
    return out


# ---------------------------------------------------------------------------- global-batch losses

_share = 1.0  # 0 while this rank runs a stand-in micro-batch (the global batch had fewer items than ranks)


@contextlib.contextmanager
def stand_in(active: bool):
    """While active, this rank's items count for nothing in global sums (they only keep DDP in step)."""
    global _share
    old, _share = _share, (0.0 if active else 1.0)
    try:
        yield
    finally:
        _share = old


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) forward, identity backward: each rank's gradient is that of its own share."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad


def global_mean(mean: torch.Tensor, count) -> torch.Tensor:
    """The mean over the whole global batch of a quantity this rank averaged over its own `count` items
    (tokens, examples): sum_r mean_r * count_r / sum_r count_r. Returns `mean` itself in one process."""
    if world().size == 1:
        return mean
    count = torch.as_tensor(count, dtype=torch.float32, device=mean.device).reshape(1) * _share
    total = _SumAcrossRanks.apply(torch.cat([mean.float().reshape(-1) * count, count]))
    return (total[:-1] / total[-1].clamp(min=1.0)).reshape(mean.shape)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` concatenated in rank order (ranks may hold different numbers of rows);
    only this rank's rows carry gradient. Returns `x` itself in one process."""
    w = world()
    if w.size == 1:
        return x
    if _share == 0:
        x = x[:0]
    sizes = all_gather(x.shape[0])  # all_gather needs equal shapes: pad to the largest, then cut
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [p[:n] for p, n in zip(parts, sizes)]
    parts[w.rank] = x
    return torch.cat(parts)


def shard_rand(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) uniform draws for this rank's n items of a global batch: the very numbers one process draws
    for them (every rank draws the whole batch's and keeps items rank, rank + W, ..., the items
    train/loop.py `shard` gives it), so random decisions per example do not depend on the ranks."""
    w = world()
    if w.size == 1:
        return torch.rand(n, generator=generator)
    sizes = all_gather(n if _share else 0)
    draws = torch.rand(sum(sizes), generator=generator)[w.rank:: w.size]
    return draws if _share else torch.zeros(n)  # a stand-in's decisions count for nothing


def mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logged statistics averaged over ranks (one all_reduce); the same dict in one process."""
    w = world()
    if w.size == 1 or not values:
        return values
    keys = sorted(values)
    flat = torch.cat([values[k].detach().float().reshape(-1).to(device()) for k in keys])
    dist.all_reduce(flat)
    flat = (flat / w.size).cpu()
    out, i = {}, 0
    for k in keys:
        n = values[k].numel()
        out[k] = flat[i: i + n].reshape(values[k].shape)
        i += n
    return out


def sum_across_ranks(x: float) -> float:
    if world().size == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t.item())


# ---------------------------------------------------------------------------- wrapping


class DDPModel:
    """A model seen through its DistributedDataParallel wrapper: calls go through DDP (so gradients are
    averaged across ranks), attributes are the model's own (its MoE blocks, RoE context, ...)."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel):
        self.ddp = ddp

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.ddp.module, name)


def unwrap(module) -> nn.Module:
    """The model whose parameters train (the model inside DDP; FSDP2 shards in place)."""
    return module.ddp.module if isinstance(module, DDPModel) else module


def sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(module), FSDPModule)


def prepare(model: nn.Module, kind: str, select: Callable[[nn.Module], T]) -> tuple[object, nn.Module, T]:
    """Wrap `model` for one training stage; returns (what a step calls, the model it trains, select(it)).

    `select` marks the trainable parameters (requires_grad) and returns the optimizer's groups; it
    must see the parameters that will train, so the order depends on the kind:
    - one process: (model, model, select(model));
    - ddp: select first (DDP registers the parameters that require grad when it is built), then
      DistributedDataParallel with find_unused_parameters: parameters without a gradient in a step are
      common here (RoE layers an example skips, routers in RoE's warm-up, the vision tower's final
      norm that stage 0's pooling never reads);
    - fsdp: `model` moves to the CPU (each GPU holds only its shards while the stage trains); a copy
      of it is sharded with `fully_shard` per transformer block then on the root (FSDP2 replaces the
      parameters by sharded DTensors and moves them to this rank's GPU), then select on the copy.
      `copy_back` returns the trained weights to `model` at the end of the stage, so the next stage
      can transform it (upcycle, RoE).
    """
    w = world()
    if w.size == 1:
        return model, model, select(model)
    if kind == "ddp":
        groups = select(model)
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[w.local_rank] if torch.cuda.is_available() else None, forward_sync_buffers=False,
            find_unused_parameters=True)
        return DDPModel(ddp), model, groups
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model.to("cpu")
        _broadcast_parameters(model)  # every rank shards rank 0's weights
        net = copy.deepcopy(model)
        for block in _blocks(net):
            fully_shard(block)
        fully_shard(net)
        from moebench.models.extensions import LMExtension

        if any(isinstance(m, LMExtension) and m.uneven_gradients for m in net.children()):
            # a parameter one rank leaves without a gradient while another gives it one (an extension's
            # layer that every example of that rank's share skips) reduce-scatters zeros there. Not in
            # general: a parameter no rank uses (the vision tower's final norm in stage 0) must keep no
            # gradient, as in one process, or AdamW's weight decay would move it
            net.set_reduce_scatter_unused_params(True)
        return net, net, select(net)
    raise ValueError(f"distributed={kind!r}; choose one of {list(KINDS)}")


def copy_back(net: nn.Module, model: nn.Module) -> None:
    """After an FSDP2 stage: the trained full weights into the unsharded `model` (on the CPU), on every
    rank (gathered on rank 0, then broadcast)."""
    if net is model or not sharded(net):
        return
    state = full_state_dict(net)
    if world().main:
        model.load_state_dict(state)
    _broadcast_parameters(model)


@contextlib.contextmanager
def grad_sync(module, sync: bool):
    """Gradient accumulation: no all-reduce / reduce-scatter until the step's last micro-batch."""
    if isinstance(module, DDPModel) and not sync:
        with module.ddp.no_sync():
            yield
        return
    if sharded(module):
        module.set_requires_gradient_sync(sync)
    yield


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (items of every `layers` ModuleList: LLM decoder, vision / text encoders)."""
    return [block for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers")
            for block in m]


def _broadcast_parameters(model: nn.Module) -> None:
    """Rank 0's weights and buffers into `model` on every rank (through the GPU under nccl)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            buf = t.to(device())
            dist.broadcast(buf, src=0)
            if buf is not t:
                t.copy_(buf)


# ---------------------------------------------------------------------------- checkpoints


def full_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full weights for a checkpoint. FSDP2: a collective (every rank calls it); rank 0
    gets the gathered tensors on the CPU, other ranks an empty dict."""
    if not sharded(net):
        return net.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full weights (as saved by any number of processes) into a sharded model; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    own = net.state_dict()
    for k, v in own.items():  # tied weights (lm_head = embeddings) may be stored once
        if k not in state:
            twin = next((j for j, u in own.items() if u is v and j in state), None)
            if twin is not None:
                state[k] = state[twin]
    set_model_state_dict(net, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state_dict(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, so it loads into any number of processes. FSDP2: a
    collective; rank 0 gets the gathered state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if sharded(net) else None
    return get_optimizer_state_dict(net, opt, options=options)


def load_optimizer_state_dict(net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer state saved by `optimizer_state_dict` (with any number of processes) into `opt`.

    Parameters that had no gradient before the checkpoint (RoE's routers during its warm-up) have no
    saved state and must keep none: torch.distributed.checkpoint would refuse them, or with
    strict=False give them a zero step, which changes AdamW's bias correction of their first update.
    They are hidden from it (requires_grad off) while it loads."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names: dict[torch.Tensor, set[str]] = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        names.setdefault(p, set()).add(name)
    fresh = [p for g in opt.param_groups for p in g["params"]
             if p.requires_grad and not names.get(p, set()) & set(state["state"])]
    for p in fresh:
        p.requires_grad_(False)
    try:
        set_optimizer_state_dict(net, opt, state, options=StateDictOptions(full_state_dict=sharded(net)))
    finally:
        for p in fresh:
            p.requires_grad_(True)
