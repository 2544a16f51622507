"""A catalogue of bad inputs. Each case runs the real CLI and must exit with code 2 and one line that
names the problem, print no traceback, and leave what was already written (a trained run, a results
folder) exactly as it was: same bytes, same modification times, no new rows."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, run_cli
from moebench import results

DENSE = REPO / "recipes" / "shapes_dense.yaml"
MOE = REPO / "recipes" / "shapes_moe.yaml"


@dataclass
class Env:
    """What a case works with: an existing run and results folder that must survive it, the shapes
    world (real-format files to copy and spoil) and a scratch folder for the bad input."""

    runs: Path
    results: Path
    run: Path
    world: Path
    tmp: Path

    def eval(self, *args, model: Path | None = None) -> list:
        return ["eval", "--model", model or self.run, "--results", self.results, "--limit", "2", "--batch-size", "2",
                "--no-progress", *args]

    def train(self, recipe: Path, *overrides: str) -> list:
        """Tiny sizes first, so that a case the checks miss trains in seconds (and fails the test) instead of minutes."""
        return ["train", recipe, *TINY, *overrides, "--runs", self.runs, "--results", self.results, "--no-eval",
                "--no-progress"]

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def recipe(self, edit, base: Path = DENSE) -> Path:
        """The shipped recipe, changed by `edit(raw dict)`, written beside the shipped ones' parents."""
        raw = yaml.safe_load(base.read_text())
        edit(raw)
        return self.file("bad.yaml", yaml.safe_dump(raw))

    def task(self, edit) -> Path:
        raw = yaml.safe_load((REPO / "tasks" / "gqa.yaml").read_text())
        edit(raw)
        return self.file("tasks/bad.yaml", yaml.safe_dump(raw))  # `validate` reads files under tasks/ as tasks

    def gqa_root(self, questions, images: Path | None = None) -> Path:
        """A data root with a GQA questions file (a dict, or raw text) and the world's GQA images."""
        root = self.tmp / "root"
        (root / "gqa").mkdir(parents=True)
        (root / "gqa" / "images").symlink_to(images or self.world / "gqa" / "images")
        text = questions if isinstance(questions, str) else json.dumps(questions)
        (root / "gqa" / "testdev_balanced_questions.json").write_text(text)
        return root

    def gqa_questions(self, n: int = 2) -> dict:
        data = json.loads((self.world / "gqa" / "testdev_balanced_questions.json").read_text())
        return {k: data[k] for k in list(data)[:n]}

    def pope_root(self, lines: list[str]) -> Path:
        """A data root whose three POPE files hold `lines`, with the world's COCO images."""
        root = self.tmp / "root"
        (root / "pope").mkdir(parents=True)
        (root / "coco").mkdir()
        (root / "coco" / "val2014").symlink_to(self.world / "coco" / "val2014")
        for split in ("random", "popular", "adversarial"):
            (root / "pope" / f"coco_pope_{split}.json").write_text("".join(line + "\n" for line in lines))
        return root

    def train_root(self, instruct) -> Path:
        """A data root with the world's caption data and images and `instruct` as the stage-II data."""
        root = self.tmp / "root"
        (root / "llava").mkdir(parents=True)
        (root / "coco").mkdir()
        (root / "coco" / "train2014").symlink_to(self.world / "coco" / "train2014")
        caption = "shapes_caption_train2014.json"
        (root / "llava" / caption).symlink_to(self.world / "llava" / caption)
        text = instruct if isinstance(instruct, str) else json.dumps(instruct)
        (root / "llava" / "shapes_instruct_train2014.json").write_text(text)
        return root

    def instruct(self, n: int = 3) -> list:
        return json.loads((self.world / "llava" / "shapes_instruct_train2014.json").read_text())[:n]

    def run_copy(self) -> Path:
        copy = self.tmp / "run"
        shutil.copytree(self.run, copy)
        return copy


@pytest.fixture(scope="module")
def existing(tiny_run, tmp_path_factory):
    """A trained run and a results folder with rows in it; no case may change either."""
    from moebench.data.sources import resolve

    run, base = tiny_run
    root = tmp_path_factory.mktemp("existing")
    shutil.copytree(run.dir, root / "runs" / run.dir.name)
    shutil.copytree(base / "results", root / "results")
    results.append_rows(root / "results", "metrics", run.name, [
        {"run": run.name, "task": "gqa", "split": "testdev_balanced", "metric": "exact_match", "value": 0.5,
         "timestamp": results.utc_now()}])
    world = resolve("shapes", run.recipe.data.world, progress=False).root
    return root, root / "runs" / run.dir.name, world


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _edit(**changes):
    """A recipe edit setting dotted keys: _edit(**{"model.llm.layers": 3})."""
    def edit(raw):
        for key, value in changes.items():
            *parents, last = key.split(".")
            node = raw
            for p in parents:
                node = node[p]
            node[last] = value
    return edit


