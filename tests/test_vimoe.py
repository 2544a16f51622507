"""ViMoE: upcycled ViT equals its dense parent; image-level routing; heads; sliding windows; configs; the
vision recipes through the common pipeline (train, run directory, checkpoint, `moebench eval` on the
classification and segmentation tasks, report, routing analysis)."""

from __future__ import annotations

import pytest
import torch

from moebench.config import MoEConfig, ViTConfig, from_dict, validate_vit
from moebench.errors import UserError
from moebench.vision.vit import ViTModel, add_vision_moe, build_vit, slide_inference, vision_moe_blocks

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
    model = ViTModel(build_vit(TINY), {"cls": list("abcdefgh"), "seg": list("01234")}).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    whole = out["seg"]
    assert whole.shape == (2, 5, 32, 32) and out["cls"].shape == (2, 8)
    assert torch.allclose(slide_inference(model.segment, x, 32, 16, 5), whole, atol=1e-6)  # one window = whole image
    big = torch.randn(1, 3, 48, 40)
    slid = slide_inference(model.segment, big, crop=32, stride=16, num_classes=5)
    assert slid.shape == (1, 5, 48, 40)
    with torch.no_grad():  # the top-left corner is covered by the first window only
        assert torch.allclose(slid[..., :16, :8], model.segment(big[:, :, :32, :32])[..., :16, :8], atol=1e-6)


def test_open_clip_config_names_build_real_architectures():
    vit = build_vit(ViTConfig(arch="ViT-B-16"))
    assert vit.transformer.width == 768 and len(vit.transformer.resblocks) == 12
    with pytest.raises(UserError, match="not an open_clip model config"):
        build_vit(ViTConfig(arch="ViT-Q-99"))


