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
    (row,) = [r for r in results.read_rows([tmp_path / "res"], "metrics") if r["metric"] == "exact_match"]
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
