"""A frozen vision tower's features, computed once per stage instead of once per batch.

In LLaVA's stages I and II (and MoE-Tuning's stage III) the vision tower does not learn, so an image's
features are the same every time a conversation about it is drawn. When a stage shows each image at
least `MIN_REUSE` times on average and the features of all its images fit in `MAX_BYTES`, they are
computed once at the stage's start (the embedded world's stage II: 6,000 images x 16 patches x 128
floats = 49 MB, each image drawn 5.2 times) and the projector reads them from that table; otherwise
the tower runs on every batch as before. A stage that trains the tower (stage 0) keeps the preprocessed
pixels instead, by the same rule (the embedded world: 6,000 images x 3 x 64 x 64 floats = 295 MB over 3
epochs), which saves decoding each image again.

The table is computed in a fixed order and fixed chunks (images sorted by name), so a run, a rerun and
a resumed run see the same features. It lives in memory only; a stage resumed from a checkpoint
computes it again.
"""

from __future__ import annotations

import torch

MIN_REUSE = 2.0  # average draws per image below which computing the table costs more than it saves
MAX_BYTES = 1 << 30
CHUNK = 64


def wanted(num_images: int, samples: int, floats_per_image: int) -> bool:
    """Whether a stage drawing `samples` conversations over `num_images` images should keep a table of
    `floats_per_image` fp32 values per image (a frozen tower's features, or the preprocessed pixels)."""
    size = num_images * floats_per_image * 4
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
