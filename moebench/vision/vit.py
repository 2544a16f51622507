"""Vision backbones for the vision recipes: open_clip ViTs, whose block MLPs ViMoE (arXiv 2410.15732) makes MoE.

The backbone is open_clip's `VisionTransformer`, built from sizes (the embedded world) or from an
open_clip model config name such as "ViT-B-16" (the config ships with open_clip; nothing downloaded),
with local weights when given. Chosen blocks get the MoE layer of the MoE variant (`moebench/moe`):
experts upcycled from the block's MLP, an optional shared expert, routing per token or per image
(one assignment per image, from its class token).

`ViTModel` puts a head per task kind on the backbone: a linear classifier on the pooled feature; a
segmentation decode head (linear on the patch tokens, bilinearly upsampled to the input size) with
whole-image and sliding-window inference.
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


class ViTModel(nn.Module):
    """A ViT backbone with one head per task kind: `cls`, a linear classifier on the pooled feature;
    `seg`, a linear decode head on the patch tokens, bilinearly upsampled to the input size.
    forward -> {head: logits}: cls (B, C), seg (B, C, H, W)."""

    def __init__(self, vit: nn.Module, classes: dict[str, list[str]]):
        """`classes`: head -> its class names (their count is the head's width)."""
        super().__init__()
        self.vit = vit
        self.classes = {name: list(c) for name, c in classes.items()}
        self.num_classes = {name: len(c) for name, c in classes.items()}
        heads = self.num_classes
        self.heads = nn.ModuleDict({
            name: nn.Linear(vit.output_dim if name == "cls" else vit.transformer.width, n) for name, n in heads.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, tokens = self.vit(pixels)  # (B, d), (B, h*w, d)
        out = {}
        if "cls" in self.heads:
            out["cls"] = self.heads["cls"](pooled)  # (B, C)
        if "seg" in self.heads:
            b, _, _ = tokens.shape
            h, w = self.vit.grid_size
            logits = self.heads["seg"](tokens).transpose(1, 2).reshape(b, self.num_classes["seg"], h, w)
            out["seg"] = nn.functional.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def segment(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) segmentation logits."""
        return self(pixels)["seg"]


@torch.no_grad()
def slide_inference(segment, pixels: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """mmseg's sliding-window inference: crops of `crop` px every `stride` px (the last one flush with
    the border), logits summed per pixel and divided by the number of windows covering it. `segment`:
    (B, 3, crop, crop) -> (B, num_classes, crop, crop) logits."""
    b, _, height, width = pixels.shape
    if height < crop or width < crop:
        raise UserError(f"sliding window crop {crop} is larger than the image ({height}x{width}); use whole-image inference")
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = pixels.new_zeros(b, num_classes, height, width)
    count = pixels.new_zeros(1, 1, height, width)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride, height - crop), min(c * stride, width - crop)
            out[:, :, y1: y1 + crop, x1: x1 + crop] += segment(pixels[:, :, y1: y1 + crop, x1: x1 + crop])
            count[:, :, y1: y1 + crop, x1: x1 + crop] += 1
    return out / count
