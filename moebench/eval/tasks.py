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
    annotations: str = ""  # VQAv2: the annotations file ({split} replaced), beside `questions`
    ocr: bool = False  # TextVQA: add "Reference OCR token: ..." to the prompt, as LLaVA-1.5 does


@dataclass
class Sample:
    question_id: str
    split: str
    image: Path
    question: str
    target: str | list[str]  # one answer, or VQA's 10 annotator answers


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


@LOADERS.register("vqav2")
def _vqav2(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """Official VQAv2 files: questions {questions: [{question_id, image_id, question}]} and annotations
    {annotations: [{question_id, answers: [{answer} x 10]}]}. Images: the COCO instances file of the split
    names them when present (annotations/instances_<split>.json), else COCO's COCO_<split>_<id:012d>.jpg."""
    qs = json.loads(_require(root / task.questions.format(split=split), task).read_text())["questions"]
    anns = json.loads(_require(root / task.annotations.format(split=split), task).read_text())["annotations"]
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns}
    names = _coco_file_names(root / "annotations" / f"instances_{split}.json")
    images, out = root / task.images, []
    for q in qs:
        if q["question_id"] not in answers:
            raise UserError(f"{task.annotations.format(split=split)}: question {q['question_id']} has no annotation; "
                            "use the annotations file that matches the questions file")
        name = names.get(q["image_id"], f"COCO_{split}_{q['image_id']:012d}.jpg")
        out.append(Sample(str(q["question_id"]), split, images / name, q["question"], answers[q["question_id"]]))
    return out


def _coco_file_names(path: Path) -> dict[int, str]:
    if not path.is_file():
        return {}
    return {im["id"]: im["file_name"] for im in json.loads(path.read_text())["images"]}


@LOADERS.register("textvqa")
def _textvqa(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """Official TextVQA 0.5.1 JSON {data: [{question_id, image_id, question, answers (10), ocr_tokens}]};
    images train_images/<image_id>.jpg (TextVQA's val images live there). With `ocr: true` the prompt
    gets LLaVA-1.5's "Reference OCR token: a, b, c" line."""
    data = json.loads(_require(root / task.questions.format(split=split), task).read_text())["data"]
    images, out = root / task.images, []
    for i, q in enumerate(data):
        if not q.get("answers"):
            raise UserError(f"{task.questions.format(split=split)}: record {i} (question_id {q.get('question_id')}) "
                            "has no answers")
        question = q["question"]
        if task.ocr:
            question += "\nReference OCR token: " + ", ".join(q.get("ocr_tokens", []))
        out.append(Sample(str(q["question_id"]), split, images / f"{q['image_id']}.jpg", question, q["answers"]))
    return out


@LOADERS.register("scienceqa")
def _scienceqa(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """ScienceQA problems.json + pid_splits.json, the problems of `split` that have an image (ScienceQA-IMG);
    prompt as LLaVA's: [Context: hint\n]question\nA. choice\nB. choice ...; the target is the letter."""
    problems = json.loads(_require(root / task.questions, task).read_text())
    pids = json.loads(_require(root / task.questions.replace("problems.json", "pid_splits.json"), task).read_text())
    out = []
    for pid in pids.get(split, []):
        p = problems[pid]
        if not p.get("image"):
            continue
        letters = "ABCDE"[: len(p["choices"])]
        lines = ([f"Context: {p['hint']}"] if p.get("hint") else []) + [p["question"]]
        lines += [f"{letter}. {choice}" for letter, choice in zip(letters, p["choices"])]
        out.append(Sample(pid, split, root / task.images / split / pid / p["image"], "\n".join(lines),
                          letters[p["answer"]]))
    return out


def _qid_order(qid: str):
    return (0, int(qid), "") if str(qid).isdigit() else (1, 0, str(qid))
