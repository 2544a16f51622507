"""Stage 0 for the embedded world: CLIP-style contrastive pre-training of the vision tower.

Real LLaVA starts from a pretrained CLIP (Radford et al. 2021); a tiny tower trained from scratch on
captions plays that role here. Image embedding = visual projection of the pooled class token, text
embedding = a small CLIP text transformer over the same captions; loss = open_clip's symmetric InfoNCE.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ClipPretrainer(nn.Module):
    def __init__(self, vision_tower: nn.Module, vocab_size: int, pad_id: int, eos_id: int, proj_dim: int = 128):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        super().__init__()
        v = vision_tower.config
        self.vision_tower = vision_tower
        self.visual_projection = nn.Linear(v.hidden_size, proj_dim, bias=False)
        text_cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                  num_hidden_layers=2, num_attention_heads=v.num_attention_heads,
                                  max_position_embeddings=64, projection_dim=proj_dim,
                                  pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)
        self.text = CLIPTextModelWithProjection(text_cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixel_values, caption_ids, caption_mask):
        from open_clip.loss import ClipLoss

        img = self.visual_projection(self.vision_tower(pixel_values=pixel_values).pooler_output)  # (B, p)
        txt = self.text(input_ids=caption_ids, attention_mask=caption_mask).text_embeds  # (B, p)
        img, txt = nn.functional.normalize(img, dim=-1), nn.functional.normalize(txt, dim=-1)
        return ClipLoss()(img, txt, self.logit_scale.exp().clamp(max=100))


def clip_loss_fn(module: ClipPretrainer, batch: dict):
    loss = module(batch["pixel_values"], batch["caption_ids"], batch["caption_mask"])
    return loss, {}
