"""Answer parsing and metrics: POPE, exact match (GQA), VQA accuracy, ScienceQA multiple choice,
the majority-answer baseline.

Every metric lives here once. Each function's docstring names the reference it reproduces; the
values are fractions in [0, 1] (callers multiply by 100 for papers' tables if they want).

Registry: `METRICS` maps a task YAML's metric name to a `MetricFn`,
`fn(predictions, targets, **options) -> MetricResult(values, scores)` where `values` are the
aggregate numbers (one metrics-table row each) and `scores` the per-sample scores (samples table).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence, Union

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


# ----------------------------------------------------------------------------------- VQA accuracy

# The official tables of GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py, unchanged
# (including their oddities: "somebody'd" -> "somebodyd", capitalised keys that never match after
# lower-casing).
VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
VQA_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so: any '.' not before a digit
_VQA_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD_COUNT = int(re.UNICODE)  # the original passes re.UNICODE as sub()'s *count*: at most 32 periods go


def vqa_process_punctuation(text: str) -> str:
    """`processPunctuation` of the official vqaEval.py (GT-Vision-Lab/VQA), quirks included.

    For each character p of `VQA_PUNCT`: if p next to a blank occurs anywhere in the *input*
    ("p " or " p"), or the input contains a digit-comma-digit, every p is deleted; otherwise every p
    becomes a blank. Then each '.' not followed by a digit is deleted (the first 32 only). ':' and
    "'" are not in the list (contractions survive). "red,blue" -> "red blue", "red, blue" ->
    "red blue", "1,000" -> "1000", "1,000/yr" -> "1000yr", "3.5" -> "3.5", "U.S." -> "US".
    """
    out, delete_all = text, _VQA_COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCT:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
    """`processDigitArticle` of the official vqaEval.py: lower-case, split on whitespace, number words
    (and "none") to digits via `VQA_MANUAL_MAP`, drop the articles a / an / the, expand
    `VQA_CONTRACTIONS` ("dont" -> "don't"), join with single blanks."""
    words = [VQA_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_normalize(text: str) -> str:
    """`processPunctuation` then `processDigitArticle`, the full official answer normalisation."""
    return vqa_process_digit_article(vqa_process_punctuation(text))


def _vqa_clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


VQATarget = Union[str, Sequence[str]]


def _vqa_answers(target: VQATarget, i: int) -> list[str]:
    answers = [target] if isinstance(target, str) else target
    if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
        raise UserError(f"VQA target #{i} is {target!r}; give a string or a non-empty list of answer strings")
    return list(answers) * 10 if len(answers) == 1 else list(answers)


def vqa_score(prediction: str, answers: VQATarget) -> float:
    """One question's VQA accuracy, as the current official vqaEval.py (GT-Vision-Lab/VQA master).

    Prediction and ground-truth answers: newline / tab -> blank, strip. Only if the answers are not
    all identical (`len(set(gtAnswers)) > 1`) do both the answers and the prediction go through
    `vqa_normalize`; with unanimous annotators nothing more is done, so "Yes" or "yes!" against ten
    "yes" scores 0 (the maintainers' intent: leave OCR-style answers alone; GT-Vision-Lab/VQA
    issue #14). Then each annotator is left out in turn: acc_i = min(1, #other answers equal to the
    prediction / 3), and the score is the mean of the acc_i: 0 / 0.3 / 0.6 / 0.9 / 1.0 for 0 / 1 / 2 /
    3 / 4+ matching annotators out of 10. (Older revisions of vqaEval.py, and the EvalAI challenge
    copy, always normalised the prediction and gave the answers processPunctuation only; LLaVA's
    TextVQA script uses m4c's EvalAIAnswerProcessor instead. Neither is reproduced here.)
    A string target counts as ten identical answers (a one-element list too).
    """
    gts = [_vqa_clean(a) for a in _vqa_answers(answers, 0)]
    pred = _vqa_clean(prediction)
    if len(set(gts)) > 1:
        gts, pred = [vqa_normalize(a) for a in gts], vqa_normalize(pred)
    return _leave_one_out(pred, gts)


def _leave_one_out(pred: str, gts: list[str]) -> float:
    """VQA's consensus: each answer left out in turn, min(1, #other answers equal to pred / 3), averaged."""
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def m4c_normalize(text: str) -> str:
    """m4c's `EvalAIAnswerProcessor` (LLaVA's llava/eval/m4c_evaluator.py, from pythia): lower-case, drop
    every ',' and '?', "'s" -> " 's", newline / tab -> blank, strip, then the official punctuation and
    digit / article rules (`vqa_process_punctuation`, `vqa_process_digit_article`). Always applied, to
    predictions and answers alike: "Two," -> "2", "The Coca-Cola" -> "coca cola", "1,000" -> "1000"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(vqa_process_punctuation(text))


def m4c_score(prediction: str, answers: VQATarget) -> float:
    """One question's TextVQA accuracy as m4c's `TextVQAAccuracyEvaluator` (what LLaVA-1.5 and MoE-LLaVA
    report): prediction and the 10 answers through `m4c_normalize`, then each answer position left out in
    turn, min(1, #other answers equal to the prediction / 3), averaged. A string target scores 1 only
    when the raw prediction equals it."""
    if isinstance(answers, str):
        return float(prediction == answers)
    return _leave_one_out(m4c_normalize(prediction), [m4c_normalize(a) for a in _vqa_answers(answers, 0)])


PROTOCOLS = ("llava", "official", "lmms_eval")

# --------------------------------------------------------------------------------------------- MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse(text: str) -> str:
    """MME's `calculation.py` parse_pred_ans: lower-case, strip, drop '.'; "yes" / "no" as they are, else
    "yes" or "no" if it occurs in the first four characters (yes first), else "other" (always wrong)."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(preds: Sequence[str], targets: Sequence[str], samples: Sequence) -> MetricResult:
    """MME (Fu et al. 2023, its eval_tool/calculation.py): per subtask, acc = questions answered right /
    questions and acc+ = images whose two questions are both right / images; the subtask's score is
    100 x (acc + acc+), and a category's score the sum over its subtasks (perception: 10, cognition: 4;
    2000 and 800 at most). Values: `score` (the sum over the subtasks present), `acc`, `acc_plus` (means
    over the subtasks present)."""
    _check_lengths(preds, targets, "mme")
    scores = [float(mme_parse(p) == t.strip().lower()) for p, t in zip(preds, targets)]
    by_task: dict[str, dict[str, list[float]]] = {}
    for sample, sc in zip(samples, scores):
        by_task.setdefault(sample.groups["subtask"], {}).setdefault(str(sample.image), []).append(sc)
    accs, pluses = [], []
    for images in by_task.values():
        flat = [x for v in images.values() for x in v]
        accs.append(sum(flat) / len(flat))
        pluses.append(sum(all(v) for v in images.values()) / len(images))
    n = len(by_task) or 1
    return MetricResult({"score": 100 * (sum(accs) + sum(pluses)), "acc": sum(accs) / n, "acc_plus": sum(pluses) / n},
                        scores)


# ------------------------------------------------------------------------------------------ MMBench

MMBENCH_LETTERS = ("A", "B", "C", "D")
NOT_BREAKDOWNS = ("options", "item", "rotation")  # Sample.groups entries a metric reads, not official breakdowns


def mmbench_parse(text: str, options: dict[str, str]) -> str | None:
    """The option a free-form answer names, as MMBench's matching step (VLMEvalKit `can_infer`): a single
    option letter standing alone ("B", "B.", "(B) cat", "The answer is B"); else the one option whose text
    the answer contains; else None (wrong; the official toolkit would ask an LLM, which moebench does not)."""
    tokens = re.findall(r"[A-Za-z]+", text.replace("(", " ").replace(")", " "))
    letters = {t for t in tokens if t in options}
    if len(letters) == 1:
        return letters.pop()
    low = text.lower()
    hits = [k for k, v in options.items() if v and v.lower() in low]
    return hits[0] if len(hits) == 1 else None


def mmbench_circular(preds: Sequence[str], targets: Sequence[str], samples: Sequence) -> MetricResult:
    """MMBench's circular evaluation (Liu et al. 2023): each question is asked once per rotation of its
    options (N options: N passes, the correct option in each place) and counts as right only if every
    pass is; `accuracy` over questions, `vanilla` over the first passes alone (no rotation)."""
    _check_lengths(preds, targets, "mmbench_circular")
    scores = [float(mmbench_parse(p, s.groups["options"]) == t) for p, t, s in zip(preds, targets, samples)]
    items: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for s, sc in zip(samples, scores):
        items.setdefault(s.groups["item"], []).append(sc)
        if s.groups["rotation"] == 0:
            first[s.groups["item"]] = sc
    circular = [float(all(v)) for v in items.values()]
    return MetricResult({"accuracy": _div(sum(circular), len(circular)),
                         "vanilla": _div(sum(first.values()), len(first))}, scores)


def vqa_accuracy(preds: Sequence[str], targets: Sequence[VQATarget]) -> tuple[float, list[float]]:
    """VQA accuracy (Antol et al. 2015; VQAv2, VizWiz): the mean of `vqa_score` over questions.

    Fractions, unrounded (vqaEval.py reports round(100 * mean, 2)). Returns (accuracy, per-question
    scores); 0.0 for no questions. Bad targets (not a string / non-empty list of strings) raise UserError.
    """
    _check_lengths(preds, targets, "vqa_accuracy")
    for i, t in enumerate(targets):
        _vqa_answers(t, i)
    scores = [vqa_score(p, t) for p, t in zip(preds, targets)]
    return _div(sum(scores), len(scores)), scores


# ------------------------------------------------------------------------ ScienceQA multiple choice

SCIENCEQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_parse(text: str) -> str | None:
    """The option letter of a ScienceQA answer, as LLaVA `llava/eval/eval_science_qa.py` (LLaVA-1.5).

    In order: the text is exactly one of "A".."E" (no strip); or it is at least 3 characters, starting
    with an option letter followed by ". " ("B. a cat"; "B." alone is not); or `The answer is ([A-Z]).`
    matches exactly once ('.' is any character: "The answer is C." yes, "... is C" at the very end no)
    -> that letter, which may lie outside A..E. Otherwise None (LLaVA's "FAILED"; never a random
    option: the `random.choice` fallback of some LLaVA versions is not copied).
    """
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def multiple_choice(preds: Sequence[str], targets: Sequence[str]) -> tuple[float, float, list[float]]:
    """ScienceQA accuracy with LLaVA's parsing (`scienceqa_parse`): correct iff the parsed letter is
    the target letter. Returns (accuracy, unparsable, per-sample 1.0 / 0.0), where unparsable is the
    share of predictions whose parse is not an option (None, or a letter past E, which LLaVA's
    `get_pred_idx` also maps to -1). Targets must be "A".."E" (blanks ignored), else UserError.
    Both fractions are 0.0 for no samples.
    """
    _check_lengths(preds, targets, "multiple_choice")
    gold = []
    for i, t in enumerate(targets):
        if not isinstance(t, str) or t.strip() not in SCIENCEQA_OPTIONS:
            raise UserError(f"multiple-choice target #{i} is {t!r}; targets must be one of {', '.join(SCIENCEQA_OPTIONS)}")
        gold.append(t.strip())
    parsed = [scienceqa_parse(p) for p in preds]
    scores = [float(p == g) for p, g in zip(parsed, gold)]
    failed = sum(p not in SCIENCEQA_OPTIONS for p in parsed)
    return _div(sum(scores), len(scores)), _div(failed, len(parsed)), scores


# ------------------------------------------------------------------------------ majority baseline


def majority_baseline(targets: Sequence[VQATarget]) -> tuple[str, float]:
    """The most frequent target and its share of all targets (the "always answer X" predictor).

    A list target (VQA: the annotators' answers) contributes each of its answers, as stored, so for
    VQA this is the most frequent answer over all ground-truth answers of the split; a string target
    counts once. Ties go to the first answer in sorted order, so the baseline is deterministic. No
    answers at all is a UserError (there is no majority of nothing).
    """
    answers = [a for t in targets for a in ([t] if isinstance(t, str) else t)]
    if not answers:
        raise UserError("majority baseline of an empty target list; the task has no samples")
    counts = Counter(answers)
    answer = min(counts, key=lambda a: (-counts[a], a))
    return answer, counts[answer] / len(answers)


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
def _exact_match(preds: Sequence[str], targets: Sequence[str], normalizer: str = "llava",
                 protocol: str = "llava") -> MetricResult:
    """GQA: `protocol: llava` (LLaVA's eval_gqa normaliser) or `lmms_eval` (punctuation stripped too)."""
    accuracy, scores = exact_match(preds, targets, normalizer="lmms_eval" if protocol == "lmms_eval" else normalizer)
    return MetricResult({"exact_match": accuracy}, scores)


@METRICS.register("textvqa_accuracy")
def _textvqa_accuracy(preds: Sequence[str], targets: Sequence[VQATarget], protocol: str = "llava") -> MetricResult:
    """TextVQA: `protocol: llava` is m4c's evaluator (always normalised, `m4c_score`); `official` is the
    VQA evaluation script's rule (`vqa_score`: normalised only when the annotators disagree)."""
    _check_lengths(preds, targets, "textvqa_accuracy")
    rule = m4c_score if protocol == "llava" else vqa_score
    scores = [rule(p, t) for p, t in zip(preds, targets)]
    return MetricResult({"accuracy": _div(sum(scores), len(scores))}, scores)


@METRICS.register("vqa_accuracy")
def _vqa_accuracy(preds: Sequence[str], targets: Sequence[VQATarget], protocol: str = "official") -> MetricResult:
    """VQAv2: `official` scores the raw prediction with vqaEval.py; `llava` first runs LLaVA's submission
    script's answer processor (m4c's EvalAIAnswerProcessor) on the prediction, as its VQAv2 numbers do."""
    if protocol == "llava":
        preds = [m4c_normalize(p) for p in preds]
    accuracy, scores = vqa_accuracy(preds, targets)
    return MetricResult({"accuracy": accuracy}, scores)


@METRICS.register("mme")
def _mme(preds: Sequence[str], targets: Sequence[str], samples: Sequence = ()) -> MetricResult:
    return mme_scores(preds, targets, samples)


@METRICS.register("mmbench_circular")
def _mmbench(preds: Sequence[str], targets: Sequence[str], samples: Sequence = ()) -> MetricResult:
    return mmbench_circular(preds, targets, samples)


@METRICS.register("multiple_choice")
def _multiple_choice(preds: Sequence[str], targets: Sequence[str]) -> MetricResult:
    accuracy, unparsable, scores = multiple_choice(preds, targets)
    return MetricResult({"accuracy": accuracy, "unparsable": unparsable}, scores)


def get_metric(name: str) -> MetricFn:
    """The metric function registered as `name`; unknown names raise UserError with a hint."""
    return METRICS.get(name)


def compute(name: str, preds: Sequence[str], targets: Sequence[VQATarget], **options) -> MetricResult:
    """Run metric `name` on predictions vs targets; the options it takes (normalizer, protocol) go to it."""
    import inspect

    fn = get_metric(name)
    takes = inspect.signature(fn).parameters
    return fn(preds, targets, **{k: v for k, v in options.items() if k in takes and v})


def baseline_values(name: str, targets: Sequence[VQATarget], **options) -> dict[str, float]:
    """Metric `name` for the majority-answer predictor (the `baseline` column of the metrics table):
    `majority_baseline` over the targets (for VQA lists, over all their answers), scored by `name`."""
    answer, _ = majority_baseline(targets)
    return compute(name, [answer] * len(targets), targets, **options).values
