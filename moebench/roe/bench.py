"""`moebench bench roe`: LLM time per sample of an RoE run with real skipping against its dense parent.

The same trained model runs every evaluation prompt twice per batch size, interleaved batch by batch:
once with its hard routing decisions (skipped layers not computed) and once in "dense" mode (every
layer runs, no routing tokens: the dense parent's computation). Times cover the LLM's prefill and
decoding: the image features (vision tower and projector, the same in both) are computed beforehand.
The measured skip ratio s is the share of all decoder layers skipped, averaged over examples.
"""

from __future__ import annotations

import statistics
import time

import torch


def bench_roe(run, *, task: str = "gqa", limit: int = 64, batch_sizes=(1, 8), max_new_tokens: int = 4,
              repeats: int = 3, device: str = "cpu", progress: bool = False) -> dict:
    from moebench.data.conversations import Encoder
    from moebench.data.images import load_image, preprocess
    from moebench.data.sources import resolve
    from moebench.errors import UserError
    from moebench.eval.generate import greedy_generate
    from moebench.eval.tasks import load_samples, load_task

    dev = torch.device(device)
    model, tokenizer = run.load_model(dev)
    roe = getattr(model, "roe", None)
    if roe is None:
        raise UserError(f"{run.dir} is not an RoE run; train one with recipes/shapes_roe.yaml")
    recipe = run.recipe
    v = recipe.model.vision
    src = resolve(recipe.data.source, recipe.data.world, progress=progress)
    samples = load_samples(load_task(task), src.root, limit)
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system)
    prompts = [enc.prompt(s.question + load_task(task).prompt_suffix) for s in samples]
    pixels = torch.stack([preprocess(load_image(s.image), v.image_size, v.image_mean, v.image_std, v.aspect)
                          for s in samples])
    layers = roe.layers(model.llm)
    n_layers = model.llm.config.num_hidden_layers
    kw = dict(max_new_tokens=max_new_tokens, eos_id=-1, pad_id=tokenizer.pad_token_id)  # fixed length

    with torch.no_grad():
        feats = torch.cat([model.image_features(pixels[i: i + 8].to(dev)) for i in range(0, len(pixels), 8)])

    def timed(mode: str, bs: int) -> float:
        roe.ctx.mode = mode
        t = time.perf_counter()
        for i in range(0, len(prompts), bs):
            greedy_generate(model, prompts[i: i + bs], None, image_features=feats[i: i + bs], **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t) / len(prompts)

    out = {"run": run.name, "task": task, "samples": len(prompts), "new_tokens": max_new_tokens,
           "threads": torch.get_num_threads(), "device": str(dev), "by_batch_size": {}}
    for layer in layers:
        layer.seen = layer.skipped = 0
    timed("hard", 8)  # warm-up, and the decisions for the skip ratio
    skipped = sum(layer.skipped for layer in layers) / len(prompts)  # layers skipped per example
    s = skipped / n_layers
    out["skip_rate"] = {str(i): layer.skipped / max(1, layer.seen) for i, layer in zip(roe.layer_ids, layers)}
    out["skip_ratio_all_layers"] = s
    out["skip_ratio_routable_layers"] = skipped / len(layers)
    for bs in batch_sizes:
        times = {"roe": [], "dense": []}
        for _ in range(repeats):
            times["dense"].append(timed("dense", bs))
            times["roe"].append(timed("hard", bs))
        med = {k: statistics.median(x) for k, x in times.items()}
        out["by_batch_size"][str(bs)] = {
            "roe_ms_per_sample": 1000 * med["roe"], "dense_ms_per_sample": 1000 * med["dense"],
            "ratio": med["roe"] / med["dense"], "bound_1_minus_0.7s": 1 - 0.7 * s,
        }
    roe.ctx.mode = "hard"
    return out
