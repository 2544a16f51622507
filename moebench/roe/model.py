"""RoE, Routing Experts (ICLR 2025, arXiv 2407.14093): per-example layer skipping.

Every routable decoder layer l becomes an "expert" an example may skip:

    [run, skip] logits  r_l = Router_l([h_img; h_txt])        Linear(2d, 2) on the routing tokens' states
    soft (training)     out = w_run * Layer_l(h) + w_skip * (h + Adapter_l(norm_l(h))),  w = softmax(r_l / T)
    hard (inference)    the argmax, decided at prefill and kept for every decoding step
    Adapter_l           Linear(d, r, no bias), ReLU, Linear(r, d, no bias)

Routing tokens: two learned embeddings (image, text) appended after the prompt. The image one attends
to the image tokens, the text one to the first turn's text (both to themselves); normal tokens never
attend to them, so they change nothing but the routing. After prefill their keys and values are cropped
from the KV caches, so decoding runs with the same plain mask as the dense model.

Their mask is boolean where the LM runs SDPA: RoE switches such an LM to `moebench_routed_sdpa`, transformers'
own SDPA attention registered under a name of ours (`AttentionInterface`, with `sdpa_mask` for its masks),
except that on CPU a boolean mask runs with grouped keys (`enable_gqa`) instead of transformers' repeated
ones. On CPU an additive float mask with repeated keys costs about 2.3x the unmasked causal kernel at
batch 1; a boolean one with grouped keys about 1.2x (docs/performance.md, "RoE latency").

At inference a layer runs only on the examples that need it: the wrapper gathers that sub-batch, runs
the layer on it with its own KV cache (the decision never changes during decoding, so the cache stays
consistent), and gives the other examples the adapter shortcut. The public RoE code skips only at
batch size 1 and its released eval path never skips; this does, at any batch size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moebench.config import RoEConfig
from moebench.distributed import shard_rand
from moebench.models.extensions import LMExtension

ROUTED_SDPA = "moebench_routed_sdpa"  # the attention implementation RoE gives an LM that runs SDPA


def routed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' SDPA attention (the `AttentionInterface` contract: (B, H, T, D) in, (B, T, H, D) out),
    except for a prefill with a boolean mask on CPU, where grouped-query keys and values go to SDPA as they
    are (`enable_gqa`) instead of repeated per head: same result, no copies. transformers repeats them
    whenever there is a mask because CUDA's fused kernels need that; other devices keep its path."""
    if (attention_mask is None or attention_mask.dtype != torch.bool or query.device.type != "cpu"
            or query.shape[2] == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                     scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Make `moebench_routed_sdpa` known to transformers: the attention function, and SDPA's mask builder for
    the masks transformers makes itself (padding, decoding)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ROUTED_SDPA, routed_sdpa)
    AttentionMaskInterface.register(ROUTED_SDPA, sdpa_mask)


@dataclass
class RoEContext:
    """State shared by the VLM and its RoE layers for one forward."""

    mode: str = "hard"  # soft | random | hard | dense (run every layer: the dense parent)
    temperature: float = 1.0
    target: float = 0.3  # random mode skips with this probability
    routing: bool = False  # this forward carries the two routing tokens at the last positions
    generator: torch.Generator | None = None
    # per routed layer, this forward: (B,) skip probabilities (soft), or the (B,) boolean run decisions (hard, random)
    skip_probs: list[torch.Tensor] = field(default_factory=list)
    routing_in_cache: bool = False  # the last prefill left the routing tokens' keys and values in the caches


