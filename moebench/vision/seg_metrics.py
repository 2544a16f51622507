"""Semantic segmentation metrics (mIoU, mAcc, aAcc) exactly as mmsegmentation defines them.

Reference: mmsegmentation `mmseg/evaluation/metrics/iou_metric.py`, class `IoUMetric`:

* `IoUMetric.intersect_and_union(pred_label, label, num_classes, ignore_index)`: drop the pixels whose
  label is `ignore_index`, then histogram over the bins 0..num_classes-1 (`torch.histc`, which skips values
  outside that range) the intersection (pixels where pred == label), the prediction and the label;
  union = pred + label - intersect.
* `reduce_zero_label` (mmseg 0.x `intersect_and_union`, 1.x `LoadAnnotations`): on the ground truth,
  0 -> 255, then label - 1, then 254 -> 255, so class 0 ("other"/background) becomes ignored and the
  classes 1..K become 0..K-1 (ADE20K).
* `IoUMetric.total_area_to_metrics`: the four areas are summed over *all* images first; then
  IoU = intersect / union and Acc = intersect / label per class, aAcc = sum(intersect) / sum(label),
  and `compute_metrics` reports mIoU = nanmean(IoU), mAcc = nanmean(Acc).

So a class absent from both prediction and label (union 0) has IoU NaN and is left out of mIoU; a class
predicted but absent from the label has IoU 0 (counts in mIoU) and Acc NaN (left out of mAcc).
Values here are fractions in [0, 1] (mmseg prints percentages rounded to 2 decimals).
"""

from __future__ import annotations

import numpy as np

from moebench.errors import UserError


def _as_int_map(x, what: str) -> np.ndarray:
    """A 2-D integer numpy array from a numpy array or a (CPU or GPU) torch tensor."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"segmentation {what} has shape {tuple(x.shape)}: expected an HxW map of class indices "
                        f"(take argmax over the class axis of the logits first)")
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == bool):
        raise UserError(f"segmentation {what} has dtype {x.dtype}: expected integer class indices "
                        f"(take argmax over the class axis of the logits first)")
    return x.astype(np.int64)


def reduce_zero_label_map(label) -> np.ndarray:
    """mmseg's reduce_zero_label on a ground-truth map: 0 -> 255, then label - 1, then 254 -> 255."""
    label = np.array(label, dtype=np.int64)  # a copy, never the caller's array
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


def _histc(values: np.ndarray, num_classes: int) -> np.ndarray:
    """torch.histc(values, bins=num_classes, min=0, max=num_classes - 1) for integer values: counts of
    0..num_classes-1, values outside that range are skipped."""
    values = values[(values >= 0) & (values < num_classes)]
    return np.bincount(values, minlength=num_classes).astype(np.int64)


def intersect_and_union(pred, label, num_classes: int, ignore_index: int = 255,
                        reduce_zero_label: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel counts for one image, as mmseg `IoUMetric.intersect_and_union`.

    `pred` and `label` are HxW class-index maps of the same shape (the label's original resolution).
    Returns (area_intersect, area_union, area_pred, area_label), each an int64 array of num_classes,
    in mmseg's order (the argument order of `total_area_to_metrics`). Like torch.histc there, class
    values outside 0..num_classes-1 (other than ignore_index) are silently left out of every area.
    """
    pred, label = _as_int_map(pred, "prediction"), _as_int_map(label, "label")
    if pred.shape != label.shape:
        raise UserError(f"segmentation prediction has shape {pred.shape} but its label has {label.shape}: "
                        f"resize the prediction (logits, bilinear) to the label's original size before argmax")
    if num_classes < 1:
        raise UserError(f"num_classes={num_classes}: must be >= 1")
    if reduce_zero_label:
        label = reduce_zero_label_map(label)
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    area_intersect = _histc(pred[pred == label], num_classes)
    area_pred = _histc(pred, num_classes)
    area_label = _histc(label, num_classes)
    area_union = area_pred + area_label - area_intersect
    return area_intersect, area_union, area_pred, area_label


def total_area_to_metrics(total_intersect, total_union, total_pred, total_label) -> dict:
    """Dataset metrics from areas summed over all images, as mmseg `IoUMetric.total_area_to_metrics`
    (metrics=['mIoU']) followed by the nanmean of `IoUMetric.compute_metrics`.

    IoU[c] = intersect[c] / union[c], Acc[c] = intersect[c] / label[c] (NaN where the divisor is 0),
    mIoU = nanmean(IoU), mAcc = nanmean(Acc), aAcc = sum(intersect) / sum(label). `total_pred` is
    not needed for these (mmseg uses it for Dice/F-score) and is accepted to keep the area tuple whole.
    """
    inter, union = np.asarray(total_intersect, np.float64), np.asarray(total_union, np.float64)
    label = np.asarray(total_label, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / label
        a_acc = inter.sum() / label.sum()
    return {"mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "aAcc": float(a_acc),
            "IoU": iou.tolist(), "Acc": acc.tolist()}


def _nanmean(x: np.ndarray) -> float:
    """np.nanmean without its all-NaN RuntimeWarning: NaN when every entry is NaN."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


class SegEvaluator:
    """Accumulates the four per-class areas over a dataset, then reports mmseg's IoUMetric numbers.

    >>> ev = SegEvaluator(num_classes=150, reduce_zero_label=True)   # ADE20K
    >>> for pred, label in pairs: ev.update(pred, label)            # HxW maps at the label's size
    >>> ev.compute()["mIoU"]
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False):
        if num_classes < 1:
            raise UserError(f"num_classes={num_classes}: must be >= 1")
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.reset()

    def reset(self) -> None:
        self.areas = np.zeros((4, self.num_classes), np.int64)  # intersect, union, pred, label
        self.images = 0

    def update(self, pred, label) -> None:
        """Add one image: `pred` and `label` are HxW integer arrays or tensors of the same shape."""
        self.areas += np.stack(intersect_and_union(pred, label, self.num_classes, self.ignore_index,
                                                   self.reduce_zero_label))
        self.images += 1

    def compute(self) -> dict:
        """{"mIoU", "mAcc", "aAcc": float, "IoU", "Acc": per-class lists}; fractions, NaN where undefined."""
        return total_area_to_metrics(*self.areas)
