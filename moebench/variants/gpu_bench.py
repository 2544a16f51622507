"""`moebench bench gpu`: the GPU path in one command, with random weights and synthetic inputs.

1. The MoE layer at MoE-LLaVA-2B size (d 2048, f 5632, 4 experts, top-2, 16k tokens, bf16), forward +
   backward, against the equal-FLOPs dense FFN, transformers' grouped-mm experts and the eager loop
   (moebench.moe.bench.bench_moe_layer).
2. A training step of `moe_llava_2b` at full width and reduced depth (the recipe's LLM and CLIP presets,
   2 decoder and 2 vision layers, its MoE section), synthetic batches of the recipe's shape: tokens per
   second, model FLOPs utilisation (6 x the activated matmul parameters per token + attention, the
   counting of `moebench plan`, over the GPU's dense bf16 peak) and peak memory.
3. Evaluation: batched greedy generation of a fixed number of tokens at batch 1, 8 and 32 for the dense,
   MoE and RoE models of the same shape: samples per second, TTFT and TPOT, CUDA-synchronised.

`--device cpu --tiny` runs the same code at tiny sizes (a test does), so the GPU command cannot rot
unnoticed. Rows go to the metrics table (run `bench-gpu-<device>`, task `bench/<part>`), a markdown table
beside them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

# dense bf16 peak FLOP/s of the GPUs the MFU is quoted against (NVIDIA's data sheets, no sparsity)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

SIZES = {
    "full": {"moe": dict(hidden=2048, ffn=5632, experts=4, top_k=2, tokens=16384, repeats=5, dtype="bf16"),
             "train": dict(layers=2, vision_layers=2, batch=4, seq=2048, steps=5),
             "eval": dict(batch_sizes=(1, 8, 32), prompt=128, new_tokens=16)},
    "tiny": {"moe": dict(hidden=64, ffn=128, experts=4, top_k=2, tokens=256, repeats=2, dtype="fp32"),
             "train": dict(layers=2, vision_layers=1, batch=2, seq=64, steps=2, hidden=64, ffn=128, heads=4,
                           v_hidden=32, v_ffn=64, v_heads=2, image=28, patch=14, vocab=512),
             "eval": dict(batch_sizes=(1, 2), prompt=16, new_tokens=3)},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _recipe(variant: str):
    """moe_llava_2b for MoE, its dense parent llava_dense_2b for dense and RoE (the same LLM)."""
    from moebench.config import load_recipe

    over = ["model.llm.pretrained=null", "model.vision.pretrained=null"]
    return load_recipe("moe_llava_2b" if variant == "moe" else "llava_dense_2b", over)


def build_model(variant: str, size: dict, device: torch.device):
    """A random-weight VLM of the recipe's families: full width (or the tiny widths), reduced depth."""
    from moebench import variants
    from moebench.plan import assemble_vlm, llm_config, vision_config

    recipe, t = _recipe(variant), size["train"]
    lcfg, vcfg = llm_config(recipe), vision_config(recipe)
    lcfg.num_hidden_layers, vcfg.num_hidden_layers = t["layers"], t["vision_layers"]
    if "hidden" in t:  # tiny
        lcfg.hidden_size, lcfg.intermediate_size, lcfg.vocab_size = t["hidden"], t["ffn"], t["vocab"]
        lcfg.num_attention_heads = lcfg.num_key_value_heads = t["heads"]
        if hasattr(lcfg, "head_dim"):
            lcfg.head_dim = t["hidden"] // t["heads"]
        vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_attention_heads = t["v_hidden"], t["v_ffn"], t["v_heads"]
        vcfg.image_size, vcfg.patch_size = t["image"], t["patch"]
    torch.manual_seed(0)
    model = assemble_vlm(recipe, lcfg, vcfg)
    for i, _ in enumerate(recipe.stages):
        for v in variants.chain(recipe.variant):
            v.transform(model, recipe, i)
    if variant == "roe":  # every layer after the first may be skipped (roe_llava_1_5_7b's settings otherwise)
        from moebench.config import RoEConfig
        from moebench.roe.model import add_roe

        add_roe(model, RoEConfig(target_skip=0.3, layers=list(range(1, t["layers"]))))
    return model.to(device), recipe


def _batch(model, batch: int, seq: int, device: torch.device) -> dict:
    vocab = model.llm.config.vocab_size
    n_img = model.num_image_tokens
    ids = torch.randint(1, vocab, (batch, seq), device=device)
    ids[:, 1: 1 + n_img] = model.image_token_id
    size = model.vision_tower.config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.randn(batch, 3, size, size, device=device)}