class _LayerState:
    """A routable layer's decisions and counters, in a plain object: a prefill sets several fields per
    layer, and at batch 1 `nn.Module.__setattr__` on each would be a measurable share of its time."""

    __slots__ = ("all_run", "none_run", "run_idx", "skip_idx", "order", "cache", "calls", "seen", "skipped")

    def __init__(self):
        self.all_run, self.none_run = True, False  # decided at prefill, on the host: every example runs / none does
        self.run_idx = self.skip_idx = None  # (n,) the examples that run / skip, when both kinds exist
        self.order = None  # (B,) where each example is in [run rows; skip rows]
        self.cache = None  # the running sub-batch's own KV cache (hard mode, when only some examples run)
        self.calls = 0  # examples this layer was computed for (tests)
        self.seen = self.skipped = 0  # hard-mode prefill decisions, for the skip rate

    def split(self, run_mask: torch.Tensor, cache) -> None:
        """Some examples of the batch run the layer (`run_mask`, (B,) bool), the others skip it: their
        indices, the order that puts [run rows; skip rows] back in batch order, and the running
        sub-batch's own KV cache."""
        self.all_run = self.none_run = False
        self.run_idx, self.skip_idx = run_mask.nonzero().flatten(), (~run_mask).nonzero().flatten()
        self.order = torch.cat([self.run_idx, self.skip_idx]).argsort()
        self.cache = cache


