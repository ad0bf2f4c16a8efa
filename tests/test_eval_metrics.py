"""Benchmark metrics against the official reference code (megatron_vlm/evaluation/metrics.py).

VQA: the oracle is ``fixtures/vqa_official/cases.json``, scored by the official GT-Vision-Lab/VQA
``vqaEval.py`` (see that folder's README and make_fixture.py). Captions: the oracle is
pycocoevalcap's ``COCOEvalCap.evaluate`` on COCO-format files loaded with pycocotools, run here.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest

from megatron_vlm.evaluation.metrics import CAPTION_METRICS, caption_scores, vqa_accuracy, vqa_score, vqa_score_by_type

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "vqa_official" / "cases.json").read_text())
CASES = FIXTURE["cases"]


def _answers(case: dict) -> list[str]:
    return [answer["answer"] for answer in case["answers"]]


# ------------------------------------------------------------------------------------------------
# VQA accuracy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_vqa_accuracy_equals_official(case):
    # Same arithmetic in the same order as the official code: equal to the last bit.
    assert vqa_accuracy(case["prediction"], _answers(case)) == case["official_accuracy"]


def test_vqa_score_equals_official_overall():
    score = vqa_score((case["prediction"], _answers(case)) for case in CASES)
    assert score == pytest.approx(FIXTURE["overall_unrounded"], abs=1e-9)
    assert round(score, 2) == FIXTURE["overall"]  # what the official code reports


@pytest.mark.parametrize("group", ["answer_type", "question_type"])
def test_vqa_score_by_type_equals_official(group):
    scores = vqa_score_by_type((case["prediction"], _answers(case), case[group]) for case in CASES)
    official = FIXTURE[f"per_{group}_unrounded"]
    assert scores.keys() == official.keys()
    for key, value in official.items():
        assert scores[key] == pytest.approx(value, abs=1e-9), key
        assert round(scores[key], 2) == FIXTURE[f"per_{group}"][key]


def test_vqa_fixture_covers_both_branches_and_all_levels():
    """The fixture is no oracle if it misses a branch: unanimous and split humans, every score level."""
    unanimous = [case for case in CASES if len({a.replace("\n", " ").strip() for a in _answers(case)}) == 1]
    assert 10 <= len(unanimous) < len(CASES) - 40
    assert {round(case["official_accuracy"], 6) for case in CASES} >= {0.0, 0.3, 0.6, 0.9, 1.0}
    assert FIXTURE["source"]["commit"] == "a013f0043c1e2cdc995922dfe257f7149aa9af06"


def test_vqa_errors():
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="at least one question"):
        vqa_score([])


# ------------------------------------------------------------------------------------------------
# Caption metrics
# ------------------------------------------------------------------------------------------------

REFERENCES = {
    101: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a big wave.",
        "Surfer in a black wetsuit catching a wave.",
        "a man surfing on a blue ocean wave",
    ],
    102: [
        "Two dogs playing with a frisbee in the park.",
        "A pair of dogs run across the grass after a frisbee.",
        "Two brown dogs chase a red frisbee on a lawn.",
        "Dogs playing fetch on a sunny day.",
        "Two dogs are running on green grass.",
    ],
    103: [
        "A plate of food with broccoli and rice.",
        "Rice, broccoli and chicken on a white plate.",
        "A white plate topped with rice and vegetables.",
        "A healthy meal of chicken, rice, and broccoli.",
        "Food on a plate on a wooden table.",
    ],
    104: [
        "A red double decker bus driving down a street.",
        "A city bus on a busy road next to buildings.",
        "The red bus is parked at the bus stop.",
        "A double-decker bus travels through the city.",
        "A large red bus on a city street.",
    ],
    105: [
        "A cat sleeping on top of a laptop keyboard.",
        "A grey cat lying on a computer.",
        "The kitten is asleep on the open laptop.",
        "A cat curled up on a keyboard.",
        "A cat naps on a laptop on a desk.",
    ],
    106: [
        "A group of people skiing down a snowy hill.",
        "Skiers going down a mountain slope.",
        "Several people on skis in the snow.",
        "People skiing on a ski slope on a sunny day.",
        "A few skiers descend a snow covered mountain.",
    ],
}
PREDICTIONS = {
    101: "A man riding a wave on top of a surfboard.",  # an exact copy of a reference
    102: "two dogs running after a frisbee on the grass",  # good
    103: "A plate with rice and broccoli on it!",  # good, punctuation the tokenizer drops
    104: "a bus",  # too short
    105: "A dog sitting on a bench",  # partly wrong
    106: "Stock prices fell sharply on Tuesday.",  # totally wrong
}


class _NoSpice:
    """Stands in for pycocoevalcap's Spice, which downloads Stanford CoreNLP models when it runs.

    ``COCOEvalCap.evaluate`` builds its scorer list inside the method, so the official run below
    replaces only the name ``Spice`` in ``pycocoevalcap.eval`` for its duration: the tokenization
    and the Bleu / Meteor / Rouge / Cider calls are the official method's own.
    """

    def method(self) -> str:
        return "SPICE"

    def compute_score(self, gts, res):
        return float("nan"), [float("nan")] * len(gts)


@pytest.fixture(scope="module")
def official_caption_eval(tmp_path_factory):
    """``COCOEvalCap(coco, cocoRes).evaluate()`` on files written the way the COCO leaderboard reads them."""
    import pycocoevalcap.eval as cocoeval
    from pycocotools.coco import COCO

    folder = tmp_path_factory.mktemp("coco_captions")
    annotations = [
        {"image_id": image_id, "id": 1000 * image_id + i, "caption": caption}
        for image_id, captions in REFERENCES.items()
        for i, caption in enumerate(captions)
    ]
    dataset = {"info": {}, "licenses": [], "type": "captions", "images": [{"id": i} for i in REFERENCES]}
    (folder / "captions.json").write_text(json.dumps({**dataset, "annotations": annotations}))
    # Results in another order than the images: the official order is the annotation file's.
    results = [{"image_id": image_id, "caption": PREDICTIONS[image_id]} for image_id in reversed(PREDICTIONS)]
    (folder / "results.json").write_text(json.dumps(results))

    coco = COCO(str(folder / "captions.json"))
    coco_results = coco.loadRes(str(folder / "results.json"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cocoeval, "Spice", _NoSpice)
        evaluator = cocoeval.COCOEvalCap(coco, coco_results)
        evaluator.evaluate()
    return evaluator.eval


@pytest.fixture(scope="module")
def our_caption_scores():
    # Upper-case names: matched case-insensitively, returned in pycocoevalcap's spelling.
    return caption_scores(PREDICTIONS, REFERENCES, metrics=[name.upper() for name in CAPTION_METRICS])


@pytest.mark.first_env_only
def test_caption_scores_equal_cocoevalcap(official_caption_eval, our_caption_scores):
    assert list(our_caption_scores) == list(CAPTION_METRICS)
    for name in CAPTION_METRICS:
        assert our_caption_scores[name] == pytest.approx(official_caption_eval[name], abs=1e-9), name
    # Not degenerate: partly right predictions, fractions (CIDEr-D can exceed 1).
    assert 0.05 < our_caption_scores["Bleu_4"] < 1 and 0.05 < our_caption_scores["METEOR"] < 1
    assert 0.1 < our_caption_scores["CIDEr"] < 10


def test_caption_scores_input_errors():
    with pytest.raises(ValueError, match="unknown caption metric 'SPICE'"):
        caption_scores(PREDICTIONS, REFERENCES, metrics=["SPICE"])
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({101: "a man"}, REFERENCES)
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores({1: "a man"}, {1: []})


def test_caption_scores_explains_missing_java_and_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a `java` executable"):
        caption_scores(PREDICTIONS, REFERENCES)
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install pycocoevalcap"):
        caption_scores(PREDICTIONS, REFERENCES)
