"""Semantic segmentation metrics against hand-worked confusion cases (mmseg IoUMetric definitions)."""

import math

import numpy as np
import pytest

from moebench.errors import UserError
from moebench.vision.seg_metrics import (
    SegEvaluator,
    intersect_and_union,
    reduce_zero_label_map,
    total_area_to_metrics,
)


def evaluate(pred, label, num_classes, **kw):
    ev = SegEvaluator(num_classes, **kw)
    ev.update(np.array(pred), np.array(label))
    return ev.compute()


def close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w), (got, want)


def test_ignore_index_pixels_are_excluded():
    label = [[0, 0, 1], [1, 255, 2]]
    pred = [[0, 1, 1], [1, 2, 2]]  # the 2 predicted on the ignored pixel must not count
    # kept pixels: label [0, 0, 1, 1, 2], pred [0, 1, 1, 1, 2]
    # intersect [1, 2, 1]  pred [1, 3, 1]  label [2, 2, 1]  union = pred + label - intersect = [2, 3, 1]
    inter, union, area_pred, area_label = intersect_and_union(np.array(pred), np.array(label), 3)
    assert inter.tolist() == [1, 2, 1] and union.tolist() == [2, 3, 1]
    assert area_pred.tolist() == [1, 3, 1] and area_label.tolist() == [2, 2, 1]
    m = evaluate(pred, label, 3)
    close(m["IoU"], [1 / 2, 2 / 3, 1])  # mIoU = (1/2 + 2/3 + 1) / 3 = 13/18
    close(m["Acc"], [1 / 2, 1, 1])  # mAcc = (1/2 + 1 + 1) / 3 = 5/6
    assert m["mIoU"] == pytest.approx(13 / 18) and m["mAcc"] == pytest.approx(5 / 6)
    assert m["aAcc"] == pytest.approx(4 / 5)  # 4 correct of 5 kept pixels
    # with another ignore_index the 255 is merely out of range: like torch.histc it leaves the label
    # area, but the 2 predicted there now counts: pred [1, 3, 2], union [2, 3, 2], IoU_2 = 1/2
    m = evaluate(pred, label, 3, ignore_index=254)
    close(m["IoU"], [1 / 2, 2 / 3, 1 / 2])
    assert m["aAcc"] == pytest.approx(4 / 5)


def test_reduce_zero_label():
    raw = np.array([[0, 1, 2], [2, 255, 1]], np.uint8)
    # 0 -> 255 -> 254 -> 255 (ignored), 1 -> 0, 2 -> 1, 255 -> 254 -> 255 (still ignored)
    assert reduce_zero_label_map(raw).tolist() == [[255, 0, 1], [1, 255, 0]]
    assert raw.tolist() == [[0, 1, 2], [2, 255, 1]]  # the caller's array is left alone
    pred = [[1, 0, 1], [0, 0, 0]]
    # kept pixels: label [0, 1, 1, 0], pred [0, 1, 0, 0]
    # intersect [2, 1]  pred [3, 1]  label [2, 2]  union [3, 2]
    m = evaluate(pred, raw, 2, reduce_zero_label=True)
    close(m["IoU"], [2 / 3, 1 / 2])  # mIoU = 7/12
    close(m["Acc"], [1, 1 / 2])  # mAcc = 3/4
    assert m["mIoU"] == pytest.approx(7 / 12) and m["mAcc"] == pytest.approx(3 / 4)
    assert m["aAcc"] == pytest.approx(3 / 4)
    # without it the raw label 0 is a class: label [0, 1, 2, 2, 1] vs pred [1, 0, 1, 0, 0] -> none right
    assert evaluate(pred, raw, 3)["aAcc"] == 0


def test_class_absent_from_prediction_and_label_is_left_out_of_the_means():
    label = [[0, 0], [1, 1]]
    pred = [[0, 1], [1, 1]]
    # intersect [1, 2, 0, 0]  pred [1, 3, 0, 0]  label [2, 2, 0, 0]  union [2, 3, 0, 0]
    m = evaluate(pred, label, 4)
    close(m["IoU"], [1 / 2, 2 / 3, math.nan, math.nan])  # 0/0 for classes 2 and 3
    close(m["Acc"], [1 / 2, 1, math.nan, math.nan])
    assert m["mIoU"] == pytest.approx(7 / 12)  # (1/2 + 2/3) / 2, not / 4
    assert m["mAcc"] == pytest.approx(3 / 4)  # (1/2 + 1) / 2
    assert m["aAcc"] == pytest.approx(3 / 4)