def _spoil_weights(env: Env, spoil) -> Path:
    copy = env.run_copy()
    spoil(copy / "model" / "model.safetensors", copy / "model")
    return copy


def _shrink_a_tensor(path: Path, _) -> None:
    from safetensors.torch import load_file, save_file

    state = {k: v.clone() for k, v in load_file(str(path)).items()}  # off the memory map of the file rewritten here
    key = next(k for k, v in sorted(state.items()) if v.dim() == 2 and k.startswith("projector"))
    state[key] = state[key][:-1].clone()
    save_file(state, str(path))


def _pickle_weights(path: Path, _) -> None:
    import torch
    from safetensors.torch import load_file

    state = {k: v.clone() for k, v in load_file(str(path)).items()}  # off the memory map of the file rewritten here
    torch.save(state, path)  # a pickled state dict under the safetensors name


def _declare_moe(run_dir: Path) -> Path:
    """The model.json of a dense checkpoint claims MoE layers (the weights stay dense)."""
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    moe = json.loads((run_dir / "run.json").read_text())["recipe"]["moe"]
    (run_dir / "model" / "model.json").write_text(json.dumps({**meta, "moe": moe}))
    return run_dir


def _claim_variant(env: Env, variant: str) -> Path:
    """A dense run whose run.json says it is another variant (its recipe has that variant's section)."""
    copy = env.run_copy()
    meta = json.loads((copy / "run.json").read_text())
    moe = yaml.safe_load(MOE.read_text())["moe"]
    meta["recipe"] = {**meta["recipe"], "variant": variant, "moe": moe}
    (copy / "run.json").write_text(json.dumps(meta))
    return copy


def _no_answer(questions: dict) -> dict:
    first = next(iter(questions))
    questions[first] = {k: v for k, v in questions[first].items() if k != "answer"}
    return questions


def _unanswered_conversation(items: list) -> list:
    items[1] = {**items[1], "conversations": items[1]["conversations"][:1]}
    return items


