"""The `moebench` command line. Each command is a thin function over the package; heavy imports
(torch, transformers) happen inside the commands so `moebench --help` stays instant."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moebench import variants
from moebench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate dense / MoE / STGC / RoE vision-language models side by side; "
                       "results go to Arrow tables.")
data_app = typer.Typer(no_args_is_help=True, help="Generate or inspect datasets.")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(no_args_is_help=True, help="Micro-benchmarks; timings are ratios taken in one run.")
app.add_typer(bench_app, name="bench")
analyze_app = typer.Typer(no_args_is_help=True, help="Analyses of trained runs.")
app.add_typer(analyze_app, name="analyze")
err = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)  # piped / logged tables keep their columns

RUNS = typer.Option(Path("runs"), "--runs", help="Directory of runs and cached stage checkpoints.")
RESULTS = typer.Option(Path("results"), "--results", help="Directory the Arrow result tables are written to.")
NPROC = typer.Option(None, "--nproc", min=1, help="Run in N processes on this machine (torchrun --standalone): "
                                                     "data parallel, DDP or FSDP2 as the recipe's `distributed:` says.")


def _version(value: bool) -> None:
    if value:
        from moebench import __version__

        print(f"moebench {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print moebench's version and exit.")):
    """(Options before the command.) `--version` is eager: it prints and exits before any command runs."""


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML or bundled recipe name, e.g. recipes/shapes_dense.yaml or shapes_dense."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="More recipes (files or bundled names), trained in order in this process, then key=value overrides for every "
                   "recipe, e.g. stages.finetune.lr=1e-4 seed=1."),
    runs: Path = RUNS,
    results: Path = RESULTS,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted stage from its last checkpoint."),
    eval_: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate the recipe's tasks after training."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    nproc: Optional[int] = NPROC,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the data files, records and tasks, build the "
                                 "full-size model on the meta device and print each stage's parameters and memory "
                                 "per GPU; train nothing."),
    gpus: int = typer.Option(8, "--gpus", min=1, help="With --dry-run: also plan memory for this many GPUs."),
):
    """Train every stage of RECIPE (reusing cached stages), save the run, then evaluate its tasks.

    Several recipes (`moebench train recipes/shapes_dense.yaml recipes/shapes_moe.yaml`) train one after
    the other in one process; a variant reuses the stages it shares with the recipes before it.
    Multi-GPU: `torchrun --nproc-per-node N -m moebench train RECIPE` (or --nproc N on one machine)."""
    from moebench.bundled import find_yaml, names_a_recipe
    from moebench.config import load_recipe

    paths, sets = [recipe], []
    for arg in overrides or []:
        if not names_a_recipe(arg):
            sets.append(arg)  # load_recipe names a malformed one
        elif sets:
            raise UserError(f"recipe {arg} comes after the overrides; put every recipe first, then the key=value overrides")
        else:
            paths.append(Path(arg))
    paths = [find_yaml(p) for p in paths]  # files, for the torchrun workers too
    recs = [load_recipe(p, sets) for p in paths]  # a bad recipe (or task) fails here, before anything trains
    if dry_run:
        for rec in recs:
            _print_dry_run(rec, gpus)
        return
    if (nproc or 1) > 1:
        _torchrun(nproc, ["train", *map(str, paths), *sets, "--runs", str(runs), "--results", str(results),
                          *(["--resume"] if resume else []), "--eval" if eval_ else "--no-eval",
                          "--progress" if progress else "--no-progress"])
        return
    for rec in recs:
        _train_one(rec, runs=runs, results=results, resume=resume, eval_=eval_, progress=progress)


def _print_dry_run(rec, gpus: int) -> None:
    from rich.table import Table

    from moebench.dryrun import dry_run

    r = dry_run(rec, gpus)
    for line in r["checks"]:
        out.print(f"[green]ok[/] {line}")
    t = Table(title=f"{r['recipe']}: plan per stage ({rec.precision}, {rec.distributed}); memory per GPU in GiB, "
                    "without / with gradient checkpointing")
    for col in ("stage", "params total", "activated", "trainable", "frozen", "micro-batch",
                *[f"{n} GPU{'s' if n > 1 else ''}" for n in r["gpus"]]):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for s in r["stages"]:
        mem = [f"{s['memory'][n]['total']:.1f} / {s['memory'][n]['total_ckpt']:.1f}" for n in r["gpus"]]
        t.add_row(s["stage"], _b(s["total"]), _b(s["activated"]), _b(s["trainable"]), _b(s["total"] - s["trainable"]),
                  f"{s['batch']} x {s['seq']}" if s["seq"] else f"{s['batch']} images", *mem)
    out.print(t)
    first = r["stages"][-1]["memory"][1]
    same = "" if rec.kind == "vision" else " (as `moebench plan`)"
    out.print(f"final model: {_b(r['plan_total'])} parameters, {_b(r['plan_activated'])} activated per token{same}; "
              f"last stage on 1 GPU: weights {first['weights']:.1f}, gradients {first['grads']:.1f}, "
              f"AdamW {first['optimizer']:.1f}, activations {first['activations']:.1f} "
              f"({first['activations_ckpt']:.1f} with checkpointing) GiB")


def _train_one(rec, *, runs: Path, results: Path, resume: bool, eval_: bool, progress: bool) -> None:
    from moebench.train.pipeline import train as run_train

    run = run_train(rec, runs_dir=runs, results_dir=results, resume=resume, progress=progress)
    if _rank() == 0:
        err.print(f"[green]trained[/] {run.dir} (final loss {run.meta['final_loss']:.4f}, {run.meta['train_seconds']:.0f}s)")
    if eval_ and rec.eval_tasks:
        from moebench.eval.runner import evaluate_run

        rows = evaluate_run(run, rec.eval_tasks, data=None, batch_size=rec.eval.batch_size, limit=rec.eval.limit,
                            results_dir=results, max_new_tokens=rec.eval.max_new_tokens, progress=progress)
        _print_headlines(rows)


@app.command("eval")
def eval_cmd(
    tasks: str = typer.Option("pope,gqa", "--tasks", help="Comma-separated task names (see `moebench ls`)."),
    model: Optional[Path] = typer.Option(None, "--model", help="A run directory, or a checkpoint directory of another "
                                         "layout (llava-hf, LLaVA-1.5, MoE-LLaVA: converted once, under "
                                         "RUNS/.converted/; Qwen3-VL(-MoE): evaluated as it is); default: the "
                                         "most recent run."),
    data: Optional[str] = typer.Option(None, "--data", help="'shapes' or a data root (default: the run's own data, or $MOEBENCH_DATA)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per generation batch."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate the first N samples of each split."),
    log_samples: bool = typer.Option(True, "--log-samples/--no-log-samples", help="Write the per-sample table."),
    runs: Path = RUNS,
    results: Path = RESULTS,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    nproc: Optional[int] = NPROC,
):
    """Evaluate a trained run on tasks and append metric and sample rows to the results directory.

    Data-parallel: `torchrun --nproc-per-node N -m moebench eval ...` (or --nproc N) splits the samples."""
    from moebench.eval.runner import evaluate_run
    from moebench.runs import latest_run

    from moebench.interop.convert import layout, open_any

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty; name at least one task, e.g. --tasks pope,gqa")
    if model and layout(model) == "native-vlm":  # evaluated as it is: its own classes, processor, template
        from moebench.interop.native import evaluate_native

        _print_headlines(evaluate_native(model, names, data=data, batch_size=batch_size, limit=limit,
                                         results_dir=results, progress=progress, log_samples=log_samples))
        return
    run = open_any(model, runs, say=err.print) if model else latest_run(runs)
    if (nproc or 1) > 1:
        _torchrun(nproc, ["eval", "--tasks", ",".join(names), "--model", str(run.dir), *(["--data", data] if data else []),
                          "--batch-size", str(batch_size), *(["--limit", str(limit)] if limit else []),
                          "--log-samples" if log_samples else "--no-log-samples", "--results", str(results),
                          "--progress" if progress else "--no-progress"])
        return
    rows = evaluate_run(run, names, data=data, batch_size=batch_size, limit=limit, results_dir=results,
                        log_samples=log_samples, progress=progress)
    _print_headlines(rows)


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="A run directory made by `moebench train`."),
    out: Path = typer.Argument(..., help="Where to write the transformers checkpoint (a directory)."),
):
    """Write a run as a transformers checkpoint (LlavaForConditionalGeneration; an MoE run with a Qwen2-MoE
    text model) that AutoModelForImageTextToText, lmms-eval, VLMEvalKit or vLLM load."""
    from moebench.interop.export import export_run
    from moebench.runs import open_run

    r = export_run(open_run(run), out)
    err.print(f"[green]exported[/] {run} -> {r['out']} ({r['architecture']}, text model {r['text_model']})")


@app.command("convert")
def convert_cmd(
    path: Path = typer.Argument(..., help="A checkpoint directory: llava-hf (LlavaForConditionalGeneration, dense or "
                                          "with a Qwen2-MoE text model), original LLaVA-1.5 (llava_llama) or "
                                          "MoE-LLaVA (moe_llava_stablelm, moe_llava_phi)."),
    out: Path = typer.Argument(..., help="Where to write the moebench run."),
    vision_tower: Optional[Path] = typer.Option(None, "--vision-tower", help="The CLIP checkpoint directory an "
                                                "original LLaVA-1.5 / MoE-LLaVA release names (mm_vision_tower) "
                                                "when that name is not a local directory."),
):
    """Write a checkpoint of another layout (llava-hf, original LLaVA-1.5, MoE-LLaVA) as a moebench run that
    `moebench eval --model OUT` evaluates."""
    from moebench.interop.convert import convert

    r = convert(path, out, vision_tower)
    err.print(f"[green]converted[/] {path} -> {r.dir} (variant {r.recipe.variant})")


@app.command("score")
def score_cmd(
    task: str = typer.Option(..., "--task", help="Task name (see `moebench ls`)."),
    predictions: Path = typer.Option(..., "--predictions", help="JSONL of {question_id, answer} (LLaVA answer files: 'text')."),
    data: Optional[str] = typer.Option(None, "--data", help="'shapes' or a data root (default: $MOEBENCH_DATA)."),
    split: Optional[str] = typer.Option(None, "--split", help="Score only these splits (comma-separated)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name for the rows (default: the file's stem)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="Whose scoring rules: llava (LLaVA-1.5 / MoE-LLaVA's "
                                           "scripts), official (the dataset's) or lmms_eval; default: the task file's."),
    results: Path = RESULTS,
):
    """Score another harness's predictions with moebench's metrics; writes the same Arrow rows."""
    import os

    from moebench.config import WorldConfig
    from moebench.data.sources import resolve
    from moebench.eval.score import score_predictions

    source = data or os.environ.get("MOEBENCH_DATA")
    if not source:
        raise UserError("--data is missing; give 'shapes' or the data root the questions live under")
    src = resolve(source, WorldConfig(), progress=False)
    rows = score_predictions(task, predictions, data_root=src.root, data_name=src.name, data_hash=src.hash,
                             results_dir=results, name=name, splits=split.split(",") if split else None,
                             protocol=protocol)
    _print_headlines(rows)
    missing = rows[0]["extra"]["missing_predictions"] if rows else 0
    if missing:
        err.print(f"[yellow]note:[/] {missing} questions had no prediction and were scored as wrong")


def _print_headlines(rows: list[dict]) -> None:
    from moebench.report import headline_table

    if _rank() == 0:
        out.print(headline_table(rows))


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise); read from the environment, torch not imported."""
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _torchrun(nproc: int, args: list[str]) -> None:
    """`moebench ARGS` in `nproc` processes on this machine through torch.distributed.run (torchrun
    --standalone: a local c10d rendezvous on a free port). Exits with the workers' exit code."""
    if _world_size() > 1:
        raise UserError("--nproc inside torchrun: start the processes one way, torchrun or --nproc")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "moebench", *args]))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        if 2 in codes and all(c == 2 or c < 0 for c in codes):  # user errors (the workers printed them),
            sys.exit(2)  # and workers the launcher stopped because of them
        err.print(f"[red]error:[/] {len(e.failures)} of {nproc} processes failed (exit codes {codes}); "
                  "their output is above", highlight=False)
        sys.exit(1)


