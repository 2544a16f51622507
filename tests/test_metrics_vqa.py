"""VQA accuracy (official vqaEval.py) and ScienceQA multiple choice (LLaVA eval_science_qa.py).

Every expected number is worked by hand from the reference algorithm in the comment next to it.
VQA with k of the 10 annotators matching the (processed) prediction: each annotator is left out in
turn, the k matching ones see k-1 matches among the other 9, the 10-k others see k, so
  acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
  k=0: 0;  k=1: (0 + 9/3)/10 = 0.3;  k=2: (2/3 + 16/3)/10 = 0.6;  k=3: (3*2/3 + 7)/10 = 0.9;  k>=4: 1.0
"""

import pytest

from moebench.errors import UserError
from moebench.eval import metrics as M

# ------------------------------------------------------------------------- normalisation pieces


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two dogs.", "Two dogs"),  # '.' not before a digit is deleted; case untouched here
        ("3.5", "3.5"),  # '.' before a digit stays
        ("U.S.A.", "USA"),
        ("red,blue", "red blue"),  # ',' with no blank next to it and no digit,digit: becomes a blank
        ("red, blue", "red blue"),  # ", " occurs: every ',' is deleted
        ("red, blue,green", "red bluegreen"),  # one ", " anywhere deletes *all* commas, even the unspaced one
        ("1,000", "1000"),  # digit,digit (commaStrip) anywhere: every listed punctuation is deleted
        ("1,000/yr", "1000yr"),  # ... including the '/', which would otherwise become a blank
        ("10/yr", "10 yr"),  # no digit,digit comma: '/' becomes a blank
        ("yes!", "yes "),  # '!' becomes a blank (processDigitArticle later drops it)
        ("yes !", "yes "),  # " !" occurs: '!' deleted, the blank before it stays
        ("(left)", " left "),
        ("don't", "don't"),  # "'" is not in the punct list
        ("a:b", "a:b"),  # neither is ':'
        ("." * 40, "." * 8),  # re.UNICODE (32) passed as sub()'s count: only 32 periods go
    ],
)
def test_vqa_process_punctuation(text, expected):
    assert M.vqa_process_punctuation(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two Dogs", "2 dogs"),  # lower-cased, number word -> digit
        ("none", "0"),  # manualMap maps "none" to "0" as well
        ("ten", "10"),
        ("eleven", "eleven"),  # the map stops at ten
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("banana", "banana"),  # articles are whole words only
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("dont know", "don't know"),
        ("Im", "im"),  # lower-cased before the lookup, so the table's "Im" key never fires
        ("somebody'd", "somebodyd"),  # the official table's reversed entry, kept
        ("  a   big\tdog ", "big dog"),  # split on any whitespace, joined with single blanks
    ],
)
def test_vqa_process_digit_article(text, expected):
    assert M.vqa_process_digit_article(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Two dogs.", "2 dogs"),
        ("1,000", "1000"),
        ("yes!", "yes"),  # "yes " after punctuation, the split drops the blank
        ("The answer: none.", "answer: 0"),  # ':' survives, "the" dropped, none -> 0
    ],
)
def test_vqa_normalize(text, expected):
    assert M.vqa_normalize(text) == expected


def test_vqa_official_tables():
    assert len(M.VQA_CONTRACTIONS) == 120  # the official dict has 120 entries
    assert M.VQA_CONTRACTIONS["wont"] == "won't" and M.VQA_CONTRACTIONS["youve"] == "you've"
    assert M.VQA_MANUAL_MAP["none"] == "0" and M.VQA_MANUAL_MAP["ten"] == "10" and len(M.VQA_MANUAL_MAP) == 12
    assert M.VQA_ARTICLES == ("a", "an", "the")


# --------------------------------------------------------------------------------- VQA scores


@pytest.mark.parametrize(
    "k, expected",
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)],  # formula in the module docstring
)
def test_vqa_steps(k, expected):
    answers = ["red"] * k + ["blue"] * (10 - k)
    assert M.vqa_score("red", answers) == pytest.approx(expected)


def test_vqa_leave_one_out_is_by_annotator_not_by_value():
    # dropping every answer equal to the left-out one would give k=2: (2*0 + 8*2/3)/10 = 0.533
    assert M.vqa_score("no", ["yes"] * 8 + ["no"] * 2) == pytest.approx(0.6)
    assert M.vqa_score("yes", ["yes"] * 8 + ["no"] * 2) == pytest.approx(1.0)  # GT-Vision-Lab/VQA issue #1
    # any number of answers: red, blue, blue; "blue" matches 2; left out red: 2/3, each blue: 1/3
    assert M.vqa_score("blue", ["red", "blue", "blue"]) == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)


