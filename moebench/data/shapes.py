"""The embedded "shapes" world: small synthetic images written in the real datasets' file formats.

Each image holds a few flat-coloured shapes (shape x colour x size x position) on a dark background.
From one seed we write COCO instances, LLaVA conversations (captions for stage I, short-answer QA for
stage II), GQA questions and scene graphs, POPE questions (built by `pope.build_pope` from the COCO
file), semantic label maps and class labels, so the readers for real data serve this world too.
The relative paths under the world root are a contract (see `ensure_world`).

Masks are rasterised from the stored polygons by pycocotools itself, so the pixels, the label maps and
`COCO.annToMask` agree exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moebench.config import WorldConfig
from moebench.data import pope
from moebench.errors import MissingFile, UserError
from moebench.progress import steps

WORLD_VERSION = 6  # 2: VQAv2, TextVQA and ScienceQA files; 3: single-turn stage-II data with POPE-style questions;
# 4: stage II has 2 GQA-type questions per image (was 5), so existence is 3/4 of it; 5: one GQA question per
# held-out image (was 2; the training data is unchanged); 6: MME and MMBench files, ScienceQA with 2-5 choices,
# hints and subjects, and stage II teaches TextVQA, ScienceQA, MME and MMBench (shapes_vqa.instruct_extra)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "semicircle", "bar")
COLORS = {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 90, 240),
          "yellow": (240, 230, 40), "purple": (160, 50, 210), "orange": (250, 130, 0)}
SIZES = {"small": 0.55, "large": 0.85}  # side of the shape's box / grid cell
BACKGROUND = (24, 24, 32)
MARGIN = 2.0  # px between the boxes of two objects
MIN_DX = 0.5  # x centres of a left/right pair differ by at least this many grid cells
SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short description of the image.",
                   "What objects are in the picture?", "List the objects in the image.")
KINDS = ("existence", "color", "shape", "count", "relation")  # GQA "detailed" types
FOLDERS = {"train": "train2014", "val": "val2014"}
QA_PER_IMAGE = 2  # GQA-type stage-II questions per training image, one conversation each
EXIST_PER_IMAGE = 4  # and POPE-style shape existence questions: 2 present shapes (fewer if fewer), 2 absent
GQA_PER_IMAGE = 1  # held-out GQA questions per image: 1,000 on the default world


@dataclass(frozen=True)
class WorldSpec:
    """A recipe's `data.world` (WorldConfig, whose defaults these are) plus the fixed generation settings."""

    seed: int = WorldConfig.seed
    image_size: int = WorldConfig.image_size
    grid: int = WorldConfig.grid  # objects sit in a grid x grid layout of cells (one cell = one 16 px vision patch)
    n_train: int = WorldConfig.n_train
    n_val: int = WorldConfig.n_val
    min_objects: int = 2
    max_objects: int = 5
    pope_images: int = 500  # POPE images per split, drawn from val

    def __post_init__(self):
        if self.image_size < 32:
            raise UserError(f"shapes.image_size={self.image_size}: must be >= 32")
        if self.n_train < 0 or self.n_val < 1:
            raise UserError(f"shapes.n_train={self.n_train}, n_val={self.n_val}: need n_train >= 0, n_val >= 1")
        if not 1 <= self.min_objects <= self.max_objects <= len(SHAPES) - 3:
            raise UserError(f"shapes.min_objects={self.min_objects}, max_objects={self.max_objects}: need "
                            f"1 <= min_objects <= max_objects <= {len(SHAPES) - 3} (POPE needs 3 absent shapes)")
        if self.image_size % self.grid or self.grid * self.grid < self.max_objects:
            raise UserError(f"shapes.image_size={self.image_size}, grid={self.grid}: the image must split into "
                            f"grid x grid cells, at least max_objects={self.max_objects} of them")
        if self.pope_images < 1:
            raise UserError(f"shapes.pope_images={self.pope_images}: must be >= 1")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    side: float

    @property
    def polygon(self) -> list[float]:
        """COCO polygon [x1, y1, x2, y2, ...] in pixels (2 decimals, so JSON round-trips it exactly)."""
        half = self.side / 2
        return [round(v, 2) for x, y in _UNIT[self.shape] for v in (self.cx + x * half, self.cy + y * half)]


