"""Labelled images for the vision tasks (classification, segmentation) and the training set a vision
recipe's stages read.

A task file names a loader of VISION_LOADERS; the loader reads one split of its files under the data
root into `LabeledImages` (image paths, class names, each image's label at full resolution):

    shapes_cls    the shapes world's cls/<split>.json ({file: class name}) and images under coco/<split>/
    shapes_seg    the shapes world's label maps seg/<split>/<file>.png (0 = background, 1..8 = shapes)
    ade20k        ADEChallengeData2016 (150 classes, reduce_zero_label: 0 = "other" is ignored)
    image_folder  <root>/<split>/<class name>/<image>, classes the sorted folder names

`TrainImages` joins the train splits of a recipe's tasks by image: one item per distinct image, with a
label for each head whose task has that image (the other heads ignore it).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from moebench.errors import MissingFile, UserError
from moebench.registry import Registry

IGNORE = 255  # segmentation: pixels no loss or metric counts
IGNORE_CLASS = -100  # classification: an image without a class for this head
CLIP_NORM = "resize"

VISION_LOADERS: Registry = Registry("vision task loader")


class LabeledImages:
    """One split of one vision task: `images` (paths), `classes` (names; their count is the head's
    width) and `label(i)`, the i-th image's label: a class index () or a full-resolution (H, W) map."""

    head: str = ""  # "cls" or "seg"

    def __init__(self, images: list[Path], classes: list[str], label: Callable[[int], torch.Tensor]):
        self.images, self.classes, self._label = images, classes, label

    def __len__(self) -> int:
        return len(self.images)

    def label(self, i: int) -> torch.Tensor:
        return self._label(i)

    def majority_share(self) -> float | None:
        """Top-1 of always answering the most frequent class (classification), else None."""
        return None


class ClassLabels(LabeledImages):
    head = "cls"

    def __init__(self, images: list[Path], names: list[str], classes: list[str] | None = None):
        """`names`: each image's class name; `classes`: the head's classes (default: the sorted names)."""
        classes = classes if classes is not None else sorted(set(names))
        index = {c: k for k, c in enumerate(classes)}
        unknown = sorted(set(names) - index.keys())
        if unknown:
            raise UserError(f"class {unknown[0]!r} is not one the model was trained on ({len(classes)} classes: "
                            f"{', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''}); evaluate on data with "
                            "the training classes")
        self.names = names
        super().__init__(images, classes, lambda i: torch.tensor(index[names[i]]))

    def majority_share(self) -> float | None:
        return Counter(self.names).most_common(1)[0][1] / len(self.names) if self.names else None


class SegMaps(LabeledImages):
    head = "seg"

    def __init__(self, images: list[Path], maps: list[Path], classes: list[str], reduce_zero_label: bool = False):
        self.maps, self.reduce = maps, reduce_zero_label
        super().__init__(images, classes, self._map)

    def _map(self, i: int) -> torch.Tensor:
        from moebench.vision.seg_data import load_label
        from moebench.vision.seg_metrics import reduce_zero_label_map

        label = load_label(self.maps[i])
        if self.reduce:
            label = reduce_zero_label_map(label)
        return torch.from_numpy(np.asarray(label, dtype=np.int64))


def _split_path(task, root: Path, field: str, split: str) -> Path:
    return Path(root) / getattr(task, field).format(split=split)


@VISION_LOADERS.register("shapes_cls")
def _shapes_cls(task, root: Path, split: str, classes: list[str] | None = None) -> LabeledImages:
    labels_file = _split_path(task, root, "questions", split)
    if not labels_file.is_file():
        raise MissingFile(labels_file, f"{task.name} labels", task.download or "use data.source=shapes")
    labels = json.loads(labels_file.read_text())
    files = sorted(labels)
    images = _split_path(task, root, "images", split)
    return ClassLabels([images / f for f in files], [labels[f] for f in files], classes)


