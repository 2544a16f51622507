"""Evaluation tasks: declarative YAML files in tasks/ (with a `version`; installed as moebench.tasks)
and the loaders they name.

A loader turns a task + data root into samples; the same loader reads the official files of a real
data root and the embedded world, which is written in the same formats and layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from moebench.bundled import bundled_file, bundled_names
from moebench.config import Recipe, VisionRecipe, from_dict
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
    # lmms-eval's release of the task (its Hugging Face dataset as parquet files): a glob under the data root,
    # {split} replaced, read where the official files are missing (moebench.eval.parquet)
    parquet: str = ""
    # whose scoring the numbers follow: llava (LLaVA-1.5 / MoE-LLaVA's eval scripts), official (the dataset
    # authors' scripts) or lmms_eval; every row names it (moebench.eval.metrics.PROTOCOLS)
    protocol: str = "llava"
    # vision tasks (a vision recipe's heads): `head` cls (metric classification: top1 / top5) or seg
    # (metric segmentation: mIoU / mAcc / aAcc); their loader is one of moebench.vision.data.VISION_LOADERS,
    # `splits` are evaluated and `train_split` is what a vision recipe's stages learn from
    head: str = ""
    train_split: str = ""

    @property
    def kind(self) -> str:
        """vision (scored from a head's logits) or lm (answered by generation)."""
        return "vision" if self.head else "lm"


@dataclass
class Sample:
    question_id: str
    split: str
    image: Path
    question: str
    target: str | list[str]  # one answer, or VQA's 10 annotator answers
    # the official breakdowns the sample belongs to, e.g. {"answer_type": "yes/no"} (VQAv2),
    # {"type": "binary"} (GQA), {"subject": ..., "context": ["IMG", "TXT"]} (ScienceQA; a list: several)
    groups: dict = field(default_factory=dict)


def task_names() -> list[str]:
    """The bundled tasks (the checkout's tasks/ folder, installed as moebench.tasks)."""
    return bundled_names("tasks")


def is_task_file(path: Path) -> bool:
    """Whether the YAML file at `path` is a task rather than a recipe: it has a key only tasks have
    (loader, metric, splits, ...). Told by content, so a task file may live in any folder."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return False  # the recipe loader reports what is wrong with the file
    if not isinstance(raw, dict):
        return False
    recipe_keys = {f.name for cls in (Recipe, VisionRecipe) for f in fields(cls)} | {"extends"}
    return bool(({f.name for f in fields(TaskConfig)} - recipe_keys) & raw.keys())


def load_task(name_or_path: str) -> TaskConfig:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):  # a name: a bundled task
        path = bundled_file("tasks", name_or_path)
    if path is None or not path.is_file():
        raise UserError(f"unknown task {name_or_path!r}{did_you_mean(name_or_path, task_names())}; known: {', '.join(task_names())}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"task {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        task = from_dict(TaskConfig, raw, what="task")
    except UserError as e:
        raise UserError(f"task {path}: {e}") from None
    for key in ("name", "loader", "questions", "images", "metric", "headline"):
        if not getattr(task, key):
            raise UserError(f"task {path}: `{key}` is empty")
    if task.version < 1:
        raise UserError(f"task {path}: `version` must be >= 1 (bump it when the prompt or metric changes)")
    if task.head:
        _check_vision_task(task, path)
        return task
    from moebench.eval.metrics import PROTOCOLS

    if task.protocol not in PROTOCOLS:
        raise UserError(f"task {path}: protocol={task.protocol!r}; choose one of {list(PROTOCOLS)}")
    LOADERS.get(task.loader)
    from moebench.eval.metrics import get_metric

    get_metric(task.metric)
    return task


VISION_METRICS = {"cls": "classification", "seg": "segmentation"}


def _check_vision_task(task: TaskConfig, path: Path) -> None:
    from moebench.vision.data import VISION_LOADERS

    if task.head not in VISION_METRICS:
        raise UserError(f"task {path}: head={task.head!r}; choose cls (classification) or seg (segmentation)")
    if task.metric != VISION_METRICS[task.head]:
        raise UserError(f"task {path}: a {task.head} head is scored with metric: {VISION_METRICS[task.head]}")
    if not task.train_split:
        raise UserError(f"task {path}: `train_split` is empty; name the split a vision recipe trains on")
    VISION_LOADERS.get(task.loader)


def load_samples(task: TaskConfig, root: Path, limit: int | None = None) -> list[Sample]:
    """All samples of all splits (the first `limit` of each split when given), from the official files, or
    where they are missing from lmms-eval's parquet release (`parquet`). A split without questions, or a
    file laid out differently from the official one, is a UserError naming the file."""
    from moebench.eval.parquet import read_parquet, release_files

    out = []
    for split in task.splits:
        path = Path(root) / task.questions.format(split=split)
        files = release_files(task, Path(root), split)
        try:
            samples = read_parquet(task, files, split) if files else LOADERS.get(task.loader)(task, Path(root), split)
        except (KeyError, TypeError, IndexError) as e:  # a record or file of another layout
            where = ", ".join(map(str, files)) if files else path
            raise UserError(f"{where}: not in the {'lmms-eval' if files else 'official'} {task.name} format "
                            f"({type(e).__name__}: {e}); {task.download or 'see the README section on real datasets'}") from None
        if not samples:
            raise UserError(f"task {task.name}: split {split!r} has no questions in {', '.join(map(str, files)) or path}; "
                            "check that the file is complete")
        out += samples[:limit] if limit else samples
    return out


def _require(path: Path, task: TaskConfig) -> Path:
    if not path.is_file():
        raise MissingFile(path, f"{task.name} file", task.download or "see the README section on real datasets")
    return path


def _read_json(path: Path, task: TaskConfig):
    """The parsed JSON file `path` of `task`; a missing or unparsable file is a UserError."""
    try:
        return json.loads(_require(path, task).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the file is incomplete or damaged, download it again") from None


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
    path = root / task.questions.format(split=split)
    data = _read_json(path, task)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected GQA's mapping {{question id: {{imageId, question, answer}}}}")
    images = root / task.images
    out = []
    for qid in sorted(data, key=_qid_order):
        q = data[qid]
        missing = [k for k in ("imageId", "question", "answer") if not isinstance(q, dict) or k not in q]
        if missing:
            raise UserError(f"{path}: question {qid} has no {', '.join(missing)}")
        image = images / f"{q['imageId']}.jpg"
        if not image.exists() and (images / f"{q['imageId']}.png").exists():
            image = images / f"{q['imageId']}.png"
        structural = (q.get("types") or {}).get("structural")
        groups = {"type": "open" if structural == "query" else "binary"} if structural else {}  # GQA's eval.py
        out.append(Sample(str(qid), split, image, q["question"], q["answer"], groups))
    return out


@LOADERS.register("vqav2")
def _vqav2(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """Official VQAv2 files: questions {questions: [{question_id, image_id, question}]} and annotations
    {annotations: [{question_id, answers: [{answer} x 10]}]}. Images: the COCO instances file of the split
    names them when present (annotations/instances_<split>.json), else COCO's COCO_<split>_<id:012d>.jpg."""
    qs = _read_json(root / task.questions.format(split=split), task)["questions"]
    anns = _read_json(root / task.annotations.format(split=split), task)["annotations"]
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns}
    types = {a["question_id"]: a["answer_type"] for a in anns if a.get("answer_type")}
    names = _coco_file_names(root / "annotations" / f"instances_{split}.json")
    images, out = root / task.images, []
    for q in qs:
        if q["question_id"] not in answers:
            raise UserError(f"{task.annotations.format(split=split)}: question {q['question_id']} has no annotation; "
                            "use the annotations file that matches the questions file")
        name = names.get(q["image_id"], f"COCO_{split}_{q['image_id']:012d}.jpg")
        qid = q["question_id"]
        out.append(Sample(str(qid), split, images / name, q["question"], answers[qid],
                          {"answer_type": types[qid]} if qid in types else {}))
    return out