def test_class_predicted_but_absent_from_label_counts_zero_in_miou_not_in_macc():
    label = [[0, 0], [1, 1]]
    pred = [[0, 2], [1, 1]]
    # intersect [1, 2, 0]  pred [1, 2, 1]  label [2, 2, 0]  union [2, 2, 1]
    m = evaluate(pred, label, 3)
    close(m["IoU"], [1 / 2, 1, 0])  # class 2: 0 / 1
    close(m["Acc"], [1 / 2, 1, math.nan])  # class 2: 0 / 0
    assert m["mIoU"] == pytest.approx(1 / 2)  # (1/2 + 1 + 0) / 3
    assert m["mAcc"] == pytest.approx(3 / 4)  # (1/2 + 1) / 2
    assert m["aAcc"] == pytest.approx(3 / 4)


def test_dataset_level_sums_differ_from_mean_of_per_image_miou():
    a_pred, a_label = np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64)  # all class 0, all right
    b_pred, b_label = np.zeros((1, 2), np.int64), np.ones((1, 2), np.int64)  # class 1 predicted as 0
    # image A alone: IoU [4/4, nan] -> mIoU 1;  image B alone: IoU [0/2, 0/2] -> mIoU 0;  mean = 1/2
    per_image = [evaluate(p, l, 2)["mIoU"] for p, l in ((a_pred, a_label), (b_pred, b_label))]
    assert per_image == [1, 0]
    # summed: intersect [4, 0]  pred [6, 0]  label [4, 2]  union [6, 2] -> IoU [2/3, 0], mIoU 1/3
    ev = SegEvaluator(2)
    ev.update(a_pred, a_label)
    ev.update(b_pred, b_label)
    m = ev.compute()
    close(m["IoU"], [2 / 3, 0])
    assert m["mIoU"] == pytest.approx(1 / 3) and np.mean(per_image) == pytest.approx(1 / 2)
    assert m["mAcc"] == pytest.approx(1 / 2)  # Acc [4/4, 0/2]
    assert m["aAcc"] == pytest.approx(4 / 6)
    assert ev.images == 2
    ev.reset()
    assert ev.areas.sum() == 0 and ev.images == 0


def test_shape_mismatch_and_non_index_maps_are_user_errors():
    ev = SegEvaluator(3)
    with pytest.raises(UserError, match=r"resize the prediction .* label's original size"):
        ev.update(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64))
    with pytest.raises(UserError, match="argmax"):
        ev.update(np.zeros((3, 2, 2), np.int64), np.zeros((2, 2), np.int64))  # logits, not indices
    with pytest.raises(UserError, match="dtype float"):
        ev.update(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64))
    with pytest.raises(UserError, match="num_classes"):
        SegEvaluator(0)
    assert ev.images == 0


def test_matches_mmseg_torch_histc_on_random_maps():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    label = rng.integers(0, 6, (17, 23))  # 5 is out of range for num_classes=5
    label[rng.random(label.shape) < 0.2] = 255
    pred = rng.integers(0, 6, (17, 23))
    # mmseg IoUMetric.intersect_and_union, verbatim in torch
    p, lab = torch.from_numpy(pred), torch.from_numpy(label)
    keep = lab != 255
    p, lab = p[keep], lab[keep]
    hist = lambda x: torch.histc(x.float(), bins=5, min=0, max=4).numpy()
    want_i, want_p, want_l = hist(p[p == lab]), hist(p), hist(lab)
    got = intersect_and_union(torch.from_numpy(pred), torch.from_numpy(label), 5)
    assert [a.tolist() for a in got] == [want_i.tolist(), (want_p + want_l - want_i).tolist(),
                                         want_p.tolist(), want_l.tolist()]
    m = total_area_to_metrics(*got)
    assert m["aAcc"] == pytest.approx(want_i.sum() / want_l.sum())
    assert m["mIoU"] == pytest.approx(np.nanmean(want_i / (want_p + want_l - want_i)))
