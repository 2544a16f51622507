"""Evaluate a trained run on tasks: batched timed generation, metrics, metric and sample rows in Arrow.

Data-parallel under torchrun (`torchrun --nproc-per-node N -m moebench eval ...`): every rank loads the
model, takes every N-th image with samples still to do, and stores its finished samples in its own
partial file; the records, timings and expert / skip counts of all ranks are gathered
(all_gather_object), and rank 0 scores them and writes the rows. Predictions do not depend on the batch
a sample is in (tested), so the metrics are those of one process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from pathlib import Path

import torch

from moebench import results
from moebench import distributed as parallel
from moebench.data.conversations import Encoder
from moebench.data.sources import DataSource, file_hash, resolve
from moebench.eval import metrics
from moebench.eval.generate import Generation, GroupedGeneration, greedy_generate
from moebench.eval.partial import PartialWriter, partial_path, read_partial
from moebench.eval.tasks import Sample, TaskConfig, load_samples, load_task
from moebench.errors import UserError
from moebench.runs import RunInfo


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 1024 if platform.system() == "Linux" else rss / 2**20


def _batches(samples: list[Sample], size: int):
    for i in range(0, len(samples), size):
        yield samples[i: i + size]


def predict(model, tokenizer, encoder: Encoder, task: TaskConfig, samples: list[Sample], *, vision,
            batch_size: int, max_new_tokens: int, device: torch.device, progress: bool = True,
            done: dict | None = None, store=None, counters: list | None = None) -> tuple[list[dict], dict, dict | None]:
    """Greedy answers for `samples`; returns per-sample records, the task's timing summary and variant
    statistics: the `extra` of each of `counters` (moebench.variants.Counter, e.g. the per-layer expert
    load of an MoE model over prompt and generated tokens), or None when they give nothing.

    Under torchrun each rank computes every W-th sample still to do (W ranks) and every rank returns
    the records, timings and statistics of all of them."""
    from moebench.data.images import load_pixels

    @functools.lru_cache(maxsize=64)  # an image's questions are neighbours (POPE: 6 per image and split)
    def image(path: Path) -> torch.Tensor:
        return load_pixels(path, vision)

    def inputs(batch: list[Sample]):
        prompts = [encoder.prompt(s.question + task.prompt_suffix) for s in batch]
        rows = {path: i for i, path in enumerate(dict.fromkeys(s.image for s in batch))}  # distinct images
        pixels = torch.stack([image(path) for path in rows]).to(device)
        return prompts, pixels, torch.tensor([rows[s.image] for s in batch])

    gen_kw = dict(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)

    def run(batch: list[Sample]):
        prompts, pixels, index = inputs(batch)
        return prompts, greedy_generate(model, prompts, pixels, image_index=index, **gen_kw)

    def run_grouped(batch: list[Sample] | None):
        """The answers finished by prefilling `batch` (None: by decoding every prompt still waiting), as
        (samples, prompts, Generation, prefill batch size) per (prefill batch, decoding batch) pair: a
        variant that groups decoding (RoE) decodes prompts of one skip pattern together, across prefill
        batches. A sample's latency is its prefill batch's time plus its decoding batch's (not the time
        it waited in a pool)."""
        if batch is None:
            done = grouped.flush()
        else:
            prompts, pixels, index = inputs(batch)
            done = grouped.add([(s, p) for s, p in zip(batch, prompts)], prompts, pixels, image_index=index)
        out: dict[tuple, list] = {}
        for f in done:  # one Generation per (prefill time, decoding time): the per-sample latency columns
            out.setdefault((f.ttft_s, f.decode_s, f.decode_steps, f.prefill_batch), []).append(f)
        return [([f.key[0] for f in fs], [f.key[1] for f in fs],
                 Generation([f.tokens for f in fs], ttft, dec, steps), size)
                for (ttft, dec, steps, size), fs in out.items()]

    w = parallel.world()
    finished = dict(done or {})
    todo = [s for s in samples if (s.split, s.question_id) not in finished]
    # One generation per distinct (image, question): greedy answers do not depend on the batch (tested),
    # so a repeated prompt gets the same answer. POPE's three splits share their positive questions and
    # most negatives (3,524 distinct prompts of 9,000 on the shapes world).
    same: dict[tuple[Path, str], list[Sample]] = {}
    for s in todo:
        same.setdefault((s.image, s.question), []).append(s)
    # An image's questions go into one batch, which runs the vision tower once per distinct image in it
    # (POPE: ~7 distinct questions per image). Ranks share the work by image.
    by_image: dict[Path, list[Sample]] = {}
    for group in same.values():
        by_image.setdefault(group[0].image, []).append(group[0])
    mine = [s for group in list(by_image.values())[w.rank::w.size] for s in group]  # this rank's share
    if mine:
        run(mine[:batch_size])  # warm-up, not timed
    grouped = None
    if any(ext.groups_decoding for ext in model.extensions()):
        grouped = GroupedGeneration(model, batch_size=batch_size, **gen_kw)
    ttfts, decode_s, decode_tokens, computed, batch_s = [], 0.0, 0, [], 0.0
    t_start = time.perf_counter()
    answered = sum(len(same[(s.image, s.question)]) for s in mine)
    counters = counters or []
    with _task_bar(progress, task.name, len(samples) - len(todo) + answered) as bar, contextlib.ExitStack() as stack:
        for c in counters:
            stack.enter_context(c)
        bar(len(samples) - len(todo))
        if grouped is None:
            answered_batches = ([(batch, *run(batch), len(batch))] for batch in _batches(mine, batch_size))
        else:
            answered_batches = (run_grouped(batch) for batch in [*_batches(mine, batch_size), None])
        for answered in answered_batches:
            for batch, prompts, gen, size in answered:
                if grouped is None:
                    ttfts.append(gen.ttft_s)
                    decode_s += gen.decode_s
                    batch_s += gen.ttft_s + gen.decode_s
                    decode_tokens += gen.decode_steps
                new = []
                for s, p, toks in zip(batch, prompts, gen.tokens):
                    answer = {
                        "prompt_tokens": len(p), "output_tokens": len(toks),
                        "prediction": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                        "latency_ms": 1000 * (gen.ttft_s + gen.decode_s), "ttft_ms": 1000 * gen.ttft_s,
                        "batch_size": size,
                    }
                    new += [{"split": t.split, "question_id": t.question_id, **answer}
                            for t in same[(s.image, s.question)]]
                if store is not None:
                    store(new)
                finished.update({(r["split"], r["question_id"]): r for r in new})
                computed += new
                bar(len(new))
        if grouped is not None:  # per prefill batch and per decoding batch, as the ungrouped path counts them
            ttfts = [grouped.prefill_s / max(1, grouped.prefills)] * grouped.prefills
            decode_s, decode_tokens = grouped.decode_s, grouped.decode_steps
            batch_s = grouped.prefill_s + grouped.decode_s
    wall = time.perf_counter() - t_start
    ranks = parallel.all_gather({  # one process: [this]
        "records": computed if w.size > 1 else [], "ttft_s": sum(ttfts), "batches": len(ttfts), "decode_s": decode_s,
        "batch_s": batch_s,
        "decode_tokens": decode_tokens, "samples": len(mine), "wall": wall, "peak_mem_mb": _peak_memory_mb(device),
        "counters": [c.state() for c in counters]})
    for r in ranks:
        finished.update({(x["split"], x["question_id"]): x for x in r["records"]})
    records = [{**finished[(s.split, s.question_id)], "sample": s} for s in samples]
    batches, tokens, n = (sum(r[k] for r in ranks) for k in ("batches", "decode_tokens", "samples"))
    wall = max(r["wall"] for r in ranks)
    timing = {  # over the samples computed in this call (a resumed eval times only the rest)
        "ttft_ms": 1000 * sum(r["ttft_s"] for r in ranks) / batches if batches else None,
        "tpot_ms": 1000 * sum(r["decode_s"] for r in ranks) / tokens if tokens else None,
        "latency_ms": 1000 * sum(r["batch_s"] for r in ranks) / batches if batches else None,
        "samples_per_s": n / wall if (wall > 0 and n) else None,  # prompts generated, all ranks together
        "peak_mem_mb": max(r["peak_mem_mb"] for r in ranks),  # per process
    }
    extra = {}
    for k, c in enumerate(counters):  # routing statistics over every rank's samples
        c.merge([r["counters"][k] for r in ranks])
        extra.update(c.extra())
    return records, timing, extra or None


class _task_bar:
    def __init__(self, enabled: bool, name: str, total: int):
        self.enabled, self.name, self.total = enabled, name, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(f"[bold]eval {self.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        self.p.__enter__()
        task = self.p.add_task(self.name, total=self.total)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)


def score(task: TaskConfig, records: list[dict]) -> tuple[list[dict], list[float]]:
    """Metric values per split (+ the mean over splits when there are several), the official breakdowns
    (rows whose `group` is e.g. "answer_type=yes/no", split "<split>|<group>"), and per-sample scores."""
    options = {"normalizer": task.normalizer, "protocol": task.protocol}
    by_split: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_split.setdefault(r["sample"].split, []).append(i)
    rows, scores = [], [0.0] * len(records)
    per_split_values = []
    for split, idx in by_split.items():
        preds = [records[i]["prediction"] for i in idx]
        targets = [records[i]["sample"].target for i in idx]
        samples = [records[i]["sample"] for i in idx]
        res = metrics.compute(task.metric, preds, targets, samples=samples, **options)
        base = metrics.baseline_values(task.metric, targets, samples=samples, **options)
        for i, s in zip(idx, res.scores):
            scores[i] = s
        per_split_values.append((res.values, base))
        for name, value in res.values.items():
            rows.append({"split": split, "metric": name, "value": value, "baseline": base.get(name), "n": len(idx)})
    for split, idx in by_split.items():
        rows += _breakdowns(task, records, idx, split, options)
    if len(by_split) > 1:
        for name in per_split_values[0][0]:
            vals = [v[name] for v, _ in per_split_values]
            bases = [b.get(name) for _, b in per_split_values]
            rows.append({"split": "mean", "metric": name, "value": sum(vals) / len(vals),
                         "baseline": sum(bases) / len(bases) if None not in bases else None,
                         "n": len(records)})
    return rows, scores


def _breakdowns(task: TaskConfig, records: list[dict], idx: list[int], split: str, options: dict) -> list[dict]:
    """The task's metrics over each group of samples its loader marked (Sample.groups)."""
    members: dict[tuple[str, str], list[int]] = {}
    for i in idx:
        for key, values in records[i]["sample"].groups.items():
            if key in metrics.NOT_BREAKDOWNS:
                continue
            for value in values if isinstance(values, list) else [values]:
                members.setdefault((key, str(value)), []).append(i)
    rows = []
    for (key, value), sub in sorted(members.items()):
        res = metrics.compute(task.metric, [records[i]["prediction"] for i in sub],
                              [records[i]["sample"].target for i in sub],
                              samples=[records[i]["sample"] for i in sub], **options)
        group = f"{key}={value}"
        rows += [{"split": f"{split}|{group}", "group": group, "metric": name, "value": v, "baseline": None,
                  "n": len(sub)} for name, v in res.values.items()]
    return rows


