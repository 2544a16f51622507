"""The embedded shapes world: determinism, real file formats, agreement between files, atomic creation."""

import json
import re
import shutil
import threading
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from moebench.data import shapes
from moebench.errors import MissingFile, UserError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools x numpy 2
SMALL = shapes.WorldSpec(n_train=40, n_val=60, pope_images=20)
ONE_WORD = re.compile(r"[a-z0-9]+")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shapes.ensure_world(SMALL, root=tmp_path_factory.mktemp("cache") / "world", progress=False)


def load(path):
    return json.loads(path.read_text())


def coco(world, split):
    from pycocotools.coco import COCO

    return COCO(str(world / "annotations" / f"instances_{split}2014.json"))


def test_default_cache_dir_honours_moebench_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path))
    assert shapes.default_cache_dir() == tmp_path / "shapes" / f"v{shapes.WORLD_VERSION}-seed0-48px-grid3-6000-1000"
    spec = shapes.WorldSpec(seed=3, n_train=2, n_val=8, pope_images=1)
    assert shapes.default_cache_dir(spec) == tmp_path / "shapes" / f"v{shapes.WORLD_VERSION}-seed3-48px-grid3-2-8"
    assert shapes.ensure_world(spec, progress=False) == shapes.default_cache_dir(spec)
    assert (shapes.default_cache_dir(spec) / "manifest.json").is_file()


def test_manifest(world):
    manifest = load(world / "manifest.json")
    assert manifest["world"] == "shapes" and manifest["version"] == shapes.WORLD_VERSION
    assert manifest["spec"]["n_val"] == 60 and manifest["counts"]["val_images"] == 60
    assert shapes.world_hash(world) == manifest["hash"] and len(manifest["hash"]) == 64
    with pytest.raises(MissingFile):
        shapes.world_hash(world / "nowhere")


def test_deterministic_from_seed(world, tmp_path):
    again = shapes.ensure_world(SMALL, root=tmp_path / "again", progress=False)
    assert shapes.world_hash(again) == shapes.world_hash(world)
    for rel in ("coco/val2014/shapes_val_000007.png", "annotations/instances_train2014.json", "manifest.json"):
        assert (again / rel).read_bytes() == (world / rel).read_bytes()
    other = shapes.ensure_world(shapes.WorldSpec(seed=1, n_train=40, n_val=60, pope_images=20),
                                root=tmp_path / "other", progress=False)
    assert shapes.world_hash(other) != shapes.world_hash(world)