TOLERANCE = typer.Option(None, "--tolerance", help="metric=tolerance (absolute), repeatable, e.g. f1=0.03.")
TOLERANCES = typer.Option(None, "--tolerances", help="YAML file of metric: tolerance.")
LATENCY = typer.Option(None, "--latency-tolerance", help="Also gate samples/s (relative drop, e.g. 0.1) on the same device.")
MARKDOWN = typer.Option(None, "--markdown", help="Also write a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY).")


def _gate(baseline_rows, current_rows, tolerance, tolerances, latency, md) -> None:
    from rich.table import Table

    from moebench.compare import compare_rows, failed, load_tolerances, markdown

    verdicts = compare_rows(baseline_rows, current_rows, load_tolerances(tolerances, tolerance or []), latency)
    t = Table(title="regression gate")
    for col in ("model", "task", "split", "metric", "baseline", "current", "change", "status"):
        t.add_column(col)
    colour = {"regressed": "red", "missing": "red", "improved": "green", "new": "cyan", "ok": ""}
    for v in verdicts:
        t.add_row(v["model"], v["task"], v["split"], v["metric"],
                  "" if v["baseline"] is None else f"{v['baseline']:.4g}", "" if v["current"] is None else f"{v['current']:.4g}",
                  "" if v["change"] is None else f"{v['change']:+.4f}",
                  f"[{colour[v['status']]}]{v['status']}[/]" if colour[v["status"]] else v["status"])
    out.print(t)
    if md:
        Path(md).write_text(markdown(verdicts))
    if failed(verdicts):
        bad = [f"{v['model']}/{v['task']}/{v['metric']}" for v in verdicts if v["status"] in ("regressed", "missing")]
        err.print(f"[red]regression gate failed[/]: {len(bad)} regressed or missing ({', '.join(bad[:5])})")
        raise typer.Exit(1)
    err.print("[green]regression gate passed[/]")


