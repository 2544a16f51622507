"""The benchmarks as lmms-eval releases them: its Hugging Face datasets (lmms-lab/POPE, lmms-lab/GQA,
lmms-lab/VQAv2, lmms-lab/textvqa, lmms-lab/ScienceQA, lmms-lab/MME, lmms-lab/MMBench) as parquet files,
the way most users now have them on disk, e.g.

    huggingface-cli download lmms-lab/POPE --repo-type dataset --local-dir DATA_ROOT/lmms-lab/POPE

A task file's `parquet:` is a glob under the data root; where the task's official files are missing and
the glob matches, the task reads these instead. The files are Arrow tables written by `datasets`; pyarrow
reads them batch by batch (no dataset cache, no decoding of every image at once), and each image, stored as
`datasets`' Image struct {bytes, path}, is decoded once into the moebench cache. Every reader builds the
same samples (prompt, target, breakdown groups) as the official files' loader in moebench.eval.tasks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from moebench.errors import UserError
from moebench.eval.tasks import Sample, TaskConfig, cached_image, image_cache, mmbench_samples, scienceqa_sample
from moebench.registry import Registry

READERS: Registry[Callable[[TaskConfig, list[Path], str, Path], list[Sample]]] = Registry("parquet reader")


def release_files(task: TaskConfig, root: Path, split: str) -> list[Path]:
    """The lmms-eval parquet files `split` of `task` is read from: none where its official file is there
    (or the task names no `parquet` glob)."""
    if not task.parquet or (Path(root) / task.questions.format(split=split)).exists():
        return []
    return sorted(Path(root).glob(task.parquet.format(split=split)))


def read_parquet(task: TaskConfig, files: list[Path], split: str) -> list[Sample]:
    return READERS.get(task.loader)(task, files, split, image_cache(f"parquet-{task.name}", files))


def rows(files: list[Path], need: tuple[str, ...]) -> Iterator[dict]:
    """The rows of `files`, batch by batch; a file without the columns `need` is a UserError."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise UserError(f"{path}: not a parquet file ({type(e).__name__}: {e}); download it again") from None
        missing = [c for c in need if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{path}: no column {', '.join(missing)}; expected lmms-eval's release of this task "
                            f"(columns {', '.join(need)})")
        for batch in pf.iter_batches(batch_size=256):
            yield from batch.to_pylist()


