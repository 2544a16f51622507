"""The shapes world's other benchmarks in their official formats and layouts, and the stage-II
conversations that teach them (in the prompts of each task's llava protocol).

- VQAv2 (`vqav2/v2_OpenEnded_mscoco_val2014_questions.json`, `vqav2/v2_mscoco_val2014_annotations.json`):
  GQA-type questions about the held-out images, each with 10 annotator answers. Annotators disagree as
  real ones do: number words for digits, capitals and a trailing period, now and then another answer,
  so VQA accuracy's normalisation and its 10-answer consensus both matter.
- TextVQA (`textvqa/TextVQA_0.5.1_val.json`, images `textvqa/train_images/<image_id>.jpg`): a sign with a
  short upper-case word drawn into a corner of a held-out image; "what is written in the image?" and the
  like; the word as the OCR token, as TextVQA's files carry OCR tokens. Annotators write it in either case.
- ScienceQA (`scienceqa/problems.json`, `scienceqa/pid_splits.json`, images
  `scienceqa/images/test/<pid>/image.png`): which shape is in the image, how many objects there are
  (natural science) and which word names the colour of a shape (language science); 2 to 5 choices,
  answered with a letter; about a third have a hint (context TXT and IMG).
- MME (`MME_Benchmark_release_version/<subtask>/<stem>.png` + `<stem>.txt`): one yes and one no question
  per image. Perception: existence, count, position, color; cognition: numerical_calculation ("are there
  more than k objects?"). MME's other subtasks (posters, celebrities, OCR, code ...) have no counterpart.
- MMBench (`mmbench/mmbench_dev_20230712.tsv`, images base64 PNG): 2 to 4 options, categories
  attribute_recognition (colour of a shape), spatial_relationship (left / right of another object) and
  object_localization (the grid cell a shape is in; no option's text lies inside another's, "top" never
  beside "top left", so MMBench's matcher can map an option's text to its letter); scored circularly.

Training images with signs are written beside the others (`coco/train2014/sign_<stem>.jpg`); the stage-II
file gets `EXTRA_PER_KIND` conversations of each new kind from its own random stream. Their answers: the
word for TextVQA; for ScienceQA the option's text, then its letter ("circle. The answer is B.", which
LLaVA's ScienceQA parser reads); for MMBench the option's text (which MMBench's matching step maps to its
letter); for MME "yes" / "no" in lower case like POPE's items (MME's parser lower-cases). Why not the bare
letter: docs/shapes-world.md, "Teaching the other tasks".
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import shutil
from collections import Counter
from pathlib import Path

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
VQA_PER_IMAGE = 1
TEXTVQA_IMAGES = 200
SCIENCEQA_IMAGES = 300
WORDS = ("CAT", "SUN", "BOX", "RED", "MAP", "OWL", "JAM", "KEY", "ZIP", "FOX", "BUS", "INK", "TOP", "WAX")
TEXT_QUESTIONS = ("what is written in the image?", "what does the sign say?", "what word is on the sign?")
MME_IMAGES = 60  # per subtask: 120 questions each
MME_SUBTASKS = ("existence", "count", "position", "color", "numerical_calculation")
MMBENCH_ITEMS = 150
MMBENCH_CATEGORIES = ("attribute_recognition", "spatial_relationship", "object_localization")
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
EXTRA_PER_KIND = {"textvqa": 1500, "scienceqa": 3000, "mme": 2000, "mmbench": 3000}  # stage-II conversations
YES_NO = " Please answer yes or no."


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


MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
SCIENCE_HINTS = ("The picture shows shapes on a dark background.", "Each object has one color.",
                 "Look at the whole picture before you answer.")


def draw_sign(image, word: str, rng: random.Random) -> None:
    """A white sign with `word` in black in one corner of a PIL image."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    x, y = rng.choice([(1, 1), (image.width - 20, 1), (1, image.height - 12), (image.width - 20, image.height - 12)])
    draw.rectangle([x - 1, y - 1, x + 19, y + 11], fill=(255, 255, 255))
    draw.text((x, y), word, fill=(0, 0, 0))


