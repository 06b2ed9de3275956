"""Metrics of the few-shot evaluation: CIDEr-D (pycocoevalcap) with both caption tokenizers, VQAv2 accuracy on
hand-made examples with stated scores (and against the reference's copy of the official code)."""

from __future__ import annotations

import json

import pytest

from flamingo_composer.eval.cider import (
    JAVA_PTB,
    PYTHON_PTB,
    cider_score,
    java_available,
    python_ptb_tokenize,
    tokenize_captions,
)
from flamingo_composer.eval.vqa_accuracy import normalize_answer, question_accuracy, vqa_accuracy

needs_java = pytest.mark.skipif(not java_available(), reason="java (for Stanford PTBTokenizer) not installed")

# Real-looking captions and what Stanford PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`, pycocoevalcap's
# command) followed by pycocoevalcap's punctuation removal makes of them; recorded with java 17.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Two dogs playing in the snow, one brown and one black!", "two dogs playing in the snow one brown and one black"),
    ("A woman's hand holding a cell-phone (an old one).",
     "a woman 's hand holding a cell-phone -lrb- an old one -rrb-"),
    ('"Stop" sign at the corner of 5th St. and Main.', "stop sign at the corner of 5th st. and main"),
    ("There are 3.5 pizzas and 1,000 people... can't you see?", "there are 3.5 pizzas and 1,000 people ca n't you see"),
    ("The cat doesn't like the dog; it's hiding under the bed.",
     "the cat does n't like the dog it 's hiding under the bed"),
    ("A black-and-white photo of a train station in the U.S. at 10:30.",
     "a black-and-white photo of a train station in the u.s. at 10:30"),
    ("Kids playing frisbee--it's a sunny day & everyone's happy.",
     "kids playing frisbee it 's a sunny day & everyone 's happy"),
    ('Someone\'s "favorite" [red] {blue} bus isn\'t here: we\'ll wait.',
     "someone 's favorite -lsb- red -rsb- -lcb- blue -rcb- bus is n't here we 'll wait"),
    ("An elephant standing next to a tree cannot reach the leaves 'high up'.",
     "an elephant standing next to a tree can not reach the leaves high up"),
    ("Two people walking with umbrellas in the rain, Mr. Smith and Mrs. Jones.",
     "two people walking with umbrellas in the rain mr. smith and mrs. jones"),
    ("A plate of food with broccoli, carrots, and rice?!", "a plate of food with broccoli carrots and rice ?!"),
    ("I'm gonna eat the sandwich 'cause I'm hungry.", "i 'm gon na eat the sandwich 'cause i 'm hungry"),
    ("A close up of a red fire hydrant near a street #sign at 50% off $5.",
     "a close up of a red fire hydrant near a street #sign at 50 % off $ 5"),
    ("A bathroom with a toilet , sink and mirror .", "a bathroom with a toilet sink and mirror"),
    ("skateboarder doing a trick on a ramp", "skateboarder doing a trick on a ramp"),
]  # fmt: skip

# A fixed candidate / reference set (COCO-like: several references per image, candidates of mixed quality).
REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.", "Surfer in a wetsuit riding a big wave."],
    2: ["Two dogs playing in the snow.", "A pair of dogs run through the snowy field.",
        "Dogs chasing each other in the snow.", "Two brown dogs playing outside in winter."],
    3: ["A plate of food with broccoli and rice.", "A white plate topped with rice, broccoli and meat.",
        "Broccoli and rice on a dinner plate.", "A meal of chicken, broccoli and rice."],
    4: ["A red fire hydrant on a city sidewalk.", "A fire hydrant painted red next to the street.",
        "The red hydrant is near the curb.", "A bright red fire hydrant by a road."],
    5: ["A cat sleeping on a laptop keyboard.", "A cat lying on top of an open laptop.",
        "A gray cat napping on a computer.", "The cat is curled up on the laptop."],
}  # fmt: skip
CANDIDATES = {
    1: "A man riding a wave on a surfboard.",
    2: "Two dogs play in the snow.",
    3: "A plate with broccoli and rice.",
    4: "A dog sitting on a couch.",
    5: "A cat on a laptop.",
}


def test_python_ptb_tokenizer_reproduces_stanford_ptb_on_real_looking_captions():
    for caption, expected in PTB_CASES:
        assert python_ptb_tokenize(caption) == expected, caption


@needs_java
def test_recorded_ptb_outputs_are_what_java_ptb_gives():
    tokens, name = tokenize_captions({i: [c] for i, (c, _) in enumerate(PTB_CASES)}, JAVA_PTB)
    assert name == JAVA_PTB
    assert [tokens[i][0] for i in range(len(PTB_CASES))] == [e for _, e in PTB_CASES]


def _pycocoevalcap_cider(tokenize) -> float:
    """CIDEr the way pycocoevalcap's COCOEvalCap computes it: tokenise refs and candidates, then Cider."""
    from pycocoevalcap.cider.cider import Cider

    gts = tokenize({k: [{"caption": c} for c in refs] for k, refs in REFERENCES.items()})
    res = tokenize({k: [{"caption": CANDIDATES[k]}] for k in REFERENCES})
    return Cider().compute_score(gts, res)[0] * 100.0


