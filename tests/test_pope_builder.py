"""POPE builder (Li et al. 2023) on a hand-made COCO file, the official files, and the shapes world."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from moebench.data import pope, shapes
from moebench.errors import MissingFile, UserError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools x numpy 2
OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pope"
CATS = ["person", "dog", "cat", "car", "bus", "apple", "umbrella", "kite"]  # apple is never annotated
# (image id, category) in file order: interleaved across images, with repeats inside an image
ANNS = [(1, "person"), (2, "dog"), (1, "dog"), (1, "person"), (3, "car"), (2, "cat"), (1, "car"),
        (3, "bus"), (1, "cat"), (2, "person"), (3, "person"), (4, "person"), (4, "car"), (5, "kite"),
        (5, "person"), (6, "cat"), (5, "dog"), (5, "umbrella"), (4, "person")]
OBJECTS = {1: ["person", "dog", "car", "cat"], 2: ["dog", "cat", "person"], 3: ["car", "bus", "person"],
           4: ["person", "car"], 5: ["kite", "person", "dog", "umbrella"], 6: ["cat"]}
ELIGIBLE = [1, 2, 3, 5]
# images containing each name: person 5, then car / cat / dog 3 (ties by name), then bus / kite / umbrella 1
POPULAR = ["person", "car", "cat", "dog", "bus", "kite", "umbrella"]


@pytest.fixture
def coco_file(tmp_path):
    data = {
        "images": [{"id": i, "file_name": f"img_{i}.jpg", "width": 10, "height": 10} for i in OBJECTS],
        "categories": [{"id": k + 1, "name": n, "supercategory": "x"} for k, n in enumerate(CATS)],
        "annotations": [{"id": 100 - k, "image_id": i, "category_id": CATS.index(n) + 1, "bbox": [0, 0, 1, 1],
                         "area": 1, "iscrowd": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]}
                        for k, (i, n) in enumerate(ANNS)],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def co_occurrence():
    co = {n: Counter() for n in POPULAR}
    for objs in OBJECTS.values():
        for a in objs:
            co[a].update(b for b in objs if b != a)
    return co


def name_of(record):
    match = re.fullmatch(r"Is there an? (.+) in the image\?", record["text"])
    assert match, record
    return match.group(1)


def by_image(records):
    groups = {}
    for r in records:
        groups.setdefault(r["image"], []).append(r)
    return groups


def check_pope_shape(records, n_images, num_pos=3):
    """The shape of an official POPE file: n images x 2*num_pos questions, yes / no alternating."""
    assert [r["question_id"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) == n_images * 2 * num_pos
    groups = by_image(records)
    assert len(groups) == n_images
    for rows in groups.values():
        assert [r["label"] for r in rows] == ["yes", "no"] * num_pos
        assert len({name_of(r) for r in rows}) == 2 * num_pos
    # each image's questions are consecutive
    images = [r["image"] for r in records]
    assert images == [img for img in groups for _ in range(2 * num_pos)]
    labels = Counter(r["label"] for r in records)
    assert labels["yes"] == labels["no"] == n_images * num_pos


def test_build_pope_on_hand_made_coco(coco_file):
    splits = pope.build_pope(coco_file, num_images=4, seed=0)
    assert list(splits) == ["random", "popular", "adversarial"]
    images = {f"img_{i}.jpg": i for i in ELIGIBLE}
    for split, records in splits.items():
        check_pope_shape(records, 4)
        assert set(by_image(records)) == set(images)
        for image, rows in by_image(records).items():
            objs = OBJECTS[images[image]]
            assert [name_of(r) for r in rows[0::2]] == objs[:3]  # positives: first three, in annotation order
            for r in rows[1::2]:
                assert name_of(r) not in objs and name_of(r) in POPULAR  # never present, never unseen "apple"
    # same images, same order, same positives in all three splits
    positives = {s: [(r["image"], r["text"]) for r in rs if r["label"] == "yes"] for s, rs in splits.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]


def test_popular_negatives_follow_frequency(coco_file):
    records = pope.build_pope(coco_file, num_images=4, seed=3)["popular"]
    for image, rows in by_image(records).items():
        objs = OBJECTS[int(image[4:-4])]
        expected = [n for n in POPULAR if n not in objs][:3]
        assert [name_of(r) for r in rows[1::2]] == expected
    assert [name_of(r) for r in by_image(records)["img_3.jpg"][1::2]] == ["cat", "dog", "kite"]


def test_adversarial_negative_is_most_co_occurring_absent(coco_file):
    co = co_occurrence()
    records = pope.build_pope(coco_file, num_images=4, seed=1)["adversarial"]
    for image, rows in by_image(records).items():
        asked = set(OBJECTS[int(image[4:-4])])
        for pos_row, neg_row in zip(rows[0::2], rows[1::2]):
            pos, neg = name_of(pos_row), name_of(neg_row)
            ranking = sorted(co[pos], key=lambda m: (-co[pos][m], m))
            candidates = [m for m in ranking if m not in asked]
            if candidates:
                assert neg == candidates[0], (image, pos)
            asked.add(neg)
    # img_1 = person, dog, car, cat: person -> bus; dog -> kite (tie with umbrella, by name);
    # car co-occurs only with person, dog, cat, bus: exhausted, so random among what is left -> umbrella
    assert [name_of(r) for r in by_image(records)["img_1.jpg"][1::2]] == ["bus", "kite", "umbrella"]


def test_seed_and_errors(coco_file):
    from pycocotools.coco import COCO

    a = pope.build_pope(coco_file, num_images=3, seed=0)
    assert a == pope.build_pope(COCO(str(coco_file)), num_images=3, seed=0)  # path or COCO object
    assert len(by_image(a["random"])) == 3
    with pytest.raises(UserError, match=r"POPE needs 5 images .* only 4 of 6"):
        pope.build_pope(coco_file, num_images=5)
    with pytest.raises(MissingFile):
        pope.build_pope(coco_file.parent / "nope.json")


def test_article_follows_the_official_files():
    assert pope.question_text("apple") == "Is there an apple in the image?"
    assert pope.question_text("skis") == "Is there a skis in the image?"


def test_write_read_roundtrip(coco_file, tmp_path):
    records = pope.build_pope(coco_file, num_images=4)["random"]
    path = tmp_path / "out" / "coco_pope_random.json"
    pope.write_pope_jsonl(records, path)
    assert pope.read_pope_jsonl(path) == records
    assert path.read_text().splitlines()[0].startswith('{"question_id": 1, "image": "img_')
    assert [p.name for p in path.parent.iterdir()] == ["coco_pope_random.json"]  # no temp files left
    path.write_text('{"question_id": 1, "image": "x.jpg", "text": "Is there a cat?", "label": "maybe"}\n')
    with pytest.raises(UserError, match=":1: label"):
        pope.read_pope_jsonl(path)
    with pytest.raises(MissingFile):
        pope.read_pope_jsonl(tmp_path / "missing.json")


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="official POPE files not present")
def test_official_files_have_the_pope_shape():
    splits = {s: pope.read_pope_jsonl(OFFICIAL / f"coco_pope_{s}.json") for s in pope.SPLITS}
    for records in splits.values():
        assert len(records) == 3000
        check_pope_shape(records, 500)
    positives = {s: [(r["image"], r["text"]) for r in rs if r["label"] == "yes"] for s, rs in splits.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]


def test_shapes_world_pope_has_the_official_shape(tmp_path):
    root = shapes.ensure_world(shapes.WorldSpec(n_train=4, n_val=1000), root=tmp_path / "w", progress=False)
    splits = {s: pope.read_pope_jsonl(root / "pope" / f"coco_pope_{s}.json") for s in pope.SPLITS}
    for records in splits.values():
        assert len(records) == 3000
        check_pope_shape(records, 500)
        assert {name_of(r) for r in records} <= set(shapes.SHAPES)
        assert all(r["image"].startswith("shapes_val_") for r in records)
    positives = {s: [(r["image"], r["text"]) for r in rs if r["label"] == "yes"] for s, rs in splits.items()}
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    # the files are what build_pope makes from the world's val annotations
    built = pope.build_pope(root / "annotations" / "instances_val2014.json", num_images=500, seed=0)
    assert built == splits
