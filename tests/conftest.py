"""Shared fixtures: a small shapes world in a temp cache, a tiny recipe, and an in-process CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A tiny variant of the shipped main job: same stages and code paths, toy sizes and few steps.
TINY = [
    "data.world.n_train=200", "data.world.n_val=900", "data.world.image_size=32", "data.world.grid=4",
    "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden_size=32",
    "model.vision.layers=2", "model.vision.heads=2", "model.vision.intermediate_size=64",
    "model.llm.hidden_size=32", "model.llm.layers=2", "model.llm.heads=2", "model.llm.kv_heads=1",
    "model.llm.intermediate_size=64", "model.tokenizer.vocab_size=300",
    "stages.clip.max_steps=2", "stages.clip.batch_size=16",
    "stages.pretrain.max_steps=2", "stages.pretrain.batch_size=8",
    "stages.finetune.max_steps=6", "stages.finetune.batch_size=8", "stages.finetune.save_every=2",
    "stages.finetune.log_every=1", "eval.limit=8", "eval.batch_size=8", "eval.tasks=[pope,gqa]",
]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Every test shares one world cache outside the user's home."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEBENCH_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def tiny_recipe():
    from moebench.config import load_recipe

    return load_recipe(REPO / "recipes" / "shapes_dense.yaml", TINY)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_recipe):
    """One trained tiny run (with its eval rows), shared by the tests that only read it."""
    from moebench.train.pipeline import train

    base = tmp_path_factory.mktemp("tiny")
    run = train(tiny_recipe, runs_dir=base / "runs", results_dir=base / "results", progress=False)
    return run, base


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the real `moebench` entry point in-process; returns (exit code, stdout, stderr)."""
    from moebench.cli import main

    old = sys.argv
    sys.argv = ["moebench", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err
