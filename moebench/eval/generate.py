"""Batched greedy decoding with a KV cache, left padding and per-phase timing.

Positions count real tokens only and padded keys are masked, so a prompt's output does not depend on
what else is in its batch. Timing: time to first token covers the vision tower, projector and prefill;
the decode phase covers every later token. On CUDA the timed regions are synchronised. Prompts about the
same image (POPE asks 6 questions per image) may share one row of `pixel_values` through `image_index`:
the vision tower then runs once per distinct image of the batch, inside the timed region.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moebench.data.conversations import pad_stack


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, without the final </s>
    ttft_s: float  # vision + projector + prefill + first token, for the whole batch
    decode_s: float  # all later decoding steps
    decode_steps: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _next(logits: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Greedy choice at the last position; the image placeholder is never generated (it is not a word)."""
    last = logits[:, -1].clone()
    last[:, image_token_id] = float("-inf")
    return last.argmax(-1)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], pixel_values: torch.Tensor | None, *, max_new_tokens: int,
                    eos_id: int, pad_id: int, image_features: torch.Tensor | None = None,
                    image_index: torch.Tensor | None = None) -> Generation:
    """`image_features` (already projected) replace `pixel_values`: then the timings cover the LLM only.
    `image_index` (B,): prompt i is about image `pixel_values[image_index[i]]` (default: the i-th)."""
    from transformers import DynamicCache

    device = (pixel_values if image_features is None else image_features).device
    ids, mask = pad_stack([torch.tensor(p) for p in prompts], pad_id, left=True)  # (B, T)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    cache = DynamicCache(config=model.llm.config)
    _sync(device)
    t0 = time.perf_counter()
    if image_index is not None and image_features is None:  # each distinct image through the tower once
        image_features, pixel_values = model.image_features(pixel_values)[image_index.to(device)], None
    out = model(ids, mask, pixel_values, positions, cache=cache, use_cache=True, logits_to_keep=1,
                image_features=image_features)
    nxt = _next(out.logits, model.image_token_id)  # (B,)
    for ext in model.extensions():  # e.g. tokens the prefill needed that decoding must not see
        ext.after_prefill(model, cache)
    _sync(device)
    t1 = time.perf_counter()
    done = nxt == eos_id
    steps = [nxt]
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(nxt[:, None], mask, None, positions, cache=cache, use_cache=True)
        nxt = _next(out.logits, model.image_token_id).masked_fill(done, pad_id)
        done |= nxt == eos_id
        steps.append(nxt)
    _sync(device)
    t2 = time.perf_counter()
    gen = torch.stack(steps, dim=1).tolist()  # (B, steps)
    tokens = []
    for row in gen:
        cut = row.index(eos_id) if eos_id in row else len(row)
        tokens.append(row[:cut])
    return Generation(tokens=tokens, ttft_s=t1 - t0, decode_s=t2 - t1, decode_steps=len(steps) - 1)
