"""Benchmark metrics, computed exactly as the official reference code computes them.

Numbers in papers are comparable only when they come from the same scorer, quirks included, so
these functions do not "improve" the references:

* VQA accuracy follows the official VQA evaluation (GT-Vision-Lab/VQA,
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, commit a013f00 of 2021-03-11), rewritten
  here because that file is Python 2 code that is not installable. ``tests/test_eval_metrics.py``
  checks every case of ``tests/fixtures/vqa_official/cases.json``, which the official code itself
  scored.
* Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D) are pycocoevalcap's own tokenizer and scorers,
  called the way ``COCOEvalCap.evaluate`` calls them (the COCO caption leaderboard's pipeline).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

__all__ = [
    "CAPTION_METRICS",
    "caption_scores",
    "normalize_vqa_answer",
    "vqa_accuracy",
    "vqa_score",
    "vqa_score_by_type",
]

# ---------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------

# Characters the official ``processPunctuation`` deletes or turns into a space. Not in the list
# (so kept): the apostrophe, ":", "*", "#", "$", "%", "&", "^", "~", "|". The period has its own rule.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # one character each, in the official order
# A comma between two digits ("1,000") anywhere in the answer: every punctuation character is then
# deleted, none becomes a space.
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a negative *lookahead* for the
# text "<=" + digit (a mistyped lookbehind), which never matches at a period, so the pattern is a
# period not followed by a digit: "3.5" keeps its period, "3." and "u.s.a." lose theirs.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official call is ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in ``count``, and
# re.UNICODE == 32, so only the first 32 such periods are deleted.
_MAX_PERIODS_DELETED = int(re.UNICODE)

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
# The official contractions table, minus entries that can never apply: "Id've", "I'dve", "Im" and
# "Ive" (answers are lower-cased before the lookup, so their capital I never matches) and the
# identities "let's" and "she's". "somebody'd" -> "somebodyd" is reversed in the official table
# and kept as it is.
_CONTRACTIONS = {
    "'ow'sat": "'ow's'at", "'ows'at": "'ow's'at", "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldn'tve": "couldn't've", "couldnt": "couldn't", "couldnt've": "couldn't've", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadn'tve": "hadn't've", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "he'dve": "he'd've", "hed": "he'd",
    "hed've": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't",
    "it'dve": "it'd've", "itd": "it'd", "itd've": "it'd've", "itll": "it'll", "maam": "ma'am",
    "mightn'tve": "mightn't've", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "shant": "shan't", "she'dve": "she'd've", "shed've": "she'd've",
    "shouldn'tve": "shouldn't've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldve": "should've",
    "somebody'd": "somebodyd", "somebody'dve": "somebody'd've", "somebodyd've": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someone'dve": "someone'd've", "someoned": "someone'd",
    "someoned've": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "something'dve": "something'd've", "somethingd": "something'd", "somethingd've": "something'd've",
    "somethingll": "something'll", "thats": "that's", "there'dve": "there'd've", "thered": "there'd",
    "thered've": "there'd've", "therere": "there're", "theres": "there's", "they'dve": "they'd've",
    "theyd": "they'd", "theyd've": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "we'dve": "we'd've", "wed've": "we'd've", "werent": "weren't",
    "weve": "we've", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "who'dve": "who'd've",
    "whod": "who'd", "whod've": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldn'tve": "wouldn't've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldve": "would've", "y'all'dve": "y'all'd've", "y'alld've": "y'all'd've",
    "y'allll": "y'all'll", "yall": "y'all", "yall'd've": "y'all'd've", "yall'll": "y'all'll", "you'dve": "you'd've",
    "youd": "you'd", "youd've": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def _clean_whitespace(text: str) -> str:
    """The step the official code applies to every answer, always: newline and tab become spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    """The official ``processPunctuation``.

    A character that touches a space *anywhere* in the answer (or any character at all, when the
    answer has a comma between digits) is deleted everywhere; otherwise every occurrence becomes a
    space ("x-ray" -> "x ray", but "x-ray -" -> "xray "). The tests decide on the original text,
    not on the partly processed one, as the official loop does.
    """
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for char in _PUNCTUATION:
        touches_space = char + " " in text or " " + char in text
        out = out.replace(char, "" if delete_all or touches_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_DELETED)