def evaluate_run(run: RunInfo, task_names: list[str], *, data: str | None, batch_size: int, limit: int | None,
                 results_dir: Path, max_new_tokens: int | None = None, progress: bool = True,
                 log_samples: bool = True, device: torch.device | None = None) -> list[dict]:
    """Evaluate a run's model on tasks; append metric (and sample) rows to results_dir; return metric rows.

    Under torchrun every rank calls this with the same arguments and gets the same rows; rank 0 writes."""
    from moebench import variants
    from moebench.models.params import count_params

    w = parallel.init()
    progress = progress and w.main
    tasks = [load_task(t) for t in task_names]  # fail on unknown names before loading anything
    recipe = run.recipe
    check_task_kinds(tasks, recipe, run.name)
    src: DataSource = parallel.node_first(lambda: resolve(data or recipe.data.source, recipe.data.world,
                                                          progress=progress))
    device = device or parallel.device()
    model, tokenizer = run.load_model(device)
    if tokenizer is None:  # a vision recipe's model: scored from its heads' logits
        from moebench.eval.vision import evaluate_vision

        return evaluate_vision(run, model, tasks, src, batch_size=batch_size, limit=limit, results_dir=results_dir,
                               device=device, progress=progress, log_samples=log_samples)
    chain = variants.chain(recipe.variant)
    encoder = Encoder(tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system)
    common = common_fields(run, model, count_params(model), device, batch_size)
    all_rows = []
    for task in tasks:
        samples = load_samples(task, src.root, limit)
        data_hash = src.hash or _questions_hash(task, src.root)
        new_tokens = max_new_tokens or task.max_new_tokens
        ppath = partial_path(results_dir, run.name, task.name, {
            "run": run.name, "recipe_hash": run.recipe_hash, "task": task.name, "version": task.version,
            "data": data_hash, "limit": limit, "max_new_tokens": new_tokens})
        done = parallel.broadcast(_read_partials(ppath) if w.main else None)
        if done and progress:
            from rich.console import Console

            Console(stderr=True).print(f"resuming {task.name}: {len(done)} samples already evaluated ({ppath})")
        writer = PartialWriter(ppath if w.size == 1 else _rank_path(ppath, w.rank))
        try:
            records, timing, extra = predict(model, tokenizer, encoder, task, samples, vision=recipe.model.vision,
                                             batch_size=batch_size, max_new_tokens=new_tokens, device=device,
                                             progress=progress, done=done, store=writer.write,
                                             counters=[c for v in chain if (c := v.counter(model)) is not None])
        finally:
            writer.close()
        metric_rows, scores = score(task, records)
        for v in chain:  # measured counts (RoE: from the skip decisions actually taken)
            p = v.activated_params(model, extra or {})
            if p is not None:
                common = {**common, "params_activated": p["activated"], "params_detail": p}
        stamp = results.utc_now()
        rows = [{**common, **timing, **r, "task": task.name, "dataset": src.name, "dataset_hash": data_hash,
                 "task_version": task.version, "normalizer": task.normalizer or None, "protocol": task.protocol,
                 "extra": extra,
                 "timestamp": stamp}
                for r in metric_rows]
        all_rows += rows
        if not w.main:  # rank 0 writes the rows every rank computed
            continue
        results.append_rows(results_dir, "metrics", run.name, rows)
        if log_samples:
            results.append_rows(results_dir, "samples", run.name, sample_rows(run.name, task, records, scores, stamp))
        for p in [ppath, *_rank_paths(ppath)]:  # the task's rows are written; nothing left to resume
            p.unlink(missing_ok=True)
    parallel.barrier()
    return all_rows


