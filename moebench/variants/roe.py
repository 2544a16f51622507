"""RoE (`variant: roe`, section `roe:`): at the stage with `add_roe: true` the routable LLM layers get an
adapter shortcut and a router (moebench/roe/model.py); from then on the loss is the per-example
structure-sparsity objective and a phase hook moves warm-up -> route -> tune; model.json stores the
section; evaluation counts each layer's skip rate and the activated parameters the skips give."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moebench.config import to_dict
from moebench.errors import UserError
from moebench.variants.base import Counter, HookCounter, StageHooks, Variant


def per_example(loss_fn):
    """A loss that is a mean over examples (RoE's regularised objective): over the global batch's
    examples under data parallelism."""

    from moebench import distributed as parallel

    def global_loss_fn(model, batch):
        loss, logs = loss_fn(model, batch)
        return parallel.global_mean(loss, batch["labels"].shape[0]), logs

    return global_loss_fn


class _SkipCounter(HookCounter):
    """Per routable layer, the examples that skipped it (moebench.roe.model.SkipCounter), over ranks."""

    @property
    def skips(self):
        return self.inner

    def state(self):
        return {i: (layer.seen, layer.skipped) for i, layer in self.skips.layers}

    def merge(self, states: list) -> None:
        for i, layer in self.skips.layers:
            layer.seen, layer.skipped = (sum(x) for x in zip(*(s[i] for s in states)))

    def extra(self) -> dict:
        if not self.skips.layers:
            return {}
        rates = self.skips.rates()
        return {"skip_rate": rates, "skip_ratio": sum(rates.values()) / len(self.skips.layers)}  # over routable layers


class RoE(Variant):
    name = "roe"
    section = "roe"
    stage_flag = "add_roe"
    stores = "roe"
    structure = "an RoE"
    param_names = ("roe",)  # routing tokens, adapters and layer routers
    separate_from_llm = ("roe",)  # llm then means the rest of the LLM

    def validate(self, recipe) -> None:
        self.one_transform_stage(recipe)
        r = recipe.roe
        if r is None:
            return
        if not 0 <= r.target_skip < 1:
            raise UserError(f"roe.target_skip={r.target_skip} must be in [0, 1)")
        if r.adapter_rank is not None and r.adapter_rank <= 0:
            raise UserError(f"roe.adapter_rank={r.adapter_rank} must be > 0 (or null for hidden_size / 2)")
        if r.reg_coef < 0:
            raise UserError(f"roe.reg_coef={r.reg_coef} must be >= 0")
        if not (r.temp_start > 0 and r.temp_end > 0):
            raise UserError("roe.temp_start and roe.temp_end must be > 0")
        if not 0 <= r.warmup_fraction <= r.tune_fraction <= 1:
            raise UserError(f"roe: need 0 <= warmup_fraction ({r.warmup_fraction}) <= tune_fraction "
                            f"({r.tune_fraction}) <= 1")
        if r.layers is not None and recipe.model.llm.pretrained is None:
            n = recipe.model.llm.layers
            bad = [i for i in r.layers if not 1 <= i < n]
            if bad:
                raise UserError(f"roe.layers: index {bad[0]} is out of range; routable layers are 1..{n - 1} "
                                "(layer 0 is never skipped: the KV-cache length is read from it)")
        if r.layers is None and recipe.model.llm.pretrained is None and recipe.model.llm.layers < 3:
            raise UserError(f"roe: an LLM of {recipe.model.llm.layers} layers has none to route (the first and last "
                            "always run); set roe.layers or use 3 or more layers")
        if r.layers is not None and 0 in r.layers:
            raise UserError("roe.layers: layer 0 cannot be routable (the KV-cache length is read from it)")

    def stage_key_part(self, recipe, i: int) -> dict:
        return {"roe": to_dict(recipe.roe)} if self.applied(recipe, i) else {}

    def transform(self, model, recipe, i: int) -> str | None:
        if i != self.stage_index(recipe):
            return None
        from moebench.roe.model import add_roe

        layers = add_roe(model, recipe.roe, recipe.model.llm.attn_implementation)
        return f"RoE: layers {layers} may be skipped (target skip ratio {recipe.roe.target_skip})"

    def param_parts(self, model) -> dict[str, list]:
        from moebench.roe.model import roe_parameters

        return {"roe": roe_parameters(model)}

    def loss_fn(self, loss_fn, recipe, i: int):
        if not self.applied(recipe, i):
            return loss_fn
        from moebench.roe.model import roe_loss_fn

        return per_example(roe_loss_fn(recipe.roe))

    def stage_hooks(self, net, recipe, i: int, kind: str, parts: dict[str, list]) -> StageHooks | None:
        if not (self.applied(recipe, i) and kind == "lm"):
            return None
        from moebench.roe.model import phase_hook

        before_step = phase_hook(net, recipe.roe, parts)
        return StageHooks(before_step=before_step, generators={"roe": net.roe.ctx.generator})

    def end_stage(self, model, recipe, i: int) -> None:
        if self.applied(recipe, i):
            model.roe.ctx.mode = "hard"

    def checkpoint_config(self, recipe, i: int) -> dict:
        return {"roe": to_dict(recipe.roe)} if self.applied(recipe, i) else {}

    def rebuild(self, model, meta: dict) -> None:
        if meta.get("roe"):
            from moebench.config import RoEConfig, from_dict
            from moebench.roe.model import add_roe

            add_roe(model, from_dict(RoEConfig, meta["roe"], "roe"))  # rebuilt LMs run transformers' default, SDPA

    def counter(self, model) -> Counter:
        from moebench.roe.model import SkipCounter

        return _SkipCounter(SkipCounter(model))

    def activated_params(self, model, extra: dict) -> dict | None:
        if "skip_rate" not in extra:
            return None
        from moebench.models.params import count_params

        return count_params(model, extra)  # from the decisions actually taken

    def plan(self, model, recipe) -> dict:
        if self.stage_index(recipe) is None:
            return {}
        from moebench.roe.model import add_roe

        r = recipe.roe
        # activated at the target skip ratio (the measured one is in the eval rows)
        layers = add_roe(model, r, recipe.model.llm.attn_implementation)
        return {"note": f"RoE: {len(layers)} routable layers, activated at target skip {r.target_skip}",
                "stats": {"skip_rate": {str(i): r.target_skip for i in layers}},
                "roe_layers": layers, "roe_target_skip": r.target_skip}


ROE = RoE()


def roe_index(recipe) -> int | None:
    """The index of the stage that adds RoE, or None."""
    return ROE.stage_index(recipe)


# ------------------------------------------------------------ `moebench bench roe`
def bench_roe(
    model: Optional[Path] = typer.Option(None, "--model", help="An RoE run directory; default: the most recent run."),
    task: str = typer.Option("gqa", help="Whose prompts to time."),
    limit: int = typer.Option(256, min=1, help="Prompts timed (the same prompts at every batch size)."),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", help="Comma-separated batch sizes."),
    new_tokens: int = typer.Option(4, "--new-tokens", min=1, help="Tokens generated per prompt (fixed)."),
    repeats: int = typer.Option(3, min=1, help="Timed rounds per mode (median)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's own)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Directory of runs and cached stage checkpoints."),
    profile: Optional[Path] = typer.Option(None, "--profile", help="Also profile one pass per mode and batch size "
                                           "with torch.profiler: operator tables written to this directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (not with --json)."),
):
    """Time per sample of an RoE run skipping for real (and decoding in batches of one skip pattern) vs
    the same model running every layer, at each batch size; reports s, f and the target 1 - 0.7 f s, and
    the same timing with the prompts sorted by skip pattern (the most any batching can give)."""
    from moebench.cli import out

    import torch

    if threads:
        torch.set_num_threads(threads)

    from moebench.roe.bench import bench_roe as run_bench
    from moebench.runs import latest_run, open_run

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes {batch_sizes!r}: give integers, e.g. 1,8") from None
    if profile is not None and profile.exists() and not profile.is_dir():
        raise UserError(f"--profile {profile}: that is a file; give a directory for the profiler's tables")
    run = open_run(model) if model else latest_run(runs)
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device {device!r}: give cpu, or cuda on a machine with a GPU")
    r = run_bench(run, task=task, limit=limit, batch_sizes=sizes, max_new_tokens=new_tokens, repeats=repeats,
                  device=device, progress=progress and not as_json, profile_dir=profile)
    if as_json:
        print(json.dumps(r, indent=1))
        return
    from rich.table import Table

    t = Table(title=f"RoE {r['run']}: {r['samples']} {r['task']} prompts, {r['new_tokens']} new tokens, "
                    f"skip ratio {r['skip_ratio_all_layers']:.3f} of all layers")
    for col in ("batch size", "RoE ms/sample", "dense ms/sample", "prefill RoE/dense", "decode RoE/dense",
                "RoE / dense", "f", "1 - f s", "1 - 0.7 f s", "rounds under", "= one at a time",
                "one-pattern batches"):
        t.add_column(col, justify="right")
    for bs, x in r["by_batch_size"].items():
        pre, dec = x["prefill_ms_per_sample"], x["decode_ms_per_sample"]
        t.add_row(bs, f"{x['roe_ms_per_sample']:.2f}", f"{x['dense_ms_per_sample']:.2f}",
                  f"{pre['roe']:.2f}/{pre['dense']:.2f}", f"{dec['roe']:.2f}/{dec['dense']:.2f}", f"{x['ratio']:.3f}",
                  f"{x['decoder_share_f']:.3f}", f"{x['bound_1_minus_f_s']:.3f}",
                  f"{x['bound_1_minus_0.7_s_f']:.3f}", f"{x['rounds_under_bound']}/{x['rounds']}",
                  "yes" if x["identical_to_one_at_a_time"] else "NO", f"{x['ratio_batches_of_one_pattern']:.3f}")
    out.print(t)
    out.print(f"skip rate per layer: {r['skip_rate']}; prompts per skip pattern (r = run, s = skip, per routable "
              f"layer): {r['skip_patterns']}")
    out.print("one-pattern batches: RoE / dense with the prompts sorted by skip pattern, so no batch splits a layer: "
              "the most any batching gives")
    for bs, x in r["by_batch_size"].items():
        if "ops_differing_most" in x:
            out.print(f"batch {bs}: operators whose time differs most, us per prompt dense -> RoE: " + ", ".join(
                f"{o['op']} {o['dense_us_per_sample']:.0f} -> {o['roe_us_per_sample']:.0f}"
                for o in x["ops_differing_most"][:6]))
    if profile:
        out.print(f"profiler tables: {profile}/{{dense,roe}}-batch{{N}}.txt")


ROE.commands = {'roe': bench_roe}