def _coco_file_names(path: Path) -> dict[int, str]:
    if not path.is_file():
        return {}
    try:
        return {im["id"]: im["file_name"] for im in json.loads(path.read_text())["images"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None


@LOADERS.register("textvqa")
def _textvqa(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """Official TextVQA 0.5.1 JSON {data: [{question_id, image_id, question, answers (10), ocr_tokens}]};
    images train_images/<image_id>.jpg (TextVQA's val images live there). With `ocr: true` the prompt
    gets LLaVA-1.5's "Reference OCR token: a, b, c" line."""
    data = _read_json(root / task.questions.format(split=split), task)["data"]
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


def scienceqa_prompt(problem: dict) -> str:
    """LLaVA's ScienceQA question: [Context: hint\n]question\nA. choice\nB. choice ..."""
    lines = ([f"Context: {problem['hint']}"] if problem.get("hint") else []) + [problem["question"]]
    return "\n".join(lines + [f"{letter}. {choice}" for letter, choice in zip("ABCDE", problem["choices"])])


def mmbench_prompt(question: str, hint: str, options: dict[str, str]) -> str:
    """LLaVA's MMBench question: [hint\n]question\nA. option\nB. option ..."""
    return "\n".join(([hint] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()])


@LOADERS.register("scienceqa")
def _scienceqa(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """ScienceQA problems.json + pid_splits.json, the problems of `split` that have an image (ScienceQA-IMG);
    prompt as LLaVA's: [Context: hint\n]question\nA. choice\nB. choice ...; the target is the letter."""
    problems = _read_json(root / task.questions, task)
    pids = _read_json(root / task.questions.replace("problems.json", "pid_splits.json"), task)
    return [scienceqa_sample(pid, split, root / task.images / split / pid / problems[pid]["image"], problems[pid])
            for pid in pids.get(split, []) if problems[pid].get("image")]


def scienceqa_sample(pid: str, split: str, image: Path, p: dict) -> Sample:
    """One ScienceQA problem ({question, choices, answer index, hint, subject}) as a sample: LLaVA's prompt,
    the answer's letter, and the official breakdowns (ScienceQA's evaluations.py): subject, and context
    modality, where an image problem with a hint counts as both TXT and IMG."""
    groups = {"subject": p.get("subject", ""), "context": ["IMG", "TXT"] if p.get("hint") else ["IMG"]}
    return Sample(pid, split, image, scienceqa_prompt(p), "ABCDE"[int(p["answer"])], groups)


@LOADERS.register("mme")
def _mme(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """MME's release (MME_Benchmark_release_version/<subtask>/): per image a <stem>.txt of two lines
    "question<TAB>Yes|No", beside the image or in questions_answers_YN/ with the images in images/.
    Split `perception` or `cognition` (its subtasks: moebench.eval.metrics.MME_PERCEPTION / _COGNITION); the
    split's subtasks that are there are read (the shapes world has 4 of perception's 10 and 1 of cognition's 4),
    and the score sums those, so only runs over the same subtasks compare (the group rows name them)."""
    from moebench.eval.metrics import MME_COGNITION, MME_PERCEPTION

    base, out = root / task.questions, []
    subtasks = {"perception": MME_PERCEPTION, "cognition": MME_COGNITION}[split]
    if not any((base / sub).is_dir() for sub in subtasks):
        raise MissingFile(base / subtasks[0], f"MME {split} subtasks ({', '.join(subtasks)})", task.download or "")
    for sub in subtasks:  # the subtasks the release holds (lmms-eval scores the categories present, too)
        folder = base / sub
        if not folder.is_dir():
            continue
        qa = folder / "questions_answers_YN" if (folder / "questions_answers_YN").is_dir() else folder
        images = folder / "images" if (folder / "images").is_dir() else folder
        for txt in sorted(qa.glob("*.txt")):
            image = next((images / f"{txt.stem}{ext}" for ext in (".jpg", ".png", ".jpeg")
                          if (images / f"{txt.stem}{ext}").is_file()), images / f"{txt.stem}.jpg")
            for k, line in enumerate(x for x in txt.read_text().splitlines() if x.strip()):
                question, answer = line.rsplit("\t", 1)
                out.append(Sample(f"{sub}/{txt.stem}/{k}", split, image, question.strip(), answer.strip().lower(),
                                  {"subtask": sub}))
    return out


@LOADERS.register("mmbench")
def _mmbench(task: TaskConfig, root: Path, split: str) -> list[Sample]:
    """MMBench's TSV (index, question, hint, A-D, answer, category, image as base64): one sample per
    rotation of each question's options (circular evaluation), prompt as LLaVA's: [hint\n]question\nA. ...
    The images are decoded once into the moebench cache."""
    import base64
    import csv

    path = _require(root / task.questions.format(split=split), task)
    cache, out = image_cache("mmbench", [path]), []
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            image = cached_image(cache, f"{row['index']}.jpg", lambda: base64.b64decode(row["image"]))
            out += mmbench_samples(row, split, image)
    return out


def mmbench_samples(row: dict, split: str, image: Path) -> list[Sample]:
    """An MMBench item ({index, question, hint, A-D, answer letter, category}) as one sample per rotation of
    its options (circular evaluation), prompted as LLaVA's: [hint\n]question\nA. ..."""
    def present(v) -> bool:
        return v is not None and str(v) not in ("", "nan", "None")

    options = {k: str(row[k]) for k in "ABCD" if present(row.get(k))}
    letters, texts = list(options), list(options.values())
    answer_text, index = options[str(row["answer"]).strip()], str(row["index"])
    hint = str(row["hint"]) if present(row.get("hint")) else ""
    out = []
    for rot in range(len(texts)):
        shown = dict(zip(letters, texts[rot:] + texts[:rot]))
        target = next(k for k, v in shown.items() if v == answer_text)
        out.append(Sample(f"{index}/{rot}", split, image, mmbench_prompt(row["question"], hint, shown), target,
                          {"category": row.get("category") or "", "item": index, "rotation": rot, "options": shown}))
    return out


def image_cache(kind: str, files: list[Path]) -> Path:
    """The folder of the moebench cache where the images embedded in `files` are decoded, one per version
    of those files (a file rewritten in place, as a regenerated world, gets new images)."""
    import hashlib

    key = ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    base = Path(os.environ.get("MOEBENCH_CACHE") or Path.home() / ".cache" / "moebench")
    cache = base / kind / hashlib.sha256(key.encode()).hexdigest()[:12]
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def cached_image(cache: Path, name: str, data) -> Path:
    """cache/name, written once (atomically) from the bytes `data()` returns."""
    path = cache / name.replace("/", "_")
    if not path.is_file():
        tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
        tmp.write_bytes(data())
        tmp.replace(path)
    return path


def _qid_order(qid: str):
    return (0, int(qid), "") if str(qid).isdigit() else (1, 0, str(qid))