class RoELayer(nn.Module):
    """A decoder layer an example may skip, with its adapter shortcut and router."""

    @property
    def cache(self):
        """The running sub-batch's own KV cache, when only some examples run this layer."""
        return self.state.cache

    @property
    def calls(self) -> int:
        """Examples this layer was computed for."""
        return self.state.calls

    @property
    def seen(self) -> int:
        """Examples routed here in hard mode (prefills)."""
        return self.state.seen

    @seen.setter
    def seen(self, n: int) -> None:
        self.state.seen = n

    @property
    def skipped(self) -> int:
        """Of those, the examples that skipped this layer."""
        return self.state.skipped

    @skipped.setter
    def skipped(self, n: int) -> None:
        self.state.skipped = n

    def __init__(self, layer: nn.Module, hidden: int, rank: int, ctx: RoEContext):
        super().__init__()
        self.layer = layer
        self.adapter = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.ReLU(), nn.Linear(rank, hidden, bias=False))
        nn.init.zeros_(self.adapter[2].weight)  # the shortcut starts as the identity
        self.router = nn.Linear(2 * hidden, 2)
        with torch.no_grad():  # start by running every layer (softly): a bias towards "run"
            self.router.bias.copy_(torch.tensor([2.0, 0.0]))
        self.ctx = ctx
        self.state = _LayerState()

    def run_all(self) -> None:
        """Every example runs this layer, on the model's KV cache (the state until a prefill decides)."""
        self.fix(True)

    def fix(self, run: bool) -> None:
        """The whole batch runs this layer (on the model's cache) or skips it."""
        st = self.state
        st.all_run, st.none_run, st.run_idx, st.skip_idx, st.order, st.cache = run, not run, None, None, None, None

    @property
    def mlp(self) -> nn.Module:
        """The wrapped layer's FFN (so FFN-level code sees through the wrapper)."""
        return self.layer.mlp

    def shortcut(self, h: torch.Tensor) -> torch.Tensor:
        """`h + Adapter(norm(h))`. On a skipped layer this is all that runs, and at decode size its cost is
        its operator count, so where the norm is an RMSNorm (Qwen2, Llama) and no autocast is active it
        runs as four operators (fused norm, matmul, in-place ReLU, matmul adding the residual) with the
        modules' result (tested)."""
        norm, down, up = self.layer.input_layernorm, self.adapter[0], self.adapter[2]
        eps = getattr(norm, "variance_epsilon", None)  # Qwen2RMSNorm / LlamaRMSNorm
        if eps is None or torch.is_autocast_enabled(h.device.type):
            return h + self.adapter(norm(h))
        if h.dtype == torch.float32:  # the RMSNorm modules normalise in fp32, then scale: one fused op here
            x = nn.functional.rms_norm(h, (h.shape[-1],), norm.weight, eps)
        else:
            x = nn.functional.rms_norm(h.float(), (h.shape[-1],), eps=eps).to(h.dtype) * norm.weight
        a = torch.relu_(nn.functional.linear(x, down.weight))
        return torch.addmm(h.reshape(-1, h.shape[-1]), a.reshape(-1, a.shape[-1]), up.weight.t()).view_as(h)

    def route_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 2) [run, skip] from the routing tokens' states at this layer's input (the last two)."""
        rt = h[:, -2:].reshape(h.shape[0], -1).float()  # (B, 2d)
        w, b = self.router.weight.float(), self.router.bias.float()
        if not torch.is_autocast_enabled(h.device.type):  # entering an autocast context costs more than the router
            return nn.functional.linear(rt, w, b)
        with torch.autocast(h.device.type, enabled=False):
            return nn.functional.linear(rt, w, b)

    def _run(self, h: torch.Tensor, idx: torch.Tensor | None, kwargs: dict, cache) -> torch.Tensor:
        """The wrapped layer on the examples `idx` (None = all), with their slice of the masks."""
        if idx is None:
            self.state.calls += h.shape[0]
            return self.layer(h, cache=cache, **kwargs)
        sub = dict(kwargs)  # index_select, not advanced indexing: a fraction of its time on CPU
        for key in ("attention_mask", "position_ids"):
            if torch.is_tensor(sub.get(key)) and sub[key].shape[0] == h.shape[0]:
                sub[key] = sub[key].index_select(0, idx)
        pe = sub.get("position_embeddings")
        if pe is not None and pe[0].shape[0] == h.shape[0]:
            sub["position_embeddings"] = tuple(p.index_select(0, idx) for p in pe)
        self.state.calls += int(idx.numel())
        return self.layer(h.index_select(0, idx), cache=cache, **sub)

    def forward(self, hidden_states: torch.Tensor, cache=None, **kwargs) -> torch.Tensor:
        """Called by the LM's decoder loop with the wrapped layer's arguments; `cache` is the model's
        transformers `Cache`, the rest (masks, positions, rotary embeddings) pass through unchanged."""
        ctx, h = self.ctx, hidden_states
        if ctx.mode == "dense":
            return self._run(h, None, kwargs, cache)
        if ctx.routing:
            logits = self.route_logits(h)
            if ctx.mode == "soft":
                w = torch.softmax(logits / ctx.temperature, dim=-1).to(h.dtype)  # (B, 2)
                ctx.skip_probs.append(w[:, 1].float())
                out = self._run(h, None, kwargs, None)
                return w[:, :1, None] * out + w[:, 1:, None] * self.shortcut(h)
            if ctx.mode == "random":  # warm-up: hard skips at the target rate, adapters learn
                skip = shard_rand(h.shape[0], ctx.generator) < ctx.target  # as one process draws them
                run = ~skip.to(h.device)
            else:
                run = logits.argmax(-1) == 0  # (B,) run
            ctx.skip_probs.append(run)  # hard decisions: 1 - run is the skip probability
            self._decide(run, cache, count=ctx.mode == "hard")
        st = self.state
        if st.all_run:  # the whole batch runs: the model's own cache at this layer's index, as dense
            return self._run(h, None, kwargs, cache)
        if st.none_run:
            return self.shortcut(h)
        ran = self._run(h, st.run_idx, kwargs, st.cache)
        return torch.cat([ran, self.shortcut(h.index_select(0, st.skip_idx))]).index_select(0, st.order)

    def _decide(self, run_mask: torch.Tensor, cache, count: bool) -> None:
        """Fix this prefill's decisions for the whole generation, on the host, once: which examples run
        (their indices). A sub-batch gets a KV cache of its own; when the whole batch runs, the layer
        uses the model's cache at its index, as the dense layer does."""
        run = run_mask.tolist()
        n_run = sum(run)
        self.fix(n_run > 0)
        st = self.state
        if 0 < n_run < len(run):
            st.split(run_mask, type(cache)() if cache is not None else None)
        if count:
            st.seen += len(run)
            st.skipped += len(run) - n_run


def routable_layers(cfg: RoEConfig, num_layers: int) -> list[int]:
    return list(cfg.layers) if cfg.layers is not None else list(range(1, num_layers - 1))


