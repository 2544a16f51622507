"""Segmentation readers: a tiny ADE20K folder, a hand-made COCO file, and the embedded shapes world."""

import json

import numpy as np
import pytest
from PIL import Image

from moebench.data import shapes
from moebench.errors import MissingFile, UserError
from moebench.vision.seg_data import coco_label_maps, load_label, read_ade20k

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools x numpy 2


def ade_sample(root, split, stem, value, annotate=True):
    base = root / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (base / sub / split).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), (value, 0, 0)).save(base / "images" / split / f"{stem}.jpg")
    label = np.full((4, 6), value, np.uint8)
    label[0, 0] = 0  # "other"
    if annotate:
        Image.fromarray(label).save(base / "annotations" / split / f"{stem}.png")
    return label


def test_read_ade20k(tmp_path):
    second = ade_sample(tmp_path, "training", "ADE_train_00000002", 7)
    first = ade_sample(tmp_path, "training", "ADE_train_00000001", 150)
    val = ade_sample(tmp_path, "validation", "ADE_val_00000001", 3)
    base = tmp_path / "ADEChallengeData2016"
    pairs = read_ade20k(tmp_path, "training")
    assert [(i.name, a.name) for i, a in pairs] == [("ADE_train_00000001.jpg", "ADE_train_00000001.png"),
                                                    ("ADE_train_00000002.jpg", "ADE_train_00000002.png")]
    assert pairs[0][0] == base / "images" / "training" / "ADE_train_00000001.jpg"
    labels = [load_label(a) for _, a in pairs]
    assert all(x.dtype == np.uint8 and x.shape == (4, 6) for x in labels)
    assert np.array_equal(labels[0], first) and np.array_equal(labels[1], second)
    (image, ann), = read_ade20k(base, "validation")  # the ADEChallengeData2016 folder itself also works
    assert image.name == "ADE_val_00000001.jpg" and np.array_equal(load_label(ann), val)


def test_read_ade20k_errors(tmp_path):
    with pytest.raises(MissingFile, match=r"ADEChallengeData2016.*download ADEChallengeData2016"):
        read_ade20k(tmp_path, "training")
    with pytest.raises(UserError, match="split 'train'.*training, validation"):
        read_ade20k(tmp_path, "train")
    ade_sample(tmp_path, "training", "ADE_train_00000001", 5)
    ade_sample(tmp_path, "training", "ADE_train_00000002", 5, annotate=False)
    with pytest.raises(UserError, match=r"ADE_train_00000002\.jpg has no annotation .*ADE_train_00000002\.png"):
        read_ade20k(tmp_path, "training")
    with pytest.raises(MissingFile, match="validation"):
        read_ade20k(tmp_path, "validation")
    with pytest.raises(MissingFile, match="label map"):
        load_label(tmp_path / "nope.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match="mode RGB"):
        load_label(tmp_path / "rgb.png")


def coco_file(tmp_path):
    """One 10x10 image with a polygon (cat 7), a compressed RLE (cat 3), an uncompressed RLE (cat 5),
    in that order, and one 4x3 image without annotations; returns (path, expected label of image 1)."""
    from pycocotools import mask as mask_utils

    poly = np.zeros((10, 10), bool)
    poly[1:4, 1:5] = True  # pycocotools fills corner-coordinate boxes half-open: x in [1, 5), y in [1, 4)
    rle_mask = np.zeros((10, 10), bool)
    rle_mask[3:6, 3:7] = True  # overlaps the polygon on rows 3, columns 3..4
    rle = mask_utils.encode(np.asfortranarray(rle_mask.astype(np.uint8)))
    column = np.zeros((10, 10), bool)
    column[:, 9] = True  # column-major: 9 columns of zeros (90 pixels), then 10 ones -> counts [90, 10]
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10},
                   {"id": 2, "file_name": "b.jpg", "height": 3, "width": 4}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
            {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 1,
             "segmentation": {"size": [10, 10], "counts": rle["counts"].decode("ascii")}},
            {"id": 12, "image_id": 1, "category_id": 5, "iscrowd": 1,
             "segmentation": {"size": [10, 10], "counts": [90, 10]}},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}, {"id": 5, "name": "pole"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    # indices in sorted id order: cat (3) -> 1, pole (5) -> 2, dog (7) -> 3; later annotations on top
    expected = np.zeros((10, 10), np.uint8)
    expected[poly], expected[rle_mask], expected[column] = 3, 1, 2
    return path, data, expected


def test_coco_label_maps_pixel_exact(tmp_path):
    path, _, expected = coco_file(tmp_path)
    maps, names = coco_label_maps(path)
    assert names == ["background", "cat", "pole", "dog"]
    assert list(maps) == ["a.jpg", "b.jpg"] and len(maps) == 2
    assert maps["a.jpg"].dtype == np.uint8
    assert np.array_equal(maps["a.jpg"], expected)
    assert expected[3, 3] == 1 and expected[1, 1] == 3 and expected[9, 9] == 2  # overlap painted by the later one
    assert np.array_equal(maps["b.jpg"], np.zeros((3, 4), np.uint8))
    with pytest.raises(UserError, match="needs images_dir"):
        next(maps.samples())
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(b"")
    maps, _ = coco_label_maps(path, tmp_path / "img")
    (p1, l1), (p2, _) = maps.samples()
    assert (p1, p2) == (tmp_path / "img" / "a.jpg", tmp_path / "img" / "b.jpg")
    assert np.array_equal(l1, expected)


def test_coco_label_maps_errors(tmp_path):
    with pytest.raises(MissingFile, match="COCO instances file"):
        coco_label_maps(tmp_path / "none.json")
    path, data, _ = coco_file(tmp_path)
    with pytest.raises(MissingFile, match=r"b\.jpg"):
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "a.jpg").write_bytes(b"")
        coco_label_maps(path, tmp_path / "img")
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="annotation 10 has category_id 99"):
        coco_label_maps(path)
    bad = json.loads(json.dumps(data))
    bad["annotations"][1]["segmentation"]["size"] = [5, 20]
    bad["annotations"][1]["segmentation"]["counts"] = "0"  # 100 zeros are also a valid 5x20 RLE
    path.write_text(json.dumps(bad))
    maps, _ = coco_label_maps(path)
    with pytest.raises(UserError, match=r"annotation 11 of a\.jpg has an RLE mask of size \[5, 20\]"):
        maps["a.jpg"]
    bad["annotations"][1]["segmentation"]["counts"] = 5
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="annotation 11 of a.jpg has a malformed segmentation"):
        coco_label_maps(path)[0]["a.jpg"]
    path.write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        coco_label_maps(path)


def test_coco_label_maps_agree_with_the_shapes_world_label_maps(tmp_path):
    spec = shapes.WorldSpec(n_train=0, n_val=4, pope_images=1)
    root = shapes.ensure_world(spec, root=tmp_path / "world", progress=False)
    maps, names = coco_label_maps(root / "annotations" / "instances_val2014.json", root / "coco" / "val2014")
    assert names == ["background", *shapes.SHAPES] and len(maps) == 4
    for image, label in maps.samples():
        assert image.is_file()
        assert np.array_equal(label, load_label(root / "seg" / "val2014" / image.name))
