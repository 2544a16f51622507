"""The LLaVA-style vision-language model: vision tower -> projector -> causal LM.

Image features replace the `<image>` placeholder tokens in the LM's input embeddings (LLaVA, Liu et
al. 2023). The parts are given to the constructor; variants (MoE, RoE) transform the LM in place.
"""

from __future__ import annotations

import torch
from torch import nn

from moebench.errors import UserError


class MLPProjector(nn.Sequential):
    """LLaVA-1.5 `mlp2x_gelu`: Linear(d_v, d), GELU, Linear(d, d)."""

    def __init__(self, d_vision: int, d_llm: int):
        super().__init__(nn.Linear(d_vision, d_llm), nn.GELU(), nn.Linear(d_llm, d_llm))


class VLM(nn.Module):
    def __init__(self, vision_tower: nn.Module, projector: nn.Module, llm: nn.Module, *,
                 image_token_id: int, feature_layer: int = -2, select: str = "patch", feature_norm: bool = False):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        prune_last_layer(llm)
        self.image_token_id = image_token_id
        self.feature_layer = feature_layer
        self.select = select
        self.feature_norm = feature_norm

    @property
    def num_image_tokens(self) -> int:
        cfg = self.vision_tower.config
        n = (cfg.image_size // cfg.patch_size) ** 2
        return n if self.select == "patch" else n + 1

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, d_llm) projected patch features of the chosen vision layer."""
        return self.projector(self.vision_features(pixel_values))

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, d_v) the chosen vision layer's features, before the projector."""
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        h = out.hidden_states[self.feature_layer]  # (B, 1 + P, d_v)
        if self.select == "patch":
            h = h[:, 1:]  # (B, P, d_v) class token dropped
        elif self.select == "max_patch":
            h = torch.cat([h[:, 1:].amax(1, keepdim=True), h[:, 1:]], 1)  # (B, 1 + P, d_v) pooled token first
        if self.feature_norm:
            h = self.vision_tower.post_layernorm(h)
        return h

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features (given, or computed from the pixels) scattered into the image
        placeholder positions."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, T, d)
        mask = input_ids == self.image_token_id  # (B, T)
        n_slots = int(mask.sum())
        if pixel_values is None and image_features is None:
            if n_slots:
                raise UserError("the prompt has <image> tokens but no image was given")
            return embeds
        feats = self.image_features(pixel_values) if image_features is None else image_features  # (B, N, d)
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise UserError(
                f"{n_slots} image placeholder tokens for {feats.shape[0]} images x {feats.shape[1]} features; "
                "each sample needs exactly one <image>"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool = False, logits_to_keep: int | torch.Tensor = 0,
                labels: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                vision_features: torch.Tensor | None = None, keep_rows: torch.Tensor | None = None):
        """Logits of the LM over the prompt (`labels` only tell RoE where the first turn's prompt ends).
        `image_features` (B, N, d), the projected features, or `vision_features` (B, N, d_v), the tower's
        features before the projector (a frozen tower's, computed once: moebench/train/frozen.py), replace
        `pixel_values` when given. `logits_to_keep`: as in transformers, the last n positions (0: all) or a
        (P,) tensor of positions (an int with RoE's routing tokens). With `logits_to_keep`, the last decoder
        layer runs only where its output is read (prune_last_layer); `keep_rows` (B, P') narrows that to
        each row's own positions (supervised_rows)."""
        if vision_features is not None:
            image_features = self.projector(vision_features.to(next(self.projector.parameters()).dtype))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            # left padding: positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        embeds = self.embed(input_ids, pixel_values, image_features)
        for m in getattr(self.llm, "moebench_routed", ()):  # MoE blocks keep padding out of routing
            m.token_mask = attention_mask
        roe = getattr(self, "roe", None)
        has_image = pixel_values is not None or image_features is not None
        if roe is not None and not has_image and (past_key_values is None or past_key_values.get_seq_length() == 0):
            roe.run_every_layer(self.llm)  # a text-only prompt; decoding steps keep their prefill's decisions
        if roe is not None and has_image and roe.ctx.mode != "dense":
            return _forward_routed(self, embeds, attention_mask, position_ids, input_ids, labels,
                                   past_key_values, use_cache, logits_to_keep)
        layers = getattr(getattr(self.llm, "model", None), "layers", None)
        last = layers[-1] if layers is not None and hasattr(layers[-1], "moebench_rows") and roe is None else None
        if last is not None:
            last.moebench_rows = keep_rows if keep_rows is not None else _rows_of(logits_to_keep, embeds.shape[:2])
        try:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache, logits_to_keep=logits_to_keep)
        finally:
            if last is not None:
                last.moebench_rows = None


def _forward_routed(model: VLM, embeds, attention_mask, position_ids, input_ids, labels, past_key_values,
                    use_cache, logits_to_keep):
    """RoE prefill / training: append the routing tokens, run, drop their logits (moebench/roe)."""
    from moebench.roe.model import with_routing_tokens

    ctx = model.roe.ctx
    embeds, mask, positions = with_routing_tokens(model, embeds, attention_mask, position_ids, input_ids, labels)
    ctx.routing, ctx.skip_probs, ctx.routing_in_cache = True, [], bool(use_cache)
    try:
        out = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                       past_key_values=past_key_values, use_cache=use_cache,
                       logits_to_keep=logits_to_keep + 2 if logits_to_keep else 0)
    finally:
        ctx.routing = False
    out.logits = out.logits[:, :-2]
    return out