@VISION_LOADERS.register("shapes_seg")
def _shapes_seg(task, root: Path, split: str, classes: list[str] | None = None) -> LabeledImages:
    maps_dir, images = _split_path(task, root, "questions", split), _split_path(task, root, "images", split)
    if not maps_dir.is_dir():
        raise MissingFile(maps_dir, f"{task.name} label maps", task.download or "use data.source=shapes")
    maps = sorted(maps_dir.glob("*.png"))
    if not maps:
        raise UserError(f"{maps_dir} has no label maps (.png); the world is incomplete: remove it to regenerate")
    from moebench.data.shapes import SHAPES

    return SegMaps([images / m.name for m in maps], maps, classes or ["background", *SHAPES])


@VISION_LOADERS.register("ade20k")
def _ade20k(task, root: Path, split: str, classes: list[str] | None = None) -> LabeledImages:
    from moebench.vision.seg_data import read_ade20k

    pairs = read_ade20k(root, split)
    return SegMaps([p for p, _ in pairs], [a for _, a in pairs], classes or [str(k) for k in range(150)],
                   reduce_zero_label=True)


@VISION_LOADERS.register("image_folder")
def _image_folder(task, root: Path, split: str, classes: list[str] | None = None) -> LabeledImages:
    folder = _split_path(task, root, "images", split)
    if not folder.is_dir():
        raise MissingFile(folder, "image folder", f"lay images out as {folder}/<class>/<image>")
    items = [(f, c.name) for c in sorted(p for p in folder.iterdir() if p.is_dir())
             for f in sorted(c.iterdir()) if f.is_file()]
    if not items:
        raise UserError(f"{folder} has no images in class folders; expected {folder}/<class>/<image>")
    return ClassLabels([f for f, _ in items], [c for _, c in items], classes)


def load_split(task, root: Path, split: str, classes: list[str] | None = None,
               limit: int | None = None) -> LabeledImages:
    """`split` of vision task `task` under `root`; `classes`: the trained head's (the split's must be among them)."""
    data = VISION_LOADERS.get(task.loader)(task, Path(root), split, classes)
    if not len(data):
        raise UserError(f"task {task.name}: split {split!r} has no images under {root}")
    if limit:
        data.images = data.images[:limit]
        if isinstance(data, ClassLabels):
            data.names = data.names[:limit]
    return data


def pixels(path: Path, size: int) -> torch.Tensor:
    """(3, size, size): the image resized (no padding) and normalised with CLIP's mean and std."""
    from moebench.config import CLIP_MEAN, CLIP_STD
    from moebench.data.images import load_image, preprocess

    return preprocess(load_image(path), size, CLIP_MEAN, CLIP_STD, CLIP_NORM)


def resized_map(label: torch.Tensor, size: int) -> torch.Tensor:
    """A (H, W) label map at (size, size), nearest neighbour (labels are not interpolated)."""
    if tuple(label.shape) == (size, size):
        return label
    return torch.nn.functional.interpolate(label[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()


class TrainImages(torch.utils.data.Dataset):
    """The train splits of a recipe's tasks joined by image. Item: pixel_values (3, S, S) and, per head,
    `labels_cls` () or `labels_seg` (S, S); an image a head's task lacks gets that head's ignore value."""

    def __init__(self, splits: list[LabeledImages], image_size: int, max_samples: int | None = None):
        self.splits, self.size = splits, image_size
        where: dict[Path, dict[int, int]] = {}  # image -> {split index: item index}
        for s, data in enumerate(splits):
            for i, path in enumerate(data.images):
                where.setdefault(Path(path), {})[s] = i
        self.images = list(where)[:max_samples] if max_samples else list(where)
        self.where = where

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        path = self.images[i]
        item = {"pixel_values": pixels(path, self.size)}
        for s, data in enumerate(self.splits):
            k = self.where[path].get(s)
            if data.head == "cls":
                item["labels_cls"] = data.label(k) if k is not None else torch.tensor(IGNORE_CLASS)
            else:
                item["labels_seg"] = (resized_map(data.label(k), self.size) if k is not None
                                      else torch.full((self.size, self.size), IGNORE, dtype=torch.long))
        return item


def collate(batch: list[dict]) -> dict:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
