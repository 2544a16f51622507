"""Semantic segmentation data: (image path, label map) samples from ADE20K and COCO instances files.

* ADE20K (SceneParsing, the mmseg `ADE20KDataset` layout)::

      <root>/ADEChallengeData2016/images/{training,validation}/<stem>.jpg
      <root>/ADEChallengeData2016/annotations/{training,validation}/<stem>.png

  The PNGs hold 0 = "other" and 1..150 = classes; evaluate with `reduce_zero_label=True`.
* COCO instances JSON (also the embedded shapes world's `annotations/instances_{split}2014.json`):
  one HxW map of category *indices* per image, 0 = background, the category ids mapped to 1..K in
  sorted id order, annotations painted in file order (later over earlier). Masks come from
  `pycocotools.coco.COCO.annToMask`, so polygons, uncompressed RLE (list counts) and compressed RLE
  (string counts, crowd regions) are drawn exactly as pycocotools draws them.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from moebench.errors import MissingFile, UserError

ADE20K_SPLITS = ("training", "validation")
ADE20K_DIR = "ADEChallengeData2016"
ADE20K_FIX = ("download ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/"
              "ADEChallengeData2016.zip) and unzip it under the data root")


def read_ade20k(root, split: str) -> list[tuple[Path, Path]]:
    """(image_path, annotation_path) pairs of one ADE20K split, sorted by file stem.

    `root` is the folder holding ADEChallengeData2016/ (or that folder itself); `split` is "training"
    or "validation". Every image needs its annotation PNG of the same stem.
    """
    if split not in ADE20K_SPLITS:
        raise UserError(f"ADE20K split {split!r}: use one of {', '.join(ADE20K_SPLITS)}")
    root = Path(root)
    base = root if root.name == ADE20K_DIR else root / ADE20K_DIR
    images_dir, ann_dir = base / "images" / split, base / "annotations" / split
    for folder, what in ((images_dir, "ADE20K images folder"), (ann_dir, "ADE20K annotations folder")):
        if not folder.is_dir():
            raise MissingFile(folder, what, ADE20K_FIX)
    images = sorted(images_dir.glob("*.jpg"), key=lambda p: p.stem)
    if not images:
        raise UserError(f"no .jpg images in {images_dir}: {ADE20K_FIX}")
    pairs = []
    for image in images:
        ann = ann_dir / f"{image.stem}.png"
        if not ann.is_file():
            raise UserError(f"ADE20K image {image} has no annotation {ann}: restore the annotation or "
                            f"re-extract ADEChallengeData2016")
        pairs.append((image, ann))
    return pairs


def load_label(path) -> np.ndarray:
    """The HxW class-index map stored in a label PNG (mode L or P: uint8; mode I/I;16: int64)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "label map")
    try:
        with Image.open(path) as im:
            mode, label = im.mode, np.array(im)
    except (OSError, ValueError) as e:
        raise UserError(f"label map {path} cannot be read ({e}): re-extract or regenerate the file") from None
    if mode in ("L", "P"):
        return label
    if mode in ("I", "I;16", "I;16B", "I;16L"):
        return label.astype(np.int64)
    raise UserError(f"label map {path} has PIL mode {mode}: expected a single-channel index PNG "
                    f"(mode L, P or I), not a colour-coded image")


class LabelMaps(Mapping):
    """{file_name: HxW category-index map} for the images of a COCO instances file, drawn on access.

    `names[k]` is the name of index k ("background" for 0); `index_of[category_id]` is its index.
    With `images_dir`, `samples()` yields (image_path, label_map) pairs.
    """

    def __init__(self, coco, names: list[str], index_of: dict[int, int], source: Path, images_dir: Path | None):
        self.coco, self.names, self.index_of, self.source, self.images_dir = coco, names, index_of, source, images_dir
        self._by_name = {img["file_name"]: img for img in coco.dataset["images"]}
        self.dtype = np.uint8 if len(names) <= 255 else np.int64

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __getitem__(self, file_name: str) -> np.ndarray:
        img = self._by_name[file_name]
        label = np.zeros((img["height"], img["width"]), self.dtype)
        for ann in self.coco.imgToAnns.get(img["id"], []):  # file order: later annotations paint over earlier
            label[self._mask(ann, img)] = self.index_of[ann["category_id"]]
        return label

    def _mask(self, ann: dict, img: dict) -> np.ndarray:
        where = f"{self.source}: annotation {ann.get('id')} of {img['file_name']}"
        if "segmentation" not in ann:
            raise UserError(f"{where} has no segmentation: use an instances file with masks")
        try:
            with warnings.catch_warnings():  # pycocotools' RLE objects predate numpy 2's __array__(copy=...)
                warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
                mask = self.coco.annToMask(ann)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:  # pycocotools on malformed masks
            raise UserError(f"{where} has a malformed segmentation ({type(e).__name__}: {e}): "
                            f"fix the polygon or RLE") from None
        if mask.shape != (img["height"], img["width"]):
            raise UserError(f"{where} has an RLE mask of size {list(mask.shape)} but the image is "
                            f"{img['height']}x{img['width']}: fix the RLE 'size' or the image's height/width")
        return mask.astype(bool)

    def samples(self) -> Iterator[tuple[Path, np.ndarray]]:
        """(image_path, label_map) for every image, in file order; needs `images_dir`."""
        if self.images_dir is None:
            raise UserError("LabelMaps.samples() needs images_dir: pass the images folder to coco_label_maps")
        for file_name in self:
            yield self.images_dir / file_name, self[file_name]


def coco_label_maps(instances_json, images_dir=None) -> tuple[LabelMaps, list[str]]:
    """Semantic label maps from a COCO instances file: (maps, class_names).

    `maps` is a read-only mapping {file_name: HxW map} drawn lazily per image (uint8 when the K + 1
    classes fit, else int64); `class_names` is ["background", <category names in sorted id order>].
    With `images_dir`, every image file must exist there (checked up front).
    """
    path = Path(instances_json)
    if not path.is_file():
        raise MissingFile(path, "COCO instances file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"COCO instances file {path} is not valid JSON ({e}): re-download it") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise UserError(f"COCO instances file {path} lacks {', '.join(missing)}: use an instances_*.json file")
    ids = sorted(c["id"] for c in data["categories"])
    index_of = {cid: k + 1 for k, cid in enumerate(ids)}
    name_of = {c["id"]: c["name"] for c in data["categories"]}
    names = ["background"] + [name_of[cid] for cid in ids]
    image_ids = set()
    for img in data["images"]:
        if "height" not in img or "width" not in img:
            raise UserError(f"{path}: image {img.get('file_name', img.get('id'))} lacks height/width: "
                            f"add them to its entry in 'images'")
        image_ids.add(img["id"])
    for ann in data["annotations"]:
        if ann.get("category_id") not in index_of:
            raise UserError(f"{path}: annotation {ann.get('id')} has category_id {ann.get('category_id')} "
                            f"not in 'categories': fix the annotation or add the category")
        if ann.get("image_id") not in image_ids:
            raise UserError(f"{path}: annotation {ann.get('id')} refers to image_id {ann.get('image_id')} "
                            f"not in 'images': fix the annotation or add the image")
    images = Path(images_dir) if images_dir is not None else None
    if images is not None:
        for img in data["images"]:
            if not (images / img["file_name"]).is_file():
                raise MissingFile(images / img["file_name"], f"image listed in {path}",
                                  "pass the images folder that matches this instances file")
    return LabelMaps(_index(data), names, index_of, path, images), names


def _index(data: dict):
    """A pycocotools COCO over an already-loaded dict, without its progress prints."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