def write_textvqa(val, out: Path, seed: int) -> int:
    from PIL import Image

    rng = random.Random(f"shapes-{seed}-textvqa")
    folder = out / "textvqa" / "train_images"
    folder.mkdir(parents=True, exist_ok=True)
    data = []
    for s in val[:TEXTVQA_IMAGES]:
        word = rng.choice(WORDS)
        image = Image.open(out / "coco" / "val2014" / s.file_name).convert("RGB")
        draw_sign(image, word, rng)
        image_id = f"shapes{s.image_id:08d}"
        image.save(folder / f"{image_id}.jpg", quality=95)
        answers = [word.lower() if rng.random() < 0.8 else word for _ in range(10)]
        data.append({"question_id": len(data), "image_id": image_id, "question": rng.choice(TEXT_QUESTIONS),
                     "answers": answers, "ocr_tokens": [word], "image_classes": ["text"], "set_name": "val"})
    _dump({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
          out / "textvqa" / "TextVQA_0.5.1_val.json")
    return len(data)


def science_problem(objs, rng: random.Random) -> dict | None:
    """A ScienceQA-style problem about a scene (question, choices, answer index, hint, subject, category),
    or None when the scene cannot support the kind drawn."""
    from moebench.data.shapes import COLORS, SHAPES

    kind, n_choices = rng.choice(("shape", "count", "color")), rng.choice((2, 3, 4, 5))
    shapes = Counter(o.shape for o in objs)
    if kind == "shape":
        right, wrong = rng.choice(sorted(shapes)), [x for x in SHAPES if x not in shapes]
        question, subject, category = "Which shape is in the image?", "natural science", "Identify shapes"
    elif kind == "count":
        right, wrong = str(len(objs)), [str(k) for k in range(1, 8) if k != len(objs)]
        question, subject, category = "How many objects are in the image?", "natural science", "Count objects"
    else:
        unique = [o for o in objs if shapes[o.shape] == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        right, wrong = o.color, [c for c in COLORS if c != o.color]
        question, subject, category = f"Which word names the color of the {o.shape}?", "language science", "Color words"
    choices = [right] + rng.sample(wrong, min(n_choices - 1, len(wrong)))
    rng.shuffle(choices)
    hint = rng.choice(SCIENCE_HINTS) if rng.random() < 0.35 else ""
    return {"question": question, "choices": choices, "answer": choices.index(right), "hint": hint,
            "image": "image.png", "task": "closed choice", "grade": "grade1", "subject": subject, "topic": "shapes",
            "category": category, "skill": category, "lecture": "", "solution": ""}


def mme_pair(subtask: str, objs, rng: random.Random) -> list[tuple[str, str]] | None:
    """MME's two questions about an image, [(question, "Yes"), (question, "No")], or None."""
    from moebench.data.shapes import COLORS, SHAPES, _a, side_pair

    shapes, n = Counter(o.shape for o in objs), len(objs)
    if subtask == "existence":
        yes, no = rng.choice(sorted(shapes)), rng.choice([x for x in SHAPES if x not in shapes])
        pair = (f"Is there {_a(yes)} in this image?", f"Is there {_a(no)} in this image?")
    elif subtask == "count":
        pair = (f"Are there {n} objects in this image?", f"Are there {n + rng.choice((-1, 1))} objects in this image?")
    elif subtask == "position":
        if not (sides := side_pair(objs, rng)):
            return None
        a, b, side = sides
        other = "right" if side == "left" else "left"
        pair = (f"Is the {a} on the {side} of the {b}?", f"Is the {a} on the {other} of the {b}?")
    elif subtask == "color":
        unique = [o for o in objs if shapes[o.shape] == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        wrong = rng.choice([c for c in COLORS if c != o.color])
        pair = (f"Is there {_a(o.color)} {o.shape} in this image?", f"Is there {_a(wrong)} {o.shape} in this image?")
    elif subtask == "numerical_calculation":
        pair = (f"Are there more than {rng.randint(1, n - 1)} objects in this image?",
                f"Are there more than {rng.randint(n, n + 2)} objects in this image?")
    else:
        raise ValueError(subtask)
    return [(pair[0] + YES_NO, "Yes"), (pair[1] + YES_NO, "No")]


def _cell(o, size: int) -> str:
    return CELLS[3 * min(2, int(3 * o.cy / size)) + min(2, int(3 * o.cx / size))]


def mmbench_item(objs, rng: random.Random, size: int) -> dict | None:
    """An MMBench-style item (question, options with the answer first, hint, category), or None."""
    from moebench.data.shapes import COLORS, side_pair

    category, n_options = rng.choice(MMBENCH_CATEGORIES), rng.choice((2, 3, 4))
    shapes = Counter(o.shape for o in objs)
    unique = [o for o in objs if shapes[o.shape] == 1]
    if category == "attribute_recognition":
        if not unique:
            return None
        o = rng.choice(unique)
        question, right, wrong = f"What color is the {o.shape}?", o.color, [c for c in COLORS if c != o.color]
    elif category == "spatial_relationship":
        if not (sides := side_pair(objs, rng)):
            return None
        a, b, right = sides
        question, n_options, wrong = f"On which side of the {b} is the {a}?", 2, ["right" if right == "left" else "left"]
    else:
        if not unique:
            return None
        o = rng.choice(unique)
        question, right = f"Where is the {o.shape} in the image?", _cell(o, size)
        wrong = [c for c in CELLS if c != right]
    # no option inside another ("top" in "top left"): MMBench's matcher maps an answer to the one option
    # whose text it contains
    options = [right]
    for w in rng.sample(wrong, len(wrong)):
        if len(options) < n_options and not any(w in o or o in w for o in options):
            options.append(w)
    hint = f"There are {len(objs)} objects in the image." if rng.random() < 0.3 else ""
    return {"question": question, "options": options, "hint": hint, "category": category}


def write_scienceqa(val, out: Path, seed: int) -> int:
    rng = random.Random(f"shapes-{seed}-scienceqa")
    problems, pids = {}, []
    for s in val[-SCIENCEQA_IMAGES:]:
        problem = None
        while problem is None:
            problem = science_problem(s.objects, rng)
        pid = str(s.image_id)
        folder = out / "scienceqa" / "images" / "test" / pid
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "coco" / "val2014" / s.file_name, folder / "image.png")
        problems[pid] = {**problem, "split": "test"}
        pids.append(pid)
    _dump(problems, out / "scienceqa" / "problems.json")
    _dump({"train": [], "val": [], "test": pids, "minival": [], "minitest": []}, out / "scienceqa" / "pid_splits.json")
    return len(problems)


def write_mme(val, out: Path, seed: int) -> int:
    """MME's release layout: per subtask folder, each image beside its two-line question file."""
    rng = random.Random(f"shapes-{seed}-mme")
    base, count = out / "MME_Benchmark_release_version", 0
    for sub in MME_SUBTASKS:
        folder = base / sub
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        for s in rng.sample(list(val), len(val)):
            pair = mme_pair(sub, s.objects, rng)
            if pair is None:
                continue
            shutil.copyfile(out / "coco" / "val2014" / s.file_name, folder / s.file_name)
            (folder / f"{s.stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair))
            written, count = written + 1, count + 2
            if written == MME_IMAGES:
                break
    return count


def write_mmbench(val, out: Path, seed: int, size: int) -> int:
    """MMBench's dev TSV: index, question, hint, A-D, answer, category, l2-category, image (base64)."""
    rng = random.Random(f"shapes-{seed}-mmbench")
    rows = []
    for s in rng.sample(list(val), len(val)):
        item = mmbench_item(s.objects, rng, size)
        if item is None:
            continue
        options = item["options"][:]
        rng.shuffle(options)
        letters = "ABCD"[: len(options)]
        image = base64.b64encode((out / "coco" / "val2014" / s.file_name).read_bytes()).decode()
        rows.append({"index": len(rows), "question": item["question"], "hint": item["hint"] or "nan",
                     **{k: options[i] if i < len(options) else "nan" for i, k in enumerate("ABCD")},
                     "answer": letters[options.index(item["options"][0])], "category": item["category"],
                     "l2-category": "perception", "split": "dev", "image": image})
        if len(rows) == MMBENCH_ITEMS:
            break
    path = out / "mmbench" / "mmbench_dev_20230712.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buf.getvalue())
    return len(rows)


def choice_answer(choices: list[str], answer: int) -> str:
    """How stage II answers a ScienceQA question: the option's text, then its letter in the sentence LLaVA's
    ScienceQA parser reads ("circle. The answer is B.")."""
    return f"{choices[answer]}. The answer is {'ABCDE'[answer]}."


def instruct_extra(train, out: Path, seed: int, size: int) -> list[dict]:
    """Stage-II conversations for TextVQA, ScienceQA, MME and MMBench on training images, one question
    each, prompted exactly as their tasks' llava protocol asks (moebench.eval.tasks builds those prompts)."""
    from PIL import Image

    from moebench.data.shapes import SUFFIX
    from moebench.eval.tasks import mmbench_prompt, scienceqa_prompt

    rng = random.Random(f"shapes-{seed}-extra")
    convs = []

    def add(scene, image: str, question: str, answer: str) -> None:
        convs.append({"id": f"{scene.stem}-x{len(convs)}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})

    for s in train[: EXTRA_PER_KIND["textvqa"]]:
        word, name = rng.choice(WORDS), f"sign_{s.stem}.jpg"
        image = Image.open(out / "coco" / "train2014" / s.file_name).convert("RGB")
        draw_sign(image, word, rng)
        image.save(out / "coco" / "train2014" / name, quality=95)
        add(s, name, f"{rng.choice(TEXT_QUESTIONS)}\nReference OCR token: {word}{SUFFIX}", word.lower())
    for kind in ("scienceqa", "mme", "mmbench"):
        made = 0
        while train and made < EXTRA_PER_KIND[kind]:
            s = train[rng.randrange(len(train))]
            if kind == "scienceqa" and (p := science_problem(s.objects, rng)):
                add(s, s.file_name, scienceqa_prompt(p) + MC_SUFFIX, choice_answer(p["choices"], p["answer"]))
                made += 1
            elif kind == "mme" and (pair := mme_pair(rng.choice(MME_SUBTASKS), s.objects, rng)):
                for question, answer in pair:  # in lower case, as POPE's items: MME's parser lower-cases
                    add(s, s.file_name, question, answer.lower())
                made += 2
            elif kind == "mmbench" and (item := mmbench_item(s.objects, rng, size)):
                options = item["options"][:]
                rng.shuffle(options)
                shown = dict(zip("ABCD", options))
                add(s, s.file_name, mmbench_prompt(item["question"], item["hint"], shown) + MC_SUFFIX,
                    item["options"][0])
                made += 1
    return convs


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
