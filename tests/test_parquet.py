"""lmms-eval's parquet releases (moebench.eval.parquet): tiny fixtures in their schemas, written from the
shapes world's official files, read into the same samples as the official files give."""

from __future__ import annotations

import base64
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moebench.data import shapes
from moebench.errors import UserError
from moebench.eval.tasks import load_samples, load_task

SMALL = shapes.WorldSpec(n_train=40, n_val=60, pope_images=20)
TASKS = ("pope", "gqa", "vqav2", "textvqa", "scienceqa_img", "mme", "mmbench")


def _image(path):
    return {"bytes": path.read_bytes(), "path": path.name}


def _write(root, rel, rows):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def lmms_eval_release(world, root):
    """The world's benchmarks as lmms-eval's Hugging Face datasets lay them out (columns as on their cards)."""
    val = world / "coco" / "val2014"
    pope = []
    for split in ("adversarial", "popular", "random"):
        for line in (world / "pope" / f"coco_pope_{split}.json").read_text().splitlines():
            r = json.loads(line)
            pope.append({"id": str(len(pope)), "question_id": str(r["question_id"]), "question": r["text"],
                         "answer": r["label"], "image_source": r["image"].rsplit(".", 1)[0],
                         "image": _image(val / r["image"]), "category": split})
    _write(root, "lmms-lab/POPE/data/test-00000-of-00001.parquet", pope)

    gqa = json.loads((world / "gqa" / "testdev_balanced_questions.json").read_text())
    _write(root, "lmms-lab/GQA/testdev_balanced_instructions/testdev-00000-of-00001.parquet",
           [{"id": qid, "imageId": q["imageId"], "question": q["question"], "answer": q["answer"],
             "fullAnswer": q.get("fullAnswer", q["answer"]), "types": q.get("types")} for qid, q in gqa.items()])
    ids = sorted({q["imageId"] for q in gqa.values()})
    _write(root, "lmms-lab/GQA/testdev_balanced_images/testdev-00000-of-00001.parquet",
           [{"id": i, "image": _image(next((world / "gqa" / "images").glob(f"{i}.*")))} for i in ids])

    qs = json.loads((world / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    anns = {a["question_id"]: a for a in
            json.loads((world / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]}
    names = {im["id"]: im["file_name"] for im in
             json.loads((world / "annotations" / "instances_val2014.json").read_text())["images"]}
    _write(root, "lmms-lab/VQAv2/data/validation-00000-of-00001.parquet", [
        {"question_type": "what", "multiple_choice_answer": anns[q["question_id"]]["multiple_choice_answer"],
         "answers": [{"answer": a["answer"], "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(anns[q["question_id"]]["answers"])],
         "image_id": q["image_id"], "answer_type": anns[q["question_id"]]["answer_type"],
         "question_id": q["question_id"], "question": q["question"], "image": _image(val / names[q["image_id"]])}
        for q in qs])

    data = json.loads((world / "textvqa" / "TextVQA_0.5.1_val.json").read_text())["data"]
    _write(root, "lmms-lab/textvqa/data/validation-00000-of-00001.parquet", [
        {"image_id": q["image_id"], "question_id": q["question_id"], "question": q["question"],
         "image": _image(world / "textvqa" / "train_images" / f"{q['image_id']}.jpg"), "answers": q["answers"],
         "ocr_tokens": q["ocr_tokens"], "set_name": "val"} for q in data])

    problems = json.loads((world / "scienceqa" / "problems.json").read_text())
    pids = json.loads((world / "scienceqa" / "pid_splits.json").read_text())["test"]
    _write(root, "lmms-lab/ScienceQA/ScienceQA-IMG/test-00000-of-00001.parquet", [
        {"image": _image(world / "scienceqa" / "images" / "test" / pid / problems[pid]["image"]),
         **{k: problems[pid][k] for k in ("question", "choices", "answer", "hint", "task", "grade", "subject",
                                           "topic", "category", "skill", "lecture", "solution")}} for pid in pids])

    mme = []
    for folder in sorted((world / "MME_Benchmark_release_version").iterdir()):
        for txt in sorted(folder.glob("*.txt")):
            image = next(folder.glob(f"{txt.stem}.*[!t]"))
            for line in txt.read_text().splitlines():
                question, answer = line.rsplit("\t", 1)
                mme.append({"question_id": f"{folder.name}/{image.name}", "image": _image(image),
                            "question": question, "answer": answer, "category": folder.name})
    _write(root, "lmms-lab/MME/data/test-00000-of-00001.parquet", mme)

    with open(world / "mmbench" / "mmbench_dev_20230712.tsv", newline="") as f:
        tsv = list(csv.DictReader(f, delimiter="\t"))
    _write(root, "lmms-lab/MMBench/en/dev-00000-of-00001.parquet", [
        {"index": int(r["index"]), "question": r["question"], "hint": None if r["hint"] == "nan" else r["hint"],
         "answer": r["answer"], **{k: None if r[k] == "nan" else r[k] for k in "ABCD"}, "category": r["category"],
         "image": {"bytes": base64.b64decode(r["image"]), "path": None}, "source": "shapes",
         "L2-category": r["l2-category"], "comment": None, "split": "dev"} for r in tsv])


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    world = shapes.ensure_world(SMALL, root=tmp_path_factory.mktemp("cache") / "world", progress=False)
    release = tmp_path_factory.mktemp("lmms_eval")
    lmms_eval_release(world, release)
    return world, release


def _comparable(sample, keep_id: bool):
    return ((sample.question_id if keep_id else None), sample.split, sample.question, sample.target,
            sample.groups, sample.image.read_bytes())


@pytest.mark.parametrize("name", TASKS)
def test_lmms_eval_release_reads_into_the_official_files_samples(roots, name):
    """Same prompts, targets, breakdown groups and image bytes from the parquet release as from the
    official files (ScienceQA's release has no problem id: its ids are row numbers)."""
    world, release = roots
    task = load_task(name)
    official, parquet = load_samples(task, world), load_samples(task, release)
    keep_id = name != "scienceqa_img"
    key = (lambda s: (s.split, s.question_id)) if keep_id else (lambda s: (s.split, s.question, s.image.read_bytes()))
    assert len(parquet) == len(official) > 0
    assert [_comparable(s, keep_id) for s in sorted(parquet, key=key)] == \
        [_comparable(s, keep_id) for s in sorted(official, key=key)]


def test_official_files_win_over_the_release(roots, tmp_path):
    """With both on disk the official files are read (the parquet glob is the fallback)."""
    world, release = roots
    (world / "lmms-lab").symlink_to(release / "lmms-lab", target_is_directory=True)
    try:
        samples = load_samples(load_task("scienceqa_img"), world)
        assert {s.image.parent.parent.name for s in samples} == {"test"}  # scienceqa/images/test/<pid>/
    finally:
        (world / "lmms-lab").unlink()


def test_a_release_file_of_another_schema_is_one_clear_error(tmp_path):
    _write(tmp_path, "lmms-lab/MME/data/test-00000-of-00001.parquet", [{"question": "q?", "answer": "Yes"}])
    with pytest.raises(UserError, match=r"no column question_id, category, image; expected lmms-eval's release"):
        load_samples(load_task("mme"), tmp_path)
    (tmp_path / "lmms-lab/MME/data/test-00000-of-00001.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a parquet file"):
        load_samples(load_task("mme"), tmp_path)


def test_eval_and_score_read_the_release(roots, tiny_run, tmp_path, capsys):
    """`moebench eval --data` on a data root that holds only lmms-eval's release writes rows for its tasks,
    and `moebench score` re-scores the written answers from the same root to the same numbers."""
    from conftest import run_cli
    from moebench import results

    _, release = roots
    run, _ = tiny_run
    code, _, err = run_cli(["eval", "--model", run.dir, "--tasks", "mme,mmbench", "--data", release,
                            "--results", tmp_path, "--no-progress"], capsys)
    assert code == 0, err
    rows = results.read_rows([tmp_path], "metrics")
    assert {r["task"] for r in rows} == {"mme", "mmbench"}
    assert all(r["dataset_hash"] for r in rows)

    answers = [r for r in results.read_rows([tmp_path], "samples") if r["task"] == "mme"]
    pred = tmp_path / "mme_answers.jsonl"
    pred.write_text("".join(json.dumps({"question_id": r["question_id"], "text": r["prediction"]}) + "\n"
                            for r in answers))
    code, _, err = run_cli(["score", "--task", "mme", "--predictions", pred, "--data", release,
                            "--results", tmp_path / "scored"], capsys)
    assert code == 0, err
    scored = {(r["split"], r["metric"]): r["value"] for r in results.read_rows([tmp_path / "scored"], "metrics")}
    evaluated = {(r["split"], r["metric"]): r["value"] for r in rows if r["task"] == "mme"}
    assert scored == evaluated and scored
