"""Checkpoints in and out: a run exported to transformers' Llava (dense; MoE as Qwen2-MoE) computes the
same logits in transformers' own classes, converts back to a run with the same logits, evaluates
through `moebench eval --model PATH`, and checkpoints that do not match fail with one line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, TINY, run_cli

NO_NORM = ["model.vision.feature_norm=false"]  # Llava reads the tower's states without its final LayerNorm


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny dense run and an MoE run (gated shared expert) of the shapes world, trained a few steps."""
    from moebench.config import load_recipe
    from moebench.train.pipeline import train

    base = tmp_path_factory.mktemp("interop")
    dense = train(load_recipe(REPO / "recipes" / "shapes_dense.yaml", [*TINY, *NO_NORM]),
                  runs_dir=base / "runs", results_dir=base / "res", progress=False)
    moe = train(load_recipe(REPO / "recipes" / "shapes_moe.yaml", [
        *TINY, *NO_NORM, "stages.moe.max_steps=2", "stages.moe.batch_size=8", "moe.shared_expert=gated"]),
        runs_dir=base / "runs", results_dir=base / "res", progress=False)
    return {"dense": dense, "moe": moe, "base": base}


def _inputs(model, tokenizer, recipe):
    from moebench.data.conversations import Encoder

    torch.manual_seed(0)
    enc = Encoder(tokenizer, model.num_image_tokens, model.image_token_id, system=recipe.model.system)
    ids = torch.tensor([enc.prompt("Is there a red circle in the image?")])
    size = model.vision_tower.config.image_size
    return ids, torch.ones_like(ids), torch.randn(1, 3, size, size)


@torch.no_grad()
def _ours(run):
    model, tokenizer = run.load_model("cpu")
    ids, mask, pixels = _inputs(model, tokenizer, run.recipe)
    return model(ids, mask, pixels).logits, (ids, mask, pixels)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_then_transformers_then_convert_keeps_the_logits(runs, kind, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from moebench.interop.convert import convert
    from moebench.models.params import count_params

    run = runs[kind]
    want, (ids, mask, pixels) = _ours(run)
    code, _, err = run_cli(["export", run.dir, tmp_path / "hf"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == ("qwen2_moe" if kind == "moe" else "qwen2")
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (got - want).abs().max() < 1e-5

    back = convert(tmp_path / "hf", tmp_path / "back")
    assert back.recipe.variant == kind
    model, _ = back.load_model("cpu")
    with torch.no_grad():
        again = model(ids, mask, pixels).logits
    assert (again - want).abs().max() < 1e-5
    original, _ = run.load_model("cpu")
    assert count_params(model)["activated"] == count_params(original)["activated"]


def test_eval_takes_a_llava_hf_directory_and_counts_k_of_e_experts(runs, tmp_path, capsys):
    """`moebench eval --model HF_DIR` converts once (runs/.converted/) and writes ordinary MoE rows."""
    from moebench import results
    from moebench.data.sources import resolve

    run = runs["moe"]
    assert run_cli(["export", run.dir, tmp_path / "hf"], capsys)[0] == 0
    root = resolve("shapes", run.recipe.data.world, progress=False).root
    args = ["eval", "--model", tmp_path / "hf", "--tasks", "gqa", "--limit", "8", "--data", root,
            "--runs", tmp_path / "runs", "--results", tmp_path / "res", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    (converted,) = (tmp_path / "runs" / ".converted").iterdir()
    rows = results.read_rows([tmp_path / "res"], "metrics")
    assert rows and all(r["variant"] == "moe" for r in rows)
    r = rows[0]
    m = run.recipe.moe  # 4 experts, top-2, layers 0 of 2 (every_other) with a gated shared expert
    assert m.num_experts == 4 and m.top_k == 2
    detail = json.loads(r["params_detail"])
    assert r["params_total"] - r["params_activated"] > 0 and detail["llm"] > detail["llm_activated"]
    assert sorted(json.loads(r["extra"])["expert_load"]) == ["0"]
    assert run_cli(args, capsys)[0] == 0  # the second time reuses the conversion
    assert list((tmp_path / "runs" / ".converted").iterdir()) == [converted]


def test_export_refuses_what_llava_cannot_express(tiny_run, capsys, tmp_path):
    run, _ = tiny_run  # the shipped recipes' feature_norm: true
    code, _, err = run_cli(["export", run.dir, tmp_path / "hf"], capsys)
    assert code == 2 and "feature_norm=true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()


def test_checkpoints_that_do_not_match_fail_with_one_line(runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from moebench.config import load_recipe

    run = runs["dense"]
    assert run_cli(["export", run.dir, tmp_path / "hf"], capsys)[0] == 0
    # a tensor missing from the weights
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    dropped = sorted(k for k in state if "multi_modal_projector.linear_2.weight" in k)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, str(tmp_path / "hf" / "model.safetensors"),
              metadata={"format": "pt"})
    code, _, err = run_cli(["convert", tmp_path / "hf", tmp_path / "out"], capsys)
    assert code == 2 and "projector.2.weight" in err and len(err.strip().splitlines()) == 1
    # a tensor of another shape
    state[dropped] = state[dropped][:, :-1].contiguous()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli(["convert", tmp_path / "hf", tmp_path / "out"], capsys)
    assert code == 2 and "has shape" in err and len(err.strip().splitlines()) == 1
    # a vision tower pointed at a whole llava-hf checkpoint: its weights are not a CLIPVisionModel's
    recipe = REPO / "recipes" / "shapes_dense.yaml"
    load_recipe(recipe, TINY)
    code, _, err = run_cli(["train", recipe, *TINY, f"model.vision.pretrained={tmp_path / 'hf'}",
                            "--runs", tmp_path / "r", "--results", tmp_path / "res", "--no-progress"], capsys)
    assert code == 2 and "does not hold a CLIPVisionModel's weights" in err, err
    assert len(err.strip().splitlines()) == 1
    # a directory of no known layout
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    code, _, err = run_cli(["eval", "--model", tmp_path / "other", "--tasks", "gqa"], capsys)
    assert code == 2 and "model_type 'bert'" in err and len(err.strip().splitlines()) == 1
