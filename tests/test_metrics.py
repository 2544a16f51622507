"""Metrics against hand-worked cases (numbers computed by hand in the comments)."""

import pytest

from moebench.errors import UserError
from moebench.eval import metrics as M


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),  # "No" before the '.'
        ("There is not a cat", "no"),  # "not"
        ("no", "no"),
        ("No", "no"),
        ("Nope", "yes"),  # only the exact words No / not / no count
        ("Yes. No.", "yes"),  # only the text before the first '.' is read
        ("no, it is", "no"),  # the comma is dropped, "no" remains
        ("No, there is no dog.", "no"),
        ("yes", "yes"),
        ("", "yes"),
        ("NO", "yes"),  # case-sensitive, as the original
        ("There is nothing", "yes"),  # "nothing" is not "no"
        ("I do not think so.", "no"),
        ("Yes, no", "no"),  # comma removed -> words "Yes", "no"
    ],
)
def test_pope_parse(text, expected):
    assert M.pope_parse(text) == expected


def test_pope_metrics_hand_confusion():
    # 10 samples, yes = positive: TP=4, FP=1, TN=3, FN=2
    labels = ["yes"] * 4 + ["no"] * 1 + ["no"] * 3 + ["yes"] * 2
    preds = ["Yes, there is."] * 4 + ["yes"] * 1 + ["No."] * 3 + ["There is not."] * 2
    m = M.pope_metrics(preds, labels)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert m["accuracy"] == pytest.approx(0.7)  # (TP+TN)/N = 7/10
    assert m["precision"] == pytest.approx(0.8)  # TP/(TP+FP) = 4/5
    assert m["recall"] == pytest.approx(0.6666666666666666)  # TP/(TP+FN) = 4/6
    assert m["f1"] == pytest.approx(0.7272727272727273)  # 2PR/(P+R) = 2TP/(2TP+FP+FN) = 8/11
    assert m["yes_ratio"] == pytest.approx(0.5)  # predicted yes (TP+FP)/N = 5/10, not GT yes 6/10


def test_pope_yes_ratio_counts_predictions_not_labels():
    # all labels yes, model says no 3 of 4 times: predicted-yes share 1/4 (lmms-eval would say 4/4)
    m = M.pope_metrics(["no", "no", "no", "yes"], ["yes"] * 4)
    assert m["yes_ratio"] == pytest.approx(0.25)


def test_pope_zero_division_gives_zero():
    # never predicts yes, never a positive label: TP=FP=FN=0
    m = M.pope_metrics(["No."] * 3, ["no"] * 3)
    assert m == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert M.pope_metrics([], []) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_pope_bad_labels_and_lengths():
    with pytest.raises(UserError, match="maybe"):
        M.pope_metrics(["yes"], ["maybe"])
    with pytest.raises(UserError, match="pair up"):
        M.pope_metrics(["yes", "no"], ["yes"])
    assert M.pope_metrics(["yes"], [" Yes "])["accuracy"] == 1.0  # case / blanks in labels ignored


@pytest.mark.parametrize(
    "text, llava, lmms",
    [
        ("Yes.", "yes", "yes"),
        ("Left.", "left", "left"),
        ("red,", "red,", "red"),  # llava keeps the comma; lmms-eval drops all punctuation
        (" Table ", " table ", "table"),  # llava does not strip blanks
        ("t-shirt", "t-shirt", "tshirt"),  # lmms-eval deletes the hyphen inside a word too
        ("Left...", "left", "left"),  # rstrip removes every trailing '.'
        ("Left .", "left ", "left "),  # lmms-eval strips before deleting '.', so a blank remains
        ("U.S.", "u.s", "us"),
    ],
)
def test_gqa_normalizers(text, llava, lmms):
    assert M.gqa_normalize(text) == llava
    assert M.gqa_normalize(text, "llava") == llava
    assert M.gqa_normalize(text, "lmms_eval") == lmms


def test_gqa_unknown_normalizer_hints():
    with pytest.raises(UserError, match="did you mean 'lmms_eval'"):
        M.gqa_normalize("yes", "lmms-eval")


def test_exact_match():
    preds = ["Yes.", "Left.", "red,", "Blue"]
    targets = ["yes", "left", "red", "green"]
    acc, scores = M.exact_match(preds, targets)  # llava: "red," != "red"
    assert scores == [1.0, 1.0, 0.0, 0.0]
    assert acc == pytest.approx(0.5)  # 2/4
    acc, scores = M.exact_match(preds, targets, normalizer="lmms_eval")
    assert scores == [1.0, 1.0, 1.0, 0.0]
    assert acc == pytest.approx(0.75)  # 3/4
    # llava compares with the stored target; lmms_eval normalises the target as well
    assert M.exact_match(["yes"], ["Yes"])[1] == [0.0]
    assert M.exact_match(["yes"], ["Yes"], normalizer="lmms_eval")[1] == [1.0]
    assert M.exact_match([], []) == (0.0, [])
    with pytest.raises(UserError):
        M.exact_match(["a"], [])


def test_majority_baseline():
    assert M.majority_baseline(["no", "yes", "no", "no"]) == ("no", 0.75)
    assert M.majority_baseline(["yes", "no"]) == ("no", 0.5)  # tie -> first in sorted order
    assert M.majority_baseline(["b", "a", "c", "b", "a"]) == ("a", 0.4)
    with pytest.raises(UserError):
        M.majority_baseline([])


def test_registry_and_baseline_values():
    r = M.compute("pope", ["Yes.", "No, not", "yes"], ["yes", "no", "no"])
    assert r.scores == [1.0, 1.0, 0.0]
    assert r.values["accuracy"] == pytest.approx(2 / 3)
    r = M.compute("exact_match", ["Red,"], ["red"], normalizer="lmms_eval")
    assert r.values == {"exact_match": 1.0} and r.scores == [1.0]
    with pytest.raises(UserError, match="did you mean 'exact_match'"):
        M.get_metric("exact_mach")
    # majority predictor on POPE labels yes,no,no: always "no" -> accuracy 2/3, no yes predicted
    b = M.baseline_values("pope", ["yes", "no", "no"])
    assert b["accuracy"] == pytest.approx(2 / 3) and b["yes_ratio"] == 0.0 and b["f1"] == 0.0
    assert M.baseline_values("exact_match", ["left", "right", "left"]) == {"exact_match": pytest.approx(2 / 3)}