@dataclass
class Scene:
    image_id: int
    file_name: str
    objects: list[Obj]
    ann_ids: list[int]

    @property
    def stem(self) -> str:
        return self.file_name.rsplit(".", 1)[0]


def _arc(n: int, start: float = 0.0, stop: float = 2 * math.pi, radii=(1.0,)) -> list[tuple[float, float]]:
    """n points from angle `start` towards `stop`; radii are cycled (a star alternates two)."""
    angles = [start + (stop - start) * k / n for k in range(n)]
    return [(radii[k % len(radii)] * math.cos(a), radii[k % len(radii)] * math.sin(a)) for k, a in enumerate(angles)]


def _unit_shapes() -> dict[str, list[tuple[float, float]]]:
    """Each shape's vertices in its box [-1, 1]^2, y pointing down."""
    w = 0.32  # half width of the cross's arms
    return {
        "circle": _arc(32),
        "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
        "triangle": [(0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)],
        "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
        "star": _arc(10, -math.pi / 2, 3 * math.pi / 2, radii=(1.0, 0.42)),
        "cross": [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)],
        "semicircle": [(x, y + 0.5) for x, y in _arc(16, 0.0, -math.pi)] + [(-1.0, 0.5)],  # dome up, flat side down
        "bar": [(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)],
    }


_UNIT = _unit_shapes()


def default_cache_dir(spec: WorldSpec = WorldSpec()) -> Path:
    base = Path(os.environ.get("MOEBENCH_CACHE") or Path.home() / ".cache" / "moebench")
    return base / "shapes" / (f"v{WORLD_VERSION}-seed{spec.seed}-{spec.image_size}px-grid{spec.grid}-"
                              f"{spec.n_train}-{spec.n_val}")


def read_manifest(root) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise MissingFile(path, "shapes world manifest", "create the world with ensure_world()")
    return json.loads(path.read_text())


def world_hash(root) -> str:
    return read_manifest(root)["hash"]


