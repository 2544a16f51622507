"""`moebench score`: other harnesses' prediction files, LLaVA's answer layout, scored by the official rules."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from moebench import results


@pytest.fixture(scope="module")
def root(tiny_recipe):
    from moebench.data.sources import resolve

    return resolve("shapes", tiny_recipe.data.world, progress=False).root


def _pope_questions(root, split):
    return [json.loads(line) for line in (root / "pope" / f"coco_pope_{split}.json").read_text().splitlines()]


def test_pope_llava_answer_file_all_yes(root, tmp_path, capsys):
    """Answering "Yes, there is." to every balanced POPE question: accuracy 0.5, precision 0.5, recall 1,
    F1 2/3, yes-ratio 1 (POPE's parser keeps the text before '.' and finds no "no")."""
    qs = _pope_questions(root, "random")
    path = tmp_path / "llava_answers.jsonl"
    path.write_text("".join(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": "Yes, there is.",
                                        "answer_id": "x", "model_id": "other"}) + "\n" for q in qs))
    code, out, err = run_cli(["score", "--task", "pope", "--predictions", path, "--data", root, "--split", "random",
                              "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    rows = {r["metric"]: r["value"] for r in results.read_rows([tmp_path / "res"], "metrics") if r["split"] == "random"}
    assert rows["accuracy"] == pytest.approx(0.5) and rows["precision"] == pytest.approx(0.5)
    assert rows["recall"] == pytest.approx(1.0) and rows["f1"] == pytest.approx(2 / 3)
    assert rows["yes_ratio"] == pytest.approx(1.0)
    samples = results.read_rows([tmp_path / "res"], "samples")
    assert len(samples) == len(qs) and samples[0]["run"] == "llava_answers"


def test_pope_splits_need_a_split_when_ids_overlap(root, tmp_path, capsys):
    qs = _pope_questions(root, "random")
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"question_id": q["question_id"], "text": "No"}) + "\n" for q in qs))
    code, _, err = run_cli(["score", "--task", "pope", "--predictions", path, "--data", root,
                            "--results", tmp_path / "res"], capsys)
    assert code == 2 and "--split" in err


def test_gqa_answers_with_llava_normaliser_and_missing_ones(root, tmp_path, capsys):
    """"Yes." matches "yes" under LLaVA's rstrip('.').lower(); a missing prediction counts as wrong."""
    qs = json.loads((root / "gqa" / "testdev_balanced_questions.json").read_text())
    ids = sorted(qs)
    lines = [json.dumps({"question_id": q, "answer": qs[q]["answer"].capitalize() + "."}) for q in ids[1:]]
    path = tmp_path / "gqa.jsonl"
    path.write_text("\n".join(lines))
    code, _, err = run_cli(["score", "--task", "gqa", "--predictions", path, "--data", root,
                            "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    (row,) = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["metric"] == "exact_match"
              and not r["group"]]
    assert row["value"] == pytest.approx((len(ids) - 1) / len(ids))
    assert json.loads(row["extra"])["missing_predictions"] == 1
    assert "1 questions had no prediction" in err


def test_malformed_predictions_are_one_line_errors(root, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question_id": 1}) + "\n")
    code, _, err = run_cli(["score", "--task", "gqa", "--predictions", path, "--data", root], capsys)
    assert code == 2 and "record 1 (question_id 1) has no answer" in err
    code, _, err = run_cli(["score", "--task", "gqa", "--predictions", tmp_path / "none.jsonl", "--data", root], capsys)
    assert code == 2 and "missing predictions file" in err


@pytest.mark.parametrize("protocol", ["official", "llava"])
def test_vqav2_predictions_scored_with_official_vqa_accuracy(root, tmp_path, capsys, protocol):
    """Predicting each question's first annotator answer scores the official leave-one-out accuracy; under
    the llava protocol the prediction goes through LLaVA's answer processor first. Rows name the protocol,
    and the answer-type breakdown rows average to the whole."""
    from moebench.eval.metrics import m4c_normalize, vqa_score

    anns = json.loads((root / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    path = tmp_path / "vqa.json"  # the VQAv2 submission layout: a JSON list
    path.write_text(json.dumps([{"question_id": a["question_id"], "answer": a["answers"][0]["answer"]} for a in anns]))
    code, _, err = run_cli(["score", "--task", "vqav2", "--predictions", path, "--data", root, "--protocol", protocol,
                            "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    rows = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["metric"] == "accuracy"]
    (row,) = [r for r in rows if not r["group"]]
    prep = m4c_normalize if protocol == "llava" else (lambda x: x)
    expected = sum(vqa_score(prep(a["answers"][0]["answer"]), [x["answer"] for x in a["answers"]])
                   for a in anns) / len(anns)
    assert row["value"] == pytest.approx(expected) and row["protocol"] == protocol
    assert 0.3 < row["value"] < 1.0  # annotators disagree, so some questions score below 1
    groups = [r for r in rows if r["group"]]
    if any(a.get("answer_type") for a in anns):
        assert {r["group"].split("=")[0] for r in groups} == {"answer_type"}
        assert sum(r["value"] * r["n"] for r in groups) / sum(r["n"] for r in groups) == pytest.approx(row["value"])


def test_question_without_answer_and_broken_image_are_one_line_errors(root, tmp_path, capsys):
    import shutil

    bad = tmp_path / "root"
    shutil.copytree(root / "vqav2", bad / "vqav2")
    anns = json.loads((bad / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())
    dropped = anns["annotations"].pop(0)["question_id"]
    (bad / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(anns))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question_id": dropped, "answer": "yes"}) + "\n")
    code, _, err = run_cli(["score", "--task", "vqav2", "--predictions", path, "--data", bad], capsys)
    assert code == 2 and f"question {dropped} has no annotation" in err and "v2_mscoco_val2014_annotations" in err

    from moebench.data.images import load_image
    from moebench.errors import UserError

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png does not decode"):
        load_image(broken)


def test_per_split_pope_and_mean_f1():
    """Two POPE splits scored by the runner: per-split F1 and their mean."""
    from pathlib import Path

    from moebench.eval.runner import score
    from moebench.eval.tasks import Sample, load_task

    def rec(split, target, pred):
        return {"sample": Sample("1", split, Path("x.png"), "q", target), "prediction": pred}

    # split a: 2 yes, 2 no; predicted yes, yes, yes, no -> TP 2, FP 1, FN 0: P 2/3, R 1, F1 0.8
    # split b: predicted no everywhere -> TP 0: F1 0
    records = [rec("a", "yes", "Yes"), rec("a", "yes", "yes"), rec("a", "no", "Yes."), rec("a", "no", "No"),
               rec("b", "yes", "no"), rec("b", "no", "No, not at all")]
    rows, scores = score(load_task("pope"), records)
    f1 = {r["split"]: r["value"] for r in rows if r["metric"] == "f1"}
    assert f1["a"] == pytest.approx(0.8) and f1["b"] == 0.0 and f1["mean"] == pytest.approx(0.4)
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