def _rows_of(logits_to_keep, shape: tuple[int, int]) -> torch.Tensor | None:
    """(B, P) the positions whose last-layer output the LM head reads, from transformers' `logits_to_keep`
    (0: all of them, so None)."""
    b, t = shape
    if isinstance(logits_to_keep, int):
        return None if logits_to_keep == 0 else torch.arange(t - logits_to_keep, t).expand(b, -1)
    return logits_to_keep.expand(b, -1)


def supervised_rows(labels: torch.Tensor) -> torch.Tensor:
    """(B, P) per row, the positions whose logits predict a supervised token, in order; rows with fewer than
    P are filled with distinct unsupervised positions (whose outputs the loss ignores)."""
    sup = labels[:, 1:] != -100  # (B, T-1)
    t = sup.shape[1]
    p = max(1, int(sup.sum(1).max()))
    score = sup.float() * 2 * t + torch.arange(t, 0, -1, device=labels.device)  # supervised first, then earliest
    return score.topk(p, dim=1).indices.sort(1).values


def prune_last_layer(llm: nn.Module) -> bool:
    """Let the LM's last decoder layer compute only the positions whose output is read.

    The LM head reads the last layer's output at a few positions (the answer tokens in training, the last
    prompt token in a prefill), but the layer runs its query, attention, output projection and MLP at
    every position. Only its keys and values are needed everywhere (they go into the attention and the KV
    cache). With `moebench_rows` (B, P) set, the layer computes keys and values for all T positions and
    the rest for those P only; the other positions of its output hold its input, which nothing reads. The
    kept positions' outputs equal the full layer's (tests/test_models.py). Applies to Qwen2 and Llama
    layers with their plain MLP; returns whether it did."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2MLP

    layers = getattr(getattr(llm, "model", None), "layers", None)
    layer = layers[-1] if layers is not None and len(layers) else None
    if not isinstance(layer, (Qwen2DecoderLayer, LlamaDecoderLayer)) or getattr(layer.self_attn, "sliding_window", None):
        return False
    layer.moebench_rows = None
    full = layer.forward

    def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        rows = layer.moebench_rows
        mask_ok = attention_mask is None or torch.is_tensor(attention_mask)
        if rows is None or not isinstance(layer.mlp, (Qwen2MLP, LlamaMLP)) or not mask_ok:
            return full(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache,
                        position_embeddings=position_embeddings, **kwargs)
        return _pruned_layer(layer, hidden_states, rows.to(hidden_states.device), attention_mask, past_key_values,
                             position_embeddings)

    layer.forward = forward
    return True


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' Llama / Qwen2 apply it, for queries and keys at different
    positions: x (B, H, N, D), cos / sin (B, N, D)."""
    from transformers.models.llama.modeling_llama import rotate_half

    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _mask_rows(attention_mask: torch.Tensor | None, rows: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """The attention mask's rows for queries at positions `rows` (B, P) of T, over S keys (the last T of
    them new): (B, 1 or H, P, S). A None mask (transformers leaves it out when attention is plainly causal)
    means key j is seen from position r when j <= r (+ the cached length S - T)."""
    if attention_mask is None:
        return (torch.arange(s, device=rows.device) <= (rows + s - t).unsqueeze(-1)).unsqueeze(1)
    m = attention_mask.expand(rows.shape[0], -1, -1, -1)  # (B, 1 or H, T, S)
    return m.gather(2, rows[:, None, :, None].expand(-1, m.shape[1], -1, s))


def _pruned_layer(layer, hidden: torch.Tensor, rows: torch.Tensor, attention_mask, cache, position_embeddings):
    """A Llama / Qwen2 decoder layer whose output is computed at `rows` (B, P) only (see prune_last_layer)."""
    attn = layer.self_attn
    b, t, d = hidden.shape
    p, hd = rows.shape[1], attn.head_dim
    x = layer.input_layernorm(hidden)  # (B, T, d)
    k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
    pick = rows.unsqueeze(-1)  # (B, P, 1)
    q = attn.q_proj(x.gather(1, pick.expand(-1, -1, d))).view(b, p, -1, hd).transpose(1, 2)  # (B, H, P, D)
    cos, sin = position_embeddings  # (B, T, D)
    k = _rotate(k, cos, sin)
    q = _rotate(q, cos.gather(1, pick.expand(-1, -1, hd)), sin.gather(1, pick.expand(-1, -1, hd)))
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    mask = _mask_rows(attention_mask, rows, t, k.shape[2])
    out = nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=attn.attention_dropout if layer.training else 0.0, scale=attn.scaling,
        enable_gqa=q.shape[1] != k.shape[1])  # (B, H, P, D)
    h = hidden.gather(1, pick.expand(-1, -1, d)) + attn.o_proj(out.transpose(1, 2).reshape(b, p, -1))
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return hidden.scatter(1, pick.expand(-1, -1, d), h)


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(P,) the positions t whose logits predict a supervised token, labels[:, t + 1] != -100, in any row.

    Training passes them as `logits_to_keep`: the LM head then runs on the answer positions only (about
    one in five of a shapes QA sequence) and the loss is unchanged."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy, mean over supervised tokens (labels -100 are ignored).

    `logits` are (B, T, V) over every position, or (B, P, V) at `positions` only (supervised_positions)."""
    if positions is None:
        logits, targets = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    else:
        targets = labels[:, 1:][:, positions]  # (B, P)
    return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100)