def _flops_per_token(model, seq: int) -> float:
    """6 x activated matmul parameters of the LM (forward 2x, backward 4x) + attention (12 x layers x d x
    seq for scores and weighted sum, forward and backward): `moebench plan`'s counting, times three."""
    from moebench.models.params import count_params

    p = count_params(model)
    emb = model.llm.get_input_embeddings().weight.numel()
    cfg = model.llm.config
    return 6 * (p["llm_activated"] - emb) + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def bench_train(size: dict, device: torch.device) -> dict:
    from moebench.eval.runner import _peak_memory_mb
    from moebench.models.vlm import lm_loss

    model, _ = build_model("moe", size, device)
    t = size["train"]
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = _batch(model, t["batch"], t["seq"], device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else \
        torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast:
            out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
            loss = lm_loss(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(t["steps"]):
        step()
    _sync(device)
    sec = (time.perf_counter() - t0) / t["steps"]
    tokens = t["batch"] * t["seq"]
    flops = _flops_per_token(model, t["seq"]) * tokens / sec
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"seconds_per_step": sec, "tokens_per_s": tokens / sec, "model_flops_per_s": flops,
            "mfu": flops / peak if peak else None, "peak_mem_mb": _peak_memory_mb(device),
            "layers": t["layers"], "batch": t["batch"], "seq": t["seq"]}


@torch.no_grad()
def bench_eval(size: dict, device: torch.device) -> dict:
    from moebench.eval.generate import greedy_generate

    e, out = size["eval"], {}
    for variant in ("dense", "moe", "roe"):
        model, _ = build_model(variant, size, device)
        if variant == "roe":
            model.roe.ctx.mode = "hard"
        model.eval()
        if device.type == "cuda":
            model.to(torch.bfloat16)
        vocab, size_px = model.llm.config.vocab_size, model.vision_tower.config.image_size
        out[variant] = {}
        for bs in e["batch_sizes"]:
            prompts = [[model.image_token_id] * model.num_image_tokens
                       + torch.randint(1, vocab, (e["prompt"],)).tolist() for _ in range(bs)]
            pixels = torch.randn(bs, 3, size_px, size_px, device=device, dtype=next(model.parameters()).dtype)
            run = lambda: greedy_generate(model, prompts, pixels, max_new_tokens=e["new_tokens"],  # noqa: E731
                                          eos_id=-1, pad_id=0)  # eos never: a fixed number of tokens
            run()  # warm-up
            t0 = time.perf_counter()
            g = run()
            _sync(device)
            wall = time.perf_counter() - t0
            out[variant][bs] = {"samples_per_s": bs / wall, "ttft_ms": 1000 * g.ttft_s,
                                "tpot_ms": 1000 * g.decode_s / max(g.decode_steps, 1)}
    return out


def bench_gpu(device: str = "cuda", tiny: bool = False, results_dir: Path | None = None) -> dict:
    from moebench import results
    from moebench.moe.bench import bench_moe_layer

    dev = torch.device(device)
    size = SIZES["tiny" if tiny else "full"]
    t0 = time.perf_counter()
    r = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "tiny": tiny,
         "moe_layer": bench_moe_layer(**size["moe"], device=device),
         "train": bench_train(size, dev), "eval": bench_eval(size, dev)}
    r["seconds"] = time.perf_counter() - t0
    if results_dir is not None:
        run = f"bench-gpu-{dev.type}{'-tiny' if tiny else ''}"
        stamp, versions = results.utc_now(), results.software_versions()
        rows = [{"task": "bench/moe_layer", "split": name, "metric": "x_dense", "value": v}
                for name, v in r["moe_layer"]["ratio_to_dense"].items()]
        rows += [{"task": "bench/train", "split": "moe_llava_2b", "metric": k, "value": v}
                 for k, v in r["train"].items() if v is not None and k != "peak_mem_mb"]
        rows += [{"task": "bench/eval", "split": f"{variant}/batch{bs}", "metric": "samples_per_s",
                  "value": x["samples_per_s"], "ttft_ms": x["ttft_ms"], "tpot_ms": x["tpot_ms"], "batch_size": bs}
                 for variant, by in r["eval"].items() for bs, x in by.items()]
        common = {"run": run, "device": r["device"], "threads": torch.get_num_threads(), "timestamp": stamp,
                  "peak_mem_mb": r["train"]["peak_mem_mb"], **versions}
        results.append_rows(results_dir, "metrics", run, [{**common, **row} for row in rows])
        md = Path(results_dir) / run / "bench-gpu.md"
        md.write_text(markdown(r))
        r["markdown"] = str(md)
    return r


def markdown(r: dict) -> str:
    m, t = r["moe_layer"], r["train"]
    lines = [f"# moebench bench gpu ({r['device']}{', tiny' if r['tiny'] else ''}, {r['seconds']:.0f} s)", "",
             "| MoE layer fwd+bwd | ms | x dense FFN |", "|---|---|---|"]
    lines += [f"| {n} | {1000 * s:.2f} | {m['ratio_to_dense'][n]:.2f} |" for n, s in m["seconds"].items()]
    mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a"
    lines += ["", "| training step (moe_llava_2b, reduced depth) | value |", "|---|---|",
              f"| tokens / s | {t['tokens_per_s']:.0f} |", f"| MFU | {mfu} |",
              f"| peak memory MB | {t['peak_mem_mb']:.0f} |", "",
              "| eval | batch | samples / s | TTFT ms | TPOT ms |", "|---|---|---|---|---|"]
    for variant, by in r["eval"].items():
        lines += [f"| {variant} | {bs} | {x['samples_per_s']:.1f} | {x['ttft_ms']:.1f} | {x['tpot_ms']:.2f} |"
                  for bs, x in by.items()]
    return "\n".join(lines) + "\n"
