"""Outside the variant modules no module of moebench/ names a method (issue 28).

The check reads each module's syntax tree, not its text, so comments, docstrings and messages may
mention MoE or RoE; what it flags is code that names a method:
- an identifier (variable, attribute, function, class, argument, keyword, imported module or name)
  containing moe, roe, stgc or upcycl, in any case (`recipe.moe`, `upcycle_index`, `_roe_added`,
  `MoEConfig`, `from moebench.moe.upcycle import ...`), the package name `moebench` aside;
- a string constant that is a variant's name ("dense", "moe", "stgc", "roe"): `variant == "moe"`,
  `getattr(model, "roe", None)`.
Allowed: the variant modules (moebench/variants/), the implementations they call (moebench/moe/,
moebench/roe/), ViMoE (moebench/vision/) and the converters of other projects' checkpoints, MoE
layouts included (moebench/interop/); in config.py the recipe dataclasses that hold the sections
and stage flags, ViMoE's `validate_vit` and the layer-spec helper `moe_layer_indices`. The model code,
parameter counting, generation and the distributed set-up reach a variant's modules through
moebench.models.extensions; the CLI registers each variant's benchmarks from `Variant.commands`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moebench"
METHOD = re.compile(r"moe|roe|stgc|upcycl", re.IGNORECASE)
VARIANT_NAMES = {"dense", "moe", "stgc", "roe"}
IMPLEMENTATIONS = {"variants", "moe", "roe", "vision", "interop"}  # interop: other projects' MoE layouts
# config.py: definitions that may keep naming a method (the dataclasses may stay in config.py)
CONFIG_ALLOWED = {"StageConfig", "VisionStageConfig", "MoEConfig", "STGCConfig", "RoEConfig", "ViTConfig", "Recipe",
                  "VisionRecipe", "validate_vit", "moe_layer_indices", "load_recipe"}
CORE = ["train/pipeline.py", "train/loop.py", "eval/runner.py", "models/checkpoint.py", "config.py", "cli.py",
        "models/vlm.py", "models/params.py", "eval/generate.py", "distributed.py", "plan.py"]


def _named(tree: ast.AST):
    """(line, name) of every identifier and every variant-name string in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg
        elif isinstance(node, ast.keyword) and node.arg:
            yield node.lineno, node.arg
        elif isinstance(node, ast.alias):
            yield from ((node.lineno, part) for part in [*node.name.split("."), *([node.asname] if node.asname else [])])
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield from ((node.lineno, part) for part in node.module.split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in VARIANT_NAMES:
            yield node.lineno, repr(node.value)


def _method_names(path: Path, allowed: set[str] = frozenset()) -> list[str]:
    """'file:line: name  (the line)' for each name of a method in `path`, outside top-level `allowed` definitions."""
    tree = ast.parse(path.read_text())
    tree.body = [n for n in tree.body if getattr(n, "name", None) not in allowed]
    lines = path.read_text().splitlines()
    label = path.relative_to(PKG) if path.is_relative_to(PKG) else path.name
    return [f"{label}:{line}: {name}  ({lines[line - 1].strip()})"
            for line, name in sorted(set(_named(tree)))
            if name != "moebench" and (METHOD.search(name) or (name[0] == "'" and name.strip("'") in VARIANT_NAMES))]


def _checked() -> list[Path]:
    return [p for p in sorted(PKG.rglob("*.py")) if p.relative_to(PKG).parts[0] not in IMPLEMENTATIONS]


def test_no_module_outside_the_variants_names_a_method():
    found = [hit for p in _checked() for hit in _method_names(p, CONFIG_ALLOWED if p == PKG / "config.py" else set())]
    assert not found, "these lines name a method; move them into a Variant (moebench/variants):\n" + "\n".join(found)


def test_the_check_covers_the_core_and_finds_what_it_looks_for(tmp_path):
    checked = {str(p.relative_to(PKG)) for p in _checked()}
    assert set(CORE) <= checked
    bad = tmp_path / "bad.py"
    bad.write_text('"""moe in a docstring is fine."""\n# so is roe in a comment\n'
                   'from moebench.moe.upcycle import upcycle\n'
                   'def f(recipe, stage):\n    if recipe.variant == "stgc" or stage.add_roe:\n'
                   '        return recipe.moe\n    return UserError("MoE is mentioned in a message")\n')
    names = {hit.split(": ")[1].split("  (")[0] for hit in _method_names(bad)}
    assert names == {"moe", "upcycle", "'stgc'", "add_roe"}

