"""Answer parsing and metrics: POPE, exact match (GQA), the majority-answer baseline.

Every metric lives here once. Each function's docstring names the reference it reproduces; the
values are fractions in [0, 1] (callers multiply by 100 for papers' tables if they want).

Registry: `METRICS` maps a task YAML's metric name to a `MetricFn`,
`fn(predictions, targets, **options) -> MetricResult(values, scores)` where `values` are the
aggregate numbers (one metrics-table row each) and `scores` the per-sample scores (samples table).
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from moebench.errors import UserError
from moebench.registry import Registry, did_you_mean

# --------------------------------------------------------------------------------------------- POPE

POPE_NO_WORDS = ("No", "not", "no")


def pope_parse(text: str) -> str:
    """Map a free-form answer to "yes" / "no" with the original POPE rule.

    POPE `evaluate.py` and LLaVA `llava/eval/eval_pope.py`: keep the text before the first '.',
    drop commas, split on single spaces; "no" if any word is exactly "No", "not" or "no", else "yes".
    Case-sensitive and split on ' ' only, as the original: "NO" or "no\\n" parse as "yes".
    Idempotent on "yes" / "no".
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in POPE_NO_WORDS for w in words) else "yes"


def _check_lengths(preds: Sequence, targets: Sequence, what: str) -> None:
    if len(preds) != len(targets):
        raise UserError(f"{what}: {len(preds)} predictions but {len(targets)} targets; they must pair up")


def _pope_label(label: str, i: int) -> str:
    norm = label.strip().lower() if isinstance(label, str) else label
    if norm not in ("yes", "no"):
        raise UserError(f"POPE label #{i} is {label!r}; POPE labels must be 'yes' or 'no'")
    return norm