@pytest.mark.parametrize("cfg, message", [
    (ViTConfig(image_size=30, patch_size=8), "vit.image_size=30 is not divisible by vit.patch_size=8"),
    (ViTConfig(width=30, heads=4), "vit.width=30 must be divisible by vit.heads=4"),
])
def test_bad_vit_configs(cfg, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_vit(cfg)


def test_unknown_routing_unit():
    with pytest.raises(UserError, match="routing_unit='patch' is not allowed"):
        from_dict(ViTConfig, {"routing_unit": "patch"}, "vit")


TINY_SHAPES = ["data.world.n_train=200", "data.world.n_val=900", "data.world.image_size=32", "vit.image_size=32",
               "vit.patch_size=8", "vit.width=32", "vit.heads=2", "stages.pretrain.max_steps=2",
               "stages.finetune.max_steps=2", "eval.batch_size=128"]


def test_vision_recipes_train_through_the_common_pipeline(tmp_path, capsys):
    """Dense, MoE and MoE + shared expert: one shared (cached) dense stage, ordinary run directories that
    `moebench eval --tasks seg_shapes,cls_shapes --model RUN` scores, rows `moebench report` shows
    beside the VQA tasks, and the routing analysis of an MoE run."""
    import json

    from conftest import REPO, run_cli
    from moebench import results
    from moebench.runs import open_run

    where = ["--runs", tmp_path / "runs", "--results", tmp_path / "res", "--no-progress"]
    recipes = [REPO / "recipes" / f"{r}.yaml" for r in ("vimoe_shapes_dense", "vimoe_shapes", "vimoe_shapes_shared")]
    code, _, err = run_cli(["train", *recipes, *TINY_SHAPES, *where], capsys)
    assert code == 0, err
    assert len(list((tmp_path / "runs" / ".stages").glob("0-pretrain-*"))) == 1  # the dense stage is shared
    rows = results.read_rows([tmp_path / "res"], "metrics")
    assert {(r["task"], r["metric"]) for r in rows} == {("cls_shapes", "top1"), ("cls_shapes", "top5"),
                                                          ("seg_shapes", "mIoU"), ("seg_shapes", "mAcc"),
                                                          ("seg_shapes", "aAcc")}
    by = {r["recipe"]: r for r in rows if r["metric"] == "top1"}
    assert by["vimoe_shapes_dense"]["params_activated"] == by["vimoe_shapes_dense"]["params_total"]
    assert by["vimoe_shapes"]["params_activated"] < by["vimoe_shapes"]["params_total"]
    assert by["vimoe_shapes_shared"]["params_activated"] > by["vimoe_shapes"]["params_activated"]  # + shared expert
    assert all(0 <= r["value"] <= 1 and r["samples_per_s"] > 0 and r["latency_ms"] > 0 for r in rows)
    assert all(r["ttft_ms"] is None and r["tpot_ms"] is None and r["dtype"] == "float32" for r in rows)
    assert all(r["task_version"] == 1 and r["n"] == 900 and r["protocol"] == "official" for r in rows)
    assert sorted(json.loads(by["vimoe_shapes"]["extra"])["expert_load"]) == ["2", "3"]
    # majority: the share of the most frequent class among the world's val labels
    from collections import Counter

    from moebench.config import load_recipe
    from moebench.data.sources import resolve

    root = resolve("shapes", load_recipe(recipes[0], TINY_SHAPES).data.world, progress=False).root
    labels = json.loads((root / "cls" / "val2014.json").read_text())
    assert by["vimoe_shapes"]["baseline"] == pytest.approx(Counter(labels.values()).most_common(1)[0][1] / 900)

    # an ordinary run: open_run reads it, `moebench eval` scores it on the tasks named
    run_dir = tmp_path / "runs" / by["vimoe_shapes"]["run"]
    assert open_run(run_dir).recipe.variant == "vimoe"
    code, out, err = run_cli(["eval", "--tasks", "seg_shapes,cls_shapes", "--model", run_dir, "--limit", "100",
                              "--results", tmp_path / "res2", "--no-progress"], capsys)
    assert code == 0, err
    again = results.read_rows([tmp_path / "res2"], "metrics")
    assert {(r["task"], r["metric"], r["n"]) for r in again} >= {("seg_shapes", "mIoU", 100), ("cls_shapes", "top1", 100)}
    code, out, err = run_cli(["report", tmp_path / "res2"], capsys)
    assert code == 0 and "seg_shapes" in out and "cls_shapes" in out and "mIoU" in out and "top1" in out

    # a VQA task on a vision run, and a vision task on a VLM recipe, are one-line errors
    code, _, err = run_cli(["eval", "--tasks", "pope", "--model", run_dir, "--results", tmp_path / "res2"], capsys)
    assert code == 2 and "task pope is a VQA task" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["train", "shapes_dense", "eval.tasks=[seg_shapes]"], capsys)
    assert code == 2 and "task seg_shapes is a seg task for vision recipes" in err

    # routing analysis of the MoE run: matrices, purity / entropy rows, a PNG
    code, out, err = run_cli(["analyze", "routing", run_dir, "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    routing = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["task"] == "routing"]
    assert {r["split"] for r in routing} == {"layer2", "layer3"}
    purity = [r for r in routing if r["metric"] == "purity"]
    assert all(1 / 8 - 1e-9 <= r["value"] <= 1 for r in purity)
    matrix = json.loads(purity[0]["extra"])["matrix"]
    assert len(matrix) == 8 and sum(map(sum, matrix)) > 0
    assert (tmp_path / "res" / by["vimoe_shapes"]["run"] / "routing.png").is_file()


def test_purity_and_entropy_hand_worked():
    from moebench.vision.analyze import purity_entropy

    specialised = torch.tensor([[10.0, 0.0], [0.0, 5.0]])  # each class to its own expert
    assert purity_entropy(specialised) == (1.0, 0.0)
    mixed = torch.tensor([[5.0, 5.0], [5.0, 5.0]])  # no specialisation: purity 10/20, entropy ln 2
    p, h = purity_entropy(mixed)
    assert p == pytest.approx(0.5) and h == pytest.approx(0.6931, abs=1e-4)


def test_ade20k_layout_trains_and_scores_at_label_resolution(tmp_path):
    """A tiny ADEChallengeData2016 folder (40x50 images) through the pipeline: rows at the labels' resolution."""
    import numpy as np
    from PIL import Image

    from conftest import REPO
    from moebench.config import load_recipe
    from moebench.eval.runner import evaluate_run
    from moebench.train.pipeline import train

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
        "vit.heads=2", "vit.layers=2", "vimoe.layers=[1]", "stages.dense.max_steps=1", "stages.vimoe.max_steps=1",
        "stages.dense.batch_size=2", "stages.vimoe.batch_size=2", "slide_stride=16"])
    run = train(recipe, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res", progress=False)
    rows = evaluate_run(run, recipe.eval_tasks, data=None, batch_size=2, limit=None, results_dir=tmp_path / "res",
                        progress=False)
    assert {r["metric"] for r in rows} == {"mIoU", "mAcc", "aAcc"} and all(r["n"] == 2 for r in rows)
    assert all(0 <= r["value"] <= 1 and r["variant"] == "vimoe" for r in rows)


def test_image_folder_classification(tmp_path):
    import numpy as np
    from PIL import Image

    from conftest import REPO
    from moebench.config import load_recipe
    from moebench.eval.runner import evaluate_run
    from moebench.train.pipeline import train

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog", "owl"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    recipe = load_recipe(REPO / "recipes" / "vimoe_shapes.yaml", [
        f"data.source={tmp_path}", "tasks=[image_folder]", "vit.image_size=32", "vit.patch_size=8", "vit.width=32",
        "vit.heads=2", "stages.pretrain.max_steps=1", "stages.finetune.max_steps=1"])
    run = train(recipe, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res", progress=False)
    rows = evaluate_run(run, ["image_folder"], data=None, batch_size=4, limit=None, results_dir=tmp_path / "res",
                        progress=False)
    by = {r["metric"]: r for r in rows}
    assert by["top5"]["value"] == 1.0 and by["top1"]["baseline"] == pytest.approx(1 / 3)  # 3 classes, 3 images each


@pytest.mark.parametrize("override, message", [
    ("vimoe.layers=[0,9]", "vimoe.layers: block 9 is out of range"), ("vit.routing_unit=patch", "routing_unit='patch'"),
    ("vit.image_size=60", "not divisible by vit.patch_size"),
    ("vimoe.top_k=5", "vimoe.top_k=5 must be between 1 and vimoe.num_experts=4"),
    ("tasks=[pope]", "task pope is a VQA task for VLM recipes"),
    ("tasks=[cls_shapes,image_folder]", "cls_shapes and image_folder are both cls tasks"),
    ("variant=moe", "variant='moe' is not allowed in a vision recipe"),
    ("stages.finetune.train=[vit,projector]", "stages.finetune.train has 'projector'"),
])
def test_bad_vision_recipes_exit_2(capsys, override, message):
    from conftest import REPO, run_cli

    code, _, err = run_cli(["train", REPO / "recipes" / "vimoe_shapes.yaml", override], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