class RoE(LMExtension):
    """The RoE parts of a VLM (`model.roe`): the routing-token embeddings and the wrapped layers' context.
    As the VLM's extension it runs the LM with the routing tokens appended whenever an image is given."""

    uneven_gradients = True  # a layer that every example of one rank's share skips has no gradient there
    groups_decoding = True  # decoding batches of one skip pattern skip whole layers (decode_layout)

    def __init__(self, hidden: int, cfg: RoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Parameter(torch.randn(2, hidden) * 0.02)  # image, text routing tokens
        self.ctx = RoEContext(target=cfg.target_skip)
        self.layer_ids: list[int] = []
        self.boolean_mask = False  # the LM runs moebench_routed_sdpa: routing masks are boolean (add_roe)

    def layers(self, llm) -> list[RoELayer]:
        return [llm.model.layers[i] for i in self.layer_ids]

    def run_every_layer(self, llm) -> None:
        """A prompt without an image has no routing tokens: every layer runs, on the model's cache."""
        for layer in self.layers(llm):
            layer.run_all()

    def run_lm(self, vlm, embeds, attention_mask, position_ids, *, input_ids, labels, cache, use_cache,
               logits_to_keep, has_image):
        """Prefill and training with an image: append the routing tokens, run, drop their logits. A
        text-only prompt runs every layer; decoding steps keep their prefill's decisions."""
        if not has_image:
            if cache is None or cache.get_seq_length() == 0:
                self.run_every_layer(vlm.llm)
            return None
        if self.ctx.mode == "dense":
            return None
        embeds, mask, positions = with_routing_tokens(vlm, embeds, attention_mask, position_ids, input_ids, labels)
        self.ctx.routing, self.ctx.skip_probs, self.ctx.routing_in_cache = True, [], bool(use_cache)
        try:
            out = vlm.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                          cache=cache, use_cache=use_cache,
                          logits_to_keep=logits_to_keep + 2 if logits_to_keep else 0)
        finally:
            self.ctx.routing = False
        out.logits = out.logits[:, :-2]
        return out

    def after_prefill(self, vlm, cache) -> None:
        """Remove the two routing tokens (the last two positions) from every KV cache. No normal token
        attends to them, so decoding gives the same result without them."""
        if self.ctx.routing_in_cache:
            for c in [cache] + [layer.cache for layer in self.layers(vlm.llm) if layer.cache is not None]:
                c.crop(-2)
            self.ctx.routing_in_cache = False

    def decode_layout(self, vlm, cache, batch_size: int):
        """Each example's skip pattern (run or not, per routable layer) as its decoding key, and where its
        keys and values are: the model's cache for a layer its whole batch ran, the layer's own sub-batch
        cache for a layer only some ran. None in dense mode (no routing: nothing to group)."""
        if self.ctx.mode == "dense":
            return None
        routed = {i: layer.state for i, layer in zip(self.layer_ids, self.layers(vlm.llm))}
        runs, layout = [], []
        for i, entry in enumerate(cache.layers):
            st = routed.get(i)
            rows: list[int | None] = list(range(batch_size))
            if st is not None and st.none_run:
                rows, entry = [None] * batch_size, None
            elif st is not None and not st.all_run:
                rows = [None] * batch_size
                for r, j in enumerate(st.run_idx.tolist()):
                    rows[j] = r
                entry = st.cache.layers[i]
            if st is not None:
                runs.append(rows)
            layout.append(None if entry is None else (entry.keys, entry.values, rows))
        keys = [tuple(rows[j] is not None for rows in runs) for j in range(batch_size)]
        return keys, layout

    def begin_decode(self, vlm, keys: list, partial: dict) -> None:
        """Each routable layer of a decoding batch: run by every row (the model's cache), by none, or, in
        a batch of mixed patterns, by a sub-batch on its own cache holding those rows' keys and values."""
        if keys[0] is None:  # one prompt decoding on its own prefill's cache: the decisions stand
            return
        from transformers import DynamicCache

        for k, (i, layer) in enumerate(zip(self.layer_ids, self.layers(vlm.llm))):
            run = [key[k] for key in keys]
            layer.fix(run[0])
            if i in partial:
                cache = DynamicCache()
                cache.update(*partial[i], i)
                layer.state.split(torch.tensor(run, device=partial[i][0].device), cache)

    def skipped_parameters(self, llm, skip_rates: dict[str, float]) -> float:
        """Parameters an example does not use on average, given each routable layer's measured skip
        rate: a skipped layer's weights, or a run layer's adapter."""
        out = 0.0
        for i, layer in zip(self.layer_ids, self.layers(llm)):
            rate = skip_rates.get(str(i), 0.0)
            out += rate * _count(layer.layer) + (1 - rate) * _count(layer.adapter)
        return out

    def parameter_counts(self, vlm, stats: dict | None) -> tuple[int, int]:
        """The routing tokens, adapters and routers count in the total. Activated: with measured skip
        rates (`stats["skip_rate"]`), the mean over examples; without them, every layer runs and no adapter."""
        own = _count(self)  # the routing tokens live beside the LLM
        rates = (stats or {}).get("skip_rate")
        if rates:
            return own, own - round(self.skipped_parameters(vlm.llm, rates))
        return own, own - sum(_count(layer.adapter) for layer in self.layers(vlm.llm))


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def add_roe(model, cfg: RoEConfig, attention: str = "sdpa") -> list[int]:
    """Wrap the routable decoder layers of `model.llm` in place; attach `model.roe`. Returns the layers.

    `attention`: the LM's attention implementation, as the recipe names it. An SDPA LM is switched to
    `moebench_routed_sdpa` (SDPA with boolean routing masks); an eager one keeps eager, with additive masks."""
    llm = model.llm
    d = llm.config.hidden_size
    rank = cfg.adapter_rank or d // 2
    roe = RoE(d, cfg)
    device = next(llm.parameters()).device
    for i in routable_layers(cfg, llm.config.num_hidden_layers):
        llm.model.layers[i] = RoELayer(llm.model.layers[i], d, rank, roe.ctx).to(device)
    roe.layer_ids = routable_layers(cfg, llm.config.num_hidden_layers)
    if attention == "sdpa":
        register_attention()
        llm.set_attn_implementation(ROUTED_SDPA)
        roe.boolean_mask = True
    model.roe = roe.to(device)
    return roe.layer_ids


