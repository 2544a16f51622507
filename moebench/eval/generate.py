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
from torch import nn

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


def _prefill(model, prompts, pixel_values, image_features, image_index, pad_id: int):
    """The prompts' forward with a fresh KV cache: (first tokens, cache, mask, positions)."""
    from transformers import DynamicCache

    device = (pixel_values if image_features is None else image_features).device
    ids, mask = pad_stack([torch.tensor(p) for p in prompts], pad_id, left=True)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    cache = DynamicCache(config=model.llm.config)
    if image_index is not None and image_features is None:  # each distinct image through the tower once
        image_features, pixel_values = model.image_features(pixel_values)[image_index.to(device)], None
    out = model(ids, mask, pixel_values, positions, cache=cache, use_cache=True, logits_to_keep=1,
                image_features=image_features)
    nxt = _next(out.logits, model.image_token_id)  # (B,)
    for ext in model.extensions():  # e.g. tokens the prefill needed that decoding must not see
        ext.after_prefill(model, cache)
    return nxt, cache, mask, positions


def _decode(model, nxt, cache, mask, positions, *, max_new_tokens: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """Greedy steps after the first token `nxt` (B,), on the prefill's cache: (B, steps) ids, the first
    included; stops early once every row has produced `eos_id` (later ids of a finished row are pads)."""
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
    return torch.stack(steps, dim=1)


def _cut(rows: list[list[int]], eos_id: int) -> list[list[int]]:
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], pixel_values: torch.Tensor | None, *, max_new_tokens: int,
                    eos_id: int, pad_id: int, image_features: torch.Tensor | None = None,
                    image_index: torch.Tensor | None = None) -> Generation:
    """`image_features` (already projected) replace `pixel_values`: then the timings cover the LLM only.
    `image_index` (B,): prompt i is about image `pixel_values[image_index[i]]` (default: the i-th)."""
    device = (pixel_values if image_features is None else image_features).device
    _sync(device)
    t0 = time.perf_counter()
    nxt, cache, mask, positions = _prefill(model, prompts, pixel_values, image_features, image_index, pad_id)
    _sync(device)
    t1 = time.perf_counter()
    gen = _decode(model, nxt, cache, mask, positions, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    _sync(device)
    t2 = time.perf_counter()
    return Generation(tokens=_cut(gen.tolist(), eos_id), ttft_s=t1 - t0, decode_s=t2 - t1,
                      decode_steps=gen.shape[1] - 1)


@dataclass
class Finished:
    """One prompt's answer from `GroupedGeneration`."""

    key: object  # the caller's id for the prompt
    tokens: list[int]  # generated ids, without the final </s>
    ttft_s: float  # its prefill batch's time (vision, projector, prefill, first token)
    decode_s: float  # its decoding batch's time (0 when its first token ended it while others decode on)
    decode_steps: int  # decoding forwards of that batch
    prefill_batch: int  # prompts in its prefill batch


def _compact(nxt, mask, positions, layout, rows: list[int], ttft: float, size: int) -> "_Waiting":
    """The waiting rows of a prefill batch, copied out (so the batch's other KV rows are freed). When every
    row waits there is nothing to free and they are kept as they are: nothing writes to a prefill's tensors
    after it (decoding batches are gathered from them into new ones)."""
    if len(rows) == len(nxt):
        return _Waiting(nxt, mask, positions, list(layout), ttft, size)
    idx = torch.tensor(rows, device=mask.device)
    kept = []
    for entry in layout:
        at = [None if entry is None else entry[2][j] for j in rows]
        have = [r for r in at if r is not None]
        if not have:
            kept.append(None)
            continue
        sel = torch.tensor(have, device=mask.device)
        count = iter(range(len(have)))
        kept.append((entry[0].index_select(0, sel), entry[1].index_select(0, sel),
                     [None if r is None else next(count) for r in at]))
    return _Waiting(nxt[idx], mask[idx], positions[idx], kept, ttft, size)


@dataclass
class _Waiting:
    """The prompts of one prefill batch that wait for a decoding batch: first tokens, masks, positions and,
    per decoder layer, (keys, values, rows): rows[j] is prompt j's row there, None where it skips the layer."""

    nxt: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    layout: list
    ttft_s: float
    size: int  # prompts in the prefill batch
    copy_s: float = 0.0  # the time copying these rows out took


class GroupedGeneration:
    """Greedy generation that prefills in the caller's batches and decodes in batches of equal decoding key.

    A variant whose examples take different paths through the LM (RoE: which layers each example skips,
    fixed at prefill) tells generation, after each prefill, each prompt's key and where its keys and
    values are (`LMExtension.decode_layout`). The prompts still to decode wait in one pool per key (copied
    out of their prefill batch where some of its prompts already finished); a pool that holds `batch_size`
    prompts decodes them as one batch, their KV rows gathered and left-padded to one length, and a layer
    that the key skips is skipped by the whole batch: decoding reads none of its weights. When
    `waiting_cap` (4 batches) prompts wait, and at `flush`, the largest pools decode together instead: a
    batch of mixed keys, where a layer that only some rows run is computed on their sub-batch
    (`LMExtension.begin_decode`). No forward computes more than `batch_size` prompts, and at most
    `waiting_cap` + `batch_size` prompts' KV rows are held. Answers equal `greedy_generate`'s as far as
    the kernels are batch-invariant (padding is masked and positions count real tokens; tested in fp32 on
    CPU). Timing: `prefill_s` sums the prefills (to the first tokens), `decode_s` the decoding batches with
    everything they need: copying waiting rows out of their prefill batch and merging them."""

    def __init__(self, model, *, batch_size: int, max_new_tokens: int, eos_id: int, pad_id: int):
        self.model, self.batch_size = model, batch_size
        self.kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
        self.pools: dict[object, list[tuple[_Waiting, int, object, object]]] = {}  # key -> (batch, row, id, key)
        self.waiting_cap = 4 * batch_size
        self.prefill_s = self.decode_s = 0.0  # totals over the calls
        self.prefills = self.decode_steps = 0

    def _layout(self, cache, n: int):
        for ext in self.model.extensions():
            layout = ext.decode_layout(self.model, cache, n)
            if layout is not None:
                return layout
        return [None] * n, [(layer.keys, layer.values, list(range(n))) for layer in cache.layers]

    @torch.no_grad()
    def add(self, keys: list, prompts: list[list[int]], pixel_values: torch.Tensor | None = None, *,
            image_features: torch.Tensor | None = None, image_index: torch.Tensor | None = None) -> list[Finished]:
        """Prefill one batch (arguments as `greedy_generate`'s; `keys` name the prompts); returns the prompts
        finished by this call: those whose first token ends them, any decoding batch that filled up, and
        any mixed batch decoded because `waiting_cap` prompts were waiting."""
        device = (pixel_values if image_features is None else image_features).device
        _sync(device)
        t0 = time.perf_counter()
        nxt, cache, mask, positions = _prefill(self.model, prompts, pixel_values, image_features, image_index,
                                               self.kw["pad_id"])
        alone = self.batch_size == 1  # one prompt is one key: it decodes on its own cache, as greedy_generate does
        groups, layout = ([None], None) if alone else self._layout(cache, len(prompts))
        first = nxt.tolist()
        _sync(device)
        ttft = time.perf_counter() - t0
        self.prefill_s += ttft
        self.prefills += 1
        if alone or (len(set(groups)) == 1 and len(prompts) == self.batch_size and not self.pools.get(groups[0])):
            # a full batch of one key decodes on its own cache, as greedy_generate does
            return self._decode(groups * len(keys) if alone else groups, keys, [(ttft, len(prompts))] * len(keys),
                                      nxt, cache, mask, positions)
        out, rows = [], []
        for j, key in enumerate(keys):
            if first[j] == self.kw["eos_id"] or self.kw["max_new_tokens"] <= 1:
                out.append(Finished(key, _cut([[first[j]]], self.kw["eos_id"])[0], ttft, 0.0, 0, len(prompts)))
            else:
                rows.append(j)
        if rows:
            t1 = time.perf_counter()  # the device is idle since the prefill's sync: only host work ran after it
            waiting = _compact(nxt, mask, positions, layout, rows, ttft, len(prompts))
            _sync(device)
            waiting.copy_s = time.perf_counter() - t1  # decoding's share: counted where its rows decode
            for r, j in enumerate(rows):
                self.pools.setdefault(groups[j], []).append((waiting, r, keys[j], groups[j]))
        for pool in self.pools.values():
            while len(pool) >= self.batch_size:
                out += self._merge_and_decode(pool[: self.batch_size])
                del pool[: self.batch_size]
        # many keys fill their pools slowly: from `waiting_cap` prompts waiting, decode a batch of the
        # largest pools together (mixed keys), so the KV rows held stay bounded
        while sum(map(len, self.pools.values())) >= self.waiting_cap:
            out += self._merge_and_decode(self._take(self.batch_size))
        return out

    def _take(self, n: int) -> list:
        """Up to n waiting prompts, from the largest pools first (so a batch holds few keys)."""
        items = []
        for group in sorted(self.pools, key=lambda g: -len(self.pools[g])):
            pool = self.pools[group]
            k = min(n - len(items), len(pool))
            items += pool[:k]
            del pool[:k]
            if len(items) == n:
                break
        self.pools = {g: pool for g, pool in self.pools.items() if pool}
        return items

    @torch.no_grad()
    def flush(self) -> list[Finished]:
        """Decode every prompt still waiting: full batches, the largest pools first and one pool after
        another, so a batch mixes keys only where pools are smaller than a batch."""
        out = []
        while any(self.pools.values()):
            out += self._merge_and_decode(self._take(self.batch_size))
        return out

    def _merge_and_decode(self, items: list) -> list[Finished]:
        """One decoding batch from waiting prompts: per prefill batch they come from, one gather of their
        rows (masks, positions, first tokens, each layer's keys and values), left-padded to the longest.
        A layer that only some rows run gets those rows' keys and values apart, for the extension
        (`begin_decode`) to run it on that sub-batch."""
        from transformers import DynamicCache

        device = items[0][0].mask.device
        _sync(device)
        t0 = time.perf_counter()
        by_batch: dict[int, tuple[_Waiting, list[int], list]] = {}
        for w, j, key, group in items:
            part = by_batch.setdefault(id(w), (w, [], []))
            part[1].append(j)
            part[2].append((key, group))
        rows_in_order = [x for _, _, xs in by_batch.values() for x in xs]
        ttfts = [(w.ttft_s, w.size) for w, js, _ in by_batch.values() for _ in js]
        parts = [(w, js) for w, js, _ in by_batch.values()]
        length = max(w.mask.shape[1] for w, _ in parts)

        def gather(get, parts_, rows_of=lambda w, js: js) -> list[torch.Tensor]:
            """Each tensor of `get(w)` at the rows, left-padded to `length`, stacked over the prefill batches."""
            xs = []
            for w, js in parts_:
                if not js:
                    continue
                idx, pad = torch.tensor(rows_of(w, js), device=device), length - w.mask.shape[1]
                picked = [x.index_select(0, idx) for x in get(w)]
                xs.append([nn.functional.pad(x, (0, 0, pad, 0) if x.dim() == 4 else (pad, 0)) if pad else x
                           for x in picked])
            return [torch.cat(col) if len(col) > 1 else col[0] for col in zip(*xs)]

        mask, = gather(lambda w: (w.mask,), parts)
        positions = torch.cat([w.positions[js, -1:] for w, js in parts])
        nxt = torch.cat([w.nxt[js] for w, js in parts])
        cache = DynamicCache(config=self.model.llm.config)
        partial = {}  # layer -> (keys, values) of the rows that run it, when not all do
        for i in range(len(parts[0][0].layout)):
            has = [(w, [j for j in js if w.layout[i] is not None and w.layout[i][2][j] is not None]) for w, js in parts]
            n_has = sum(len(js) for _, js in has)
            if n_has == 0:  # every row skips this layer
                continue
            rows = lambda w, js, i=i: [w.layout[i][2][j] for j in js]  # noqa: E731
            kv = gather(lambda w, i=i: w.layout[i][:2], has, rows)
            if n_has == len(items):
                cache.update(*kv, i)
            else:
                partial[i] = kv
        _sync(device)
        # the merge, and each source batch's copy-out in proportion to the rows decoded here
        merge_s = time.perf_counter() - t0 + sum(w.copy_s * len(js) / len(w.nxt) for w, js in parts)
        return self._decode([g for _, g in rows_in_order], [k for k, _ in rows_in_order], ttfts, nxt, cache, mask,
                            positions, merge_s, partial)

    def _decode(self, groups: list, keys, ttfts, nxt, cache, mask, positions, spent: float = 0.0,
                partial: dict | None = None) -> list[Finished]:
        _sync(nxt.device)
        t0 = time.perf_counter()
        for ext in self.model.extensions():
            ext.begin_decode(self.model, groups, partial or {})
        gen = _decode(self.model, nxt, cache, mask, positions, **self.kw)
        _sync(nxt.device)
        took = spent + time.perf_counter() - t0
        self.decode_s += took
        self.decode_steps += gen.shape[1] - 1
        rows = _cut(gen.tolist(), self.kw["eos_id"])
        return [Finished(k, r, t, took, gen.shape[1] - 1, size) for k, r, (t, size) in zip(keys, rows, ttfts)]
