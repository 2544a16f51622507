"""A regular (non-editable) install: the wheel ships the recipes and tasks, the real `moebench` command
finds them from any folder by name, and a recipe naming an unknown task fails before training."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import moebench
from conftest import REPO, run_cli

RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
TASKS = sorted(p.stem for p in (REPO / "tasks").glob("*.yaml"))


def moebench_cmd(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command in a fresh process (`python -m moebench`, as torchrun starts it), run in `cwd`."""
    return subprocess.run([sys.executable, "-m", "moebench", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (so the build leaves nothing in it), offline."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("moebench", "recipes", "tasks"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", str(src), "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = (tmp / "dist").glob("moebench-*.whl")
    return whl


def test_wheel_ships_every_recipe_task_and_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for stem in RECIPES:
        assert f"moebench/recipes/{stem}.yaml" in names
    for stem in TASKS:
        assert f"moebench/tasks/{stem}.yaml" in names
    # pyproject.toml lists the packages by hand: a new subpackage must be added there
    for py in (REPO / "moebench").rglob("*.py"):
        assert f"{py.relative_to(REPO).as_posix()}" in names, f"{py} is not in the wheel; add its package to pyproject.toml"


def test_installed_wheel_runs_bundled_recipes_from_any_folder(wheel, tmp_path):
    """The wheel's files, unpacked first on PYTHONPATH (what `pip install` does for a pure-Python wheel),
    ahead of the checkout's install."""
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import moebench; from moebench.bundled import bundled_dir; "
                            "print(moebench.__file__, bundled_dir('recipes'), bundled_dir('tasks'))"],
                           cwd=elsewhere, capture_output=True, text=True, env={**os.environ, **env})
    assert where.returncode == 0, where.stderr
    for p in where.stdout.split():
        assert Path(p).resolve().is_relative_to(site.resolve()), where.stdout
    ls = moebench_cmd("ls", cwd=elsewhere, env=env)
    assert ls.returncode == 0, ls.stderr
    for name in RECIPES + TASKS:
        assert name in ls.stdout
    # shapes_stgc extends shapes_moe extends shapes_dense (vimoe_shapes_shared: two levels too): the chains
    # resolve inside the installed folder
    ok = moebench_cmd("validate", "shapes_stgc", "vimoe_shapes_shared", "pope", cwd=elsewhere, env=env)
    assert ok.returncode == 0, ok.stderr
    version = moebench_cmd("--version", cwd=elsewhere, env=env)
    assert version.returncode == 0 and version.stdout == f"moebench {moebench.__version__}\n"


def test_ls_lists_recipes_and_tasks_by_name_from_any_folder(tmp_path):
    out = moebench_cmd("ls", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in RECIPES + TASKS:
        assert name in out.stdout
    assert "recipes/" not in out.stdout  # names, not checkout paths that an install does not have


def test_validate_bundled_name_from_any_folder(tmp_path):
    out = moebench_cmd("validate", "shapes_dense", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ok shapes_dense" in out.stdout


def test_unknown_task_in_recipe_fails_before_training(tmp_path):
    recipe = (REPO / "recipes" / "shapes_dense.yaml").read_text()
    line = next(x for x in recipe.splitlines(keepends=True) if x.startswith("  tasks: ["))
    (tmp_path / "bad.yaml").write_text(recipe.replace(line, "  tasks: [pope, no_such_task]\n"))
    cache = tmp_path / "cache"
    out = moebench_cmd("train", "bad.yaml", "--no-progress", cwd=tmp_path, env={"MOEBENCH_CACHE": str(cache)})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown task 'no_such_task'"), out.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    assert not cache.exists() or not any(cache.iterdir())  # no world generated either


def test_version_is_the_installed_one(tmp_path):
    out = moebench_cmd("--version", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"moebench {moebench.__version__}\n"
    assert moebench.__version__ == importlib.metadata.version("moebench")


@pytest.mark.parametrize("args, needles", [
    (["validate", "shapes_dnse"], ["unknown recipe or task 'shapes_dnse'", "did you mean 'shapes_dense'"]),
    (["validate", "recipes/shapes_dense.yaml"], ["missing recipe file", "give `shapes_dense`"]),
    (["train", "shapes_dense", "shapes_mo"], ["unknown recipe 'shapes_mo'", "did you mean 'shapes_moe'"]),
    (["plan", "shapes_dnse"], ["unknown recipe 'shapes_dnse'", "did you mean 'shapes_dense'"]),
    (["ci", "shapes_dense", "shapes_stgcc", "--baseline", "none.arrow"], ["did you mean 'shapes_stgc'"]),
])
def test_unknown_recipe_name_is_one_line_with_a_hint(args, needles, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    for n in needles:
        assert n in err, err
    assert not (tmp_path / "runs").exists()


def test_validate_tells_tasks_from_recipes_by_content(capsys, tmp_path):
    """A task file outside any tasks/ folder, and a recipe inside one."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "tasks").mkdir()
    task = shutil.copy(REPO / "tasks" / "gqa.yaml", tmp_path / "mine" / "my_gqa.yaml")
    recipe = shutil.copy(REPO / "recipes" / "shapes_dense.yaml", tmp_path / "tasks" / "my_recipe.yaml")
    code, out, err = run_cli(["validate", task, recipe, "gqa"], capsys)
    assert code == 0, err
    assert out.count("ok") == 3


def test_copy_of_a_bundled_recipe_extends_the_bundled_base(capsys, tmp_path):
    """shapes_stgc.yaml says `extends: shapes_moe.yaml`: copied out of the folder, that names the bundled one."""
    copy = shutil.copy(REPO / "recipes" / "shapes_stgc.yaml", tmp_path / "my_stgc.yaml")
    code, out, err = run_cli(["validate", copy], capsys)
    assert code == 0, err
    moe = (REPO / "recipes" / "shapes_moe.yaml").read_text()
    (tmp_path / "shapes_moe.yaml").write_text(moe + "seed: 5\n")  # a file beside it wins
    from moebench.config import load_recipe

    assert load_recipe(copy).seed == 5 and load_recipe(copy).variant == "stgc"