def test_cider_with_python_tokenizer_equals_pycocoevalcap_cider():
    def python_tokenize(captions):
        return {k: [python_ptb_tokenize(c["caption"]) for c in v] for k, v in captions.items()}

    expected = _pycocoevalcap_cider(python_tokenize)
    score, name = cider_score(CANDIDATES, REFERENCES, PYTHON_PTB)
    assert name == PYTHON_PTB
    assert score == pytest.approx(expected, rel=1e-9)
    print(f"CIDEr of the fixed set: {score:.4f}")
    # Sanity of the fixed set: good candidates score, the wrong one (id 4) pulls the corpus score down.
    without_wrong, _ = cider_score({k: v for k, v in CANDIDATES.items() if k != 4}, REFERENCES, PYTHON_PTB)
    assert 0 < score < without_wrong


@needs_java
def test_cider_with_java_ptb_equals_pycocoevalcap_and_the_python_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    expected = _pycocoevalcap_cider(PTBTokenizer().tokenize)
    score, name = cider_score(CANDIDATES, REFERENCES)  # auto: java is here
    assert name == JAVA_PTB
    assert score == pytest.approx(expected, rel=1e-9)
    assert cider_score(CANDIDATES, REFERENCES, PYTHON_PTB)[0] == pytest.approx(score, rel=1e-9)


def test_cider_names_missing_references():
    with pytest.raises(KeyError, match="no reference captions for id"):
        cider_score({9: "a cat"}, REFERENCES, PYTHON_PTB)


# Hand-made VQA examples: (prediction, 10 human answers, accuracy). The accuracy averages, over the 10
# leave-one-out subsets of 9 humans, min(#humans agreeing with the prediction / 3, 1).
VQA_CASES = [
    # all ten agree: every subset has 9 matches -> 1
    ("yes", ["yes"] * 10, 1.0),
    # "two" -> "2"; 3 say 2: leaving out a "2" leaves 2 matches (2/3), leaving out another leaves 3 (1)
    ("two", ["2"] * 3 + ["3"] * 7, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
    # "A dog." -> "dog" (article, period); 1 says dog: 0 when it is left out, else 1/3
    ("A dog.", ["dog"] + ["cat"] * 9, 9 * (1 / 3) / 10),  # 0.3
    # "dont know" -> "don't know" (contraction); 2 agree: 1/3 when one is left out, else 2/3
    ("dont know", ["don't know"] * 2 + ["no"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    # "1,000" -> "1000" (comma between digits), 4 agree: always >= 3 -> 1
    ("1,000", ["1000"] * 4 + ["100"] * 6, 1.0),
    # nobody agrees -> 0
    ("blue", ["red"] * 10, 0.0),
    # a "-" with no space beside it becomes a space and "the" goes: "the red-ish" -> "red ish"; 3 agree
    ("the red-ish", ["red ish"] * 3 + ["pink"] * 7, (3 * 2 / 3 + 7 * 1) / 10),  # 0.9
]


@pytest.mark.parametrize("prediction, answers, expected", VQA_CASES)
def test_vqa_accuracy_on_hand_made_examples(prediction, answers, expected):
    assert question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_normalisation():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("  An apple\t") == "apple"
    assert normalize_answer("isnt it") == "isn't it"
    assert normalize_answer("3.5") == "3.5"  # a period before a digit stays


def test_vqa_accuracy_mean_equals_the_reference_metric(tmp_path):
    from open_flamingo.eval.vqa_metric import compute_vqa_accuracy

    predictions = {i: pred for i, (pred, _, _) in enumerate(VQA_CASES)}
    answers = {i: ans for i, (_, ans, _) in enumerate(VQA_CASES)}
    expected_mean = (
        100 * sum(acc for _, _, acc in VQA_CASES) / len(VQA_CASES)
    )  # (1+.9+.3+.6+1+0+.9)/7 = 67.14
    ours = vqa_accuracy(predictions, answers)
    assert ours == pytest.approx(expected_mean, abs=1e-9)

    meta = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": "val2014",
        "license": {},
    }
    questions = {**meta, "questions": [{"question_id": i, "image_id": i, "question": "?"} for i in answers]}
    annotations = {**meta, "annotations": [
        {"question_id": i, "image_id": i, "question_type": "what", "answer_type": "other",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(ans)]}
        for i, ans in answers.items()
    ]}  # fmt: skip
    results = [{"question_id": i, "answer": p} for i, p in predictions.items()]
    paths = {}
    for name, data in (("q", questions), ("a", annotations), ("r", results)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    reference = compute_vqa_accuracy(str(paths["r"]), str(paths["q"]), str(paths["a"]))  # rounded to 2 places
    assert ours == pytest.approx(reference, abs=0.005)
