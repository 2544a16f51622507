"""The ViMoE vision track: ViT backbones with MoE blocks, classification and segmentation."""