@app.command()
def compare(
    baseline: Path = typer.Option(..., "--baseline", help="Baseline metrics table (.arrow) or results folder."),
    current: Path = typer.Option(Path("results"), "--current", help="Current results folder or table."),
    tolerance: Optional[list[str]] = TOLERANCE,
    tolerances: Optional[Path] = TOLERANCES,
    latency_tolerance: Optional[float] = LATENCY,
    md: Optional[Path] = MARKDOWN,
):
    """Compare current results with a baseline; exit 1 on a regression beyond tolerance or a missing row."""
    from moebench import results as res
    from moebench.compare import read_baseline

    current_rows = res.latest_rows(res.read_table([str(current)], "metrics")).to_pylist()
    _gate(read_baseline(baseline), current_rows, tolerance, tolerances, latency_tolerance, md)


@app.command()
def ci(
    recipes: list[Path] = typer.Argument(..., help="Recipes (files or bundled names) to train and evaluate, e.g. recipes/shapes_*.yaml."),
    baseline: Path = typer.Option(..., "--baseline", help="Baseline metrics table, e.g. results/baselines/cpu-shapes.arrow."),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="Write the results as the new baseline instead of comparing."),
    runs: Path = RUNS,
    results: Path = RESULTS,
    tolerance: Optional[list[str]] = TOLERANCE,
    tolerances: Optional[Path] = TOLERANCES,
    latency_tolerance: Optional[float] = LATENCY,
    md: Optional[Path] = MARKDOWN,
):
    """Train the recipes, evaluate, and compare with the baseline in one command (for CI runners)."""
    from moebench import results as res
    from moebench.compare import model_name, read_baseline, write_baseline
    from moebench.config import load_recipe

    loaded = [load_recipe(r) for r in recipes]  # every recipe is checked before anything trains
    if not update_baseline:
        base = read_baseline(baseline)
    names = set()
    for rec in loaded:
        from moebench.eval.runner import evaluate_run
        from moebench.train.pipeline import train as run_train

        run = run_train(rec, runs_dir=runs, results_dir=results, progress=False)
        evaluate_run(run, rec.eval_tasks, data=None, batch_size=rec.eval.batch_size, limit=rec.eval.limit,
                     results_dir=results, max_new_tokens=rec.eval.max_new_tokens, progress=False, log_samples=False)
        names.add(model_name(run.name))
    current = [r for r in res.latest_rows(res.read_table([str(results)], "metrics")).to_pylist()
               if model_name(r["run"]) in names]
    if update_baseline:
        write_baseline(current, baseline)
        err.print(f"[green]baseline written[/]: {baseline} ({len(current)} rows)")
        return
    _gate(base, current, tolerance, tolerances, latency_tolerance, md)


