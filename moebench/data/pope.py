"""POPE question builder and reader.

POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP;
https://github.com/RUCAIBox/POPE, `main.py` + `utils.py:pope`) polls a model with
"Is there a/an X in the image?" questions built from object annotations:

1. The ground-truth objects of an image are its annotated category names, in annotation order,
   without repeats. Images with at least `num_pos` (3) objects are eligible; 500 are sampled.
2. Positives are the first `num_pos` objects. Each positive is followed by one negative, an object
   that is not in the image and not asked about before for that image, chosen by the split:
   random      - uniform over all objects seen in the annotations,
   popular     - the most frequent objects first (frequency = number of images containing it),
   adversarial - the objects that co-occur most often with that positive first;
   when a ranking is exhausted the negative is drawn at random, as the original does.
3. Questions per image: pos1, neg1, pos2, neg2, pos3, neg3. The three splits share images and
   positives. Files are JSON lines {question_id, image, text, label}, question ids 1-based per split.

Two deliberate differences from the original script: frequencies and co-occurrences are counted over
the whole annotation file (the original counts them over the 500 sampled images), and ties in a
ranking are broken by name (the original keeps dict insertion order). The article follows the
official files: "an" before a vowel, else "a".
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections import Counter
from pathlib import Path

from moebench.errors import MissingFile, UserError

SPLITS = ("random", "popular", "adversarial")
LABELS = ("yes", "no")
FIELDS = ("question_id", "image", "text", "label")


def question_text(name: str) -> str:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {name} in the image?"


def load_coco(source):
    """A `pycocotools.coco.COCO` from a path (or the object itself), without its chatter on stdout."""
    from pycocotools.coco import COCO

    if isinstance(source, COCO):
        return source
    path = Path(source)
    if not path.is_file():
        raise MissingFile(path, "COCO instances file",
                          "download annotations_trainval2014.zip from https://cocodataset.org and "
                          "pass annotations/instances_val2014.json")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise UserError(f"{path} is not a COCO instances file: {e!r}") from e


def ground_truth_objects(coco) -> dict[int, list[str]]:
    """{image id: category names in annotation (file) order, first occurrence kept}."""
    names = {c["id"]: c["name"] for c in coco.dataset.get("categories", [])}
    objects: dict[int, list[str]] = {image_id: [] for image_id in coco.imgs}
    for ann in coco.dataset.get("annotations", []):
        seen = objects[ann["image_id"]]
        if names[ann["category_id"]] not in seen:
            seen.append(names[ann["category_id"]])
    return objects


def build_pope(coco, num_images: int = 500, num_pos: int = 3, seed: int = 0) -> dict[str, list[dict]]:
    """The three POPE splits {"random", "popular", "adversarial"} built from a COCO instances file."""
    coco = load_coco(coco)
    objects = ground_truth_objects(coco)
    eligible = sorted(i for i, objs in objects.items() if len(objs) >= num_pos)
    if len(eligible) < num_images:
        raise UserError(f"POPE needs {num_images} images with >= {num_pos} object categories, "
                        f"but only {len(eligible)} of {len(objects)} images have them")
    rng = random.Random(seed)
    chosen = rng.sample(eligible, num_images)

    # frequency = images containing the object; co-occurrence = images containing both
    frequency = Counter(name for objs in objects.values() for name in objs)
    co_occur: dict[str, Counter] = {name: Counter() for name in frequency}
    for objs in objects.values():
        for name in objs:
            co_occur[name].update(other for other in objs if other != name)
    vocab = sorted(frequency)
    popular = sorted(vocab, key=lambda n: (-frequency[n], n))
    adversarial = {n: sorted(co_occur[n], key=lambda m: (-co_occur[n][m], m)) for n in vocab}

    for image_id in chosen:
        if len(vocab) - len(objects[image_id]) < num_pos:
            raise UserError(f"image {coco.imgs[image_id]['file_name']} contains "
                            f"{len(objects[image_id])} of the {len(vocab)} object categories: "
                            f"too few are left for {num_pos} negatives")

    splits = {}
    for split in SPLITS:
        records = []
        for image_id in chosen:
            image, objs = coco.imgs[image_id]["file_name"], objects[image_id]
            asked = set(objs)  # negatives are never in the image nor repeated
            for pos in objs[:num_pos]:
                ranking = {"random": [], "popular": popular, "adversarial": adversarial[pos]}[split]
                neg = next((n for n in ranking if n not in asked), None)
                while neg is None or neg in asked:
                    neg = rng.choice(vocab)
                asked.add(neg)
                for name, label in ((pos, "yes"), (neg, "no")):
                    records.append({"question_id": len(records) + 1, "image": image,
                                    "text": question_text(name), "label": label})
        splits[split] = records
    return splits


def write_pope_jsonl(records: list[dict], path) -> None:
    """Write records as JSON lines, atomically (temp file in the same folder, then rename)."""
    from moebench.results import write_text_atomic

    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def read_pope_jsonl(path) -> list[dict]:
    """Read a POPE question file (official or built); each line must hold the four POPE fields."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "POPE question file",
                          "get coco_pope_{random,popular,adversarial}.json from "
                          "https://github.com/RUCAIBox/POPE (output/coco) or build them with build_pope")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not JSON ({e.msg})") from e
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise UserError(f"{path}:{lineno}: POPE record lacks {', '.join(missing)}")
        if record["label"] not in LABELS:
            raise UserError(f"{path}:{lineno}: label {record['label']!r} is not 'yes' or 'no'")
        records.append(record)
    return records
