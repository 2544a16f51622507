"""The LLaVA-style vision-language model: vision tower -> projector -> causal LM.

Image features replace the `<image>` placeholder tokens in the LM's input embeddings (LLaVA, Liu et
al. 2023). The parts are given to the constructor; variants (MoE, RoE) transform the LM in place.
"""

from __future__ import annotations

import torch
from torch import nn

from moebench.errors import UserError
from moebench.models.extensions import LMExtension, RoutedBlock


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
                cache=None, use_cache: bool = False, logits_to_keep: int | torch.Tensor = 0,
                labels: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                vision_features: torch.Tensor | None = None):
        """Logits of the LM over the prompt (`labels` are passed to the extensions only: where a prompt ends).
        `image_features` (B, N, d), the projected features, or `vision_features` (B, N, d_v), the tower's
        features before the projector (a frozen tower's, computed once: moebench/train/frozen.py), replace
        `pixel_values` when given. `cache`: a transformers `Cache` (e.g. DynamicCache) the LM reads and
        extends. `logits_to_keep`: as in transformers, the last n positions (0: all) or a (P,) tensor of
        positions. A variant's extension (moebench.models.extensions) may run the LM itself."""
        if vision_features is not None:
            image_features = self.projector(vision_features.to(next(self.projector.parameters()).dtype))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            # left padding: positions count real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        embeds = self.embed(input_ids, pixel_values, image_features)
        for block in self.routed_blocks():  # routing keeps padding out
            block.token_mask = attention_mask
        has_image = pixel_values is not None or image_features is not None
        for ext in self.extensions():
            out = ext.run_lm(self, embeds, attention_mask, position_ids, input_ids=input_ids, labels=labels,
                             cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep, has_image=has_image)
            if out is not None:
                return out
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep)

    def routed_blocks(self) -> list[RoutedBlock]:
        """The LM's blocks that route tokens (our own modules): each forward gives them the attention mask,
        which transformers' decoder layers do not pass to their MLP."""
        return [m for m in self.llm.modules() if isinstance(m, RoutedBlock)]

    def extensions(self) -> list[LMExtension]:
        """The variants' modules beside the LM (moebench.models.extensions.LMExtension), in the order added."""
        return [m for m in self.children() if isinstance(m, LMExtension)]


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
