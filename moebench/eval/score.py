"""`moebench score`: score another harness's predictions with moebench's metrics and write the same rows.

Accepted layouts (one prediction per question; the answer field is the first of these present):
  JSON lines   {"question_id": ..., "answer": ...}            moebench / generic
               {"question_id": ..., "text": ..., "prompt": ...}  LLaVA `model_vqa*.py` answer files
               {"question_id": ..., "prediction": ...}
  JSON list    [{"question_id": ..., "answer": ...}, ...]       the VQAv2 / EvalAI submission format
A record may name its split with "split" (or "category", as POPE files do); otherwise, for a task with
several splits, use --split. Questions without a prediction are scored as wrong and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from moebench import results
from moebench.errors import MissingFile, UserError

ANSWER_KEYS = ("answer", "text", "prediction", "pred")


def read_predictions(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise MissingFile(path, "predictions file", "give a JSONL file of {question_id, answer} records")
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON or JSON lines ({e})") from None
    out = []
    for i, r in enumerate(items):
        if not isinstance(r, dict) or "question_id" not in r:
            raise UserError(f"{path}: record {i + 1} has no question_id; each record needs question_id and an answer")
        key = next((k for k in ANSWER_KEYS if k in r), None)
        if key is None:
            raise UserError(f"{path}: record {i + 1} (question_id {r['question_id']}) has no answer; "
                            f"expected one of {list(ANSWER_KEYS)}")
        out.append({"question_id": str(r["question_id"]), "answer": str(r[key]),
                    "split": r.get("split", r.get("category"))})
    return out


def score_predictions(task_name: str, predictions: Path, *, data_root: Path, data_name: str, data_hash: str | None,
                      results_dir: Path, name: str | None = None, splits: list[str] | None = None,
                      protocol: str | None = None) -> list[dict]:
    """Metric rows for `predictions` on `task_name` (under `protocol`, default the task file's); metric and
    sample rows are appended to results_dir."""
    from moebench.eval.metrics import PROTOCOLS
    from moebench.eval.runner import _questions_hash, _target_text, score
    from moebench.eval.tasks import load_samples, load_task

    task = load_task(task_name)
    if protocol:
        if protocol not in PROTOCOLS:
            raise UserError(f"--protocol {protocol!r}: choose one of {list(PROTOCOLS)}")
        task.protocol = protocol
    if splits:
        bad = [s for s in splits if s not in task.splits]
        if bad:
            raise UserError(f"--split {bad[0]!r}: task {task.name} has splits {task.splits}")
        task.splits = splits
    samples = load_samples(task, data_root)
    preds = read_predictions(predictions)
    by_split, plain = {}, {}
    for p in preds:
        (by_split.setdefault(p["split"], {}) if p["split"] else plain)[p["question_id"]] = p["answer"]
    if len(task.splits) > 1 and plain and not by_split:
        ids = [s.question_id for s in samples]
        if len(ids) != len(set(ids)):
            raise UserError(f"task {task.name} has splits {task.splits} whose question ids overlap; give the "
                            "split in each record ('split' or 'category') or score one split with --split")
    records, missing = [], 0
    for s in samples:
        answer = by_split.get(s.split, {}).get(s.question_id, plain.get(s.question_id))
        if answer is None:
            missing += 1
            answer = ""
        records.append({"sample": s, "prediction": answer})
    if missing == len(samples):
        raise UserError(f"{predictions}: none of its question ids matches a {task.name} question; "
                        "check the task, the split and the data root")
    metric_rows, scores = score(task, records)
    run = name or Path(predictions).stem
    stamp = results.utc_now()
    dh = data_hash or _questions_hash(task, data_root)
    # The versions installed here: moebench's metrics scored these predictions, whatever produced them.
    versions = results.software_versions()
    rows = [{**r, "run": run, "task": task.name, "dataset": data_name, "dataset_hash": dh,
             "task_version": task.version, "normalizer": task.normalizer or None, "protocol": task.protocol, **versions,
             "extra": {"scored_file": str(predictions), "missing_predictions": missing}, "timestamp": stamp}
            for r in metric_rows]
    results.append_rows(results_dir, "metrics", run, rows)
    results.append_rows(results_dir, "samples", run, [
        {"run": run, "task": task.name, "split": r["sample"].split, "question_id": r["sample"].question_id,
         "image": r["sample"].image.name, "prompt": r["sample"].question, "prediction": r["prediction"],
         "target": _target_text(r["sample"].target), "score": sc, "timestamp": stamp} for r, sc in zip(records, scores)])
    return rows