def ensure_world(spec: WorldSpec = WorldSpec(), root: Path | None = None, progress: bool = True) -> Path:
    """The world's root, generated first if it is missing or was made from another spec.

    Generation writes into a temp folder beside the root and renames it into place, so readers never
    see a half-written world and concurrent generators cannot corrupt each other.
    """
    root = Path(root) if root is not None else default_cache_dir(spec)
    if _matches(root, spec):
        return root
    if root.is_dir() and any(root.iterdir()) and not _is_world(root):
        raise UserError(f"{root} exists and is not a shapes world: remove it or choose another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        counts = _generate(spec, tmp, progress)
        manifest = {"world": "shapes", "version": WORLD_VERSION, "spec": dataclasses.asdict(spec),
                    "hash": _hash_tree(tmp), "counts": counts}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp, root, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _manifest_or_none(root: Path) -> dict | None:
    try:
        return json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _is_world(root: Path) -> bool:
    return (_manifest_or_none(root) or {}).get("world") == "shapes"


def _matches(root: Path, spec: WorldSpec) -> bool:
    m = _manifest_or_none(root) or {}
    return m.get("world") == "shapes" and m.get("version") == WORLD_VERSION and m.get("spec") == dataclasses.asdict(spec)


def _install(tmp: Path, root: Path, spec: WorldSpec) -> None:
    """Rename `tmp` to `root`. A matching world already there wins (another generator finished first);
    a stale world (other spec) is moved aside and deleted; anything else there is left alone."""
    for _ in range(5):
        try:
            os.replace(tmp, root)  # atomic; fails while root is a non-empty folder
            return
        except OSError as e:
            error = e
        if _matches(root, spec):
            return
        if root.exists() and not _is_world(root):
            raise UserError(f"{root} exists and is not a shapes world: remove it or choose another root")
        stale = root.with_name(f".{root.name}.stale-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(root, stale)
        shutil.rmtree(stale, ignore_errors=True)
    raise UserError(f"could not install the shapes world at {root}: {error}")


def _hash_tree(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p != root / "manifest.json"):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# ---------------------------------------------------------------- scenes


def _sample_scene(rng: np.random.Generator, spec: WorldSpec) -> list[Obj]:
    """2..5 objects in distinct cells of a grid, each jittered inside its cell.

    One object per cell keeps every object inside one vision patch when patch = cell (the tiny towers
    of the embedded world learn shapes from scratch in a few hundred steps that way).
    """
    cell = spec.image_size / spec.grid
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    cells = rng.choice(spec.grid * spec.grid, size=n, replace=False)
    objs = []
    for c in cells:
        shape, color, size = SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))], \
            list(SIZES)[int(rng.integers(len(SIZES)))]
        side = SIZES[size] * cell
        room = max(0.0, (cell - side) / 2 - 0.5)  # jitter that keeps the object inside its cell
        cx = (int(c) % spec.grid + 0.5) * cell + float(rng.uniform(-room, room))
        cy = (int(c) // spec.grid + 0.5) * cell + float(rng.uniform(-room, room))
        objs.append(Obj(shape, color, size, round(cx, 2), round(cy, 2), side))
    return objs


def _sample_split(split: str, spec: WorldSpec, first_id: int, first_ann: int) -> list[Scene]:
    rng = np.random.default_rng([spec.seed, list(FOLDERS).index(split)])  # train and val: independent draws
    count = spec.n_train if split == "train" else spec.n_val
    scenes, ann = [], first_ann
    for i in range(count):
        objs = _sample_scene(rng, spec)
        scenes.append(Scene(first_id + i, f"shapes_{split}_{i:06d}.png", objs, list(range(ann, ann + len(objs)))))
        ann += len(objs)
    return scenes


def _rasterize(polygons: list[list[float]], size: int) -> np.ndarray:
    """(objects, size, size) bool masks, one per polygon, exactly as pycocotools' COCO.annToMask draws them."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools' RLE objects predate numpy 2's __array__(copy=...)
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        masks = mask_utils.decode(mask_utils.frPyObjects(polygons, size, size))  # (size, size, objects)
    return np.moveaxis(masks, -1, 0).astype(bool)


def _write_split(split: str, scenes: list[Scene], spec: WorldSpec, out: Path, advance) -> tuple[dict, dict]:
    """Images, label maps, the COCO instances dict and {file_name: largest shape} for one split."""
    size, folder = spec.image_size, FOLDERS[split]
    for sub in ("coco", "seg"):
        (out / sub / folder).mkdir(parents=True, exist_ok=True)
    images, anns, classes = [], [], {}
    for scene in scenes:
        pixels = np.empty((size, size, 3), np.uint8)
        pixels[:] = BACKGROUND
        labels = np.zeros((size, size), np.uint8)
        polygons = [obj.polygon for obj in scene.objects]
        masks = _rasterize(polygons, size)
        areas = [int(m.sum()) for m in masks]
        for obj, ann_id, poly, mask, area in zip(scene.objects, scene.ann_ids, polygons, masks, areas):
            cat, xs, ys = SHAPES.index(obj.shape) + 1, poly[0::2], poly[1::2]
            pixels[mask], labels[mask] = COLORS[obj.color], cat
            anns.append({"id": ann_id, "image_id": scene.image_id, "category_id": cat,
                         "bbox": [min(xs), min(ys), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
                         "area": area, "iscrowd": 0, "segmentation": [poly],
                         "color": obj.color, "size": obj.size})
        Image.fromarray(pixels).save(out / "coco" / folder / scene.file_name)
        Image.fromarray(labels).save(out / "seg" / folder / scene.file_name)
        images.append({"id": scene.image_id, "file_name": scene.file_name, "width": size, "height": size})
        classes[scene.file_name] = scene.objects[areas.index(max(areas))].shape
        advance()
    coco = {"info": {"description": f"moebench shapes world v{WORLD_VERSION}, seed {spec.seed}, {split}",
                     "version": str(WORLD_VERSION)},
            "licenses": [], "images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]}
    return coco, classes


# ---------------------------------------------------------------- language


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def caption(objs: list[Obj]) -> str:
    """'a small red circle, a large blue star and a small green bar.' (objects left to right)"""
    parts = [_a(f"{o.size} {o.color} {o.shape}") for o in sorted(objs, key=lambda o: o.cx)]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def _names(objs: list[Obj]) -> list[tuple[str, Obj]]:
    """Objects that a short name picks out uniquely: by shape, else by colour + shape."""
    shapes, pairs = Counter(o.shape for o in objs), Counter((o.color, o.shape) for o in objs)
    return [(o.shape if shapes[o.shape] == 1 else f"{o.color} {o.shape}", o)
            for o in objs if shapes[o.shape] == 1 or pairs[(o.color, o.shape)] == 1]


def side_pair(objs: list[Obj], rng: random.Random) -> tuple[str, str, str] | None:
    """Two objects far enough apart to tell left from right, drawn at random: (name of a, name of b, the
    side of b that a is on), or None when no pair is."""
    named = _names(objs)
    pairs = [(x, y) for x in named for y in named if x[1] is not y[1] and _apart(x[1], y[1])]
    if not pairs:
        return None
    (a, oa), (b, ob) = rng.choice(pairs)
    return a, b, "left" if oa.cx < ob.cx else "right"


def _apart(a: Obj, b: Obj) -> bool:
    """Left/right is asked only of objects in different grid columns (MIN_DX cells apart)."""
    cell = a.side / SIZES[a.size]
    return abs(a.cx - b.cx) >= MIN_DX * cell


def ask(kind: str, objs: list[Obj], rng: random.Random, yes: bool = True) -> dict | None:
    """One question of a GQA detailed type about a scene, or None if the scene cannot support it.

    Returns {question, answer (one lowercase word), full (fullAnswer), structural, semantic, detailed}.
    `yes` picks the answer of an existence question.
    """
    shapes, colors = Counter(o.shape for o in objs), Counter(o.color for o in objs)
    if kind == "existence":
        if rng.random() < 0.5:
            pool = sorted(shapes) if yes else [s for s in SHAPES if s not in shapes]
            name, semantic = rng.choice(pool), "obj"
        else:
            pairs = {(o.color, o.shape) for o in objs}  # hard negatives: a present shape, another colour
            pool = sorted(pairs) if yes else [(c, s) for s in sorted(shapes) for c in COLORS if (c, s) not in pairs]
            name, semantic = " ".join(rng.choice(pool)), "attr"
        answer, full = ("yes", f"Yes, there is {_a(name)}.") if yes else ("no", f"No, there is no {name}.")
        q = (pope.question_text(name), answer, full, "verify", semantic)
    elif kind == "color":
        unique = [o for o in objs if shapes[o.shape] == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        q = (f"What color is the {o.shape}?", o.color, f"The {o.shape} is {o.color}.", "query", "attr")
    elif kind == "shape":
        unique = [o for o in objs if colors[o.color] == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        q = (f"What shape is the {o.color} object?", o.shape, f"The {o.color} object is {_a(o.shape)}.", "query", "cat")
    elif kind == "count":
        if rng.random() < 0.5:
            n, what, semantic = len(objs), "objects", "obj"
        else:
            color = rng.choice(sorted(colors))
            n, what, semantic = colors[color], f"{color} objects", "attr"
        verb = "is" if n == 1 else "are"
        full = f"There {verb} {n} {what[:-1] if n == 1 else what}."
        q = (f"How many {what} are there?", str(n), full, "query", semantic)
    elif kind == "relation":
        if not (pair := side_pair(objs, rng)):
            return None
        a, b, side = pair
        q = (f"Is the {a} to the left or to the right of the {b}?", side, f"The {a} is to the {side} of the {b}.",
             "choose", "rel")
    else:
        raise ValueError(kind)
    return dict(zip(("question", "answer", "full", "structural", "semantic"), q), detailed=kind)


def _existence(objs: list[Obj], rng: random.Random) -> list[tuple[str, str]]:
    """POPE-style (question, answer) pairs: up to 2 shapes in the image ("yes") and 2 absent ones ("no")."""
    present = sorted({o.shape for o in objs})
    absent = [s for s in SHAPES if s not in present]
    picks = [(s, "yes") for s in rng.sample(present, min(2, len(present)))] + [(s, "no") for s in rng.sample(absent, 2)]
    return [(pope.question_text(s), answer) for s, answer in picks]


def _llava(scenes: list[Scene], spec: WorldSpec) -> tuple[list[dict], list[dict]]:
    """Stage-I captions and stage-II QA, in LLaVA conversation JSON.

    Stage II asks one question per conversation. With several turns per image the tiny LLM learns to
    answer later questions from earlier answers ("is there a red circle? yes" gives away "is there a
    circle?") instead of from the image, and evaluation asks one question per prompt. Besides the
    GQA-type questions, each image gets POPE-style shape existence questions: looking an object up by
    its shape is learned only with this much of it (docs/shapes-world.md, "How POPE was fixed").
    """
    rng = random.Random(f"shapes-{spec.seed}-llava")
    captions, instruct = [], []
    for s in scenes:
        prompt = "<image>\n" + rng.choice(CAPTION_PROMPTS)
        captions.append({"id": s.stem, "image": s.file_name, "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": caption(s.objects)}]})
        qa, asked = [], set()
        for _ in range(20 * QA_PER_IMAGE):
            q = ask(rng.choice(KINDS), s.objects, rng, yes=rng.random() < 0.5)
            if q and q["question"] not in asked:
                asked.add(q["question"])
                qa.append((q["question"], q["answer"]))
            if len(qa) == QA_PER_IMAGE:
                break
        qa += [(q, a) for q, a in _existence(s.objects, rng) if q not in asked]
        for k, (question, answer) in enumerate(qa):
            instruct.append({"id": f"{s.stem}-{k}", "image": s.file_name, "conversations": [
                {"from": "human", "value": "<image>\n" + question + SUFFIX}, {"from": "gpt", "value": answer}]})
    return captions, instruct


def _gqa(scenes: list[Scene], spec: WorldSpec) -> dict:
    """GQA testdev-balanced style questions: the least used applicable type next, yes/no alternating."""
    rng = random.Random(f"shapes-{spec.seed}-gqa")
    used, questions = Counter(), {}
    for s in scenes:
        asked = set()
        for _ in range(GQA_PER_IMAGE):
            for kind in sorted(KINDS, key=lambda k: (used[k], rng.random())):
                q = ask(kind, s.objects, rng, yes=used["existence"] % 2 == 0)
                if q and q["question"] not in asked:
                    break
            else:
                continue
            asked.add(q["question"])
            used[kind] += 1
            questions[str(len(questions) + 1)] = {
                "imageId": s.stem, "question": q["question"], "answer": q["answer"], "fullAnswer": q["full"],
                "isBalanced": True,
                "types": {"structural": q["structural"], "semantic": q["semantic"], "detailed": q["detailed"]}}
    return questions


def _scene_graphs(scenes: list[Scene], spec: WorldSpec) -> dict:
    graphs = {}
    for s in scenes:
        objects = {}
        for obj, ann_id in zip(s.objects, s.ann_ids):
            xs, ys = obj.polygon[0::2], obj.polygon[1::2]
            x, y = math.floor(min(xs)), math.floor(min(ys))
            relations = [{"name": "to the left of" if obj.cx < other.cx else "to the right of", "object": str(other_id)}
                         for other, other_id in zip(s.objects, s.ann_ids) if other_id != ann_id and _apart(obj, other)]
            objects[str(ann_id)] = {"name": obj.shape, "x": x, "y": y, "w": math.ceil(max(xs)) - x,
                                    "h": math.ceil(max(ys)) - y, "attributes": [obj.color, obj.size],
                                    "relations": relations}
        graphs[s.stem] = {"width": spec.image_size, "height": spec.image_size, "objects": objects}
    return graphs


# ---------------------------------------------------------------- generation


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _generate(spec: WorldSpec, out: Path, progress: bool) -> dict:
    """Write every file of the world under `out`; return the counts for the manifest."""
    train = _sample_split("train", spec, 1, 1)
    val = _sample_split("val", spec, spec.n_train + 1, sum(len(s.objects) for s in train) + 1)
    eligible = sum(len({o.shape for o in s.objects}) >= 3 for s in val)
    if eligible < spec.pope_images:
        raise UserError(f"shapes world: only {eligible} of {spec.n_val} val images have >= 3 distinct shapes, "
                        f"POPE needs shapes.pope_images={spec.pope_images}: raise shapes.n_val or lower pope_images")
    with steps(progress, len(train) + len(val), "generating the shapes world") as advance:
        for split, scenes in (("train", train), ("val", val)):
            coco, classes = _write_split(split, scenes, spec, out, advance)
            _dump(coco, out / "annotations" / f"instances_{FOLDERS[split]}.json")
            _dump(classes, out / "cls" / f"{FOLDERS[split]}.json")
    from moebench.data import shapes_vqa

    captions, instruct = _llava(train, spec)
    instruct += shapes_vqa.instruct_extra(train, out, spec.seed, spec.image_size)
    _dump(captions, out / "llava" / "shapes_caption_train2014.json")
    _dump(instruct, out / "llava" / "shapes_instruct_train2014.json")

    questions = _gqa(val, spec)
    _dump(questions, out / "gqa" / "testdev_balanced_questions.json")
    _dump(_scene_graphs(val, spec), out / "gqa" / "val_sceneGraphs.json")
    (out / "gqa" / "images").mkdir(parents=True)
    for s in val:
        src, dst = out / "coco" / "val2014" / s.file_name, out / "gqa" / "images" / s.file_name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)

    splits = pope.build_pope(out / "annotations" / "instances_val2014.json", num_images=spec.pope_images, seed=spec.seed)
    for name, records in splits.items():
        pope.write_pope_jsonl(records, out / "pope" / f"coco_pope_{name}.json")
    extra = {"vqav2_questions": shapes_vqa.write_vqav2(val, out, spec.seed),
             "textvqa_questions": shapes_vqa.write_textvqa(val, out, spec.seed),
             "scienceqa_problems": shapes_vqa.write_scienceqa(val, out, spec.seed),
             "mme_questions": shapes_vqa.write_mme(val, out, spec.seed),
             "mmbench_questions": shapes_vqa.write_mmbench(val, out, spec.seed, spec.image_size)}
    return {**extra, "train_images": len(train), "val_images": len(val),
            "train_objects": sum(len(s.objects) for s in train), "val_objects": sum(len(s.objects) for s in val),
            "pope_eligible_val_images": eligible, "pope_questions": len(splits["random"]),
            "instruct_turns": sum(len(c["conversations"]) // 2 for c in instruct),
            "gqa_questions": len(questions),
            "gqa_types": dict(sorted(Counter(q["types"]["detailed"] for q in questions.values()).items()))}