def check_task_kinds(tasks: list[TaskConfig], recipe, run_name: str) -> None:
    """Each task suits the run's model: VQA tasks a VLM, classification / segmentation tasks a vision model."""
    for task in tasks:
        if task.kind != recipe.kind:
            what = f"a {task.head} (vision) task" if task.head else "a VQA task, answered by generation"
            model = "a vision model (a ViT with task heads)" if recipe.kind == "vision" else "a vision-language model"
            raise UserError(f"task {task.name} is {what}, but run {run_name} holds {model}; choose tasks of its "
                            f"kind (`moebench ls` lists them)")


def common_fields(run: RunInfo, model, params: dict, device: torch.device, batch_size: int) -> dict:
    """The entries every metric row of one evaluation shares: run, variant, parameters, device, versions."""
    recipe = run.recipe
    return {
        "run": run.name, "variant": recipe.variant, "params_total": params["total"],
        "params_activated": params["activated"], "params_detail": params, "device": _device_name(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "batch_size": batch_size,
        "threads": torch.get_num_threads(), "seed": recipe.seed, "git_commit": run.git_commit,
        **results.software_versions(), "recipe": recipe.name, "recipe_hash": run.recipe_hash,
    }


def sample_rows(run_name: str, task: TaskConfig, records: list[dict], scores: list[float], stamp: str) -> list[dict]:
    """The samples-table rows of one task's generated answers."""
    return [{"run": run_name, "task": task.name, "split": r["sample"].split, "question_id": r["sample"].question_id,
             "image": str(r["sample"].image.name), "prompt": r["sample"].question + task.prompt_suffix,
             "prediction": r["prediction"], "target": _target_text(r["sample"].target), "score": s,
             "latency_ms": r["latency_ms"], "ttft_ms": r["ttft_ms"], "prompt_tokens": r["prompt_tokens"],
             "output_tokens": r["output_tokens"], "batch_size": r["batch_size"], "timestamp": stamp}
            for r, s in zip(records, scores)]


def _rank_path(ppath: Path, rank: int) -> Path:
    """Rank r's partial file under torchrun: `<task>-<key>.rank<r>.jsonl` beside the one-process file."""
    return ppath.with_name(f"{ppath.stem}.rank{rank}{ppath.suffix}")


def _rank_paths(ppath: Path) -> list[Path]:
    return sorted(ppath.parent.glob(f"{ppath.stem}.rank*{ppath.suffix}"))


def _read_partials(ppath: Path) -> dict:
    """The samples an interrupted eval finished, with one process or any number of ranks."""
    done = read_partial(ppath)
    for p in _rank_paths(ppath):
        done.update(read_partial(p))
    return done


def _target_text(target) -> str:
    """A sample's target for the samples table: the answer, or VQA's 10 answers as a JSON list."""
    import json

    return target if isinstance(target, str) else json.dumps(target)


def _questions_hash(task: TaskConfig, root: Path) -> str:
    import hashlib

    from moebench.eval.parquet import release_files

    h = hashlib.sha256()
    for split in task.splits:
        path = root / task.questions.format(split=split)
        files = (release_files(task, root, split)  # what load_samples reads when the official file is missing
                 or (sorted(path.rglob("*.txt")) if path.is_dir() else [path]))  # MME: a folder of .txt
        for f in files:
            h.update(file_hash(f).encode())
    return h.hexdigest()[:16]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