def pope_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE accuracy, precision, recall, F1 and yes-ratio, with "yes" as the positive class.

    Definitions of LLaVA `eval_pope.py` (Li et al. 2023, "Evaluating Object Hallucination in Large
    Vision-Language Models"): predictions go through `pope_parse` (so raw model text or already
    parsed "yes"/"no" both work); accuracy = (TP+TN)/N, precision = TP/(TP+FP),
    recall = TP/(TP+FN), F1 = 2PR/(P+R), yes_ratio = (TP+FP)/N, the share of *predicted* yes.
    (lmms-eval's `pope_aggregate_yes_ratio` counts ground-truth yes instead; not copied.)
    A zero denominator gives 0.0. Labels must be "yes"/"no" (case and surrounding blanks ignored).
    """
    _check_lengths(preds, labels, "pope")
    tp = fp = tn = fn = 0
    for i, (pred, label) in enumerate(zip(preds, labels)):
        pred_yes = pope_parse(pred) == "yes"
        label_yes = _pope_label(label, i) == "yes"
        if pred_yes and label_yes:
            tp += 1
        elif pred_yes:
            fp += 1
        elif label_yes:
            fn += 1
        else:
            tn += 1
    n = tp + fp + tn + fn
    precision = _div(tp, tp + fp)
    recall = _div(tp, tp + fn)
    return {
        "accuracy": _div(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "yes_ratio": _div(tp + fp, n),
    }


def _div(a: float, b: float) -> float:
    return float(a) / b if b else 0.0


# ---------------------------------------------------------------------------- GQA / exact match

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def _llava_prediction(text: str) -> str:
    # LLaVA scripts/convert_gqa_for_eval.py: answer.rstrip('.').lower()
    return text.rstrip(".").lower()


def _llava_target(text: str) -> str:
    # GQA's official eval.py compares the converted prediction with the answer as stored.
    return text


def _lmms_eval_prediction(text: str) -> str:
    # lmms-eval: ConfigurableTask.process_results strips generate_until output, then the gqa task's
    # exact_match (ignore_case, ignore_punctuation) lower-cases and deletes string.punctuation.
    return text.strip().lower().translate(_PUNCT_TABLE)


def _lmms_eval_target(text: str) -> str:
    # the same exact_match applies ignore_case / ignore_punctuation to the reference (no strip).
    return text.lower().translate(_PUNCT_TABLE)


# name -> (prediction rule, target rule)
GQA_NORMALIZERS: dict[str, tuple[Callable[[str], str], Callable[[str], str]]] = {
    "llava": (_llava_prediction, _llava_target),
    "lmms_eval": (_lmms_eval_prediction, _lmms_eval_target),
}


def _normalizer(name: str) -> tuple[Callable[[str], str], Callable[[str], str]]:
    if name not in GQA_NORMALIZERS:
        raise UserError(
            f"unknown normalizer {name!r}{did_you_mean(name, GQA_NORMALIZERS)}; known: {', '.join(sorted(GQA_NORMALIZERS))}"
        )
    return GQA_NORMALIZERS[name]


def gqa_normalize(text: str, normalizer: str = "llava") -> str:
    """Normalise a predicted GQA answer before exact match.

    "llava": `text.rstrip('.').lower()` (LLaVA `scripts/convert_gqa_for_eval.py`, the numbers in the
    LLaVA-1.5 / MoE-LLaVA papers). "lmms_eval": `text.strip()`, lower-case, then every character of
    `string.punctuation` deleted (lmms-eval `tasks/gqa/gqa.yaml`: exact_match with ignore_case and
    ignore_punctuation, after the task strips the generation). Note the order: "Left ." becomes
    "left " (strip happens before the '.' goes). Unknown names raise UserError.
    """
    return _normalizer(normalizer)[0](text)


def gqa_normalize_target(text: str, normalizer: str = "llava") -> str:
    """The target side of `gqa_normalize`: unchanged for "llava" (GQA `eval.py` compares with the
    stored answer), lower-cased without punctuation for "lmms_eval" (its exact_match treats both)."""
    return _normalizer(normalizer)[1](text)


def exact_match(
    preds: Sequence[str], targets: Sequence[str], normalizer: str = "llava"
) -> tuple[float, list[float]]:
    """Exact-match accuracy after `gqa_normalize` (prediction) and `gqa_normalize_target` (target).

    GQA testdev-balanced accuracy as in GQA `eval.py` (`predicted == gold`, averaged over questions).
    Returns (accuracy, per-sample scores of 1.0 / 0.0); accuracy is 0.0 for no samples.
    """
    _check_lengths(preds, targets, "exact_match")
    pred_rule, target_rule = _normalizer(normalizer)
    scores = [float(pred_rule(p) == target_rule(t)) for p, t in zip(preds, targets)]
    return _div(sum(scores), len(scores)), scores


# ------------------------------------------------------------------------------ majority baseline


def majority_baseline(targets: Sequence[str]) -> tuple[str, float]:
    """The most frequent target and its share of all targets (the "always answer X" predictor).

    Ties go to the first answer in sorted order, so the baseline is deterministic. An empty target
    list is a UserError (there is no majority of nothing).
    """
    if len(targets) == 0:
        raise UserError("majority baseline of an empty target list; the task has no samples")
    counts = Counter(targets)
    answer = min(counts, key=lambda a: (-counts[a], a))
    return answer, counts[answer] / len(targets)


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class MetricResult:
    """values: metric name -> aggregate value (one metrics row each); scores: one per sample."""

    values: dict[str, float]
    scores: list[float]


MetricFn = Callable[..., MetricResult]
METRICS: Registry[MetricFn] = Registry("metric")


@METRICS.register("pope")
def _pope(preds: Sequence[str], targets: Sequence[str]) -> MetricResult:
    values = pope_metrics(preds, targets)
    scores = [float(pope_parse(p) == _pope_label(t, i)) for i, (p, t) in enumerate(zip(preds, targets))]
    return MetricResult(values, scores)


@METRICS.register("exact_match")
def _exact_match(preds: Sequence[str], targets: Sequence[str], normalizer: str = "llava") -> MetricResult:
    accuracy, scores = exact_match(preds, targets, normalizer=normalizer)
    return MetricResult({"exact_match": accuracy}, scores)


def get_metric(name: str) -> MetricFn:
    """The metric function registered as `name`; unknown names raise UserError with a hint."""
    return METRICS.get(name)


def compute(name: str, preds: Sequence[str], targets: Sequence[str], **options) -> MetricResult:
    """Run metric `name` on predictions vs targets (options, e.g. normalizer, go to the metric)."""
    return get_metric(name)(preds, targets, **options)


def baseline_values(name: str, targets: Sequence[str], **options) -> dict[str, float]:
    """Metric `name` for the majority-answer predictor (the `baseline` column of the metrics table)."""
    answer, _ = majority_baseline(targets)
    return compute(name, [answer] * len(targets), targets, **options).values