def test_coco_masks_agree_with_label_maps_and_pixels(world):
    for split in ("train", "val"):
        api = coco(world, split)
        assert [c["name"] for c in api.loadCats(api.getCatIds())] == list(shapes.SHAPES)
        for image_id in sorted(api.getImgIds())[:8]:
            info = api.imgs[image_id]
            pixels = np.asarray(Image.open(world / "coco" / f"{split}2014" / info["file_name"]))
            labels = np.asarray(Image.open(world / "seg" / f"{split}2014" / info["file_name"]))
            side = SMALL.image_size
            assert pixels.shape == (side, side, 3) and labels.dtype == np.uint8
            expected = np.zeros((side, side), np.uint8)
            anns = api.loadAnns(api.getAnnIds(imgIds=image_id))
            assert 2 <= len(anns) <= 5
            for ann in anns:
                mask = api.annToMask(ann).astype(bool)
                assert mask.sum() == ann["area"] > 0 and not expected[mask].any()  # no overlaps
                expected[mask] = ann["category_id"]
                assert (pixels[mask] == shapes.COLORS[ann["color"]]).all()
                assert ann["size"] in shapes.SIZES and ann["iscrowd"] == 0
            assert (labels == expected).all()
            assert (pixels[expected == 0] == shapes.BACKGROUND).all()
            cell = SMALL.image_size / SMALL.grid  # every object sits inside its own grid cell (= one 16 px patch)
            cells = [(int(x // cell), int(y // cell), int((x + w - 1e-6) // cell), int((y + h - 1e-6) // cell))
                     for x, y, w, h in (a["bbox"] for a in anns)]
            assert all(c[0] == c[2] and c[1] == c[3] for c in cells)
            assert len({c[:2] for c in cells}) == len(cells)


def test_train_and_val_are_disjoint(world):
    train, val = load(world / "annotations/instances_train2014.json"), load(world / "annotations/instances_val2014.json")
    assert not {i["file_name"] for i in train["images"]} & {i["file_name"] for i in val["images"]}
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    assert not {a["id"] for a in train["annotations"]} & {a["id"] for a in val["annotations"]}
    first = (world / "coco/train2014/shapes_train_000000.png").read_bytes()
    assert first != (world / "coco/val2014/shapes_val_000000.png").read_bytes()  # independent draws


def test_classification_labels_name_the_largest_object(world):
    api = coco(world, "val")
    labels = load(world / "cls" / "val2014.json")
    assert len(labels) == 60
    for image_id, info in api.imgs.items():
        largest = max(api.loadAnns(api.getAnnIds(imgIds=image_id)), key=lambda a: a["area"])
        assert labels[info["file_name"]] == shapes.SHAPES[largest["category_id"] - 1]


def test_llava_captions(world):
    api = coco(world, "train")
    by_name = {info["file_name"]: image_id for image_id, info in api.imgs.items()}
    data = load(world / "llava" / "shapes_caption_train2014.json")
    assert len(data) == 40
    for item in data:
        assert set(item) == {"id", "image", "conversations"}
        human, gpt = item["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"][8:] in shapes.CAPTION_PROMPTS
        anns = sorted(api.loadAnns(api.getAnnIds(imgIds=by_name[item["image"]])),
                      key=lambda a: a["bbox"][0] + a["bbox"][2] / 2)
        parts = [f"a {a['size']} {a['color']} {shapes.SHAPES[a['category_id'] - 1]}" for a in anns]  # left to right
        assert gpt["value"] == ", ".join(parts[:-1]) + " and " + parts[-1] + "."
    assert shapes.caption([shapes.Obj("bar", "green", "small", 30, 5, 10), shapes.Obj("star", "orange", "large", 9, 5, 17)]) \
        == "a large orange star and a small green bar."


def test_llava_instruct(world):
    """Stage II: one question per conversation, several per image, and the POPE-style existence questions
    answered truthfully by the COCO annotations."""
    api = coco(world, "train")
    by_name = {info["file_name"]: image_id for image_id, info in api.imgs.items()}
    data = [item for item in load(world / "llava" / "shapes_instruct_train2014.json") if "-x" not in item["id"]]
    per_image = Counter(item["image"] for item in data)
    assert set(per_image) == set(by_name) and len({item["id"] for item in data}) == len(data)
    assert all(shapes.EXIST_PER_IMAGE <= n <= shapes.QA_PER_IMAGE + shapes.EXIST_PER_IMAGE for n in per_image.values())
    existence = {name: Counter() for name in by_name}
    for item in data:
        human, gpt = item["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert human["value"].endswith(shapes.SUFFIX) and ONE_WORD.fullmatch(gpt["value"]), item
        m = re.fullmatch(r"<image>\nIs there an? (\w+) in the image\?", human["value"][: -len(shapes.SUFFIX)])
        if m and m[1] in shapes.SHAPES:
            anns = api.loadAnns(api.getAnnIds(imgIds=by_name[item["image"]]))
            present = {shapes.SHAPES[a["category_id"] - 1] for a in anns}
            assert gpt["value"] == ("yes" if m[1] in present else "no"), item
            existence[item["image"]][gpt["value"]] += 1
    for name, counts in existence.items():
        distinct = len({a["category_id"] for a in api.loadAnns(api.getAnnIds(imgIds=by_name[name]))})
        assert counts["no"] >= 2 and counts["yes"] >= min(2, distinct), (name, counts)


def test_gqa_questions(world):
    questions = load(world / "gqa" / "testdev_balanced_questions.json")
    stems = {f"shapes_val_{i:06d}" for i in range(60)}
    assert 55 <= len(questions) <= 60 * shapes.GQA_PER_IMAGE
    kinds = Counter(q["types"]["detailed"] for q in questions.values())
    assert set(kinds) == set(shapes.KINDS) and max(kinds.values()) - min(kinds.values()) <= 2
    for q in questions.values():
        assert q["imageId"] in stems and (world / "gqa" / "images" / f"{q['imageId']}.png").is_file()
        assert ONE_WORD.fullmatch(q["answer"]) and q["isBalanced"] is True
        assert q["types"]["structural"] in {"verify", "query", "choose", "logical", "compare"}
        assert not q["question"].endswith(shapes.SUFFIX) and q["fullAnswer"].endswith(".")
    existence = Counter(q["answer"] for q in questions.values() if q["types"]["detailed"] == "existence")
    assert set(existence) == {"yes", "no"} and abs(existence["yes"] - existence["no"]) <= 1
    relation = {q["answer"] for q in questions.values() if q["types"]["detailed"] == "relation"}
    assert relation <= {"left", "right"}
    linked = world / "gqa" / "images" / "shapes_val_000000.png"
    assert linked.read_bytes() == (world / "coco" / "val2014" / "shapes_val_000000.png").read_bytes()


def test_gqa_answers_are_true(world):
    """Every answer checked against the COCO annotations (relation answers against the scene graph)."""
    api, graphs = coco(world, "val"), load(world / "gqa" / "val_sceneGraphs.json")
    objs = {info["file_name"][:-4]: [(a["color"], shapes.SHAPES[a["category_id"] - 1], a["bbox"][0] + a["bbox"][2] / 2)
                                     for a in api.loadAnns(api.getAnnIds(imgIds=i))] for i, info in api.imgs.items()}
    for q in load(world / "gqa" / "testdev_balanced_questions.json").values():
        scene, text, answer = objs[q["imageId"]], q["question"], q["answer"]
        if m := re.fullmatch(r"Is there an? (?:(\w+) )?(\w+) in the image\?", text):
            color, shape = m.groups()
            assert answer == ("yes" if any(s == shape and color in (None, c) for c, s, _ in scene) else "no")
        elif m := re.fullmatch(r"What color is the (\w+)\?", text):
            assert [c for c, s, _ in scene if s == m.group(1)] == [answer]
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", text):
            assert [s for c, s, _ in scene if c == m.group(1)] == [answer]
        elif m := re.fullmatch(r"How many (?:(\w+) )?objects are there\?", text):
            assert int(answer) == sum(m.group(1) in (None, c) for c, _, _ in scene)
        else:
            m = re.fullmatch(r"Is the (.+) to the left or to the right of the (.+)\?", text)
            assert m, text
            (xa,), (xb,) = ([x for c, s, x in scene if name in (s, f"{c} {s}")] for name in m.groups())
            assert answer == ("left" if xa < xb else "right")
    graph = graphs["shapes_val_000000"]
    assert graph["width"] == graph["height"] == SMALL.image_size and len(graph["objects"]) == len(objs["shapes_val_000000"])
    for obj in graph["objects"].values():
        assert obj["name"] in shapes.SHAPES and obj["attributes"][0] in shapes.COLORS
        assert {r["name"] for r in obj["relations"]} <= {"to the left of", "to the right of"}
        assert all(r["object"] in graph["objects"] for r in obj["relations"])


def test_existing_world_is_reused(world, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("regenerated")

    monkeypatch.setattr(shapes, "_generate", boom)
    assert shapes.ensure_world(SMALL, root=world, progress=False) == world


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def fail(spec, out, progress):
        (out / "half-written").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(shapes, "_generate", fail)
    with pytest.raises(RuntimeError):
        shapes.ensure_world(SMALL, root=tmp_path / "w", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_generators_and_stale_worlds(tmp_path, world):
    root, errors = tmp_path / "w", []

    def make():
        try:
            shapes.ensure_world(SMALL, root=root, progress=False)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert shapes.world_hash(root) == shapes.world_hash(world)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp folders left behind
    # a world made from another spec is replaced
    other = shapes.WorldSpec(seed=5, n_train=4, n_val=8, pope_images=2)
    shapes.ensure_world(other, root=root, progress=False)
    assert load(root / "manifest.json")["spec"]["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_losing_the_race_keeps_the_winners_world(tmp_path, world, monkeypatch):
    root, generate = tmp_path / "w", shapes._generate

    def racing(spec, out, progress):
        counts = generate(spec, out, progress)
        shutil.copytree(world, root)  # another process installs the same world while we finish
        return counts

    monkeypatch.setattr(shapes, "_generate", racing)
    assert shapes.ensure_world(SMALL, root=root, progress=False) == root
    assert shapes.world_hash(root) == shapes.world_hash(world)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_refuses_to_replace_a_folder_that_is_not_a_world(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a shapes world"):
        shapes.ensure_world(SMALL, root=tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_spec_validation_and_pope_shortage(tmp_path):
    with pytest.raises(UserError, match="max_objects=6"):
        shapes.WorldSpec(max_objects=6)
    with pytest.raises(UserError, match="image_size=16"):
        shapes.WorldSpec(image_size=16)
    with pytest.raises(UserError, match="val images have >= 3 distinct shapes.*raise shapes.n_val"):
        shapes.ensure_world(shapes.WorldSpec(n_train=0, n_val=20), root=tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


def test_progress_bar_runs(tmp_path):
    root = shapes.ensure_world(shapes.WorldSpec(n_train=3, n_val=6, pope_images=1), root=tmp_path / "w", progress=True)
    assert (root / "manifest.json").is_file()


def _scenes(world, split):
    """{file name: [(color, shape, x centre, y centre)]} from the COCO annotations."""
    api = coco(world, split)
    return {info["file_name"]: [(a["color"], shapes.SHAPES[a["category_id"] - 1], a["bbox"][0] + a["bbox"][2] / 2,
                                 a["bbox"][1] + a["bbox"][3] / 2) for a in api.loadAnns(api.getAnnIds(imgIds=i))]
            for i, info in api.imgs.items()}


def _true_answer(question: str, scene, size: int) -> str | None:
    """The answer to a ScienceQA / MMBench / MME question of the world, worked out from the annotations."""
    from moebench.data.shapes_vqa import CELLS

    named = lambda name: [o for o in scene if name in (o[1], f"{o[0]} {o[1]}")]  # noqa: E731
    if question == "Which shape is in the image?":
        return "|".join(sorted({o[1] for o in scene}))  # any present shape
    if question in ("How many objects are in the image?",):
        return str(len(scene))
    if m := re.fullmatch(r"(?:Which word names the color of|What color is) the (\w+)\?", question):
        (o,) = named(m[1])
        return o[0]
    if m := re.fullmatch(r"On which side of the (.+) is the (.+)\?", question):
        (b,), (a,) = named(m[1]), named(m[2])
        return "left" if a[2] < b[2] else "right"
    if m := re.fullmatch(r"Where is the (\w+) in the image\?", question):
        (o,) = named(m[1])
        return CELLS[3 * min(2, int(3 * o[3] / size)) + min(2, int(3 * o[2] / size))]
    if m := re.fullmatch(r"Is there an? (?:(\w+) )?(\w+) in this image\? Please answer yes or no\.", question):
        return "Yes" if any(o[1] == m[2] and m[1] in (None, o[0]) for o in scene) else "No"
    if m := re.fullmatch(r"Are there (-?\d+) objects in this image\? Please answer yes or no\.", question):
        return "Yes" if int(m[1]) == len(scene) else "No"
    if m := re.fullmatch(r"Are there more than (\d+) objects in this image\? Please answer yes or no\.", question):
        return "Yes" if len(scene) > int(m[1]) else "No"
    if m := re.fullmatch(r"Is the (.+) on the (left|right) of the (.+)\? Please answer yes or no\.", question):
        (a,), (b,) = named(m[1]), named(m[3])
        return "Yes" if (a[2] < b[2]) == (m[2] == "left") else "No"
    return None


def _check_choice(question: str, options: dict, answer_letter: str, scene) -> None:
    truth = _true_answer(question, scene, SMALL.image_size)
    assert truth is not None, question
    right = [k for k, v in options.items() if v in truth.split("|")]
    assert right == [answer_letter], (question, options, answer_letter, scene)


def test_scienceqa_mme_mmbench_files_load_and_their_answers_are_true(world):
    """The world's ScienceQA, MME and MMBench files load through the tasks' loaders, have the official
    structure (2-5 choices, subjects, hints; MME yes/no pairs per image; MMBench 2-4 options rotated) and
    every answer is true of the image's COCO annotations."""
    from moebench.eval.tasks import load_samples, load_task

    val = _scenes(world, "val")
    problems = load(world / "scienceqa" / "problems.json")
    assert {len(p["choices"]) for p in problems.values()} == {2, 3, 4, 5}
    assert {p["subject"] for p in problems.values()} == {"natural science", "language science"}
    assert any(p["hint"] for p in problems.values()) and not all(p["hint"] for p in problems.values())
    samples = load_samples(load_task("scienceqa_img"), world)
    assert len(samples) == len(problems)
    for sample in samples:
        p = problems[sample.question_id]
        scene = val[next(n for n in val if n.endswith(f"{int(sample.question_id) - SMALL.n_train - 1:06d}.png"))]
        _check_choice(p["question"], dict(zip("ABCDE", p["choices"])), sample.target, scene)
        assert sample.groups["context"] == (["IMG", "TXT"] if p["hint"] else ["IMG"])

    mme = load_samples(load_task("mme"), world)
    by_image = {}
    for sample in mme:
        scene = val[sample.image.name]
        assert _true_answer(sample.question, scene, SMALL.image_size).lower() == sample.target, sample
        by_image.setdefault((sample.groups["subtask"], sample.image.name), []).append(sample.target)
    assert all(v == ["yes", "no"] for v in by_image.values())
    assert {sub for sub, _ in by_image} == {"existence", "count", "position", "color", "numerical_calculation"}

    mmbench = load_samples(load_task("mmbench"), world)
    items = Counter(s.groups["item"] for s in mmbench)
    assert set(items.values()) <= {2, 3, 4} and len(set(items.values())) > 1
    images = {}
    for sample in mmbench:
        images.setdefault(sample.groups["item"], sample.image.read_bytes())
        lines = sample.question.split("\n")
        question = lines[1] if lines[0].startswith("There are") else lines[0]
        scene = next(sc for name, sc in val.items()
                     if (world / "coco" / "val2014" / name).read_bytes() == images[sample.groups["item"]])
        _check_choice(question, sample.groups["options"], sample.target, scene)
        texts = list(sample.groups["options"].values())
        assert not any(a in b for i, a in enumerate(texts) for j, b in enumerate(texts) if i != j), texts


def test_stage_two_teaches_the_other_tasks_in_their_eval_prompts(world):
    """The stage-II conversations for TextVQA, ScienceQA, MME and MMBench are prompted exactly as those
    tasks' files prompt (their prompt_suffix, the OCR-token line) and answered truthfully."""
    from moebench.data.shapes_vqa import WORDS
    from moebench.eval.metrics import mmbench_parse
    from moebench.eval.tasks import load_task

    train, extra = _scenes(world, "train"), [i for i in load(world / "llava" / "shapes_instruct_train2014.json")
                                             if "-x" in i["id"]]
    kinds = Counter()
    mc = load_task("scienceqa_img").prompt_suffix
    assert mc == load_task("mmbench").prompt_suffix and load_task("mme").prompt_suffix == ""
    for item in extra:
        human, gpt = (c["value"] for c in item["conversations"])
        assert human.startswith("<image>\n")
        question = human[len("<image>\n"):]
        if item["image"].startswith("sign_"):
            m = re.fullmatch(r"(.+)\nReference OCR token: (\w+)" + re.escape(load_task("textvqa").prompt_suffix), question)
            assert m and m[2] in WORDS and gpt == m[2].lower(), item
            assert (world / "coco" / "train2014" / item["image"]).is_file()
            kinds["textvqa"] += 1
        elif question.endswith(mc):
            lines = question[: -len(mc)].split("\n")
            options = dict(line.split(". ", 1) for line in lines if re.match(r"[A-E]\. ", line))
            stem = [line for line in lines if not re.match(r"[A-E]\. ", line)][-1]
            if m := re.fullmatch(r"(.+)\. The answer is ([A-E])\.", gpt):  # ScienceQA: text, then letter
                assert options[m[2]] == m[1], item
                letter = m[2]
            else:  # MMBench: the option's text, which MMBench's matcher maps to its letter
                (letter,) = [k for k, v in options.items() if v == gpt]
                assert mmbench_parse(gpt, options) == letter, item
            _check_choice(stem, options, letter, train[item["image"]])
            kinds["choice"] += 1
        else:
            assert _true_answer(question, train[item["image"]], SMALL.image_size).lower() == gpt, item
            kinds["mme"] += 1
    assert kinds["textvqa"] == SMALL.n_train and kinds["choice"] > 0 and kinds["mme"] > 0