def test_vqa_number_words_and_punctuation():
    # annotators differ, so both sides are normalised: "Two dogs." -> "2 dogs"; "two dogs" -> "2 dogs"
    assert M.vqa_score("Two dogs.", ["2 dogs"] * 3 + ["3 dogs"] * 7) == pytest.approx(0.9)  # k=3
    assert M.vqa_score("Two dogs.", ["2 dogs"] * 3 + ["two dogs"] + ["3 dogs"] * 6) == pytest.approx(1.0)  # k=4


def test_vqa_none_is_zero():
    # "none" -> "0" and "zero" -> "0": the prediction "none" meets three "0"s
    assert M.vqa_score("none", ["0"] * 2 + ["zero"] + ["1"] * 7) == pytest.approx(0.9)  # k=3
    # the answer "none" is mapped too, so one "none" annotator still gives k=1 (cf. VQA issue #7)
    assert M.vqa_score("none", ["none"] + ["1"] * 9) == pytest.approx(0.3)


def test_vqa_articles():
    assert M.vqa_score("a dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)  # "a dog" -> "dog", k=4
    # the answers lose their articles too: dog, dog, "the dog" -> 3 matches
    assert M.vqa_score("A dog", ["dog"] * 2 + ["the dog"] + ["cat"] * 7) == pytest.approx(0.9)


def test_vqa_contractions():
    assert M.vqa_score("dont", ["don't"] * 4 + ["no"] * 6) == pytest.approx(1.0)  # "dont" -> "don't", k=4
    assert M.vqa_score("dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(0.6)  # k=2
    assert M.vqa_score("isnt", ["isn't"] + ["is"] * 9) == pytest.approx(0.3)  # k=1


def test_vqa_comma_between_digits():
    assert M.vqa_score("1,000", ["1000"] * 3 + ["100"] * 7) == pytest.approx(0.9)  # "1,000" -> "1000", k=3


def test_vqa_processing_only_when_annotators_differ():
    # unanimous answers: only newline/tab -> blank and strip, on both sides
    assert M.vqa_score("yes", ["yes"] * 10) == 1.0
    assert M.vqa_score(" yes\n", ["yes"] * 10) == 1.0
    assert M.vqa_score("yes!", ["yes"] * 10) == 0.0  # no punctuation processing (VQA issue #14)
    assert M.vqa_score("Yes", ["yes"] * 10) == 0.0  # no lower-casing either
    assert M.vqa_score("Two dogs.", ["2 dogs"] * 10) == 0.0  # nor number words
    assert M.vqa_score("yes!", ["yes!"] * 10) == 1.0  # raw comparison
    assert M.vqa_score("yes", ["yes!"] * 10) == 0.0
    # one dissenting annotator switches processing on for everything
    assert M.vqa_score("yes!", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)  # "yes!" -> "yes", k=9
    assert M.vqa_score("Yes", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)
    # and the annotators' punctuation goes as well: "yes!" -> "yes", k=4
    assert M.vqa_score("yes", ["yes!"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    # whitespace cleaning comes before the test: "yes" and " yes\t" are the same answer
    assert M.vqa_score("Yes", ["yes"] * 9 + [" yes\t"]) == 0.0


def test_vqa_string_target_is_ten_identical_answers():
    assert M.vqa_score("red", "red") == 1.0
    assert M.vqa_score("Red", "red") == 0.0  # unanimous: no normalisation
    assert M.vqa_score("red", ["red"]) == 1.0  # a one-answer list too (not leave-one-out over one)
    assert M.vqa_score("blue", "red") == 0.0


@pytest.mark.parametrize("bad", [[], None, ["red", 2], 3])
def test_vqa_bad_targets(bad):
    with pytest.raises(UserError, match="VQA target #0"):
        M.vqa_accuracy(["red"], [bad])


def test_vqa_accuracy():
    preds = ["2", "yes", "no"]
    targets = [["2"] * 10, ["yes"] * 2 + ["no"] * 8, "no"]
    acc, scores = M.vqa_accuracy(preds, targets)
    assert scores == pytest.approx([1.0, 0.6, 1.0])  # k=10, k=2, string target matched
    assert acc == pytest.approx(2.6 / 3)
    assert M.vqa_accuracy([], []) == (0.0, [])
    with pytest.raises(UserError, match="pair up"):
        M.vqa_accuracy(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------- ScienceQA


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),  # exactly an option letter
        ("B. a cat", "B"),  # letter + ". " at the start
        ("The answer is C.", "C"),
        ("I think so", None),  # LLaVA's "FAILED"
        ("The answer is C, because", "C"),  # the pattern's '.' is any character
        ("The answer is C", None),  # ... but there must be one
        ("The answer is A. The answer is B.", None),  # two matches: FAILED
        ("The answer is F.", "F"),  # any capital is parsed; F is no option (counted unparsable)
        ("Because the answer is B.", None),  # case-sensitive "The"
        ("C. The answer is A.", "C"),  # the ". " rule comes first
        ("b", None),  # case-sensitive
        (" B", None),  # no strip
        ("B.", None),  # fewer than 3 characters: not the "B. " rule
        ("B.a cat", None),
        ("F", None),
    ],
)
def test_scienceqa_parse(text, expected):
    assert M.scienceqa_parse(text) == expected


def test_multiple_choice():
    preds = ["B", "B. a cat", "The answer is C.", "I think so", "The answer is F."]
    targets = ["B", "B", "C", "D", " E "]  # blanks around a target are ignored
    acc, unparsable, scores = M.multiple_choice(preds, targets)
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert acc == pytest.approx(0.6)  # 3/5
    assert unparsable == pytest.approx(0.4)  # "I think so" (FAILED) and "F" (no option): 2/5
    assert M.multiple_choice([], []) == (0.0, 0.0, [])
    for bad in ("F", "b", "", None):
        with pytest.raises(UserError, match="multiple-choice target #0"):
            M.multiple_choice(["A"], [bad])
    with pytest.raises(UserError, match="pair up"):
        M.multiple_choice(["A"], [])


# ----------------------------------------------------------------------- registry and baselines


def test_registry_entries():
    assert "vqa_accuracy" in M.METRICS and "multiple_choice" in M.METRICS
    r = M.compute("vqa_accuracy", ["Two dogs.", "yes"], [["2 dogs"] * 3 + ["3 dogs"] * 7, "yes"])
    assert r.values == {"accuracy": pytest.approx((0.9 + 1.0) / 2)} and r.scores == pytest.approx([0.9, 1.0])
    r = M.compute("multiple_choice", ["B", "I think so"], ["B", "A"])
    assert r.values == {"accuracy": 0.5, "unparsable": 0.5} and r.scores == [1.0, 0.0]
    with pytest.raises(UserError, match="did you mean 'vqa_accuracy'"):
        M.get_metric("vqa_acuracy")


def test_vqa_majority_baseline_over_all_answers():
    targets = [["red"] * 4 + ["blue"] * 6, ["blue"] * 10, ["red"] * 10]
    # answers over the split: red 4+10 = 14, blue 6+10 = 16 -> "blue", 16 of 30
    assert M.majority_baseline(targets) == ("blue", pytest.approx(16 / 30))
    # "blue" scores: q1 k=6 -> 1.0, q2 k=10 -> 1.0, q3 k=0 -> 0.0; mean 2/3
    assert M.baseline_values("vqa_accuracy", targets) == {"accuracy": pytest.approx(2 / 3)}
    # a string target counts once
    assert M.majority_baseline(["yes", ["no", "no"], "yes", "yes"]) == ("yes", 0.6)
    with pytest.raises(UserError):
        M.majority_baseline([[], []])


def test_multiple_choice_baseline_and_old_baselines_unchanged():
    # majority letter B (2 of 4) -> accuracy 2/4, and "B" always parses
    assert M.baseline_values("multiple_choice", ["A", "B", "B", "C"]) == {"accuracy": 0.5, "unparsable": 0.0}
    assert M.baseline_values("exact_match", ["left", "right", "left"]) == {"exact_match": pytest.approx(2 / 3)}
    assert M.baseline_values("pope", ["yes", "no", "no"])["accuracy"] == pytest.approx(2 / 3)
    assert M.majority_baseline(["b", "a", "c", "b", "a"]) == ("a", 0.4)


# ------------------------------------------------------------------ protocols (issue 31)
def test_m4c_normalisation_hand_worked():
    """m4c's EvalAIAnswerProcessor: always lower-cased, ',' and '?' dropped, the official punctuation,
    number-word and article rules; "'s" split off."""
    from moebench.eval.metrics import m4c_normalize

    assert m4c_normalize("Two") == "2"
    assert m4c_normalize("The Coca-Cola") == "coca cola"
    assert m4c_normalize("1,000") == "1000"
    assert m4c_normalize("STOP.") == "stop"
    assert m4c_normalize("what's?") == "what 's"
    assert m4c_normalize("a Dog\n") == "dog"


def test_textvqa_protocols_differ_where_the_answers_agree():
    """Ten identical answers "Stop": the official rule compares raw strings (no normalisation when the
    annotators agree), so "stop" scores 0; m4c normalises both and scores 1. With 2 of 10 answers
    matching, m4c's leave-one-out gives (8 x 2/3 + 2 x 1/3) / 10 = 0.6."""
    from moebench.eval.metrics import compute

    ten = ["Stop"] * 10
    assert compute("textvqa_accuracy", ["stop"], [ten], protocol="official").values["accuracy"] == 0.0
    assert compute("textvqa_accuracy", ["stop"], [ten], protocol="llava").values["accuracy"] == 1.0
    two = ["Coke"] * 2 + ["pepsi"] * 8
    assert compute("textvqa_accuracy", ["coke"], [two], protocol="llava").values["accuracy"] == pytest.approx(0.6)


def test_vqav2_llava_protocol_processes_the_prediction_first():
    """LLaVA's VQAv2 submission runs the answer processor on each prediction, then the official script:
    "Two." against ten "2" scores 1 under llava, 0 under official (unanimous answers: raw comparison)."""
    from moebench.eval.metrics import compute

    assert compute("vqa_accuracy", ["Two."], [["2"] * 10], protocol="llava").values["accuracy"] == 1.0
    assert compute("vqa_accuracy", ["Two."], [["2"] * 10], protocol="official").values["accuracy"] == 0.0


def test_breakdown_rows_gqa_binary_open_and_scienceqa_context():
    """GQA's eval.py: open = structural type query, every other type binary. ScienceQA: an image problem
    with a hint counts in both IMG and TXT. Each group's rows score its own samples."""
    from pathlib import Path

    from moebench.eval.runner import score
    from moebench.eval.tasks import Sample, load_task

    gqa = load_task("gqa")
    recs = [{"prediction": p, "sample": Sample(str(i), "testdev_balanced", Path("x.jpg"), "q", t, {"type": g})}
            for i, (p, t, g) in enumerate([("yes", "yes", "binary"), ("no", "yes", "binary"), ("red", "red", "open")])]
    rows, _ = score(gqa, recs)
    by = {r.get("group"): r for r in rows}
    assert by[None]["value"] == pytest.approx(2 / 3)
    assert by["type=binary"]["value"] == 0.5 and by["type=binary"]["n"] == 2
    assert by["type=open"]["value"] == 1.0 and by["type=open"]["split"] == "testdev_balanced|type=open"

    sqa = load_task("scienceqa_img")
    recs = [{"prediction": p, "sample": Sample(str(i), "test", Path("x.jpg"), "q", t, {"subject": s, "context": c})}
            for i, (p, t, s, c) in enumerate([("A", "A", "natural science", ["IMG", "TXT"]),
                                              ("B", "A", "social science", ["IMG"])])]
    rows, _ = score(sqa, recs)
    acc = {r.get("group"): r["value"] for r in rows if r["metric"] == "accuracy"}
    assert acc == {None: 0.5, "context=IMG": 0.5, "context=TXT": 1.0, "subject=natural science": 1.0,
                   "subject=social science": 0.0}


def test_mme_parse_and_scores_hand_worked():
    """calculation.py's rules: "yes"/"no" in the first four characters; per subtask 100 x (acc + acc+)."""
    from pathlib import Path

    from moebench.eval.metrics import mme_parse, mme_scores
    from moebench.eval.tasks import Sample

    assert [mme_parse(x) for x in ("Yes", "No, there is not.", "yes.", "I think yes", " NO")] == \
        ["yes", "no", "yes", "other", "no"]

    def s(sub, image):
        return Sample("q", "perception", Path(image), "q", "", {"subtask": sub})

    samples = [s("existence", "1.jpg"), s("existence", "1.jpg"), s("existence", "2.jpg"), s("existence", "2.jpg"),
               s("count", "3.jpg"), s("count", "3.jpg")]
    targets = ["yes", "no", "yes", "no", "yes", "no"]
    preds = ["Yes", "No", "Yes", "Yes", "No", "Yes"]  # existence: 3 of 4, image 1 both; count: none
    r = mme_scores(preds, targets, samples)
    assert r.values["score"] == pytest.approx(100 * (0.75 + 0.5) + 0)
    assert r.scores == [1, 1, 1, 0, 0, 0]


def test_mmbench_circular_hand_worked():
    """A model that always answers "A": right in the one rotation that puts the answer at A, so the
    circular accuracy is 0 while the vanilla (first pass) accuracy counts that pass when it is the first."""
    from pathlib import Path

    from moebench.eval.metrics import mmbench_circular, mmbench_parse
    from moebench.eval.tasks import Sample

    opts = {"A": "cat", "B": "dog", "C": "bird"}
    assert [mmbench_parse(x, opts) for x in ("B", "(C) bird", "The answer is A.", "a dog", "A or B")] == \
        ["B", "C", "A", "B", None]
    rotations = [{"A": "cat", "B": "dog", "C": "bird"}, {"A": "dog", "B": "bird", "C": "cat"},
                 {"A": "bird", "B": "cat", "C": "dog"}]
    samples = [Sample(f"1/{r}", "dev", Path("x"), "q", "", {"item": "1", "rotation": r, "options": o})
               for r, o in enumerate(rotations)]
    targets = ["A", "C", "B"]  # "cat" in each rotation
    r = mmbench_circular(["A", "A", "A"], targets, samples)
    assert r.values == {"accuracy": 0.0, "vanilla": 1.0}
    assert mmbench_circular(["A", "C", "B"], targets, samples).values["accuracy"] == 1.0


def test_mme_and_mmbench_files_score_through_moebench_score(tmp_path, capsys):
    """The released layouts (MME's per-subtask folders, MMBench's TSV with base64 images) load and score."""
    import base64
    import io
    import json

    from PIL import Image

    from conftest import run_cli
    from moebench import results
    from moebench.eval.metrics import MME_COGNITION, MME_PERCEPTION

    base = tmp_path / "MME_Benchmark_release_version"
    for sub in (*MME_PERCEPTION, *MME_COGNITION):
        (base / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(base / sub / "img1.jpg")
        (base / sub / "img1.txt").write_text("Is there a cat? Please answer yes or no.\tYes\n"
                                            "Is there a dog? Please answer yes or no.\tNo\n")
    preds = tmp_path / "mme.jsonl"  # every answer "Yes": half right, no image with both right
    lines = [{"question_id": f"{sub}/img1/{k}", "answer": "Yes"} for sub in (*MME_PERCEPTION, *MME_COGNITION)
             for k in (0, 1)]
    preds.write_text("\n".join(json.dumps(x) for x in lines))
    code, _, err = run_cli(["score", "--task", "mme", "--predictions", preds, "--data", tmp_path,
                            "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    rows = {(r["split"], r["metric"]): r for r in results.read_rows([tmp_path / "res"], "metrics")}
    assert rows[("perception", "score")]["value"] == pytest.approx(10 * 50.0)
    assert rows[("cognition", "score")]["value"] == pytest.approx(4 * 50.0)
    assert rows[("perception|subtask=OCR", "score")]["value"] == pytest.approx(50.0)
    assert rows[("perception", "score")]["protocol"] == "official"

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    img = base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "mmbench").mkdir()
    (tmp_path / "mmbench" / "mmbench_dev_20230712.tsv").write_text(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
        f"7\tWhich animal?\tnan\tcat\tdog\tnan\tnan\tA\tobject\t{img}\n")
    preds = tmp_path / "mmb.jsonl"
    preds.write_text('{"question_id": "7/0", "answer": "A"}\n{"question_id": "7/1", "answer": "B"}\n')
    code, _, err = run_cli(["score", "--task", "mmbench", "--predictions", preds, "--data", tmp_path,
                            "--results", tmp_path / "res2"], capsys)
    assert code == 0, err
    rows = {(r["split"], r["metric"]): r["value"] for r in results.read_rows([tmp_path / "res2"], "metrics")}
    assert rows[("dev", "accuracy")] == 1.0 and rows[("dev|category=object", "accuracy")] == 1.0
