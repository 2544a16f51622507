"""`moebench bench roe`: LLM time per sample of an RoE run with real skipping against its dense parent.

The same trained model runs every evaluation prompt twice per batch size, interleaved batch by batch
(the two modes back to back on each batch, in alternating order, so the machine's drift hits both):
once as RoE evaluates (hard routing decisions at prefill, skipped layers not computed, decoding in
batches of one skip pattern: moebench.eval.generate.GroupedGeneration) and once in "dense" mode (every
layer runs, no routing tokens: the dense parent's computation). A round is one pass over the prompts;
the ratio is of the rounds' median times, and each round's own ratio is kept too. Times cover the
LLM's prefill and decoding: the image features (vision tower and projector, the same in both) are
computed beforehand. The measured skip ratio s is the share of all decoder layers skipped, averaged
over examples; f, the share of the dense computation's time spent in decoder layers (timed by hooks,
per batch size), makes 1 - f x s the best ratio skipping can reach, and 1 - 0.7 f s the target (RoE
keeps 70% of what the skipped layers cost). The RoE answers are checked against the same model
answering one prompt at a time.

Two diagnostics say where a gap comes from. The same rounds with the prompts reordered by their skip
pattern (so a batch holds one pattern wherever the counts allow: no layer is split within a batch and no
prompt waits for a decoding batch) give the most any grouping of prompts into batches can reach; above
the target there, the routing's own costs (two more tokens through the layers, their attention mask, the
routers, the shortcuts) exceed what skipping saves. `profile_dir` writes torch.profiler tables of one pass
per mode and batch size, and the JSON lists the operators whose time differs most between the modes."""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch

from moebench.progress import steps


def decoder_share(model, call, device: torch.device) -> float:
    """f: the share of one `call()`'s wall time spent inside the LM's decoder layers, timed by forward
    pre- and post-hooks on each layer (CUDA-synchronised): skipping a share s of the layers can save at
    most f x s of the time."""
    spent, started = [0.0], {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def pre(module, args):
        sync()
        started[id(module)] = time.perf_counter()

    def post(module, args, output):
        sync()
        spent[0] += time.perf_counter() - started.pop(id(module))

    layers = list(model.llm.model.layers)
    handles = [h for layer in layers for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))]
    try:
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return spent[0] / total if total else 0.0


