"""Evaluation tasks: declarative YAML files in tasks/ (with a `version`) and the loaders they name.

A loader turns a task + data root into samples; the same loader reads the official files of a real
data root and the embedded world, which is written in the same formats and layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moebench.config import from_dict
from moebench.errors import MissingFile, UserError
from moebench.registry import Registry, did_you_mean

LOADERS: Registry = Registry("task loader")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@dataclass
class TaskConfig:
    name: str = ""
    version: int = 0
    description: str = ""
    loader: str = ""
    splits: list[str] = field(default_factory=list)
    questions: str = ""  # path under the data root; {split} is replaced by the split name
    images: str = ""  # image folder under the data root
    prompt_suffix: str = SHORT_ANSWER
    max_new_tokens: int = 8
    metric: str = ""
    normalizer: str = ""  # for exact-match metrics: "llava" | "lmms_eval"
    headline: str = ""  # the metric a report leads with, e.g. "f1" (mean over splits) or "exact_match"
    download: str = ""  # what to fetch and where to put it, shown when a file is missing


@dataclass
class Sample:
    question_id: str
    split: str
    image: Path
    question: str
    target: str


def tasks_dir() -> Path:
    """The repository's tasks/ folder (the package is installed in editable mode from the checkout)."""
    return Path(__file__).resolve().parents[2] / "tasks"


def task_names() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def load_task(name_or_path: str) -> TaskConfig:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = tasks_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UserError(f"unknown task {name_or_path!r}{did_you_mean(name_or_path, task_names())}; known: {', '.join(task_names())}")
    raw = yaml.safe_load(path.read_text()) or {}
    task = from_dict(TaskConfig, raw, what="task")
    for key in ("name", "loader", "questions", "images", "metric", "headline"):
        if not getattr(task, key):
            raise UserError(f"task {path}: `{key}` is empty")
    if task.version < 1:
        raise UserError(f"task {path}: `version` must be >= 1 (bump it when the prompt or metric changes)")
    LOADERS.get(task.loader)
    from moebench.eval.metrics import get_metric

    get_metric(task.metric)
    return task


def load_samples(task: TaskConfig, root: Path, limit: int | None = None) -> list[Sample]:
    """All samples of all splits (the first `limit` of each split when given)."""
    out = []
    for split in task.splits:
        samples = LOADERS.get(task.loader)(task, Path(root), split)
        out += samples[:limit] if limit else samples
    return out


def _require(path: Path, task: TaskConfig) -> Path:
    if not path.is_file():
        raise MissingFile(path, f"{task.name} file", task.download or "see the README section on real datasets")
    return path


@LOADERS.register("pope")
def _pope(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """Official POPE JSON lines: {question_id, image, text, label}."""
    from moebench.data.pope import read_pope_jsonl

    path = _require(root / task.questions.format(split=split), task)
    images = root / task.images
    return [Sample(str(r["question_id"]), split, images / r["image"], r["text"], r["label"]) for r in read_pope_jsonl(path)]


@LOADERS.register("gqa")
def _gqa(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """Official GQA questions JSON: {qid: {imageId, question, answer, ...}}; images/{imageId}.jpg."""
    path = _require(root / task.questions.format(split=split), task)
    data = json.loads(path.read_text())
    images = root / task.images
    out = []
    for qid in sorted(data, key=_qid_order):
        q = data[qid]
        image = images / f"{q['imageId']}.jpg"
        if not image.exists() and (images / f"{q['imageId']}.png").exists():
            image = images / f"{q['imageId']}.png"
        out.append(Sample(str(qid), split, image, q["question"], q["answer"]))
    return out


def _qid_order(qid: str):
    return (0, int(qid), "") if str(qid).isdigit() else (1, 0, str(qid))