def _image(cache: Path, name: str, value) -> Path:
    """The image of a row (datasets' Image struct {bytes, path}, or raw bytes), decoded into the cache."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise UserError(f"image {name} has no bytes in its parquet row; download the release again")
    suffix = Path(value.get("path") or "").suffix if isinstance(value, dict) else ""
    return cached_image(cache, f"{name}{suffix or '.png'}", lambda: data)


@READERS.register("pope")
def _pope(task: TaskConfig, files: list[Path], split: str, cache: Path) -> list[Sample]:
    """lmms-lab/POPE: one test split, the POPE split in `category` (adversarial / popular / random)."""
    return [Sample(str(r["question_id"]), split, _image(cache, str(r["question_id"]), r["image"]), r["question"],
                   str(r["answer"]).strip().lower())
            for r in rows(files, ("question_id", "question", "answer", "category", "image")) if r["category"] == split]


@READERS.register("gqa")
def _gqa(task: TaskConfig, files: list[Path], split: str, cache: Path) -> list[Sample]:
    """lmms-lab/GQA: the questions (testdev_balanced_instructions: id, imageId, question, answer, types) and
    the images (testdev_balanced_images: id, image) are two tables; the glob covers both."""
    import pyarrow.parquet as pq

    image_files = [f for f in files if "image" in pq.read_schema(f).names]
    images = {str(r["id"]): _image(cache, str(r["id"]), r["image"]) for r in rows(image_files, ("id", "image"))}
    out = []
    for r in rows([f for f in files if f not in image_files], ("id", "imageId", "question", "answer")):
        if str(r["imageId"]) not in images:
            raise UserError(f"GQA question {r['id']}: image {r['imageId']} is in none of the image files; "
                            "download lmms-lab/GQA's testdev_balanced_images too")
        structural = (r.get("types") or {}).get("structural")
        groups = {"type": "open" if structural == "query" else "binary"} if structural else {}  # GQA's eval.py
        out.append(Sample(str(r["id"]), split, images[str(r["imageId"])], r["question"], r["answer"], groups))
    return out


@READERS.register("vqav2")
def _vqav2(task: TaskConfig, files: list[Path], split: str, cache: Path) -> list[Sample]:
    """lmms-lab/VQAv2: question_id, question, answers [{answer, answer_confidence, answer_id}] x 10,
    answer_type, image."""
    return [Sample(str(r["question_id"]), split, _image(cache, f"{r['image_id']}", r["image"]), r["question"],
                   [a["answer"] if isinstance(a, dict) else a for a in r["answers"]],
                   {"answer_type": r["answer_type"]} if r.get("answer_type") else {})
            for r in rows(files, ("question_id", "question", "answers", "image_id", "image"))]


@READERS.register("textvqa")
def _textvqa(task: TaskConfig, files: list[Path], split: str, cache: Path) -> list[Sample]:
    """lmms-lab/textvqa: question_id, question, answers (10), ocr_tokens, image_id, image; with `ocr: true`
    the prompt gets LLaVA-1.5's "Reference OCR token:" line, as from the official file."""
    out = []
    for r in rows(files, ("question_id", "question", "answers", "image_id", "image")):
        question = r["question"]
        if task.ocr:
            question += "\nReference OCR token: " + ", ".join(r.get("ocr_tokens") or [])
        out.append(Sample(str(r["question_id"]), split, _image(cache, str(r["image_id"]), r["image"]), question,
                          list(r["answers"])))
    return out


@READERS.register("scienceqa")
def _scienceqa(task: TaskConfig, files: list[Path], split: str, cache: Path) -> list[Sample]:
    """lmms-lab/ScienceQA, config ScienceQA-IMG: question, choices, answer (index), hint, subject, image; no
    problem id, so a sample's id is its row number."""
    return [scienceqa_sample(str(i), split, _image(cache, str(i), r["image"]), r)
            for i, r in enumerate(rows(files, ("question", "choices", "answer", "hint", "image"))) if r["image"]]


@READERS.register("mme")
def _mme(task: TaskConfig, files: list[Path], split: str, cache: Path) -> list[Sample]:
    """lmms-lab/MME: question_id (`<subtask>/<image>`), question, answer (Yes / No), category (the subtask),
    image; the split's subtasks as in the release's folders."""
    from moebench.eval.metrics import MME_COGNITION, MME_PERCEPTION

    subtasks = {"perception": MME_PERCEPTION, "cognition": MME_COGNITION}[split]
    seen: dict[str, int] = {}
    out = []
    for r in rows(files, ("question_id", "question", "answer", "category", "image")):
        if r["category"] not in subtasks:
            continue
        stem = str(r["question_id"])
        k = seen[stem] = seen.get(stem, -1) + 1  # the image's first or second question
        out.append(Sample(f"{r['category']}/{Path(stem).stem}/{k}", split, _image(cache, stem, r["image"]),
                          r["question"].strip(), str(r["answer"]).strip().lower(), {"subtask": r["category"]}))
    return out


@READERS.register("mmbench")
def _mmbench(task: TaskConfig, files: list[Path], split: str, cache: Path) -> list[Sample]:
    """lmms-lab/MMBench, config en: index, question, hint, A-D, answer, category, image; one sample per
    rotation of the options, as from the official TSV."""
    out = []
    for r in rows(files, ("index", "question", "hint", "A", "B", "answer", "category", "image")):
        out += mmbench_samples(r, split, _image(cache, str(r["index"]), r["image"]))
    return out
