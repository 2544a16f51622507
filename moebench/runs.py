"""Run directories: what `moebench train` leaves behind and `moebench eval` reads.

    runs/<recipe>-<key>/run.json     the resolved recipe, its hash, stage keys, data, git commit
    runs/<recipe>-<key>/model/       the final model (see models/checkpoint.py)
    runs/.stages/<i>-<stage>-<key>/  stage checkpoints shared by every recipe with the same first stages
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from moebench.config import Recipe, VisionRecipe, recipe_from_dict
from moebench.errors import MissingFile, UserError

RUN_FILE = "run.json"
STAGES_DIR = ".stages"


@dataclass
class RunInfo:
    dir: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def recipe(self) -> Recipe | VisionRecipe:
        return recipe_from_dict(self.meta["recipe"])

    @property
    def recipe_hash(self) -> str:
        return self.meta.get("recipe_hash", "")

    @property
    def git_commit(self) -> str:
        return self.meta.get("git_commit", "")

    def load_model(self, device=None):
        """(model, tokenizer): a VLM and its tokenizer, or a vision model and None."""
        from moebench.models.checkpoint import load_vision_model, load_vlm

        recipe = self.recipe
        if isinstance(recipe, VisionRecipe):
            (model, _), tokenizer = load_vision_model(self.dir / "model", expect=recipe.vit,
                                                      variant=recipe.variant), None
        else:
            model, tokenizer, _ = load_vlm(self.dir / "model", expect=recipe.model, variant=recipe.variant)
        if device is not None:
            model.to(device)
        return model, tokenizer


def open_run(path: str | Path) -> RunInfo:
    path = Path(path)
    if not (path / RUN_FILE).is_file() or not (path / "model").is_dir():
        raise UserError(f"{path} is not a moebench run (no {RUN_FILE} and model/); pass a directory made by `moebench train`")
    return RunInfo(path, json.loads((path / RUN_FILE).read_text()))


def latest_run(runs_dir: Path) -> RunInfo:
    runs = [p for p in Path(runs_dir).glob(f"*/{RUN_FILE}") if not p.parent.name.startswith(".")]
    if not runs:
        raise MissingFile(runs_dir, "trained run", "train one with `moebench train RECIPE` or pass --model RUN_DIR")
    return open_run(max(runs, key=lambda p: p.stat().st_mtime).parent)


def git_commit() -> str:
    """The commit of the checkout moebench runs from; "" for an installed copy, also one installed into
    a virtualenv inside some other repository (its files are not tracked there)."""
    here = Path(__file__).resolve().parent
    try:
        for cmd in (["git", "ls-files", "--error-unmatch", Path(__file__).name], ["git", "rev-parse", "--short", "HEAD"]):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, cwd=here)
            if out.returncode != 0:
                return ""
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