def _process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, articles dropped, contractions.

    Splitting on whitespace and joining with one space also collapses runs of spaces.
    """
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA normalisation of one answer: whitespace, punctuation, digits, articles, contractions.

    Note that ``vqa_accuracy`` applies this only to questions whose human answers are not all
    the same string (after the whitespace clean-up); that is where the official code applies it.
    """
    return _process_digit_article(_process_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction (0..1), as the official evaluation computes it.

    ``answers`` are the human answers in annotation order (ten in VQA v2 / VizWiz / OK-VQA / TextVQA).
    The official code:

    1. replaces newlines and tabs with spaces and strips the prediction and every human answer;
    2. only if the human answers then differ among themselves, normalises the prediction and the
       human answers (``normalize_vqa_answer``). When the humans are unanimous nothing else is done:
       "Yes", "yes." or "two" against ten "yes" / "2" score 0, and case matters;
    3. leaves each annotator out in turn, scores ``min(1, #other annotators equal to the prediction / 3)``
       and averages these scores over the annotators.

    The official step 3 leaves one annotator out by comparing annotation dicts, which carry a
    distinct ``answer_id``: equal answer strings are still different annotators. Leaving out by
    index is the same thing.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    humans = [_clean_whitespace(answer) for answer in answers]
    guess = _clean_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [_process_digit_article(_process_punctuation(answer)) for answer in humans]
        guess = _process_digit_article(_process_punctuation(guess))
    matches = [human == guess for human in humans]
    total = sum(matches)
    # Same arithmetic, in the same order, as the official code, so that the results are bit-equal.
    per_annotator = [min(1, float(total - own) / 3) for own in matches]
    return float(sum(per_annotator)) / len(per_annotator)


def vqa_score(pairs: Iterable[tuple[str, Sequence[str]]]) -> float:
    """Mean VQA accuracy in percent (the number papers report) over ``(prediction, human answers)`` pairs.

    Not rounded: the official ``accuracy['overall']`` is this value rounded to 2 decimals.
    """
    accuracies = [vqa_accuracy(prediction, answers) for prediction, answers in pairs]
    if not accuracies:
        raise ValueError("vqa_score needs at least one question")
    return 100 * float(sum(accuracies)) / len(accuracies)


def vqa_score_by_type(items: Iterable[tuple[str, Sequence[str], str]]) -> dict[str, float]:
    """Mean VQA accuracy in percent per group, over ``(prediction, human answers, group)`` triples.

    The group is the annotation's ``answer_type`` ("yes/no", "number", "other") or
    ``question_type``: the official ``accuracy['perAnswerType']`` / ``['perQuestionType']``,
    unrounded. Groups appear in order of first occurrence.
    """
    groups: dict[str, list[float]] = {}
    for prediction, answers, group in items:
        groups.setdefault(group, []).append(vqa_accuracy(prediction, answers))
    return {group: 100 * float(sum(accs)) / len(accs) for group, accs in groups.items()}


# ---------------------------------------------------------------------------------------------
# Caption metrics (pycocoevalcap)
# ---------------------------------------------------------------------------------------------

# The names of ``COCOEvalCap.eval``; SPICE is left out (it downloads Stanford CoreNLP models at run time).
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

K = TypeVar("K", bound=Hashable)


def caption_scores(
    predictions: Mapping[K, str],
    references: Mapping[K, Sequence[str]],
    metrics: Sequence[str] = ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"),
) -> dict[str, float]:
    """Corpus caption scores as pycocoevalcap's ``COCOEvalCap.evaluate`` computes them.

    ``predictions`` maps an image id to the generated caption, ``references`` maps the same ids to
    the human captions. Both go through pycocoevalcap's PTB tokenizer (lower-cases, drops
    punctuation) in the ``{id: [{"caption": ...}]}`` form ``COCOEvalCap`` builds, then through its
    scorers; ``CIDEr`` is pycocoevalcap's Cider, i.e. CIDEr-D, whose document frequencies come from
    the references passed here, so score the whole evaluation set in one call.

    ``metrics`` are ``COCOEvalCap.eval`` names (see ``CAPTION_METRICS``), matched case-insensitively
    ("BLEU_4" works); the result uses pycocoevalcap's spelling. Values are what pycocoevalcap
    returns, fractions: papers print them x100 (CIDEr 0.85 is reported as 85.0).

    Needs the optional ``pycocoevalcap`` package (``pip install pycocoevalcap``, the ``eval`` extra)
    and a ``java`` executable (Java 8+): its tokenizer and METEOR are Java programs.
    """
    wanted = _caption_metric_names(metrics)
    if set(predictions) != set(references):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(f"predictions and references must have the same ids (missing: {missing}, unknown: {extra})")
    if not references:
        raise ValueError("caption_scores needs at least one image")
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"every image needs at least one reference caption; none for {empty}")

    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise ImportError(
            "caption_scores needs pycocoevalcap: pip install pycocoevalcap (or the megatron-vlm[eval] extra)"
        ) from err
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption_scores needs a `java` executable on PATH (Java 8 or newer): pycocoevalcap's PTB "
            "tokenizer and METEOR scorer are Java programs"
        )

    # The order of COCOEvalCap: image ids in annotation order, references and predictions
    # tokenized by two separate tokenizer runs.
    ids = list(references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": caption} for caption in references[key]] for key in ids})
    res = tokenizer.tokenize({key: [{"caption": predictions[key]}] for key in ids})
    if set(gts) != set(ids) or set(res) != set(ids):
        raise RuntimeError("pycocoevalcap's PTB tokenizer (java) returned fewer captions than it was given")

    scores: dict[str, float] = {}
    if any(name.startswith("Bleu_") for name in wanted):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(bleu)})
    if "METEOR" in wanted:
        meteor = Meteor()  # a java process, ended when the object is collected
        try:
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        finally:
            del meteor
    if "ROUGE_L" in wanted:
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in wanted}


def _caption_metric_names(metrics: Sequence[str]) -> list[str]:
    """``metrics`` in pycocoevalcap's spelling; an unknown name is an error that lists the known ones."""
    by_lower = {name.lower(): name for name in CAPTION_METRICS}
    names = []
    for metric in metrics:
        name = by_lower.get(metric.lower())
        if name is None:
            known = ", ".join(CAPTION_METRICS)
            raise ValueError(f"unknown caption metric {metric!r}; known: {known} (SPICE is not offered)")
        names.append(name)
    return names