def with_routing_tokens(model, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                        input_ids: torch.Tensor, labels: torch.Tensor | None):
    """Append the two routing tokens; return (embeds, 4-D mask, positions).

    The image token attends to the image placeholders, the text token to the real non-image tokens
    before the first supervised one (the first turn's prompt); normal tokens do not see either. The mask
    is boolean for an LM on `moebench_routed_sdpa`, additive otherwise (eager adds it). It is built in a
    dozen operators over cached causal and diagonal patterns: at batch 1 its construction is a visible
    share of a prefill.
    """
    b, t, _ = embeds.shape
    real = attention_mask.bool()
    image = (input_ids == model.image_token_id) & real
    text = real & ~image
    if labels is not None:  # training: only the first turn's prompt
        supervised = labels != -100
        first = torch.where(supervised.any(-1), supervised.float().argmax(-1), torch.full_like(labels[:, 0], t))
        text &= torch.arange(t, device=embeds.device)[None] < first[:, None]
    causal, diagonal = _patterns(t, embeds.device)
    # prompt rows: causal over real keys; a padding row sees itself (no empty softmax row); nobody sees the
    # routing tokens. Routing rows: their segment, and themselves.
    prompt = nn.functional.pad(causal & (real[:, None, :] | diagonal), (0, 2))  # (B, T, T+2)
    itself = _patterns(2, embeds.device)[1].expand(b, 2, 2)
    routing = torch.cat([torch.stack([image, text], 1), itself], 2)  # (B, 2, T+2)
    mask = torch.cat([prompt, routing], 1)[:, None]  # (B, 1, T+2, T+2)
    if not model.roe.boolean_mask:
        mask = torch.where(mask, torch.zeros((), dtype=embeds.dtype, device=embeds.device),
                           torch.finfo(embeds.dtype).min)
    rt = model.roe.tokens.to(embeds.dtype)[None].expand(b, -1, -1)
    last = position_ids.amax(-1, keepdim=True) + 1  # (B, 1)
    positions = torch.cat([position_ids, last, last], dim=1)
    return torch.cat([embeds, rt], dim=1), mask, positions


@functools.lru_cache(maxsize=64)
def _patterns(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, diagonal) boolean (n, n) patterns, built once per length."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril(), torch.eye(n, dtype=torch.bool, device=device)


