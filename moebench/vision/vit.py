"""ViMoE vision track (arXiv 2410.15732): open_clip ViTs whose block MLPs become MoE.

The backbone is open_clip's `VisionTransformer`, built from sizes (the embedded world) or from an
open_clip model config name such as "ViT-B-16" (the config ships with open_clip; nothing downloaded),
with local weights when given. Chosen blocks get the MoE layer of the MoE variant (`moebench/moe`):
experts upcycled from the block's MLP, an optional shared expert, routing per token or per image
(one assignment per image, from its class token).

Heads: a linear classifier on the pooled feature; a segmentation decode head (linear on the patch
tokens, bilinearly upsampled to the input size) with whole-image and sliding-window inference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moebench.config import MoEConfig, ViTConfig, moe_layer_indices
from moebench.errors import UserError


def build_vit(cfg: ViTConfig) -> nn.Module:
    """open_clip VisionTransformer returning (pooled, patch tokens); output_dim = width."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    if cfg.arch:
        model_cfg = open_clip.get_model_config(cfg.arch)
        if model_cfg is None:
            raise UserError(f"vit.arch={cfg.arch!r} is not an open_clip model config; e.g. ViT-B-16, ViT-L-14")
        vc = model_cfg["vision_cfg"]
        dims = dict(image_size=vc["image_size"], patch_size=vc["patch_size"], width=vc["width"], layers=vc["layers"],
                    heads=vc["width"] // vc.get("head_width", 64), mlp_ratio=vc.get("mlp_ratio", 4.0))
    else:
        dims = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                    heads=cfg.heads, mlp_ratio=cfg.mlp_ratio)
    vit = VisionTransformer(**dims, output_dim=dims["width"], output_tokens=True)
    if cfg.pretrained:
        _load_visual(vit, Path(cfg.pretrained))
    return vit


def _load_visual(vit: nn.Module, path: Path) -> None:
    """Weights from a safetensors / torch file of the visual tower (or a whole open_clip model: 'visual.*')."""
    if not path.is_file():
        raise UserError(f"vit.pretrained={str(path)!r} does not exist; give a local .safetensors or .pt of the tower")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match the ViT config: missing {missing[:3]}, unexpected {unexpected[:3]}")


def add_vision_moe(vit: nn.Module, cfg: MoEConfig, routing_unit: str = "token") -> list[int]:
    """Turn the chosen blocks' MLPs into MoE blocks (exact copies; shared expert starting at zero)."""
    from moebench.moe.layer import MoEBlock, default_implementation
    from moebench.moe.upcycle import experts_from, shared_from

    blocks = vit.transformer.resblocks
    indices = moe_layer_indices(cfg.layers, len(blocks))
    impl = cfg.implementation or default_implementation()
    for i in indices:
        mlp = blocks[i].mlp
        experts = experts_from(mlp, cfg.num_experts, "gelu", impl)
        shared = None if cfg.shared_expert == "none" else shared_from(mlp)
        blocks[i].mlp = MoEBlock(experts, mlp.c_fc.in_features, cfg.top_k, capacity_factor=cfg.capacity_factor,
                                 eval_capacity_factor=cfg.eval_capacity_factor, shared=shared,
                                 shared_gate=cfg.shared_expert == "gated", routing_unit=routing_unit)
    return indices


def vision_moe_blocks(vit: nn.Module) -> list[tuple[int, nn.Module]]:
    from moebench.moe.layer import MoEBlock

    return [(i, b.mlp) for i, b in enumerate(vit.transformer.resblocks) if isinstance(b.mlp, MoEBlock)]


class ViTClassifier(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.output_dim, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.vit(pixels)  # (B, d)
        return self.head(pooled)  # (B, C)


class ViTSegmenter(nn.Module):
    """Linear decode head on the patch tokens, upsampled (bilinear) to the input size."""

    def __init__(self, vit: nn.Module, num_classes: int):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.transformer.width, num_classes)
        self.num_classes = num_classes

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        _, tokens = self.vit(pixels)  # (B, h*w, d)
        b, n, _ = tokens.shape
        h, w = self.vit.grid_size
        logits = self.head(tokens).transpose(1, 2).reshape(b, self.num_classes, h, w)  # (B, C, h, w)
        return nn.functional.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def slide_inference(model: ViTSegmenter, pixels: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """mmseg's sliding-window inference: crops of `crop` px every `stride` px (the last one flush with
    the border), logits summed per pixel and divided by the number of windows covering it."""
    b, _, height, width = pixels.shape
    if height < crop or width < crop:
        raise UserError(f"sliding window crop {crop} is larger than the image ({height}x{width}); use whole-image inference")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = pixels.new_zeros(b, model.num_classes, height, width)
    count = pixels.new_zeros(1, 1, height, width)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, height - crop), min(c * stride, width - crop)
            out[:, :, y1: y1 + crop, x1: x1 + crop] += model(pixels[:, :, y1: y1 + crop, x1: x1 + crop])
            count[:, :, y1: y1 + crop, x1: x1 + crop] += 1
    return out / count