def bench_roe(run, *, task: str = "gqa", limit: int = 256, batch_sizes=(1, 8, 32), max_new_tokens: int = 4,
              repeats: int = 3, device: str = "cpu", progress: bool = False, profile_dir=None) -> dict:
    from moebench.data.conversations import Encoder
    from moebench.data.images import load_pixels
    from moebench.data.sources import resolve
    from moebench.errors import UserError
    from moebench.eval.generate import GroupedGeneration, greedy_generate
    from moebench.eval.tasks import load_samples, load_task

    dev = torch.device(device)
    model, tokenizer = run.load_model(dev)
    roe = getattr(model, "roe", None)
    if roe is None:
        raise UserError(f"{run.dir} is not an RoE run; train one with recipes/shapes_roe.yaml")
    recipe = run.recipe
    src = resolve(recipe.data.source, recipe.data.world, progress=progress)
    samples = load_samples(load_task(task), src.root, limit)
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system)
    prompts = [enc.prompt(s.question + load_task(task).prompt_suffix) for s in samples]
    pixels = torch.stack([load_pixels(s.image, recipe.model.vision) for s in samples])
    layers = roe.layers(model.llm)
    n_layers = model.llm.config.num_hidden_layers
    kw = dict(max_new_tokens=max_new_tokens, eos_id=-1, pad_id=tokenizer.pad_token_id)  # fixed length

    with torch.no_grad():
        feats = torch.cat([model.image_features(pixels[i: i + 8].to(dev)) for i in range(0, len(pixels), 8)])

    def generate(mode: str, idx: list[int]):
        roe.ctx.mode = mode
        return greedy_generate(model, [prompts[i] for i in idx], None, image_features=feats[idx], **kw)

    def batches(bs: int, order: list[int]) -> list[list[int]]:
        return [order[i: i + bs] for i in range(0, n, bs)]

    def dense_pass(bs: int) -> tuple[float, float, list]:
        """Every prompt in batches of `bs`, every layer run: (prefill s, decode s, answers)."""
        pre = dec = 0.0
        answers = []
        for idx in batches(bs, list(range(n))):
            g = generate("dense", idx)
            pre, dec, answers = pre + g.ttft_s, dec + g.decode_s, answers + g.tokens
        return pre, dec, answers

    def roe_pass(gen, answers: dict, idx: list[int]) -> None:
        roe.ctx.mode = "hard"
        answers.update({f.key: f.tokens for f in gen.add(idx, [prompts[i] for i in idx], image_features=feats[idx])})

    def paired_round(bs: int, r: int, order: list[int]) -> dict:
        """Both modes over every prompt (in `order`), batch by batch, back to back in alternating order (so
        the machine's drift hits both): dense in batches of `bs`; RoE prefilling the same batches and
        decoding in batches of `bs` of one skip pattern (GroupedGeneration). {mode: (prefill s, decode s,
        answers in prompt order)}."""
        gen, answers, dense_s = GroupedGeneration(model, batch_size=bs, **kw), {"roe": {}, "dense": {}}, [0.0, 0.0]
        for j, idx in enumerate(batches(bs, order)):
            for mode in (("dense", "roe") if (r + j) % 2 == 0 else ("roe", "dense")):
                if mode == "dense":
                    g = generate("dense", idx)
                    dense_s[0] += g.ttft_s
                    dense_s[1] += g.decode_s
                    answers["dense"].update(zip(idx, g.tokens))
                else:
                    roe_pass(gen, answers["roe"], idx)
        roe.ctx.mode = "hard"
        answers["roe"].update({f.key: f.tokens for f in gen.flush()})
        return {"roe": (gen.prefill_s, gen.decode_s, [answers["roe"][i] for i in range(n)]),
                "dense": (*dense_s, [answers["dense"][i] for i in range(n)])}

    def timed_rounds(bs: int, order: list[int], step) -> tuple[dict, list[float], bool]:
        """A warm-up round, then `repeats` paired rounds: (per mode the median prefill / decode / total s per
        prompt, each round's RoE / dense, whether every RoE answer equals the one-at-a-time answer)."""
        rounds = {m: {"total": [], "prefill": [], "decode": []} for m in ("roe", "dense")}
        identical = paired_round(bs, 0, order)["roe"][2] == one_at_a_time  # and a warm-up of these shapes
        step()
        for r in range(repeats):
            pair = paired_round(bs, r, order)
            step()
            for mode, (pre, dec, answers) in pair.items():
                identical &= mode == "dense" or answers == one_at_a_time
                rounds[mode]["prefill"].append(pre / n)
                rounds[mode]["decode"].append(dec / n)
                rounds[mode]["total"].append((pre + dec) / n)
        med = {m: {k: statistics.median(v) for k, v in x.items()} for m, x in rounds.items()}
        return med, [x / y for x, y in zip(rounds["roe"]["total"], rounds["dense"]["total"])], identical

    def profiled(bs: int) -> list[dict]:
        """One pass per mode under torch.profiler: tables written to `profile_dir`; the operators whose
        self time per prompt differs most between the modes."""
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        times = {}
        for mode in ("dense", "roe"):
            with profile(activities=acts) as prof:
                if mode == "dense":
                    dense_pass(bs)
                else:
                    gen, answers = GroupedGeneration(model, batch_size=bs, **kw), {}
                    for idx in batches(bs, list(range(n))):
                        roe_pass(gen, answers, idx)
                    gen.flush()
            sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            ops = prof.key_averages()
            (profile_dir / f"{mode}-batch{bs}.txt").write_text(ops.table(sort_by=sort, row_limit=40) + "\n")
            times[mode] = {e.key: (e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total, e.count)
                           for e in ops}
        names = set(times["dense"]) | set(times["roe"])
        rows = [{"op": k, "dense_us_per_sample": times["dense"].get(k, (0, 0))[0] / n,
                 "roe_us_per_sample": times["roe"].get(k, (0, 0))[0] / n,
                 "dense_calls": times["dense"].get(k, (0, 0))[1], "roe_calls": times["roe"].get(k, (0, 0))[1]}
                for k in names]
        rows.sort(key=lambda x: -abs(x["roe_us_per_sample"] - x["dense_us_per_sample"]))
        return rows[:12]

    out = {"run": run.name, "task": task, "samples": len(prompts), "new_tokens": max_new_tokens,
           "threads": torch.get_num_threads(), "device": str(dev), "by_batch_size": {}}
    n = len(prompts)
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    passes = 1 + len(batch_sizes) * (2 * repeats + 3 + (2 if profile_dir is not None else 0))
    with steps(progress, passes, "bench roe: passes over the prompts") as step:
        for layer in layers:
            layer.seen = layer.skipped = 0
        one_at_a_time, patterns = [], []
        for i in range(n):  # also the decisions for s, and each prompt's skip pattern
            one_at_a_time.append(generate("hard", [i]).tokens[0])
            patterns.append("".join("r" if bool(runs) else "s" for runs in roe.ctx.skip_probs))
        by_pattern = sorted(range(n), key=lambda i: patterns[i])  # stable: prompt order within a pattern
        step()
        skipped = sum(layer.skipped for layer in layers) / n  # layers skipped per example
        s = skipped / n_layers
        out["skip_rate"] = {str(i): layer.skipped / max(1, layer.seen) for i, layer in zip(roe.layer_ids, layers)}
        out["skip_ratio_all_layers"] = s
        out["skip_patterns"] = dict(sorted(Counter(patterns).items()))  # r / s per routable layer: prompts
        out["skip_ratio_routable_layers"] = skipped / len(layers)
        generate("dense", list(range(min(n, 8))))  # warm-up
        f_by_bs = {}
        for bs in batch_sizes:  # f of the dense computation at each batch size (all prompts once)
            f_by_bs[bs] = decoder_share(model, lambda: dense_pass(bs), dev)
            step()
        for bs in batch_sizes:
            med, paired, identical = timed_rounds(bs, list(range(n)), step)
            one_pattern, one_pattern_rounds, same = timed_rounds(bs, by_pattern, step)
            identical &= same
            f = f_by_bs[bs]
            bound = 1 - 0.7 * s * f
            ratio = med["roe"]["total"] / med["dense"]["total"]
            out["by_batch_size"][str(bs)] = {
                "roe_ms_per_sample": 1000 * med["roe"]["total"], "dense_ms_per_sample": 1000 * med["dense"]["total"],
                "ratio": ratio, "ratio_paired_median": statistics.median(paired),
                "decoder_share_f": f, "bound_1_minus_f_s": 1 - f * s,
                "bound_1_minus_0.7_s_f": bound, "meets_bound": ratio <= bound,
                "rounds_under_bound": sum(x <= bound for x in paired), "rounds": repeats,
                "saved_share_of_skipped_time": (1 - ratio) / (f * s) if f * s else None,
                "prefill_ms_per_sample": {m: 1000 * med[m]["prefill"] for m in med},
                "decode_ms_per_sample": {m: 1000 * med[m]["decode"] for m in med},
                "identical_to_one_at_a_time": identical,
                "ratio_batches_of_one_pattern": one_pattern["roe"]["total"] / one_pattern["dense"]["total"],
                "ratio_batches_of_one_pattern_paired_median": statistics.median(one_pattern_rounds),
            }
            if profile_dir is not None:
                out["by_batch_size"][str(bs)]["ops_differing_most"] = profiled(bs)
                step()
                step()
        roe.ctx.mode = "hard"
        return out
