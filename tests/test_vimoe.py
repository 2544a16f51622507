"""ViMoE backbones: upcycled ViT equals its dense parent; image-level routing; heads; sliding windows; configs."""

from __future__ import annotations

import pytest
import torch

from moebench.config import MoEConfig, ViTConfig, from_dict, validate_vit
from moebench.errors import UserError
from moebench.vision.vit import (ViTClassifier, ViTSegmenter, add_vision_moe, build_vit, slide_inference,
                                 vision_moe_blocks)

TINY = ViTConfig(image_size=32, patch_size=8, width=32, layers=3, heads=2)


@pytest.mark.parametrize("unit", ["token", "image"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", ["none", "gated"])
def test_upcycled_vit_equals_dense_parent(unit, top_k, shared):
    torch.manual_seed(0)
    vit = build_vit(TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled, tokens = vit(x)
        layers = add_vision_moe(vit, MoEConfig(num_experts=4, top_k=top_k, layers="all", shared_expert=shared), unit)
        pooled2, tokens2 = vit(x)
    assert layers == [0, 1, 2] and len(vision_moe_blocks(vit)) == 3
    assert torch.allclose(pooled, pooled2, atol=1e-5) and torch.allclose(tokens, tokens2, atol=1e-5)


def test_image_routing_gives_every_token_of_an_image_the_same_experts():
    torch.manual_seed(0)
    vit = build_vit(TINY).eval()
    add_vision_moe(vit, MoEConfig(num_experts=4, top_k=1, layers=[1]), "image")
    (_, block), = vision_moe_blocks(vit)
    torch.nn.init.normal_(block.router.weight, std=3.0)  # make images disagree
    seen = []
    block.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    with torch.no_grad():
        vit(torch.randn(4, 3, 32, 32))
    index = seen[0].view(4, -1)  # (images, tokens): the expert of every token
    assert block.last.index.shape == (4, 1)  # one decision per image
    assert all(len(set(row.tolist())) == 1 for row in index)
    assert torch.equal(index[:, 0], block.last.index[:, 0])


def test_heads_shapes_and_sliding_window():
    torch.manual_seed(0)
    seg = ViTSegmenter(build_vit(TINY), num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = seg(x)
    assert whole.shape == (2, 5, 32, 32)
    assert torch.allclose(slide_inference(seg, x, crop=32, stride=16), whole, atol=1e-6)  # one window = whole image
    big = torch.randn(1, 3, 48, 40)
    out = slide_inference(seg, big, crop=32, stride=16)
    assert out.shape == (1, 5, 48, 40)
    with torch.no_grad():  # the top-left corner is covered by the first window only
        assert torch.allclose(out[..., :16, :8], seg(big[:, :, :32, :32])[..., :16, :8], atol=1e-6)
    cls = ViTClassifier(build_vit(TINY), num_classes=8)
    assert cls(x).shape == (2, 8)


def test_open_clip_config_names_build_real_architectures():
    vit = build_vit(ViTConfig(arch="ViT-B-16"))
    assert vit.transformer.width == 768 and len(vit.transformer.resblocks) == 12
    with pytest.raises(UserError, match="not an open_clip model config"):
        build_vit(ViTConfig(arch="ViT-Q-99"))


@pytest.mark.parametrize("cfg, message", [
    (ViTConfig(image_size=30, patch_size=8), "vit.image_size=30 is not divisible by vit.patch_size=8"),
    (ViTConfig(layers=4, moe=MoEConfig(layers=[0, 4])), "vit.moe.layers: block 4 is out of range for a ViT with 4 blocks"),
    (ViTConfig(moe=MoEConfig(num_experts=2, top_k=3)), "vit.moe.top_k=3 must be between 1 and vit.moe.num_experts=2"),
])
def test_bad_vit_configs(cfg, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_vit(cfg)


def test_unknown_routing_unit():
    with pytest.raises(UserError, match="routing_unit='patch' is not allowed"):
        from_dict(ViTConfig, {"routing_unit": "patch"}, "vit")


@pytest.mark.parametrize("recipe, metric", [("vimoe_shapes_cls.yaml", "top1"), ("vimoe_shapes_seg.yaml", "mIoU")])
def test_vision_recipes_train_three_variants(tmp_path, capsys, recipe, metric):
    """Dense, MoE and MoE + shared expert from one dense parent; rows with params and throughput."""
    import json

    from conftest import REPO, run_cli
    from moebench import results

    tiny = ["data.world.n_train=200", "data.world.n_val=900", "data.world.image_size=32", "vit.image_size=32",
            "vit.patch_size=8", "vit.width=32", "vit.heads=2", "pretrain.max_steps=2", "finetune.max_steps=2",
            "eval_batch_size=128"]
    code, _, err = run_cli(["train", REPO / "recipes" / recipe, *tiny, "--runs", tmp_path / "runs",
                            "--results", tmp_path / "res", "--no-progress"], capsys)
    assert code == 0, err
    rows = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["metric"] == metric]
    assert sorted(r["variant"] for r in rows) == ["dense", "moe", "moe_shared"]
    by = {r["variant"]: r for r in rows}
    assert by["dense"]["params_activated"] == by["dense"]["params_total"]
    assert by["moe"]["params_activated"] < by["moe"]["params_total"]
    assert by["moe_shared"]["params_activated"] > by["moe"]["params_activated"]  # + the shared expert
    assert all(0 <= r["value"] <= 1 and r["samples_per_s"] > 0 for r in rows)
    assert sorted(json.loads(by["moe"]["extra"])["expert_load"]) == ["2", "3"]
    # routing analysis of the MoE run: matrices, purity / entropy rows, a PNG
    run_dir = tmp_path / "runs" / by["moe"]["run"]
    code, out, err = run_cli(["analyze", "routing", run_dir, "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    routing = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["task"] == "routing"]
    assert {r["split"] for r in routing} == {"layer2", "layer3"}
    purity = [r for r in routing if r["metric"] == "purity"]
    assert all(1 / 8 - 1e-9 <= r["value"] <= 1 for r in purity)
    matrix = json.loads(purity[0]["extra"])["matrix"]
    assert len(matrix) == 8 and sum(map(sum, matrix)) > 0
    assert (tmp_path / "res" / by["moe"]["run"] / "routing.png").is_file()


def test_purity_and_entropy_hand_worked():
    from moebench.vision.analyze import purity_entropy

    specialised = torch.tensor([[10.0, 0.0], [0.0, 5.0]])  # each class to its own expert
    assert purity_entropy(specialised) == (1.0, 0.0)
    mixed = torch.tensor([[5.0, 5.0], [5.0, 5.0]])  # no specialisation: purity 10/20, entropy ln 2
    p, h = purity_entropy(mixed)
    assert p == pytest.approx(0.5) and h == pytest.approx(0.6931, abs=1e-4)


def test_ade20k_layout_trains_and_scores_at_label_resolution(tmp_path):
    """A tiny ADEChallengeData2016 folder (40x50 images) through the vision pipeline: rows for all variants."""
    import numpy as np
    from PIL import Image

    from conftest import REPO
    from moebench.config import load_recipe
    from moebench.vision.train import train_vision

    rng = np.random.default_rng(0)
    for split, n in (("training", 4), ("validation", 2)):
        for kind in ("images", "annotations"):
            (tmp_path / "ADEChallengeData2016" / kind / split).mkdir(parents=True)
        for i in range(n):
            stem = f"ADE_{split}_{i:08d}"
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / "ADEChallengeData2016" / "images" / split / f"{stem}.jpg")
            Image.fromarray(rng.integers(0, 151, (40, 50), dtype=np.uint8)).save(
                tmp_path / "ADEChallengeData2016" / "annotations" / split / f"{stem}.png")
    recipe = load_recipe(REPO / "recipes" / "vimoe_ade20k.yaml", [
        f"data.source={tmp_path}", "vit.arch=null", "vit.image_size=32", "vit.patch_size=8", "vit.width=32",
        "vit.heads=2", "vit.layers=2", "moe.layers=[1]", "pretrain.max_steps=1", "finetune.max_steps=1",
        "pretrain.batch_size=2", "finetune.batch_size=2"])
    rows = train_vision(recipe, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res", progress=False)
    assert {(r["variant"], r["metric"]) for r in rows} >= {("dense", "mIoU"), ("moe", "mIoU"), ("moe_shared", "aAcc")}
    assert all(0 <= r["value"] <= 1 for r in rows)


def test_image_folder_classification(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import REPO
    from moebench.config import load_recipe
    from moebench.vision.train import train_vision

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog", "owl"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    recipe = load_recipe(REPO / "recipes" / "vimoe_shapes_cls.yaml", [
        f"data.source={tmp_path}", "vit.image_size=32", "vit.patch_size=8", "vit.width=32", "vit.heads=2",
        "pretrain.max_steps=1", "finetune.max_steps=1", "variants=[dense,moe]"])
    rows = train_vision(recipe, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res", progress=False)
    top5 = [r for r in rows if r["metric"] == "top5"]
    assert [r["variant"] for r in top5] == ["dense", "moe"] and all(r["value"] == 1.0 for r in top5)  # 3 classes


@pytest.mark.parametrize("override, message", [
    ("moe.layers=[0,9]", "moe.layers: block 9 is out of range"), ("vit.routing_unit=patch", "routing_unit='patch'"),
    ("vit.image_size=60", "not divisible by vit.patch_size"),
])
def test_bad_vision_recipes_exit_2(capsys, override, message):
    from conftest import REPO, run_cli

    code, _, err = run_cli(["train", REPO / "recipes" / "vimoe_shapes_cls.yaml", override], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
