"""The shapes world's VQAv2, TextVQA and ScienceQA-IMG files, in the official formats and layouts.

- VQAv2 (`vqav2/v2_OpenEnded_mscoco_val2014_questions.json`, `vqav2/v2_mscoco_val2014_annotations.json`):
  GQA-type questions about the held-out images, each with 10 annotator answers. Annotators disagree as
  real ones do: number words for digits, capitals and a trailing period, now and then another answer,
  so VQA accuracy's normalisation and its 10-answer consensus both matter.
- TextVQA (`textvqa/TextVQA_0.5.1_val.json`, images `textvqa/train_images/<image_id>.jpg`): a short
  upper-case word drawn into a corner of a held-out image; "what is written in the image?"; the word as
  the OCR token, as TextVQA's files carry OCR tokens.
- ScienceQA (`scienceqa/problems.json`, `scienceqa/pid_splits.json`, images
  `scienceqa/images/test/<pid>/image.png`): multiple choice "which shape is in the image?" with one
  present and two or three absent shapes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
VQA_PER_IMAGE = 1
TEXTVQA_IMAGES = 200
SCIENCEQA_IMAGES = 300
WORDS = ("CAT", "SUN", "BOX", "RED", "MAP", "OWL", "JAM", "KEY", "ZIP", "FOX", "BUS", "INK", "TOP", "WAX")


def _annotators(answer: str, kind: str, rng: random.Random, others: list[str]) -> list[str]:
    """10 answers: mostly the canonical one, some written differently, sometimes a different answer."""
    out = []
    for _ in range(10):
        r = rng.random()
        if r < 0.15 and kind == "count":
            out.append(NUMBER_WORDS[int(answer)])
        elif r < 0.25:
            out.append(answer.capitalize() + ".")
        elif r < 0.32 and others:
            out.append(rng.choice(others))
        else:
            out.append(answer)
    return out


def write_vqav2(val, out: Path, seed: int) -> int:
    from moebench.data.shapes import COLORS, KINDS, SHAPES, ask

    rng = random.Random(f"shapes-{seed}-vqav2")
    questions, annotations = [], []
    for s in val:
        for k in range(VQA_PER_IMAGE):
            kind = rng.choice(KINDS)
            q = ask(kind, s.objects, rng, yes=rng.random() < 0.5)
            if q is None:
                continue
            qid = s.image_id * 10 + k
            others = {"existence": ["yes", "no"], "color": list(COLORS), "shape": list(SHAPES),
                      "count": [str(n) for n in range(2, 6)], "relation": ["left", "right"]}[kind]
            others = [o for o in others if o != q["answer"]]
            answers = _annotators(q["answer"], kind, rng, others)
            questions.append({"image_id": s.image_id, "question": q["question"], "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": s.image_id, "multiple_choice_answer": q["answer"],
                "answer_type": {"existence": "yes/no", "count": "number"}.get(kind, "other"),
                "question_type": " ".join(q["question"].split()[:2]).lower(),
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]})
    _dump({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014",
           "questions": questions}, out / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json")
    _dump({"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "annotations": annotations},
          out / "vqav2" / "v2_mscoco_val2014_annotations.json")
    return len(questions)


def write_textvqa(val, out: Path, seed: int) -> int:
    from PIL import Image, ImageDraw

    rng = random.Random(f"shapes-{seed}-textvqa")
    folder = out / "textvqa" / "train_images"
    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for s in val[:TEXTVQA_IMAGES]:
        word = rng.choice(WORDS)
        image = Image.open(out / "coco" / "val2014" / s.file_name).convert("RGB")
        draw = ImageDraw.Draw(image)
        x, y = rng.choice([(1, 1), (image.width - 20, 1), (1, image.height - 12), (image.width - 20, image.height - 12)])
        draw.rectangle([x - 1, y - 1, x + 19, y + 11], fill=(255, 255, 255))
        draw.text((x, y), word, fill=(0, 0, 0))
        image_id = f"shapes{s.image_id:08d}"
        image.save(folder / f"{image_id}.jpg", quality=95)
        answers = [word.lower() if rng.random() < 0.8 else word for _ in range(10)]
        data.append({"question_id": len(data), "image_id": image_id, "question": "what is written in the image?",
                     "answers": answers, "ocr_tokens": [word], "image_classes": ["text"], "set_name": "val"})
    _dump({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
          out / "textvqa" / "TextVQA_0.5.1_val.json")
    return len(data)


def write_scienceqa(val, out: Path, seed: int) -> int:
    from moebench.data.shapes import SHAPES

    rng = random.Random(f"shapes-{seed}-scienceqa")
    problems, pids = {}, []
    for s in val[-SCIENCEQA_IMAGES:]:
        present = sorted({o.shape for o in s.objects})
        absent = [x for x in SHAPES if x not in present]
        choices = [rng.choice(present)] + rng.sample(absent, rng.choice([2, 3]))
        rng.shuffle(choices)
        answer = next(i for i, c in enumerate(choices) if c in present)
        pid = str(s.image_id)
        folder = out / "scienceqa" / "images" / "test" / pid
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "coco" / "val2014" / s.file_name, folder / "image.png")
        problems[pid] = {"question": "Which shape is in the image?", "choices": choices, "answer": answer,
                         "hint": "", "image": "image.png", "task": "closed choice", "grade": "grade1",
                         "subject": "natural science", "topic": "shapes", "category": "Identify shapes",
                         "skill": "Identify shapes", "lecture": "", "solution": "", "split": "test"}
        pids.append(pid)
    _dump(problems, out / "scienceqa" / "problems.json")
    _dump({"train": [], "val": [], "test": pids, "minival": [], "minitest": []}, out / "scienceqa" / "pid_splits.json")
    return len(problems)


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