def _broken_image(env: Env) -> Path:
    images = env.tmp / "images"
    images.mkdir()
    questions = env.gqa_questions(1)
    (images / f"{next(iter(questions.values()))['imageId']}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return env.gqa_root(questions, images)


POPE_OK = json.dumps({"question_id": 1, "image": "shapes_val_000000.png", "text": "Is there a star in the image?",
                      "label": "yes"})

CASES = [
    # recipes
    pytest.param(lambda e: ["validate", e.recipe(_edit(sede=1))], ["unknown recipe key 'sede'", "did you mean 'seed'"],
                 id="recipe-unknown-key"),
    pytest.param(lambda e: e.train(DENSE, "model.llm.hiden_size=64"), ["model.llm.hiden_size", "hidden_size"],
                 id="recipe-unknown-nested-key"),
    pytest.param(lambda e: ["validate", e.recipe(_edit(seed="abc"))], ["seed='abc' must be an int"],
                 id="recipe-wrong-type"),
    pytest.param(lambda e: e.train(DENSE, "stages.finetune.train=projector"), ["stages.finetune.train='projector' must be a list"],
                 id="recipe-wrong-type-list"),
    pytest.param(lambda e: e.train(DENSE, "variant=sparse"), ["variant='sparse' is not allowed", "dense"],
                 id="recipe-bad-value-choice"),
    pytest.param(lambda e: e.train(DENSE, "stages.finetune.lr=-1"), ["stages.finetune.lr=-1.0 must be > 0"],
                 id="recipe-bad-value-number"),
    pytest.param(lambda e: ["validate", e.recipe(_edit(stages=[]))], ["no stages"], id="recipe-missing-stages"),
    pytest.param(lambda e: e.train(DENSE, "stages.finetune.data="), ["stages.finetune.data is empty"],
                 id="recipe-stage-without-data"),
    pytest.param(lambda e: e.train(DENSE, "stages.finetuen.lr=1e-4"), ["no item 'finetuen'", "did you mean 'finetune'"],
                 id="recipe-override-unknown-stage"),
    pytest.param(lambda e: e.train(DENSE, "variant=moe"), ["variant=moe needs a `moe:` section"],
                 id="recipe-variant-without-section"),
    pytest.param(lambda e: e.train(MOE, "roe.layers=[1]"), ["variant=moe", "`roe:`"],
                 id="recipe-conflicting-variant-sections"),
    pytest.param(lambda e: e.train(DENSE, "roe.layers=[1]"), ["variant=dense", "`roe:`"],
                 id="recipe-section-of-another-variant"),
    pytest.param(lambda e: e.train(MOE, "moe.top_k=5"), ["moe.top_k=5", "moe.num_experts=4"], id="recipe-top-k-over-experts"),
    pytest.param(lambda e: ["validate", e.file("bad.yaml", "name: [unclosed\nseed: 0\n")], ["not valid YAML"],
                 id="recipe-yaml-syntax"),
    pytest.param(lambda e: ["validate", e.file("empty.yaml", "\n")], ["empty.yaml", "empty"], id="recipe-empty-file"),
    pytest.param(lambda e: e.train(e.tmp / "nope.yaml"), ["missing recipe file", "nope.yaml"], id="recipe-missing-file"),
    pytest.param(lambda e: ["validate", e.file("list.yaml", "- a\n- b\n")], ["must be a YAML mapping"], id="recipe-not-a-mapping"),
    pytest.param(lambda e: ["validate", e.file("loop.yaml", "extends: loop.yaml\nseed: 0\n")], ["makes a cycle"],
                 id="recipe-extends-cycle"),
    pytest.param(lambda e: e.train(DENSE, "seed"), ["override 'seed' must look like key=value"], id="recipe-override-syntax"),
    # task YAMLs
    pytest.param(lambda e: ["validate", e.task(_edit(metrc="exact_match"))], ["unknown task key 'metrc'", "did you mean 'metric'"],
                 id="task-unknown-key"),
    pytest.param(lambda e: ["validate", e.task(lambda t: t.pop("metric"))], ["`metric` is empty"], id="task-missing-field"),
    pytest.param(lambda e: ["validate", e.task(_edit(metric="exact_mach"))], ["unknown metric 'exact_mach'", "exact_match"],
                 id="task-bad-metric"),
    pytest.param(lambda e: ["validate", e.task(_edit(loader="gqaa"))], ["unknown task loader 'gqaa'"], id="task-bad-loader"),
    pytest.param(lambda e: ["validate", e.task(_edit(version=0))], ["`version` must be >= 1"], id="task-version-zero"),
    pytest.param(lambda e: ["validate", e.file("tasks/bad.yaml", "name: gqa\nsplits: [a\n")], ["bad.yaml", "not valid YAML"],
                 id="task-yaml-syntax"),
    pytest.param(lambda e: e.eval("--tasks", str(e.task(_edit(max_new_tokens="many")))),
                 ["tasks/bad.yaml", "max_new_tokens='many' must be an int"],
                 id="task-file-given-to-eval"),
    # evaluation data
    pytest.param(lambda e: e.eval("--tasks", "gqa", "--data", str(e.gqa_root({}).parent / "elsewhere")), ["missing data root"],
                 id="data-missing-root"),
    pytest.param(lambda e: e.eval("--tasks", "pope", "--data", str(e.gqa_root(e.gqa_questions()))),
                 ["missing pope file", "coco_pope_random.json"], id="data-missing-file"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", "--data", str(e.gqa_root(json.dumps(e.gqa_questions())[:-20]))),
                 ["testdev_balanced_questions.json", "not valid JSON"], id="data-truncated-json"),
    pytest.param(lambda e: e.eval("--tasks", "pope", "--data", str(e.pope_root([POPE_OK, POPE_OK[:30]]))),
                 ["coco_pope_random.json:2", "not JSON"], id="data-truncated-json-lines"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", "--data", str(e.gqa_root(_no_answer(e.gqa_questions())))),
                 ["testdev_balanced_questions.json", "question 1", "answer"], id="data-record-without-answer"),
    pytest.param(lambda e: e.eval("--tasks", "pope", "--data", str(e.pope_root([POPE_OK.replace(', "label": "yes"', "")]))),
                 ["lacks label"], id="data-pope-record-without-label"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", "--data", str(_broken_image(e))), ["does not decode"],
                 id="data-image-does-not-decode"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", "--data", str(e.gqa_root({}))),
                 ["testdev_balanced", "no questions", "testdev_balanced_questions.json"], id="data-empty-split"),
    pytest.param(lambda e: e.eval("--tasks", "pope", "--data", str(e.pope_root([]))), ["random", "no questions"],
                 id="data-empty-pope-split"),
    # training data
    pytest.param(lambda e: e.train(DENSE, f"data.source={e.train_root(json.dumps(e.instruct())[:-30])}"),
                 ["shapes_instruct_train2014.json", "not valid JSON"], id="train-data-truncated-json"),
    pytest.param(lambda e: e.train(DENSE, f"data.source={e.train_root(_unanswered_conversation(e.instruct()))}"),
                 ["shapes_instruct_train2014.json", "conversation 1", "answer"], id="train-data-record-without-answer"),
    pytest.param(lambda e: e.train(DENSE, f"data.source={e.train_root([])}"), ["shapes_instruct_train2014.json", "no conversations"],
                 id="train-data-empty"),
    # checkpoints
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=_spoil_weights(e, lambda p, _: p.unlink())),
                 ["missing model weights", "model.safetensors"], id="checkpoint-missing-weights"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=_declare_moe(_claim_variant(e, "moe"))),
                 ["does not match the model", "missing", "experts"], id="checkpoint-weights-of-another-variant"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=_claim_variant(e, "moe")),
                 ["holds a dense model", "variant=moe"], id="checkpoint-run-of-another-variant"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=_spoil_weights(e, _shrink_a_tensor)), ["has shape", "projector"],
                 id="checkpoint-shape-mismatch"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=_spoil_weights(e, _pickle_weights)),
                 ["is a pickle (torch.save) file", "never unpickles"], id="checkpoint-pickle-as-weights"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=_spoil_weights(
        e, lambda p, _: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))), ["not a readable safetensors file", "incomplete"],
                 id="checkpoint-truncated-weights"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=_spoil_weights(e, lambda _, d: (d / "model.json").write_text("{"))),
                 ["model.json", "not valid JSON"], id="checkpoint-config-not-json"),
    # command line
    pytest.param(lambda e: e.eval("--tasks", "popee"), ["unknown task 'popee'", "did you mean 'pope'"], id="cli-unknown-task"),
    pytest.param(lambda e: e.eval("--tasks", " , "), ["--tasks is empty"], id="cli-empty-tasks"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=e.tmp), ["is not a moebench run"], id="cli-model-not-a-run"),
    pytest.param(lambda e: e.eval("--tasks", "gqa", model=e.file("weights.pt", "x")), ["is not a moebench run"],
                 id="cli-model-is-a-file"),
    pytest.param(lambda e: ["report", e.file("r/run/metrics-1.arrow", "not arrow").parents[1]],
                 ["cannot read results file", "metrics-1.arrow"], id="cli-report-unreadable-table"),
    pytest.param(lambda e: ["compare", "--baseline", e.tmp / "base.arrow", "--current", e.results],
                 ["missing baseline table", "--update-baseline"], id="cli-compare-missing-baseline"),
]

