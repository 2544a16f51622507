"""Stage 0 (moebench/train/clip.py): grounded patch labels against a hand-made COCO file, and the
grounding term against its definition."""

from __future__ import annotations

import json

import pytest
import torch


class _Items:
    def __init__(self, names):
        self.items = [{"image": n} for n in names]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"pixel_values": torch.zeros(3, 4, 4)}


def _coco(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64},
                   {"id": 2, "file_name": "b.png", "width": 64, "height": 32}],
        "categories": [{"id": 7, "name": "star"}, {"id": 3, "name": "circle"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10]},  # centre (7, 7): patch (0, 0)
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [40, 20, 14, 14]},  # centre (47, 27): patch (1, 2)
            # 64 x 32 is padded to 64 x 64 (16 px above): centre (8, 8 + 16) -> patch (1, 0)
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [4, 4, 8, 8]},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_grounded_patch_labels_hand_worked(tmp_path):
    from moebench.train.clip import GroundedCaptions

    g = GroundedCaptions(_Items(["a.png", "b.png", "c.png"]), _coco(tmp_path), image_size=64, patch_size=16)
    assert g.num_categories == 2  # categories sorted by id: circle (3) -> 1, star (7) -> 2
    a, b, c = (g[i]["patch_labels"] for i in range(3))
    expect_a = torch.zeros(16, dtype=torch.long)
    expect_a[0], expect_a[1 * 4 + 2] = 1, 2
    expect_b = torch.zeros(16, dtype=torch.long)
    expect_b[1 * 4 + 0] = 2
    assert torch.equal(a, expect_a) and torch.equal(b, expect_b)
    assert torch.equal(c, torch.zeros(16, dtype=torch.long))  # an image without objects: every patch "none"


def test_grounding_loss_is_patch_cross_entropy():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from moebench.train.clip import ClipPretrainer

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8))
    m = ClipPretrainer(tower, vocab_size=20, pad_id=0, eos_id=1, proj_dim=8, gray_p=0.0, num_categories=3).eval()
    pixels = torch.randn(2, 3, 16, 16)
    caps = torch.tensor([[5, 6, 1], [7, 1, 0]])
    labels = torch.tensor([[0, 1, 0, 3], [2, 0, 0, 0]])
    with torch.no_grad():
        loss, logs = m(pixels, caps, (caps != 0).long(), labels)
        base, _ = m(pixels, caps, (caps != 0).long())
        patches = tower(pixel_values=pixels).last_hidden_state[:, 1:]
        expected = torch.nn.functional.cross_entropy(m.patch_head(patches).reshape(-1, 4), labels.reshape(-1))
    assert logs["ground_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(base.item() + expected.item(), rel=1e-6)
    m.grounding_weight = 5.0  # the recipe's stages.<clip>.grounding_weight scales the term
    with torch.no_grad():
        weighted, _ = m(pixels, caps, (caps != 0).long(), labels)
    assert weighted.item() == pytest.approx(base.item() + 5 * expected.item(), rel=1e-6)


def test_missing_grounding_file_is_a_user_error(tmp_path):
    from moebench.errors import MissingFile
    from moebench.train.clip import GroundedCaptions

    with pytest.raises(MissingFile, match="grounding"):
        GroundedCaptions(_Items([]), tmp_path / "nope.json", 64, 16)