@app.command()
def validate(recipes: list[Path] = typer.Argument(..., help="Recipe or task YAML files, or bundled recipe / task names, to check.")):
    """Check recipes (and task files) without running them: keys, types, allowed values, the tasks a recipe names."""
    from moebench.bundled import find_yaml
    from moebench.config import load_recipe
    from moebench.eval.tasks import is_task_file, load_task

    for arg in recipes:
        path = find_yaml(arg, ("recipes", "tasks"))
        if is_task_file(path):
            load_task(str(path))
        else:
            load_recipe(path)
        out.print(f"[green]ok[/] {arg}")


@app.command()
def report(
    results_dirs: Optional[list[Path]] = typer.Argument(None, help="Results directories (default: results/)."),
    as_json: bool = typer.Option(False, "--json", help="Print rows as JSON instead of a table."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Only these tasks (comma-separated)."),
    all_metrics: bool = typer.Option(False, "--all", help="Every metric, not only each task's headline."),
    breakdowns: bool = typer.Option(False, "--breakdowns", help="Also the official breakdowns: VQAv2 per answer type, "
                                    "GQA binary / open, ScienceQA per subject and context."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write PNG plots (headline vs activated params and vs latency) here."),
):
    """One table across runs: each task's metrics beside its majority-answer baseline."""
    from moebench.report import load_rows, report_table

    rows = load_rows(results_dirs or [Path("results")], tasks.split(",") if tasks else None, all_metrics, breakdowns)
    if plot is not None:
        from moebench.plots import report_plots

        headline = rows if not all_metrics else load_rows(results_dirs or [Path("results")], None, False)
        for p in report_plots([r for r in headline if r["task"] != "routing"], plot):
            err.print(f"plot: {p}")
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        out.print(report_table(rows))


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML or bundled name (real recipes too: no weights are loaded or downloaded)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. moe.top_k=1."),
    text_tokens: int = typer.Option(128, "--text-tokens", min=0, help="Text tokens after the image, for attention FLOPs."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """Total and activated parameters (LLM, vision tower, projector) and FLOPs per token, on the meta device."""
    from rich.table import Table

    from moebench.config import load_recipe
    from moebench.plan import plan as make_plan

    rec = load_recipe(recipe, overrides or [])
    if getattr(rec, "kind", None) == "vision":
        raise UserError(f"{recipe} is a vision (ViMoE) recipe; `moebench plan` sizes VLM recipes "
                        "(a vision run's rows carry its params total and activated)")
    p = make_plan(rec, text_tokens=text_tokens)
    if as_json:
        print(json.dumps(p, indent=1))
        return
    llm = p["llm"]
    t = Table(title=f"{p['recipe']} ({p['variant']})")
    for c in ("part", "total", "activated / token", "note"):
        t.add_column(c, justify="left" if c in ("part", "note") else "right")
    t.add_row("LLM", _b(llm["total"]), _b(llm["activated"]),
              f"{llm['structure']}; embeddings + LM head {_b(llm['embeddings'])} counted")
    t.add_row("vision tower", _b(p["vision"]["total"]), _b(p["vision"]["total"]), f"{p['vision']['tokens_per_image']} image tokens")
    t.add_row("projector", _b(p["projector"]["total"]), _b(p["projector"]["total"]), "")
    t.add_row("all", _b(p["total"]), _b(p["activated"]), "")
    out.print(t)
    f = p["flops_per_token"]
    out.print(f"LLM FLOPs per token: {f['total'] / 1e9:.2f} G at context {f['context']} "
              f"(matmuls {f['matmul'] / 1e9:.2f} G, attention {f['attention'] / 1e9:.3f} G); "
              f"vision tower {p['vision_flops_per_image'] / 1e9:.1f} GFLOPs per image")


def _b(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


@bench_app.command("gpu")
def bench_gpu(
    device: str = typer.Option("cuda", help="cuda, or cpu (with --tiny: the same code at tiny sizes)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny sizes: checks the command, measures nothing useful."),
    results: Path = RESULTS,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """The GPU path in one command: the MoE layer at MoE-LLaVA-2B size, a moe_llava_2b training step at full
    width (tokens/s, MFU, peak memory), batched generation of dense / MoE / RoE models (samples/s, TTFT,
    TPOT). Rows to RESULTS/bench-gpu-<device>/, a markdown table beside them."""
    import torch

    from moebench.variants.gpu_bench import bench_gpu as run_bench, markdown

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here; use --device cpu --tiny to check the command")
    if device == "cpu" and not tiny:
        raise UserError("--device cpu runs the full sizes for hours; add --tiny")
    r = run_bench(device, tiny, results)
    if as_json:
        print(json.dumps(r, indent=1, default=str))
    else:
        out.print(markdown(r))


for _variant in variants.VARIANTS.values():  # each variant's own benchmarks (`bench moe-layer`, `bench roe`, ...)
    for _name, _command in _variant.commands.items():
        bench_app.command(_name)(_command)


@analyze_app.command("routing")
def analyze_routing(
    run: Path = typer.Argument(..., help="A run directory: a vision MoE run, or an LLM MoE run (its expert load)."),
    results: Path = RESULTS,
    png: Optional[Path] = typer.Option(None, "--png", help="Where to write the heatmap (default: results/<run>/routing.png)."),
):
    """Class x expert routing matrices, purity and entropy per MoE layer (rows + heatmap PNG)."""
    from rich.table import Table

    meta_file = run / "run.json"
    if not meta_file.is_file():
        raise UserError(f"{run} is not a run directory (no run.json); pass a directory under runs/")
    meta = json.loads(meta_file.read_text())
    if meta.get("recipe", {}).get("kind") == "vision":
        from moebench.vision.analyze import analyze_vision_run

        r = analyze_vision_run(run, results, png)
        t = Table(title=f"routing of {r['run']}")
        for col in ("layer", "purity", "entropy (nats)"):
            t.add_column(col, justify="right")
        for layer, v in r["layers"].items():
            t.add_row(str(layer), f"{v['purity']:.3f}", f"{v['entropy']:.3f}")
        out.print(t)
        out.print(f"heatmap: {r['png']}")
        return
    from moebench.vision.analyze import llm_expert_load

    for task, loads in llm_expert_load(meta["name"], results).items():
        t = Table(title=f"{meta['name']}: expert load on {task}")
        t.add_column("layer")
        t.add_column("share of routed pairs per expert")
        for layer, shares in loads.items():
            t.add_row(layer, "  ".join(f"{x:.3f}" for x in shares))
        out.print(t)


@data_app.command("shapes")
def data_shapes(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where to write the world (default: the cache)."),
    seed: Optional[int] = typer.Option(None, help="World seed."),
    image_size: Optional[int] = typer.Option(None, help="Image side in pixels."),
    n_train: Optional[int] = typer.Option(None, help="Training images."),
    n_val: Optional[int] = typer.Option(None, help="Held-out images."),
    grid: Optional[int] = typer.Option(None, help="Objects sit in a grid x grid layout of cells."),
):
    """Generate the embedded shapes world (COCO, LLaVA, GQA, POPE, label maps) and print where it is.

    Options left out take the defaults of a recipe's `data.world`: the world the shapes recipes train on."""
    from moebench.data.shapes import WorldSpec, ensure_world

    given = {"seed": seed, "image_size": image_size, "grid": grid, "n_train": n_train, "n_val": n_val}
    root = ensure_world(WorldSpec(**{k: v for k, v in given.items() if v is not None}), root=out_dir)
    out.print(str(root))


@app.command("ls")
def ls():
    """List the bundled recipes and tasks; name one without a path (`moebench train shapes_dense`)."""
    from rich.table import Table

    from moebench.bundled import bundled_dir, bundled_names
    from moebench.eval.tasks import load_task, task_names

    folder = bundled_dir("recipes")
    t = Table(title="recipes", caption=f"bundled in {folder}")
    t.add_column("recipe")
    t.add_column("command")
    for name in bundled_names("recipes"):
        lines = (folder / f"{name}.yaml").read_text().splitlines()
        first = lines[0].lstrip("# ").strip() if lines else ""
        t.add_row(name, first.replace(f"recipes/{name}.yaml", name))  # the name works from any folder
    out.print(t)
    t = Table(title="tasks", caption=f"bundled in {bundled_dir('tasks')}")
    for c in ("task", "version", "description"):
        t.add_column(c)
    for name in task_names():
        task = load_task(name)
        t.add_row(name, str(task.version), task.description)
    out.print(t)


def _usage_errors() -> tuple[type, ...]:
    """The exception classes of command-line usage errors. typer (>= 0.26) runs on its own copy of click,
    whose ClickException it exports only as the base of its public BadParameter; newer typers also
    export TyperException."""
    click_exception = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return (click_exception, *([typer.TyperException] if hasattr(typer, "TyperException") else []))


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        code = app(standalone_mode=False)  # typer.Exit(n) comes back as n here
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        where = f"\\[rank {_rank()}] " if _world_size() > 1 else ""  # under torchrun every rank may say it
        err.print(f"[red]error:[/] {where}{e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; run the same command with --resume to continue from the last checkpoint")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # usage errors arrive here in standalone_mode=False
        if isinstance(e, _usage_errors()) and hasattr(e, "show"):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):
            sys.exit(1)
        raise
    finally:
        if "torch.distributed" in sys.modules:  # a torchrun worker leaves its process group
            from moebench.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    main()
