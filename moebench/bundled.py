"""The recipes and tasks shipped with moebench, and how a command-line argument names one.

The checkout's top-level `recipes/` and `tasks/` folders are installed as the packages
`moebench.recipes` and `moebench.tasks` (the `package-dir` mapping in pyproject.toml), so the import
system finds them the same way in an editable install (the checkout's folders) and a regular one
(site-packages/moebench/recipes/, .../tasks/).
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Literal

from moebench.errors import MissingFile, UserError
from moebench.registry import did_you_mean

Kind = Literal["recipes", "tasks"]
YAML = (".yaml", ".yml")


def bundled_dir(kind: Kind) -> Path:
    """The folder of the bundled `kind` YAML files (a real directory: moebench is not run from a zip)."""
    spec = importlib.util.find_spec(f"moebench.{kind}")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the bundled {kind} (package moebench.{kind}) are not installed; reinstall moebench "
                        "(in a checkout: pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0])


def bundled_names(kind: Kind) -> list[str]:
    return sorted(p.stem for p in bundled_dir(kind).glob("*.yaml"))


def bundled_file(kind: Kind, name: str) -> Path | None:
    """The bundled `kind` file `name` names (`shapes_dense` or `shapes_dense.yaml`, no folder), or None."""
    path = Path(name)
    stem = path.stem if path.suffix in YAML else path.name
    if path.parent != Path(".") or stem not in bundled_names(kind):
        return None
    return bundled_dir(kind) / f"{stem}.yaml"


def find_yaml(arg: str | Path, kinds: tuple[Kind, ...] = ("recipes",)) -> Path:
    """The YAML file `arg` names: the file itself when it exists, else the bundled one of the first of
    `kinds` that has a file of that name (`shapes_dense` or `shapes_dense.yaml`, without a folder).
    Anything else is a UserError with the closest bundled name."""
    path = Path(arg)
    if path.is_file():
        return path
    name = path.stem if path.suffix in YAML else path.name
    what = " or ".join(k[:-1] for k in kinds)  # "recipe", "recipe or task"
    names = [n for k in kinds for n in bundled_names(k)]
    if path.parent == Path("."):
        for kind in kinds:
            if found := bundled_file(kind, path.name):
                return found
        raise UserError(f"unknown {what} {str(arg)!r}{did_you_mean(name, names)}: no such file, and no bundled "
                        f"{what} of that name (`moebench ls` lists them)")
    what = f"{kinds[0][:-1]} file"  # a path with a folder is most likely a recipe
    if name in names:
        raise MissingFile(path, what, f"moebench bundles one named {name}: give `{name}`, without the folder")
    close = difflib.get_close_matches(name, names, n=1)
    raise MissingFile(path, what, "see `moebench ls` for the bundled ones" + (f"; closest: {close[0]}" if close else ""))


def names_a_recipe(arg: str) -> bool:
    """A command-line argument that is not a key=value override: a YAML path, a file, or a bundled
    recipe's name or a near miss of one (which find_yaml then reports with the hint)."""
    path = Path(arg)
    if "=" in arg:
        return False
    return path.suffix in YAML or path.is_file() or bool(did_you_mean(path.name, bundled_names("recipes")))