def regularised_loss(logits: torch.Tensor, labels: torch.Tensor, skip_probs: list[torch.Tensor],
                     target: float, coef: float) -> tuple[torch.Tensor, dict]:
    """RoE's structure-sparsity objective, per example i, averaged over the batch:

        CE_i + coef * exp(-5 * CE_i).detach() * max(0, target - s_i),   s_i = mean_l p_skip(i, l)

    CE_i is example i's mean next-token loss over its supervised tokens.
    """
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    tok = nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100,
                                      reduction="none")  # (B, T-1)
    n = (shift_labels != -100).sum(-1).clamp(min=1)
    ce = tok.sum(-1) / n  # (B,)
    if not skip_probs:
        return ce.mean(), {"lm_loss": ce.mean().detach()}
    s = torch.stack([p.float() if p.is_floating_point() else (~p).float() for p in skip_probs], dim=1).mean(-1)  # (B,)
    reg = coef * torch.exp(-5 * ce).detach() * (target - s).clamp(min=0)
    logs = {"lm_loss": ce.mean().detach(), "aux_loss": reg.mean().detach(), "skip_rate": s.mean().detach()}
    return (ce + reg).mean(), logs


def temperature(cfg: RoEConfig, progress: float) -> float:
    """Annealed from temp_start to temp_end over the routing phases (exponentially)."""
    start = cfg.warmup_fraction
    f = min(1.0, max(0.0, (progress - start) / max(1e-9, 1 - start)))
    return cfg.temp_start * math.exp(f * math.log(cfg.temp_end / cfg.temp_start))


def phase(cfg: RoEConfig, progress: float) -> str:
    if progress < cfg.warmup_fraction:
        return "warmup"  # adapters only, random hard skips at the target ratio
    return "route" if progress < cfg.tune_fraction else "tune"  # + routers; then + the LLM


def roe_parameters(model) -> list[nn.Parameter]:
    """Routing tokens, adapters and layer routers (empty for a model without RoE)."""
    roe = getattr(model, "roe", None)
    if roe is None:
        return []
    out = list(roe.parameters())
    for layer in roe.layers(model.llm):
        out += [*layer.adapter.parameters(), *layer.router.parameters()]
    return out


def roe_loss_fn(cfg: RoEConfig):
    def loss_fn(model, batch):
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), labels=batch["labels"],
                    vision_features=batch.get("vision_features"))
        return regularised_loss(out.logits, batch["labels"], model.roe.ctx.skip_probs, cfg.target_skip,
                                cfg.reg_coef)

    return loss_fn


def phase_hook(model, cfg: RoEConfig, parts: dict[str, list]):
    """Before each step: the phase's routing mode, temperature and which parameters learn.

    warm-up: adapters (and routing tokens) only, random hard skips at the target ratio;
    route: + the routers, soft routing, temperature annealed; tune: + the rest of the LLM.
    Parameters not trained by the stage stay frozen throughout.
    """
    ctx = model.roe.ctx
    ctx.generator = torch.Generator().manual_seed(0)
    routers = {id(p) for layer in model.roe.layers(model.llm) for p in layer.router.parameters()}
    llm = [p for p in parts.get("llm", []) if p.requires_grad]
    roe_routers = [p for p in parts.get("roe", []) if id(p) in routers and p.requires_grad]

    def before_step(step: int, total: int) -> None:
        progress = step / max(1, total)
        ph = phase(cfg, progress)
        ctx.mode = "random" if ph == "warmup" else "soft"
        ctx.temperature = temperature(cfg, progress)
        for p in roe_routers:
            p.requires_grad_(ph != "warmup")
        for p in llm:
            p.requires_grad_(ph == "tune")

    return before_step


class SkipCounter:
    """Per routable layer, the share of evaluated examples that skipped it (hard decisions at prefill)."""

    def __init__(self, model):
        self.layers = list(zip(model.roe.layer_ids, model.roe.layers(model.llm))) if getattr(model, "roe", None) else []

    def __enter__(self):
        for _, layer in self.layers:
            layer.seen = layer.skipped = 0
        return self

    def __exit__(self, *exc):
        return False

    def rates(self) -> dict[str, float]:
        return {str(i): layer.skipped / max(1, layer.seen) for i, layer in self.layers}
