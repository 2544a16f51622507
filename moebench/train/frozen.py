"""A frozen vision tower's features, computed once per stage instead of once per batch.

In LLaVA's stages I and II (and MoE-Tuning's stage III) the vision tower does not learn, so an image's
features are the same every time a conversation about it is drawn. When a stage shows each image at
least `MIN_REUSE` times on average and the features of all its images fit in `MAX_BYTES`, they are
computed once at the stage's start (the embedded world's stage II: 6,000 images x 16 patches x 128
floats = 49 MB, each image drawn 8.6 times) and the projector reads them from that table; otherwise
the tower runs on every batch as before.

The table is computed in a fixed order and fixed chunks (images sorted by name), so a run, a rerun and
a resumed run see the same features. It lives in memory only; a stage resumed from a checkpoint
computes it again.
"""

from __future__ import annotations

import torch

MIN_REUSE = 2.0  # average draws per image below which computing the table costs more than it saves
MAX_BYTES = 1 << 30
CHUNK = 64


def wanted(num_images: int, samples: int, feature_shape: tuple[int, int], bytes_per_float: int = 4) -> bool:
    """Whether a stage drawing `samples` conversations over `num_images` images should use the table."""
    size = num_images * feature_shape[0] * feature_shape[1] * bytes_per_float
    return num_images > 0 and samples >= MIN_REUSE * num_images and size <= MAX_BYTES


@torch.no_grad()
def feature_table(model, dataset, device: torch.device) -> dict[str, torch.Tensor]:
    """{image name: (N, d_v) features of `model`'s vision tower} for every image of `dataset` (a
    ConversationDataset), on the CPU."""
    first: dict[str, int] = {}
    for i, item in enumerate(dataset.items):
        first.setdefault(item["image"], i)
    names = sorted(first)
    was_training = model.training
    model.eval()
    table = {}
    try:
        for k in range(0, len(names), CHUNK):
            chunk = names[k: k + CHUNK]
            pixels = torch.stack([dataset.pixels(first[name]) for name in chunk]).to(device)
            feats = model.vision_features(pixels).float().cpu()  # (chunk, N, d_v)
            table.update(zip(chunk, feats))
    finally:
        model.train(was_training)
    return table