# click's own usage errors: exit 2, a short usage message, no traceback (typer >= 0.26 raises its vendored
# copy of click's exceptions; cli.main catches them).
USAGE = [
    pytest.param(lambda e: ["trian", DENSE], "No such command 'trian'", id="cli-unknown-command"),
    pytest.param(lambda e: [*e.eval("--tasks", "gqa"), "--limit", "-5"], "Invalid value for '--limit'",
                 id="cli-negative-limit"),
    pytest.param(lambda e: [*e.eval("--tasks", "gqa"), "--batch-size", "0"], "Invalid value for '--batch-size'",
                 id="cli-batch-size-zero"),
    pytest.param(lambda e: [*e.eval("--tasks", "gqa"), "--limt", "5"], "No such option: --limt", id="cli-unknown-option"),
]


def _run_case(case, existing, tmp_path, capsys):
    root, run_dir, world = existing
    env = Env(runs=root / "runs", results=root / "results", run=run_dir, world=world, tmp=tmp_path)
    args = case(env)
    before = _snapshot(root)
    code, out, err = run_cli(args, capsys)
    after = _snapshot(root)
    assert "Traceback" not in out + err, err
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"
    new = sorted(set(after) - set(before))
    assert all("/.partial/" in k for k in new), f"new files after a failed command: {new}"
    return code, out, err


@pytest.mark.parametrize("case, needles", CASES)
def test_bad_input_fails_with_one_line_and_damages_nothing(case, needles, existing, tmp_path, capsys):
    code, _, err = _run_case(case, existing, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), f"exit {code}:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"


@pytest.mark.parametrize("case, needle", USAGE)
def test_bad_command_line_is_a_short_usage_error(case, needle, existing, tmp_path, capsys):
    code, _, err = _run_case(case, existing, tmp_path, capsys)
    assert code == 2 and needle in err and len([l for l in err.splitlines() if l.strip()]) <= 4, f"exit {code}:\n{err}"


def test_the_catalogue_is_large_enough():
    assert len(CASES) + len(USAGE) >= 30
